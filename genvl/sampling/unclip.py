"""unCLIP sampling (DALL-E 2, Ramesh et al. 2022, arXiv:2204.06125): explicit loops over injected parts.

Text-to-image is two pipelines composed::

    prompts ─► tokenizer ─► CLIP text tower ─► (z_text, token states)
            ─► sample_prior   (x0-prediction diffusion over normalised z_image, CFG)  ─► ẑ_image (B, D) unit
            ─► sample_decoder (epsilon-prediction pixel diffusion, CFG)             ─► (B, 3, H, W) in [-1, 1]
            ─► sample_superres (optional, epsilon prediction, noise-augmented low-res) ─► (B, 3, H', W')

Every loop is written out (STYLE.md item 4)::

    for t in scheduler.timesteps:
        out = model(torch.cat([x] * 2), t, cat([uncond, cond]))     # one batched forward
        uncond, cond = out.chunk(2)
        out = uncond + g * (cond - uncond)                           # classifier-free guidance
        x = scheduler.step(out, t, x, generator=generator).prev_sample

A guidance scale of exactly 1 takes the unguided path (one forward on the conditional batch).
Randomness comes only from the ``generator`` passed in (or a ``seed``), so the same seed gives the
same images. Schedulers are the models' own (``make_scheduler``: "ddpm", "ddim", "dpm++").

Built on top: :func:`variations` (image -> z_image -> decoder, optionally from the DDIM-inverted
noise of the image, DALL-E 2 sec. 3.1), :func:`interpolate` (slerp between two prompts or images
with shared decoder noise), :func:`mix` (weighted blend of prompts and images in CLIP space).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import GenvlError
from genvl.limits import (
    MAX_FRAMES,
    MAX_IMAGES,
    MAX_PRIOR_CANDIDATES,
    MAX_SAMPLES,
    check_count,
    check_memory,
    unet_bytes,
)
from genvl.models.clip import TextEmbeddings
from genvl.models.prior import unconditional_text
from genvl.tokenizers.text import check_text, encode_texts, warn_truncated

SCHEDULERS = ("ddpm", "ddim", "dpm++")

# progress: None/False = silent, True = a tqdm bar per stage, or a callable(stage, step, total)
# called after every denoising step (the UI drives its own bar with it).
ProgressFn = Callable[[str, int, int], None]
Progress = Union[bool, ProgressFn, None]
GeneratorArg = Union[torch.Generator, list[torch.Generator], None]
# an interpolation / mixing item: a prompt, an image tensor (3, H, W) or (1, 3, H, W) in [-1, 1], or a PIL image
Item = Any


@dataclass
class UnclipOutput:
    """What the unCLIP pipelines return.

    Attributes:
        images: (N, 3, H, W) in [-1, 1]; super-resolved when a super-res stage ran.
        image_embeds: (N, D) unit CLIP image embeddings the decoder was conditioned on.
        low_res: (N, 3, h, w) decoder output before super-resolution, or None when none ran.
        seed: the seed used, or None when the caller passed a generator.
        settings: the sampling settings (for PNG metadata and reproduction).
    """

    images: torch.Tensor
    image_embeds: torch.Tensor
    low_res: torch.Tensor | None = None
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnclipComponents:
    """The injected parts of the unCLIP pipelines.

    ``prior`` is needed for prompts (text-to-image, prompt endpoints of interpolation / mixing),
    ``decoder`` for every image; ``sr`` is optional.
    """

    clip: nn.Module
    tokenizer: Any
    prior: nn.Module | None
    decoder: nn.Module | None
    sr: nn.Module | None = None

    @classmethod
    def from_model_dir(cls, model_dir, device: str | torch.device = "cpu") -> "UnclipComponents":
        """Load clip, tokenizer, decoder, and prior / sr where the directory has them (eval mode).

        Args:
            model_dir: a :class:`~genvl.checkpoint.ModelDir` or a path to one.
            device: where the components go.
        """
        from genvl.checkpoint import ModelDir, open_model_dir

        md = model_dir if isinstance(model_dir, ModelDir) else open_model_dir(model_dir)
        md.require("clip", "decoder", purpose="unCLIP sampling")
        comps = cls(
            clip=md.load("clip", device=device).eval(),
            tokenizer=md.tokenizer(),
            prior=md.load("prior", device=device).eval() if md.has("prior") else None,
            decoder=md.load("decoder", device=device).eval(),
            sr=md.load("sr", device=device).eval() if md.has("sr") else None,
        )
        comps.check()
        return comps

    def to(self, device: str | torch.device) -> "UnclipComponents":
        for m in (self.clip, self.prior, self.decoder, self.sr):
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return _module_device(self.decoder if self.decoder is not None else self.clip)

    def check(self) -> None:
        """Raise a one-line :class:`GenvlError` when the parts do not fit together."""
        D, W = self.clip.config.embed_dim, self.clip.config.text_width
        if self.prior is not None:
            pc = self.prior.config
            if (pc.embed_dim, pc.text_width) != (D, W):
                raise GenvlError(
                    f"size mismatch: the prior expects CLIP embed_dim {pc.embed_dim} / text_width {pc.text_width}, "
                    f"the clip has {D} / {W}"
                )
        if self.decoder is not None:
            dc = self.decoder.config
            if dc.embed_dim != D:
                raise GenvlError(f"size mismatch: the decoder expects CLIP embed_dim {dc.embed_dim}, the clip has {D}")
            tw = getattr(dc, "text_width", 0)
            if tw and tw != W:
                raise GenvlError(f"size mismatch: the decoder expects CLIP text_width {tw}, the clip has {W}")
            if self.sr is not None and self.sr.config.low_res_size != dc.image_size:
                raise GenvlError(
                    f"size mismatch: the super-res stage takes {self.sr.config.low_res_size} px input, "
                    f"the decoder makes {dc.image_size} px"
                )

    def need(self, *names: str, purpose: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise GenvlError(f"{purpose} needs a {' and a '.join(missing)} component; this model has none")


# ------------------------------------------------------------------------------------ validation
def _check_steps(name: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise GenvlError(f"{name} must be a positive integer, got {steps!r}")


def _check_guidance(name: str, guidance: float) -> None:
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise GenvlError(f"{name} must be a number >= 0, got {guidance!r}")


def _check_scheduler(kind: str) -> None:
    if kind not in SCHEDULERS:
        raise GenvlError(f"unknown scheduler {kind!r}; choose one of: {', '.join(SCHEDULERS)}")


def _check_eta(eta: float, scheduler: str) -> None:
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise GenvlError(f"eta must be in [0, 1], got {eta!r}")
    if eta and scheduler != "ddim":
        raise GenvlError(f"eta applies to the ddim scheduler only, not {scheduler!r}")


def _check_coarse_start(coarse_start: float) -> None:
    if isinstance(coarse_start, bool) or not isinstance(coarse_start, (int, float)) or not 0.0 < coarse_start <= 1.0:
        raise GenvlError(f"coarse_start must be in (0, 1] (1 = from pure noise), got {coarse_start!r}")


def decoder_steps(steps: int, coarse_start: float = 1.0) -> int:
    """Denoising steps the decoder runs for ``steps`` and ``coarse_start`` (all of them from pure noise)."""
    return steps if coarse_start >= 1.0 else max(1, round(steps * coarse_start))


def _check_count(name: str, n: int, hi: int | None = None, what: str = "") -> None:
    """A positive integer, at most ``hi`` (a limit of :mod:`genvl.limits`) when given."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise GenvlError(f"{name} must be a positive integer, got {n!r}")
    if hi is not None:
        check_count(name, n, hi, what=what)


def _check_unet_memory(model: nn.Module, rows: int, what: str) -> None:
    """Refuse a batch of ``rows`` UNet samples estimated not to fit (see :func:`genvl.limits.unet_bytes`)."""
    cfg = model.config
    channels = list(getattr(cfg, "block_out_channels", [64]))
    size = int(getattr(cfg, "latent_size", cfg.image_size))
    attention_levels = getattr(cfg, "attention_levels", None)  # super-res: only the lowest levels attend
    first_attn = len(channels) - attention_levels if attention_levels is not None else 1
    dtype_bytes = torch.finfo(_module_dtype(model)).bits // 8
    need = unet_bytes(channels, size, int(getattr(cfg, "layers_per_block", 2)),
                      int(getattr(cfg, "attention_head_dim", 64)), rows, dtype_bytes=dtype_bytes,
                      first_attention_level=first_attn)
    check_memory(need, what, "ask for fewer images at once (--num-images, --frames, a smaller batch)",
                 _module_device(model))


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenvlError("no prompt given: pass at least one text description")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise GenvlError(f"empty prompt {p!r}: give a text description, e.g. \"a red circle\"")
        check_text(p)
    return prompts


def _check_pixels(x: torch.Tensor, name: str = "image") -> torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise GenvlError(f"{name} must have shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if x.numel() and (float(x.min()) < -1.01 or float(x.max()) > 1.01):
        raise GenvlError(f"{name} pixels must be in [-1, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


# -------------------------------------------------------------------------------------- helpers
def _module_device(m: nn.Module) -> torch.device:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


def _module_dtype(m: nn.Module) -> torch.dtype:
    for t in m.parameters():
        return t.dtype
    return torch.float32


def _randn(shape: tuple[int, ...], generator: GeneratorArg, device: torch.device) -> torch.Tensor:
    """Gaussian noise (float32) drawn from ``generator`` (or one generator per sample), on ``device``.

    A CPU generator draws on the CPU and the result is moved, so a seed gives the same noise on
    every device.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, list) and len(generator) != shape[0]:
        raise GenvlError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


def _resolve_generator(seed: int | None, generator: torch.Generator | None) -> tuple[torch.Generator, int | None]:
    """One source of randomness: the caller's generator, or a CPU generator from ``seed`` (random if None)."""
    if generator is not None:
        if seed is not None:
            raise GenvlError("give a seed or a generator, not both")
        return generator, None
    g = torch.Generator()
    if seed is None:
        seed = g.seed() % (2**31)  # a fresh random seed, reported back so the run can be repeated
    g.manual_seed(int(seed))
    return g, int(seed)


def _derive_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def _steps(timesteps: Iterable, stage: str, progress: Progress) -> Iterator:
    """Iterate timesteps, reporting progress (tqdm bar, callback, or nothing)."""
    timesteps = list(timesteps)
    if progress is True:
        from tqdm.auto import tqdm

        yield from tqdm(timesteps, desc=stage, leave=False)
    elif callable(progress):
        n = len(timesteps)
        for i, t in enumerate(timesteps):
            yield t
            progress(stage, i + 1, n)
    else:
        yield from timesteps


def _text_limit(tokenizer, *limits: int) -> int:
    tok_len = getattr(tokenizer, "model_max_length", None)
    if tok_len is not None and tok_len <= 100_000:  # tokenizers saved without a limit report a huge sentinel
        limits = (*limits, tok_len)
    return int(min(limits))


def _make_scheduler(model: nn.Module, kind: str, steps: int, device: torch.device):
    sched = model.make_scheduler(kind)
    trained = sched.config.num_train_timesteps
    if steps > trained:
        raise GenvlError(f"{steps} steps is more than the {trained} noise levels the model was trained on; "
                         f"use at most {trained}")
    sched.set_timesteps(steps, device=device)
    return sched


def _step(sched, out: torch.Tensor, t, x: torch.Tensor, generator: GeneratorArg, eta: float = 0.0) -> torch.Tensor:
    if eta:
        return sched.step(out, t, x, eta=eta, generator=generator).prev_sample
    return sched.step(out, t, x, generator=generator).prev_sample


def _sample_shape(decoder: nn.Module) -> tuple[int, int, int]:
    """(C, s, s) the decoder denoises; modules without ``sample_shape`` work on (3, S, S) pixels."""
    S = decoder.config.image_size
    return tuple(getattr(decoder, "sample_shape", (3, S, S)))


def _decoder_encode(decoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels -> the decoder's clean samples x0 (latents for a latent decoder)."""
    encode = getattr(decoder, "encode", None)
    return encode(pixels) if encode is not None else pixels


def _decoder_decode(decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Denoised samples -> (B, 3, S, S) images in [-1, 1] (the VQ-VAE decoder for a latent decoder)."""
    decode = getattr(decoder, "decode", None)
    return decode(x) if decode is not None else x.clamp(-1, 1)


def _null_text(decoder: nn.Module, batch: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Text conditioning "no caption" for decoders that take token states (None for those that do not)."""
    W = getattr(decoder.config, "text_width", 0)
    if not W:
        return None, None
    return torch.zeros(batch, 1, W, device=device), torch.zeros(batch, 1, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------- text
@torch.no_grad()
def encode_prompts(
    clip: nn.Module, tokenizer, prompts: Sequence[str], device: str | torch.device | None = None,
    max_length: int | None = None,
) -> TextEmbeddings:
    """Tokenize and encode prompts with the CLIP text tower.

    Args:
        clip: the CLIP core.
        tokenizer: its text tokenizer.
        prompts: B non-empty strings.
        device: where the outputs live (default: the CLIP's device).
        max_length: truncation length (default: the tokenizer's / CLIP's limit); a longer prompt is
            cut there, with a warning on the ``genvl.tokenizers.text`` logger.

    Returns:
        TextEmbeddings(embeds (B, D) unit, token_states (B, L, W), attention_mask (B, L)).
    """
    prompts = _check_prompts(prompts)
    if max_length is None:
        max_length = _text_limit(tokenizer, clip.config.max_text_len)
    warn_truncated(tokenizer, prompts, max_length)
    enc = encode_texts(tokenizer, prompts, max_length=max_length)
    clip_device = _module_device(clip)
    text = clip.encode_text(enc["input_ids"].to(clip_device), enc["attention_mask"].to(clip_device))
    device = clip_device if device is None else torch.device(device)
    return TextEmbeddings(
        embeds=text.embeds.float().to(device),  # (B, D)
        token_states=text.token_states.float().to(device),  # (B, L, W)
        attention_mask=text.attention_mask.long().to(device),  # (B, L)
    )


# --------------------------------------------------------------------------------------- prior
def _prior_loop(
    prior: nn.Module, text: TextEmbeddings, steps: int, guidance: float, scheduler: str,
    generator: GeneratorArg, progress: Progress, candidates: int = 1,
) -> torch.Tensor:
    """The prior's denoising loop on already encoded (and repeated) text; returns (B, D) unit vectors.

    With ``candidates`` K > 1, K embeddings are sampled per row and the one with the highest dot
    product with the row's CLIP text embedding is kept (the DALL-E 2 paper samples two).
    """
    if candidates > 1:
        B = text.embeds.shape[0]
        many = _repeat_text(text, candidates)  # (B*K, ...) row-major: K candidates of row 0 first
        z = _prior_loop(prior, many, steps, guidance, scheduler, generator, progress).view(B, candidates, -1)
        score = (z * F.normalize(text.embeds.float(), dim=-1).to(z.device)[:, None]).sum(-1)  # (B, K)
        return z[torch.arange(B, device=z.device), score.argmax(dim=1)]  # (B, D)
    device = _module_device(prior)
    dtype = _module_dtype(prior)
    embeds = text.embeds.to(device, dtype)  # (B, D)
    states = text.token_states.to(device, dtype)  # (B, L, W)
    mask = text.attention_mask.to(device)  # (B, L)
    B, L, W = states.shape
    D = prior.config.embed_dim
    guided = guidance != 1.0
    if guided:
        # Unconditional branch: the prior's own "no caption" convention (the one it was trained on).
        u = unconditional_text(B, L, W, D, device=device, dtype=dtype)
        embeds = torch.cat([u.embeds, embeds])  # (2B, D)
        states = torch.cat([u.token_states, states])  # (2B, L, W)
        mask = torch.cat([u.attention_mask, mask.long()])  # (2B, L)

    sched = _make_scheduler(prior, scheduler, steps, device)
    x = _randn((B, D), generator, device) * sched.init_noise_sigma  # (B, D) x_T in normalised space
    for t in _steps(sched.timesteps, "prior", progress):
        x_in = sched.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in] * 2)  # (2B, D)
            out = prior(x_in.to(dtype), t.repeat(2 * B), embeds, states, mask).float()  # (2B, D) predicted x0
            uncond, cond = out.chunk(2)
            x0 = uncond + guidance * (cond - uncond)  # (B, D)
        else:
            x0 = prior(x_in.to(dtype), t.repeat(B), embeds, states, mask).float()  # (B, D)
        x = _step(sched, x0, t, x, generator)
    return F.normalize(prior.denormalize(x.to(dtype)).float(), dim=-1)  # (B, D) unit CLIP image embeddings


@torch.no_grad()
def sample_prior(
    prior: nn.Module,
    clip: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 4.0,
    scheduler: str = "ddim",
    generator: GeneratorArg = None,
    device: str | torch.device | None = None,
    progress: Progress = None,
    candidates: int = 1,
) -> torch.Tensor:
    """Sample CLIP image embeddings for prompts with the diffusion prior.

    The prior predicts the clean normalised embedding (x0); guidance mixes the conditional and
    unconditional x0 predictions. The result is denormalised and L2-normalised.

    Args:
        prior: a :class:`~genvl.models.prior.DiffusionPrior` (eval mode).
        clip: the CLIP core whose text tower conditions the prior.
        tokenizer: the CLIP's text tokenizer.
        prompts: P non-empty prompts.
        num_images_per_prompt: n embeddings per prompt, prompt-major order.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1 = none, 0 = unconditional).
        scheduler: "ddpm" | "ddim" | "dpm++".
        generator: source of the initial (and, for ddpm, per-step) noise.
        device: where the result goes (default: the prior's device).
        progress: None, True (tqdm) or a callable(stage, step, total).
        candidates: sample this many embeddings per image and keep the one closest to the
            prompt's CLIP text embedding (1 = no selection).

    Returns:
        (P * n, D) unit vectors.
    """
    prompts = _check_prompts(prompts)
    _check_count("num_images_per_prompt", num_images_per_prompt, MAX_SAMPLES, "embeddings per prompt")
    _check_steps("steps", steps)
    _check_guidance("guidance", guidance)
    _check_scheduler(scheduler)
    _check_prior_fits(prior, clip)
    limit = _text_limit(tokenizer, clip.config.max_text_len, prior.config.text_len)
    text = encode_prompts(clip, tokenizer, prompts, device=_module_device(prior), max_length=limit)
    _check_count("candidates", candidates, MAX_PRIOR_CANDIDATES, "candidates per image")
    text = _repeat_text(text, num_images_per_prompt)
    z = _prior_loop(prior, text, steps, float(guidance), scheduler, generator, progress, candidates)
    return z if device is None else z.to(device)


def _check_prior_fits(prior: nn.Module, clip: nn.Module) -> None:
    pc, cc = prior.config, clip.config
    if (pc.embed_dim, pc.text_width) != (cc.embed_dim, cc.text_width):
        raise GenvlError(
            f"size mismatch: the prior expects CLIP embed_dim {pc.embed_dim} / text_width {pc.text_width}, "
            f"the clip has {cc.embed_dim} / {cc.text_width}"
        )


def _repeat_text(text: TextEmbeddings, n: int) -> TextEmbeddings:
    if n == 1:
        return text
    return TextEmbeddings(
        embeds=text.embeds.repeat_interleave(n, dim=0),
        token_states=text.token_states.repeat_interleave(n, dim=0),
        attention_mask=text.attention_mask.repeat_interleave(n, dim=0),
    )


# ------------------------------------------------------------------------------------- decoder
@torch.no_grad()
def sample_decoder(
    decoder: nn.Module,
    image_embeds: torch.Tensor,
    steps: int = 50,
    guidance: float = 3.0,
    scheduler: str = "ddim",
    generator: GeneratorArg = None,
    text_states: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    init_noise: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: Progress = None,
    coarse_start: float = 1.0,
    start_image: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Decode CLIP image embeddings into images (epsilon-prediction pixel diffusion).

    Unconditional branch of the guidance: image embeddings all zeros (and the text mask all
    zeros), as the decoder is trained with dropped conditioning.

    Args:
        decoder: a :class:`~genvl.models.decoder.Decoder` (eval mode).
        image_embeds: (B, D) CLIP image embeddings.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1 = none).
        scheduler: "ddpm" | "ddim" | "dpm++".
        generator: one generator, or a list of B (per-sample noise: equal seeds give equal noise).
        text_states: optional (B, L, W) CLIP token states (decoders with ``text_width`` > 0).
        text_mask: (B, L) 1 on real tokens, with ``text_states``.
        init_noise: optional (B, *decoder.sample_shape) x_T used as is (e.g. from :func:`ddim_invert`);
            (B, 3, H, W) for a pixel decoder, (B, C, h, w) latents for a latent one.
        eta: DDIM stochasticity (ddim only): 0 deterministic, 1 DDPM-like.
        progress: None, True (tqdm) or a callable(stage, step, total).
        coarse_start: below 1, start from the decoder's own coarse layout prediction instead of
            pure noise (decoders with a coarse layout path, ``coarse_size`` > 0): its
            ``coarse_image(z)``, upsampled, is noised to that fraction of the schedule and only the
            last ``round(steps * coarse_start)`` steps run (SDEdit, Meng et al. 2021,
            arXiv:2108.01073). The layout then comes from the embedding, the detail from the
            diffusion. 1 = from pure noise.
        start_image: image-to-image (SDEdit): (B, 3, H, W) in [-1, 1] (resized to the decoder's
            size) noised to ``strength`` of the schedule, then the last ``round(steps * strength)``
            steps run. ``strength`` 1 ignores it (exactly the pure-noise path, same noise), 0
            returns it (through the decoder's VQ-VAE for a latent decoder).
        strength: in [0, 1], with ``start_image``.

    Returns:
        (B, 3, H, W) images in [-1, 1], H = W = ``decoder.config.image_size``.
    """
    _check_steps("steps", steps)
    _check_guidance("guidance", guidance)
    _check_scheduler(scheduler)
    _check_eta(eta, scheduler)
    _check_coarse_start(coarse_start)
    cfg = decoder.config
    if coarse_start < 1.0:
        if getattr(decoder, "coarse", None) is None:
            raise GenvlError("coarse_start < 1 needs a decoder with a coarse layout path (coarse_size > 0); "
                             "this one has none: leave coarse_start at 1")
        if init_noise is not None:
            raise GenvlError("give init_noise or coarse_start < 1, not both: both set where sampling starts")
    if start_image is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise GenvlError(f"strength must be in [0, 1] (1 = from pure noise), got {strength!r}")
        if init_noise is not None or coarse_start < 1.0:
            raise GenvlError("start_image does not go with init_noise or coarse_start < 1: each sets where sampling starts")
        if strength >= 1.0:
            start_image = None  # from pure noise: exactly text-to-image
    if image_embeds.ndim != 2 or image_embeds.shape[1] != cfg.embed_dim:
        raise GenvlError(
            f"size mismatch: the decoder takes image embeddings of shape (B, {cfg.embed_dim}), got {tuple(image_embeds.shape)}"
        )
    if (text_states is None) != (text_mask is None):
        raise GenvlError("text_states and text_mask go together: give both or neither")
    device, dtype = _module_device(decoder), _module_dtype(decoder)
    B = image_embeds.shape[0]
    shape = (B, *_sample_shape(decoder))  # (B, 3, S, S) pixels or (B, C, h, w) latents
    if text_states is None:
        text_states, text_mask = _null_text(decoder, B, device)
    if text_states is not None and (text_states.ndim != 3 or text_states.shape[0] != B or text_mask.shape != text_states.shape[:2]):
        raise GenvlError(
            f"size mismatch: text_states must be (B={B}, L, W) with text_mask (B, L), "
            f"got {tuple(text_states.shape)} and {tuple(text_mask.shape)}"
        )
    guided = guidance != 1.0
    _check_unet_memory(decoder, 2 * B if guided else B, f"decoding {B} image(s) of {cfg.image_size} px")

    embeds = image_embeds.to(device, dtype)  # (B, D)
    states = text_states.to(device, dtype) if text_states is not None else None  # (B, L, W)
    mask = text_mask.to(device).long() if text_mask is not None else None  # (B, L)
    if guided:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2B, D): unconditional = zero embedding
        if states is not None:
            states = torch.cat([torch.zeros_like(states), states])  # (2B, L, W)
            mask = torch.cat([torch.zeros_like(mask), mask])  # (2B, L): no text

    sched = _make_scheduler(decoder, scheduler, steps, device)
    timesteps = sched.timesteps
    if start_image is not None:
        pixels = _check_pixels(start_image.float(), "start_image")
        if pixels.shape[0] != B:
            raise GenvlError(f"start_image has {pixels.shape[0]} image(s) for {B} embedding(s)")
        x0 = _decoder_encode(decoder, _resize(pixels.to(device), cfg.image_size).to(dtype)).float()  # (B, C, s, s)
        if strength <= 0.0:
            return _decoder_decode(decoder, x0.to(dtype))
        first = steps - decoder_steps(steps, strength)
        timesteps = timesteps[first:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)
        x = sched.add_noise(x0, _randn(shape, generator, device), timesteps[:1].repeat(B))  # (B, C, s, s) x_t
    elif init_noise is not None:
        if tuple(init_noise.shape) != shape:
            raise GenvlError(f"size mismatch: init_noise must have shape {shape}, got {tuple(init_noise.shape)}")
        x = init_noise.to(device).float()  # x_T as given
    elif coarse_start < 1.0:
        first = steps - decoder_steps(steps, coarse_start)  # skip the noisiest steps (img2img "strength")
        timesteps = timesteps[first:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)  # multistep solvers count their steps from here
        coarse = decoder.coarse_image(image_embeds.to(device, dtype)).float()  # (B, C, c, c)
        bound = getattr(decoder, "clip_range", 1.0)
        x0 = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False).clamp(-bound, bound)
        x = sched.add_noise(x0, _randn(shape, generator, device), timesteps[:1].repeat(B))  # (B, C, s, s) x_t
    else:
        x = _randn(shape, generator, device) * sched.init_noise_sigma  # (B, C, s, s)
    for t in _steps(timesteps, "decoder", progress):
        x_in = sched.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in] * 2)  # (2B, C, s, s)
            eps = decoder(x_in.to(dtype), t.repeat(2 * B), embeds, states, mask).float()  # (2B, C, s, s)
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)  # (B, C, s, s)
        else:
            eps = decoder(x_in.to(dtype), t.repeat(B), embeds, states, mask).float()  # (B, C, s, s)
        x = _step(sched, eps, t, x, generator, eta)
    return _decoder_decode(decoder, x)  # (B, 3, S, S) in [-1, 1]; a latent decoder runs its VQ-VAE decoder


@torch.no_grad()
def ddim_invert(
    decoder: nn.Module,
    image: torch.Tensor,
    image_embeds: torch.Tensor,
    steps: int = 50,
    text_states: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    refine: int = 0,
    progress: Progress = None,
) -> torch.Tensor:
    """DDIM inversion: the noise x_T that the deterministic DDIM sampler maps back to ``image``.

    Runs the DDIM update (eta = 0) backwards, from x_0 = image up the same timesteps the DDIM
    sampler with ``steps`` steps walks down, with the conditional epsilon (Song et al. 2021,
    arXiv:2010.02502, sec. 4.3; DALL-E 2 sec. 3.1 inverts images this way for variations). At
    each step the epsilon of the target level is evaluated at the current, less noisy sample,
    the usual first-order approximation; the error shrinks with more steps. ``refine`` > 0
    re-evaluates epsilon at the new estimate that many times per step (fixed-point iteration
    toward the exact inverse of the sampler's step; each costs one more forward).

    The sampler's clipping of the predicted x0 (``clip_sample``) is not inverted: images whose
    x0 estimates stay in [-1, 1] come back exactly, others approximately.

    Args:
        decoder: the decoder.
        image: (B, 3, H, W) in [-1, 1] at the decoder's resolution.
        image_embeds: (B, D) its CLIP image embeddings.
        steps: DDIM steps (use the same number to sample back).
        text_states, text_mask: optional text conditioning, as for :func:`sample_decoder`.
        refine: fixed-point refinements per step (0 = plain DDIM inversion).
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        (B, *decoder.sample_shape) x_T (pixels, or latents for a latent decoder).
    """
    _check_steps("inversion_steps", steps)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise GenvlError(f"refine must be an integer >= 0, got {refine!r}")
    image = _check_pixels(image)
    cfg = decoder.config
    B, S = image.shape[0], cfg.image_size
    if tuple(image.shape[2:]) != (S, S):
        raise GenvlError(f"size mismatch: DDIM inversion needs {S} px images (the decoder's size), got {tuple(image.shape[2:])}")
    if tuple(image_embeds.shape) != (B, cfg.embed_dim):
        raise GenvlError(f"size mismatch: image_embeds must have shape {(B, cfg.embed_dim)}, got {tuple(image_embeds.shape)}")
    device, dtype = _module_device(decoder), _module_dtype(decoder)
    if text_states is None:
        text_states, text_mask = _null_text(decoder, B, device)
    embeds = image_embeds.to(device, dtype)
    states = text_states.to(device, dtype) if text_states is not None else None
    mask = text_mask.to(device).long() if text_mask is not None else None

    sched = _make_scheduler(decoder, "ddim", steps, device)
    alphas = sched.alphas_cumprod.to(device)  # (num_train_timesteps,)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps

    def alpha(t: int) -> torch.Tensor:  # as DDIMScheduler.step: below 0 is the final (clean) level
        return alphas[t] if t >= 0 else sched.final_alpha_cumprod.to(device)

    def eps_at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, C, s, s) conditional epsilon
        return decoder(x.to(dtype), t.repeat(B), embeds, states, mask).float()

    x = _decoder_encode(decoder, image.to(device)).float()  # (B, C, s, s) x at the clean level (pixels or latents)
    # The sampler steps t -> t - ratio; walk the same pairs in reverse: (t - ratio) -> t, t ascending.
    for t in _steps(sched.timesteps.flip(0), "inversion", progress):
        a_from, a_to = alpha(int(t) - ratio), alpha(int(t))

        def up(eps: torch.Tensor) -> torch.Tensor:  # one DDIM step up, from x at a_from to a_to
            x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()  # predicted clean image
            return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps

        x_next = up(eps_at(x, t))  # epsilon at the less noisy sample (first order)
        for _ in range(refine):
            x_next = up(eps_at(x_next, t))  # the epsilon the sampler will see at x_t
        x = x_next
    return x


@torch.no_grad()
def sample_superres(
    sr: nn.Module,
    low_res: torch.Tensor,
    steps: int = 25,
    aug_level: int | None = None,
    scheduler: str = "ddim",
    generator: GeneratorArg = None,
    eta: float = 0.0,
    progress: Progress = None,
) -> torch.Tensor:
    """Upsample images with the super-resolution diffusion model (no guidance).

    The low-res input is noise-augmented at ``aug_level`` (a timestep of the SR's noise schedule)
    and the model is told that level, as in training (DALL-E 2 sec. 2, "Decoder"; Imagen's noise
    conditioning augmentation). Default level: ``max_aug_level // 10`` -- a little noise hides
    the artefacts of a sampled low-res image.

    Args:
        sr: a :class:`~genvl.models.decoder.SuperRes` (eval mode).
        low_res: (B, 3, h, w) in [-1, 1], h = w = ``sr.config.low_res_size``.
        steps: denoising steps.
        aug_level: noise augmentation timestep in [0, max_aug_level) (the training range).
        scheduler: "ddpm" | "ddim" | "dpm++".
        generator: one generator or a list of B.
        eta: DDIM stochasticity (ddim only).
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        (B, 3, H, W) in [-1, 1], H = W = ``sr.config.image_size``.
    """
    _check_steps("sr_steps", steps)
    _check_scheduler(scheduler)
    _check_eta(eta, scheduler)
    low_res = _check_pixels(low_res, "low_res")
    cfg = sr.config
    max_aug = int(getattr(cfg, "max_aug_level", 0))
    if aug_level is None:
        aug_level = max_aug // 10
    # training draws levels from [0, max_aug_level); 0 (clean) is always allowed
    if isinstance(aug_level, bool) or not isinstance(aug_level, int) or not (aug_level == 0 or 0 < aug_level < max_aug):
        raise GenvlError(f"aug_level must be an integer in [0, {max_aug}), got {aug_level!r}")
    if tuple(low_res.shape[2:]) != (cfg.low_res_size, cfg.low_res_size):
        raise GenvlError(
            f"size mismatch: the super-res stage takes {cfg.low_res_size} px input, got {tuple(low_res.shape[2:])}"
        )
    device, dtype = _module_device(sr), _module_dtype(sr)
    B, S = low_res.shape[0], cfg.image_size
    _check_unet_memory(sr, B, f"super-resolving {B} image(s) to {S} px")
    low = low_res.to(device).float()
    levels = torch.full((B,), aug_level, dtype=torch.long, device=device)  # (B,)
    if aug_level > 0:
        # the DDPM schedule's add_noise (DPM-Solver's add_noise only knows its sampling timesteps)
        noise = _randn(tuple(low.shape), generator, device)
        low = sr.make_scheduler("ddpm").add_noise(low, noise, levels)  # (B, 3, h, w)

    sched = _make_scheduler(sr, scheduler, steps, device)
    x = _randn((B, 3, S, S), generator, device) * sched.init_noise_sigma  # (B, 3, S, S)
    low = low.to(dtype)
    for t in _steps(sched.timesteps, "super-res", progress):
        x_in = sched.scale_model_input(x, t)
        eps = sr(x_in.to(dtype), t.repeat(B), low, levels).float()  # (B, 3, S, S)
        x = _step(sched, eps, t, x, generator, eta)
    return x.clamp(-1, 1)


# -------------------------------------------------------------------------------- text to image
@torch.no_grad()
def text_to_image(
    components: UnclipComponents,
    prompts: Sequence[str] | str,
    *,
    num_images: int = 1,
    steps: int = 50,
    prior_steps: int = 25,
    guidance: float = 3.0,
    prior_guidance: float = 4.0,
    scheduler: str = "ddim",
    prior_scheduler: str | None = None,
    prior_candidates: int = 1,
    superres: bool = True,
    sr_steps: int = 25,
    sr_aug_level: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: Progress = None,
    coarse_start: float = 1.0,
    image=None,
    strength: float = 1.0,
) -> UnclipOutput:
    """Text -> CLIP image embedding (prior) -> image (decoder) [-> super-res].

    Args:
        components: clip, tokenizer, prior, decoder [, sr].
        prompts: one prompt or a list of P prompts.
        num_images: n images per prompt (output is prompt-major: P * n images).
        steps: decoder denoising steps.
        prior_steps: prior denoising steps.
        guidance: decoder classifier-free guidance scale.
        prior_guidance: prior classifier-free guidance scale.
        scheduler: decoder (and super-res) scheduler: "ddpm" | "ddim" | "dpm++".
        prior_scheduler: the prior's scheduler (default: ``scheduler``).
        prior_candidates: embeddings the prior samples per image; the one closest to the prompt's
            CLIP text embedding is drawn (1 = no selection; cheap, the prior works on vectors).
        superres: run the super-res stage when the components have one.
        sr_steps: super-res denoising steps.
        sr_aug_level: super-res noise augmentation level (default: see :func:`sample_superres`).
        seed: the seed (a random one when neither seed nor generator is given; reported back).
        generator: instead of a seed, a generator used in turn by prior, decoder, super-res.
        device: move the components there first (default: where they are).
        progress: None, True (tqdm) or a callable(stage, step, total).
        coarse_start: below 1, the decoder starts from its coarse layout prediction noised to
            that fraction of the schedule (see :func:`sample_decoder`); 1 = from pure noise.
        image: image-to-image: one image for all prompts or one per prompt (a tensor in [-1, 1] or
            PIL); the decoder starts from it noised to ``strength`` (see :func:`sample_decoder`).
        strength: in [0, 1] with ``image``: 1 = text-to-image (the image is ignored), 0 = the image.

    Returns:
        UnclipOutput(images (P*n, 3, H, W) in [-1, 1], image_embeds (P*n, D), low_res, seed, settings).
    """
    prompts = _check_prompts(prompts)
    prior_scheduler = prior_scheduler or scheduler
    _check_count("num_images", num_images, MAX_IMAGES, "images per prompt")
    _check_count("prior_candidates", prior_candidates, MAX_PRIOR_CANDIDATES, "candidates per image")
    _check_steps("steps", steps)
    _check_steps("prior_steps", prior_steps)
    _check_guidance("guidance", guidance)
    _check_guidance("prior_guidance", prior_guidance)
    _check_scheduler(scheduler)
    _check_scheduler(prior_scheduler)
    _check_coarse_start(coarse_start)
    components.need("prior", "decoder", purpose="text-to-image")
    if superres and components.sr is not None:
        _check_steps("sr_steps", sr_steps)
    components.check()
    if device is not None:
        components.to(device)
    gen, seed = _resolve_generator(seed, generator)
    clip, prior, decoder = components.clip, components.prior, components.decoder

    limit = _text_limit(components.tokenizer, clip.config.max_text_len, prior.config.text_len)
    text = encode_prompts(clip, components.tokenizer, prompts, device=_module_device(prior), max_length=limit)
    text = _repeat_text(text, num_images)  # (P*n, ...) prompt-major
    z = _prior_loop(prior, text, prior_steps, float(prior_guidance), prior_scheduler, gen, progress,
                    prior_candidates)

    states = mask = None
    if getattr(decoder.config, "text_width", 0):
        states, mask = text.token_states, text.attention_mask  # the decoder also reads the caption's tokens
    start = None
    if image is not None:
        start = _as_pixels(image, size=decoder.config.image_size)  # (1 or P, 3, H, W)
        if start.shape[0] not in (1, len(prompts)):
            raise GenvlError(f"image-to-image takes one image or one per prompt; got {start.shape[0]} for "
                             f"{len(prompts)} prompt(s)")
        start = start.repeat_interleave(len(z) // start.shape[0], dim=0)  # (P*n, 3, H, W)
    images = sample_decoder(
        decoder, z, steps=steps, guidance=guidance, scheduler=scheduler, generator=gen,
        text_states=states, text_mask=mask, progress=progress, coarse_start=coarse_start,
        start_image=start, strength=strength,
    )
    low_res = None
    if superres and components.sr is not None:
        low_res = images
        images = sample_superres(
            components.sr, low_res, steps=sr_steps, aug_level=sr_aug_level, scheduler=scheduler,
            generator=gen, progress=progress,
        )
    settings = dict(
        method="unclip", prompts=prompts, num_images=num_images, steps=steps, prior_steps=prior_steps,
        guidance=guidance, prior_guidance=prior_guidance, scheduler=scheduler, prior_scheduler=prior_scheduler,
        prior_candidates=prior_candidates, superres=low_res is not None, seed=seed,
    )
    if coarse_start < 1.0:
        settings["coarse_start"] = coarse_start
    if image is not None:
        settings["strength"] = strength
    if low_res is not None:
        settings.update(sr_steps=sr_steps, sr_aug_level=sr_aug_level)
    return UnclipOutput(images=images, image_embeds=z, low_res=low_res, seed=seed, settings=settings)


# ----------------------------------------------------------------------------------- variations
def _pil_to_pixels(image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to ``size`` when given; transparency is
    composited on white, as the training data loader does (a plain RGB conversion keeps whatever
    colour the transparent pixels hold)."""
    import numpy as np
    from PIL import Image

    from genvl.data.images import _to_rgb

    im = _to_rgb(image)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
    return (arr / 127.5 - 1.0)[None]


def _as_pixels(image, size: int | None = None) -> torch.Tensor:
    """A tensor (B, 3, H, W) / (3, H, W) in [-1, 1], a PIL image or a list of PIL images -> (B, 3, H, W)."""
    if isinstance(image, torch.Tensor):
        return _check_pixels(image.float())
    if isinstance(image, (list, tuple)) and image and all(hasattr(i, "convert") for i in image):
        size = size or image[0].size[0]
        return torch.cat([_pil_to_pixels(i, size) for i in image])
    if hasattr(image, "convert"):
        return _pil_to_pixels(image, size)
    raise GenvlError(f"expected an image tensor in [-1, 1] or a PIL image, got {type(image).__name__}")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


@torch.no_grad()
def variations(
    components: UnclipComponents,
    image,
    num_images: int = 1,
    steps: int = 50,
    guidance: float = 3.0,
    scheduler: str = "ddim",
    generator: torch.Generator | None = None,
    invert: bool = False,
    inversion_steps: int = 50,
    *,
    eta: float = 0.0,
    seed: int | None = None,
    superres: bool = True,
    sr_steps: int = 25,
    device: str | torch.device | None = None,
    progress: Progress = None,
    coarse_start: float = 1.0,
) -> UnclipOutput:
    """Image variations: image -> CLIP image embedding -> decoder (DALL-E 2 sec. 3.1).

    With ``invert=True`` the decoder starts from the DDIM-inverted noise of the input image
    instead of fresh noise: DDIM with eta = 0 and guidance 1 then reconstructs the image, and
    eta > 0 (ddim) or guidance != 1 move away from it -- the paper's variations keep the gist
    (z_image) and, with inversion, also the layout.

    Args:
        components: clip and decoder (prior not needed).
        image: (B, 3, H, W) or (3, H, W) in [-1, 1], a PIL image or a list of PIL images.
        num_images: n variations per input image (output is image-major: B * n).
        steps, guidance, scheduler: the decoder's sampling settings.
        generator: the source of noise (or give ``seed``).
        invert: start from DDIM-inverted noise of the input.
        inversion_steps: DDIM steps of the inversion.
        eta: DDIM stochasticity (ddim only).
        seed: a seed instead of a generator.
        superres, sr_steps: run the super-res stage when the components have one.
        device: move the components there first.
        progress: None, True (tqdm) or a callable(stage, step, total).
        coarse_start: below 1, start from the decoder's coarse layout prediction of the embedding
            (see :func:`sample_decoder`); not with ``invert``.

    Returns:
        UnclipOutput(images (B*n, 3, H, W), image_embeds (B*n, D), low_res, seed, settings).
    """
    _check_count("num_images", num_images, MAX_IMAGES, "images")
    _check_steps("steps", steps)
    _check_guidance("guidance", guidance)
    _check_scheduler(scheduler)
    _check_eta(eta, scheduler)
    if invert:
        _check_steps("inversion_steps", inversion_steps)
    _check_coarse_start(coarse_start)
    if invert and coarse_start < 1.0:
        raise GenvlError("invert and coarse_start < 1 do not go together: both choose where sampling starts")
    components.need("decoder", purpose="image variations")
    components.check()
    if device is not None:
        components.to(device)
    gen, seed = _resolve_generator(seed, generator)
    clip, decoder = components.clip, components.decoder
    S = decoder.config.image_size
    pixels = _as_pixels(image, size=max(S, clip.config.image_size)).to(_module_device(clip))  # (B, 3, H, W)
    z = clip.encode_image(pixels).float()  # (B, D) unit
    z = z.to(_module_device(decoder)).repeat_interleave(num_images, dim=0)  # (B*n, D)

    init_noise = None
    if invert:
        small = _resize(pixels.to(_module_device(decoder)).float(), S)  # (B, 3, S, S)
        noise = ddim_invert(decoder, small, z[::num_images], steps=inversion_steps, progress=progress)
        init_noise = noise.repeat_interleave(num_images, dim=0)  # (B*n, C, s, s)
    images = sample_decoder(
        decoder, z, steps=steps, guidance=guidance, scheduler=scheduler, generator=gen,
        init_noise=init_noise, eta=eta, progress=progress, coarse_start=coarse_start,
    )
    low_res = None
    if superres and components.sr is not None:
        low_res = images
        images = sample_superres(components.sr, low_res, steps=sr_steps, scheduler=scheduler, generator=gen, progress=progress)
    settings = dict(
        method="variations", num_images=num_images, steps=steps, guidance=guidance, scheduler=scheduler,
        invert=invert, inversion_steps=inversion_steps if invert else None, eta=eta, seed=seed,
    )
    if coarse_start < 1.0:
        settings["coarse_start"] = coarse_start
    return UnclipOutput(images=images, image_embeds=z, low_res=low_res, seed=seed, settings=settings)


# --------------------------------------------------------------------- interpolation and mixing
def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical linear interpolation between whole embedding vectors.

    The angle is the one between the full vectors ``a`` and ``b`` along the last dimension (not
    per element): slerp(a, b, t) = sin((1 - t) w) / sin w * a + sin(t w) / sin w * b, with
    cos w = <a, b> / (|a| |b|). Unit inputs give unit outputs on the great circle through them.
    Nearly parallel vectors (sin w < eps) fall back to linear interpolation, the limit of the
    formula. (Opposite vectors have no unique great circle; the fallback gives their lerp.)

    Args:
        a, b: (..., D) with the same shape.
        t: a float, or a tensor broadcastable to ``a.shape[:-1]`` (e.g. (F,) with a, b of (1, D)).

    Returns:
        (..., D): broadcast of ``a``'s batch shape and ``t``'s shape.
    """
    if a.shape != b.shape:
        raise GenvlError(f"slerp needs two embeddings of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)[..., None]  # (..., 1)
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)[..., None]  # (..., 1)
    omega = torch.arccos(cos)  # (..., 1) angle between the whole vectors
    so = torch.sin(omega)
    safe = so.abs() > eps
    so_safe = torch.where(safe, so, torch.ones_like(so))
    wa = torch.where(safe, torch.sin((1 - t) * omega) / so_safe, 1 - t)  # (..., 1)
    wb = torch.where(safe, torch.sin(t * omega) / so_safe, t)
    return wa * a + wb * b


def _is_prompt(item) -> bool:
    return isinstance(item, str)


def embed_items(
    components: UnclipComponents,
    items: Sequence[Item],
    *,
    prior_steps: int = 25,
    prior_guidance: float = 4.0,
    scheduler: str = "ddim",
    seed: int = 0,
    progress: Progress = None,
) -> torch.Tensor:
    """Unit CLIP image embeddings of prompts (through the prior) and images (through CLIP).

    Each prompt is sampled with its own generator seeded with ``seed``, so a prompt maps to the
    same embedding whatever the other items are.

    Returns:
        (len(items), D) unit vectors on the decoder's device.
    """
    if not items:
        raise GenvlError("nothing to embed: give at least one prompt or image")
    clip = components.clip
    device = components.device
    out = []
    for item in items:
        if _is_prompt(item):
            components.need("prior", purpose="a prompt in interpolation or mixing")
            _check_prompts([item])
            prior = components.prior
            limit = _text_limit(components.tokenizer, clip.config.max_text_len, prior.config.text_len)
            text = encode_prompts(clip, components.tokenizer, [item], device=_module_device(prior), max_length=limit)
            g = torch.Generator().manual_seed(int(seed))
            z = _prior_loop(prior, text, prior_steps, float(prior_guidance), scheduler, g, progress)  # (1, D)
        else:
            pixels = _as_pixels(item, size=clip.config.image_size)
            if pixels.shape[0] != 1:
                raise GenvlError(f"each image item must be a single image, got a batch of {pixels.shape[0]}")
            z = clip.encode_image(pixels.to(_module_device(clip))).float()  # (1, D)
        out.append(z.to(device))
    return torch.cat(out)  # (N, D)


def _seed_from(seed: int | None, generator: torch.Generator | None) -> int:
    gen, s = _resolve_generator(seed, generator)
    return s if s is not None else _derive_seed(gen)


@torch.no_grad()
def interpolate(
    components: UnclipComponents,
    a: Item,
    b: Item,
    frames: int = 8,
    *,
    steps: int = 50,
    guidance: float = 3.0,
    prior_steps: int = 25,
    prior_guidance: float = 4.0,
    scheduler: str = "ddim",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    superres: bool = True,
    sr_steps: int = 25,
    device: str | torch.device | None = None,
    progress: Progress = None,
    coarse_start: float = 1.0,
) -> UnclipOutput:
    """Frames along the great circle between two prompts or images in CLIP image space.

    Endpoints: a prompt goes through the prior (with a generator seeded from the run's seed),
    an image (tensor in [-1, 1] or PIL) through CLIP's image tower. Frame i decodes
    slerp(z_a, z_b, i / (frames - 1)). Every frame starts from the same decoder noise (and gets
    the same per-step noise for stochastic schedulers), so only the embedding changes and the
    animation is smooth. ``coarse_start`` < 1 starts each frame from the decoder's coarse layout
    prediction of its embedding (see :func:`sample_decoder`).

    Returns:
        UnclipOutput(images (frames, 3, H, W), image_embeds (frames, D), low_res, seed, settings).
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise GenvlError(f"frames must be an integer >= 2, got {frames!r}")
    check_count("frames", frames, MAX_FRAMES, lo=2, what="frames")
    _check_steps("steps", steps)
    _check_steps("prior_steps", prior_steps)
    _check_guidance("guidance", guidance)
    _check_guidance("prior_guidance", prior_guidance)
    _check_scheduler(scheduler)
    _check_coarse_start(coarse_start)
    components.need("decoder", purpose="interpolation")
    components.check()
    if device is not None:
        components.to(device)
    seed = _seed_from(seed, generator)
    za, zb = embed_items(
        components, [a, b], prior_steps=prior_steps, prior_guidance=prior_guidance, scheduler=scheduler,
        seed=seed, progress=progress,
    )  # (D,), (D,)
    ts = torch.linspace(0, 1, frames, device=za.device)  # (F,)
    z = F.normalize(slerp(za[None], zb[None], ts), dim=-1)  # (F, D)
    # one generator per frame, all seeded alike: the same x_T and the same per-step noise for every frame
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(frames)]
    images = sample_decoder(
        components.decoder, z, steps=steps, guidance=guidance, scheduler=scheduler, generator=gens, progress=progress,
        coarse_start=coarse_start,
    )
    low_res = None
    if superres and components.sr is not None:
        low_res = images
        gens = [torch.Generator().manual_seed(seed + 2) for _ in range(frames)]
        images = sample_superres(components.sr, low_res, steps=sr_steps, scheduler=scheduler, generator=gens, progress=progress)
    settings = dict(
        method="interpolate", a=a if _is_prompt(a) else "<image>", b=b if _is_prompt(b) else "<image>",
        frames=frames, steps=steps, guidance=guidance, prior_steps=prior_steps, prior_guidance=prior_guidance,
        scheduler=scheduler, seed=seed,
    )
    if coarse_start < 1.0:
        settings["coarse_start"] = coarse_start
    return UnclipOutput(images=images, image_embeds=z, low_res=low_res, seed=seed, settings=settings)


@torch.no_grad()
def mix(
    components: UnclipComponents,
    items: Sequence[tuple[Item, float]],
    num_images: int = 1,
    *,
    steps: int = 50,
    guidance: float = 3.0,
    prior_steps: int = 25,
    prior_guidance: float = 4.0,
    scheduler: str = "ddim",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    superres: bool = True,
    sr_steps: int = 25,
    device: str | torch.device | None = None,
    progress: Progress = None,
    coarse_start: float = 1.0,
) -> UnclipOutput:
    """Decode a weighted blend of prompts and images in CLIP image space.

    z = normalize(sum_i w_i z_i) over the unit embeddings z_i of the items (prompts through the
    prior, images through CLIP). Negative weights subtract a concept. ``coarse_start`` as for
    :func:`sample_decoder`.

    Args:
        items: (prompt or image, weight) pairs.
        num_images: images of the one blended embedding.

    Returns:
        UnclipOutput(images (n, 3, H, W), image_embeds (n, D), low_res, seed, settings).
    """
    items = list(items)
    if not items:
        raise GenvlError("nothing to mix: give at least one (prompt or image, weight) pair")
    for it in items:
        if not (isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[1], (int, float)) and math.isfinite(it[1])):
            raise GenvlError(f"mix items are (prompt or image, weight) pairs with a finite weight, got {it!r:.80}")
    _check_count("num_images", num_images, MAX_IMAGES, "images")
    _check_steps("steps", steps)
    _check_steps("prior_steps", prior_steps)
    _check_guidance("guidance", guidance)
    _check_guidance("prior_guidance", prior_guidance)
    _check_scheduler(scheduler)
    _check_coarse_start(coarse_start)
    components.need("decoder", purpose="mixing")
    components.check()
    if device is not None:
        components.to(device)
    gen, seed = _resolve_generator(seed, generator)
    item_seed = seed if seed is not None else _derive_seed(gen)
    zs = embed_items(
        components, [it[0] for it in items], prior_steps=prior_steps, prior_guidance=prior_guidance,
        scheduler=scheduler, seed=item_seed, progress=progress,
    )  # (N, D) unit
    w = torch.tensor([float(it[1]) for it in items], device=zs.device)  # (N,)
    blend = (w[:, None] * zs).sum(0)  # (D,)
    if float(blend.norm()) < 1e-6:
        raise GenvlError("the weighted mix is the zero vector (weights cancel out); change the weights")
    z = F.normalize(blend, dim=-1)[None].repeat(num_images, 1)  # (n, D)
    images = sample_decoder(
        components.decoder, z, steps=steps, guidance=guidance, scheduler=scheduler, generator=gen, progress=progress,
        coarse_start=coarse_start,
    )
    low_res = None
    if superres and components.sr is not None:
        low_res = images
        images = sample_superres(components.sr, low_res, steps=sr_steps, scheduler=scheduler, generator=gen, progress=progress)
    settings = dict(
        method="mix", items=[(it[0] if _is_prompt(it[0]) else "<image>", float(it[1])) for it in items],
        num_images=num_images, steps=steps, guidance=guidance, prior_steps=prior_steps,
        prior_guidance=prior_guidance, scheduler=scheduler, seed=seed,
    )
    if coarse_start < 1.0:
        settings["coarse_start"] = coarse_start
    return UnclipOutput(images=images, image_embeds=z, low_res=low_res, seed=seed, settings=settings)


# ------------------------------------------------------------------------------------- writing
def _frames_to_pil(frames) -> list:
    from genvl.sampling.io import to_pil_images

    if isinstance(frames, UnclipOutput):
        frames = frames.images
    if isinstance(frames, torch.Tensor):
        return to_pil_images(_check_pixels(frames, "frames"))
    frames = list(frames)
    if not frames:
        raise GenvlError("no frames to write")
    return [f.convert("RGB") for f in frames]


def save_gif(frames, path: str | Path, duration_ms: int = 120, loop: int = 0) -> Path:
    """Write frames ((F, 3, H, W) in [-1, 1], a list of PIL images or an UnclipOutput) as an animated GIF.

    Args:
        frames: the frames.
        path: the .gif file.
        duration_ms: display time per frame.
        loop: 0 = forever.
    """
    ims = _frames_to_pil(frames)
    if not isinstance(duration_ms, int) or duration_ms <= 0:
        raise GenvlError(f"duration_ms must be a positive integer, got {duration_ms!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from genvl.sampling.io import temp_beside

    tmp = temp_beside(path)  # whole or not at all, like save_png
    try:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=loop,
                    optimize=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_strip(frames, path: str | Path, pad: int = 2) -> Path:
    """Write frames side by side as one PNG (a filmstrip)."""
    from genvl.sampling.io import make_grid

    ims = _frames_to_pil(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(ims, ncols=len(ims), pad=pad).save(path, format="PNG")
    return path
