"""The steps every sampler shares: argument checks, guidance, schedulers, randomness, pixels.

The method modules (:mod:`genvl.sampling.prior`, :mod:`genvl.sampling.decoder`,
:mod:`genvl.sampling.unclip`, :mod:`genvl.sampling.autoregressive`,
:mod:`genvl.sampling.interleaved`) write their loops out and take everything else from here:

- checks that fail early with a one-line :class:`~genvl.errors.GenvlError` (steps, guidance
  scales, schedulers, counts, prompts, pixel tensors);
- classifier-free guidance, ``uncond + g * (cond - uncond)`` (:func:`apply_guidance`);
- diffusion schedulers set up for sampling (:func:`make_scheduler`, :func:`scheduler_step`);
- randomness: one generator from a seed or the caller's (:func:`resolve_generator`), seeds drawn
  from it (:func:`derive_seed`), device-independent Gaussian noise (:func:`randn`);
- progress reporting over a loop's steps (:func:`progress_steps`);
- input images as (B, 3, H, W) tensors in [-1, 1] (:func:`as_pixels`, :func:`resize`);
- incremental decoding with a token LM: left padding, positions, key / value caches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import GenvlError
from genvl.limits import check_count as check_limit
from genvl.tokenizers.text import check_text

SCHEDULERS = ("ddpm", "ddim", "dpm++")

# progress: None/False = silent, True = a tqdm bar per stage, or a callable(stage, step, total)
# called after every denoising step (the UI drives its own bar with it).
ProgressFn = Callable[[str, int, int], None]
Progress = Union[bool, ProgressFn, None]
GeneratorArg = Union[torch.Generator, list[torch.Generator], None]


# ------------------------------------------------------------------------------------ validation
def check_steps(name: str, steps: int) -> None:
    """A positive integer number of steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise GenvlError(f"{name} must be a positive integer, got {steps!r}")


def check_guidance(name: str, guidance: float) -> None:
    """A finite guidance scale >= 0."""
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise GenvlError(f"{name} must be a number >= 0, got {guidance!r}")


def check_scheduler(kind: str) -> None:
    """One of :data:`SCHEDULERS`."""
    if kind not in SCHEDULERS:
        raise GenvlError(f"unknown scheduler {kind!r}; choose one of: {', '.join(SCHEDULERS)}")


def check_eta(eta: float, scheduler: str) -> None:
    """DDIM's eta: in [0, 1], and non-zero only with the ddim scheduler."""
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise GenvlError(f"eta must be in [0, 1], got {eta!r}")
    if eta and scheduler != "ddim":
        raise GenvlError(f"eta applies to the ddim scheduler only, not {scheduler!r}")


def check_coarse_start(coarse_start: float) -> None:
    """The share of the decoder's schedule that runs from its coarse layout, in (0, 1]."""
    if isinstance(coarse_start, bool) or not isinstance(coarse_start, (int, float)) or not 0.0 < coarse_start <= 1.0:
        raise GenvlError(f"coarse_start must be in (0, 1] (1 = from pure noise), got {coarse_start!r}")


def check_count(name: str, n: int, hi: int | None = None, what: str = "") -> None:
    """A positive integer, at most ``hi`` (a limit of :mod:`genvl.limits`) when given."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise GenvlError(f"{name} must be a positive integer, got {n!r}")
    if hi is not None:
        check_limit(name, n, hi, what=what)


def check_diffusion(steps: int, guidance: float, scheduler: str, *, prior_steps: int | None = None,
                    prior_guidance: float | None = None, prior_scheduler: str | None = None, eta: float = 0.0,
                    coarse_start: float = 1.0) -> None:
    """A call's diffusion settings, checked in one go (the prior's where given)."""
    check_steps("steps", steps)
    if prior_steps is not None:
        check_steps("prior_steps", prior_steps)
    check_guidance("guidance", guidance)
    if prior_guidance is not None:
        check_guidance("prior_guidance", prior_guidance)
    check_scheduler(scheduler)
    if prior_scheduler is not None:
        check_scheduler(prior_scheduler)
    check_eta(eta, scheduler)
    check_coarse_start(coarse_start)


def check_prompts(prompts: Sequence[str] | str) -> list[str]:
    """One prompt or a list of them -> a non-empty list of non-empty strings."""
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


def check_pixels(x: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A (B, 3, H, W) or (3, H, W) tensor in [-1, 1] -> (B, 3, H, W)."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise GenvlError(f"{name} must have shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if x.numel() and (float(x.min()) < -1.01 or float(x.max()) > 1.01):
        raise GenvlError(f"{name} pixels must be in [-1, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


# -------------------------------------------------------------------------------------- modules
def module_device(m: nn.Module) -> torch.device:
    """Where a module's parameters (else buffers) live; CPU for a module without either."""
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(m: nn.Module) -> torch.dtype:
    """A module's parameter dtype (float32 without parameters)."""
    for t in m.parameters():
        return t.dtype
    return torch.float32


def text_limit(tokenizer, *limits: int) -> int:
    """The prompt length to truncate at: the smallest of ``limits`` and the tokenizer's own."""
    tok_len = getattr(tokenizer, "model_max_length", None)
    if tok_len is not None and tok_len <= 100_000:  # tokenizers saved without a limit report a huge sentinel
        limits = (*limits, tok_len)
    return int(min(limits))


# ----------------------------------------------------------------------------------- randomness
def randn(shape: tuple[int, ...], generator: GeneratorArg, device: torch.device) -> torch.Tensor:
    """Gaussian noise (float32) drawn from ``generator`` (or one generator per sample), on ``device``.

    A CPU generator draws on the CPU and the result is moved, so a seed gives the same noise on
    every device.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, list) and len(generator) != shape[0]:
        raise GenvlError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


def resolve_generator(seed: int | None, generator: torch.Generator | None) -> tuple[torch.Generator, int | None]:
    """One source of randomness: the caller's generator, or a CPU generator from ``seed`` (random if None).

    Returns:
        (generator, the seed or None when the caller passed a generator).
    """
    if generator is not None:
        if seed is not None:
            raise GenvlError("give a seed or a generator, not both")
        return generator, None
    g = torch.Generator()
    if seed is None:
        seed = g.seed() % (2**31)  # a fresh random seed, reported back so the run can be repeated
    g.manual_seed(int(seed))
    return g, int(seed)


def derive_seed(generator: torch.Generator) -> int:
    """One draw of ``generator``: a seed for another generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw of ``generator`` (sampling noise is drawn there)."""
    return torch.Generator(device=device).manual_seed(derive_seed(generator))


# ------------------------------------------------------------------------------ guidance, steps
def apply_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)`` (g = 1: the conditional output)."""
    return uncond + guidance * (cond - uncond)


def progress_steps(timesteps: Iterable, stage: str, progress: Progress) -> Iterator:
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


def make_scheduler(model: nn.Module, kind: str, steps: int, device: torch.device):
    """The model's own scheduler of ``kind``, set to ``steps`` sampling steps on ``device``."""
    sched = model.make_scheduler(kind)
    trained = sched.config.num_train_timesteps
    if steps > trained:
        raise GenvlError(f"{steps} steps is more than the {trained} noise levels the model was trained on; "
                         f"use at most {trained}")
    sched.set_timesteps(steps, device=device)
    return sched


def scheduler_step(sched, out: torch.Tensor, t, x: torch.Tensor, generator: GeneratorArg,
                   eta: float = 0.0) -> torch.Tensor:
    """One denoising step: x_t -> x_{t-1} from the model output ``out`` (DDIM's eta when non-zero)."""
    if eta:
        return sched.step(out, t, x, eta=eta, generator=generator).prev_sample
    return sched.step(out, t, x, generator=generator).prev_sample


# --------------------------------------------------------------------------------------- pixels
def pil_to_pixels(image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to ``size`` when given; transparency is
    composited on white, as the training data loader does (a plain RGB conversion keeps whatever
    colour the transparent pixels hold)."""
    import numpy as np
    from PIL import Image

    from genvl.data.images import to_rgb

    im = to_rgb(image)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
    return (arr / 127.5 - 1.0)[None]


def as_pixels(image, size: int | None = None) -> torch.Tensor:
    """A tensor (B, 3, H, W) / (3, H, W) in [-1, 1], a PIL image or a list of PIL images -> (B, 3, H, W)."""
    if isinstance(image, torch.Tensor):
        return check_pixels(image.float())
    if isinstance(image, (list, tuple)) and image and all(hasattr(i, "convert") for i in image):
        size = size or image[0].size[0]
        return torch.cat([pil_to_pixels(i, size) for i in image])
    if hasattr(image, "convert"):
        return pil_to_pixels(image, size)
    raise GenvlError(f"expected an image tensor in [-1, 1] or a PIL image, got {type(image).__name__}")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, size, size) (bicubic, antialiased; unchanged at that size)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


# ------------------------------------------------------------------------------- token decoding
def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (R, P) and mask (R, P), padded on the left."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(R, L) attention mask -> (R, L) positions counted from each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def dynamic_cache(lm):
    """An empty transformers ``DynamicCache`` for the LM's keys and values."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.hf_config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()
