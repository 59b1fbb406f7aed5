"""One GPU run of every benchmark: each a subprocess under its own time cap, the headline goals first.

The plan (:data:`PARTS`, in running order) fits eight minutes on one H100, compilation included:
training speed and MFU with bf16 + ``torch.compile`` (decoder, prior, token LM, CLIP, one process
each), unCLIP sampling at batch 1 eager against CUDA graphs, AR decoding against transformers'
``generate``, the generative classifier's evaluations/s, then training memory, data scaling and
the decoder schedulers; ``scaling.py`` only where more than one GPU is visible. Each part runs at
a size chosen to fit its cap (the caps sum to at most :data:`GPU_BUDGET_S`), writes its results
JSON as ``OUT/PART.json`` and its output to ``OUT/logs/PART.log``. A part that fails or runs past
its cap is recorded with the tail of its output, and the run goes on. After every part the driver
rewrites ``OUT/summary.json`` (device, torch, each part's status ok | failed | timeout | skipped,
wall seconds, error tail, the goals its JSON reports) and ``OUT/table.md``, and with ``--archive``
one ``.tar.gz`` of the folder: a run cut short still leaves what it measured.

Nothing is installed at run time. A preflight (``--check`` alone) lists the imports missing on the
machine and how to carry them: ``scripts/gpu_wheels.sh`` downloads their wheels into ``.wheels/``
here, and ``benchmarks/gpu_all.sh`` installs them there (no network) before running this script.

``--dry-run`` runs the same parts on the CPU at tiny sizes (seconds each, CUDA hidden): it checks
the command lines, the outputs and the summary, not speed. ``selftest-fail`` and
``selftest-timeout`` are built-in parts that fail / overrun on purpose (never in the default plan).

    python benchmarks/gpu_all.py                                  # GPU: every part, <= 8 minutes on one H100
    python benchmarks/gpu_all.py --check                          # missing imports and how to carry them
    python benchmarks/gpu_all.py --list                           # the plan: parts, caps, command lines
    python benchmarks/gpu_all.py --dry-run                        # CPU: tiny sizes, every part
    python benchmarks/gpu_all.py --dry-run --parts selftest-fail,ar_sampling --out /tmp/gpu-dry
    python benchmarks/gpu_all.py --cap ar_sampling=100 --parts train_speed,ar_sampling --archive /tmp/gpu.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

#: Seconds the default plan may take on one GPU, preflight and summary included (eight minutes).
GPU_BUDGET_S = 480.0
#: Seconds the driver keeps for itself (preflight, summary, archive) out of the budget.
DRIVER_RESERVE_S = 10.0
#: Seconds between SIGTERM and SIGKILL for a part past its cap.
KILL_GRACE_S = 5.0

#: Packages the GPU machine's image may lack, carried as wheels (import name = distribution name).
WHEEL_PACKAGES = ("diffusers", "peft", "einops", "webdataset", "braceexpand")
#: The device's first command: the carried wheels, then the project itself, both without an index.
DEVICE_INSTALL = ("python3 -m pip install -q --no-index --no-deps --find-links .wheels " + " ".join(WHEEL_PACKAGES)
                  + " && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .")
#: Imports every genvl benchmark needs (genvl's own, from the checkout on PYTHONPATH).
BASE_IMPORTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "diffusers", "PIL", "numpy",
                "yaml", "tqdm", "genvl")


@dataclass(frozen=True)
class Part:
    """One benchmark run of the plan.

    ``gpu_args`` / ``dry_args`` follow the script (``{work}`` is the run's scratch folder); the
    driver adds the output flag (``output``: ``--json FILE``, or ``--out PREFIX`` for a script that
    writes ``PREFIX.json``). ``prepare`` (GPU and dry) is a first command of the same script, inside
    the same cap. ``command`` replaces the script for the built-in self-test parts.
    """

    name: str
    title: str
    script: str | None
    gpu_args: tuple[str, ...] = ()
    dry_args: tuple[str, ...] = ()
    cap_s: float = 60.0
    dry_cap_s: float = 90.0
    why: str = ""
    output: str = "--json"
    needs: tuple[str, ...] = ()
    min_gpus: int = 1
    prepare: tuple[str, ...] = ()
    default: bool = True
    unavailable: str = ""
    command: tuple[str, ...] = ()

    def commands(self, dry: bool, work: Path, json_path: Path) -> list[list[str]]:
        """The command lines of this part (prepare first), with the output flag added."""
        if self.command:
            return [list(self.command)]
        script = str(HERE / self.script)
        fill = {"work": str(work)}
        cmds = []
        if self.prepare:
            cmds.append([sys.executable, script, *(a.format(**fill) for a in self.prepare)])
        out = str(json_path) if self.output == "--json" else str(json_path.with_suffix(""))
        args = self.dry_args if dry else self.gpu_args
        cmds.append([sys.executable, script, *(a.format(**fill) for a in args), self.output, out])
        return cmds

    def cap(self, dry: bool) -> float:
        return self.dry_cap_s if dry else self.cap_s


def _train_speed(stage: str, cap: float, why: str, variants: str = "bf16 eager;bf16 compile") -> Part:
    return Part(
        name=f"train_speed-{stage}", title=f"{stage} training samples/s and MFU, bf16 eager and bf16 + compile",
        script="train_speed.py",
        gpu_args=("--device", "cuda", "--size", "base", "--stages", stage, "--variants", variants, "--no-loop",
                  "--warmup", "3", "--steps", "10", "--work", "{work}/train"),
        dry_args=("--device", "cpu", "--size", "tiny", "--stages", stage, "--variants", "fp32 eager", "--no-loop",
                  "--warmup", "1", "--steps", "1", "--dense-size", "256", "--work", "{work}/train"),
        cap_s=cap, why=why)


#: The plan, in running order: the headline goals first.
PARTS: tuple[Part, ...] = (
    _train_speed("decoder", 85, "base UNet (~300M, 64 px, batch 64): imports, CLIP base + data ~15 s, bf16 eager "
                                "step and FLOP count ~10 s, Inductor compile of forward + backward ~50 s"),
    _train_speed("prior", 40, "prior at batch 256 on a CLIP base (reused from the decoder part): a smaller "
                              "transformer, compile ~20 s"),
    _train_speed("lm", 50, "token LM at batch 64 over a VQ-VAE base's codes (the codes computed on the CPU first, "
                           "~10 s), Llama compile ~25 s"),
    _train_speed("clip", 55, "CLIP ViT-B/16 + text tower at batch 256, 224 px: two towers to compile ~30 s"),
    Part(name="sampling_speed", title="unCLIP sampling at batch 1: eager vs CUDA graphs (demo model)",
         script="sampling_speed.py",
         gpu_args=("--device", "cuda", "--parts", "speed", "--decoder-size", "demo", "--batches", "1",
                   "--modes", "eager,cudagraphs", "--repeats", "3"),
         dry_args=("--device", "cpu", "--parts", "speed", "--decoder-size", "demo", "--batches", "1",
                   "--modes", "eager,cudagraphs", "--repeats", "1", "--speed-steps", "2", "--speed-prior-steps", "2"),
         cap_s=65, why="the demo at its own 50 + 25 steps, batch 1 only (the goal's row): eager ~1 s a call; "
                       "compiling prior + decoder with reduce-overhead ~40 s; the compile mode and batch 16 left out"),
    Part(name="ar_sampling", title="AR image-token decoding: genvl static + compile vs transformers generate",
         script="ar_sampling.py",
         gpu_args=("--device", "cuda", "--skip", "genvl dynamic + CFG,hf generate static", "--repeats", "2"),
         dry_args=("--device", "cpu", "--size", "tiny", "--batch", "2", "--tokens", "8", "--repeats", "1",
                   "--skip", "genvl dynamic + CFG,hf generate static"),
         cap_s=75, why="~160M Llama, batch 32, 256 tokens (the goal's size): four methods x 3 calls of ~2 s, the "
                       "static-cache compile ~40 s; CFG and generate's auto-compiled static cache (not in the goal) "
                       "left out"),
    Part(name="zero_shot", title="generative classifier: evaluations/s of batched scoring, accuracy per evaluation",
         script="zero_shot.py", output="--out",
         prepare=("--make-shapes", "{work}/shapes"),
         gpu_args=("--model", "demo", "--data", "{work}/shapes", "--limit", "40", "--budgets", "4,16",
                   "--schedules", "2:2,6:1", "--rows", "256", "--repeats", "5", "--device", "cuda"),
         dry_args=("--model", "demo", "--data", "{work}/shapes", "--limit", "4", "--methods", "diffusion",
                   "--budgets", "1", "--schedules", "1:1", "--rows", "8", "--repeats", "1", "--device", "cpu"),
         cap_s=30, why="the 4-class shapes folder (made by --make-shapes), 40 images, every method of the demo, "
                       "then 256 rows per forward for the throughput: two process starts and a few seconds of work"),
    Part(name="memory", title="training memory: decoder gradient checkpointing cut",
         script="memory.py",
         gpu_args=("--device", "cuda", "--size", "base", "--stages", "", "--skip-dist", "--work", "{work}/train"),
         dry_args=("--device", "cpu", "--size", "tiny", "--stages", "", "--skip-dist", "--gc-px", "32",
                   "--gc-batch", "2", "--work", "{work}/train"),
         cap_s=30, dry_cap_s=120,
         why="the goal's pair only (decoder base, 64 px, batch 64, with and without checkpointing: two fresh "
             "processes of ~12 s); the per-stage peaks and FSDP vs DDP (a CPU measurement) left out"),
    Part(name="data_scale", title="data: streaming start-up / memory at 2,000 shards, prior from embeddings",
         script="data_scale.py", needs=("webdataset", "braceexpand"),
         gpu_args=("--shards", "10,2000", "--procs", "1", "--batches", "5", "--prior-steps", "10",
                   "--prior-images", "1024", "--no-prior-compile", "--work", "{work}/data_scale"),
         dry_args=("--shards", "2,4", "--procs", "1", "--batches", "1", "--batch-size", "2", "--prior-steps", "2",
                   "--prior-images", "8", "--prior-batch", "4", "--no-prior-compile", "--work", "{work}/data_scale"),
         cap_s=20, why="10 and 2,000 shards by one process (4 fresh interpreters), then the prior trained 10 steps "
                       "from 1,024 images (one epoch) and from their embeddings, eager (the GPU makes the step "
                       "cheap, the data path shows)"),
    Part(name="sampling_speed-schedulers", title="decoder DPM-Solver++ 20 / DDIM 50 keep DDPM-250 quality",
         script="sampling_speed.py",
         gpu_args=("--device", "cuda", "--parts", "schedulers", "--num-prompts", "8", "--images", "4"),
         dry_args=("--device", "cpu", "--parts", "schedulers", "--schedulers", "dpm++:2,ddpm:4", "--num-prompts", "2",
                   "--images", "1"),
         cap_s=20, why="32 images, one decoder call per step: 570 UNet calls of the 32 px demo (~5 s) after the "
                       "process start"),
    Part(name="scaling", title="data-parallel scaling efficiency (CLIP base)", script="scaling.py", min_gpus=2,
         gpu_args=("--device", "cuda", "--steps", "8", "--warmup", "3"),
         dry_args=("--device", "cpu", "--size", "tiny", "--steps", "2", "--warmup", "1", "--batch", "4"),
         cap_s=90, dry_cap_s=150,
         why="two launches (1 and N processes) of the trainer; runs only where more than one GPU is visible"),
    Part(name="custom_set", title="text-to-image on Fashion-MNIST, judged by an independent classifier",
         script="custom_set.py", cap_s=0, dry_cap_s=0, unavailable="needs Debian's dataset-fashion-mnist files and an 18-55 minute "
                                             "training budget: not part of an eight-minute run"),
    Part(name="cpu_sampling", title="genvl sample on a 2-core CPU: old vs new demo defaults", script="cpu_sampling.py",
         cap_s=0, dry_cap_s=0, unavailable="a CPU benchmark (2 cores, 25-45 minutes), not part of the GPU plan"),
    Part(name="stream_libraries", title="webdataset vs mosaicml-streaming vs litdata on img2dataset output",
         script="stream_libraries.py", cap_s=0, dry_cap_s=0,
         unavailable="needs mosaicml-streaming and litdata, which are not genvl dependencies; a CPU measurement"),
    Part(name="selftest-fail", title="a part that fails on purpose", script=None, default=False, cap_s=10,
         dry_cap_s=10, why="checks that a failure is recorded and the run goes on",
         command=(sys.executable, "-c", "import sys; print('selftest-fail: failing on purpose', flush=True); "
                                        "sys.exit(3)")),
    Part(name="selftest-timeout", title="a part that runs past its cap on purpose", script=None, default=False,
         cap_s=2, dry_cap_s=2, why="checks that a part past its cap is stopped and recorded",
         command=(sys.executable, "-c", "import time; print('selftest-timeout: sleeping', flush=True); "
                                        "time.sleep(600)")),
)


# --------------------------------------------------------------------------------------- selection
def select_parts(spec: str | None, parts: tuple[Part, ...] = PARTS) -> list[Part]:
    """The parts named by ``spec`` (comma-separated, in that order), or the default plan.

    A name is a part's name, or a prefix of several (``train_speed`` = every ``train_speed-*``);
    ``default`` stands for the default plan. Unknown names raise ``ValueError``.
    """
    if not spec:
        return [p for p in parts if p.default]
    out: list[Part] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "default":
            found = [p for p in parts if p.default]
        else:
            found = [p for p in parts if p.name == token] or [p for p in parts if p.name.startswith(token + "-")]
        if not found:
            raise ValueError(f"unknown part {token!r}; parts: {', '.join(p.name for p in parts)}")
        out += [p for p in found if p not in out]
    return out


def apply_caps(parts: list[Part], overrides: list[str], dry: bool) -> list[Part]:
    """Parts with caps replaced by ``NAME=SECONDS`` overrides (of the GPU or the dry-run cap)."""
    caps: dict[str, float] = {}
    for item in overrides:
        name, _, sec = item.partition("=")
        if not sec:
            raise ValueError(f"--cap {item!r}: expected NAME=SECONDS")
        caps[name.strip()] = float(sec)
    names = {p.name for p in parts}
    unknown = sorted(set(caps) - names)
    if unknown:
        raise ValueError(f"--cap names parts not in this run: {', '.join(unknown)}")
    key = "dry_cap_s" if dry else "cap_s"
    return [replace(p, **{key: caps[p.name]}) if p.name in caps else p for p in parts]


def planned_cap_total(parts: list[Part], gpus: int, dry: bool = False) -> float:
    """Seconds of caps of the parts that would run with ``gpus`` GPUs (skipped ones not counted)."""
    return sum(p.cap(dry) for p in parts if not p.unavailable and p.min_gpus <= max(gpus, 1))


# --------------------------------------------------------------------------------------- preflight
PROBE = r"""
import importlib.util, json, os, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "missing": []}
for name in sys.argv[1:]:
    try:
        if importlib.util.find_spec(name) is None:
            out["missing"].append(name)
    except (ImportError, ValueError):
        out["missing"].append(name)
try:
    import torch
    out["torch"] = torch.__version__
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if out["gpus"]:
        out["device"] = torch.cuda.get_device_name(0)
    else:
        model = platform.machine()
        try:
            model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        out["device"] = f"CPU ({model}, {os.cpu_count()} cores)"
except Exception as e:
    out.update(torch=None, gpus=0, device="unknown", error=f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def part_env(dry: bool) -> dict[str, str]:
    """The environment of every part: the checkout importable, unbuffered output, no hub access; the
    dry run hides CUDA so that every part runs on the CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def preflight(parts: list[Part], env: dict[str, str], timeout: float = 120.0) -> dict[str, Any]:
    """Python, torch, GPUs and the imports the parts need that the machine lacks (one subprocess)."""
    modules = sorted({*BASE_IMPORTS, *WHEEL_PACKAGES, *(m for p in parts for m in p.needs)})
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=timeout)
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        info = {"python": None, "torch": None, "gpus": 0, "device": "unknown", "missing": [],
                "error": f"preflight failed: {type(e).__name__}"}
    info["modules_checked"] = modules
    return info


def missing_for(part: Part, missing: list[str]) -> list[str]:
    """The imports ``part`` needs that the preflight found missing."""
    if part.command or part.unavailable:
        return []
    return [m for m in missing if m in BASE_IMPORTS or m in part.needs]


def check_report(info: dict[str, Any], parts: list[Part]) -> str:
    """What ``--check`` prints: the machine, the missing imports per part, and how to carry them."""
    lines = [f"python {info.get('python')} ({info.get('executable')}); torch {info.get('torch')}; "
             f"{info.get('gpus', 0)} GPU(s); device: {info.get('device')}"]
    if info.get("error"):
        lines.append(f"preflight problem: {info['error']}")
    missing = info.get("missing") or []
    if not missing:
        lines.append("every import the benchmarks need is present")
        return "\n".join(lines)
    lines.append("missing imports: " + ", ".join(missing))
    for p in parts:
        m = missing_for(p, missing)
        if m:
            lines.append(f"  {p.name}: needs {', '.join(m)}")
    carry = [m for m in missing if m in WHEEL_PACKAGES]
    other = [m for m in missing if m not in WHEEL_PACKAGES]
    if carry:
        lines += ["carry them as wheels: here, `bash scripts/gpu_wheels.sh` writes .wheels/ (git-ignored); the "
                  "device run names .wheels in its carried paths and starts with", f"  {DEVICE_INSTALL}",
                  "(or runs `bash benchmarks/gpu_all.sh ARGS`, which does both and then this script)"]
    if other:
        lines.append("not carried by scripts/gpu_wheels.sh: " + ", ".join(other)
                     + " (genvl: run from the checkout's root; others: add them to the wheel list)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- one part
def not_run(part: Part, gpus: int, dry: bool, named: bool, missing: list[str], left: float) -> tuple[str, str] | None:
    """Why ``part`` does not run, as (status, reason), or None when it runs.

    Skipped: a part that cannot run in this kind of run (``unavailable``); one that needs more GPUs
    than are visible (a dry run stands for one GPU, and runs a multi-GPU part on the CPU only when
    ``--parts`` names it); one whose cap would be cut below half by the budget ``left``. Failed
    without running: a part whose imports are missing.
    """
    if part.unavailable:
        return "skipped", part.unavailable
    have = max(gpus, 1) if dry else gpus
    if part.min_gpus > have and not (dry and named):
        return "skipped", (f"needs {part.min_gpus} GPUs, {gpus} visible" if not dry else
                           f"needs {part.min_gpus} GPUs; a dry run stands for one (name it in --parts to run it "
                           "on the CPU)")
    lacking = missing_for(part, missing)
    if lacking:
        return "failed", f"not run: missing imports {', '.join(lacking)} (see --check: carry them as wheels)"
    if min(part.cap(dry), left) < 0.5 * part.cap(dry):
        return "skipped", f"budget spent: {max(left, 0):.0f} s left, the part's cap is {part.cap(dry):.0f} s"
    return None


def _stop_group(proc: subprocess.Popen) -> None:
    """End the part's process group (its own session): SIGTERM, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _reap_group(pgid: int) -> None:
    """Kill what a finished part left running in its process group (worker pools holding GPU memory)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 25, chars: int = 3000) -> str:
    """The last ``lines`` lines of a log (at most ``chars`` characters)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def normalize_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A results JSON's goals in the shared schema ``{name, measured, unit, goal, status, note}``.

    The scripts write that schema; results of older ``data_scale.py`` runs hold ``{goal: name, measured, target, met}``.
    """
    out = []
    for g in result.get("goals") or []:
        if not isinstance(g, dict):
            continue
        if "name" in g:
            out.append({"name": g["name"], "measured": g.get("measured"), "unit": g.get("unit") or "",
                        "goal": g.get("goal"), "status": g.get("status"), "note": g.get("note") or ""})
        elif "goal" in g:
            met = g.get("met")
            out.append({"name": g["goal"], "measured": g.get("measured"), "unit": g.get("unit") or "",
                        "goal": g.get("target"), "status": "not measured here" if met is None else
                        ("met" if met else "missed"), "note": g.get("note") or ""})
    return out


@dataclass
class Record:
    """What the summary holds of one part."""

    name: str
    title: str
    status: str  # ok | failed | timeout | skipped
    cap_s: float
    wall_s: float = 0.0
    reason: str = ""
    returncode: int | None = None
    commands: list[str] = field(default_factory=list)
    json: str | None = None
    log: str | None = None
    error_tail: str = ""
    goals: list[dict[str, Any]] = field(default_factory=list)


def run_part(part: Part, cap: float, dry: bool, out: Path, work: Path, env: dict[str, str]) -> Record:
    """Run ``part``'s commands in order under one cap of ``cap`` seconds; its record."""
    json_path = out / f"{part.name}.json"
    log_path = out / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # a file from an earlier run must not pass for this one's
    cmds = part.commands(dry, work, json_path)
    rec = Record(part.name, part.title, "ok", cap, commands=[shlex.join(c) for c in cmds],
                 log=str(log_path.relative_to(out)))
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        for cmd in cmds:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    env=env, start_new_session=True)
            try:
                rec.returncode = proc.wait(timeout=max(cap - (time.monotonic() - t0), 0.1))
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                rec.status, rec.returncode = "timeout", proc.returncode
                rec.reason = f"stopped at its cap of {cap:.0f} s"
                break
            finally:
                _reap_group(proc.pid)
            if rec.returncode != 0:
                rec.status, rec.reason = "failed", f"exit status {rec.returncode}"
                break
    rec.wall_s = round(time.monotonic() - t0, 2)
    if rec.status == "ok":
        try:
            result = json.loads(json_path.read_text())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
            rec.json, rec.goals = json_path.name, normalize_goals(result)
        except (OSError, ValueError) as e:
            rec.status, rec.reason = "failed", f"exit status 0 but no results JSON at {json_path.name} ({e})"
    if rec.status != "ok":
        rec.error_tail = tail(log_path)
    return rec


# --------------------------------------------------------------------------------------- outputs
def _fmt_measured(g: dict[str, Any]) -> str:
    m, unit = g.get("measured"), g.get("unit") or ""
    if m is None:
        return "—"
    if isinstance(m, float):
        return f"{m:.3g} {unit}".strip()
    return f"{m} {unit}".strip()


def _cell(x: Any, limit: int = 0) -> str:
    text = " ".join(("" if x is None else str(x)).split()).replace("|", "\\|")
    return text if not limit or len(text) <= limit else text[: limit - 1] + "…"


def render_table(summary: dict[str, Any]) -> str:
    """The combined Markdown table: one row per part, then one row per goal."""
    recs = summary["parts"]
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    head = (f"# {'Dry run (CPU, tiny sizes)' if summary['dry_run'] else 'One GPU run'}: {summary['device']}\n\n"
            f"torch {summary['torch']}, python {summary['python']}, {summary['gpus']} GPU(s), started "
            f"{summary['started']}; {summary['wall_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".\n")
    if summary.get("missing_imports"):
        head += f"\nMissing imports: {', '.join(summary['missing_imports'])}.\n"
    lines = [head, "| # | part | status | wall s | cap s | goals | note |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(recs, 1):
        goals = "; ".join(f"{g['status']}: {_fmt_measured(g)}" for g in r["goals"]) or "—"
        note = r["reason"]
        if r["error_tail"]:
            note += (": " if note else "") + r["error_tail"].strip().splitlines()[-1]
        lines.append(f"| {i} | {r['name']} | {r['status']} | {r['wall_s']:.1f} | {r['cap_s']:.0f} | "
                     f"{_cell(goals, 200)} | {_cell(note, 200)} |")
    lines += ["", "## Goals", "", "| part | goal | measured | target | status | note |", "|---|---|---|---|---|---|"]
    n = 0
    for r in recs:
        for g in r["goals"]:
            n += 1
            lines.append(f"| {r['name']} | {_cell(g['name'])} | {_cell(_fmt_measured(g))} | {_cell(g['goal'])} | "
                         f"{_cell(g['status'])} | {_cell(g['note'], 300)} |")
    if not n:
        lines.append("| (no goals reported) | | | | | |")
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict[str, Any], out: Path, archive: Path | None) -> None:
    """``summary.json`` and ``table.md`` (written then renamed), and the archive of the folder."""
    for name, text in (("summary.json", json.dumps(summary, indent=2) + "\n"), ("table.md", render_table(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if archive is not None:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(out.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    tar.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
        os.replace(tmp, archive)


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes (CUDA hidden): checks, not speed")
    p.add_argument("--parts", help="comma-separated part names or prefixes, run in that order (default: the plan; "
                                   "'default' stands for it; selftest-fail / selftest-timeout fail on purpose)")
    p.add_argument("--out", help="results folder (default benchmarks/results/gpu, dry run runs/gpu_all-dry)")
    p.add_argument("--budget", type=float, help=f"seconds for the whole run (default {GPU_BUDGET_S:.0f} on the GPU; "
                                                "a dry run's leaves every cap whole); parts are cut to what is left")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="another cap for a part")
    p.add_argument("--archive", help="a .tar.gz of the results folder, rewritten after every part")
    p.add_argument("--work", help="scratch folder for data and model directories (default: a temporary one)")
    p.add_argument("--check", action="store_true", help="only the preflight: missing imports and how to carry them")
    p.add_argument("--list", action="store_true", help="print the plan (parts, caps, command lines) and exit")
    args = p.parse_args(argv)
    dry = args.dry_run
    try:
        parts = apply_caps(select_parts(args.parts), args.cap, dry)
    except ValueError as e:
        p.error(str(e))
    named = {p.name for p in parts} if args.parts else set()
    out = Path(args.out or (ROOT / ("runs/gpu_all-dry" if dry else "benchmarks/results/gpu"))).resolve()
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="gpu_all-")
    work = Path(args.work or work_tmp.name).resolve()

    if args.list:
        for i, part in enumerate(parts, 1):
            if part.unavailable:
                print(f"{i:>2}. {part.name} (not run): {part.title}\n      why: {part.unavailable}")
                continue
            print(f"{i:>2}. {part.name} (cap {part.cap(dry):.0f} s): {part.title}")
            for cmd in part.commands(dry, Path("{work}"), Path("{out}") / f"{part.name}.json"):
                shown = ["python" if c == sys.executable else c.replace(f"{ROOT}{os.sep}", "") for c in cmd]
                print("      " + shlex.join(shown))
            if part.why:
                print(f"      why: {part.why}")
        if dry:
            print(f"caps of the dry run: {sum(p.cap(dry) for p in parts if not p.unavailable):.0f} s")
        else:
            print(f"caps of the parts that run on one GPU: {planned_cap_total(parts, 1):.0f} s "
                  f"(budget {GPU_BUDGET_S:.0f} s, {DRIVER_RESERVE_S:.0f} s of it kept for the driver)")
        return 0

    env = part_env(dry)
    t_start = time.monotonic()
    info = preflight(parts, env)
    if args.check:
        print(check_report(info, parts))
        return 1 if info.get("missing") or info.get("error") else 0
    gpus = int(info.get("gpus") or 0)
    if not dry and gpus < 1:
        print(f"gpu_all: no CUDA device visible ({info.get('device')}); use --dry-run for the CPU check",
              file=sys.stderr)
        return 2
    # a dry run's budget leaves every cap whole (the preflight's seconds included)
    budget = args.budget or (GPU_BUDGET_S if not dry else
                             sum(p.cap(dry) for p in parts if not p.unavailable) + DRIVER_RESERVE_S + 60)
    out.mkdir(parents=True, exist_ok=True)
    archive = Path(args.archive).resolve() if args.archive else None
    missing = list(info.get("missing") or [])
    print(check_report(info, parts), flush=True)
    summary: dict[str, Any] = {
        "benchmark": "gpu_all", "dry_run": dry, "device": info.get("device"), "gpus": gpus,
        "torch": info.get("torch"), "python": info.get("python"),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": budget,
        "caps_total_s": planned_cap_total(parts, gpus, dry), "missing_imports": missing,
        "preflight_error": info.get("error"), "argv": sys.argv[1:] if argv is None else argv,
        "wall_s": 0.0, "parts": [],
    }
    status = 0
    try:
        for part in parts:
            left = budget - DRIVER_RESERVE_S - (time.monotonic() - t_start)
            cap = min(part.cap(dry), left)
            rec = Record(part.name, part.title, "skipped", part.cap(dry))
            verdict = not_run(part, gpus, dry, part.name in named, missing, left)
            if verdict:
                rec.status, rec.reason = verdict
            else:
                print(f"\n== {part.name} (cap {cap:.0f} s): {part.title}", flush=True)
                rec = run_part(part, cap, dry, out, work, env)
            summary["parts"].append(vars(rec))
            summary["wall_s"] = round(time.monotonic() - t_start, 2)
            print(f"   {rec.name}: {rec.status} in {rec.wall_s:.1f} s" + (f" ({rec.reason})" if rec.reason else ""),
                  flush=True)
            if rec.status in ("failed", "timeout"):
                status = 1
                if rec.error_tail:
                    print("   " + "\n   ".join(rec.error_tail.splitlines()[-5:]), flush=True)
            write_outputs(summary, out, archive)
    except KeyboardInterrupt:
        done = {r["name"] for r in summary["parts"]}
        for part in parts:
            if part.name not in done:
                summary["parts"].append(vars(Record(part.name, part.title, "skipped", part.cap(dry),
                                                    reason="interrupted")))
        status = 130
    finally:
        summary["wall_s"] = round(time.monotonic() - t_start, 2)
        write_outputs(summary, out, archive)
        if work_tmp is not None:
            work_tmp.cleanup()
    print("\n" + render_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}" + (f", {archive}" if archive else ""))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
