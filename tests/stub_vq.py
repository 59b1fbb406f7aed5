"""A fixed (untrained) image tokenizer with the VQ-VAE's interface, for the token-LM tests.

Each image is average-pooled to ``latent_size`` x ``latent_size`` cells and each cell's colour is
quantised to ``levels`` steps per channel: code = r * L^2 + g * L + b (K = L^3 codes). Decoding paints
each cell with its quantised colour. It registers as a model-directory component ("vqvae"), so
the LM task, the sampling pipelines and the CLI run end to end before the learned VQ-VAE exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genvl.models.base import ConfigModule, register_component


@dataclass
class StubVQConfig:
    image_size: int = 16
    latent_size: int = 4
    codebook_size: int = 8  # a cube: L^3 colours


@register_component
class StubVQ(ConfigModule):
    config_class = StubVQConfig

    def __init__(self, config: StubVQConfig):
        super().__init__(config)
        L = round(config.codebook_size ** (1 / 3))
        assert L**3 == config.codebook_size, "codebook_size must be a cube"
        self.levels = L
        steps = torch.linspace(-1, 1, L)
        r, g, b = torch.meshgrid(steps, steps, steps, indexing="ij")
        self.register_buffer("palette", torch.stack([r, g, b], -1).reshape(-1, 3))  # (K, 3)

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.latent_size**2

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, h, w) long codes."""
        h = self.config.latent_size
        cells = F.adaptive_avg_pool2d(pixels.float(), h)  # (B, 3, h, w)
        q = ((cells.clamp(-1, 1) + 1) / 2 * (self.levels - 1)).round().long()  # (B, 3, h, w) in [0, L)
        L = self.levels
        return q[:, 0] * L * L + q[:, 1] * L + q[:, 2]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, S, S) in [-1, 1]."""
        colors = self.palette[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
        return F.interpolate(colors, size=self.config.image_size, mode="nearest")


def tiny_tokenizer(texts=None, max_len: int = 16):
    from genvl.tokenizers.text import train_text_tokenizer

    texts = texts or ["a red circle", "a blue square", "a green triangle", "a yellow cross", "a black circle"] * 4
    return train_text_tokenizer(texts, vocab_size=300, model_max_length=max_len)
