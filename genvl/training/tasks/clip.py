"""Contrastive training of the CLIP core."""

from __future__ import annotations

import typing
from typing import Any

import torch

from genvl.errors import ModelDirError
from genvl.models.clip import CLIP, CLIPConfig, clip_config, external_text_encoder_config, load_external_text_encoder_weights
from genvl.models.losses import contrastive_loss
from genvl.tokenizers.text import encode_texts, load_text_tokenizer, train_text_tokenizer
from genvl.training.trainer import Task


class CLIPTask(Task):
    """Contrastive image-text training.

    ``model`` recipe keys: ``size`` (tiny | small | base), ``loss`` (infonce | siglip | soft),
    tower overrides ``vision`` / ``text``, and, instead of a new model, ``from_hf: PATH`` (start
    from a HuggingFace CLIP checkpoint directory) or ``text_encoder: PATH`` (a frozen HuggingFace
    encoder as the text tower, LiT).
    """

    model_config = CLIPConfig
    recipe_keys = {"size": str, "from_hf": str, "text_encoder": typing.Union[str, dict]}
    stage = "clip"
    component = "clip"
    streams = True

    def build(self, dataset, init, tokenizer=None) -> CLIP:
        if init is not None:
            init.require("clip", purpose="--init of the clip stage")
            model = init.load("clip")
            self.tokenizer = tokenizer or init.tokenizer()
            if self.cfg.model.get("loss") and self.cfg.model["loss"] != model.config.loss:
                raise ModelDirError(f"{init.path}: its CLIP was trained with loss {model.config.loss!r}, not {self.cfg.model['loss']!r}")
            return model.train()
        overrides = dict(self.cfg.model)
        if overrides.get("from_hf"):
            # Start from a HuggingFace CLIP checkpoint directory (openai/clip-vit-* layout).
            path = overrides["from_hf"]
            self.tokenizer = tokenizer or load_text_tokenizer(path)
            return CLIP.from_hf_clip(path, loss=overrides.get("loss", "infonce")).train()
        if isinstance(overrides.get("text_encoder"), str):
            # LiT: a frozen HuggingFace encoder (and its tokenizer) as the text tower.
            path = overrides.pop("text_encoder")
            self.tokenizer = tokenizer or load_text_tokenizer(path)
            size = overrides.pop("size", "tiny")
            vision = dict(overrides.pop("vision", {}))
            vision.setdefault("image_size", self.cfg.data.image_size)
            cfg = clip_config(size, vision=vision, text_encoder=external_text_encoder_config(path), **overrides)
            model = CLIP(cfg)
            load_external_text_encoder_weights(model, path)
            return model.train()
        self.tokenizer = tokenizer or train_text_tokenizer(
            getattr(dataset, "all_captions", dataset.captions), vocab_size=self.cfg.tokenizer_vocab, model_max_length=self.cfg.text_len
        )
        size = overrides.pop("size", "tiny")
        text = dict(overrides.pop("text", {}))
        text.update(vocab_size=len(self.tokenizer), max_position_embeddings=self.tokenizer.model_max_length,
                    pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                    eos_token_id=self.tokenizer.eos_token_id)
        vision = dict(overrides.pop("vision", {}))
        vision.setdefault("image_size", self.cfg.data.image_size)
        try:
            cfg = clip_config(size, vision=vision, text=text, **overrides)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"bad CLIP model config: {e}") from None
        return CLIP(cfg).train()

    def collate(self, items: list[dict]) -> dict[str, Any]:
        enc = encode_texts(self.tokenizer, [it["text"] for it in items])
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
        }

    def loss(self, model, batch):
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        cfg = model.module.config if hasattr(model, "module") else model.config
        bias = out.logit_bias if cfg.loss == "siglip" else None
        loss = contrastive_loss(cfg.loss, out.image_embeds, out.text_embeds, out.logit_scale, bias)
        return loss, {"logit_scale": out.logit_scale.detach().exp().item()}
