"""Pipelines: a model directory and its recommended sampling settings behind one call.

One pipeline per method: :class:`UnclipPipeline` (text -> prior -> decoder, variations,
interpolation), :class:`ARPipeline` (text <-> VQ-VAE codes with one token LM) and
:class:`InterleavedPipeline` (documents of text and images).

    from genvl.pipelines import UnclipPipeline

    pipe = UnclipPipeline.from_pretrained("demo")          # or a model directory
    out = pipe("a red heart", num_images=4, seed=0)
    out.images[0].save("heart.png")                         # PIL images; out.settings: what was used

``genvl sample`` and the UI are thin layers over these objects, so a Python caller with the
defaults gets the very images the command line gives for the same seed.

Each name is imported from its module on first use, so ``genvl sample`` (unCLIP) does not load the
token-LM modules of the other two methods.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genvl.pipelines.ar import ARPipeline
    from genvl.pipelines.base import SAMPLE_DEFAULTS, PipelineOutput
    from genvl.pipelines.interleaved import InterleavedOutput, InterleavedPipeline
    from genvl.pipelines.unclip import UnclipPipeline

#: Where each public name lives.
_MODULES = {"ARPipeline": "ar", "SAMPLE_DEFAULTS": "base", "PipelineOutput": "base", "InterleavedOutput": "interleaved",
            "InterleavedPipeline": "interleaved", "UnclipPipeline": "unclip"}

__all__ = ["SAMPLE_DEFAULTS", "ARPipeline", "InterleavedOutput", "InterleavedPipeline", "PipelineOutput",
           "UnclipPipeline"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and keep the name here."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
