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
"""

from genvl.pipelines.ar import ARPipeline
from genvl.pipelines.base import SAMPLE_DEFAULTS, PipelineOutput
from genvl.pipelines.interleaved import InterleavedOutput, InterleavedPipeline
from genvl.pipelines.unclip import UnclipPipeline

__all__ = ["SAMPLE_DEFAULTS", "ARPipeline", "InterleavedOutput", "InterleavedPipeline", "PipelineOutput",
           "UnclipPipeline"]
