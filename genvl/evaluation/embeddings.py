"""Embed a dataset with a CLIP core, in batches, without gradients."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from genvl.tokenizers.text import encode_texts


@torch.no_grad()
def embed_pairs(clip, tokenizer, dataset, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False):
    """Return ``(image_embeds, text_embeds)``, each (N, D) and L2-normalised, in dataset order."""
    from tqdm.auto import tqdm

    from genvl.data import collate_image_text

    clip = clip.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text)
    imgs, txts = [], []
    for batch in tqdm(loader, desc="embedding", disable=not progress):
        enc = encode_texts(tokenizer, batch["text"])
        imgs.append(clip.encode_image(batch["pixel_values"].to(device)).float().cpu())
        txts.append(clip.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).embeds.float().cpu())
    return torch.cat(imgs), torch.cat(txts)
