"""The noise schedule the decoder and the super-resolution UNet share: diffusers schedulers for
epsilon prediction, alpha_bar_t, and the v -> epsilon conversion of a v-predicting UNet.

One scheduler object adds noise in training (``add_noise``) and removes it at sampling (``step``).
"""

from __future__ import annotations

import torch

SCHEDULER_KINDS = ("ddpm", "ddim", "dpm++")

__all__ = ["SCHEDULER_KINDS", "PARAMETERIZATIONS", "PREDICTION_TARGETS", "build_scheduler", "alphas_cumprod_of",
           "to_epsilon", "check_unet"]


def build_scheduler(kind: str, num_train_timesteps: int, beta_schedule: str, clip_range: float = 1.0):
    """A diffusers scheduler for epsilon prediction; the predicted x0 is clipped to [-clip_range, clip_range]
    (pixels: [-1, 1]; latents of unit code vectors scaled by ``latent_scale``: that scale).

    The same object adds noise in training (``add_noise``) and denoises at sampling (``step``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(**common, clip_sample=True, clip_sample_range=clip_range)
    if kind == "ddim":
        # "trailing" spacing starts few-step sampling at the last training timestep (pure noise).
        return DDIMScheduler(**common, clip_sample=True, clip_sample_range=clip_range, timestep_spacing="trailing")
    if kind == "dpm++":
        # DPM-Solver++ has no clip_sample; thresholding with sample_max_value 1 clamps x0 to [-1, 1]
        # (its dynamic threshold s in [1, max] also divides by s, so wider ranges get no thresholding).
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", thresholding=clip_range == 1.0, sample_max_value=clip_range
        )
    raise ValueError(f"unknown scheduler kind {kind!r}; kinds: {', '.join(SCHEDULER_KINDS)}")


PARAMETERIZATIONS = ("v", "epsilon")
#: What ``forward`` returns: epsilon, or the UNet's own prediction (its ``parameterization``).
PREDICTION_TARGETS = ("epsilon", "unet")


def alphas_cumprod_of(num_train_timesteps: int, beta_schedule: str) -> torch.Tensor:
    """(T,) alpha_bar_t of the schedule, taken from diffusers so that it matches the schedulers."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod.float()


def to_epsilon(out: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                parameterization: str) -> torch.Tensor:
    """The UNet's output -> epsilon. For ``v``: eps = sqrt(1 - a) x_t + sqrt(a) v, a = alpha_bar_t."""
    if parameterization == "epsilon":
        return out
    T = alphas_cumprod.shape[0]
    idx = timesteps.to(alphas_cumprod.device).round().long().clamp(0, T - 1)  # (B,)
    a = alphas_cumprod.float()[idx].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    eps = (1 - a).sqrt() * noisy.float() + a.sqrt() * out.float()
    return eps.to(out.dtype)


def check_unet(name: str, image_size: int, channels: list[int], groups: int, parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"{name} config: parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")
    if image_size < 1:
        raise ValueError(f"{name} config: image_size must be >= 1, got {image_size}")
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"{name} config: block_out_channels must be a non-empty list of positive ints")
    down = 2 ** (len(channels) - 1)
    if image_size % down:
        raise ValueError(f"{name} config: image_size {image_size} is not divisible by {down} ({len(channels)} levels)")
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{name} config: block_out_channels {channels} must be multiples of norm_num_groups {groups}")
