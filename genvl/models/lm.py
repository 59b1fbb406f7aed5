"""A causal LM over one vocabulary of text tokens and VQ-VAE image codes (Parti / Chameleon style).

One transformer (transformers' ``LlamaForCausalLM``: RMSNorm, rotary positions, SwiGLU, SDPA
attention) models text and images as a single token stream. The vocabulary (:class:`TokenLayout`)::

    [0, T)              text ids of the text tokenizer (genvl's BPE: <pad> 0, <unk> 1, <bos> 2, <eos> 3)
    [T, T + K)          image codes 0..K-1 of the VQ-VAE (id = T + code)
    T + K               <boi>  begin of image
    T + K + 1           <eoi>  end of image
    [T + K + 2, V)      unused rows when the vocabulary is rounded up (``vocab_multiple``); never sampled

Padding uses the text tokenizer's pad id (0): padded positions are masked out of attention and
of the loss, so no extra special is needed.

Sequences (N = h * w codes per image, row-major; captions are the tokenizer's ids without its
own specials, at most ``text_len`` of them)::

    text -> image   <bos> caption <boi> c_1 ... c_N <eoi>          targets: c_1 ... c_N <eoi>
    image -> text   <bos> <boi> c_1 ... c_N <eoi> caption <eos>   targets: caption <eos>

The unconditional text -> image sequence (classifier-free guidance for token LMs: Make-A-Scene,
Gafni et al. 2022, arXiv:2203.13131; Parti, Yu et al. 2022, arXiv:2206.10789) is the same with an empty caption: ``<bos> <boi> c_1 ... c_N <eoi>``. At sampling time only
image codes may follow ``<boi>`` and only text ids (and ``<eos>``) may follow ``<eoi>``:
:meth:`TokenLayout.allowed_ids` gives those masks over the logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from genvl.limits import MAX_CAPTION_CHARS
from genvl.models.base import ConfigModule, register_component


@dataclass(frozen=True)
class TokenLayout:
    """The one vocabulary of the token LM: text ids, then image codes, then ``<boi>``, ``<eoi>``.

    Attributes:
        text_vocab_size: T, the text tokenizer's vocabulary size (``len(tokenizer)``).
        codebook_size: K, the VQ-VAE's number of codes.
        image_tokens: N, codes per image (``vq.tokens_per_image`` = h * w).
        pad_id, unk_id, bos_id, eos_id: the text tokenizer's special ids (all < T).
    """

    text_vocab_size: int
    codebook_size: int
    image_tokens: int
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self):
        if self.text_vocab_size < 1 or self.codebook_size < 1 or self.image_tokens < 1:
            raise ValueError(
                f"token layout: text_vocab_size, codebook_size and image_tokens must be >= 1, got "
                f"{self.text_vocab_size}, {self.codebook_size}, {self.image_tokens}"
            )
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            v = getattr(self, name)
            if not 0 <= v < self.text_vocab_size:
                raise ValueError(f"token layout: {name} {v} is not a text id (text ids are [0, {self.text_vocab_size}))")

    @classmethod
    def from_tokenizer(cls, tokenizer, codebook_size: int, image_tokens: int) -> "TokenLayout":
        """The layout for a HuggingFace text tokenizer and a VQ-VAE's codebook size and tokens per image."""
        ids = {}
        for name in ("pad", "unk", "bos", "eos"):
            v = getattr(tokenizer, f"{name}_token_id", None)
            if v is None and name in ("bos", "eos"):
                raise ValueError(f"the text tokenizer has no {name} token; the token LM needs <bos> and <eos>")
            ids[f"{name}_id"] = int(v) if v is not None else int(tokenizer.pad_token_id)
        return cls(text_vocab_size=len(tokenizer), codebook_size=codebook_size, image_tokens=image_tokens, **ids)

    # -- ids --------------------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        """T: id of image code 0."""
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size + self.codebook_size

    @property
    def eoi_id(self) -> int:
        return self.text_vocab_size + self.codebook_size + 1

    @property
    def vocab_size(self) -> int:
        """T + K + 2: every id the layout uses."""
        return self.text_vocab_size + self.codebook_size + 2

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes in [0, K) (any shape, long) -> vocabulary ids in [T, T + K), same shape."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"image codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"image codes must be in [0, {self.codebook_size}), got [{lo}, {hi}]")
        return codes.long() + self.image_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids in [T, T + K) (any shape) -> image codes in [0, K), same shape."""
        if ids.numel() and not bool(self.is_image(ids).all()):
            raise ValueError(f"not all ids are image codes (image ids are [{self.image_offset}, {self.boi_id}))")
        return ids.long() - self.image_offset

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, same shape as ``ids``: True on image-code ids."""
        return (ids >= self.image_offset) & (ids < self.boi_id)

    def allowed_ids(self, kind: str, vocab_size: int | None = None, device=None) -> torch.Tensor:
        """Which ids may be sampled at a position.

        Args:
            kind: "image" (inside an image span: the K image codes only) or "text" (in a caption:
                text ids except <pad>, <unk> and <bos>, plus <eos>).
            vocab_size: length of the logits (the model's vocabulary, >= ``self.vocab_size``).
            device: where the mask lives.

        Returns:
            (vocab_size,) bool.
        """
        V = vocab_size or self.vocab_size
        if V < self.vocab_size:
            raise ValueError(f"vocab_size {V} is smaller than the layout's {self.vocab_size}")
        mask = torch.zeros(V, dtype=torch.bool, device=device)
        if kind == "image":
            mask[self.image_offset:self.boi_id] = True
        elif kind == "text":
            mask[: self.text_vocab_size] = True
            for i in {self.pad_id, self.unk_id, self.bos_id} - {self.eos_id}:
                mask[i] = False
            mask[self.eos_id] = True
        else:
            raise ValueError(f"unknown id kind {kind!r}; kinds: image, text")
        return mask

    # -- sequences --------------------------------------------------------------------------------
    def t2i_prompt(self, text: list[int]) -> list[int]:
        """The text -> image prefix ``<bos> caption <boi>`` (an empty caption: unconditional)."""
        return [self.bos_id, *text, self.boi_id]

    def i2t_prompt(self, codes: torch.Tensor) -> torch.Tensor:
        """The image -> text prefix ``<bos> <boi> codes <eoi>``.

        Args:
            codes: (B, N) or (B, h, w) image codes in [0, K).

        Returns:
            (B, N + 3) long ids on ``codes.device``.
        """
        codes = self._flat_codes(codes)
        B = codes.shape[0]
        col = lambda v: torch.full((B, 1), v, dtype=torch.long, device=codes.device)  # noqa: E731
        return torch.cat([col(self.bos_id), col(self.boi_id), self.codes_to_ids(codes), col(self.eoi_id)], dim=1)

    def _flat_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.reshape(codes.shape[0], -1)  # (B, h, w) -> (B, N), row-major
        if codes.shape[1] != self.image_tokens:
            raise ValueError(f"expected {self.image_tokens} codes per image, got {codes.shape[1]}")
        return codes

    def build_batch(self, texts: list[list[int]], codes: torch.Tensor, t2i: list[bool]) -> "LMBatch":
        """Training sequences, right-padded: each row text -> image or image -> text.

        Args:
            texts: B captions as text ids without specials (empty list: unconditional t2i row).
            codes: (B, N) or (B, h, w) image codes in [0, K).
            t2i: B flags; True: "<bos> caption <boi> codes <eoi>", False: "<bos> <boi> codes <eoi> caption <eos>".

        Returns:
            LMBatch on ``codes.device``.
        """
        codes = self._flat_codes(codes)
        B, device = codes.shape[0], codes.device
        if len(texts) != B or len(t2i) != B:
            raise ValueError(f"build_batch: {len(texts)} captions and {len(t2i)} order flags for {B} images")
        img = self.codes_to_ids(codes)  # (B, N)
        rows, kinds = [], []  # kinds: 0 = context, 1 = image target, 2 = text target
        for b in range(B):
            text = torch.tensor(texts[b], dtype=torch.long, device=device)  # (n,)
            n = text.numel()
            if t2i[b]:
                seq = torch.cat([text.new_tensor([self.bos_id]), text, text.new_tensor([self.boi_id]), img[b],
                                 text.new_tensor([self.eoi_id])])
                kind = [0] * (n + 2) + [1] * (self.image_tokens + 1)
            else:
                seq = torch.cat([text.new_tensor([self.bos_id, self.boi_id]), img[b],
                                 text.new_tensor([self.eoi_id]), text, text.new_tensor([self.eos_id])])
                kind = [0] * (self.image_tokens + 3) + [2] * (n + 1)
            rows.append(seq)
            kinds.append(kind)
        L = max(r.numel() for r in rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        kind_t = torch.zeros(B, L, dtype=torch.long)
        for b, (r, k) in enumerate(zip(rows, kinds)):
            ids[b, : r.numel()] = r
            mask[b, : r.numel()] = 1
            kind_t[b, : len(k)] = torch.tensor(k)
        kind_t = kind_t.to(device)
        return LMBatch(input_ids=ids, attention_mask=mask, image_targets=kind_t == 1, text_targets=kind_t == 2)


@dataclass
class LMBatch:
    """Right-padded training sequences of the token LM.

    Attributes:
        input_ids: (B, L) long, ``pad_id`` after each sequence.
        attention_mask: (B, L) long, 1 on real tokens.
        image_targets: (B, L) bool, True where the token is an image target (codes and <eoi> of t2i rows).
        text_targets: (B, L) bool, True where the token is a caption target (caption and <eos> of i2t rows).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_targets: torch.Tensor
    text_targets: torch.Tensor


def encode_captions(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Captions -> text ids without the tokenizer's own specials, truncated to ``max_tokens``."""
    if not texts:
        return []
    # cut first: the kept tokens lie far inside the caption limit (bounds the time a pasted megabyte takes)
    cut = [t[:MAX_CAPTION_CHARS] for t in texts]
    out = tokenizer(cut, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [list(ids[:max_tokens]) if t.strip() else [] for ids, t in zip(out, texts)]


def decode_caption(tokenizer, layout: TokenLayout, ids: list[int]) -> str:
    """Generated caption ids (up to the first <eos>) -> text."""
    if layout.eos_id in ids:
        ids = ids[: ids.index(layout.eos_id)]
    ids = [i for i in ids if i < layout.text_vocab_size]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class TokenLMConfig:
    """Vocabulary layout and transformer sizes of the token LM.

    The layout fields (``text_vocab_size`` ... ``eos_id``) must match the text tokenizer and the
    VQ-VAE the LM is used with; training sets them from both.
    """

    text_vocab_size: int = 4096  # T: text ids [0, T)
    codebook_size: int = 1024  # K: image codes, ids [T, T + K)
    image_tokens: int = 256  # N = h * w codes per image
    text_len: int = 32  # longest caption in tokens (without <bos>/<eos>)
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    vocab_multiple: int = 1  # round the embedding rows up to a multiple of this (64 helps GPU matmuls)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 0  # grouped-query attention; 0 = num_heads
    intermediate_size: int = 0  # SwiGLU width; 0 = 8/3 * hidden_size rounded up to a multiple of 32
    rope_theta: float = 10000.0
    dropout: float = 0.0  # attention dropout
    tie_embeddings: bool = False

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.text_vocab_size, self.codebook_size, self.image_tokens,
                           self.pad_id, self.unk_id, self.bos_id, self.eos_id)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and the output head: T + K + 2 rounded up to ``vocab_multiple``."""
        m = self.vocab_multiple
        return -(-self.layout.vocab_size // m) * m

    @property
    def max_len(self) -> int:
        """Longest sequence: <bos> <boi> N codes <eoi> caption <eos>."""
        return self.image_tokens + self.text_len + 4

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or -(-(8 * self.hidden_size // 3) // 32) * 32


LM_SIZES: dict[str, TokenLMConfig] = {
    # ~25K transformer parameters: unit tests, milliseconds on CPU.
    "tiny": TokenLMConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    # ~0.8M transformer parameters (1.2M with a 1024 + 512 + 2 vocabulary): the 32 px emoji demo
    # (64 codes + <= 32 caption tokens), ~1.5 s per batch of 64 (VQ-VAE encoding included) on a 2-core CPU.
    "small": TokenLMConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352),
    # ~85M transformer parameters: 256 codes (16 x 16) per image on a GPU.
    "base": TokenLMConfig(hidden_size=768, num_layers=12, num_heads=12, vocab_multiple=64),
    # ~150M transformer parameters (+ embeddings): benchmarks/ar_sampling.py on a GPU.
    "medium": TokenLMConfig(hidden_size=1024, num_layers=12, num_heads=16, intermediate_size=2816, vocab_multiple=64),
}


def lm_config(size: str = "tiny", **overrides) -> TokenLMConfig:
    """A named size from :data:`LM_SIZES` with field overrides (the layout fields, usually)."""
    if size not in LM_SIZES:
        raise ValueError(f"unknown lm size {size!r}; known: {', '.join(LM_SIZES)}")
    cfg = replace(LM_SIZES[size], **overrides)
    for name in ("text_vocab_size", "codebook_size", "image_tokens", "text_len", "hidden_size", "num_layers",
                 "num_heads", "vocab_multiple"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"lm config: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"lm config: hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
    kv = cfg.num_kv_heads or cfg.num_heads
    if kv < 1 or cfg.num_heads % kv:
        raise ValueError(f"lm config: num_heads {cfg.num_heads} is not a multiple of num_kv_heads {kv}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lm config: dropout must be in [0, 1), got {cfg.dropout}")
    cfg.layout  # noqa: B018  (validates the special ids)
    return cfg


def build_llama(c) -> torch.nn.Module:
    """A randomly initialised transformers ``LlamaForCausalLM`` from a genvl LM config (vocab_size,
    hidden_size, ffn_size, num_layers, num_heads, num_kv_heads, max_len, dropout, tie_embeddings,
    pad/bos/eos ids, rope_theta); shared by the token LM and the interleaved LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads or c.num_heads,
        max_position_embeddings=c.max_len,
        attention_dropout=c.dropout,
        tie_word_embeddings=c.tie_embeddings,
        pad_token_id=c.pad_id,
        bos_token_id=c.bos_id,
        eos_token_id=c.eos_id,
        attn_implementation="sdpa",
    )
    if c.rope_theta != 10000.0:  # transformers 5 keeps it in rope_parameters, 4.x in rope_theta
        if isinstance(getattr(hf, "rope_parameters", None), dict):
            hf.rope_parameters["rope_theta"] = c.rope_theta
        else:
            hf.rope_theta = c.rope_theta
    return LlamaForCausalLM(hf)


@register_component
class TokenLM(ConfigModule):
    """Causal LM over text ids and image codes: a transformers ``LlamaForCausalLM`` built from config.

    Nothing is downloaded: the Llama config is made from :class:`TokenLMConfig` and the weights
    start random (or load from the component folder, strictly).
    """

    config_class = TokenLMConfig

    def __init__(self, config: TokenLMConfig):
        super().__init__(config)
        c = config
        self.layout = c.layout
        self.model = build_llama(c)
        self._kwargs = set(inspect.signature(self.model.forward).parameters)
        # transformers 5 names the cache argument ``cache`` (``past_key_values`` warns there); 4.x the latter
        self._cache_key = "cache" if "cache" in self._kwargs else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def hf_config(self):
        """The transformers ``LlamaConfig`` (for caches: ``DynamicCache(config=...)``, ``StaticCache``)."""
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        last_only: bool = False,
        **kwargs,
    ):
        """Next-token logits.

        Args:
            input_ids: (B, L) ids in [0, vocab_size).
            attention_mask: (B, L_past + L) 1 on real tokens (with a static cache: (B, max_cache_len)).
            position_ids: (B, L) positions (left-padded prompts count from their first real token).
            past_key_values: a transformers cache (``DynamicCache`` / ``StaticCache``) or None.
            use_cache: fill / extend ``past_key_values``.
            last_only: compute the logits of the last position only.
            kwargs: passed on to ``LlamaForCausalLM.forward`` (e.g. ``cache_position`` on transformers 4.x).

        Returns:
            transformers ``CausalLMOutputWithPast``: ``logits`` (B, L, V) or (B, 1, V) with
            ``last_only``, and ``past_key_values``.
        """
        if last_only:
            key = "logits_to_keep" if "logits_to_keep" in self._kwargs else "num_logits_to_keep"
            kwargs[key] = 1
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **{self._cache_key: past_key_values}, **kwargs,
        )
