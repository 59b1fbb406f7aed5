"""CLIP core: image and text towers mapped into one embedding space.

Both towers are transformers' CLIP implementations (``CLIPVisionModelWithProjection`` and
``CLIPTextModelWithProjection``), so a HuggingFace CLIP checkpoint directory (the
``openai/clip-vit-*`` layout) imports without conversion (:meth:`CLIP.from_hf_clip`). As an
option the text tower is any HuggingFace encoder, frozen, with a trained projection on top
(LiT, Zhai et al. 2022, arXiv:2111.07991).

Every other genvl model conditions on this core: the pooled, normalised embeddings
(``z_image``, ``z_text``) and the text tower's token states.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import ModelDirError, describe_load_error
from genvl.models.base import ConfigModule, register_component


def _renamed(key: str, names: tuple[tuple[str, str], ...]) -> str:
    """``key`` with the first matching prefix of ``names`` (old, new) replaced."""
    for old, new in names:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@dataclass
class CLIPConfig:
    """Sizes of both towers, the shared embedding width, and the contrastive loss.

    ``vision`` and ``text`` are keyword arguments of transformers' ``CLIPVisionConfig`` and
    ``CLIPTextConfig``; any field those accept may be given (the size table fills the usual ones).
    """

    embed_dim: int = 512
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    loss: str = "infonce"  # infonce | siglip | soft
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    logit_bias_init: float = -10.0  # SigLIP's initial bias (arXiv:2303.15343, sec. 3.3)
    # LiT-style frozen external text encoder: the transformers config of any HF encoder.
    # When set, ``text`` is ignored and only a linear projection is trained on the text side.
    text_encoder: dict | None = None
    text_pooling: str = "mean"  # mean | cls, for an external text encoder

    @property
    def image_size(self) -> int:
        return int(self.vision.get("image_size", 224))

    @property
    def max_text_len(self) -> int:
        if self.text_encoder is not None:
            return int(self.text_encoder.get("max_position_embeddings", 512))
        return int(self.text.get("max_position_embeddings", 77))

    @property
    def text_width(self) -> int:
        """Width of the text token states handed to conditioned models."""
        if self.text_encoder is not None:
            return int(self.text_encoder["hidden_size"])
        return int(self.text.get("hidden_size", 512))


def _towers(width_v, layers_v, heads_v, width_t, layers_t, heads_t, image_size, patch, ctx, embed):
    vision = dict(
        hidden_size=width_v, intermediate_size=4 * width_v, num_hidden_layers=layers_v,
        num_attention_heads=heads_v, image_size=image_size, patch_size=patch,
    )
    text = dict(
        hidden_size=width_t, intermediate_size=4 * width_t, num_hidden_layers=layers_t,
        num_attention_heads=heads_t, max_position_embeddings=ctx, vocab_size=4096,
    )
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


CLIP_SIZES: dict[str, CLIPConfig] = {
    # ~0.2M parameters: unit tests and CPU smoke runs at 32-64 px.
    "tiny": _towers(32, 2, 2, 32, 2, 2, image_size=32, patch=8, ctx=32, embed=32),
    # ~11M parameters: demo scale at 64 px, trainable on a 2-core CPU in about an hour.
    "small": _towers(256, 6, 4, 256, 6, 4, image_size=64, patch=8, ctx=32, embed=256),
    # ~126M parameters: ViT-B/16-like towers at 224 px.
    "base": _towers(768, 12, 12, 512, 12, 8, image_size=224, patch=16, ctx=77, embed=512),
}


def clip_config(size: str = "tiny", **overrides) -> CLIPConfig:
    """A named size from :data:`CLIP_SIZES` with top-level or tower-level overrides.

    ``overrides`` may hold ``vision`` / ``text`` dicts, merged into the size's tower dicts.
    """
    if size not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {size!r}; known: {', '.join(CLIP_SIZES)}")
    base = CLIP_SIZES[size]
    vision = {**base.vision, **overrides.pop("vision", {})}
    text = {**base.text, **overrides.pop("text", {})}
    return replace(base, vision=vision, text=text, **overrides)


@dataclass
class TextEmbeddings:
    """Output of the text tower.

    Attributes:
        embeds: (B, D) L2-normalised pooled embedding ``z_text``.
        token_states: (B, T, W) last hidden states of the tower (conditioning for other models).
        attention_mask: (B, T) 1 on real tokens.
    """

    embeds: torch.Tensor
    token_states: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class CLIPOutput:
    image_embeds: torch.Tensor  # (B, D), L2-normalised
    text_embeds: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # () log of the inverse temperature
    logit_bias: torch.Tensor  # () SigLIP bias (unused by InfoNCE)


class _ExternalTextTower(nn.Module):
    """A frozen HuggingFace encoder + trained linear projection (LiT)."""

    def __init__(self, encoder_config: dict, embed_dim: int, pooling: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        cfg = dict(encoder_config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("text_encoder config needs a model_type")
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        self.encoder = AutoModel.from_config(hf_cfg)
        self.encoder.requires_grad_(False)
        self.encoder.eval()  # frozen: dropout off from the start
        self.pooling = pooling
        self.proj = nn.Linear(hf_cfg.hidden_size, embed_dim, bias=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout
        return self

    def forward(self, input_ids, attention_mask):
        with torch.no_grad():
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj(pooled), states


@register_component
class CLIP(ConfigModule):
    """Contrastive image-text model: ``encode_image``, ``encode_text``, ``forward`` -> features."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        from transformers import (
            CLIPTextConfig,
            CLIPTextModelWithProjection,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )

        if config.loss not in ("infonce", "siglip", "soft"):
            raise ValueError(f"unknown contrastive loss {config.loss!r}; known: infonce, siglip, soft")
        vcfg = CLIPVisionConfig(**{**config.vision, "projection_dim": config.embed_dim})
        self.vision = CLIPVisionModelWithProjection(vcfg)
        if config.text_encoder is not None:
            self.text = _ExternalTextTower(config.text_encoder, config.embed_dim, config.text_pooling)
        else:
            tcfg = CLIPTextConfig(
                **{"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, **config.text, "projection_dim": config.embed_dim}
            )
            self.text = CLIPTextModelWithProjection(tcfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        # Only the sigmoid loss uses the bias; a parameter without gradient would stall DDP.
        self.logit_bias.requires_grad_(config.loss == "siglip")

    # The component folder is also a transformers ``CLIPModel`` folder: config.json carries
    # CLIPModel's keys beside genvl's and the weights use CLIPModel's names (``logit_bias`` is
    # genvl's own and is reported as unused there), so ``CLIPModel.from_pretrained(dir / "clip")``
    # loads it right. Folders written with genvl's module names keep loading here. A CLIP whose
    # text tower is an external encoder has no CLIPModel form and keeps genvl's names.
    FILE_NAMES = (("vision.vision_model.", "vision_model."), ("vision.visual_projection.", "visual_projection."),
                   ("text.text_model.", "text_model."), ("text.text_projection.", "text_projection."))

    def library_config(self) -> dict:
        if self.config.text_encoder is not None:
            return {}
        from transformers import CLIPConfig as HFCLIPConfig

        hf = HFCLIPConfig(text_config=self.text.config.to_dict(), vision_config=self.vision.config.to_dict(),
                          projection_dim=self.config.embed_dim, logit_scale_init_value=self.config.logit_scale_init)
        return {**hf.to_dict(), "architectures": ["CLIPModel"]}

    @classmethod
    def strip_library_config(cls, data: dict) -> dict:
        if data.get("model_type") != "clip":
            return data
        from transformers import CLIPConfig as HFCLIPConfig

        ours = {f.name for f in dataclasses.fields(cls.config_class)}
        theirs = set(HFCLIPConfig().to_dict()) | {"architectures", "transformers_version", "dtype", "torch_dtype"}
        return {k: v for k, v in data.items() if k in ours or k not in theirs}

    def file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.text_encoder is not None:
            return state
        return {_renamed(k, self.FILE_NAMES): v for k, v in state.items()}

    def module_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        back = tuple((b, a) for a, b in self.FILE_NAMES)
        return {_renamed(k, back): v for k, v in state.items()}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] (genvl's pixel range) -> (B, D) unit vectors."""
        return F.normalize(self.vision(pixel_values=self._normalize_pixels(pixel_values)).image_embeds, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbeddings:
        """(B, T) token ids -> pooled unit vectors and token states."""
        if isinstance(self.text, _ExternalTextTower):
            pooled, states = self.text(input_ids, attention_mask)
        else:
            out = self.text(input_ids=input_ids, attention_mask=attention_mask)
            pooled, states = out.text_embeds, out.last_hidden_state
        return TextEmbeddings(F.normalize(pooled, dim=-1), states, attention_mask)

    def forward(self, pixel_values, input_ids, attention_mask) -> CLIPOutput:
        return CLIPOutput(
            image_embeds=self.encode_image(pixel_values),
            text_embeds=self.encode_text(input_ids, attention_mask).embeds,
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
        )

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) x (C, D) -> (N, C) logits as the model was trained (scaled cosine [+ bias])."""
        logits = self.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T
        if self.config.loss == "siglip":
            logits = logits + self.logit_bias
        return logits

    # Pixels arrive in [-1, 1]; CLIP towers expect ImageNet-CLIP normalisation. Doing it here
    # keeps every caller in one pixel convention and imported OpenAI weights correct.
    PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
    PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

    def _normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(self.PIXEL_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(self.PIXEL_STD).view(1, 3, 1, 1)
        x = (x + 1) / 2  # [-1, 1] -> [0, 1]
        size = self.config.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (x - mean) / std

    @classmethod
    def from_hf_clip(cls, path: str | Path, loss: str = "infonce") -> "CLIP":
        """Import a transformers CLIP checkpoint directory (``openai/clip-vit-*`` layout)."""
        from transformers import CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelDirError(f"{path}: not a HuggingFace CLIP directory (no config.json)")
        try:
            hf = CLIPModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, pickle.UnpicklingError) as e:  # the last: pickled weights refused
            raise ModelDirError(f"{path}: cannot load as a HuggingFace CLIP model ({describe_load_error(e)})") from None
        drop = {"projection_dim", "architectures", "transformers_version", "model_type", "torch_dtype", "dtype"}
        vision = {k: v for k, v in hf.config.vision_config.to_diff_dict().items() if k not in drop}
        text = {k: v for k, v in hf.config.text_config.to_diff_dict().items() if k not in drop}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            text[key] = getattr(hf.config.text_config, key)
        cfg = CLIPConfig(
            embed_dim=hf.config.projection_dim, vision=vision, text=text, loss=loss,
            logit_scale_init=float(hf.logit_scale.item()),
        )
        model = cls(cfg)
        model.vision.vision_model.load_state_dict(hf.vision_model.state_dict())
        model.vision.visual_projection.load_state_dict(hf.visual_projection.state_dict())
        model.text.text_model.load_state_dict(hf.text_model.state_dict())
        model.text.text_projection.load_state_dict(hf.text_projection.state_dict())
        return model.eval()


def external_text_encoder_config(path: str | Path) -> dict:
    """The config dict of a HuggingFace encoder directory, for ``CLIPConfig.text_encoder``."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read a HuggingFace encoder config ({str(e).splitlines()[0]})") from None
    d = cfg.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    return d


def load_external_text_encoder_weights(model: CLIP, path: str | Path) -> None:
    """Copy a HuggingFace encoder's pretrained weights into ``model``'s frozen text tower."""
    from transformers import AutoModel

    try:
        enc = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # the last: pickled weights refused
        raise ModelDirError(f"{path}: cannot load the encoder's weights ({describe_load_error(e)})") from None
    model.text.encoder.load_state_dict(enc.state_dict())
