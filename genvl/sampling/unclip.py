"""unCLIP sampling (DALL-E 2, Ramesh et al. 2022, arXiv:2204.06125): the methods built on prior and decoder.

Text-to-image is two pipelines composed::

    prompts ─► tokenizer ─► CLIP text tower ─► (z_text, token states)
            ─► prior sampling   (x0-prediction diffusion over normalised z_image, CFG)  ─► ẑ_image (B, D) unit
            ─► decoder sampling (epsilon-prediction pixel diffusion, CFG)             ─► (B, 3, H, W) in [-1, 1]
            ─► super-resolution (optional, epsilon prediction, noise-augmented low-res) ─► (B, 3, H', W')

The loops live in :mod:`genvl.sampling.prior` (:func:`sample_prior`) and
:mod:`genvl.sampling.decoder` (:func:`sample_decoder`, :func:`sample_superres`,
:func:`ddim_invert`); the steps they share (checks, guidance, schedulers, seeds) in
:mod:`genvl.sampling.common`. Randomness comes only from the ``generator`` passed in (or a
``seed``), so the same seed gives the same images. Schedulers are the models' own
(``make_scheduler``: "ddpm", "ddim", "dpm++").

This module composes them: :func:`text_to_image` (optionally image-to-image), :func:`variations`
(image -> z_image -> decoder, optionally from the DDIM-inverted noise of the image, DALL-E 2
sec. 3.1), :func:`interpolate` (slerp between two prompts or images with shared decoder noise),
:func:`mix` (weighted blend of prompts and images in CLIP space). The names of the loop modules
and of :func:`~genvl.sampling.io.save_gif` / :func:`~genvl.sampling.io.save_strip` are importable
from here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genvl import limits
from genvl.errors import GenvlError
from genvl.limits import MAX_FRAMES, MAX_IMAGES, MAX_PRIOR_CANDIDATES
from genvl.sampling.common import (  # noqa: F401 (SCHEDULERS, ProgressFn, GeneratorArg: importable from here)
    SCHEDULERS,
    GeneratorArg,
    Progress,
    ProgressFn,
    as_pixels,
    check_count,
    check_diffusion,
    check_prompts,
    check_steps,
    derive_seed,
    module_device,
    resize,
    resolve_generator,
)
from genvl.sampling.decoder import (  # noqa: F401
    ddim_invert,
    decoder_steps,
    sample_decoder,
    sample_superres,
)
from genvl.sampling.io import save_gif, save_strip  # noqa: F401
from genvl.sampling.prior import (  # noqa: F401 (encode_prompts, sample_prior: importable from here)
    check_prior_fits,
    denoise_prior,
    encode_for_prior,
    encode_prompts,
    repeat_text,
    sample_prior,
)

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
        return module_device(self.decoder if self.decoder is not None else self.clip)

    def check(self) -> None:
        """Raise a one-line :class:`GenvlError` when the parts do not fit together."""
        D, W = self.clip.config.embed_dim, self.clip.config.text_width
        if self.prior is not None:
            check_prior_fits(self.prior, self.clip)
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


# ------------------------------------------------------------------------------ shared steps
def _ready(components: UnclipComponents, *names: str, purpose: str, device) -> None:
    """Check that the components have ``names`` and fit together; move them to ``device`` when given."""
    components.need(*names, purpose=purpose)
    components.check()
    if device is not None:
        components.to(device)


def _draw(components: UnclipComponents, z: torch.Tensor, *, superres: bool, sr_steps: int,
          sr_generator: GeneratorArg, sr_aug_level: int | None = None, **decoder_args):
    """Decode embeddings ``z`` (B, D), then super-resolve when asked and the components have a stage.

    Returns:
        (images (B, 3, H, W), low_res: the decoder's images when super-resolved, else None).
    """
    images = sample_decoder(components.decoder, z, **decoder_args)
    if not (superres and components.sr is not None):
        return images, None
    high = sample_superres(components.sr, images, steps=sr_steps, aug_level=sr_aug_level,
                           scheduler=decoder_args["scheduler"], generator=sr_generator,
                           progress=decoder_args["progress"])
    return high, images


def _output(images, z, low_res, seed, settings: dict, coarse_start: float) -> UnclipOutput:
    """The output; ``coarse_start`` goes into the settings when it is below 1."""
    if coarse_start < 1.0:
        settings["coarse_start"] = coarse_start
    return UnclipOutput(images=images, image_embeds=z, low_res=low_res, seed=seed, settings=settings)


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
    prompts = check_prompts(prompts)
    prior_scheduler = prior_scheduler or scheduler
    check_count("num_images", num_images, MAX_IMAGES, "images per prompt")
    check_count("prior_candidates", prior_candidates, MAX_PRIOR_CANDIDATES, "candidates per image")
    check_diffusion(steps, guidance, scheduler, prior_steps=prior_steps, prior_guidance=prior_guidance,
                    prior_scheduler=prior_scheduler, coarse_start=coarse_start)
    if superres and components.sr is not None:
        check_steps("sr_steps", sr_steps)
    _ready(components, "prior", "decoder", purpose="text-to-image", device=device)
    gen, seed = resolve_generator(seed, generator)
    clip, prior, decoder = components.clip, components.prior, components.decoder

    text = encode_for_prior(clip, components.tokenizer, prior, prompts)
    text = repeat_text(text, num_images)  # (P*n, ...) prompt-major
    z = denoise_prior(prior, text, prior_steps, float(prior_guidance), prior_scheduler, gen, progress,
                      prior_candidates)

    states = mask = None
    if getattr(decoder.config, "text_width", 0):
        states, mask = text.token_states, text.attention_mask  # the decoder also reads the caption's tokens
    start = None
    if image is not None:
        start = as_pixels(image, size=decoder.config.image_size)  # (1 or P, 3, H, W)
        if start.shape[0] not in (1, len(prompts)):
            raise GenvlError(f"image-to-image takes one image or one per prompt; got {start.shape[0]} for "
                             f"{len(prompts)} prompt(s)")
        start = start.repeat_interleave(len(z) // start.shape[0], dim=0)  # (P*n, 3, H, W)
    images, low_res = _draw(
        components, z, superres=superres, sr_steps=sr_steps, sr_generator=gen, sr_aug_level=sr_aug_level,
        steps=steps, guidance=guidance, scheduler=scheduler, generator=gen, text_states=states, text_mask=mask,
        progress=progress, coarse_start=coarse_start, start_image=start, strength=strength,
    )
    settings = dict(
        method="unclip", prompts=prompts, num_images=num_images, steps=steps, prior_steps=prior_steps,
        guidance=guidance, prior_guidance=prior_guidance, scheduler=scheduler, prior_scheduler=prior_scheduler,
        prior_candidates=prior_candidates, superres=low_res is not None, seed=seed,
    )
    out = _output(images, z, low_res, seed, settings, coarse_start)
    if image is not None:
        settings["strength"] = strength
    if low_res is not None:
        settings.update(sr_steps=sr_steps, sr_aug_level=sr_aug_level)
    return out


# ----------------------------------------------------------------------------------- variations
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
    check_count("num_images", num_images, MAX_IMAGES, "images")
    check_diffusion(steps, guidance, scheduler, eta=eta, coarse_start=coarse_start)
    if invert:
        check_steps("inversion_steps", inversion_steps)
    if invert and coarse_start < 1.0:
        raise GenvlError("invert and coarse_start < 1 do not go together: both choose where sampling starts")
    _ready(components, "decoder", purpose="image variations", device=device)
    gen, seed = resolve_generator(seed, generator)
    clip, decoder = components.clip, components.decoder
    S = decoder.config.image_size
    pixels = as_pixels(image, size=max(S, clip.config.image_size)).to(module_device(clip))  # (B, 3, H, W)
    z = clip.encode_image(pixels).float()  # (B, D) unit
    z = z.to(module_device(decoder)).repeat_interleave(num_images, dim=0)  # (B*n, D)

    init_noise = None
    if invert:
        small = resize(pixels.to(module_device(decoder)).float(), S)  # (B, 3, S, S)
        noise = ddim_invert(decoder, small, z[::num_images], steps=inversion_steps, progress=progress)
        init_noise = noise.repeat_interleave(num_images, dim=0)  # (B*n, C, s, s)
    images, low_res = _draw(
        components, z, superres=superres, sr_steps=sr_steps, sr_generator=gen, steps=steps, guidance=guidance,
        scheduler=scheduler, generator=gen, init_noise=init_noise, eta=eta, progress=progress,
        coarse_start=coarse_start,
    )
    settings = dict(
        method="variations", num_images=num_images, steps=steps, guidance=guidance, scheduler=scheduler,
        invert=invert, inversion_steps=inversion_steps if invert else None, eta=eta, seed=seed,
    )
    return _output(images, z, low_res, seed, settings, coarse_start)


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
            check_prompts([item])
            text = encode_for_prior(clip, components.tokenizer, components.prior, [item])
            g = torch.Generator().manual_seed(int(seed))
            z = denoise_prior(components.prior, text, prior_steps, float(prior_guidance), scheduler, g, progress)  # (1, D)
        else:
            pixels = as_pixels(item, size=clip.config.image_size)
            if pixels.shape[0] != 1:
                raise GenvlError(f"each image item must be a single image, got a batch of {pixels.shape[0]}")
            z = clip.encode_image(pixels.to(module_device(clip))).float()  # (1, D)
        out.append(z.to(device))
    return torch.cat(out)  # (N, D)


def _check_blend(components: UnclipComponents, purpose: str, steps: int, guidance: float, prior_steps: int,
                 prior_guidance: float, scheduler: str, coarse_start: float, device) -> None:
    """The checks and set-up interpolation and mixing share (prior settings for prompt items)."""
    check_diffusion(steps, guidance, scheduler, prior_steps=prior_steps, prior_guidance=prior_guidance,
                    coarse_start=coarse_start)
    _ready(components, "decoder", purpose=purpose, device=device)


def _label(item: Item) -> Item:
    """An item as the settings record it: the prompt, or "<image>"."""
    return item if _is_prompt(item) else "<image>"


@torch.no_grad()
def interpolate(
    components: UnclipComponents, a: Item, b: Item, frames: int = 8, *,
    steps: int = 50, guidance: float = 3.0, prior_steps: int = 25, prior_guidance: float = 4.0, scheduler: str = "ddim",
    seed: int | None = None, generator: torch.Generator | None = None, superres: bool = True, sr_steps: int = 25,
    device: str | torch.device | None = None, progress: Progress = None, coarse_start: float = 1.0,
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
    limits.check_count("frames", frames, MAX_FRAMES, lo=2, what="frames")
    _check_blend(components, "interpolation", steps, guidance, prior_steps, prior_guidance, scheduler, coarse_start,
                 device)
    gen, seed = resolve_generator(seed, generator)
    if seed is None:
        seed = derive_seed(gen)
    za, zb = embed_items(
        components, [a, b], prior_steps=prior_steps, prior_guidance=prior_guidance, scheduler=scheduler,
        seed=seed, progress=progress,
    )  # (D,), (D,)
    ts = torch.linspace(0, 1, frames, device=za.device)  # (F,)
    z = F.normalize(slerp(za[None], zb[None], ts), dim=-1)  # (F, D)
    # one generator per frame, all seeded alike: the same x_T and the same per-step noise for every frame
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(frames)]
    sr_gens = [torch.Generator().manual_seed(seed + 2) for _ in range(frames)]
    images, low_res = _draw(
        components, z, superres=superres, sr_steps=sr_steps, sr_generator=sr_gens, steps=steps, guidance=guidance,
        scheduler=scheduler, generator=gens, progress=progress, coarse_start=coarse_start,
    )
    settings = dict(
        method="interpolate", a=_label(a), b=_label(b), frames=frames, steps=steps, guidance=guidance,
        prior_steps=prior_steps, prior_guidance=prior_guidance, scheduler=scheduler, seed=seed,
    )
    return _output(images, z, low_res, seed, settings, coarse_start)


@torch.no_grad()
def mix(
    components: UnclipComponents, items: Sequence[tuple[Item, float]], num_images: int = 1, *,
    steps: int = 50, guidance: float = 3.0, prior_steps: int = 25, prior_guidance: float = 4.0, scheduler: str = "ddim",
    seed: int | None = None, generator: torch.Generator | None = None, superres: bool = True, sr_steps: int = 25,
    device: str | torch.device | None = None, progress: Progress = None, coarse_start: float = 1.0,
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
    check_count("num_images", num_images, MAX_IMAGES, "images")
    _check_blend(components, "mixing", steps, guidance, prior_steps, prior_guidance, scheduler, coarse_start, device)
    gen, seed = resolve_generator(seed, generator)
    item_seed = seed if seed is not None else derive_seed(gen)
    zs = embed_items(
        components, [it[0] for it in items], prior_steps=prior_steps, prior_guidance=prior_guidance,
        scheduler=scheduler, seed=item_seed, progress=progress,
    )  # (N, D) unit
    w = torch.tensor([float(it[1]) for it in items], device=zs.device)  # (N,)
    blend = (w[:, None] * zs).sum(0)  # (D,)
    if float(blend.norm()) < 1e-6:
        raise GenvlError("the weighted mix is the zero vector (weights cancel out); change the weights")
    z = F.normalize(blend, dim=-1)[None].repeat(num_images, 1)  # (n, D)
    images, low_res = _draw(
        components, z, superres=superres, sr_steps=sr_steps, sr_generator=gen, steps=steps, guidance=guidance,
        scheduler=scheduler, generator=gen, progress=progress, coarse_start=coarse_start,
    )
    settings = dict(
        method="mix", items=[(_label(it[0]), float(it[1])) for it in items], num_images=num_images, steps=steps,
        guidance=guidance, prior_steps=prior_steps, prior_guidance=prior_guidance, scheduler=scheduler, seed=seed,
    )
    return _output(images, z, low_res, seed, settings, coarse_start)
