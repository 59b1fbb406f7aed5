"""Monte-Carlo denoising-error scores with shared (t, eps) pairs and adaptive class elimination.

Shared by the pixel-diffusion and the prior classifiers. The estimator of Li et al. 2023 ("Your
Diffusion Model is Secretly a Zero-Shot Classifier", arXiv:2303.16203)::

    score(n, c) = - mean_k  w(t_k) * err(x0_n, t_k, eps_k, c)

with the *same* K pairs (t_k, eps_k) for every class (and every image): the class comparison is
then paired, and most of the Monte-Carlo variance cancels. Adaptive elimination (their sec. 3.2):
``schedule = [(n_1, keep_1), ..., (n_S, keep_S)]``; stage s evaluates n_s new pairs on every class
still alive for an image, adds them to the running means, then keeps that image's ``keep_s`` best
classes (the last stage's keep is ignored). Pairs are consumed in order, so the naive estimator
with K samples is the one-stage schedule [(K, C)].

Timesteps come from a shifted van der Corput sequence in [t_min, t_max): every prefix of it (the
pairs used by the first stages) is spread evenly over the schedule, unlike i.i.d. draws.
"""

from __future__ import annotations

from typing import Callable

import torch

from genvl.errors import GenvlError
from genvl.limits import MAX_SAMPLES

Schedule = list[tuple[int, int]]


def parse_schedule(text: str) -> Schedule:
    """``"8:5,32:2,64:1"`` -> [(8, 5), (32, 2), (64, 1)] (samples:keep per stage)."""
    out = []
    for part in text.split(","):
        try:
            n, k = (int(v) for v in part.split(":"))
        except ValueError:
            raise GenvlError(f"bad adaptive schedule {text!r}: expected samples:keep pairs, e.g. 8:5,32:1") from None
        out.append((n, k))
    return check_schedule(out)


def check_schedule(schedule: Schedule) -> Schedule:
    if not schedule:
        raise GenvlError("the adaptive schedule needs at least one (samples, keep) stage")
    prev_keep = None
    for n, k in schedule:
        if n < 1 or k < 1:
            raise GenvlError(f"adaptive schedule stages need samples >= 1 and keep >= 1, got ({n}, {k})")
        if prev_keep is not None and k > prev_keep:
            raise GenvlError(f"adaptive schedule: keep must not grow from stage to stage, got {schedule}")
        prev_keep = k
    total = sum(n for n, _ in schedule)
    if total > MAX_SAMPLES:
        raise GenvlError(f"adaptive schedule: {total} samples per class in all, above genvl's limit of {MAX_SAMPLES}")
    return [(int(n), int(k)) for n, k in schedule]


def schedule_evals(schedule: Schedule, num_classes: int) -> float:
    """Forward rows per image: sum over stages of samples * classes alive at that stage."""
    alive, total = num_classes, 0
    for n, keep in schedule:
        total += n * alive
        alive = min(alive, keep)
    return float(total)


def van_der_corput(k: int) -> torch.Tensor:
    """(k,) float64 base-2 radical inverse of 0..k-1, in [0, 1)."""
    out = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        x, f, j = 0.0, 0.5, i
        while j:
            x += f * (j & 1)
            j >>= 1
            f /= 2
        out[i] = x
    return out


def shared_pairs(num: int, shape: tuple[int, ...], t_range: tuple[int, int], seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K shared (t, eps) pairs, drawn from a fixed CPU generator.

    Args:
        num: K.
        shape: the per-sample shape of eps (``(3, H, W)`` or ``(D,)``).
        t_range: [t_min, t_max) timesteps.
        seed: generator seed; the same seed gives the same pairs.

    Returns:
        t (K,) long, eps (K, *shape) float32.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = t_range
    shift = torch.rand((), generator=g, dtype=torch.float64)
    u = (van_der_corput(num) + shift) % 1.0  # (K,) evenly spread for every prefix
    t = (lo + u * (hi - lo)).floor().long().clamp(lo, hi - 1)
    eps = torch.randn((num, *shape), generator=g)
    return t, eps


RowError = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def adaptive_scores(num_images: int, num_classes: int, schedule: Schedule, weights: torch.Tensor,
                    row_error: RowError, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the (adaptive) estimator.

    Args:
        num_images: N.
        num_classes: C.
        schedule: [(samples, keep), ...]; pair k of stage s is ``sum(samples[:s]) + i``.
        weights: (K,) per-pair weights w(t_k), K = total samples of the schedule.
        row_error: (n_idx (R,), c_idx (R,), k_idx (R,)) long -> (R,) float errors; one model
            forward of R rows, R <= batch_size.
        batch_size: rows per forward.

    Returns:
        scores (N, C) float32: -weighted mean error; classes eliminated early are capped just below
        the image's lowest surviving class, so the argmax is always a final-stage survivor.
        evals (N,) rows evaluated per image.
    """
    N, C = num_images, num_classes
    err_sum = torch.zeros(N, C, dtype=torch.float64)
    w_sum = torch.zeros(N, C, dtype=torch.float64)
    alive = torch.ones(N, C, dtype=torch.bool)
    evals = torch.zeros(N, dtype=torch.long)
    start = 0
    for stage, (n_samples, keep) in enumerate(schedule):
        ks = torch.arange(start, start + n_samples)
        n_idx, c_idx = alive.nonzero(as_tuple=True)  # (P,) alive (image, class) pairs
        P = n_idx.numel()
        # rows: every alive (image, class) x every pair of this stage, (image, class)-major.
        rn = n_idx.repeat_interleave(n_samples)
        rc = c_idx.repeat_interleave(n_samples)
        rk = ks.repeat(P)
        errs = torch.empty(rn.numel(), dtype=torch.float64)
        for i in range(0, rn.numel(), batch_size):
            sl = slice(i, i + batch_size)
            errs[sl] = row_error(rn[sl], rc[sl], rk[sl]).double().cpu()
        w = weights.double()[rk]
        err_sum.index_put_((rn, rc), w * errs, accumulate=True)
        w_sum.index_put_((rn, rc), w, accumulate=True)
        evals += torch.bincount(rn, minlength=N)
        start += n_samples
        if stage < len(schedule) - 1 and keep < C:
            mean = torch.where(alive, -err_sum / w_sum.clamp_min(1e-300), torch.tensor(-float("inf"), dtype=torch.float64))
            top = mean.topk(min(keep, C), dim=1).indices  # (N, keep)
            alive = torch.zeros_like(alive).scatter_(1, top, True)
    scores = -err_sum / w_sum.clamp_min(1e-300)  # (N, C)
    # An eliminated class keeps its partial estimate, but never above a survivor.
    floor = torch.where(alive, scores, torch.tensor(float("inf"), dtype=torch.float64)).min(dim=1, keepdim=True).values
    capped = torch.minimum(scores, floor - 1e-6 * (1 + floor.abs()))
    scores = torch.where(alive, scores, capped)
    return scores.float(), evals
