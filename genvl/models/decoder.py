"""DALL-E 2 decoder: a pixel-space diffusion UNet conditioned on CLIP image embeddings.

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

Coarse layout path
------------------
This section is the one description of the path; the training options and the sampler's
``coarse_start`` refer to it.

- What it is. Optionally (``coarse_size > 0``) a third path hands the layout over directly:
  :class:`CoarseLayoutPath`, an MLP, maps ``z_image`` to a coarse ``(C, coarse_size, coarse_size)``
  image (C = the sample's channels), which :meth:`Decoder.forward` upsamples bilinearly and
  concatenates to the UNet's input channels. It is a prediction of the clean sample's
  low-resolution version (average-pooled to ``coarse_size``) from its embedding.
- Mixture. A regression onto one target averages the images an embedding leaves open: the prior's
  draws for a prompt that names no style lie between the Noto and the Twemoji version of an emoji,
  and one regressed layout is a washed-out blend of both (measured on the demo: the pizza's layout
  is an orange blur). With ``coarse_heads = K > 1`` the path proposes K layouts and scores them, is
  fitted winner-takes-all (the closest layout takes the regression, the scores learn which one
  that was; multiple-choice learning, Guzman-Rivera et al. 2012, and its relaxed form, Rupprecht et
  al. 2017, arXiv:1612.00197), and the best-scored layout is the one the UNet and the sampler get.
- Interface. ``decoder.coarse(z)`` (:class:`CoarseLayouts`: all K layouts and their scores) for a
  training loss, :meth:`Decoder.coarse_image` for the picked layout (what ``sample_decoder``'s
  ``coarse_start`` noises and starts from), :func:`coarse_loss` for the loss.
- Training. With the UNet, the path learns from the diffusion loss through the layout channels
  and from :func:`coarse_loss` on ``decoder.coarse(z)``, computed beside the UNet's forward (the
  coarse weights receive both gradients in one backward). Alone, the path is a module of its own:
  the trainer can train ``decoder.coarse`` with the rest of the decoder frozen and not run.
- Growing. :meth:`Decoder.add_coarse` grows a trained decoder without the path into one with it
  that computes exactly the same function (zero weights on the new input channels);
  :meth:`Decoder.reset_coarse` replaces the path by an untrained one and keeps the UNet.

Both UNets return epsilon, as the samplers expect (``forward(..., target="unet")`` returns the
UNet's own prediction, for a training loss on that target), but inside them the diffusers UNet
predicts ``v = sqrt(a) eps - sqrt(1 - a) x0`` (``parameterization="v"``; Salimans & Ho 2022,
arXiv:2202.00512), converted with ``eps = sqrt(1 - a) x_t + sqrt(a) v`` (``a`` =
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

The super-resolution UNet that follows it is :mod:`genvl.models.superres`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from genvl.models.base import ConfigModule, register_component
from genvl.models.diffusion import (  # noqa: F401 - SCHEDULER_KINDS: the decoder's scheduler kinds
    PARAMETERIZATIONS,
    PREDICTION_TARGETS,
    SCHEDULER_KINDS,
    alphas_cumprod_of,
    build_scheduler,
    check_unet,
    to_epsilon,
)



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
    check_unet("decoder", cfg.latent_size, cfg.block_out_channels, cfg.norm_num_groups, cfg.parameterization)
    _check_coarse(cfg)
    bad = [c for c in cfg.block_out_channels if c % cfg.attention_head_dim]
    if bad:
        raise ValueError(
            f"decoder config: block_out_channels {cfg.block_out_channels} must be multiples of "
            f"attention_head_dim {cfg.attention_head_dim}"
        )
    return cfg


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


class CoarseLayoutPath(nn.Sequential):
    """The coarse layout path (see the module docstring): z_image (B, D) -> :class:`CoarseLayouts`.

    An MLP with two hidden SiLU layers of width ``coarse_hidden`` whose last layer gives
    K * C * coarse_size**2 layout values (+ K scores when K = ``coarse_heads`` > 1).
    """

    def __init__(self, cfg: DecoderConfig):
        H, K = cfg.coarse_hidden, cfg.coarse_heads
        super().__init__(
            nn.Linear(cfg.embed_dim, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU(),
            nn.Linear(H, K * cfg.sample_channels * cfg.coarse_size**2 + (K if K > 1 else 0)),
        )
        self.embed_dim, self.heads = cfg.embed_dim, K
        self.layout_shape = (cfg.sample_channels, cfg.coarse_size, cfg.coarse_size)

    def forward(self, image_embeds: torch.Tensor) -> CoarseLayouts:
        """(B, D) CLIP image embeddings (unit vectors; zeros = unconditional) -> K layouts and scores."""
        w = self[0].weight
        z = image_embeds.to(w.dtype) * math.sqrt(self.embed_dim)  # unit RMS coordinates, as in Decoder.forward
        out = super().forward(z)  # (B, K * C * s * s [+ K])
        n = self.heads * math.prod(self.layout_shape)
        layouts = out[:, :n].reshape(-1, self.heads, *self.layout_shape)  # (B, K, C, s, s)
        return CoarseLayouts(layouts, out[:, n:] if self.heads > 1 else None)


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
        self.coarse = CoarseLayoutPath(c) if c.coarse_size else None
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
        self.register_buffer("alphas_cumprod", alphas_cumprod_of(c.num_train_timesteps, c.beta_schedule), persistent=False)

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
        picked layout (module docstring; needs ``coarse_size > 0``)."""
        return self.coarse_layouts(image_embeds).picked()

    def coarse_layouts(self, image_embeds: torch.Tensor) -> CoarseLayouts:
        """(B, D) CLIP image embeddings -> the coarse layout path's K proposed layouts and their
        scores (:class:`CoarseLayouts`; needs ``coarse_size > 0``): ``self.coarse(image_embeds)``."""
        if self.coarse is None:
            raise ValueError("this decoder has no coarse layout path (coarse_size 0)")
        return self.coarse(image_embeds)

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
        self.coarse = CoarseLayoutPath(self.config).to(device=self.device, dtype=self.dtype).train(self.training)
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
        *,
        target: str = "epsilon",
    ) -> torch.Tensor:
        """Predict the noise of ``noisy``.

        A decoder with a coarse layout path (module docstring) computes its picked layout from
        ``image_embeds`` and feeds it to the UNet; the path's own output for a training loss is
        ``self.coarse(image_embeds)``.

        Args:
            noisy: (B, *sample_shape) x_t: (B, 3, H, W) pixels or (B, C, h, w) latents.
            timesteps: (B,) long diffusion steps (a scalar is broadcast).
            image_embeds: (B, D) CLIP image embedding (unit vectors; zeros = unconditional).
            text_states: (B, L, W) CLIP text token states, only when ``text_width > 0``; None = no text.
            text_mask: (B, L) 1 on real tokens (all zeros = unconditional); default all ones.
            target: ``"epsilon"`` (samplers, classifiers) or ``"unet"``: what the UNet itself
                predicts (``config.parameterization``: v or epsilon), for a training loss on that target.

        Returns:
            (B, *sample_shape) the prediction named by ``target``.
        """
        if target not in PREDICTION_TARGETS:
            raise ValueError(f"target must be one of {', '.join(PREDICTION_TARGETS)}, got {target!r}")
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
        if self.coarse is not None:
            layout = self.coarse(image_embeds).picked()  # (B, C, c, c)
            up = F.interpolate(layout, size=sample.shape[-2:], mode="bilinear", align_corners=False)
            sample = torch.cat([sample, up], dim=1)  # (B, 2C, s, s)
        out = self.unet(
            sample,
            timesteps,
            encoder_hidden_states=tokens,
            class_labels=z,  # added to the time embedding through the projection MLP
            encoder_attention_mask=mask,
        ).sample  # (B, 3, H, W) v or epsilon
        if target == "unet":
            return out
        return to_epsilon(out, noisy, timesteps, self.alphas_cumprod, c.parameterization)  # (B, 3, H, W)

    def make_scheduler(self, kind: str = "ddpm"):
        """A diffusers scheduler for this decoder's noise schedule (epsilon prediction).

        Args:
            kind: "ddpm" | "ddim" | "dpm++" (DPM-Solver++ multistep).
        """
        return build_scheduler(kind, self.config.num_train_timesteps, self.config.beta_schedule, self.clip_range)
