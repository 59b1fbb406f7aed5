"""The ``genvl`` command line: a thin layer over the library's pipelines and functions.

Every subcommand: exit status 0 on success, 2 on bad input with one line on stderr. One module
per command group (:mod:`~genvl.cli.sample`, :mod:`~genvl.cli.train`, :mod:`~genvl.cli.classify`,
:mod:`~genvl.cli.evaluate`, :mod:`~genvl.cli.data`, :mod:`~genvl.cli.info`) holds the commands and
their arguments; :mod:`~genvl.cli.common` what they share; :mod:`genvl.runtime` what the command
line shares with the UI (model directories, devices, default settings).
"""

from __future__ import annotations

import argparse
import os
import sys

from genvl import __version__
from genvl.cli import classify, data, evaluate, export, info, sample, train
from genvl.cli.common import Formatter, Parser, check_json, one_line
from genvl.cli.train import parse_budget
from genvl.errors import GenvlError

__all__ = ["build_parser", "main", "main_entry", "parse_budget"]


def build_parser() -> argparse.ArgumentParser:
    """The ``genvl`` argument parser with every subcommand (each sets ``func``, the command to run)."""
    p = Parser(prog="genvl", description="Generative vision-language models: train, sample, classify, evaluate.",
               formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"genvl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    sample.add_sample_parser(sub)
    train.add_parsers(sub)
    sample.add_caption_parser(sub)
    classify.add_parsers(sub)
    evaluate.add_parsers(sub)
    data.add_parsers(sub)
    export.add_parsers(sub)
    info.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``genvl`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        check_json(args)
        return int(args.func(args) or 0)
    except GenvlError as e:
        print(f"genvl {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genvl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if isinstance(e, OSError) and e.filename is not None:  # a path that cannot be read or written
            print(f"genvl {args.command}: error: {one_line(f'{e.filename}: {e.strerror or e}')}", file=sys.stderr)
            return 2
        if os.environ.get("GENVL_DEBUG"):
            raise
        msg = one_line(str(e).splitlines()[0]) if str(e).strip() else ""
        print(f"genvl {args.command}: internal error: {type(e).__name__}: {msg} (set GENVL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
