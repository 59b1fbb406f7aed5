"""DALL-E 2 diffusion prior: CLIP text embedding -> CLIP image embedding.

A causal transformer (diffusers' :class:`~diffusers.PriorTransformer`, the unCLIP / Karlo prior)
denoises a CLIP image embedding ``z_image`` conditioned on the CLIP text tower's pooled embedding
``z_text`` and its token states. As in DALL-E 2 (Ramesh et al. 2022, arXiv:2204.06125, sec. 2.1)
the model predicts the clean embedding x0 directly, not the noise. The diffusion runs on
embeddings normalised per dimension with the dataset's statistics (``embed_mean``,
``embed_std``, buffers saved with the weights), as Karlo's ``clip_mean`` / ``clip_std``.

Token sequence seen by the transformer (length ``text_len + 4``)::

    [text token states (T) | z_text | timestep | noisy x_t | learned query]  -> query output = x0

Attention is causal (PriorTransformer's mask); padded text positions are masked out as keys.

Unconditional input (classifier-free guidance, one convention for training and sampling, see
:func:`unconditional_text`): ``z_text`` all zeros, token states all zeros, text mask 1 at
position 0 only. The one unmasked all-zero token acts as a learned "null" token and no attention
row is ever fully masked, whatever attention kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from genvl.models.base import ConfigModule, register_component
from genvl.models.clip import TextEmbeddings

SCHEDULER_KINDS = ("ddpm", "ddim", "dpm++")


@dataclass
class PriorConfig:
    """Sizes of the prior transformer and its noise schedule.

    ``embed_dim``, ``text_width`` and ``text_len`` must match the CLIP core it conditions on
    (``clip.config.embed_dim``, ``clip.config.text_width``, ``clip.config.max_text_len``).
    """

    embed_dim: int = 512  # CLIP embedding width D (z_image, z_text)
    text_width: int = 512  # CLIP text tower hidden size W (token states)
    text_len: int = 77  # max number of text token states T
    num_layers: int = 12
    num_heads: int = 8
    head_dim: int = 64
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    @property
    def width(self) -> int:
        """Transformer width (num_heads * head_dim)."""
        return self.num_heads * self.head_dim


PRIOR_SIZES: dict[str, PriorConfig] = {
    # ~33K parameters: unit tests, milliseconds on CPU. Matches the tiny CLIP (D = W = 32, T = 32).
    "tiny": PriorConfig(embed_dim=32, text_width=32, text_len=32, num_layers=2, num_heads=2, head_dim=16),
    # ~3.8M parameters: demo scale on top of the small CLIP (D = W = 256, T = 32).
    "small": PriorConfig(embed_dim=256, text_width=256, text_len=32, num_layers=8, num_heads=4, head_dim=48),
    # ~39M parameters: on top of the base CLIP (D = W = 512, T = 77).
    "base": PriorConfig(),
}


def prior_config(size: str = "tiny", **overrides) -> PriorConfig:
    """A named size from :data:`PRIOR_SIZES` with field overrides (e.g. the CLIP's dimensions)."""
    if size not in PRIOR_SIZES:
        raise ValueError(f"unknown prior size {size!r}; known: {', '.join(PRIOR_SIZES)}")
    cfg = replace(PRIOR_SIZES[size], **overrides)
    for name in ("embed_dim", "text_width", "text_len", "num_layers", "num_heads", "head_dim", "num_train_timesteps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"prior config: {name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"prior config: dropout must be in [0, 1), got {cfg.dropout}")
    return cfg


def unconditional_text(
    batch_size: int, T: int, W: int, D: int, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TextEmbeddings:
    """The "no caption" conditioning of the prior (classifier-free guidance).

    Used for dropped captions in training and for the unconditional branch at sampling time:
    ``z_text`` zeros, token states zeros, mask 1 at position 0 only (one all-zero "null" token, so
    no attention row is fully masked).

    Args:
        batch_size: B.
        T: number of token positions (any length up to the prior's ``text_len``).
        W: text width (``config.text_width``).
        D: embedding width (``config.embed_dim``).
        device: where the tensors live.
        dtype: dtype of the embeddings and states.

    Returns:
        TextEmbeddings(embeds (B, D), token_states (B, T, W), attention_mask (B, T) long).
    """
    mask = torch.zeros(batch_size, T, dtype=torch.long, device=device)
    mask[:, 0] = 1
    return TextEmbeddings(
        embeds=torch.zeros(batch_size, D, dtype=dtype, device=device),
        token_states=torch.zeros(batch_size, T, W, dtype=dtype, device=device),
        attention_mask=mask,
    )


@register_component
class DiffusionPrior(ConfigModule):
    """x0-predicting diffusion prior over normalised CLIP image embeddings."""

    config_class = PriorConfig

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        from diffusers import PriorTransformer

        c = config
        # PriorTransformer's own text projection maps width embedding_dim; genvl's text width W
        # may differ from D, so the token states get their own W -> width projection and the
        # built-in one is off (encoder_hid_proj_type=None).
        self.text_proj = nn.Linear(c.text_width, c.width)
        self.transformer = PriorTransformer(
            num_attention_heads=c.num_heads,
            attention_head_dim=c.head_dim,
            num_layers=c.num_layers,
            embedding_dim=c.embed_dim,  # noisy x_t in, x0 out (clip_embed_dim defaults to this)
            num_embeddings=c.text_len,  # text token positions
            additional_embeddings=4,  # z_text, timestep, x_t, learned query ("prd") token
            dropout=c.dropout,
            norm_in_type="layer",
            encoder_hid_proj_type=None,
            added_emb_type="prd",
            embedding_proj_dim=c.embed_dim,  # z_text width
        )
        # diffusers zero-initialises these for loading pretrained weights; from scratch every
        # position would start identical, so give them the usual small random init.
        nn.init.normal_(self.transformer.positional_embedding, std=0.02)
        nn.init.normal_(self.transformer.prd_embedding, std=0.02)
        # PriorTransformer's clip_mean / clip_std parameters are not trained: genvl normalises
        # outside the transformer with the embed_mean / embed_std buffers (kept in sync with them
        # by set_embedding_stats). Frozen so DDP sees no parameter without gradient.
        self.transformer.clip_mean.requires_grad_(False)
        self.transformer.clip_std.requires_grad_(False)
        with torch.no_grad():
            self.transformer.clip_std.fill_(1.0)
        self.register_buffer("embed_mean", torch.zeros(c.embed_dim))
        self.register_buffer("embed_std", torch.ones(c.embed_dim))

    # -- normalisation ----------------------------------------------------------------------------

    def set_embedding_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-dimension mean and std of ``z_image`` over the training data.

        Args:
            mean: (D,) mean.
            std: (D,) standard deviation; must be > 0 everywhere.
        """
        D = self.config.embed_dim
        if mean.shape != (D,) or std.shape != (D,):
            raise ValueError(f"embedding stats must have shape ({D},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("embedding std must be finite and > 0 (clamp it away from 0)")
        with torch.no_grad():
            self.embed_mean.copy_(mean)
            self.embed_std.copy_(std)
            self.transformer.clip_mean.copy_(mean[None])
            self.transformer.clip_std.copy_(std[None])

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) CLIP image embeddings -> normalised diffusion space."""
        return (z - self.embed_mean) / self.embed_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised space -> CLIP image embedding space (not re-normalised to unit length)."""
        return x * self.embed_std + self.embed_mean

    # -- model ------------------------------------------------------------------------------------

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the clean normalised embedding.

        Args:
            noisy: (B, D) x_t in normalised space.
            timesteps: (B,) long diffusion steps (a scalar is broadcast).
            text_embeds: (B, D) pooled CLIP text embedding z_text.
            text_states: (B, L, W) text token states, L <= text_len (shorter ones are padded).
            text_mask: (B, L) 1 on real tokens.

        Returns:
            (B, D) the predicted x0 in normalised space.
        """
        c = self.config
        B, L = text_mask.shape
        if noisy.shape != (B, c.embed_dim) or text_embeds.shape != (B, c.embed_dim):
            raise ValueError(
                f"prior expects noisy and text_embeds of shape ({B}, {c.embed_dim}), "
                f"got {tuple(noisy.shape)} and {tuple(text_embeds.shape)}"
            )
        if text_states.shape != (B, L, c.text_width):
            raise ValueError(
                f"prior expects text_states of shape ({B}, {L}, {c.text_width}), got {tuple(text_states.shape)}"
            )
        if L > c.text_len:
            raise ValueError(f"text has {L} tokens, more than the prior's text_len {c.text_len}")
        if L < c.text_len:
            # PriorTransformer's causal mask has a fixed length: pad to text_len with masked zeros.
            text_states = F.pad(text_states, (0, 0, 0, c.text_len - L))  # (B, T, W)
            text_mask = F.pad(text_mask, (0, c.text_len - L))  # (B, T)
        states = self.text_proj(text_states)  # (B, T, W) -> (B, T, width)
        out = self.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            proj_embedding=text_embeds,
            encoder_hidden_states=states,
            attention_mask=text_mask,
        )
        return out.predicted_image_embedding  # (B, D)

    def make_scheduler(self, kind: str = "ddpm"):
        """A diffusers scheduler for this prior's noise schedule (x0 prediction).

        The same object adds noise in training (``add_noise``) and denoises at sampling (``step``).

        Args:
            kind: "ddpm" | "ddim" | "dpm++" (DPM-Solver++ multistep).
        """
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        common = dict(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_schedule=self.config.beta_schedule,
            prediction_type="sample",
        )
        if kind == "ddpm":
            return DDPMScheduler(**common, clip_sample=False)
        if kind == "ddim":
            return DDIMScheduler(**common, clip_sample=False)
        if kind == "dpm++":
            # DPM-Solver++ has no clip_sample; thresholding (its analogue) stays off.
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", thresholding=False)
        raise ValueError(f"unknown scheduler kind {kind!r}; kinds: {', '.join(SCHEDULER_KINDS)}")
