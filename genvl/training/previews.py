"""Preview grids of the generative stages: a few fixed training images and what the model makes of them."""

from __future__ import annotations

from pathlib import Path

import torch

NUM_FIXED = 8  # training images shown in the sample grids
SAMPLE_STEPS = 25  # denoising steps of the diffusion stages' sample grids


def fixed_items(dataset, n: int = NUM_FIXED) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` images of ``dataset`` (B, 3, S, S) and their captions (without dropout)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    captions = getattr(dataset, "captions", None)
    texts = [captions[it["index"]] if captions is not None else it["text"] for it in items]
    return torch.stack([it["pixel_values"] for it in items]), texts


def save_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """Write rows of (n, 3, H, W) images in [-1, 1] as one PNG grid, one row per tensor."""
    from genvl.sampling.io import make_grid, to_pil_images

    ncols = rows[0].shape[0]
    images = [im for row in rows for im in to_pil_images(row)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    make_grid(images, ncols=ncols).save(tmp)
    tmp.replace(path)
    return path
