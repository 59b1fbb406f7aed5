"""A tiny random model directory for the UI tests: every component, so every tab and method has work.

clip + prior + decoder (unCLIP, variations, interpolation, clip / prior / diffusion classifiers) and
vqvae + lm (autoregressive generation and classifier) sharing one tokenizer; a model card with
training records and metrics; recommended sampling settings of two steps, so generation is instant.
"""

from __future__ import annotations

import io
from pathlib import Path


from conftest import build_tiny_model as tiny_model
from conftest import draw_shape
from genvl.checkpoint import record_metrics

DEMO_DIR = Path(__file__).resolve().parents[2] / "genvl" / "assets" / "demo"
# What the tests' genvl.json recommends: ``genvl sample`` and the UI both start from these.
SAMPLING = {"steps": 2, "prior_steps": 2, "guidance": 2.0, "prior_guidance": 2.0, "scheduler": "ddim",
            "ar_guidance": 2.0}


def build_tiny_model(path: Path) -> Path:
    """Write the tiny model directory at ``path`` (about a second on a CPU) and return it."""
    training = {"clip": {"data": "data/shapes", "pairs": 32, "steps": 10, "time": "1 s", "hardware": "CPU",
                         "recipe": "max_steps: 10\nlr: 0.001"}}
    tiny_model(path, sampling=SAMPLING, training=training)
    record_metrics(path, "retrieval", {"image_to_text_R@1": 12.5, "text_to_image_R@1": 25.0},
                   {"data": "data/shapes", "n": 32})
    return path


def png(color: str = "red", shape: str = "circle", size: int = 32) -> bytes:
    """A coloured shape on white, as PNG bytes (what a browser uploads)."""
    buf = io.BytesIO()
    draw_shape(color, shape, size).save(buf, format="PNG")
    return buf.getvalue()
