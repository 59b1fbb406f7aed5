"""Image-text retrieval recall (R@K), as reported for CLIP on Flickr30k/MSCOCO.

Pair i is the correct match of row i in both directions. Pairs whose captions are identical
(``captions=``) are one group: another member of row i's group is also a correct match, so it never
counts against row i (a set with repeated captions, such as emoji in two styles, scores R@1 = 100
for a perfect embedding rather than being charged for the duplicates).

Rank rule (never rewards ties): the rank of a query is the number of candidates outside its group
whose cosine similarity is greater than OR EQUAL to that of its best correct match,
``rank_i = #{j : g_j != g_i, s_ij >= max_{g_k = g_i} s_ik}``; a query is a hit at K when ``rank_i < K``.
Where no scores tie this is torchmetrics' ``RetrievalHitRate`` with the group as the relevant
targets (a test compares them); genvl keeps its own code for the tie rule, as a sort breaks ties
in whatever order it happens to. A model that
maps everything to one vector therefore scores 0 (not 100) at every K < N.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chance_recall", "retrieval_metrics"]


def chance_recall(n: int, k: int) -> float:
    """Expected R@K in percent of a random ranking of ``n`` candidates: ``100 * k / n``.

    ``k`` larger than ``n`` gives 100 (every candidate is retrieved).
    """
    if n < 1 or k < 1:
        raise ValueError(f"chance_recall needs n >= 1 and k >= 1, got n={n}, k={k}")
    return 100.0 * min(k, n) / n


def _ranks(sim: Tensor, groups: Tensor) -> Tensor:
    """(N, N) similarities with the truth on the diagonal, (N,) group ids -> (N,) pessimistic 0-based
    ranks of each row's best correct match (any member of its group)."""
    others = groups[:, None] != groups[None, :]  # (N, N) candidates that are wrong for the row
    true = sim.masked_fill(others, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1) best correct score
    return ((sim >= true) & others).sum(dim=1)  # (N,) ties count against the model


@torch.no_grad()
def retrieval_metrics(image_embeds: Tensor, text_embeds: Tensor, ks: Sequence[int] = (1, 5, 10),
                      captions: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@K in both directions for paired embeddings.

    Args:
        image_embeds: (N, D) image embeddings; L2-normalised here.
        text_embeds: (N, D) text embeddings; row i is the caption of image i. L2-normalised here.
        ks: the cut-offs K, each >= 1.
        captions: (N,) the captions; identical ones make one group of correct matches. None:
            every pair is its own group.

    Returns:
        ``{"image_to_text_R@K": ..., "text_to_image_R@K": ..., "mean_recall": ...}`` in percent
        (0-100), for each K in ``ks``; ``mean_recall`` is the mean of all of them (the "RSUM / 6"
        of the retrieval literature for ks=(1, 5, 10)). See the module docstring for ties.
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must be 2-D (N, D) with the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    # Low-precision similarities create spurious ties; score in at least float32.
    dtype = torch.promote_types(image_embeds.dtype, torch.float32)
    img = F.normalize(image_embeds.to(dtype), dim=-1)
    txt = F.normalize(text_embeds.to(dtype), dim=-1)
    sim = img @ txt.T  # (N, D) x (D, N) -> (N, N): row = image query, column = caption
    n = sim.shape[0]
    if captions is None:
        groups = torch.arange(n, device=sim.device)
    else:
        if len(captions) != n:
            raise ValueError(f"captions must have one entry per pair ({n}), got {len(captions)}")
        ids: dict[str, int] = {}
        groups = torch.tensor([ids.setdefault(c, len(ids)) for c in captions], device=sim.device)
    ranks = {"image_to_text": _ranks(sim, groups), "text_to_image": _ranks(sim.T, groups)}
    metrics: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            metrics[f"{direction}_R@{k}"] = 100.0 * (r < k).double().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics
