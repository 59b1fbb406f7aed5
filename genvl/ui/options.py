"""The settings the page offers: each one's label, type and allowed range, and the checks of a
whole set of them (bad values raise :class:`~genvl.errors.GenvlError` with a one-line message)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from genvl.errors import GenvlError
from genvl.limits import MAX_FRAMES, MAX_IMAGES, MAX_SEED, MAX_STEPS


@dataclass(frozen=True)
class Option:
    """One sampling setting: its label, type and allowed range (checked by :func:`check_settings`).

    Attributes:
        label: what the page calls it (also used in error messages).
        kind: "int", "float", "choice" or "bool".
        lo, hi: inclusive bounds (None = unbounded); ``lo_open`` makes ``lo`` exclusive.
        choices: the values of a "choice".
        step: the increment of the page's number box.
        help: a tooltip.
    """

    label: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    step: float = 1
    help: str = ""


OPTIONS: dict[str, Option] = {
    "num_images": Option("Images", "int", 1, MAX_IMAGES, help="how many images to generate"),
    "steps": Option("Steps", "int", 1, MAX_STEPS, help="decoder diffusion steps"),
    "prior_steps": Option("Prior steps", "int", 1, MAX_STEPS, help="prior diffusion steps"),
    "guidance": Option("Guidance", "float", 0.0, None, step=0.5, help="classifier-free guidance scale (1 = none)"),
    "prior_guidance": Option("Prior guidance", "float", 0.0, None, step=0.5,
                             help="the prior's guidance scale (1 = none)"),
    "scheduler": Option("Scheduler", "choice", choices=("ddim", "ddpm", "dpm++"), help="diffusion sampler"),
    "temperature": Option("Temperature", "float", 0.0, None, step=0.1, help="sampling temperature (0 = greedy)"),
    "top_k": Option("Top-k", "int", 0, None, help="sample among the k likeliest codes (0 = all)"),
    "top_p": Option("Top-p", "float", 0.0, 1.0, lo_open=True, step=0.05, help="nucleus sampling mass (1 = off)"),
    "frames": Option("Frames", "int", 2, MAX_FRAMES, help="frames of the animation"),
    "invert": Option("Start from the image's inverted noise", "bool",
                     help="DDIM inversion: the variations keep the layout of the image"),
    "seed": Option("Seed", "int", 0, MAX_SEED, help="the same seed gives the same images"),
}


def _fmt_bound(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def check_settings(settings: dict[str, Any], names: Sequence[str]) -> None:
    """Raise a one-line GenvlError for the first setting in ``names`` outside its allowed range."""
    for name in names:
        opt = OPTIONS[name]
        v = settings.get(name)
        if opt.kind == "choice":
            if v not in opt.choices:
                raise GenvlError(f"{opt.label}: choose one of {', '.join(opt.choices)}, got {v!r}")
            continue
        if opt.kind == "bool":
            continue
        is_int = isinstance(v, int) and not isinstance(v, bool)
        ok_type = is_int if opt.kind == "int" else isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok_type or not math.isfinite(v):
            raise GenvlError(f"{opt.label} must be {'a whole' if opt.kind == 'int' else 'a'} number, got {v!r}")
        too_low = opt.lo is not None and (v <= opt.lo if opt.lo_open else v < opt.lo)
        too_high = opt.hi is not None and v > opt.hi
        if too_low or too_high:
            if opt.lo is not None and opt.hi is not None:
                left = "(" if opt.lo_open else "["
                rng = f"in {left}{_fmt_bound(opt.lo)}, {_fmt_bound(opt.hi)}]" if opt.lo_open else \
                    f"between {_fmt_bound(opt.lo)} and {_fmt_bound(opt.hi)}"
            elif opt.lo is not None:
                rng = f"{'>' if opt.lo_open else '>='} {_fmt_bound(opt.lo)}"
            else:
                rng = f"<= {_fmt_bound(opt.hi)}"
            raise GenvlError(f"{opt.label} must be {rng}, got {_fmt_bound(v)}")


def check_prompt(text: str | None, what: str = "prompt") -> str:
    """The stripped prompt, or a one-line error for an empty one."""
    if text is None or not text.strip():
        raise GenvlError(f"empty {what}: type a text description, e.g. \"a red heart\"")
    return text.strip()
