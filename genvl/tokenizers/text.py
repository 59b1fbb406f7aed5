"""Text tokenizer: a byte-level BPE trained offline on a dataset's captions.

The tokenizer is a transformers ``PreTrainedTokenizerFast`` backed by HuggingFace ``tokenizers``,
saved with ``save_pretrained`` inside each model directory (``tokenizer/``). Any HuggingFace
tokenizer directory (for example a CLIP checkpoint's) loads through :func:`load_text_tokenizer`.

Special-token ids are fixed: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3. The end token is
deliberately not id 2: transformers' CLIP text tower treats ``eos_token_id == 2`` as the legacy
"pool at the highest id" rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from genvl.errors import DataError, GenvlError, ModelDirError
from genvl.limits import MAX_CAPTION_CHARS, MAX_WORD_CHARS

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

logger = logging.getLogger(__name__)

_LONG_RUN = re.compile(r"\S{%d}(?=\S)" % MAX_WORD_CHARS)  # a run of non-space characters that goes on


def clip_text(text: str) -> str:
    """``text`` cut to :data:`~genvl.limits.MAX_CAPTION_CHARS` characters, before a tokenizer sees it.

    The text tower keeps at most a few hundred tokens, which lie far inside the first 10,000
    characters of any real text, so this does not change what is kept; it bounds the time and memory
    tokenizing a pasted megabyte takes.
    """
    return text if len(text) <= MAX_CAPTION_CHARS else text[:MAX_CAPTION_CHARS]


def _bounded_words(text: str) -> str:
    """``text`` (cut to the caption limit) with a space after every ``MAX_WORD_CHARS`` characters of a
    longer run of non-space characters: the BPE trainer's time grows with the square of a word's
    length, so one 1 MB "aaaa..." caption kept ``train_text_tokenizer`` busy for many minutes. Words
    of ordinary text are far shorter and unchanged."""
    return _LONG_RUN.sub(lambda m: m.group(0) + " ", clip_text(text))


def train_text_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    model_max_length: int = 77,
    min_frequency: int = 1,
):
    """Train a lower-casing byte-level BPE on ``texts``.

    Training time is linear in the size of ``texts``: each text is cut to
    :data:`~genvl.limits.MAX_CAPTION_CHARS` characters and runs of more than
    :data:`~genvl.limits.MAX_WORD_CHARS` non-space characters are learned from in pieces.

    Args:
        texts: the captions to learn merges from (empty strings are ignored).
        vocab_size: target size including the special and 256 byte tokens.
        model_max_length: longest sequence the text tower accepts; longer input is truncated.
        min_frequency: merges seen fewer times are not learned.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` that adds ``<bos>`` ... ``<eos>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [_bounded_words(t) for t in texts if t and t.strip()]
    if not texts:
        raise DataError("cannot train a text tokenizer: no non-empty captions")
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs > 260)")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def load_text_tokenizer(path: str | Path):
    """Load a tokenizer saved by genvl, or any HuggingFace tokenizer directory (offline)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        # GPT-2 style tokenizers have no pad token; reuse the end token (masked out anyway).
        tok.pad_token = tok.eos_token
    return tok


def encode_texts(tokenizer, texts: list[str], max_length: int | None = None) -> dict:
    """Tokenize a batch to ``input_ids`` and ``attention_mask`` tensors.

    Pads to the longest text of the batch and truncates at ``max_length`` (default: the
    tokenizer's ``model_max_length``), keeping the end token so the text tower still pools there.
    """
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length > 100_000:  # tokenizers saved without a limit report a huge sentinel
            max_length = 512
    texts = [clip_text(t) for t in texts]
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")


def check_text(text: str, what: str = "prompt") -> str:
    """Return ``text``, or raise a one-line error when it is not valid Unicode.

    A command-line argument holding bytes that are not UTF-8 arrives as a string with lone
    surrogates (``\\udcff``), which no tokenizer can encode.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GenvlError(f"{what} {text!r} is not valid text (it holds bytes that are not UTF-8)") from None
    return text


def warn_truncated(tokenizer, texts: Iterable[str], max_length: int, add_special_tokens: bool = True) -> int:
    """Log one warning for each text longer than ``max_length`` tokens, which tokenizing will cut.

    Args:
        tokenizer: the tokenizer that will encode ``texts``.
        texts: prompts (or captions) about to be encoded.
        max_length: the most tokens kept (the text tower's context).
        add_special_tokens: whether the encoding adds start / end tokens (they count).

    Returns:
        How many texts are longer than ``max_length``.
    """
    texts = list(texts)
    ids = tokenizer([clip_text(t) for t in texts], add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    long = [(t, len(row)) for t, row in zip(texts, ids) if len(row) > max_length]
    for text, n in long:
        shown = text if len(text) <= 60 else text[:57] + "..."
        size = f"{n} tokens" if len(text) <= MAX_CAPTION_CHARS else f"{len(text)} characters"
        logger.warning("genvl: warning: prompt %r is %s, longer than the text tower's %d; only the first %d "
                       "are used", shown, size, max_length, max_length)
    return len(long)
