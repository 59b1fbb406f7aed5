"""Super-resolution after the decoder (DALL-E 2's 64 -> 256 px stage, at genvl's sizes).

:class:`SuperRes` wraps diffusers' :class:`~diffusers.UNet2DModel`: the noisy high-resolution image
and the bicubic-upsampled low-resolution image are concatenated on channels (6 in). The low-res
image is noise-augmented in training (Ho et al. 2021, "Cascaded Diffusion Models",
arXiv:2106.15282, sec. 4.1); the augmentation timestep conditions the UNet through its class
embedding (``class_embed_type="timestep"``: the same sinusoidal + MLP embedding as the timestep).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from genvl.models.base import COMPONENT_CLASSES, ConfigModule, register_component
from genvl.models.diffusion import (
    PARAMETERIZATIONS,
    PREDICTION_TARGETS,
    alphas_cumprod_of,
    build_scheduler,
    check_unet,
    to_epsilon,
)


# -------------------------------------------------------------------------------------------------
# Super-resolution
# -------------------------------------------------------------------------------------------------


@dataclass
class SuperResConfig:
    """Sizes of the super-resolution UNet, its noise schedule and the low-res noise augmentation.

    ``attention_levels``: how many of the lowest-resolution levels have self-attention
    (0 = a pure convolutional UNet, as DALL-E 2's upsamplers).
    """

    image_size: int = 256
    low_res_size: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 256])
    layers_per_block: int = 2
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    max_aug_level: int = 250  # low-res noise augmentation timesteps are drawn from [0, max_aug_level)
    attention_levels: int = 0
    attention_head_dim: int = 64
    norm_num_groups: int = 32
    parameterization: str = "v"  # what the inner UNet predicts: v | epsilon (forward returns epsilon)

    @property
    def down_block_types(self) -> list[str]:
        n = len(self.block_out_channels)
        return ["AttnDownBlock2D" if i >= n - self.attention_levels else "DownBlock2D" for i in range(n)]

    @property
    def up_block_types(self) -> list[str]:
        return [t.replace("Down", "Up") for t in reversed(self.down_block_types)]


SUPERRES_SIZES: dict[str, SuperResConfig] = {
    # ~0.5M parameters: unit tests, 16 -> 32 px.
    "tiny": SuperResConfig(
        image_size=32, low_res_size=16, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        max_aug_level=250,
    ),
    # ~3.5M parameters: the demo's 32 -> 64 px upsampler.
    "small": SuperResConfig(
        image_size=64, low_res_size=32, block_out_channels=[64, 96, 128], layers_per_block=1, norm_num_groups=16,
    ),
    # ~130M parameters: DALL-E 2-like 64 -> 256 px upsampler (convolutional).
    "base": SuperResConfig(),
}


def superres_config(size: str = "tiny", **overrides) -> SuperResConfig:
    """A named size from :data:`SUPERRES_SIZES` with field overrides."""
    if size not in SUPERRES_SIZES:
        raise ValueError(f"unknown super-resolution size {size!r}; known: {', '.join(SUPERRES_SIZES)}")
    cfg = replace(SUPERRES_SIZES[size], **overrides)
    cfg.block_out_channels = [int(c) for c in cfg.block_out_channels]
    for name in ("low_res_size", "layers_per_block", "num_train_timesteps", "attention_head_dim", "norm_num_groups"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"super-resolution config: {name} must be >= 1, got {getattr(cfg, name)}")
    check_unet("super-resolution", cfg.image_size, cfg.block_out_channels, cfg.norm_num_groups, cfg.parameterization)
    if cfg.low_res_size >= cfg.image_size:
        raise ValueError(
            f"super-resolution config: low_res_size {cfg.low_res_size} must be below image_size {cfg.image_size}"
        )
    if not 0 <= cfg.max_aug_level <= cfg.num_train_timesteps:
        raise ValueError(
            f"super-resolution config: max_aug_level must be in [0, {cfg.num_train_timesteps}], got {cfg.max_aug_level}"
        )
    if not 0 <= cfg.attention_levels <= len(cfg.block_out_channels):
        raise ValueError(f"super-resolution config: attention_levels must be in [0, {len(cfg.block_out_channels)}]")
    return cfg


@register_component
class SuperRes(ConfigModule):
    """Epsilon-predicting super-resolution UNet conditioned on a (noise-augmented) low-res image."""

    config_class = SuperResConfig

    def __init__(self, config: SuperResConfig):
        super().__init__(config)
        from diffusers import UNet2DModel

        c = config
        if c.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"super-resolution parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {c.parameterization!r}"
            )
        self.unet = UNet2DModel(
            sample_size=c.image_size,
            in_channels=6,  # noisy high-res (3) + upsampled low-res (3)
            out_channels=3,
            down_block_types=tuple(c.down_block_types),
            up_block_types=tuple(c.up_block_types),
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            attention_head_dim=c.attention_head_dim,
            norm_num_groups=c.norm_num_groups,
            add_attention=c.attention_levels > 0,  # the mid block's self-attention
            class_embed_type="timestep",  # aug_level -> sinusoidal + MLP, added to the time embedding
        )
        self.register_buffer("alphas_cumprod", alphas_cumprod_of(c.num_train_timesteps, c.beta_schedule), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def upsample(self, low_res: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 3, H, W) bicubic, the conditioning image the UNet sees (``size``: (H, W),
        default the model's image size)."""
        S = self.config.image_size
        return F.interpolate(low_res, size=size or (S, S), mode="bicubic", align_corners=False)

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor, aug_level: torch.Tensor,
        *, target: str = "epsilon",
    ) -> torch.Tensor:
        """Predict the noise of ``noisy`` given the low-resolution image.

        Args:
            noisy: (B, 3, H, W) x_t of the high-resolution image.
            timesteps: (B,) long diffusion steps (a scalar is broadcast).
            low_res: (B, 3, h, w) the low-resolution image in [-1, 1], already noise-augmented to
                ``aug_level`` (with the same schedule's ``add_noise``; level 0 = clean).
            aug_level: (B,) long augmentation timesteps (a scalar is broadcast).
            target: ``"epsilon"`` or ``"unet"`` (v or epsilon), as :class:`Decoder` has it.

        Returns:
            (B, 3, H, W) the prediction named by ``target``.
        """
        if target not in PREDICTION_TARGETS:
            raise ValueError(f"target must be one of {', '.join(PREDICTION_TARGETS)}, got {target!r}")
        c = self.config
        B = noisy.shape[0]
        S, s = c.image_size, c.low_res_size
        # A convolutional upsampler (attention_levels 0) also takes crops (H, W) of the full image, with
        # the low-res crop at the same scale (training on crops is ~4x cheaper, as DALL-E 2's upsamplers).
        full = noisy.shape == (B, 3, S, S)
        if noisy.ndim != 4 or noisy.shape[1] != 3 or (not full and c.attention_levels > 0):
            raise ValueError(f"super-resolution expects noisy images of shape ({B}, 3, {S}, {S}), got {tuple(noisy.shape)}")
        H, W = noisy.shape[-2:]
        if low_res.ndim != 4 or low_res.shape[:2] != (B, 3) or low_res.shape[-2] * S != H * s or low_res.shape[-1] * S != W * s:
            raise ValueError(f"super-resolution expects low_res of shape ({B}, 3, {H * s // S}, {W * s // S}) for noisy "
                             f"images of {H}x{W}, got {tuple(low_res.shape)}")
        dtype = self.dtype
        if not torch.is_tensor(timesteps) or timesteps.ndim == 0:
            timesteps = torch.as_tensor(timesteps, device=noisy.device).long().expand(B)  # (B,)
        if not torch.is_tensor(aug_level) or aug_level.ndim == 0:
            aug_level = torch.as_tensor(aug_level, device=noisy.device).long().expand(B)  # (B,)
        cond = self.upsample(low_res.to(dtype), (H, W))  # (B, 3, H, W)
        x = torch.cat([noisy.to(dtype), cond], dim=1)  # (B, 6, H, W)
        out = self.unet(x, timesteps, class_labels=aug_level).sample  # (B, 3, H, W) v or epsilon
        if target == "unet":
            return out
        return to_epsilon(out, noisy, timesteps, self.alphas_cumprod, c.parameterization)  # (B, 3, H, W)

    def make_scheduler(self, kind: str = "ddpm"):
        """A diffusers scheduler for this model's noise schedule (epsilon prediction).

        Also the schedule of the low-res noise augmentation (``add_noise`` at ``aug_level``).

        Args:
            kind: "ddpm" | "ddim" | "dpm++" (DPM-Solver++ multistep).
        """
        return build_scheduler(kind, self.config.num_train_timesteps, self.config.beta_schedule)


# Model directories written before the super-resolution UNet had its own module name it so.
COMPONENT_CLASSES["genvl.models.decoder.SuperRes"] = SuperRes
