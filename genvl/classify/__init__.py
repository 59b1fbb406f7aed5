"""Zero-shot classification: one scoring interface over several methods.

``scores(images, class_prompts) -> (N, C)`` log-scores; :func:`classify` turns them into
probabilities with a per-method softmax temperature (:data:`DEFAULT_TEMPERATURES`,
:func:`fit_temperature`). Methods: the CLIP baseline, the pixel decoder's denoising error
(:class:`DiffusionClassifier`), the prior's denoising error in CLIP space (:class:`PriorClassifier`),
the token LM's likelihood of the image's codes (:class:`ARClassifier`), and the cascade of the
prior and pixel classifiers (:class:`CascadeClassifier`: the prior shortlists, the pixel decoder decides).
"""

from genvl.classify.ar import ARClassifier
from genvl.classify.base import (
    DEFAULT_TEMPERATURES,
    ClassifyResult,
    Scorer,
    classify,
    cross_fit_temperature,
    expand_classes,
    expected_calibration_error,
    fit_temperature,
    zero_shot_metrics,
)
from genvl.classify.cascade import CASCADE_DEFAULTS, PRIOR_PIXEL_COST, CascadeClassifier, cascade_scores
from genvl.classify.clip import CLIPClassifier
from genvl.classify.diffusion import ClassConditions, DiffusionClassifier, PriorConditioner, timestep_weights
from genvl.classify.load import METHODS, REQUIRES, load_classifier, supported_methods
from genvl.classify.montecarlo import (
    Confidence,
    adaptive_scores,
    parse_adaptive,
    parse_schedule,
    schedule_evals,
    shared_pairs,
)
from genvl.classify.prior import PriorClassifier

__all__ = [
    "ARClassifier", "CASCADE_DEFAULTS", "CLIPClassifier", "CascadeClassifier", "PRIOR_PIXEL_COST", "ClassConditions", "Confidence", "ClassifyResult", "DEFAULT_TEMPERATURES",
    "DiffusionClassifier", "METHODS", "PriorClassifier", "PriorConditioner", "REQUIRES", "Scorer",
    "adaptive_scores", "cascade_scores", "classify", "cross_fit_temperature", "expand_classes", "expected_calibration_error",
    "fit_temperature", "load_classifier", "parse_adaptive", "parse_schedule", "schedule_evals", "shared_pairs",
    "supported_methods", "timestep_weights", "zero_shot_metrics",
]
