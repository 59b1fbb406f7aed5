"""The diffusion stages' training loss: the MSE of the UNet's own prediction, weighted per timestep."""

from __future__ import annotations

import torch

from genvl.errors import ConfigError

SNR_GAMMA = 5.0  # Min-SNR loss weighting (the paper's recommended gamma); recipes set model.snr_gamma

#: Per-timestep loss weightings, as a weight on the x0 error (see :func:`diffusion_loss`).
LOSS_WEIGHTINGS = ("min-snr", "truncated-snr")


def diffusion_loss(out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   alphas_cumprod: torch.Tensor, parameterization: str, weighting: str = "min-snr",
                   snr_gamma: float = SNR_GAMMA) -> torch.Tensor:
    """MSE of the UNet's own output (v or epsilon) against its target, weighted per timestep.

    Per sample, the epsilon MSE is ``SNR * |x0_pred - x0|^2`` and the v MSE ``(SNR + 1) * |...|^2``
    (``SNR = a / (1 - a)``, ``a`` = alpha_bar_t). Each weighting is a weight ``w(SNR)`` on that x0
    error; the loss is ``mean(mse * w / base)`` with ``base`` the factor of the parameterization.
    Taking the MSE of the raw output, not of an epsilon converted from v, keeps the noisiest steps
    exact: there epsilon is nearly x_t and the model's part of it (``sqrt(a) v``) is below the
    precision of bf16.

    - ``min-snr`` (Hang et al. 2023, arXiv:2303.09556): ``w = min(SNR, snr_gamma)``; ``snr_gamma`` 0
      gives ``w = SNR``, the plain epsilon MSE of DDPM. At the noisy half of the schedule (SNR < 1)
      the x0 error counts only SNR times: at the steps that set an image's layout from its
      conditioning the weight is 0.001 to 0.1.
    - ``truncated-snr`` (Salimans & Ho 2022, arXiv:2202.00512, sec. 4): ``w = max(SNR, 1)``: the x0
      error counts fully at the noisy steps, the epsilon error at the clean ones; with v
      prediction it is the v MSE times ``max(SNR, 1) / (SNR + 1)``, between 1/2 and 1.

    Args:
        out: (B, C, H, W) the UNet's prediction, v or epsilon (``forward(..., target="unet")``).
        x0, noise: (B, C, H, W) the clean sample and the noise that made x_t.
        t: (B,) long timesteps.
        alphas_cumprod: (T,) alpha_bar of the schedule.
        parameterization: "v" or "epsilon", what ``out`` is.
        weighting: one of :data:`LOSS_WEIGHTINGS`.
        snr_gamma: the min-snr cap.
    """
    a = alphas_cumprod.to(t.device)[t].float()  # (B,)
    snr = a / (1 - a)
    if parameterization == "v":
        ab = a.view(-1, *([1] * (x0.ndim - 1)))
        target, base = ab.sqrt() * noise.float() - (1 - ab).sqrt() * x0.float(), snr + 1
    elif parameterization == "epsilon":
        target, base = noise.float(), snr
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    per = (out.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weighting == "min-snr":
        w = snr.clamp(max=snr_gamma) if snr_gamma > 0 else snr
    elif weighting == "truncated-snr":
        w = snr.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; known: {', '.join(LOSS_WEIGHTINGS)}")
    return (per * (w / base)).mean()


def check_weighting(weighting: str, snr_gamma: float) -> tuple[str, float]:
    """``model.loss_weighting`` and ``model.snr_gamma`` of a recipe, checked."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"bad model config: loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
    if float(snr_gamma) < 0:
        raise ConfigError(f"bad model config: snr_gamma must be >= 0 (0 = unweighted), got {snr_gamma}")
    return str(weighting), float(snr_gamma)
