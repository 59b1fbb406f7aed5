"""VQ-VAE image tokenizer: images <-> grids of discrete codes for the autoregressive token LM.

::

    pixels (B, 3, S, S) ─► Encoder ─► z (B, D, h, w) ─► l2-normalise ─► nearest code (cosine)
        ─► codes (B, h, w) in [0, K) ─► codebook rows (B, D, h, w) ─► Decoder ─► (B, 3, S, S)

``h = w = S / 2^(len(channels) - 1)``; ``K = codebook_size``; ``D = code_dim``.

Encoder and decoder are diffusers' VAE :class:`~diffusers.models.autoencoders.vae.Encoder` /
:class:`~diffusers.models.autoencoders.vae.Decoder` (ResNet levels, one 2x down/up-sampling
between levels, a mid block with optional self-attention). Their ``conv_out`` / ``conv_in`` map
straight to / from the low-dimensional code space (no separate 1x1 quant convs: a 1x1 conv after
a 3x3 conv is again a 3x3 conv).

The quantizer follows LlamaGen (Sun et al. 2024, arXiv:2406.06525, sec. 2.1, after ViT-VQGAN,
arXiv:2110.04627): codes live in a low-dimensional space (``code_dim`` 8) and both the encoder
output and the codebook are l2-normalised, so the nearest code is the one of largest cosine.
This keeps most of a large codebook in use. Two ways to learn the codebook:

- ``quantizer="l2"``: the codebook is a parameter trained by the codebook loss
  ``||sg(z) - e||^2`` (van den Oord et al. 2017, arXiv:1711.00937);
- ``quantizer="ema"``: the codebook is a buffer, an exponential moving average of the encoder
  outputs assigned to each code (ibid., appendix A.1; Razavi et al. 2019); no codebook loss.

Both use the commitment loss ``beta * ||z - sg(e)||^2`` (beta 0.25) and the straight-through
estimator ``z + sg(e - z)``, which hands the decoder's gradient to the encoder unchanged.

Codebook usage is tracked in training: ``usage_counts`` holds per-code counts of the last
``usage_window`` training batches, ``last_used`` the training step at which each code was last
chosen. A code unused for ``dead_code_steps`` steps is dead: at the next training forward it is
re-initialised to an encoder output of the current batch, picked with a generator seeded by
``(seed, step)``, so restarts repeat exactly across runs and on resume. Under
``torch.distributed`` the counts and EMA statistics are summed over processes and the restart
vectors are broadcast from rank 0, so every process keeps the same codebook.

The GAN discriminator of :class:`AdversarialVQVAE` is a training-time helper only: the released
``vqvae`` component is the :class:`VQVAE` alone (no discriminator weights), and it loads strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from genvl.models.base import ConfigModule, register_component

QUANTIZERS = ("l2", "ema")


@dataclass
class VQVAEConfig:
    """Sizes of the VQ-VAE and its quantizer.

    ``channels``: encoder width per level (the decoder mirrors it). Every level but the last halves
    the resolution, so the downsampling factor is ``2 ** (len(channels) - 1)``.
    """

    image_size: int = 32
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1  # ResNet blocks per encoder level (diffusers' decoder has one more)
    norm_num_groups: int = 32
    mid_attention: bool = True  # self-attention in the mid blocks (at the latent resolution)
    code_dim: int = 8  # D: dimension of the (l2-normalised) code space
    codebook_size: int = 1024  # K
    quantizer: str = "l2"  # l2 (learned codebook) | ema (moving-average codebook)
    beta: float = 0.25  # commitment loss weight
    ema_decay: float = 0.99  # quantizer "ema" only
    dead_code_steps: int = 100  # a code unused for this many training forwards (micro-batches) restarts; 0 = never
    usage_window: int = 32  # training forwards (micro-batches) the usage counts cover
    seed: int = 0  # seed of the dead-code restarts

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample


VQVAE_SIZES: dict[str, VQVAEConfig] = {
    # ~0.24M parameters: unit tests; 16 px -> 4x4 codes of 64.
    "tiny": VQVAEConfig(
        image_size=16, channels=[16, 32, 32], norm_num_groups=8, mid_attention=False, codebook_size=64,
        dead_code_steps=20, usage_window=8,
    ),
    # ~2.7M parameters: the demo tokenizer; 32 px emoji -> 8x8 = 64 codes of 512 (~75 images/s training on
    # one CPU core).
    "small": VQVAEConfig(
        image_size=32, channels=[32, 64, 128], norm_num_groups=16, codebook_size=512, dead_code_steps=50,
    ),
    # ~15M parameters: 64 px -> 16x16 codes of 4096 (GPU).
    "base": VQVAEConfig(image_size=64, channels=[128, 128, 256], layers_per_block=2, codebook_size=4096),
}


def vqvae_config(size: str = "tiny", **overrides) -> VQVAEConfig:
    """A named size from :data:`VQVAE_SIZES` with field overrides, checked."""
    if size not in VQVAE_SIZES:
        raise ValueError(f"unknown vqvae size {size!r}; known: {', '.join(VQVAE_SIZES)}")
    cfg = replace(VQVAE_SIZES[size], **overrides)
    cfg.channels = [int(c) for c in cfg.channels]
    check_config(cfg)
    return cfg


def check_config(cfg: VQVAEConfig) -> None:
    """Raise ValueError naming the first field that does not fit."""
    for name in ("image_size", "layers_per_block", "norm_num_groups", "code_dim", "usage_window"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"vqvae config: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.codebook_size < 2:
        raise ValueError(f"vqvae config: codebook_size must be >= 2, got {cfg.codebook_size}")
    if not cfg.channels or any(c < 1 for c in cfg.channels):
        raise ValueError("vqvae config: channels must be a non-empty list of positive ints")
    if any(c % cfg.norm_num_groups for c in cfg.channels):
        raise ValueError(
            f"vqvae config: channels {cfg.channels} must be multiples of norm_num_groups {cfg.norm_num_groups}"
        )
    if cfg.image_size % cfg.downsample:
        raise ValueError(
            f"vqvae config: image_size {cfg.image_size} is not divisible by the downsampling factor {cfg.downsample} "
            f"({len(cfg.channels)} levels)"
        )
    if cfg.quantizer not in QUANTIZERS:
        raise ValueError(f"vqvae config: quantizer must be one of {', '.join(QUANTIZERS)}, got {cfg.quantizer!r}")
    if cfg.beta < 0:
        raise ValueError(f"vqvae config: beta must be >= 0, got {cfg.beta}")
    if not 0 < cfg.ema_decay < 1:
        raise ValueError(f"vqvae config: ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.dead_code_steps < 0:
        raise ValueError(f"vqvae config: dead_code_steps must be >= 0 (0 = never restart), got {cfg.dead_code_steps}")


@dataclass
class VQOutput:
    """What :meth:`VQVAE.forward` returns.

    Attributes:
        recon: (B, 3, S, S) reconstruction, not clamped (the loss sees the raw output).
        codes: (B, h, w) long code indices in [0, K).
        commit_loss: scalar ``beta * ||z - sg(e)||^2`` (gradient to the encoder).
        codebook_loss: scalar ``||sg(z) - e||^2`` (gradient to the codebook); 0 for the EMA quantizer.
        perplexity: scalar exp(entropy) of this batch's code histogram (K = all codes equally used).
        usage: fraction of the codebook used in this batch.
        restarts: dead codes re-initialised in this forward (training only).
    """

    recon: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: float
    restarts: int = 0


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_world() > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _dist_world() > 1:
        import torch.distributed as dist

        dist.broadcast(t, src=0)
    return t


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(...) long codes -> (K,) long counts."""
    return torch.bincount(codes.reshape(-1), minlength=codebook_size)


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a (K,) histogram: 1 when one code is used, K when all are used equally."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class VectorQuantizer(nn.Module):
    """l2-normalised nearest-code lookup with usage tracking and dead-code restarts.

    Buffers (all saved, so that a resumed run continues exactly): ``usage_counts`` (W, K) per-code
    counts of the last W training batches (a ring indexed by ``train_steps % W``), ``last_used``
    (K,) step at which each code was last chosen, ``train_steps`` () training forwards so far,
    ``restarts_total`` () codes restarted so far; for the EMA quantizer also ``ema_cluster_size``
    (K,) and ``ema_embed_sum`` (K, D).
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = config
        self.codebook_size, self.code_dim = c.codebook_size, c.code_dim
        self.kind, self.beta, self.decay = c.quantizer, c.beta, c.ema_decay
        self.dead_code_steps, self.seed = c.dead_code_steps, c.seed
        g = torch.Generator().manual_seed(c.seed)
        init = F.normalize(torch.randn(c.codebook_size, c.code_dim, generator=g), dim=1)  # (K, D)
        if self.kind == "l2":
            self.embedding = nn.Parameter(init)  # (K, D), normalised at lookup
        else:
            self.register_buffer("embedding", init.clone())  # (K, D) = ema_embed_sum / smoothed ema_cluster_size
            self.register_buffer("ema_cluster_size", torch.ones(c.codebook_size))
            self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("usage_counts", torch.zeros(c.usage_window, c.codebook_size, dtype=torch.int32))
        self.register_buffer("last_used", torch.zeros(c.codebook_size, dtype=torch.long))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """(K, D) the l2-normalised codes, float32."""
        return F.normalize(self.embedding.float(), dim=1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised vectors -> (N,) long index of the code of largest cosine."""
        return (z @ self.codebook().t()).argmax(dim=1)  # (N, D) x (D, K) -> (N, K) -> (N,)

    def usage(self) -> float:
        """Fraction of the codebook used in the last ``usage_window`` training batches."""
        return (self.usage_counts.sum(0) > 0).float().mean().item()

    def window_perplexity(self) -> float:
        """Perplexity of the codes of the last ``usage_window`` training batches."""
        return perplexity_of(self.usage_counts.sum(0)).item()

    def dead_codes(self) -> torch.Tensor:
        """(n,) long indices of the codes unused for ``dead_code_steps`` training steps."""
        if self.dead_code_steps <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.last_used.device)
        return torch.nonzero(self.train_steps - self.last_used >= self.dead_code_steps).flatten()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Re-initialise dead codes to encoder outputs of this batch.

        Args:
            z: (N, D) normalised encoder outputs of the current batch (detached).

        Returns:
            how many codes were restarted.
        """
        dead = self.dead_codes()
        n = dead.numel()
        if n == 0:
            return 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.train_steps.item()))
        N = z.shape[0]
        pick = torch.randperm(N, generator=g)[:n] if n <= N else torch.randint(N, (n,), generator=g)
        new = _broadcast(z[pick.to(z.device)].float().contiguous())  # (n, D) rank 0's choice everywhere
        self.embedding.data[dead] = new.to(self.embedding.dtype)
        if self.kind == "ema":
            self.ema_embed_sum[dead] = new
            self.ema_cluster_size[dead] = 1.0
        self.last_used[dead] = self.train_steps  # a fresh code gets dead_code_steps steps to be chosen
        self.restarts_total += n
        return n

    @torch.no_grad()
    def _track(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Update usage counts (and the EMA codebook) from one training batch: idx (N,), z (N, D)."""
        counts = _all_reduce_sum(code_histogram(idx, self.codebook_size))  # (K,)
        W = self.usage_counts.shape[0]
        self.usage_counts[int(self.train_steps.item()) % W] = counts.to(torch.int32)
        self.last_used[counts > 0] = self.train_steps
        if self.kind == "ema":
            K, d = self.codebook_size, self.decay
            sums = torch.zeros(K, self.code_dim, device=z.device).index_add_(0, idx, z.float())  # (K, D)
            sums = _all_reduce_sum(sums)
            self.ema_cluster_size.mul_(d).add_(counts.float(), alpha=1 - d)
            self.ema_embed_sum.mul_(d).add_(sums, alpha=1 - d)
            total = self.ema_cluster_size.sum()
            eps = 1e-5  # Laplace smoothing keeps rarely used codes finite
            size = (self.ema_cluster_size + eps) / (total + K * eps) * total  # (K,)
            self.embedding.copy_(self.ema_embed_sum / size[:, None])
        self.train_steps += 1

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Quantize encoder outputs.

        Args:
            z: (B, D, h, w) encoder output (any norm).

        Returns:
            (z_q (B, D, h, w) straight-through quantized, codes (B, h, w) long, commit_loss,
            codebook_loss, restarts in this call).
        """
        B, D, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=1)
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N = B*h*w, D)
            restarts = self.restart_dead_codes(flat.detach()) if self.training else 0
            idx = self.lookup(flat.detach())  # (N,)
            if self.training:
                self._track(idx, flat.detach())
            e = F.embedding(idx, self.codebook())  # (N, D) differentiable w.r.t. the l2 codebook
            commit = self.beta * F.mse_loss(flat, e.detach())
            if self.kind == "l2":
                codebook_loss = F.mse_loss(e, flat.detach())
            else:
                codebook_loss = flat.new_zeros(())
            e = flat + (e - flat).detach()  # straight-through: forward e, gradient to z unchanged
            z_q = e.view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return z_q, idx.view(B, h, w), commit, codebook_loss, restarts


@register_component
class VQVAE(ConfigModule):
    """Convolutional VQ-VAE: ``encode`` images to code grids, ``decode_codes`` them back.

    Training calls ``forward`` (reconstruction, codes and the quantizer's losses, see
    :class:`VQOutput`); the losses are combined outside (:mod:`genvl.training.tasks.vqvae`).
    """

    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        check_config(config)
        c = config
        n = len(c.channels)
        self.encoder = Encoder(
            in_channels=3, out_channels=c.code_dim, down_block_types=("DownEncoderBlock2D",) * n,
            block_out_channels=tuple(c.channels), layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_num_groups, double_z=False, mid_block_add_attention=c.mid_attention,
        )
        self.quantizer = VectorQuantizer(c)
        self.decoder = Decoder(
            in_channels=c.code_dim, out_channels=3, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(c.channels), layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_num_groups, mid_block_add_attention=c.mid_attention,
        )

    @property
    def latent_size(self) -> int:
        """h = w: codes per side of an image."""
        return self.config.latent_size

    @property
    def tokens_per_image(self) -> int:
        """h * w."""
        return self.config.latent_size ** 2

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        S = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            raise ValueError(f"vqvae expects images of shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}")

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        """Encode, quantize (tracking usage and restarting dead codes in training) and decode.

        Args:
            pixels: (B, 3, S, S) images in [-1, 1].
        """
        self._check_pixels(pixels)
        z = self.encoder(pixels.to(self.dtype))  # (B, D, h, w)
        z_q, codes, commit, codebook_loss, restarts = self.quantizer(z)
        recon = self.decoder(z_q.to(self.dtype))  # (B, 3, S, S)
        counts = code_histogram(codes, self.config.codebook_size)
        return VQOutput(
            recon=recon, codes=codes, commit_loss=commit, codebook_loss=codebook_loss,
            perplexity=perplexity_of(counts), usage=(counts > 0).float().mean().item(), restarts=restarts,
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [-1, 1] -> (B, h, w) long codes in [0, K). Changes no state."""
        self._check_pixels(pixels)
        z = self.encoder(pixels.to(self.device, self.dtype)).float()  # (B, D, h, w)
        B, D, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        return self.quantizer.lookup(flat).view(B, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long codes -> (B, D, h, w) their normalised code vectors."""
        h, K = self.latent_size, self.config.codebook_size
        if codes.ndim != 3 or codes.shape[1:] != (h, h):
            raise ValueError(f"vqvae expects codes of shape (B, {h}, {h}), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"vqvae expects integer codes, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must be in [0, {K}), got values in [{codes.min().item()}, {codes.max().item()}]")
        e = F.embedding(codes.to(self.device).long(), self.quantizer.codebook())  # (B, h, w, D)
        return e.permute(0, 3, 1, 2)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long codes -> (B, 3, S, S) images clamped to [-1, 1]."""
        return self.decoder(self.embed_codes(codes).to(self.dtype)).clamp(-1, 1)

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 3, S, S) ``decode_codes(encode(pixels))``, clamped."""
        return self.decode_codes(self.encode(pixels))

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (the adaptive GAN weight is measured there)."""
        return self.decoder.conv_out.weight


# -------------------------------------------------------------------------------------------------
# Adversarial training (VQGAN, Esser et al. 2021, arXiv:2012.09841)
# -------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, Isola et al. 2017): one real/fake logit per image patch.

    ``layers`` stride-2 4x4 convolutions (GroupNorm + LeakyReLU, doubling the width up to
    8x ``channels``), then two stride-1 4x4 convolutions; GroupNorm, not BatchNorm, so that a
    logit depends on its own image only.

    ``forward``: (B, 3, S, S) in [-1, 1] -> (B, 1, P, P) logits (P = S / 2^layers - 2).
    """

    def __init__(self, channels: int = 64, layers: int = 2, groups: int = 8):
        super().__init__()
        if channels < 1 or layers < 1 or channels % groups:
            raise ValueError(
                f"discriminator: channels ({channels}) must be a positive multiple of {groups}, and layers >= 1"
            )
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), nn.GroupNorm(groups, out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@dataclass
class AdversarialOutput:
    """What :meth:`AdversarialVQVAE.forward` returns.

    Attributes:
        vq: the VQ-VAE's output.
        fake_logits_g: (B, 1, P, P) discriminator logits of the reconstructions through the
            discriminator with detached weights (the generator term: gradient to the VQ-VAE only);
            None when not adversarial.
        real_logits, fake_logits_d: (B, 1, P, P) logits of the real images and of the detached
            reconstructions (the discriminator term: gradient to the discriminator only); None when not
            adversarial.
        disc_anchor: scalar 0 that depends on every discriminator parameter; add it to the loss while the
            GAN is off, so that DDP sees every parameter used.
    """

    vq: VQOutput
    fake_logits_g: torch.Tensor | None
    real_logits: torch.Tensor | None
    fake_logits_d: torch.Tensor | None
    disc_anchor: torch.Tensor


class AdversarialVQVAE(nn.Module):
    """A VQ-VAE and its PatchGAN discriminator in one module, so one optimizer trains both.

    The two adversarial terms are kept apart by what is detached, not by separate optimizers:
    the generator's logits come from the discriminator called with detached parameters
    (``torch.func.functional_call``), the discriminator's from detached reconstructions. Their
    sum can then be backpropagated at once. Only ``vq`` is released; the discriminator lives in
    the resume checkpoints.
    """

    def __init__(self, vq: VQVAE, discriminator: PatchDiscriminator):
        super().__init__()
        self.vq = vq
        self.discriminator = discriminator

    def forward(self, pixels: torch.Tensor, adversarial: bool) -> AdversarialOutput:
        """Args: pixels (B, 3, S, S) in [-1, 1]; adversarial: also compute the discriminator logits."""
        out = self.vq(pixels)
        params = dict(self.discriminator.named_parameters())
        anchor = sum(p.sum() for p in params.values()) * 0.0
        if not adversarial:
            return AdversarialOutput(out, None, None, None, anchor)
        frozen = {k: p.detach() for k, p in params.items()}
        fake_g = torch.func.functional_call(self.discriminator, frozen, (out.recon,))
        real = self.discriminator(pixels.to(out.recon.dtype))
        fake_d = self.discriminator(out.recon.detach())
        return AdversarialOutput(out, fake_g, real, fake_d, anchor)


__all__ = [
    "QUANTIZERS", "VQVAEConfig", "VQVAE_SIZES", "vqvae_config", "VQOutput", "VectorQuantizer", "VQVAE",
    "PatchDiscriminator", "AdversarialOutput", "AdversarialVQVAE", "code_histogram", "perplexity_of",
]
