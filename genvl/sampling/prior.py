"""Prior sampling (DALL-E 2, Ramesh et al. 2022, arXiv:2204.06125, sec. 2.1): text -> CLIP image embedding.

::

    prompts ─► tokenizer ─► CLIP text tower ─► (z_text, token states)           encode_prompts
            ─► x0-prediction diffusion over the normalised z_image, with CFG     denoise_prior
            ─► denormalise, L2-normalise ─► ẑ_image (B, D) unit                  sample_prior

The loop, written out::

    for t in scheduler.timesteps:
        out = prior(torch.cat([x] * 2), t, cat([uncond, cond]))     # one batched forward
        uncond, cond = out.chunk(2)
        x0 = uncond + g * (cond - uncond)                            # classifier-free guidance
        x = scheduler.step(x0, t, x, generator=generator).prev_sample

The unconditional branch is the prior's own "no caption" convention
(:func:`genvl.models.prior.unconditional_text`), the one it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import GenvlError
from genvl.limits import MAX_PRIOR_CANDIDATES, MAX_SAMPLES
from genvl.models.clip import TextEmbeddings
from genvl.models.prior import unconditional_text
from genvl.sampling.common import (
    GeneratorArg,
    Progress,
    apply_guidance,
    check_count,
    check_diffusion,
    check_prompts,
    make_scheduler,
    module_device,
    module_dtype,
    progress_steps,
    randn,
    scheduler_step,
    text_limit,
)
from genvl.tokenizers.text import encode_texts, warn_truncated


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
    prompts = check_prompts(prompts)
    if max_length is None:
        max_length = text_limit(tokenizer, clip.config.max_text_len)
    warn_truncated(tokenizer, prompts, max_length)
    enc = encode_texts(tokenizer, prompts, max_length=max_length)
    clip_device = module_device(clip)
    text = clip.encode_text(enc["input_ids"].to(clip_device), enc["attention_mask"].to(clip_device))
    device = clip_device if device is None else torch.device(device)
    return TextEmbeddings(
        embeds=text.embeds.float().to(device),  # (B, D)
        token_states=text.token_states.float().to(device),  # (B, L, W)
        attention_mask=text.attention_mask.long().to(device),  # (B, L)
    )


def encode_for_prior(clip: nn.Module, tokenizer, prior: nn.Module, prompts: Sequence[str]) -> TextEmbeddings:
    """:func:`encode_prompts` cut to what both the CLIP and the prior read, on the prior's device."""
    limit = text_limit(tokenizer, clip.config.max_text_len, prior.config.text_len)
    return encode_prompts(clip, tokenizer, prompts, device=module_device(prior), max_length=limit)


def repeat_text(text: TextEmbeddings, n: int) -> TextEmbeddings:
    """Each row of ``text`` ``n`` times in a row (row-major: (B*n, ...))."""
    if n == 1:
        return text
    return TextEmbeddings(
        embeds=text.embeds.repeat_interleave(n, dim=0),
        token_states=text.token_states.repeat_interleave(n, dim=0),
        attention_mask=text.attention_mask.repeat_interleave(n, dim=0),
    )


def check_prior_fits(prior: nn.Module, clip: nn.Module) -> None:
    """A one-line :class:`GenvlError` when the prior was not trained on this CLIP's sizes."""
    pc, cc = prior.config, clip.config
    if (pc.embed_dim, pc.text_width) != (cc.embed_dim, cc.text_width):
        raise GenvlError(
            f"size mismatch: the prior expects CLIP embed_dim {pc.embed_dim} / text_width {pc.text_width}, "
            f"the clip has {cc.embed_dim} / {cc.text_width}"
        )


# --------------------------------------------------------------------------------------- prior
def denoise_prior(
    prior: nn.Module, text: TextEmbeddings, steps: int, guidance: float, scheduler: str,
    generator: GeneratorArg, progress: Progress, candidates: int = 1,
) -> torch.Tensor:
    """The prior's denoising loop on already encoded (and repeated) text; returns (B, D) unit vectors.

    With ``candidates`` K > 1, K embeddings are sampled per row and the one with the highest dot
    product with the row's CLIP text embedding is kept (the DALL-E 2 paper samples two).
    """
    if candidates > 1:
        B = text.embeds.shape[0]
        many = repeat_text(text, candidates)  # (B*K, ...) row-major: K candidates of row 0 first
        z = denoise_prior(prior, many, steps, guidance, scheduler, generator, progress).view(B, candidates, -1)
        score = (z * F.normalize(text.embeds.float(), dim=-1).to(z.device)[:, None]).sum(-1)  # (B, K)
        return z[torch.arange(B, device=z.device), score.argmax(dim=1)]  # (B, D)
    device = module_device(prior)
    dtype = module_dtype(prior)
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

    sched = make_scheduler(prior, scheduler, steps, device)
    x = randn((B, D), generator, device) * sched.init_noise_sigma  # (B, D) x_T in normalised space
    for t in progress_steps(sched.timesteps, "prior", progress):
        x_in = sched.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in] * 2)  # (2B, D)
            out = prior(x_in.to(dtype), t.repeat(2 * B), embeds, states, mask).float()  # (2B, D) predicted x0
            x0 = apply_guidance(*out.chunk(2), guidance)  # (B, D)
        else:
            x0 = prior(x_in.to(dtype), t.repeat(B), embeds, states, mask).float()  # (B, D)
        x = scheduler_step(sched, x0, t, x, generator)
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
    prompts = check_prompts(prompts)
    check_count("num_images_per_prompt", num_images_per_prompt, MAX_SAMPLES, "embeddings per prompt")
    check_diffusion(steps, guidance, scheduler)
    check_prior_fits(prior, clip)
    text = encode_for_prior(clip, tokenizer, prior, prompts)
    check_count("candidates", candidates, MAX_PRIOR_CANDIDATES, "candidates per image")
    text = repeat_text(text, num_images_per_prompt)
    z = denoise_prior(prior, text, steps, float(guidance), scheduler, generator, progress, candidates)
    return z if device is None else z.to(device)
