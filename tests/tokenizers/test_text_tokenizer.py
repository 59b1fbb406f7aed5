
import pytest

from genvl.errors import DataError, ModelDirError
from genvl.tokenizers.text import encode_texts, load_text_tokenizer, train_text_tokenizer

CAPTIONS = ["a red heart", "a cat face", "a slice of pizza", "grinning face, google noto style"] * 20


def test_train_save_load_roundtrip(tmp_path):
    tok = train_text_tokenizer(CAPTIONS, vocab_size=300, model_max_length=16)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert tok.eos_token_id == 3  # never 2: CLIP's text tower reads eos_token_id == 2 as a legacy rule
    ids = tok("A Red Heart").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids == tok("a red heart").input_ids  # lower-cased
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red heart"
    tok.save_pretrained(str(tmp_path / "tok"))
    again = load_text_tokenizer(tmp_path / "tok")
    for text in CAPTIONS[:4] + ["unseen wörds ✨ and emoji 🍕"]:
        assert again(text).input_ids == tok(text).input_ids


def test_truncation_keeps_the_end_token_and_pads_to_longest():
    tok = train_text_tokenizer(CAPTIONS, vocab_size=300, model_max_length=6)
    enc = encode_texts(tok, ["a cat", "a slice of pizza with a cat face and a grinning heart"])
    assert enc["input_ids"].shape == (2, 6)  # the longer one is truncated to model_max_length
    assert enc["input_ids"][1, -1].item() == tok.eos_token_id
    assert enc["attention_mask"][0].sum() < 6 and enc["input_ids"][0, -1].item() == tok.pad_token_id
    short = encode_texts(tok, ["a red heart", "a cat"])
    assert short["input_ids"].shape[1] == short["attention_mask"].sum(1).max()  # padded to the longest


def test_merges_learned_from_the_captions():
    tok = train_text_tokenizer(CAPTIONS, vocab_size=400)
    # frequent words become single tokens
    assert len(tok("pizza").input_ids) == 3 and len(tok("zqxj").input_ids) > 3


def test_no_captions_or_tiny_vocab_is_an_error():
    with pytest.raises(DataError, match="no non-empty captions"):
        train_text_tokenizer(["", "  "])
    with pytest.raises(DataError, match="too small"):
        train_text_tokenizer(CAPTIONS, vocab_size=100)


def _byte_alphabet():
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def test_loads_a_huggingface_clip_tokenizer_directory(tmp_path):
    from transformers import CLIPTokenizerFast

    chars = _byte_alphabet()
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    d = tmp_path / "clip_tok"
    CLIPTokenizerFast(vocab=vocab, merges=merges).save_pretrained(str(d))
    tok = load_text_tokenizer(d)
    ids = tok("a red cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>"]
    assert tok.pad_token is not None


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(ModelDirError, match="tokenizer directory not found"):
        load_text_tokenizer(tmp_path / "nope")
