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
import time
from collections.abc import Callable

from genvl import __version__
from genvl.cli import classify, data, evaluate, export, info, sample, train
from genvl.cli.common import Formatter, Parser, check_json, one_line
from genvl.cli.train import parse_budget
from genvl.errors import GenvlError

__all__ = ["build_parser", "main", "main_entry", "others_running", "parse_budget", "passive_omp_waits"]


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


def others_running(path: str = "/proc/loadavg", looks: int = 5, interval_s: float = 0.002) -> bool:
    """Whether other tasks want a CPU right now: the runnable-task count of ``/proc/loadavg``
    (which counts this process too) above 1 in most of a few quick looks. False where the file
    cannot be read (not Linux).

    An instant count, not the 1-minute load average: that one still holds a ``genvl`` run that has
    just ended, and would call an idle machine busy between two commands.
    """
    counts = []
    try:
        for i in range(looks):
            with open(path) as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
            if i + 1 < looks:
                time.sleep(interval_s)
    except (OSError, ValueError, IndexError):
        return False
    return sorted(counts)[len(counts) // 2] > 1


def passive_omp_waits(environ=os.environ, modules=sys.modules, busy: Callable[[], bool] = others_running) -> bool:
    """Let idle OpenMP worker threads sleep instead of spinning when other work shares the CPUs.

    torch's CPU kernels run in OpenMP parallel regions, one thread per core; between two regions
    libgomp's workers spin. On an idle machine that is the fastest. When other tasks are
    runnable (other programs, tests, a second job), the spinning threads take the time slices the
    working ones need and torch runs several times slower: the demo's decoder step on a 2-core
    machine shared with two other 2-thread torch processes took ~1.6 s with spinning workers and
    ~0.26 s with sleeping ones (OMP_WAIT_POLICY=PASSIVE), against ~0.07 s (spinning) and ~0.11 s
    (sleeping) with the machine to itself. So the command line asks for sleeping workers when
    ``busy()`` says other tasks are runnable at start, and leaves libgomp's default otherwise
    (benchmarks/cpu_sampling.py times whole ``genvl sample`` runs both ways).

    libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so this sets it only while torch
    is not imported yet (the ``genvl`` command, before its first subcommand import); a policy the
    environment already names is kept. Returns whether it set the variable.
    """
    if "torch" in modules or "OMP_WAIT_POLICY" in environ or not busy():
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def main(argv: list[str] | None = None) -> int:
    """Run ``genvl`` with ``argv`` (default: the process's arguments); returns the exit status."""
    passive_omp_waits()
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
