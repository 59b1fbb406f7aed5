"""What the command line and the UI share outside their own parsing: which model directory a run
opens (the built-in demo when none is named), where it runs, and the settings a front end starts
from when the user gives none.

The sampling settings a model recommends (steps, guidance, scheduler, ...) are the pipelines'
business (:meth:`genvl.pipelines.UnclipPipeline.settings`); the defaults here are the ones that are
not the model's to recommend: how many images, which seed, the token sampler's temperature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genvl.errors import GenvlError

#: The built-in demo model directory (absent from an install that does not ship it).
DEMO_DIR = Path(__file__).parent / "assets" / "demo"

#: Starting values of ``genvl sample`` and the UI's generation boxes, beside the model's recommended settings.
SAMPLE_OPTION_DEFAULTS: dict[str, Any] = {"num_images": 4, "seed": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                          "frames": 8, "invert": False}

#: Starting values of ``genvl classify`` and the UI's Classify tab (samples None: the method's own default).
CLASSIFY_DEFAULTS: dict[str, Any] = {"method": "clip", "samples": None, "seed": 0, "template": None}

#: The cascade's defaults (``genvl classify --method cascade``): the prior's pairs per class K_p,
#: the shortlist size k and the pixel stage's adaptive mode, chosen on the selection half of the
#: emoji benchmark (benchmarks/zero_shot.py, ``cascade_split`` in
#: benchmarks/results/zero_shot_emoji10.json): the fewest evaluations among the (K_p, k, z) settings
#: at least as accurate as the pixel naive reference of that half, counted either way.
CASCADE_DEFAULTS: dict[str, Any] = {"prior_samples": 1, "shortlist": 2, "schedule": "confidence:1"}


def has_demo() -> bool:
    """Whether this install ships the built-in demo model."""
    return (DEMO_DIR / "genvl.json").is_file()


def open_model(path: str | None, purpose: str):
    """The model directory at ``path`` (``"demo"`` or None: the built-in demo), opened and checked.

    Args:
        path: a model directory, ``"demo"``, or None.
        purpose: what needs the model, named in the error when there is none (e.g. "sampling").

    Returns:
        a :class:`~genvl.checkpoint.ModelDir`.
    """
    from genvl.checkpoint import open_model_dir

    if path is None:
        if not has_demo():
            raise GenvlError(
                f"no --model given and this install has no built-in demo model yet; {purpose} needs a model "
                "directory (train one: genvl train clip --data FOLDER --out DIR)"
            )
        path = str(DEMO_DIR)
    return open_model_dir(path)


def choose_device(text: str = "auto") -> str:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda[:N]`` or ``mps``, checked."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise GenvlError(f"--device {text}: no CUDA device is available (use --device cpu)")
    if text not in ("cpu", "mps") and not text.startswith("cuda"):
        raise GenvlError(f"--device must be auto, cpu, cuda[:N] or mps, got {text!r}")
    return text


def classify_temperature(md, method: str, given: float | None = None) -> float:
    """The softmax temperature of a zero-shot ``method``: ``given`` (checked), else the model
    directory's fitted one (``genvl.json`` "classify"), else the method's default."""
    from genvl.classify import DEFAULT_TEMPERATURES
    from genvl.classify.base import check_temperature

    if given is not None:
        return check_temperature(given)
    fitted = md.meta.get("classify", {}).get("temperature", {})
    return float(fitted.get(method, DEFAULT_TEMPERATURES[method]))
