"""Contrastive training of the CLIP core."""

from __future__ import annotations

from typing import Any

import torch

from genvl.errors import ModelDirError
from genvl.models.clip import CLIP, clip_config
from genvl.models.losses import contrastive_loss
from genvl.tokenizers.text import encode_texts, train_text_tokenizer
from genvl.training.trainer import Task


class CLIPTask(Task):
    stage = "clip"
    component = "clip"

    def build(self, dataset, init, tokenizer=None) -> CLIP:
        if init is not None:
            init.require("clip", purpose="--init of the clip stage")
            model = init.load("clip")
            self.tokenizer = tokenizer or init.tokenizer()
            if self.cfg.model.get("loss") and self.cfg.model["loss"] != model.config.loss:
                raise ModelDirError(f"{init.path}: its CLIP was trained with loss {model.config.loss!r}, not {self.cfg.model['loss']!r}")
            return model.train()
        self.tokenizer = tokenizer or train_text_tokenizer(
            dataset.captions, vocab_size=self.cfg.tokenizer_vocab, model_max_length=self.cfg.text_len
        )
        overrides = dict(self.cfg.model)
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
