"""Cascade zero-shot classification: the prior shortlists the classes, the pixel decoder decides.

The prior classifier (:class:`~genvl.classify.prior.PriorClassifier`, the denoising error in CLIP
embedding space) is cheap per evaluation but plateaus below what it could reach; the pixel decoder
(:class:`~genvl.classify.diffusion.DiffusionClassifier`) is expensive per evaluation and its cost
grows with the number of classes it races. The cascade uses each for what it is good at:

1. the prior scores every class of every image with its own (few) shared pairs;
2. per image, the ``shortlist`` classes with the best prior scores go on (best first);
3. the pixel classifier's estimator (naive, top-k or confidence racing, with the same shared
   (t, eps) pairs as when it scores all classes) runs on those classes only.

The returned (N, C) scores are the pixel scores on the shortlist; a class cut by the shortlist is
capped below every shortlisted class (in prior order among themselves), the way
:func:`~genvl.classify.montecarlo.adaptive_scores` caps an eliminated class below the survivors,
so the predicted class is always one the pixel stage kept, and never a class outside the shortlist.

Evaluations are counted per image and per model: ``prior`` rows (K_p x C) and ``pixel`` rows
(the race on the shortlist, measured per image). :meth:`CascadeClassifier.evals_breakdown` reports
both, their plain sum (every denoiser evaluation counted as one) and the cost-weighted total in
pixel-evaluation units, ``pixel + prior_cost * prior`` with ``prior_cost`` the measured seconds of
one prior evaluation over one pixel-decoder evaluation (:data:`PRIOR_PIXEL_COST` by default).
The prompts' decoder conditions (prior samples per class, shared by every image of a call) are not
counted per image, as for the pixel classifier.
"""

from __future__ import annotations

import math

import torch

from genvl.classify.montecarlo import EvalLedger, RowError, Schedule, adaptive_scores
from genvl.errors import GenvlError
from genvl.runtime import CASCADE_DEFAULTS  # noqa: F401 - re-exported: the cascade's defaults live with the others

#: Seconds of one prior evaluation over one pixel-decoder evaluation of the built-in demo model
#: (batches of 80 rows, one CPU thread; ``prior_vs_pixel`` in benchmarks/results/zero_shot_emoji10.json).
#: Another model or device has another ratio: pass the measured one as ``prior_cost``.
PRIOR_PIXEL_COST = 0.076


def check_shortlist(shortlist: int) -> int:
    """A shortlist size: an integer >= 2 (one class left would make the pixel stage pointless)."""
    if isinstance(shortlist, bool) or int(shortlist) != shortlist or shortlist < 2:
        raise GenvlError(f"the cascade's shortlist must be an integer >= 2 classes, got {shortlist!r} "
                         "(for the prior's top class alone use --method prior)")
    return int(shortlist)


def shortlist_classes(prior_scores: torch.Tensor, shortlist: int) -> torch.Tensor:
    """(N, C) prior scores -> (N, k) the indices of each image's k best classes, best first
    (k = min(shortlist, C))."""
    k = min(check_shortlist(shortlist), prior_scores.shape[1])
    return prior_scores.topk(k, dim=1).indices


@torch.no_grad()
def cascade_scores(prior_scores: torch.Tensor, shortlist: int, stages: Schedule, weights: torch.Tensor,
                   pixel_row_error: RowError, batch_size: int, elimination=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pixel stage of the cascade, given the prior's scores.

    Args:
        prior_scores: (N, C) the prior classifier's scores of every class.
        shortlist: k, the classes per image that go on to the pixel stage.
        stages: the pixel estimator's schedule for k classes (e.g. ``DiffusionClassifier.stages(k)``).
        weights: (K,) pixel pair weights.
        pixel_row_error: (n_idx, c_idx, k_idx) -> (R,) pixel errors, c_idx a class index among all
            C classes (``DiffusionClassifier.row_error`` or a table replay).
        batch_size: rows per pixel forward.
        elimination: the pixel stage's rule ("top-k" or a Confidence).

    Returns:
        scores (N, C) float32: pixel scores on the shortlist, every other class below all of them;
        pixel_evals (N,) long: pixel rows per image;
        top (N, k) long: the shortlist, best prior score first.
    """
    N, C = prior_scores.shape
    top = shortlist_classes(prior_scores, shortlist)  # (N, k)
    k = top.shape[1]

    def row_error(n: torch.Tensor, j: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        return pixel_row_error(n, top[n.cpu(), j.cpu()], kk)

    sub, evals = adaptive_scores(N, k, stages, weights, row_error, batch_size, elimination)  # (N, k)
    sub = sub.double()
    # cut classes: below the lowest shortlisted score, in prior order among themselves
    rank = prior_scores.double().argsort(dim=1, descending=True).argsort(dim=1)  # (N, C) 0 = prior's best
    floor = sub.min(dim=1, keepdim=True).values  # (N, 1)
    step = 1e-6 * (1 + floor.abs())
    scores = floor - step * (rank - k + 2).clamp_min(1)
    scores.scatter_(1, top, sub)
    return scores.float(), evals, top


class CascadeClassifier:
    """Prior shortlist, then the pixel classifier on the shortlist (see the module docstring).

    Args:
        prior: the :class:`~genvl.classify.prior.PriorClassifier` that scores every class (its
            ``samples`` / ``schedule`` are the shortlist stage's K_p pairs).
        pixel: the :class:`~genvl.classify.diffusion.DiffusionClassifier` whose estimator (samples,
            schedule, elimination, timestep range and weighting, shared pairs) runs on the shortlist.
        shortlist: k >= 2, classes per image kept by the prior.
        prior_cost: seconds of one prior evaluation over one pixel evaluation, for the cost-weighted
            count (:data:`PRIOR_PIXEL_COST`: the demo model's on CPU).
    """

    method = "cascade"

    def __init__(self, prior, pixel, shortlist: int = 3, prior_cost: float = PRIOR_PIXEL_COST):
        self.prior, self.pixel = prior, pixel
        self.shortlist = check_shortlist(shortlist)
        if not (math.isfinite(prior_cost) and prior_cost >= 0):
            raise GenvlError(f"prior_cost must be a finite number >= 0, got {prior_cost}")
        self.prior_cost = float(prior_cost)
        self.image_size = max(int(pixel.image_size), int(prior.image_size))
        self.pixel_ledger, self.prior_ledger = EvalLedger(), EvalLedger()
        self.last_pixel_evals: torch.Tensor | None = None  # (N,) of the last call
        self.last_prior_evals: torch.Tensor | None = None  # (N,)
        self.last_shortlist: torch.Tensor | None = None  # (N, k) class indices, best prior score first

    def _resized(self, images: torch.Tensor, size: int) -> torch.Tensor:
        from genvl.classify.diffusion import _resize

        return _resize(images.float(), size)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], C prompts -> (N, C) scores; the argmax is a shortlisted class."""
        C = len(prompts)
        prior_scores = self.prior.scores(self._resized(images, self.prior.image_size), list(prompts))  # (N, C)
        prior_evals = self.prior.last_evals
        k = min(self.shortlist, C)
        cond = self.pixel.conditions(list(prompts))
        stages = self.pixel.stages(k)
        num_pairs = sum(n for n, _ in stages)
        row_error, weights, _ = self.pixel.row_error(self._resized(images, self.pixel.image_size), cond, num_pairs)
        scores, pixel_evals, top = cascade_scores(prior_scores, k, stages, weights, row_error, self.pixel.batch_size,
                                                  self.pixel.elimination)
        self.last_pixel_evals, self.last_prior_evals, self.last_shortlist = pixel_evals, prior_evals, top
        self.pixel_ledger.add(C, pixel_evals)
        self.prior_ledger.add(C, prior_evals)
        return scores

    def evals_breakdown(self, num_classes: int) -> dict[str, float]:
        """Evaluations per image for ``num_classes`` classes: {"pixel", "prior", "total" (every
        evaluation counted as one), "cost_weighted" (pixel-evaluation units), "prior_cost"}.

        Measured means over every image scored so far; before any call, the schedules' bounds (the
        pixel stage's full budget on the shortlist)."""
        from genvl.classify.montecarlo import schedule_evals

        k = min(self.shortlist, num_classes)
        pixel = self.pixel_ledger.mean(num_classes)
        if pixel is None:
            pixel = schedule_evals(self.pixel.stages(k), k)
        prior = self.prior_ledger.mean(num_classes)
        if prior is None:
            prior = self.prior.evals_per_image(num_classes)
        return {"pixel": float(pixel), "prior": float(prior), "total": float(pixel + prior),
                "cost_weighted": float(pixel + self.prior_cost * prior), "prior_cost": self.prior_cost}

    def evals_per_image(self, num_classes: int) -> float:
        """Denoiser evaluations per image, pixel and prior each counted as one (see
        :meth:`evals_breakdown` for the split and the cost-weighted total)."""
        return self.evals_breakdown(num_classes)["total"]
