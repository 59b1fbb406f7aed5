"""What every pipeline shares: the settings a call resolves to, and the output it returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

# Sampling settings when neither the caller nor the model directory's genvl.json ("sampling": the
# settings recommended for that model) gives them.
# ``sr_steps``: the super-resolution stage's denoising steps (models without one ignore it); it
# runs with the decoder's ``scheduler``.
SAMPLE_DEFAULTS: dict[str, Any] = {"steps": 50, "prior_steps": 25, "guidance": 3.0, "prior_guidance": 4.0,
                                   "scheduler": "ddim", "prior_candidates": 1, "coarse_start": 1.0, "sr_steps": 25}


def resolve_settings(recommended: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Each of :data:`SAMPLE_DEFAULTS`: the caller's value when given (not None), else the model's
    recommended one, else the default (cast to the default's type, as the command line does)."""
    out = {}
    for key, default in SAMPLE_DEFAULTS.items():
        value = given.get(key)
        out[key] = value if value is not None else type(default)(recommended.get(key, default))
    return out


class Pipeline:
    """What every pipeline holds besides its parts (the subclasses add those).

    Args:
        recommended: the model's recommended sampling settings (``genvl.json`` "sampling").
        name: how outputs name the model (its path).
    """

    def __init__(self, recommended: dict[str, Any] | None = None, name: str = ""):
        self.recommended = dict(recommended or {})
        self.name = name


def open_model(model) -> tuple[Any, str]:
    """(the :class:`~genvl.checkpoint.ModelDir`, the name outputs give it) of a path, ``"demo"`` or an
    opened model directory: the path as given when it is one, else the directory's own."""
    from genvl.checkpoint import ModelDir, open_model_dir

    md = model if isinstance(model, ModelDir) else open_model_dir(model)
    name = str(model) if isinstance(model, (str, Path)) and Path(model).exists() else str(md.path)
    return md, name


def move(modules: Iterable[torch.nn.Module | None], device=None, dtype: torch.dtype | None = None) -> None:
    """Move and / or cast every module that is there (None: left out)."""
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if kwargs:
        for m in modules:
            if m is not None:
                m.to(**kwargs)


@dataclass
class PipelineOutput:
    """What a pipeline call returns.

    Attributes:
        images: RGB PIL images (prompt-major: all of the first prompt's, then the next's).
        tensors: the same images as (N, 3, H, W) in [-1, 1].
        settings: every setting the call used (model, seed, steps, guidance, ...): enough to repeat it.
        image_embeds: (N, D) the CLIP image embeddings the decoder drew from (unCLIP), else None.
    """

    images: list[Image.Image]
    tensors: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    image_embeds: torch.Tensor | None = None

    @property
    def seed(self) -> int | None:
        return self.settings.get("seed")

