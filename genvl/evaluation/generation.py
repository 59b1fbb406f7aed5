"""Metrics of generated images, all computed in a CLIP embedding space.

- CLIP score (Hessel et al. 2021, arXiv:2104.08718; the torchmetrics convention):
  ``100 * mean(max(cos(z_image, z_text), 0))``.
- Frechet distance between two sets of CLIP image embeddings (the FID formula of Heusel et al.
  2017 on CLIP features instead of Inception features).
- Prompt-retrieval accuracy: for each generated image, is its own prompt the nearest of all
  prompts in CLIP space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """(N, D) images and their (N, D) prompts -> CLIP score in [0, 100]."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"shape mismatch: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    cos = (F.normalize(image_embeds.double(), dim=-1) * F.normalize(text_embeds.double(), dim=-1)).sum(-1)
    return float(100 * cos.clamp_min(0).mean())


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``; the matrix square root
    is taken through symmetric eigendecompositions (float64), which keeps it real and stable.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples in each set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    sa = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)


def prompt_retrieval_accuracy(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, prompt_index: torch.Tensor) -> float:
    """Percentage of images whose nearest prompt (cosine) is their own.

    Args:
        image_embeds: (N, D) generated images.
        prompt_embeds: (P, D) all distinct prompts.
        prompt_index: (N,) index into ``prompt_embeds`` of each image's prompt.
    """
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(prompt_embeds.float(), dim=-1).T  # (N, P)
    own = sims.gather(1, prompt_index.view(-1, 1))
    # ties count against the image: it must beat every other prompt strictly
    others = sims.masked_fill(F.one_hot(prompt_index, sims.shape[1]).bool(), float("-inf"))
    return float(100 * (own.squeeze(1) > others.max(1).values).float().mean())
