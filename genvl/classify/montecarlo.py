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

Confidence elimination (:class:`Confidence`, ``--schedule confidence[:Z]``) replaces the fixed keep
counts by racing: after each stage a class leaves an image's race when its paired difference to the
leader is more than Z standard errors above zero, and an image stops as soon as one class is left,
so easy images cost a few pairs and hard ones the whole schedule. :func:`full_table` and
:func:`table_row_error` compute every (image, class, pair) error once and replay any schedule or
rule on it exactly, which is how the benchmark compares them on the same images and pairs.

Timesteps come from a shifted van der Corput sequence in [t_min, t_max): every prefix of it (the
pairs used by the first stages) is spread evenly over the schedule, unlike i.i.d. draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from genvl.errors import GenvlError
from genvl.limits import MAX_CLASSES, MAX_SAMPLES

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


#: Stage sizes of the "confidence" adaptive mode: pairs added per round, so the bounds are checked
#: after 2, 3, 4, 5, 6, 8, 10 and 12 pairs; at most 16 pairs per class. Small rounds stop each image
#: soon after its race is decided; rows of all images of a call still share each forward.
CONFIDENCE_STAGES: tuple[int, ...] = (2, 1, 1, 1, 1, 2, 2, 2, 4)


def parse_adaptive(text: str) -> tuple[Schedule, "Elimination"]:
    """An adaptive mode: ``"samples:keep,..."`` (top-k successive elimination, :func:`parse_schedule`)
    or ``"confidence[:Z[:N1,N2,...]]"`` (:class:`Confidence` racing with bound width Z, default
    2, over rounds of N1, N2, ... new pairs, default :data:`CONFIDENCE_STAGES`).

    Returns:
        (schedule, elimination rule).
    """
    head, _, rest = text.strip().partition(":")
    if head.strip().lower() != "confidence":
        return parse_schedule(text), "top-k"
    z_text, _, stages_text = rest.partition(":")
    try:
        z = float(z_text) if z_text.strip() else 2.0
        stages = [int(v) for v in stages_text.split(",")] if stages_text.strip() else list(CONFIDENCE_STAGES)
    except ValueError:
        raise GenvlError(f"bad adaptive schedule {text!r}: expected confidence, confidence:Z or "
                         "confidence:Z:N1,N2,... (e.g. confidence:2:2,2,4,8)") from None
    rule = Confidence(z=z)
    return check_schedule([(n, MAX_CLASSES) for n in stages]), rule


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
def full_table(num_images: int, num_classes: int, num_pairs: int, row_error: RowError, batch_size: int
               ) -> torch.Tensor:
    """(N, C, K) float64 errors of every (image, class, pair), ``row_error`` called on at most
    ``batch_size`` rows at a time (image-major, then class, then pair)."""
    N, C, K = num_images, num_classes, num_pairs
    rn = torch.arange(N).repeat_interleave(C * K)
    rc = torch.arange(C).repeat_interleave(K).repeat(N)
    rk = torch.arange(K).repeat(N * C)
    out = torch.empty(N * C * K, dtype=torch.float64)
    for i in range(0, out.numel(), batch_size):
        sl = slice(i, i + batch_size)
        out[sl] = row_error(rn[sl], rc[sl], rk[sl]).double().cpu()
    return out.view(N, C, K)


def table_row_error(table: torch.Tensor) -> RowError:
    """A row error that looks rows up in an (N, C, K) table of :func:`full_table` instead of running a
    model: replays any schedule or elimination rule exactly, at no model cost."""
    return lambda n, c, k: table[n.cpu(), c.cpu(), k.cpu()]


@dataclass(frozen=True)
class Confidence:
    """Confidence-bound elimination ("racing"): a class leaves an image's race when its paired
    difference to the leader is significantly positive.

    After each stage, for every image with two or more classes alive, all of them evaluated on the
    same m pairs: the leader L is the alive class of lowest weighted mean error; for each other alive
    class c the paired differences ``u_k = w_k (err_c,k - err_L,k)`` (k < m) estimate the score gap
    ``D_c = mean(u) / mean(w)`` with standard error ``se_c = sd / (sqrt(m) mean(w))``. Class c is
    eliminated when ``D_c > z * se_c``: its lower bound on the gap lies above zero, i.e. its upper
    score bound is below the leader's. An image whose race is down to one class spends no more
    evaluations.

    The standard deviation: ``variance="pooled"`` (default) uses one per image, the mean over its
    non-leader alive classes of their unbiased sample variances of u. With few pairs a single
    class's variance estimate is itself very noisy (one degree of freedom at m = 2) and a small draw
    would eliminate the class on luck; the pooled one has (C' - 1)(m - 1) degrees of freedom, and as
    far-off classes have the widest differences it errs on the side of keeping the close ones,
    which are the ones a wrong elimination would cost. ``variance="own"`` is the textbook per-class
    paired test.
    The schedule's ``keep`` values still cap the survivors after each stage (top ``keep`` by mean),
    so a schedule with keep >= C is pure racing and its evaluations are at most those of the
    naive estimator with the schedule's total pairs.

    Attributes:
        z: the bound's width in standard errors (larger: fewer wrong eliminations, more evaluations).
        min_pairs: pairs evaluated before any class may be eliminated (>= 2: a standard deviation
            needs two).
        variance: "pooled" (one per image) or "own" (per class).
    """

    z: float = 2.0
    min_pairs: int = 2
    variance: str = "pooled"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise GenvlError(f"confidence elimination needs a finite z > 0, got {self.z}")
        if int(self.min_pairs) != self.min_pairs or self.min_pairs < 2:
            raise GenvlError(f"confidence elimination needs min_pairs >= 2 (an integer), got {self.min_pairs}")
        if self.variance not in ("pooled", "own"):
            raise GenvlError(f"confidence elimination: variance must be pooled or own, got {self.variance!r}")


Elimination = Union[str, Confidence]
ELIMINATIONS = ("top-k", "confidence")


def check_elimination(rule: Elimination | None) -> Elimination:
    """``None`` or "top-k" -> "top-k"; "confidence" -> :class:`Confidence` (); a Confidence as is."""
    if rule is None or rule == "top-k":
        return "top-k"
    if rule == "confidence":
        return Confidence()
    if isinstance(rule, Confidence):
        return rule
    raise GenvlError(f"unknown elimination rule {rule!r}; choose {', '.join(ELIMINATIONS)}")


def confidence_survivors(errs: torch.Tensor, alive: torch.Tensor, weights: torch.Tensor, rule: Confidence
                         ) -> torch.Tensor:
    """One elimination step of :class:`Confidence`.

    Args:
        errs: (N, C, m) errors of the first m pairs (any value where a class is not alive).
        alive: (N, C) bool; every alive class of an image has all m pairs evaluated.
        weights: (m,) float64 pair weights.
        rule: the z and min_pairs.

    Returns:
        (N, C) bool, the classes still alive (a subset of ``alive``; never empty where ``alive``
        is not).
    """
    m = errs.shape[-1]
    if m < rule.min_pairs:
        return alive
    w = weights.double()
    wbar = float(w.mean())
    if wbar <= 0:
        return alive
    u = errs.double() * w  # (N, C, m)
    mean = u.mean(-1) / wbar  # (N, C) weighted mean error
    leader = torch.where(alive, mean, torch.tensor(float("inf"), dtype=torch.float64)).argmin(1)  # (N,)
    d = u - u.gather(1, leader.view(-1, 1, 1).expand(-1, 1, m))  # (N, C, m) paired differences
    gap = d.mean(-1) / wbar  # (N, C) >= 0 on alive classes
    var = d.var(-1, unbiased=True)  # (N, C)
    if rule.variance == "pooled":
        others = alive.clone()
        others[torch.arange(alive.shape[0]), leader] = False
        var = ((var * others).sum(1, keepdim=True) / others.sum(1, keepdim=True).clamp_min(1)).expand_as(var)
    se = var.sqrt() / (math.sqrt(m) * wbar)  # (N, C)
    out = alive & ~(gap > rule.z * se)
    out[torch.arange(alive.shape[0]), leader] = alive[torch.arange(alive.shape[0]), leader]
    return out


class EvalLedger:
    """Evaluations spent per image, summed over every scoring call, per number of classes.

    Under top-k elimination every image costs the same (:func:`schedule_evals`); under a
    :class:`Confidence` rule each image stops when its race is decided, so the cost is measured:
    ``evals_per_image`` reports the mean over all images scored so far with that many classes.
    """

    def __init__(self) -> None:
        self._spent: dict[int, tuple[int, int]] = {}  # classes -> (images, rows)

    def add(self, num_classes: int, evals: torch.Tensor) -> None:
        images, rows = self._spent.get(num_classes, (0, 0))
        self._spent[num_classes] = (images + int(evals.numel()), rows + int(evals.sum()))

    def mean(self, num_classes: int) -> float | None:
        """Mean rows per image over the images scored with ``num_classes`` classes, or None."""
        images, rows = self._spent.get(num_classes, (0, 0))
        return rows / images if images else None


def evals_per_image(stages: Schedule, num_classes: int, rule: Elimination, ledger: EvalLedger) -> float:
    """Top-k: the schedule's exact cost. Confidence: the measured mean so far (the schedule's cost,
    an upper bound, before any image was scored)."""
    bound = schedule_evals(stages, num_classes)
    if not isinstance(rule, Confidence):
        return bound
    spent = ledger.mean(num_classes)
    return bound if spent is None else spent


@torch.no_grad()
def adaptive_scores(num_images: int, num_classes: int, schedule: Schedule, weights: torch.Tensor,
                    row_error: RowError, batch_size: int, elimination: Elimination | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the (adaptive) estimator.

    Args:
        num_images: N.
        num_classes: C.
        schedule: [(samples, keep), ...]; pair k of stage s is ``sum(samples[:s]) + i``.
        weights: (K,) per-pair weights w(t_k), K = total samples of the schedule.
        row_error: (n_idx (R,), c_idx (R,), k_idx (R,)) long -> (R,) float errors; one model
            forward of R rows, R <= batch_size.
        batch_size: rows per forward.
        elimination: "top-k" (default: after stage s keep the ``keep_s`` best classes) or a
            :class:`Confidence` rule (eliminate on a confidence bound, ``keep_s`` as a cap; images
            with one class left stop).

    Returns:
        scores (N, C) float32: -weighted mean error; classes eliminated early are capped just below
        the image's lowest surviving class, so the argmax is always a final-stage survivor.
        evals (N,) rows evaluated per image.
    """
    rule = check_elimination(elimination)
    N, C = num_images, num_classes
    K = sum(n for n, _ in schedule)
    err_sum = torch.zeros(N, C, dtype=torch.float64)
    w_sum = torch.zeros(N, C, dtype=torch.float64)
    alive = torch.ones(N, C, dtype=torch.bool)
    evals = torch.zeros(N, dtype=torch.long)
    racing = isinstance(rule, Confidence)
    table = torch.zeros(N, C, K, dtype=torch.float64) if racing else None  # per-pair errors for the bounds
    start = 0
    for stage, (n_samples, keep) in enumerate(schedule):
        ks = torch.arange(start, start + n_samples)
        running = alive if not racing else alive & (alive.sum(1, keepdim=True) > 1)
        n_idx, c_idx = running.nonzero(as_tuple=True)  # (P,) (image, class) pairs to evaluate
        P = n_idx.numel()
        # rows: every running (image, class) x every pair of this stage, (image, class)-major.
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
        if racing:
            table[rn, rc, rk] = errs
        if stage == len(schedule) - 1:
            break
        if racing:
            # only images still racing are updated: the others' single class has no new pairs
            alive = torch.where(running.any(1, keepdim=True),
                                confidence_survivors(table[:, :, :start], alive, weights[:start], rule), alive)
        if keep < C:
            mean = torch.where(alive, -err_sum / w_sum.clamp_min(1e-300), torch.tensor(-float("inf"), dtype=torch.float64))
            top = mean.topk(min(keep, C), dim=1).indices  # (N, keep)
            alive = alive & torch.zeros_like(alive).scatter_(1, top, True)
    scores = -err_sum / w_sum.clamp_min(1e-300)  # (N, C)
    # An eliminated class keeps its partial estimate, but never above a survivor.
    floor = torch.where(alive, scores, torch.tensor(float("inf"), dtype=torch.float64)).min(dim=1, keepdim=True).values
    capped = torch.minimum(scores, floor - 1e-6 * (1 + floor.abs()))
    scores = torch.where(alive, scores, capped)
    return scores.float(), evals
