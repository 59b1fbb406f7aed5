"""The shared part of every zero-shot classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genvl.errors import GenvlError


@dataclass
class ClassifyResult:
    """Attributes:
    classes: the class names, in column order.
    scores: (N, C) log-scores of the method.
    probs: (N, C) softmax of ``scores / temperature``.
    evals_per_image: model evaluations spent per image.
    """

    classes: list[str]
    scores: torch.Tensor
    probs: torch.Tensor
    evals_per_image: float

    @property
    def predictions(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(-1).tolist()]


def expand_classes(classes: list[str], template: str | None = None) -> list[str]:
    """Check the class list and turn names into prompts with ``template`` ("a photo of a {}")."""
    classes = [c.strip() for c in classes]
    if any(not c for c in classes):
        raise GenvlError("empty class name in --classes")
    if len(classes) < 2:
        raise GenvlError(f"need at least two classes, got {len(classes)}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise GenvlError(f"duplicate class name(s): {', '.join(dupes)}")
    if template is None:
        return list(classes)
    if "{}" not in template:
        raise GenvlError(f"--template must contain {{}} where the class name goes, got {template!r}")
    return [template.replace("{}", c) for c in classes]


def classify(classifier, images: torch.Tensor, classes: list[str], template: str | None = None,
             temperature: float = 1.0) -> ClassifyResult:
    """Score ``images`` (N, 3, H, W) in [-1, 1] against ``classes`` and return probabilities."""
    prompts = expand_classes(classes, template)
    scores = classifier.scores(images, prompts)
    probs = torch.softmax(scores / temperature, dim=-1)
    return ClassifyResult(classes=[c.strip() for c in classes], scores=scores, probs=probs,
                          evals_per_image=classifier.evals_per_image(len(prompts)))
