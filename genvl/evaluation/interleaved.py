"""Regression error of the interleaved LM on held-out caption -> image pairs.

For each pair the LM reads "<bos> caption <img>" and regresses the k slots of the image (with
classifier-free guidance ``guidance``); the assembled, normalised embedding ẑ is compared with
the CLIP image embedding z of the real image:

* ``cosine``: mean cos(ẑ, z); ``l2``: mean ||ẑ - z|| (unit vectors: 0 .. 2);
* ``top1``: % of pairs whose ẑ is nearer (cosine) to its own z than to every other evaluated image's;
* ``cosine_baseline``: mean cos(z̄, z) of the normalised mean embedding z̄ of the evaluated images,
  what a model that ignores the caption could reach;
* ``img_prob``: mean probability the LM gives ``<img>`` right after the caption (it opens an image
  where a caption -> image document would).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["evaluate_interleaved", "recorded_holdout"]


@torch.no_grad()
def evaluate_interleaved(
    model,
    clip,
    tokenizer,
    dataset,
    indices: list[int] | None = None,
    batch_size: int = 64,
    guidance: float = 1.0,
    progress: bool = False,
) -> dict[str, float]:
    """Measure the regressed image embeddings on caption -> image pairs.

    Args:
        model: the :class:`~genvl.models.interleaved.InterleavedLM` (eval mode).
        clip: the CLIP core whose image embeddings it regresses.
        tokenizer: the text tokenizer.
        dataset: an image-text set (items ``{"pixel_values", "text"}``; its canonical ``captions``
            are used when it has them, so caption variants do not change the figures).
        indices: the pairs to use (default: all).
        batch_size: pairs per forward pass.
        guidance: classifier-free guidance of the slots (1 = none).
        progress: show a progress bar.

    Returns:
        ``{"cosine", "l2", "top1", "cosine_baseline", "img_prob"}`` (top1 and img_prob in %).
    """
    from tqdm.auto import tqdm

    from genvl.sampling.common import left_pad
    from genvl.sampling.interleaved import generate_image_embeds

    indices = list(range(len(dataset))) if indices is None else list(indices)
    if len(indices) < 2:
        raise ValueError("evaluate_interleaved needs at least two pairs")
    captions = getattr(dataset, "captions", None)
    lay = model.config.layout
    device = model.device
    z_true, z_hat, p_img = [], [], []
    for start in tqdm(range(0, len(indices), batch_size), desc="interleaved", disable=not progress):
        chunk = indices[start:start + batch_size]
        items = [dataset[i] for i in chunk]
        texts = [captions[i] if captions is not None else it["text"] for i, it in zip(chunk, items)]
        px = torch.stack([it["pixel_values"] for it in items]).to(clip.device)
        z_true.append(clip.encode_image(px).float().cpu())  # (b, D) unit
        ids = [list(t) for t in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        ids = [t[: model.config.max_len - lay.visual_tokens - 3] for t in ids]
        z_hat.append(generate_image_embeds(model, ids, guidance=guidance).cpu())
        rows, mask = left_pad([[lay.bos_id, *t] for t in ids], lay.pad_id, device)  # "<bos> caption"
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(rows, attention_mask=mask, position_ids=pos, last_only=True).logits[:, -1].float()
        p_img.append(logits.softmax(-1)[:, lay.boi_id].cpu())
    z, zh = torch.cat(z_true), torch.cat(z_hat)  # (n, D)
    cos = F.cosine_similarity(zh, z, dim=-1)  # (n,)
    sim = zh @ z.T  # (n, n) cosines (unit vectors)
    top1 = (sim.argmax(dim=1) == torch.arange(len(z))).float().mean()
    mean = F.normalize(z.mean(0, keepdim=True), dim=-1)  # (1, D)
    return {
        "cosine": cos.mean().item(),
        "l2": (zh - z).norm(dim=-1).mean().item(),
        "top1": 100.0 * top1.item(),
        "cosine_baseline": (z @ mean.T).mean().item(),
        "img_prob": 100.0 * torch.cat(p_img).mean().item(),
    }


def recorded_holdout(model_dir) -> float:
    """The ``model.holdout`` fraction the interleaved LM of ``model_dir`` was trained with (0 if none)."""
    import yaml

    rec = model_dir.meta.get("training", {}).get("interleaved", {})
    try:
        recipe = yaml.safe_load(rec.get("recipe") or "") or {}
        return float((recipe.get("model") or {}).get("holdout", 0.0))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 0.0
