"""The shared part of every zero-shot classifier: the result type, class-list checks, softmax
temperatures and their calibration, and the zero-shot metrics.

Every method is an object with ``scores(images, prompts) -> (N, C)`` log-scores and
``evals_per_image(num_classes) -> float`` (model evaluations spent per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from genvl.errors import GenvlError
from genvl.tokenizers.text import check_text

# Default softmax temperature per method (``probs = softmax(scores / T)``). Every score is (a bound
# on) a log-likelihood in nats, or a trained logit, so T = 1 is the Bayes choice for an exact model:
# - clip: the trained logits (logit_scale * cosine), T = 1 is what the contrastive loss fits.
# - ar: the exact log p(codes | prompt) summed over the image's codes; T = 1.
# - diffusion: -E_{t,eps} ||eps - eps_theta||^2 summed over pixels, i.e. twice the simple diffusion
#   ELBO term (Ho et al. 2020, Li et al. 2023); a class difference of 1e-3 per pixel is ~3 nats at
#   32 px, so T = 2 (the ELBO's 1/2) keeps probabilities decisive without being one-hot.
# - prior: -E ||x0 - x0_theta||^2 summed over the D normalised embedding dims; T = 2 likewise.
# - cascade: the pixel diffusion scores on the prior's shortlist; T = 2 as for diffusion.
# These give non-uniform probabilities on the tiny test models (tests/classify); fit the
# temperature of a trained model on held-out labelled images with :func:`fit_temperature`
# (``genvl evaluate zero-shot`` reports it and the calibrated ECE).
DEFAULT_TEMPERATURES: dict[str, float] = {"clip": 1.0, "ar": 1.0, "diffusion": 2.0, "prior": 2.0, "cascade": 2.0}


class Scorer(Protocol):
    """The scoring interface every method implements."""

    image_size: int

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], C prompts -> (N, C) float log-scores (higher = likelier)."""

    def evals_per_image(self, num_classes: int) -> float:
        """Model evaluations (forward rows) spent per image for ``num_classes`` classes."""


@dataclass
class ClassifyResult:
    """Attributes:
    classes: the class names, in column order.
    scores: (N, C) log-scores of the method.
    probs: (N, C) softmax of ``scores / temperature``.
    evals_per_image: model evaluations spent per image.
    temperature: the softmax temperature used.
    """

    classes: list[str]
    scores: torch.Tensor
    probs: torch.Tensor
    evals_per_image: float
    temperature: float = 1.0

    @property
    def predictions(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(-1).tolist()]


def expand_classes(classes: list[str], template: str | None = None) -> list[str]:
    """Check the class list and turn names into prompts with ``template`` ("a photo of a {}")."""
    classes = [c.strip() for c in classes]
    if any(not c for c in classes):
        raise GenvlError("empty class name in --classes")
    for c in classes:
        check_text(c, "class name")
    if len(classes) < 2:
        raise GenvlError(f"need at least two classes, got {len(classes)}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise GenvlError(f"duplicate class name(s): {', '.join(dupes)}")
    if template is None:
        return list(classes)
    if "{}" not in template:
        raise GenvlError(f"--template must contain {{}} where the class name goes, got {template!r}")
    check_text(template, "--template")
    return [template.replace("{}", c) for c in classes]


def check_temperature(temperature: float) -> float:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise GenvlError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def classify(classifier, images: torch.Tensor, classes: list[str], template: str | None = None,
             temperature: float = 1.0) -> ClassifyResult:
    """Score ``images`` (N, 3, H, W) in [-1, 1] against ``classes`` and return probabilities."""
    temperature = check_temperature(temperature)
    prompts = expand_classes(classes, template)
    scores = classifier.scores(images, prompts)
    probs = torch.softmax(scores.double() / temperature, dim=-1).float()
    return ClassifyResult(classes=[c.strip() for c in classes], scores=scores, probs=probs,
                          evals_per_image=classifier.evals_per_image(len(prompts)), temperature=temperature)


# ----------------------------------------------------------------------------------- calibration
def _nll(scores: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(beta * scores)."""
    logp = torch.log_softmax(scores * beta, dim=-1)  # (N, C)
    return float(-logp.gather(1, labels[:, None]).mean())


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor, lo: float = 1e-3, hi: float = 1e3,
                    iters: int = 80) -> float:
    """The softmax temperature minimising the NLL of held-out labelled images.

    The NLL is convex in the inverse temperature beta = 1/T (log-sum-exp is convex, the label term
    linear), hence unimodal in log beta: a golden-section search over log T in [log lo, log hi].

    Args:
        scores: (N, C) log-scores of one method.
        labels: (N,) long true class indices.
        lo, hi: the search range of T.
        iters: golden-section steps (80 narrow the range by ~1e-17).

    Returns:
        T > 0.
    """
    scores = scores.double()
    labels = labels.long()
    if scores.ndim != 2 or labels.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"fit_temperature: scores (N, C) and labels (N,), got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    scores = scores - scores.max(dim=1, keepdim=True).values  # shift per row: same softmax, no overflow
    f = lambda log_t: _nll(scores, labels, math.exp(-log_t))  # noqa: E731
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - confidence| * bin fraction.

    Args:
        probs: (N, C) class probabilities.
        labels: (N,) long true classes.
        bins: equal-width bins of the top-class confidence over [0, 1].
    """
    conf, pred = probs.float().max(dim=1)  # (N,), (N,)
    correct = (pred == labels.to(pred.device)).float()
    idx = (conf * bins).long().clamp(max=bins - 1)  # (N,) bin of each image
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.float().mean()) * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return ece


def zero_shot_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: list[str],
                      temperature: float) -> dict:
    """Accuracy, per-class accuracy, confusion matrix, NLL and ECE of one method's scores.

    Args:
        scores: (N, C) log-scores.
        labels: (N,) long true classes.
        classes: the C class names.
        temperature: softmax temperature for the probabilities.

    Returns:
        dict: accuracy, per_class_accuracy {name: acc or None}, confusion [[count]] (rows = true,
        columns = predicted), nll, ece.
    """
    labels = labels.long()
    probs = torch.softmax(scores.double() / temperature, dim=-1).float()
    pred = probs.argmax(-1)
    C = len(classes)
    conf = torch.zeros(C, C, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for i, name in enumerate(classes):
        n = int(conf[i].sum())
        per_class[name] = float(conf[i, i]) / n if n else None
    return {
        "accuracy": float((pred == labels).float().mean()),
        "per_class_accuracy": per_class,
        "confusion": conf.tolist(),
        "nll": _nll(scores.double(), labels, 1.0 / temperature),
        "ece": expected_calibration_error(probs, labels),
    }


def cross_fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Two-fold calibration on one labelled set: fit T on each half, ECE on the other half.

    Returns:
        (T fitted on all images, mean held-out ECE of the two folds).
    """
    n = scores.shape[0]
    idx = torch.arange(n)
    folds = [idx[idx % 2 == 0], idx[idx % 2 == 1]]
    eces = []
    for fit, held in (folds, folds[::-1]):
        if len(fit) == 0 or len(held) == 0:
            continue
        t = fit_temperature(scores[fit], labels[fit])
        eces.append(expected_calibration_error(torch.softmax(scores[held].double() / t, -1), labels[held]))
    t_all = fit_temperature(scores, labels)
    return t_all, (sum(eces) / len(eces) if eces else float("nan"))
