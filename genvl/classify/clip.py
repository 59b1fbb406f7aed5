"""The discriminative baseline: cosine similarity in the CLIP embedding space."""

from __future__ import annotations

import torch

from genvl.tokenizers.text import encode_texts


class CLIPClassifier:
    """Zero-shot CLIP: ``scores[n, c] = logit_scale * cos(z_image_n, z_text_c)`` (+ bias for SigLIP)."""

    def __init__(self, clip, tokenizer, device: str | torch.device = "cpu"):
        self.clip = clip.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        enc = encode_texts(self.tokenizer, prompts)
        z_txt = self.clip.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)).embeds
        z_img = self.clip.encode_image(images.to(self.device))
        return self.clip.similarity(z_img, z_txt).float().cpu()  # (N, C)

    def evals_per_image(self, num_classes: int) -> float:
        # One image-tower pass per image; text passes are shared by all images.
        return 1.0
