"""Autoregressive sampling with the token LM (Parti / Chameleon style): explicit loops, injected parts.

Text -> image (:func:`text_to_image`)::

    prompts ─► tokenizer ─► "<bos> caption <boi>"   (left-padded; unconditional rows "<bos> <boi>")
            ─► LM prefill ─► for i in 1..N:  logits ─► CFG ─► image-code mask ─► sample ─► feed back
            ─► N codes ─► VQ-VAE decoder ─► (B, 3, S, S) in [-1, 1]

The decode loop, written out (one batch holds the conditional and the unconditional rows)::

    logits = lm(prefix).logits[:, -1]                          # (2B, V) prefill, fills the KV cache
    for i in range(N):
        cond, uncond = logits.chunk(2)
        logits = uncond + g * (cond - uncond)                   # classifier-free guidance
        logits[~image_code_ids] = -inf                          # only codes inside <boi> ... <eoi>
        token = sample(logits / temperature, top_k, top_p, generator)
        logits = lm(cat([token, token]), past_key_values=cache).logits[:, -1]

Image -> text (:func:`caption`): "<bos> <boi> codes <eoi>" then text ids (and <eos>) only, until
every row has produced <eos> or ``max_new_tokens``; temperature 0 is greedy.

Decoding modes (``decode``): ``"dynamic"`` (default) keeps a transformers ``DynamicCache`` of keys and
values, one token per forward; ``"none"`` re-runs the whole sequence every step (the reference the
tests compare against); ``"static"`` uses a preallocated ``StaticCache`` and a fixed-size attention
mask, so every decode step has the same shapes. With ``compile=True`` on CUDA the one-token step is
compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): :func:`text_to_image` does
this for ``fast=True`` on a CUDA device and falls back to the dynamic cache elsewhere.

Randomness: one draw of the caller's generator (or of a generator seeded with ``seed``) seeds a
generator on the LM's device, which draws the sampling noise (the exponential race: argmax of
p / q with q ~ Exp(1) is a sample of p, without a host sync). The same seed gives the same tokens
on the same device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from genvl.errors import GenvlError
from genvl.limits import MAX_IMAGES, check_memory
from genvl.models.lm import TokenLayout, decode_caption, encode_captions
from genvl.sampling.common import (
    Progress,
    apply_guidance,
    as_pixels,
    check_count,
    check_guidance,
    check_prompts,
    device_generator,
    dynamic_cache,
    left_pad,
    positions,
    progress_steps,
    resize,
    resolve_generator,
)
from genvl.tokenizers.text import warn_truncated

DECODE_MODES = ("none", "dynamic", "static")


@dataclass
class ARImageOutput:
    """What :func:`text_to_image` returns.

    Attributes:
        images: (B, 3, S, S) in [-1, 1], prompt-major (prompt 0's images first).
        codes: (B, h, w) long image codes in [0, K).
        prompts: the prompt of each image (B strings).
        seed: the seed used, or None when the caller passed a generator.
        settings: the sampling settings (for PNG metadata and reproduction).
    """

    images: torch.Tensor
    codes: torch.Tensor
    prompts: list[str]
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionOutput:
    """What :func:`caption` returns.

    Attributes:
        captions: one string per image.
        token_ids: the generated text ids of each image, without <eos>.
        codes: (B, h, w) the image codes the captions were conditioned on.
        seed: the seed used (None when a generator was passed; irrelevant when greedy).
        settings: the sampling settings.
    """

    captions: list[str]
    token_ids: list[list[int]]
    codes: torch.Tensor
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ validation
def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """One-line :class:`GenvlError` for a bad temperature (>= 0), top-k (>= 0) or top-p (in (0, 1])."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise GenvlError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenvlError(f"top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise GenvlError(f"top-p must be in (0, 1] (1 = off), got {top_p!r}")


def _check_lm_memory(lm: nn.Module, rows: int, what: str) -> None:
    """Refuse ``rows`` sequences whose key / value cache and activations are estimated not to fit."""
    c = lm.config
    head_dim = c.hidden_size // c.num_heads
    per_row = 2 * c.num_layers * c.max_len * head_dim * (c.num_kv_heads or c.num_heads)  # keys and values
    per_row += 8 * c.max_len * c.hidden_size + c.num_heads * c.max_len * c.max_len  # activations, attention scores
    need = rows * per_row * torch.finfo(next(lm.parameters()).dtype).bits // 8
    check_memory(need, what, "ask for fewer images at once (--num-images)", lm.device)


def check_parts(lm: nn.Module, vq: nn.Module | None, tokenizer, layout: TokenLayout | None) -> TokenLayout:
    """The layout to sample with; a one-line :class:`GenvlError` when LM, VQ-VAE and tokenizer do not fit."""
    own = lm.config.layout
    if layout is None:
        layout = own
    elif layout != own:
        raise GenvlError(f"the token layout {layout} is not the LM's own {own}")
    if tokenizer is not None and len(tokenizer) != layout.text_vocab_size:
        raise GenvlError(
            f"size mismatch: the LM was trained with a {layout.text_vocab_size}-token text vocabulary, "
            f"the tokenizer has {len(tokenizer)}"
        )
    if vq is not None:
        K, N = vq.config.codebook_size, vq.tokens_per_image
        if (K, N) != (layout.codebook_size, layout.image_tokens):
            raise GenvlError(
                f"size mismatch: the LM expects {layout.image_tokens} image codes from a {layout.codebook_size}-code "
                f"codebook, the VQ-VAE gives {N} from {K}"
            )
    return layout


# -------------------------------------------------------------------------------------- sampling
def guide(logits: torch.Tensor, batch: int, guidance: float) -> torch.Tensor:
    """Classifier-free guidance over rows [cond (B) | uncond (B)].

    Args:
        logits: (2B, V) next-token logits, conditional rows first.
        batch: B.
        guidance: scale s; uncond + s * (cond - uncond).

    Returns:
        (B, V).
    """
    return apply_guidance(logits[batch:], logits[:batch], guidance)


def filter_logits(
    logits: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
) -> torch.Tensor:
    """Mask disallowed ids, scale by temperature, keep the top-k / nucleus (top-p) candidates.

    Args:
        logits: (R, V) float logits.
        allowed: (V,) bool, the ids that may be sampled here.
        temperature: > 0 (greedy decoding does not call this with 0).
        top_k: keep the k most likely ids (0 = all).
        top_p: keep the smallest set of ids whose probability reaches p (1 = all).

    Returns:
        (R, V) logits, -inf outside the kept set (never empty: the most likely allowed id stays).
    """
    logits = logits.float()
    if temperature != 1.0:
        # scaled before masking: a temperature too large for float32 is inf, and -inf / inf is nan
        logits = logits / temperature
    logits = logits.masked_fill(~allowed, float("-inf"))  # (R, V)
    if top_k:
        k = min(top_k, int(allowed.sum()))
        kth = logits.topk(k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this id already reaches p; first id always kept
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One id per row from (R, V) logits; temperature 0 takes the most likely allowed id.

    Sampling uses the exponential race (argmax_i p_i / q_i, q_i ~ Exp(1), drawn from
    ``generator`` on the logits' device), which is an exact sample of p without a host sync.

    Returns:
        (R,) long ids, all in ``allowed``.
    """
    greedy = logits.float().masked_fill(~allowed, float("-inf")).argmax(-1)  # (R,)
    if temperature == 0:
        return greedy
    probs = filter_logits(logits, allowed, temperature, top_k, top_p).softmax(-1)  # (R, V)
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A temperature or top-p so small that float32 overflows leaves no finite distribution: greedy is
    # its limit (chosen per row on the device, without a host sync).
    return torch.where(probs.isfinite().all(-1), (probs / q).argmax(-1), greedy)


# -------------------------------------------------------------------------------------- decoding
def static_supported(lm) -> bool:
    """Static-cache decoding needs transformers >= 5 (the cache tracks its own positions)."""
    return "cache_position" not in lm._kwargs


class IncrementalDecoder:
    """Runs the LM over a batch of prompts, then one token per row per step.

    Args:
        lm: a :class:`~genvl.models.lm.TokenLM` in eval mode.
        mode: "none" (no cache: the whole sequence every step), "dynamic" (``DynamicCache``) or
            "static" (``StaticCache`` of ``max_len`` positions and a fixed-size mask).
        max_len: prompt length + tokens to generate (static mode).
        compile: compile the one-token step with ``torch.compile(mode="reduce-overhead")`` (CUDA
            graphs; static mode on CUDA only). The compiled step and its cache are kept on the LM
            and reused by later calls with the same batch size and length.
    """

    def __init__(self, lm: nn.Module, mode: str = "dynamic", max_len: int = 0, compile: bool = False):
        if mode not in DECODE_MODES:
            raise GenvlError(f"unknown decode mode {mode!r}; modes: {', '.join(DECODE_MODES)}")
        if compile and (mode != "static" or lm.device.type != "cuda"):
            raise GenvlError("compiled decoding needs decode='static' on a CUDA device")
        if mode == "static" and not static_supported(lm):
            raise GenvlError("static-cache decoding needs transformers >= 5; use decode='dynamic'")
        self.lm, self.mode, self.max_len, self.compile = lm, mode, max_len, compile
        self.cache = None
        self._fn = None
        self._cache_pos = "cache_position" in lm._kwargs  # transformers 4.x takes explicit cache positions
        self.seen = 0

    def _forward(self, ids, mask, pos, cache):
        kwargs = {}
        if self._cache_pos:  # positions in the cache: after what it holds; without a cache the whole sequence
            start = self.seen if cache is not None else 0
            kwargs["cache_position"] = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.lm(ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=cache is not None, last_only=True, **kwargs).logits[:, -1]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts.

        Args:
            ids: (R, P) left-padded prompt ids.
            mask: (R, P) 1 on real tokens.

        Returns:
            (R, V) float logits of the next token.
        """
        R, P = ids.shape
        self.ids, self.mask = ids, mask
        self.pos = positions(mask)[:, -1:]  # (R, 1) position of the last prompt token
        self.seen = 0
        if self.mode == "none":
            out = self._forward(ids, mask, positions(mask), None)
        elif self.mode == "dynamic":
            self.cache = dynamic_cache(self.lm)
            out = self._forward(ids, mask, positions(mask), self.cache)
        else:
            if self.max_len < P + 1:
                raise GenvlError(f"static decoding: max_len {self.max_len} leaves no room after a {P}-token prompt")
            self._setup_static(R)
            # fixed-size mask: the prompt's padding, then every later position (the causal mask hides the future)
            self.mask = torch.cat([mask, mask.new_ones(R, self.max_len - P)], dim=1)  # (R, max_len)
            out = self._forward(ids, self.mask, positions(mask), self.cache)
        self.seen = P
        return out.float()

    def _setup_static(self, rows: int) -> None:
        lm = self.lm
        key = (rows, self.max_len, str(lm.device), lm.dtype, self.compile)
        store = lm.__dict__.setdefault("_genvl_static_decode", {})
        if key not in store:
            store.clear()  # one preallocated cache per LM at a time
            from transformers import StaticCache

            cache = StaticCache(config=lm.hf_config, max_cache_len=self.max_len)
            fn = None
            if self.compile:
                def step(ids, pos, mask):
                    return lm(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                              last_only=True).logits[:, -1]

                fn = torch.compile(step, mode="reduce-overhead", fullgraph=False)
            store[key] = (cache, fn)
        self.cache, self._fn = store[key]
        self.cache.reset()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row.

        Args:
            tokens: (R,) long ids.

        Returns:
            (R, V) float logits of the next token.
        """
        tok = tokens[:, None]  # (R, 1)
        self.pos = self.pos + 1
        if self.mode == "none":
            self.ids = torch.cat([self.ids, tok], dim=1)
            self.mask = torch.cat([self.mask, torch.ones_like(tok)], dim=1)
            out = self._forward(self.ids, self.mask, positions(self.mask), None)
        elif self.mode == "dynamic":
            self.mask = torch.cat([self.mask, torch.ones_like(tok)], dim=1)  # (R, seen + 1)
            out = self._forward(tok, self.mask, self.pos, self.cache)
        else:
            if self.seen >= self.max_len:
                raise GenvlError(f"static decoding: the cache holds {self.max_len} positions, all used")
            if self._fn is not None:
                torch.compiler.cudagraph_mark_step_begin()
                out = self._fn(tok, self.pos, self.mask).clone()  # the graph's output buffer is reused
            else:
                out = self._forward(tok, self.mask, self.pos, self.cache)
        self.seen += 1
        return out.float()


def _decode_mode(lm, fast: bool, use_cache: bool) -> tuple[str, bool]:
    """(mode, compile): static + CUDA graphs for ``fast`` on CUDA, else the dynamic cache."""
    device = lm.device
    if not use_cache:
        return "none", False
    if fast and device.type == "cuda" and static_supported(lm):
        return "static", True
    return "dynamic", False


def _decoding(lm, seed: int | None, generator: torch.Generator | None, fast: bool,
              use_cache: bool) -> tuple[torch.Generator, int | None, str, bool]:
    """What a sampling call decodes with: (a generator on the LM's device drawn from the seed or the
    caller's generator, the seed or None, the decode mode, whether to compile)."""
    gen, seed = resolve_generator(seed, generator)
    mode, compile = _decode_mode(lm, fast, use_cache)
    return device_generator(gen, lm.device), seed, mode, compile


def _prefill(lm: nn.Module, layout: TokenLayout, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, kind: str,
             decode: str, compile: bool) -> tuple[IncrementalDecoder, torch.Tensor, torch.Tensor]:
    """A decoder with room for ``new_tokens`` after the prompts (R, P), the next-token logits (R, V) and
    the (V,) ids of ``kind`` ("image" codes or "text") that may be sampled."""
    dec = IncrementalDecoder(lm, decode, max_len=ids.shape[1] + new_tokens, compile=compile)
    logits = dec.prefill(ids, mask)  # (R, V)
    return dec, logits, layout.allowed_ids(kind, logits.shape[-1], lm.device)


@torch.no_grad()
def generate_image_codes(
    lm: nn.Module, layout: TokenLayout, prompt_ids: list[list[int]], guidance: float = 3.0,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None, *,
    decode: str = "dynamic", compile: bool = False, cfg: bool | None = None, progress: Progress = None,
) -> torch.Tensor:
    """Sample N image codes for each caption (text ids) with classifier-free guidance.

    The conditional rows ``<bos> caption <boi>`` and, with guidance, as many unconditional rows
    ``<bos> <boi>`` run as one batch; each step's guided logits are masked to
    the image codes, then sampled, and the one token is fed to both rows.

    Args:
        lm: the token LM (eval mode).
        layout: its vocabulary layout.
        prompt_ids: B captions as text ids without specials (an empty list: unconditional).
        guidance: CFG scale (1 = plain conditional sampling, 0 = unconditional).
        temperature: softmax temperature (0 = greedy).
        top_k, top_p: candidate filters (0 / 1 = off).
        generator: source of the sampling noise, on the LM's device.
        decode: "dynamic" | "static" | "none" (see the module doc).
        compile: compile the decode step (static mode on CUDA).
        cfg: run the unconditional rows; None: when ``guidance != 1`` (at scale 1 they cancel out).
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        (B, N) long codes in [0, K).
    """
    check_sampling(temperature, top_k, top_p)
    check_guidance("guidance", guidance)
    if not prompt_ids:
        raise GenvlError("no prompt given")
    B, N = len(prompt_ids), layout.image_tokens
    guided = guidance != 1.0 if cfg is None else bool(cfg)
    rows = [layout.t2i_prompt(p) for p in prompt_ids]
    if guided:
        rows += [layout.t2i_prompt([])] * B  # (2B rows) unconditional: empty caption
    device = lm.device
    ids, mask = left_pad(rows, layout.pad_id, device)  # (R, P)
    dec, logits, allowed = _prefill(lm, layout, ids, mask, N, "image", decode, compile)  # (R, V), (V,)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    for i in progress_steps(range(N), "lm", progress):
        if guided:
            logits = guide(logits, B, guidance)  # (B, V)
        tok = sample_tokens(logits, allowed, temperature, top_k, top_p, generator)  # (B,)
        out[:, i] = tok
        if i + 1 < N:
            logits = dec.step(torch.cat([tok, tok]) if guided else tok)
    return layout.ids_to_codes(out)


@torch.no_grad()
def generate_caption_ids(
    lm: nn.Module, layout: TokenLayout, codes: torch.Tensor, max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None, *,
    decode: str = "dynamic", compile: bool = False, progress: Progress = None,
) -> list[list[int]]:
    """Caption images given as codes: "<bos> <boi> codes <eoi>" then text ids until <eos>.

    Args:
        lm: the token LM (eval mode).
        layout: its vocabulary layout.
        codes: (B, N) or (B, h, w) image codes in [0, K).
        max_new_tokens: most tokens per caption (the <eos> included); no more than the LM's
            ``text_len + 1`` are generated.
        temperature: 0 = greedy.
        top_k, top_p: candidate filters (0 / 1 = off).
        generator: source of the sampling noise, on the LM's device.
        decode, compile: see :class:`IncrementalDecoder`.
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        B lists of text ids (without <eos>).
    """
    check_sampling(temperature, top_k, top_p)
    check_count("max_new_tokens", max_new_tokens)
    # a caption is at most text_len tokens and <eos>: the longest sequence the LM was trained on
    max_new_tokens = min(max_new_tokens, lm.config.text_len + 1)
    device = lm.device
    ids = layout.i2t_prompt(codes.to(device))  # (B, N + 3)
    B = ids.shape[0]
    mask = torch.ones_like(ids)
    dec, logits, allowed = _prefill(lm, layout, ids, mask, max_new_tokens, "text", decode, compile)  # (B, V), (V,)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in progress_steps(range(max_new_tokens), "caption", progress):
        tok = sample_tokens(logits, allowed, temperature, top_k, top_p, generator)  # (B,)
        tok = torch.where(done, torch.full_like(tok, layout.eos_id), tok)
        out = torch.cat([out, tok[:, None]], dim=1)
        done |= tok == layout.eos_id
        if bool(done.all()) or i + 1 == max_new_tokens:
            break
        logits = dec.step(tok)
    result = []
    for row in out.tolist():
        result.append(row[: row.index(layout.eos_id)] if layout.eos_id in row else row)
    return result


# -------------------------------------------------------------------------------------- pipelines
def _vq_device(vq: nn.Module) -> torch.device:
    for t in vq.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def text_to_image(
    lm: nn.Module, vq: nn.Module, tokenizer, layout: TokenLayout | None, prompts, num_images: int = 1,
    guidance: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
    seed: int | None = None, generator: torch.Generator | None = None, fast: bool = False, use_cache: bool = True,
    progress: Progress = None,
) -> ARImageOutput:
    """Text -> image with the token LM and the VQ-VAE decoder.

    Args:
        lm: a :class:`~genvl.models.lm.TokenLM` (eval mode).
        vq: the VQ-VAE whose codes the LM models (``decode_codes``).
        tokenizer: the LM's text tokenizer.
        layout: the vocabulary layout (None: the LM's own).
        prompts: one prompt or a list of P non-empty prompts.
        num_images: n images per prompt (prompt-major order, B = P * n).
        guidance: classifier-free guidance scale (1 = none).
        temperature: softmax temperature (0 = greedy; every image of a prompt is then the same).
        top_k, top_p: candidate filters (0 / 1 = off).
        seed: seed of the sampling noise (random when neither seed nor generator is given).
        generator: a torch.Generator instead of ``seed``.
        fast: on CUDA, decode with a static cache and a CUDA-graph-compiled step (the first call
            compiles, later calls with the same batch reuse it); elsewhere the dynamic cache.
        use_cache: False re-runs the whole sequence every step (reference, slow).
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        ARImageOutput(images (B, 3, S, S), codes (B, h, w), prompts, seed, settings).
    """
    prompts = check_prompts(prompts)
    check_count("num_images", num_images, MAX_IMAGES, "images per prompt")
    check_sampling(temperature, top_k, top_p)
    check_guidance("guidance", guidance)
    layout = check_parts(lm, vq, tokenizer, layout)
    _check_lm_memory(lm, len(prompts) * num_images * (2 if guidance != 1.0 else 1),
                     f"generating {len(prompts) * num_images} image(s) with the token LM")
    warn_truncated(tokenizer, prompts, lm.config.text_len, add_special_tokens=False)
    text = encode_captions(tokenizer, prompts, lm.config.text_len)
    for p, t in zip(prompts, text):
        if not t:
            raise GenvlError(f"prompt {p!r} has no tokens the text tokenizer knows")
    token_gen, seed, mode, compile = _decoding(lm, seed, generator, fast, use_cache)
    rows = [t for t in text for _ in range(num_images)]  # (B) prompt-major
    codes = generate_image_codes(
        lm, layout, rows, guidance=float(guidance), temperature=float(temperature), top_k=top_k, top_p=float(top_p),
        generator=token_gen, decode=mode, compile=compile, progress=progress,
    )  # (B, N)
    h = vq.latent_size
    codes = codes.view(-1, h, h)  # (B, h, w)
    images = vq.decode_codes(codes.to(_vq_device(vq))).float().clamp(-1, 1)  # (B, 3, S, S)
    settings = dict(method="ar", num_images=num_images, guidance=guidance, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, decode=mode + ("+compile" if compile else ""))
    return ARImageOutput(images=images, codes=codes, prompts=[p for p in prompts for _ in range(num_images)],
                         seed=seed, settings=settings)


@torch.no_grad()
def caption(
    lm: nn.Module, vq: nn.Module, tokenizer, layout: TokenLayout | None, images, max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, *,
    seed: int | None = None, generator: torch.Generator | None = None, fast: bool = False, use_cache: bool = True,
    progress: Progress = None,
) -> CaptionOutput:
    """Image -> text: VQ-VAE codes of each image, then the LM writes the caption.

    Args:
        lm, vq, tokenizer, layout: as for :func:`text_to_image`.
        images: (B, 3, H, W) / (3, H, W) in [-1, 1], a PIL image or a list of PIL images; resized
            to the VQ-VAE's size.
        max_new_tokens: most tokens per caption.
        temperature: 0 = greedy (the default; the seed then does not matter).
        top_k, top_p: candidate filters (0 / 1 = off).
        seed, generator: the sampling noise (as for :func:`text_to_image`).
        fast, use_cache: decoding mode (as for :func:`text_to_image`).
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        CaptionOutput(captions, token_ids, codes (B, h, w), seed, settings).
    """
    check_count("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    layout = check_parts(lm, vq, tokenizer, layout)
    S = vq.config.image_size
    pixels = resize(as_pixels(images, size=S), S)  # (B, 3, S, S)
    codes = vq.encode(pixels.to(_vq_device(vq)))  # (B, h, w)
    token_gen, seed, mode, compile = _decoding(lm, seed, generator, fast, use_cache)
    ids = generate_caption_ids(
        lm, layout, codes, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
        top_p=float(top_p), generator=token_gen, decode=mode, compile=compile, progress=progress,
    )
    captions = [decode_caption(tokenizer, layout, row) for row in ids]
    settings = dict(method="ar-caption", max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed)
    return CaptionOutput(captions=captions, token_ids=ids, codes=codes, seed=seed, settings=settings)
