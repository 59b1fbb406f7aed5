"""DALL-E 2 decoder: a pixel-space diffusion UNet conditioned on CLIP image embeddings, and the
super-resolution UNet that follows it.

:class:`Decoder` wraps diffusers' :class:`~diffusers.UNet2DConditionModel` and predicts the noise
epsilon of a noisy image. As in DALL-E 2 (Ramesh et al. 2022, arXiv:2204.06125, sec. 2.1, after
GLIDE), the CLIP image embedding ``z_image`` conditions the UNet twice:

- projected into ``num_image_tokens`` extra context tokens that every cross-attention layer sees;
- added to the timestep embedding (UNet2DConditionModel ``class_embed_type="projection"``: an MLP
  from ``embed_dim`` to the time-embedding width, summed with the timestep embedding).

Both paths reach the UNet as per-channel biases and attention values, the same at every position,
so the UNet has to build an image's layout from the noise and the padding at the borders. A small
decoder does not learn that: its samples take their layout from the starting noise, whatever the
embedding (measured on the demo: variations of two different emoji from one seed share a layout).
Optionally (``coarse_size > 0``) a third path hands the layout over directly: an MLP maps
``z_image`` to a coarse ``(C, coarse_size, coarse_size)`` image (C = the sample's channels),
upsampled bilinearly and concatenated to the UNet's input channels. It is trained with the
diffusion loss and an auxiliary regression onto the average-pooled clean sample
(:meth:`Decoder.coarse_image`), so it is a prediction of the image's low-resolution version from
its embedding. :meth:`Decoder.add_coarse` grows a trained decoder without the path into one with it
that computes exactly the same function (zero weights on the new input channels).

A regression onto one target averages the images an embedding leaves open: the prior's draws for
a prompt that names no style lie between the Noto and the Twemoji version of an emoji, and one
regressed layout is a washed-out blend of both (measured on the demo: the pizza's layout is an
orange blur). With ``coarse_heads = K > 1`` the path is a mixture: it proposes K layouts and scores
them, is fitted winner-takes-all (the closest layout takes the regression, the scores learn which
one that was; multiple-choice learning, Guzman-Rivera et al. 2012, and its relaxed form, Rupprecht
et al. 2017, arXiv:1612.00197), and :meth:`Decoder.coarse_image` hands on the best-scored layout,
so each head can keep one sharp mode (:func:`coarse_loss`).

Both UNets return epsilon, as the samplers and the training losses expect, but inside them the
diffusers UNet predicts ``v = sqrt(a) eps - sqrt(1 - a) x0`` (``parameterization="v"``; Salimans &
Ho 2022, arXiv:2202.00512), converted with ``eps = sqrt(1 - a) x_t + sqrt(a) v`` (``a`` =
alpha_bar_t). At the noisy steps, which decide colours and layout, epsilon is then nearly x_t for
free instead of an identity the network must learn to within ~1e-3: a small decoder learns several
times faster and avoids the colour casts of eps-prediction (Imagen Video, arXiv:2210.02303).
``parameterization="epsilon"`` gives a plain epsilon-predicting UNet.

Optionally (``text_width > 0``) the CLIP text tower's token states, projected to the
cross-attention width, follow the image tokens in the context, with their padding masked out::

    context = [image tokens (num_image_tokens) | text tokens (L)]      mask = [1 ... 1 | text_mask]

Unconditional input (classifier-free guidance): ``image_embeds`` all zeros and ``text_mask`` all
zeros. The image tokens are always unmasked (zeros project to the learned bias), so no attention
row is ever fully masked. Omitting the text (``text_states=None``) is the same as masking all of it.

:class:`SuperRes` wraps diffusers' :class:`~diffusers.UNet2DModel`: the noisy high-resolution image
and the bicubic-upsampled low-resolution image are concatenated on channels (6 in). The low-res
image is noise-augmented in training (Ho et al. 2021, "Cascaded Diffusion Models",
arXiv:2106.15282, sec. 4.1); the augmentation timestep conditions the UNet through its class
embedding (``class_embed_type="timestep"``: the same sinusoidal + MLP embedding as the timestep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from genvl.models.base import ConfigModule, register_component

SCHEDULER_KINDS = ("ddpm", "ddim", "dpm++")


def _make_scheduler(kind: str, num_train_timesteps: int, beta_schedule: str, clip_range: float = 1.0):
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


def _alphas_cumprod(num_train_timesteps: int, beta_schedule: str) -> torch.Tensor:
    """(T,) alpha_bar_t of the schedule, taken from diffusers so that it matches the schedulers."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod.float()


def _to_epsilon(out: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                parameterization: str) -> torch.Tensor:
    """The UNet's output -> epsilon. For ``v``: eps = sqrt(1 - a) x_t + sqrt(a) v, a = alpha_bar_t."""
    if parameterization == "epsilon":
        return out
    T = alphas_cumprod.shape[0]
    idx = timesteps.to(alphas_cumprod.device).round().long().clamp(0, T - 1)  # (B,)
    a = alphas_cumprod.float()[idx].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    eps = (1 - a).sqrt() * noisy.float() + a.sqrt() * out.float()
    return eps.to(out.dtype)


def _check_unet(name: str, image_size: int, channels: list[int], groups: int, parameterization: str) -> None:
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


# -------------------------------------------------------------------------------------------------
# Decoder
# -------------------------------------------------------------------------------------------------


@dataclass
class DecoderConfig:
    """Sizes of the decoder UNet and its noise schedule.

    ``embed_dim`` (and ``text_width`` when text-conditioned) must match the CLIP core it conditions
    on (``clip.config.embed_dim``, ``clip.config.text_width``). Levels = ``len(block_out_channels)``;
    the top (full-resolution) level has plain ResNet blocks, every lower level cross-attention.
    """

    image_size: int = 64
    embed_dim: int = 512  # CLIP embedding width D
    text_width: int = 0  # CLIP text width W; 0 = no text-state conditioning
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 384, 512])
    layers_per_block: int = 2
    attention_head_dim: int = 64  # channels per attention head
    cross_attention_dim: int = 512  # width of the context tokens
    num_image_tokens: int = 4  # z_image is projected into this many extra context tokens
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    norm_num_groups: int = 32  # GroupNorm groups in the ResNet and attention blocks
    parameterization: str = "v"  # what the inner UNet predicts: v | epsilon (forward returns epsilon)
    # Latent decoder: the VQVAEConfig (as a dict) of the frozen VQ-VAE whose latents the UNet
    # denoises, held inside the decoder; None = pixel space.
    vae: dict | None = None
    latent_scale: float = 1.0  # latents = unit code vectors * latent_scale (about unit variance)
    # Coarse layout path: z_image -> MLP -> (C, coarse_size, coarse_size), upsampled and
    # concatenated to the UNet input; 0 = off. coarse_hidden = the MLP's width (two hidden layers).
    coarse_size: int = 0
    coarse_hidden: int = 1024
    # Layouts the coarse path proposes per embedding; > 1: a mixture fitted winner-takes-all whose
    # best-scored layout is used (coarse_loss). 1 = one plain regression.
    coarse_heads: int = 1

    @property
    def latent_size(self) -> int:
        """Side of the UNet's sample: image_size in pixel space, image_size / downsample in latent space."""
        if not self.vae:
            return self.image_size
        return self.image_size // 2 ** (len(self.vae["channels"]) - 1)

    @property
    def sample_channels(self) -> int:
        return int(self.vae["code_dim"]) if self.vae else 3

    @property
    def down_block_types(self) -> list[str]:
        n = len(self.block_out_channels)
        return ["DownBlock2D" if (i == 0 and n > 1) else "CrossAttnDownBlock2D" for i in range(n)]

    @property
    def up_block_types(self) -> list[str]:
        return [("UpBlock2D" if t == "DownBlock2D" else "CrossAttnUpBlock2D") for t in reversed(self.down_block_types)]


DECODER_SIZES: dict[str, DecoderConfig] = {
    # ~0.9M parameters: unit tests and CPU smoke runs, milliseconds per step at 32 px.
    "tiny": DecoderConfig(
        image_size=32, embed_dim=32, block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=32,
        cross_attention_dim=64, norm_num_groups=8,
    ),
    # ~11M parameters at 32 px (the emoji set); the built-in demo narrows it to [32, 64, 128] (4.4M,
    # 57 samples/s forward + backward on a 2-core CPU at batch 32).
    "small": DecoderConfig(
        image_size=32, embed_dim=64, block_out_channels=[64, 128, 192], layers_per_block=1, attention_head_dim=32,
        cross_attention_dim=192, norm_num_groups=16,
    ),
    # ~300M parameters: DALL-E 2-like 64 px decoder (smaller than its 3.5B one) on the base CLIP.
    "base": DecoderConfig(
        image_size=64, embed_dim=512, block_out_channels=[256, 512, 768, 1024], layers_per_block=2,
        attention_head_dim=64, cross_attention_dim=768,
    ),
}


def decoder_config(size: str = "tiny", **overrides) -> DecoderConfig:
    """A named size from :data:`DECODER_SIZES` with field overrides (e.g. the CLIP's dimensions)."""
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; known: {', '.join(DECODER_SIZES)}")
    cfg = replace(DECODER_SIZES[size], **overrides)
    cfg.block_out_channels = [int(c) for c in cfg.block_out_channels]
    for name in ("embed_dim", "layers_per_block", "attention_head_dim", "cross_attention_dim", "num_image_tokens",
                 "num_train_timesteps", "norm_num_groups"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"decoder config: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.text_width < 0:
        raise ValueError(f"decoder config: text_width must be >= 0 (0 = no text), got {cfg.text_width}")
    if cfg.vae:
        from genvl.tokenizers.vqvae import VQVAEConfig, check_config

        vae = VQVAEConfig(**cfg.vae)
        check_config(vae)
        if vae.image_size != cfg.image_size:
            raise ValueError(f"decoder config: image_size {cfg.image_size} differs from its VQ-VAE's ({vae.image_size})")
        if not cfg.latent_scale > 0:
            raise ValueError(f"decoder config: latent_scale must be > 0, got {cfg.latent_scale}")
    _check_unet("decoder", cfg.latent_size, cfg.block_out_channels, cfg.norm_num_groups, cfg.parameterization)
    _check_coarse(cfg)
    bad = [c for c in cfg.block_out_channels if c % cfg.attention_head_dim]
    if bad:
        raise ValueError(
            f"decoder config: block_out_channels {cfg.block_out_channels} must be multiples of "
            f"attention_head_dim {cfg.attention_head_dim}"
        )
    return cfg


def _coarse_mlp(cfg: DecoderConfig) -> nn.Sequential:
    """The coarse layout path: z_image (B, D) -> (B, K * C * coarse_size**2 [+ K scores when K > 1]),
    two hidden SiLU layers (K = ``coarse_heads``)."""
    H, K = cfg.coarse_hidden, cfg.coarse_heads
    return nn.Sequential(
        nn.Linear(cfg.embed_dim, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU(),
        nn.Linear(H, K * cfg.sample_channels * cfg.coarse_size**2 + (K if K > 1 else 0)),
    )


class CoarseLayouts(NamedTuple):
    """What the coarse layout path proposes for a batch of embeddings.

    Attributes:
        layouts: (B, K, C, s, s) the K proposed layouts (K = ``coarse_heads``).
        scores: (B, K) logits of which layout fits, or None when K = 1.
    """

    layouts: torch.Tensor
    scores: torch.Tensor | None

    def picked(self) -> torch.Tensor:
        """(B, C, s, s): the best-scored layout (the only one when K = 1)."""
        if self.scores is None:
            return self.layouts[:, 0]
        return self.layouts[torch.arange(len(self.layouts), device=self.layouts.device), self.scores.argmax(1)]


# Relaxed winner-takes-all: the non-winning layouts keep this share of the regression, so no head
# is starved (Rupprecht et al. 2017); weight of the scores' cross-entropy beside the regression.
WTA_EPSILON = 0.05
SCORE_WEIGHT = 0.1


def coarse_loss(pred: CoarseLayouts, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of the coarse layout path.

    K = 1: the MSE onto ``target``. K > 1: each row's closest layout takes weight
    ``1 - WTA_EPSILON`` of its MSE, the others share ``WTA_EPSILON``, and the scores learn by
    cross-entropy which layout was closest (weight ``SCORE_WEIGHT``).

    Args:
        pred: the path's output for B embeddings.
        target: (B, C, s, s) the clean samples average-pooled to ``coarse_size``.

    Returns:
        (the loss, the MSE of the picked layout: what the UNet and the sampler get; detached).
    """
    layouts, scores = pred.layouts.float(), pred.scores
    err = (layouts - target.float()[:, None]).pow(2).flatten(2).mean(-1)  # (B, K)
    picked = pred.picked().float()
    mse = F.mse_loss(picked, target.float()).detach()
    if scores is None:
        return err[:, 0].mean(), mse
    K = err.shape[1]
    best = err.detach().argmin(1)  # (B,)
    weight = torch.full_like(err, WTA_EPSILON / (K - 1))
    weight[torch.arange(len(best), device=best.device), best] = 1.0 - WTA_EPSILON
    loss = (weight * err).sum(1).mean() + SCORE_WEIGHT * F.cross_entropy(scores.float(), best)
    return loss, mse


def _check_coarse(cfg: DecoderConfig) -> None:
    if not 0 <= cfg.coarse_size <= cfg.latent_size:
        raise ValueError(
            f"decoder config: coarse_size must be in [0, {cfg.latent_size}] (0 = no coarse layout path), got {cfg.coarse_size}"
        )
    if cfg.coarse_size and cfg.coarse_hidden < 1:
        raise ValueError(f"decoder config: coarse_hidden must be >= 1, got {cfg.coarse_hidden}")
    if cfg.coarse_heads < 1:
        raise ValueError(f"decoder config: coarse_heads must be >= 1, got {cfg.coarse_heads}")


@register_component
class Decoder(ConfigModule):
    """Epsilon-predicting diffusion UNet conditioned on a CLIP image embedding (+ text states).

    In pixel space (``vae`` None) the UNet denoises (B, 3, S, S) images. With ``vae`` set it is a
    latent decoder (as Kandinsky 2.2 over MoVQ latents): it denoises the (B, code_dim, s, s) code
    vectors of a frozen VQ-VAE held inside the decoder (``self.vae``, s = S / downsample), and
    :meth:`decode` snaps them to the nearest codes and runs the VQ-VAE's decoder. Callers stay
    space-agnostic through :attr:`sample_shape`, :meth:`encode` (pixels -> x0) and :meth:`decode`.
    """

    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        from diffusers import UNet2DConditionModel

        c = config
        if c.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"decoder parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {c.parameterization!r}")
        K, C = c.num_image_tokens, c.cross_attention_dim
        # z_image -> K context tokens of width C.
        self.image_proj = nn.Linear(c.embed_dim, K * C)
        # Text token states (B, L, W) -> (B, L, C); absent when the decoder ignores text.
        self.text_proj = nn.Linear(c.text_width, C) if c.text_width > 0 else None
        self.coarse = _coarse_mlp(c) if c.coarse_size else None
        self.vae = None
        if c.vae:
            from genvl.tokenizers.vqvae import VQVAE, VQVAEConfig

            self.vae = VQVAE(VQVAEConfig(**c.vae)).eval().requires_grad_(False)  # frozen: never trained here
        self.unet = UNet2DConditionModel(
            sample_size=c.latent_size,
            in_channels=c.sample_channels * (2 if c.coarse_size else 1),  # + the coarse layout channels
            out_channels=c.sample_channels,
            down_block_types=tuple(c.down_block_types),
            up_block_types=tuple(c.up_block_types),
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            # UNet2DConditionModel reads ``attention_head_dim`` as the number of heads (diffusers
            # issue 2011), so it gets heads per level: channels / channels-per-head.
            attention_head_dim=tuple(ch // c.attention_head_dim for ch in c.block_out_channels),
            cross_attention_dim=C,
            norm_num_groups=c.norm_num_groups,
            class_embed_type="projection",  # z_image (B, D) -> MLP -> added to the time embedding
            projection_class_embeddings_input_dim=c.embed_dim,
        )
        # alpha_bar_t for the v -> epsilon conversion; derived from the config, so not saved.
        self.register_buffer("alphas_cumprod", _alphas_cumprod(c.num_train_timesteps, c.beta_schedule), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.image_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.weight.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, s, s) of what the UNet denoises: (3, S, S) pixels or (code_dim, s, s) latents."""
        c = self.config
        return (c.sample_channels, c.latent_size, c.latent_size)

    @property
    def clip_range(self) -> float:
        """Bound of the clean samples' coordinates: 1 for pixels, ``latent_scale`` for unit code vectors."""
        return float(self.config.latent_scale) if self.vae is not None else 1.0

    def train(self, mode: bool = True) -> "Decoder":
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # the frozen VQ-VAE never tracks code usage or restarts codes
        return self

    def coarse_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) CLIP image embeddings -> (B, C, coarse_size, coarse_size): the coarse layout path's
        prediction of the clean sample average-pooled to ``coarse_size`` (needs ``coarse_size > 0``)."""
        return self.coarse_layouts(image_embeds).picked()

    def coarse_layouts(self, image_embeds: torch.Tensor) -> CoarseLayouts:
        """(B, D) CLIP image embeddings -> the coarse layout path's K proposed layouts and their
        scores (:class:`CoarseLayouts`; needs ``coarse_size > 0``)."""
        c = self.config
        if self.coarse is None:
            raise ValueError("this decoder has no coarse layout path (coarse_size 0)")
        z = image_embeds.to(self.dtype) * math.sqrt(c.embed_dim)  # unit RMS coordinates, as in forward
        return self._coarse_from(z)

    def _coarse_from(self, z: torch.Tensor) -> CoarseLayouts:
        c, K = self.config, self.config.coarse_heads
        out = self.coarse(z)  # (B, K * C * s * s [+ K])
        n = K * c.sample_channels * c.coarse_size**2
        layouts = out[:, :n].reshape(-1, K, c.sample_channels, c.coarse_size, c.coarse_size)
        return CoarseLayouts(layouts, out[:, n:] if K > 1 else None)

    def add_coarse(self, size: int, hidden: int = 1024, heads: int = 1) -> "Decoder":
        """A copy of this decoder with a new coarse layout path of side ``size``, computing the same
        function as this one: the UNet's new input channels start with zero weights."""
        if self.coarse is not None:
            raise ValueError(f"this decoder already has a coarse layout path (coarse_size {self.config.coarse_size})")
        cfg = replace(self.config, coarse_size=int(size), coarse_hidden=int(hidden), coarse_heads=int(heads))
        _check_coarse(cfg)
        grown = Decoder(cfg).to(device=self.device, dtype=self.dtype)
        state = self.state_dict()
        w = state["unet.conv_in.weight"]  # (out, C, k, k)
        state["unet.conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)  # (out, 2C, k, k)
        state.update({k: v for k, v in grown.state_dict().items() if k.startswith("coarse.")})
        grown.load_state_dict(state)
        return grown.train(self.training)

    def reset_coarse(self, heads: int | None = None) -> "Decoder":
        """Replace the coarse layout path's MLP by a new, untrained one (in place; returns self),
        with ``heads`` proposed layouts (default: as many as now; see ``coarse_heads``).

        The UNet keeps all its weights, including those of its coarse input channels, so a decoder
        whose UNet never read those channels (one grown by :meth:`add_coarse` whose UNet was not
        trained since) still denoises exactly as before; only :meth:`coarse_image` changes.
        """
        if self.coarse is None:
            raise ValueError("this decoder has no coarse layout path (coarse_size 0)")
        if heads is not None:
            cfg = replace(self.config, coarse_heads=int(heads))
            _check_coarse(cfg)
            self.config = cfg
        self.coarse = _coarse_mlp(self.config).to(device=self.device, dtype=self.dtype).train(self.training)
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [-1, 1] -> (B, *sample_shape) clean samples x0 (float32).

        Pixel space: the images themselves. Latent space: their quantized VQ-VAE code vectors
        times ``latent_scale``.
        """
        S = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"decoder expects images of shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}")
        if self.vae is None:
            return pixels.float()
        codes = self.vae.encode(pixels)  # (B, s, s)
        return self.vae.embed_codes(codes).float() * self.config.latent_scale  # (B, C, s, s)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *sample_shape) denoised samples -> (B, 3, S, S) images clamped to [-1, 1].

        Latent space: each position's vector is snapped to its nearest code (cosine, as the
        quantizer looks codes up) and the VQ-VAE decodes the codes.
        """
        if self.vae is None:
            return x.clamp(-1, 1)
        B, C, h, w = x.shape
        flat = F.normalize(x.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        codes = self.vae.quantizer.lookup(flat.to(self.vae.dtype)).view(B, h, w)
        return self.vae.decode_codes(codes).float()

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        image_embeds: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        raw: bool = False,
        return_coarse: bool = False,
        coarse_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise of ``noisy``.

        Args:
            noisy: (B, *sample_shape) x_t: (B, 3, H, W) pixels or (B, C, h, w) latents.
            timesteps: (B,) long diffusion steps (a scalar is broadcast).
            image_embeds: (B, D) CLIP image embedding (unit vectors; zeros = unconditional).
            text_states: (B, L, W) CLIP text token states, only when ``text_width > 0``; None = no text.
            text_mask: (B, L) 1 on real tokens (all zeros = unconditional); default all ones.
            raw: return what the UNet itself predicts (``config.parameterization``: v or epsilon),
                for a training loss on that target.
            return_coarse: also return the coarse layout path's output (:class:`CoarseLayouts`),
                for its auxiliary loss (:func:`coarse_loss`; one forward, so DDP sees each weight once).
            coarse_only: return only the coarse layout path's output (:class:`CoarseLayouts`),
                without running the UNet (training that path alone; ``noisy`` and ``timesteps``
                are not used).

        Returns:
            (B, 3, H, W) the predicted epsilon (``raw``: v or epsilon); with ``return_coarse`` a
            tuple (that, coarse layouts).
        """
        if coarse_only:
            if self.coarse is None:
                raise ValueError("coarse_only: this decoder has no coarse layout path (coarse_size 0)")
            return self.coarse_layouts(image_embeds)
        c = self.config
        B = noisy.shape[0]
        if tuple(noisy.shape) != (B, *self.sample_shape):
            raise ValueError(f"decoder expects noisy samples of shape {(B, *self.sample_shape)}, got {tuple(noisy.shape)}")
        if image_embeds.shape != (B, c.embed_dim):
            raise ValueError(f"decoder expects image_embeds of shape ({B}, {c.embed_dim}), got {tuple(image_embeds.shape)}")
        dtype = self.dtype
        # CLIP embeddings are unit vectors (coordinates ~ 1/sqrt(D)); scale to unit RMS coordinates.
        z = image_embeds.to(dtype) * math.sqrt(c.embed_dim)  # (B, D)
        tokens = self.image_proj(z).view(B, c.num_image_tokens, c.cross_attention_dim)  # (B, K, C)
        mask = torch.ones(B, c.num_image_tokens, dtype=dtype, device=noisy.device)  # (B, K)
        if text_states is not None:
            if self.text_proj is None:
                raise ValueError("this decoder has text_width 0 and takes no text_states")
            L = text_states.shape[1]
            if text_states.shape != (B, L, c.text_width):
                raise ValueError(
                    f"decoder expects text_states of shape ({B}, L, {c.text_width}), got {tuple(text_states.shape)}"
                )
            if text_mask is None:
                text_mask = torch.ones(B, L, device=noisy.device)
            if text_mask.shape != (B, L):
                raise ValueError(f"decoder expects text_mask of shape ({B}, {L}), got {tuple(text_mask.shape)}")
            text_tokens = self.text_proj(text_states.to(dtype))  # (B, L, W) -> (B, L, C)
            tokens = torch.cat([tokens, text_tokens], dim=1)  # (B, K + L, C)
            mask = torch.cat([mask, text_mask.to(dtype)], dim=1)  # (B, K + L)
        elif text_mask is not None:
            raise ValueError("text_mask given without text_states")
        if not torch.is_tensor(timesteps) or timesteps.ndim == 0:
            timesteps = torch.as_tensor(timesteps, device=noisy.device).long().expand(B)  # (B,)
        sample = noisy.to(dtype)
        coarse = None
        if self.coarse is not None:
            coarse = self._coarse_from(z)
            up = F.interpolate(coarse.picked(), size=sample.shape[-2:], mode="bilinear", align_corners=False)
            sample = torch.cat([sample, up], dim=1)  # (B, 2C, s, s)
        elif return_coarse:
            raise ValueError("this decoder has no coarse layout path (coarse_size 0)")
        out = self.unet(
            sample,
            timesteps,
            encoder_hidden_states=tokens,
            class_labels=z,  # added to the time embedding through the projection MLP
            encoder_attention_mask=mask,
        ).sample  # (B, 3, H, W) v or epsilon
        if not raw:
            out = _to_epsilon(out, noisy, timesteps, self.alphas_cumprod, c.parameterization)  # (B, 3, H, W)
        return (out, coarse) if return_coarse else out

    def make_scheduler(self, kind: str = "ddpm"):
        """A diffusers scheduler for this decoder's noise schedule (epsilon prediction).

        Args:
            kind: "ddpm" | "ddim" | "dpm++" (DPM-Solver++ multistep).
        """
        return _make_scheduler(kind, self.config.num_train_timesteps, self.config.beta_schedule, self.clip_range)


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
    _check_unet("super-resolution", cfg.image_size, cfg.block_out_channels, cfg.norm_num_groups, cfg.parameterization)
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
        self.register_buffer("alphas_cumprod", _alphas_cumprod(c.num_train_timesteps, c.beta_schedule), persistent=False)

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
        raw: bool = False,
    ) -> torch.Tensor:
        """Predict the noise of ``noisy`` given the low-resolution image.

        Args:
            noisy: (B, 3, H, W) x_t of the high-resolution image.
            timesteps: (B,) long diffusion steps (a scalar is broadcast).
            low_res: (B, 3, h, w) the low-resolution image in [-1, 1], already noise-augmented to
                ``aug_level`` (with the same schedule's ``add_noise``; level 0 = clean).
            aug_level: (B,) long augmentation timesteps (a scalar is broadcast).
            raw: return what the UNet itself predicts (v or epsilon), as :class:`Decoder` does.

        Returns:
            (B, 3, H, W) the predicted epsilon (``raw``: v or epsilon).
        """
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
        if raw:
            return out
        return _to_epsilon(out, noisy, timesteps, self.alphas_cumprod, c.parameterization)  # (B, 3, H, W)

    def make_scheduler(self, kind: str = "ddpm"):
        """A diffusers scheduler for this model's noise schedule (epsilon prediction).

        Also the schedule of the low-res noise augmentation (``add_noise`` at ``aug_level``).

        Args:
            kind: "ddpm" | "ddim" | "dpm++" (DPM-Solver++ multistep).
        """
        return _make_scheduler(kind, self.config.num_train_timesteps, self.config.beta_schedule)
