"""Zero-shot classification: one scoring interface over several methods.

``scores(images, class_prompts) -> (N, C)`` log-scores; :func:`classify` turns them into
probabilities. The CLIP baseline is here; the generative methods (diffusion, prior, AR) use the
same interface.
"""

from genvl.classify.base import ClassifyResult, classify, expand_classes
from genvl.classify.clip import CLIPClassifier

__all__ = ["CLIPClassifier", "ClassifyResult", "classify", "expand_classes"]
