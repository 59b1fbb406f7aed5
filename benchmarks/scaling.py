"""Data-parallel scaling of the trainer: samples/s of one stage with 1 process and with N processes.

The stage (CLIP by default, whose loss gathers the features of every process) trains through
:func:`genvl.training.train`, the ``genvl train`` loop, on a synthetic image-text folder; the
per-process batch is the same in both runs, so N processes see N times the samples per step.
Scaling efficiency = samples/s with N processes / (N x samples/s with 1 process).

Launchers: on CUDA ``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N``
(the project's recipe); on the CPU ``torchrun --standalone --nproc_per_node N`` with gloo and one
thread per process (``accelerate launch`` starts several CPU processes only through ``mpirun``).

Times come from the loss calls of consecutive steps after ``--warmup`` steps, by the wall clock
(the scaling figure) and by each process's CPU clock. On a shared CPU the wall clock also counts
waiting for a core: the CPU-work efficiency (CPU seconds per step of 1 process / of each of N)
shows what the processes themselves spend on communication, whatever else runs.

    python benchmarks/scaling.py                                   # GPU: N = all GPUs, CLIP base
    python benchmarks/scaling.py --device cpu                      # CPU: 2 processes, CLIP small
    python benchmarks/scaling.py --device cpu --stage lm --size small --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_common import (  # noqa: E402
    BATCH, STAGES, StepClock, at_least, device_name, goal, load_average, pick_device, prepare_stage, print_goals,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One process of a run (launched as is, or by torchrun / accelerate): train, write this rank's times."""
    from dataclasses import replace

    from genvl.training import train
    from genvl.training.tasks import get_task

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    setup = prepare_stage(args.stage, args.size, Path(args.work), args.batch, args.images)
    cfg = replace(setup.cfg, max_steps=args.warmup + args.steps, log_every=args.steps, save_every=0,
                  sample_every=0, tracker="none", mixed_precision=args.mixed_precision)
    task = get_task(args.stage, cfg)
    clock = StepClock(task)
    res = train(task, setup.data, Path(args.out) / f"run-{world}", init=setup.init, progress=False)
    per = clock.per_step(skip=args.warmup)
    Path(args.out, f"times-{world}-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "step_wall_s": per["wall"], "step_cpu_s": per["cpu"],
        "samples_seen": res.samples_seen, "final_loss": res.final_loss,
    }))


def launch(n: int, args, out: Path, gpu: bool) -> tuple[list[dict], str]:
    """Run the worker on ``n`` processes; (per-rank times, the launch command)."""
    me = [str(Path(__file__).resolve()), "--worker", "--stage", args.stage, "--size", args.size, "--batch",
          str(args.batch), "--images", str(args.images), "--warmup", str(args.warmup), "--steps", str(args.steps),
          "--work", str(args.work), "--out", str(out), "--mixed-precision", args.mixed_precision]
    if n == 1:
        cmd = [sys.executable, *me]
    elif gpu:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", str(n), *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *me]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{n}-process run failed (exit {r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
    shown = " ".join(c if c != sys.executable else "python" for c in cmd)
    return [json.loads((out / f"times-{n}-rank{k}.json").read_text()) for k in range(n)], shown


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--stage", default="clip", choices=STAGES, help="the stage to train")
    p.add_argument("--size", choices=["tiny", "small", "base"], help="model size (default: base on GPU, small on CPU)")
    p.add_argument("--processes", type=int, help="N (default: every GPU; 2 on the CPU)")
    p.add_argument("--batch", type=int, help="micro-batch per process (default per stage and device)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--work", help="folder for the synthetic data and runs (default: a temp folder)")
    p.add_argument("--json", default="benchmarks/results/scaling.json", help="where to write the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args)
        return {}

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.size = args.size or ("base" if gpu else "small")
    args.batch = args.batch or BATCH[device.type][args.stage]
    n = args.processes or (torch.cuda.device_count() if gpu else 2)
    if n < 2:
        p.error("scaling needs at least 2 processes (and on CUDA as many GPUs)")
    args.mixed_precision = "bf16" if gpu else "no"
    tmp = tempfile.TemporaryDirectory(prefix="genvl-scaling-") if not args.work else None
    args.work = str(Path(args.work or tmp.name).resolve())
    # every process's epoch holds at least warmup + steps batches
    args.images = n * args.batch * (args.warmup + args.steps + 1)
    prepare_stage(args.stage, args.size, Path(args.work), args.batch, args.images)  # data written once, here
    out = Path(args.work) / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    if not gpu:
        torch.set_num_threads(1)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {args.stage} {args.size}, batch {args.batch} per "
          f"process; {args.warmup} + {args.steps} steps")

    load = [load_average()]
    rows = []
    for k in (1, n):
        t = time.perf_counter()
        ranks, cmd = launch(k, args, out, gpu)
        load.append(load_average())
        wall = max(r["step_wall_s"] for r in ranks)
        cpu = statistics.mean(r["step_cpu_s"] for r in ranks)
        rows.append({"processes": k, "launch": cmd, "global_batch": k * args.batch, "step_wall_s": wall,
                     "step_cpu_s_per_process": cpu, "samples_per_s": k * args.batch / wall, "ranks": ranks,
                     "run_s": time.perf_counter() - t})
        print(f"  {k} process(es): {wall * 1000:8.1f} ms/step (wall), {cpu * 1000:8.1f} CPU ms/step per process, "
              f"{k * args.batch / wall:8.1f} samples/s")
    one, many = rows
    eff = 100 * many["samples_per_s"] / (n * one["samples_per_s"])
    work_eff = 100 * one["step_cpu_s_per_process"] / many["step_cpu_s_per_process"]
    print(f"\n{'processes':>9} {'samples/s':>10} {'ms/step':>9} {'CPU ms/step/proc':>17}")
    for r in rows:
        print(f"{r['processes']:>9} {r['samples_per_s']:10.1f} {r['step_wall_s'] * 1000:9.1f} "
              f"{r['step_cpu_s_per_process'] * 1000:17.1f}")
    print(f"scaling efficiency {eff:.1f}%; CPU-work efficiency {work_eff:.1f}%")
    busy = "" if gpu else (f"; load average before / after the runs {load} (1-minute average, cores): a busy "
                           "machine lowers the wall-clock figure")
    goals = [goal(f"{args.stage} scaling efficiency, {n} processes", eff, "%", f">= 90% with {n} processes",
                  at_least(eff, 90.0), f"samples/s with {n} processes / ({n} x 1 process), same per-process batch "
                  f"{args.batch}, on {device_name(device)}; no target was set by the performance issue, 90% is the "
                  f"usual data-parallel expectation; CPU-work efficiency {work_eff:.0f}%{busy}")]
    print()
    print_goals(goals)
    result = write_result(args.json, "scaling", device, args, goals, rows, efficiency_pct=eff,
                          cpu_work_efficiency_pct=work_eff, cpu_load_average=None if gpu else load,
                          launcher="accelerate launch (configs/accelerate/ddp.yaml)" if gpu else
                          "torchrun, gloo, 1 thread per process (accelerate launch needs mpirun for several CPU processes)")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
