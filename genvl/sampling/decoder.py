"""Decoder sampling (DALL-E 2 sec. 2.1, "Decoder"): CLIP image embeddings -> pixels [-> super-resolution].

::

    ẑ_image (B, D) ─► sample_decoder  (epsilon-prediction diffusion, CFG)           ─► (B, 3, H, W) in [-1, 1]
                   ─► sample_superres (optional, epsilon prediction, noise-augmented low-res) ─► (B, 3, H', W')
    image, z_image ─► ddim_invert     (the noise the DDIM sampler maps back to the image)

The decoder loop, written out::

    for t in scheduler.timesteps:
        eps = decoder(torch.cat([x] * 2), t, cat([zeros, z]))       # one batched forward
        uncond, cond = eps.chunk(2)
        eps = uncond + g * (cond - uncond)                           # classifier-free guidance
        x = scheduler.step(eps, t, x, generator=generator).prev_sample

A guidance scale of exactly 1 takes the unguided path (one forward on the conditional batch). A
latent decoder (one with ``sample_shape``, ``encode`` and ``decode``) runs the same loop on its
latents and decodes them at the end. These loops serve unCLIP (:mod:`genvl.sampling.unclip`) and
interleaved generation (:mod:`genvl.sampling.interleaved`) alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import GenvlError
from genvl.limits import check_memory, unet_bytes
from genvl.sampling.common import (
    GeneratorArg,
    Progress,
    apply_guidance,
    check_diffusion,
    check_eta,
    check_pixels,
    check_scheduler,
    check_steps,
    make_scheduler,
    module_device,
    module_dtype,
    progress_steps,
    randn,
    resize,
    scheduler_step,
)


def decoder_steps(steps: int, coarse_start: float = 1.0) -> int:
    """Denoising steps the decoder runs for ``steps`` and ``coarse_start`` (all of them from pure noise)."""
    return steps if coarse_start >= 1.0 else max(1, round(steps * coarse_start))


# -------------------------------------------------------------------------------------- helpers
def _check_unet_memory(model: nn.Module, rows: int, what: str) -> None:
    """Refuse a batch of ``rows`` UNet samples estimated not to fit (see :func:`genvl.limits.unet_bytes`)."""
    cfg = model.config
    channels = list(getattr(cfg, "block_out_channels", [64]))
    size = int(getattr(cfg, "latent_size", cfg.image_size))
    attention_levels = getattr(cfg, "attention_levels", None)  # super-res: only the lowest levels attend
    first_attn = len(channels) - attention_levels if attention_levels is not None else 1
    dtype_bytes = torch.finfo(module_dtype(model)).bits // 8
    need = unet_bytes(channels, size, int(getattr(cfg, "layers_per_block", 2)),
                      int(getattr(cfg, "attention_head_dim", 64)), rows, dtype_bytes=dtype_bytes,
                      first_attention_level=first_attn)
    check_memory(need, what, "ask for fewer images at once (--num-images, --frames, a smaller batch)",
                 module_device(model))


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


def _conditions(decoder: nn.Module, image_embeds: torch.Tensor, text_states: torch.Tensor | None,
                text_mask: torch.Tensor | None):
    """The decoder's conditioning on its device and dtype: (embeds (B, D), states (B, L, W) | None, mask | None).

    Decoders that read token states get "no caption" (zero states, zero mask) when none is given.
    """
    device, dtype = module_device(decoder), module_dtype(decoder)
    if text_states is None and getattr(decoder.config, "text_width", 0):
        B, W = image_embeds.shape[0], decoder.config.text_width
        text_states = torch.zeros(B, 1, W, device=device)
        text_mask = torch.zeros(B, 1, dtype=torch.long, device=device)
    embeds = image_embeds.to(device, dtype)
    states = text_states.to(device, dtype) if text_states is not None else None
    mask = text_mask.to(device).long() if text_mask is not None else None
    return embeds, states, mask


def _partial_start(sched, x0: torch.Tensor, steps: int, fraction: float, shape: tuple[int, ...],
                   generator: GeneratorArg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit start: ``x0`` noised to ``fraction`` of the schedule, and the timesteps left to run.

    Returns:
        (x_t (B, C, s, s), the last ``decoder_steps(steps, fraction)`` timesteps).
    """
    first = steps - decoder_steps(steps, fraction)  # skip the noisiest steps (img2img "strength")
    timesteps = sched.timesteps[first:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(first)  # multistep solvers count their steps from here
    x = sched.add_noise(x0, randn(shape, generator, device), timesteps[:1].repeat(shape[0]))  # (B, C, s, s) x_t
    return x, timesteps


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
    check_diffusion(steps, guidance, scheduler, eta=eta, coarse_start=coarse_start)
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
    device, dtype = module_device(decoder), module_dtype(decoder)
    B = image_embeds.shape[0]
    shape = (B, *_sample_shape(decoder))  # (B, 3, S, S) pixels or (B, C, h, w) latents
    if text_states is not None and (text_states.ndim != 3 or text_states.shape[0] != B or text_mask.shape != text_states.shape[:2]):
        raise GenvlError(
            f"size mismatch: text_states must be (B={B}, L, W) with text_mask (B, L), "
            f"got {tuple(text_states.shape)} and {tuple(text_mask.shape)}"
        )
    guided = guidance != 1.0
    _check_unet_memory(decoder, 2 * B if guided else B, f"decoding {B} image(s) of {cfg.image_size} px")

    embeds, states, mask = _conditions(decoder, image_embeds, text_states, text_mask)  # (B, D), (B, L, W), (B, L)
    if guided:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2B, D): unconditional = zero embedding
        if states is not None:
            states = torch.cat([torch.zeros_like(states), states])  # (2B, L, W)
            mask = torch.cat([torch.zeros_like(mask), mask])  # (2B, L): no text

    sched = make_scheduler(decoder, scheduler, steps, device)
    timesteps = sched.timesteps
    if start_image is not None:
        pixels = check_pixels(start_image.float(), "start_image")
        if pixels.shape[0] != B:
            raise GenvlError(f"start_image has {pixels.shape[0]} image(s) for {B} embedding(s)")
        x0 = _decoder_encode(decoder, resize(pixels.to(device), cfg.image_size).to(dtype)).float()  # (B, C, s, s)
        if strength <= 0.0:
            return _decoder_decode(decoder, x0.to(dtype))
        x, timesteps = _partial_start(sched, x0, steps, strength, shape, generator, device)  # (B, C, s, s) x_t
    elif init_noise is not None:
        if tuple(init_noise.shape) != shape:
            raise GenvlError(f"size mismatch: init_noise must have shape {shape}, got {tuple(init_noise.shape)}")
        x = init_noise.to(device).float()  # x_T as given
    elif coarse_start < 1.0:
        coarse = decoder.coarse_image(image_embeds.to(device, dtype)).float()  # (B, C, c, c)
        bound = getattr(decoder, "clip_range", 1.0)
        x0 = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False).clamp(-bound, bound)
        x, timesteps = _partial_start(sched, x0, steps, coarse_start, shape, generator, device)  # (B, C, s, s) x_t
    else:
        x = randn(shape, generator, device) * sched.init_noise_sigma  # (B, C, s, s)
    for t in progress_steps(timesteps, "decoder", progress):
        x_in = sched.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in] * 2)  # (2B, C, s, s)
            eps = decoder(x_in.to(dtype), t.repeat(2 * B), embeds, states, mask).float()  # (2B, C, s, s)
            eps = apply_guidance(*eps.chunk(2), guidance)  # (B, C, s, s)
        else:
            eps = decoder(x_in.to(dtype), t.repeat(B), embeds, states, mask).float()  # (B, C, s, s)
        x = scheduler_step(sched, eps, t, x, generator, eta)
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
    check_steps("inversion_steps", steps)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise GenvlError(f"refine must be an integer >= 0, got {refine!r}")
    image = check_pixels(image)
    cfg = decoder.config
    B, S = image.shape[0], cfg.image_size
    if tuple(image.shape[2:]) != (S, S):
        raise GenvlError(f"size mismatch: DDIM inversion needs {S} px images (the decoder's size), got {tuple(image.shape[2:])}")
    if tuple(image_embeds.shape) != (B, cfg.embed_dim):
        raise GenvlError(f"size mismatch: image_embeds must have shape {(B, cfg.embed_dim)}, got {tuple(image_embeds.shape)}")
    device, dtype = module_device(decoder), module_dtype(decoder)
    embeds, states, mask = _conditions(decoder, image_embeds, text_states, text_mask)

    sched = make_scheduler(decoder, "ddim", steps, device)
    alphas = sched.alphas_cumprod.to(device)  # (num_train_timesteps,)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps

    def alpha(t: int) -> torch.Tensor:  # as DDIMScheduler.step: below 0 is the final (clean) level
        return alphas[t] if t >= 0 else sched.final_alpha_cumprod.to(device)

    def eps_at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, C, s, s) conditional epsilon
        return decoder(x.to(dtype), t.repeat(B), embeds, states, mask).float()

    x = _decoder_encode(decoder, image.to(device)).float()  # (B, C, s, s) x at the clean level (pixels or latents)
    # The sampler steps t -> t - ratio; walk the same pairs in reverse: (t - ratio) -> t, t ascending.
    for t in progress_steps(sched.timesteps.flip(0), "inversion", progress):
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
        sr: a :class:`~genvl.models.superres.SuperRes` (eval mode).
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
    check_steps("sr_steps", steps)
    check_scheduler(scheduler)
    check_eta(eta, scheduler)
    low_res = check_pixels(low_res, "low_res")
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
    device, dtype = module_device(sr), module_dtype(sr)
    B, S = low_res.shape[0], cfg.image_size
    _check_unet_memory(sr, B, f"super-resolving {B} image(s) to {S} px")
    low = low_res.to(device).float()
    levels = torch.full((B,), aug_level, dtype=torch.long, device=device)  # (B,)
    if aug_level > 0:
        # the DDPM schedule's add_noise (DPM-Solver's add_noise only knows its sampling timesteps)
        noise = randn(tuple(low.shape), generator, device)
        low = sr.make_scheduler("ddpm").add_noise(low, noise, levels)  # (B, 3, h, w)

    sched = make_scheduler(sr, scheduler, steps, device)
    x = randn((B, 3, S, S), generator, device) * sched.init_noise_sigma  # (B, 3, S, S)
    low = low.to(dtype)
    for t in progress_steps(sched.timesteps, "super-res", progress):
        x_in = sched.scale_model_input(x, t)
        eps = sr(x_in.to(dtype), t.repeat(B), low, levels).float()  # (B, 3, S, S)
        x = scheduler_step(sched, eps, t, x, generator, eta)
    return x.clamp(-1, 1)
