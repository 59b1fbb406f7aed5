"""Reconstruction metrics of an image tokenizer: PSNR, codebook usage and code perplexity.

PSNR is measured on images mapped from [-1, 1] to [0, 1] (peak 1), per image, then averaged
over images (the convention of LlamaGen's and taming-transformers' evaluations). Codebook usage
is the fraction of the K codes chosen at least once on the evaluated images; perplexity is
exp(entropy) of their code histogram (K when every code is used equally often).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from genvl.tokenizers.vqvae import perplexity_of

__all__ = ["psnr", "evaluate_reconstruction", "MAX_PSNR"]

MAX_PSNR = 100.0  # identical images (mse 0) score this instead of infinity


def psnr(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1].

    Args:
        a, b: (B, C, H, W) or (C, H, W) images in [-1, 1] (values outside are clamped).
        reduction: "mean" (the mean of the per-image PSNRs, a scalar) or "none" ((B,) per image).

    Returns:
        scalar or (B,) float tensor; at most :data:`MAX_PSNR`.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"psnr expects (B, C, H, W) or (C, H, W) images, got {tuple(a.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    x = (a.detach().float().clamp(-1, 1) + 1) / 2  # [0, 1]
    y = (b.detach().float().clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))  # (B,)
    per = (-10 * torch.log10(mse.clamp(min=10 ** (-MAX_PSNR / 10)))).clamp(max=MAX_PSNR)  # (B,)
    return per.mean() if reduction == "mean" else per


def _collate(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["pixel_values"] for it in items])  # (B, 3, S, S)


@torch.no_grad()
def evaluate_reconstruction(
    vq,
    dataset: Dataset,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Encode and decode held-out images with a VQ-VAE and measure the result.

    Args:
        vq: a :class:`~genvl.tokenizers.vqvae.VQVAE` (``encode``, ``decode_codes``, ``config``).
        dataset: items ``{"pixel_values": (3, S, S) in [-1, 1], ...}`` at ``vq.config.image_size``
            (e.g. :func:`genvl.data.open_image_text` opened at that size).
        batch_size: images per forward pass.
        limit: use only the first ``limit`` images.
        device: where to run (default: the model's device).
        progress: show a progress bar.

    Returns:
        ``{"psnr": mean dB over images, "codebook_usage": fraction of codes used,
        "perplexity": exp(entropy) of the code histogram}``.
    """
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise ValueError("evaluate_reconstruction needs at least one image")
    if limit is not None and n < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(n))
    was_training = vq.training
    vq.eval()
    if device is not None:
        vq.to(device)
    K, S = vq.config.codebook_size, vq.config.image_size
    counts = torch.zeros(K, dtype=torch.long)
    psnr_sum, seen = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    try:
        for px in tqdm(loader, desc="reconstruction", unit="batch", disable=not progress):
            if px.shape[1:] != (3, S, S):
                raise ValueError(
                    f"the dataset gives images of shape {tuple(px.shape[1:])}, the vqvae works at (3, {S}, {S})"
                )
            codes = vq.encode(px)  # (B, h, w)
            recon = vq.decode_codes(codes).cpu()  # (B, 3, S, S) in [-1, 1]
            psnr_sum += psnr(recon, px, reduction="none").sum().item()
            seen += px.shape[0]
            counts += torch.bincount(codes.reshape(-1).cpu(), minlength=K)
    finally:
        vq.train(was_training)
    return {
        "psnr": psnr_sum / seen,
        "codebook_usage": (counts > 0).float().mean().item(),
        "perplexity": perplexity_of(counts).item(),
    }
