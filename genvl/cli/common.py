"""What every ``genvl`` subcommand shares: the argument parser's classes and value types, one-line
messages, and reading and writing the files commands take and give (images, ``--json`` results)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from genvl.errors import GenvlError


def one_line(text: str) -> str:
    """``text`` with line breaks and other control or invisible characters escaped (``\\n``,
    ``\\u202e``), so that an error naming a file or a value stays one line and shows what it names."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")

    def _get_values(self, action, arg_strings):
        # argparse (before Python 3.13) drops a "--" given as an option's value (--seed=--) and
        # hands the option an empty list instead of an error.
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument")
        return super()._get_values(action, arg_strings)


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Raw descriptions; "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def limited(hi: int, what: str, lo: int = 1):
    """An argparse type: an integer in [lo, hi], ``hi`` a limit of :mod:`genvl.limits` (checked before
    anything is allocated; the message names the limit)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {'a positive integer' if lo == 1 else f'an integer >= {lo}'}, "
                                             f"got {v}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"{v} is above genvl's limit of {hi} {what}; ask for at most {hi}")
        return v

    return parse


def seed_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {v}")
    return v


def fill_sample_defaults(args, recommended: dict) -> None:
    """Sampling options left unset (None) take the model directory's recommended value, else the
    pipelines' defaults (:func:`genvl.pipelines.base.resolve_settings`, as the pipelines resolve them)."""
    from genvl.pipelines.base import resolve_settings

    for key, value in resolve_settings(recommended, vars(args)).items():
        setattr(args, key, value)


# ------------------------------------------------------------------------------------------ files
def load_images(paths: list[str], size: int):
    import torch

    from genvl.data import load_rgb, resize_center_crop, to_tensor

    tensors = []
    for p in paths:
        if not Path(p).is_file():
            raise GenvlError(f"image not found: {p}")
        try:
            img = load_rgb(p)
        except GenvlError as e:
            raise GenvlError(f"{p}: cannot read image ({e})") from None
        tensors.append(to_tensor(resize_center_crop(img, size)))
    return torch.stack(tensors)


def check_json(args) -> None:
    """Fail before any work when ``--json FILE`` exists: results are never overwritten without --overwrite."""
    path = getattr(args, "json", None)
    if path and not getattr(args, "overwrite", False) and os.path.lexists(path):
        raise GenvlError(f"--json {path}: the file exists; genvl does not overwrite results (pass --overwrite to "
                         "replace it, or name another file)")


def write_json(args, result: dict) -> Path:
    """Write ``--json`` whole; a file that appeared meanwhile (another run) is kept, not replaced."""
    from genvl.sampling.io import write_new_file

    data = (json.dumps(result, indent=2) + "\n").encode()
    try:
        return write_new_file(args.json, data, overwrite=getattr(args, "overwrite", False))
    except FileExistsError:
        raise GenvlError(f"--json {args.json}: the file was created by something else while this ran; it is kept "
                         "and these results were not written (pass --overwrite to replace it)") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenvlError(f"{path}: not UTF-8 text (byte {e.start})") from None

