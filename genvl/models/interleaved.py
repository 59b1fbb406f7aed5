"""Emu-style interleaved image-text LM: one causal LM over text tokens and CLIP image embeddings.

Emu (Sun et al. 2023, arXiv:2307.05222) trains a causal LM on documents of interleaved text and
images with one objective, "predict the next multimodal element": cross-entropy for the next text
token, l2 regression for the next visual embedding. Here the visual embeddings are the frozen
CLIP core's image embeddings, and the regressed embedding is drawn by the unCLIP decoder (the
decoder shared with text-to-image, see ``DESIGN.md``).

Vocabulary (:class:`InterleavedLayout`)::

    [0, T)              text ids of the text tokenizer (genvl's BPE: <pad> 0, <unk> 1, <bos> 2, <eos> 3)
    T                   <img>    an image follows (the model emits it to open an image)
    T + 1               </img>   the image is complete (always follows the k-th slot; never predicted)
    [T + 2, T + 2 + k)  <v_1> ... <v_k>  the k visual slots of an image
    [T + 2 + k, V)      unused rows when the vocabulary is rounded up (``vocab_multiple``)

A document is ``<bos> element element ... <eos>``; a text element is its token ids, an image
element with unit CLIP embedding z (D,) is the block::

    <img> v_1 ... v_k </img>      input of slot j:  embed(<v_j>) + W_in s_j

where ``s = sqrt(D) * z`` is cut into k consecutive slots of C = D / k coordinates (the sqrt(D)
scale gives each coordinate unit variance, so the l2 loss has the size of the text loss).

Targets (position t predicts element t + 1):

* text: the next-token cross-entropy at every text id, ``<img>`` and ``<eos>``;
* visual: the hidden state before slot j (at ``<img>`` for j = 1, at ``<v_{j-1}>`` otherwise)
  regresses s_j through a linear head (l2; optionally also the cosine of the assembled embedding);
* ``</img>`` is no target: it always follows the k-th slot.

So an image is generated autoregressively over its k slots, each slot conditioned on the ones
generated before it (as Emu regresses each visual token); ``visual_tokens = 1`` regresses the
whole embedding from the ``<img>`` position. The generated slots, assembled and scaled back, are
L2-normalised before the decoder: it was trained on unit embeddings (``CLIP.encode_image``).

Classifier-free guidance for images (the training drops the context before some images): the
unconditional input is ``<bos> <img>``; see :mod:`genvl.sampling.interleaved`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from genvl.models.base import ConfigModule, register_component

# An element of a document for :meth:`InterleavedLayout.encode`: text ids (without specials), or
# the index of an image in the batch's image embeddings.
Element = Union[list, int]


@dataclass(frozen=True)
class InterleavedLayout:
    """The vocabulary of the interleaved LM: text ids, ``<img>``, ``</img>``, k slot placeholders.

    Attributes:
        text_vocab_size: T, the text tokenizer's vocabulary size (``len(tokenizer)``).
        visual_tokens: k, slots per image.
        pad_id, unk_id, bos_id, eos_id: the text tokenizer's special ids (all < T).
    """

    text_vocab_size: int
    visual_tokens: int
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self):
        if self.text_vocab_size < 1 or self.visual_tokens < 1:
            raise ValueError(
                f"interleaved layout: text_vocab_size and visual_tokens must be >= 1, got "
                f"{self.text_vocab_size}, {self.visual_tokens}"
            )
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            v = getattr(self, name)
            if not 0 <= v < self.text_vocab_size:
                raise ValueError(f"interleaved layout: {name} {v} is not a text id (text ids are [0, {self.text_vocab_size}))")

    @classmethod
    def from_tokenizer(cls, tokenizer, visual_tokens: int) -> "InterleavedLayout":
        """The layout for a HuggingFace text tokenizer (it needs <bos> and <eos>)."""
        ids = {}
        for name in ("pad", "unk", "bos", "eos"):
            v = getattr(tokenizer, f"{name}_token_id", None)
            if v is None and name in ("bos", "eos"):
                raise ValueError(f"the text tokenizer has no {name} token; the interleaved LM needs <bos> and <eos>")
            ids[f"{name}_id"] = int(v) if v is not None else int(tokenizer.pad_token_id)
        return cls(text_vocab_size=len(tokenizer), visual_tokens=visual_tokens, **ids)

    # -- ids --------------------------------------------------------------------------------------
    @property
    def boi_id(self) -> int:
        """<img>"""
        return self.text_vocab_size

    @property
    def eoi_id(self) -> int:
        """</img>"""
        return self.text_vocab_size + 1

    def slot_id(self, j: int) -> int:
        """The placeholder id of slot j (0-based)."""
        if not 0 <= j < self.visual_tokens:
            raise ValueError(f"slot {j} out of range [0, {self.visual_tokens})")
        return self.text_vocab_size + 2 + j

    @property
    def vocab_size(self) -> int:
        """T + 2 + k: every id the layout uses."""
        return self.text_vocab_size + 2 + self.visual_tokens

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, same shape as ``ids``: True on slot placeholders."""
        first = self.text_vocab_size + 2
        return (ids >= first) & (ids < first + self.visual_tokens)

    def image_block(self) -> list[int]:
        """``<img> <v_1> ... <v_k> </img>``"""
        return [self.boi_id, *(self.slot_id(j) for j in range(self.visual_tokens)), self.eoi_id]

    def allowed_ids(self, vocab_size: int | None = None, images: bool = True, device=None) -> torch.Tensor:
        """The ids that may be sampled outside an image: text ids except <pad>, <unk> and <bos>;
        <eos>; and <img> when ``images``.

        Returns:
            (vocab_size,) bool.
        """
        V = vocab_size or self.vocab_size
        if V < self.vocab_size:
            raise ValueError(f"vocab_size {V} is smaller than the layout's {self.vocab_size}")
        mask = torch.zeros(V, dtype=torch.bool, device=device)
        mask[: self.text_vocab_size] = True
        for i in {self.pad_id, self.unk_id, self.bos_id} - {self.eos_id}:
            mask[i] = False
        mask[self.eos_id] = True
        mask[self.boi_id] = images
        return mask

    # -- sequences --------------------------------------------------------------------------------
    def encode(self, elements: list[Element], eos: bool = True, max_len: int | None = None) -> "EncodedDocument":
        """One document -> ids, with the image of each slot position.

        Args:
            elements: text ids (lists, without specials) and image indices (ints), in order.
            eos: end with ``<eos>`` (training documents); prompts leave it out.
            max_len: keep at most this many positions: a text element is cut where the limit
                falls, an image block that does not fit ends the document (never half an image).

        Returns:
            EncodedDocument(ids, slot_images: the image index of each slot position, in order,
            truncated: whether elements were left out).
        """
        ids, images = [self.bos_id], []
        limit = max_len if max_len is not None else math.inf
        truncated = False
        for el in elements:
            if isinstance(el, bool) or not isinstance(el, (int, list, tuple)):
                raise ValueError(f"a document element is a list of text ids or an image index, got {type(el).__name__}")
            if isinstance(el, int):
                block = self.image_block()
                if len(ids) + len(block) > limit:
                    truncated = True
                    break
                ids += block
                images += [el] * self.visual_tokens
            else:
                room = int(min(len(el), limit - len(ids)))
                ids += list(el[:room])
                if room < len(el):
                    truncated = True
                    break
        if eos and not truncated and len(ids) < limit:
            ids.append(self.eos_id)
        return EncodedDocument(ids=ids, slot_images=images, truncated=truncated)

    def build_batch(self, docs: list[list[Element]], max_len: int | None = None, device=None) -> "InterleavedBatch":
        """Training sequences, right-padded.

        Args:
            docs: B documents, each a list of elements (text ids / image indices) as for :meth:`encode`.
            max_len: truncate each document to this many positions.
            device: where the tensors go.

        Returns:
            InterleavedBatch.
        """
        enc = [self.encode(d, eos=True, max_len=max_len) for d in docs]
        if not enc:
            raise ValueError("build_batch needs at least one document")
        B, L = len(enc), max(len(e.ids) for e in enc)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, e in enumerate(enc):
            ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[b, : len(e.ids)] = 1
        visual = self.is_visual(ids)  # (B, L) slot positions
        text = (ids < self.text_vocab_size) | (ids == self.boi_id)  # text ids, <eos> and <img>
        text[:, 0] = False  # <bos> is no target
        text &= mask.bool()
        slot_images = [i for e in enc for i in e.slot_images]  # row-major order of the slot positions
        slot_index = (ids[visual] - (self.text_vocab_size + 2)) if visual.any() else torch.zeros(0, dtype=torch.long)
        return InterleavedBatch(
            input_ids=ids.to(device), attention_mask=mask.to(device), text_targets=text.to(device),
            visual_targets=visual.to(device), image_index=torch.tensor(slot_images, dtype=torch.long, device=device),
            slot_index=slot_index.to(device),
        )


@dataclass
class EncodedDocument:
    """One document as ids (see :meth:`InterleavedLayout.encode`)."""

    ids: list[int]
    slot_images: list[int]  # image index of each slot position, in order
    truncated: bool = False


@dataclass
class InterleavedBatch:
    """Right-padded training sequences of the interleaved LM.

    Attributes:
        input_ids: (B, L) long, ``pad_id`` after each document; slot positions hold ``<v_j>``.
        attention_mask: (B, L) long, 1 on real positions.
        text_targets: (B, L) bool, True where the element is a text target (text ids, <img>, <eos>).
        visual_targets: (B, L) bool, True on slot positions (each is a regression target).
        image_index: (Nv,) long, the image of each slot position (row-major order over the batch).
        slot_index: (Nv,) long, its slot j in [0, k).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_targets: torch.Tensor
    visual_targets: torch.Tensor
    image_index: torch.Tensor
    slot_index: torch.Tensor

    def slot_values(self, slots: torch.Tensor) -> torch.Tensor:
        """The slot vectors of the batch's slot positions.

        Args:
            slots: (M, k, C) slots of the M images the documents index (:meth:`InterleavedLM.image_slots`).

        Returns:
            (Nv, C), row-major over the slot positions: the model's visual input and the regression targets.
        """
        return slots[self.image_index, self.slot_index]


@dataclass
class InterleavedOutput:
    """What :meth:`InterleavedLM.forward` returns.

    Attributes:
        logits: (B, L, V) next-token logits (or (B, 1, V) with ``last_only``).
        regression: (B, L, C) the predicted next slot at every position, in the scaled slot space
            (or (B, 1, C) with ``last_only``).
        past_key_values: the transformers cache when ``use_cache``.
    """

    logits: torch.Tensor
    regression: torch.Tensor
    past_key_values: object = None


@dataclass
class InterleavedConfig:
    """Vocabulary layout, image slots and transformer sizes of the interleaved LM.

    The layout fields (``text_vocab_size`` ... ``eos_id``) must match the text tokenizer and
    ``embed_dim`` the CLIP core; training sets them from ``--init``.
    """

    text_vocab_size: int = 4096  # T: text ids [0, T)
    embed_dim: int = 512  # D: CLIP image embedding size
    visual_tokens: int = 4  # k slots per image; D must be a multiple of k
    max_len: int = 256  # longest document in positions (<bos>, text, 2 + k per image, <eos>)
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
    def layout(self) -> InterleavedLayout:
        return InterleavedLayout(self.text_vocab_size, self.visual_tokens, self.pad_id, self.unk_id, self.bos_id,
                                 self.eos_id)

    @property
    def slot_dim(self) -> int:
        """C = D / k coordinates per slot."""
        return self.embed_dim // self.visual_tokens

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and the output head: T + 2 + k rounded up to ``vocab_multiple``."""
        m = self.vocab_multiple
        return -(-self.layout.vocab_size // m) * m

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or -(-(8 * self.hidden_size // 3) // 32) * 32


INTERLEAVED_SIZES: dict[str, InterleavedConfig] = {
    # ~25K transformer parameters: unit tests, milliseconds on CPU.
    "tiny": InterleavedConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_len=128),
    # ~1.2M transformer parameters (1.5M with a 1024-token text vocabulary): the 32 px emoji demo on a CPU.
    "small": InterleavedConfig(hidden_size=128, num_layers=6, num_heads=4, intermediate_size=352, max_len=128),
    # ~85M transformer parameters: a GPU.
    "base": InterleavedConfig(hidden_size=768, num_layers=12, num_heads=12, vocab_multiple=64, visual_tokens=8,
                              max_len=512),
}


def interleaved_config(size: str = "tiny", **overrides) -> InterleavedConfig:
    """A named size from :data:`INTERLEAVED_SIZES` with field overrides (the layout fields, usually)."""
    if size not in INTERLEAVED_SIZES:
        raise ValueError(f"unknown interleaved size {size!r}; known: {', '.join(INTERLEAVED_SIZES)}")
    cfg = replace(INTERLEAVED_SIZES[size], **overrides)
    for name in ("text_vocab_size", "embed_dim", "visual_tokens", "max_len", "hidden_size", "num_layers", "num_heads",
                 "vocab_multiple"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"interleaved config: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.embed_dim % cfg.visual_tokens:
        raise ValueError(f"interleaved config: embed_dim {cfg.embed_dim} is not a multiple of visual_tokens "
                         f"{cfg.visual_tokens}")
    if cfg.max_len < cfg.visual_tokens + 4:
        raise ValueError(f"interleaved config: max_len {cfg.max_len} cannot hold one image ({cfg.visual_tokens + 4} "
                         "positions with <bos> and <eos>)")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"interleaved config: hidden_size {cfg.hidden_size} is not a multiple of num_heads "
                         f"{cfg.num_heads}")
    kv = cfg.num_kv_heads or cfg.num_heads
    if kv < 1 or cfg.num_heads % kv:
        raise ValueError(f"interleaved config: num_heads {cfg.num_heads} is not a multiple of num_kv_heads {kv}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"interleaved config: dropout must be in [0, 1), got {cfg.dropout}")
    cfg.layout  # noqa: B018  (validates the special ids)
    return cfg


@register_component
class InterleavedLM(ConfigModule):
    """Causal LM over text ids and image slots: a transformers Llama built from config, plus the
    visual input projection and the regression head.

    Nothing is downloaded: the Llama config is made from :class:`InterleavedConfig` and the
    weights start random (or load from the component folder, strictly).
    """

    config_class = InterleavedConfig

    def __init__(self, config: InterleavedConfig):
        super().__init__(config)
        from genvl.models.lm import build_llama

        c = config
        self.layout = c.layout
        self.model = build_llama(c)
        self.visual_in = nn.Linear(c.slot_dim, c.hidden_size)  # slot values -> added to <v_j>'s embedding
        self.visual_out = nn.Linear(c.hidden_size, c.slot_dim)  # regression head: hidden state -> next slot
        self._kwargs = set(inspect.signature(self.model.model.forward).parameters)
        # transformers 5 names the cache argument and output ``cache`` (``past_key_values`` warns there); 4.x the latter
        self._cache_key = "cache" if "cache" in self._kwargs else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def hf_config(self):
        """The transformers ``LlamaConfig`` (for caches)."""
        return self.model.config

    @property
    def takes_cache_position(self) -> bool:
        """transformers 4.x wants explicit ``cache_position`` with a cache."""
        return "cache_position" in self._kwargs

    # -- embeddings <-> slots ----------------------------------------------------------------------
    def image_slots(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings (M, D) -> their slots (M, k, C), scaled by sqrt(D)."""
        c = self.config
        if image_embeds.ndim != 2 or image_embeds.shape[1] != c.embed_dim:
            raise ValueError(f"image embeddings must have shape (M, {c.embed_dim}), got {tuple(image_embeds.shape)}")
        return (image_embeds.float() * math.sqrt(c.embed_dim)).view(-1, c.visual_tokens, c.slot_dim)

    def slots_to_embeds(self, slots: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Slots (M, k, C) (or (M, D)) -> image embeddings (M, D), unit length when ``normalize``."""
        z = slots.float().reshape(slots.shape[0], -1) / math.sqrt(self.config.embed_dim)  # (M, D)
        return F.normalize(z, dim=-1) if normalize else z

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: token rows, plus ``W_in s`` at the slot positions.

        Args:
            input_ids: (B, L) ids.
            visual: (Nv, C) slot values of the slot positions of ``input_ids`` in row-major order
                (None when there are none).

        Returns:
            (B, L, H).
        """
        emb = self.model.model.embed_tokens(input_ids)  # (B, L, H)
        is_slot = self.layout.is_visual(input_ids)  # (B, L)
        n = int(is_slot.sum())
        if n == 0:
            return emb
        C = self.config.slot_dim
        if visual is None or tuple(visual.shape) != (n, C):
            got = None if visual is None else tuple(visual.shape)
            raise ValueError(f"{n} slot positions need visual inputs of shape ({n}, {C}), got {got}")
        add = torch.zeros_like(emb)
        add[is_slot] = self.visual_in(visual.to(emb.dtype))  # (Nv, H) into the slot positions
        return emb + add

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        last_only: bool = False,
        **kwargs,
    ) -> InterleavedOutput:
        """Next-token logits and next-slot regressions.

        Args:
            input_ids: (B, L) ids (slot positions hold the placeholders ``<v_j>``).
            visual: (Nv, C) slot values of those positions, row-major (see :meth:`embed`).
            attention_mask: (B, L_past + L) 1 on real positions.
            position_ids: (B, L) positions (left-padded prompts count from their first real token).
            past_key_values: a transformers cache or None.
            use_cache: fill / extend ``past_key_values``.
            last_only: heads on the last position only.
            kwargs: passed on to ``LlamaModel.forward`` (e.g. ``cache_position`` on transformers 4.x).

        Returns:
            InterleavedOutput(logits (B, L, V), regression (B, L, C), past_key_values).
        """
        emb = self.embed(input_ids, visual)  # (B, L, H)
        out = self.model.model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, **{self._cache_key: past_key_values}, **kwargs)
        h = out.last_hidden_state  # (B, L, H)
        if last_only:
            h = h[:, -1:]
        return InterleavedOutput(logits=self.model.lm_head(h), regression=self.visual_out(h),
                                 past_key_values=getattr(out, self._cache_key) if use_cache else None)
