"""Collect the goals of every benchmarks/results/*.json into one table in benchmarks/README.md.

Every results file written by the scripts here has top-level ``benchmark``, ``device`` (its name),
``torch``, ``config`` and ``goals`` (a list of ``{name, measured, unit, goal, status, note}``, status
"met" | "missed" | "not measured here") next to its detailed rows. This script lists how to run
each script (from the usage lines of its docstring) and writes one table of every goal. Files
without goals get one row saying so (with their ``summary``, if any); files that are not JSON
objects are listed as unreadable; the index of a ``gpu_all.py`` run (``summary.json``, benchmark
"gpu_all") is not a result and is left out. Sections of the existing README other than "Scripts"
and "Goals" are hand-written: they are kept as they are, between those two.

    python benchmarks/make_table.py                     # writes benchmarks/README.md
    python benchmarks/make_table.py --out /tmp/table.md
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent

INTRO = """\
# Benchmarks

Scripts that measure genvl's own path against its baseline in the same run, print a table, and
write JSON to `benchmarks/results/` (device name, torch version, arguments, a `goals` list and
the detailed rows). This page is generated from those files: `python benchmarks/make_table.py`.

Devices: every script picks CUDA when it is available and otherwise runs on the CPU with one
thread and small sizes (`--threads N` for more); `--device cpu` forces the CPU. The GPU defaults
are the sizes the goals are stated for; CPU runs check that the scripts work and give CPU
figures, and goals that only a GPU can show (CUDA graphs, launch-bound small batches) are marked
"not measured here" or explain in their note why the CPU figure misses.
"""


def _docstring(path: Path) -> str:
    try:
        return ast.get_docstring(ast.parse(path.read_text())) or ""
    except (SyntaxError, UnicodeDecodeError, OSError):
        return ""


def scripts_section(folder: Path) -> list[str]:
    lines = ["## Scripts", ""]
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_") or "__main__" not in path.read_text():
            continue  # helper modules, not scripts
        doc = _docstring(path)
        summary = " ".join(doc.split("\n\n")[0].split())  # the first paragraph
        usage = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python benchmarks/")]
        lines.append(f"- `{path.name}`" + (f": {summary}" if summary else ""))
        if usage:
            lines += ["", "  ```", *[f"  {u}" for u in usage], "  ```", ""]
    return lines


#: The sections this script writes; any other ``## `` section of the README is hand-written.
GENERATED_SECTIONS = ("Scripts", "Goals")


def handwritten_sections(readme: Path) -> list[str]:
    """The lines of ``readme``'s ``## `` sections that this script does not generate, unchanged
    (headings inside fenced code blocks do not count)."""
    try:
        text = readme.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    out: list[str] = []
    keep = fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif line.startswith("## ") and not fenced:
            keep = line[3:].strip() not in GENERATED_SECTIONS
        if keep:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return out


def _cell(x) -> str:
    text = "" if x is None else str(x)
    return " ".join(text.split()).replace("|", "\\|")


def _measured(g: dict) -> str:
    m = g.get("measured")
    unit = g.get("unit") or ""
    if m is None:
        return "—"
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        return f"{m} {unit}".strip()
    if isinstance(m, float) and not math.isfinite(m):
        return f"{m} {unit}".strip()
    text = f"{m:.3g}" if isinstance(m, float) else str(m)
    return f"{text} {unit}".strip()


def device_of(d: dict) -> str:
    """The device's name: ``device``, or ``device_name`` where ``device`` is only a type ("cpu", "cuda:0")."""
    dev = str(d.get("device") or "")
    if (dev in ("cpu", "cuda", "mps") or dev.startswith("cuda:")) and d.get("device_name"):
        return str(d["device_name"])
    return dev or str(d.get("device_name") or "?")


def collect(results: Path) -> tuple[list[list[str]], list[str]]:
    rows, problems = [], []
    for path in sorted(results.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            problems.append(f"`{path.name}`: unreadable ({type(e).__name__})")
            continue
        if not isinstance(d, dict):
            problems.append(f"`{path.name}`: not a JSON object")
            continue
        if d.get("benchmark") == "gpu_all":  # the index of a gpu_all.py run, not a result
            continue
        bench = str(d.get("benchmark") or path.stem)
        label = bench if bench == path.stem else f"{bench} (`{path.name}`)"
        goals = d.get("goals")
        if not isinstance(goals, list) or not goals:
            rows.append([label, "(no goals recorded in this file)", "—", "", "", device_of(d), d.get("summary") or ""])
            continue
        for g in goals:
            if not isinstance(g, dict):
                continue
            rows.append([label, g.get("name"), _measured(g), g.get("goal"), g.get("status"), device_of(d), g.get("note")])
    return [[_cell(c) for c in r] for r in rows], problems


def render(folder: Path, results: Path, keep_from: Path | None = None) -> str:
    """The README: the intro, the scripts, the hand-written sections of ``keep_from`` (an existing
    README), the goals of every results file."""
    rows, problems = collect(results)
    counts: dict[str, int] = {}
    for r in rows:
        if r[4]:
            counts[r[4]] = counts.get(r[4], 0) + 1
    kept = handwritten_sections(keep_from) if keep_from else []
    lines = [INTRO, *scripts_section(folder), *([""] + kept if kept else []), "", "## Goals", ""]
    if counts:
        lines += ["Status: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", ""]
    lines += ["| benchmark | goal | measured | target | status | device | note |",
              "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines.append("| (no results yet) | | | | | | |")
    if problems:
        lines += ["", "Not included: " + "; ".join(problems) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"), help="folder of results JSON files")
    p.add_argument("--out", default=str(HERE / "README.md"), help="the Markdown file to write")
    args = p.parse_args(argv)
    text = render(HERE, Path(args.results), keep_from=HERE / "README.md")
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
