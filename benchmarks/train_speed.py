"""Training speed of every stage: samples/s and MFU of the training step, the full loop, the data loader.

For each stage (decoder UNet, token LM, prior, CLIP) the model is built by the stage's Task from the
project's size tables, on a synthetic image-text folder (the prior and decoder on a fresh CLIP, the
token LM on the codes of a fresh VQ-VAE), and measured in one run:

- the bare training step (``task.loss`` -> backward -> AdamW step on one fixed batch) in several
  variants: fp32 eager, bf16 autocast eager, compiled (``compile: true``; bf16 on CUDA, on the CPU
  the faster of fp32 / bf16), channels-last for the UNet, and another AdamW implementation than the
  trainer's fused one (for-loop on the CPU, foreach on CUDA);
- MFU: FLOPs of one forward + backward of the task's loss, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; the frozen CLIP /
  VQ-VAE work inside the loss included), per second of step time, divided by the dense rate of the
  variant's precision measured in the same run (CUDA: 8192^3 matmul in bf16 / fp32; CPU: the faster
  of a 2048^3 matmul and a 3x3 convolution, see ``train_common.dense_rate``);
- AdamW's ``step()`` alone for the for-loop, foreach and fused implementations;
- the full ``genvl train`` loop (:func:`genvl.training.train`: data loading, clipping, LR schedule,
  EMA, logging) over three epochs after a warm one, against the bare step run alternately with it
  on the same batches: goal loop >= 0.95 x bare (the median of the per-step ratios beside it);
- the trainer's DataLoader (the stage's dataset and collate, ``--workers`` workers) in batches/s
  against the fastest step rate: goal loader >= steps.

On a CPU run with one thread, times are this process's CPU seconds (``--clock auto``): the numbers
then do not depend on what else runs on the machine; wall-clock times are kept beside them.
Printed as tables; written as JSON (schema in ``benchmarks/train_common.py``) with the device name.

    python benchmarks/train_speed.py                         # GPU: base sizes, bf16, compile
    python benchmarks/train_speed.py --device cpu            # CPU: small sizes, 1 thread
    python benchmarks/train_speed.py --stages decoder,lm --size tiny --steps 2 --no-loop
    python benchmarks/train_speed.py --device cpu --skip "bf16 eager,bf16 compile" --merge   # rerun a part
    python benchmarks/train_speed.py --stages prior --variants "bf16 eager;bf16 compile" --no-loop   # MFU only

``--merge`` lays a partial rerun (some stages, some variants skipped) over the existing results file
of the same device and size, keeping what was not rerun (marked ``from_earlier_run``).
``--variants`` keeps only the named variants (``;``-separated: names such as "fp32 eager, for-loop
AdamW" hold commas). With ``--no-loop`` the synthetic set is one batch (the bare step trains on the
first batch only), so a short run writes no more images than it reads. ``--dense-size N`` times an
N^3 matmul as the MFU reference instead (quick checks only: MFU against it comes out too high).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_common import (  # noqa: E402
    BATCH, MFU_GOALS, STAGES, BareStep, StepClock, Variant, at_least, build_task, dense_rate, device_name, goal,
    is_h100, load_average, make_loader, pick_clock, pick_device, prepare_stage, print_goals, set_threads, sync,
    time_steps, write_result,
)


IMAGES_PER_BATCH = 8  # synthetic images per micro-batch: an epoch is 8 steps
LOOP_EPOCHS = 3  # epochs the loop (and the bare step on its batches) is timed over, after one warm epoch


#: stages whose models are diffusers' (their attention can run on xformers)
XFORMERS_STAGES = ("decoder", "prior")


def has_xformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


def xformers_goal(stage: str, rows: list[dict], gpu: bool, device: torch.device) -> dict:
    """xformers against SDPA attention, both bf16 eager: the trainer keeps SDPA unless xformers is faster."""
    name = f"{stage} attention: xformers vs sdpa"
    by = {r["variant"]: r for r in rows if "step_s" in r}
    if not gpu or not has_xformers():
        why = "no GPU (xformers kernels are CUDA only)" if not gpu else "xformers is not installed (pip install genvl[xformers])"
        return goal(name, None, "x", "measured both ways; use the faster", "not measured here", why)
    if "bf16 eager xformers" not in by or "bf16 eager" not in by:
        err = next((r.get("error") for r in rows if r.get("variant") == "bf16 eager xformers"), "no row")
        return goal(name, None, "x", "measured both ways; use the faster", "not measured here", f"xformers run failed: {err}")
    ratio = by["bf16 eager"]["step_s"] / by["bf16 eager xformers"]["step_s"]
    pick = "xformers" if ratio > 1 else "sdpa"
    return goal(name, ratio, "x sdpa speed", "measured both ways; use the faster", "met",
                f"xformers {by['bf16 eager xformers']['samples_per_s']:.0f} vs sdpa {by['bf16 eager']['samples_per_s']:.0f} "
                f"samples/s on {device_name(device)}: attention={pick} is the faster")


def variants_for(stage: str, gpu: bool, fast_dtype: str | None) -> list[Variant]:
    """Variants in measuring order; ``fast_dtype`` (CPU) is the faster of fp32 / bf16 once both are measured."""
    if gpu:
        out = [Variant("fp32 eager"), Variant("bf16 eager", "bf16"), Variant("bf16 eager, foreach AdamW", "bf16",
               adamw="foreach"), Variant("bf16 compile", "bf16", compile=True)]
        if stage == "decoder":
            out += [Variant("bf16 channels-last", "bf16", channels_last=True),
                    Variant("bf16 compile channels-last", "bf16", compile=True, channels_last=True)]
        if stage in XFORMERS_STAGES and has_xformers():
            out.append(Variant("bf16 eager xformers", "bf16", attention="xformers"))
        return out
    out = [Variant("fp32 eager"), Variant("bf16 eager", "bf16"), Variant("fp32 eager, for-loop AdamW", adamw="for-loop")]
    if fast_dtype is not None:
        mp = "bf16" if fast_dtype == "bf16" else "no"
        out.append(Variant(f"{fast_dtype} compile", mp, compile=True))
        if stage == "decoder":
            out.append(Variant(f"{fast_dtype} channels-last", mp, channels_last=True))
    return out


def optimizer_times(model: torch.nn.Module, device: torch.device, clock: str, repeats: int = 5) -> dict[str, float]:
    """Seconds of one ``AdamW.step()`` over the model's trainable parameters, per implementation."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    out = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for impl, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c in clones:
            c.grad = torch.randn_like(c)
        try:
            opt = torch.optim.AdamW(clones, lr=1e-4, **kw)
            opt.step()
            opt.step()
        except (RuntimeError, TypeError) as e:  # fused not available for this device / dtype
            out[impl] = None
            print(f"  AdamW {impl}: unavailable ({str(e).splitlines()[0]})")
            continue
        times = []
        for _ in range(repeats):
            sync(device)
            t = now()
            opt.step()
            sync(device)
            times.append(now() - t)
        out[impl] = statistics.median(times)
        del opt, clones
    return out


def loader_rate(setup, device: torch.device, batches: int) -> dict[str, float]:
    """Batches/s of the trainer's DataLoader over the stage's data (the first batch, worker start-up,
    excluded), by both clocks; the CPU clock counts the main process only (right with 0 workers)."""
    task, _, dataset = build_task(setup)
    loader = make_loader(task, dataset, setup.cfg, device)
    n, t, c = 0, 0.0, 0.0
    while n < batches + 1:
        for _ in loader:
            n += 1
            if n == 1:
                t, c = time.perf_counter(), time.process_time()
            if n == batches + 1:
                break
    return {"wall": batches / (time.perf_counter() - t), "cpu": batches / max(time.process_time() - c, 1e-9)}


def loop_rate(setup, variant, device: torch.device, out_dir: Path, warm_steps: int, measure_steps: int,
              clock: str) -> dict:
    """Seconds per step of :func:`genvl.training.train` after ``warm_steps`` steps (the first epoch:
    caches, compilation), from the time between the loss calls of consecutive steps, and of the bare
    step of ``variant`` run alternately with it: at every loss call the bare step (its own model and
    optimizer) first trains on the same batch, outside the loop's timed interval. Both see the same
    batches in the same order and the same machine at the same moment."""
    from genvl.training import train
    from genvl.training.tasks import get_task

    cfg = replace(setup.cfg, max_steps=warm_steps + measure_steps, log_every=max(1, measure_steps // 2),
                  ema_decay=0.999, mixed_precision=variant.mixed_precision, save_every=0, sample_every=0,
                  tracker="none")
    bare = BareStep(setup, variant, device)
    try:
        task = get_task(setup.stage, cfg)
        steps = StepClock(task, keep_from=warm_steps, pair=bare.timed)
        res = train(task, setup.data, out_dir, init=setup.init, progress=False)
    finally:
        bare.close()
    loop_s, bare_s, per = steps.durations(warm_steps, clock), steps.paired(clock), steps.per_step(warm_steps)
    return {"step_wall_s": per["wall"], "step_cpu_s": per["cpu"],
            "step_s": statistics.mean(loop_s), "step_all_s": loop_s, "step_median_s": statistics.median(loop_s),
            "bare_step_s": statistics.mean(bare_s), "bare_step_all_s": bare_s,
            "bare_step_median_s": statistics.median(bare_s),
            "ratio_median": statistics.median(b / max(x, 1e-12) for b, x in zip(bare_s, loop_s)),
            "steps": measure_steps, "ema_decay": cfg.ema_decay, "final_loss": res.final_loss}


def merge_previous(path: str, device: torch.device, size: str, rows: list[dict], goals: list[dict],
                   summary: dict, known: set[str] | None = None) -> tuple[list[dict], list[dict], dict, dict | None]:
    """Rows, goals and stage summaries of this run laid over those of the results file at ``path``
    (same device only): new entries replace old ones with the same (stage, variant) / goal name /
    stage, old ones not measured now are kept and marked ``"from_earlier_run": true``. With
    ``known`` (the variant names the script measures now), old rows of other variants are dropped."""
    import json

    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return rows, goals, summary, None
    if old.get("device") != device_name(device):
        raise SystemExit(f"--merge: {path} was measured on {old.get('device')!r}, not on {device_name(device)!r}; "
                         "write to another --json file")
    if old.get("size") != size:
        raise SystemExit(f"--merge: {path} holds size {old.get('size')!r}, this run size {size!r}; write to another --json file")
    old_rows = [r for r in old.get("rows", []) if known is None or r.get("variant") in known
                or r.get("variant") == "data loader" or str(r.get("variant", "")).startswith("genvl train loop")]
    new_rows = {(r["stage"], r["variant"]) for r in rows}
    # a stage's MFU goal names its best variant: while variants of the earlier run are kept beside
    # this run's (a partial rerun with --skip), that earlier goal stays
    partial = {r.get("stage") for r in old_rows if "mfu_pct" in r and (r.get("stage"), r.get("variant"))
               not in new_rows}
    goals = [g for g in goals if not (g["name"].endswith(" MFU") and g["name"][: -len(" MFU")] in partial
                                      and any(o.get("name") == g["name"] for o in old.get("goals", [])))]
    new_goals = {g["name"] for g in goals}
    kept_rows = [{**r, "from_earlier_run": True} for r in old_rows if (r.get("stage"), r.get("variant")) not in new_rows]
    kept_goals = [{**g, "from_earlier_run": True} for g in old.get("goals", []) if g.get("name") not in new_goals]
    stages = {**old.get("stages", {}), **summary}
    order = list(stages)  # stages in the order first measured
    rows = sorted(kept_rows + rows, key=lambda r: order.index(r["stage"]) if r["stage"] in order else len(order))
    goals = kept_goals + goals
    return rows, goals, stages, {"path": path, "config": old.get("config"), "kept_rows": len(kept_rows),
                                 "kept_goals": len(kept_goals)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--size", choices=["tiny", "small", "base"], help="model sizes (default: base on GPU, small on CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--batch", type=int, help="micro-batch for every stage (default per stage and device)")
    p.add_argument("--steps", type=int, help="timed steps per variant (mean; default 10 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the loader and loop runs (default 8 GPU, 0 CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="what times a step: auto = this process's CPU time on a 1-thread CPU run (robust to "
                        "other load on the machine), wall time otherwise")
    p.add_argument("--no-loop", action="store_true", help="skip the full-loop and data-loader measurements")
    p.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    p.add_argument("--variants", default="",
                   help="';'-separated variant names: measure only these (default: every variant of the device)")
    p.add_argument("--dense-size", type=int,
                   help="side of the reference matmul of MFU (default 8192 CUDA, 2048 CPU; smaller: a quick check)")
    p.add_argument("--work", help="folder for the synthetic data and model directories (default: a temp folder)")
    p.add_argument("--json", default="benchmarks/results/train_speed.json", help="where to write the results")
    p.add_argument("--merge", action="store_true",
                   help="update the --json file instead of replacing it: rows (by stage and variant), goals (by "
                        "name) and stage summaries measured now replace the old ones, the rest are kept (for "
                        "rerunning part of the benchmark on the same device)")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    set_threads(device, args.threads)
    clock = pick_clock(args.clock, device)
    size = args.size or ("base" if gpu else "small")
    steps = args.steps or (10 if gpu else 5)
    workers = args.workers if args.workers is not None else (8 if gpu else 0)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = {s.strip() for s in args.variants.split(";") if s.strip()}
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    names = {v.name for s in stages for dt in (None, "fp32", "bf16") for v in variants_for(s, gpu, dt)}
    if only - names:
        p.error(f"--variants: no variant {sorted(only - names)} on {device.type}; variants: {'; '.join(sorted(names))}")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are real fp32
    tmp = tempfile.TemporaryDirectory(prefix="genvl-train-speed-") if not args.work else None
    work = Path(args.work or tmp.name)

    load_start = load_average()
    refs = {mp: dense_rate(device, dtype, clock, args.dense_size)
            for mp, dtype in (("bf16", torch.bfloat16), ("no", torch.float32))}
    peak = {mp: r["flop_per_s"] for mp, r in refs.items()}  # the MFU denominator of a variant's precision
    mfu_ref = (f"bf16 {peak['bf16'] / 1e12:.3f} / fp32 {peak['no'] / 1e12:.3f} TFLOP/s dense rate measured"
               + (" (CPU clock)" if clock == "cpu" else ""))
    print(f"device: {device_name(device)}; torch {torch.__version__}; size {size}; {mfu_ref}; clock {clock}"
          + (f"; load average {load_start}" if device.type == "cpu" else ""))

    rows, goals, summary = [], [], {}
    for stage in stages:
        batch = args.batch or BATCH[device.type][stage]
        # the loop and loader runs read epochs of IMAGES_PER_BATCH batches; the bare step one batch
        setup = prepare_stage(stage, size, work, batch, n_images=batch if args.no_loop else IMAGES_PER_BATCH * batch)
        setup.cfg.data.num_workers = workers
        print(f"\n[{stage}] size {size}, batch {batch}, data {setup.data.name}")
        flops, n_params, fast_dtype, stage_rows = None, None, None, []
        dataset = None
        measured = set()
        while True:
            todo = [v for v in variants_for(stage, gpu, fast_dtype)
                    if v.name not in measured and v.name not in skip and (not only or v.name in only)]
            if not todo:
                if not gpu and fast_dtype is None:  # both eager precisions measured: pick the compile dtype
                    eager = {r["variant"]: r["step_s"] for r in stage_rows if "step_s" in r}
                    fast_dtype = "bf16" if eager.get("bf16 eager", 1e9) < eager.get("fp32 eager", 1e9) else "fp32"
                    continue
                break
            v = todo[0]
            measured.add(v.name)
            bare = None
            try:
                bare = BareStep(setup, v, device, dataset)
                dataset = bare.dataset
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                t = time_steps(bare.step, device, args.warmup, steps, clock)
                row = {"stage": stage, "variant": v.name, "batch": batch, "mixed_precision": v.mixed_precision, **t,
                       "samples_per_s": batch / t["step_s"], "notes": bare.notes}
                if gpu:
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if flops is None and not v.compile:
                    flops, n_params = bare.count_flops(), bare.trainable_parameters()
                    summary[stage] = {"optimizer_s": optimizer_times(bare.model, device, clock)}
            except Exception as e:  # noqa: BLE001 - one failing variant (no compiler, say) must not lose the rest
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"  {v.name}: failed ({msg})")
                row = {"stage": stage, "variant": v.name, "error": msg}
            finally:
                if bare is not None:
                    bare.close()
                del bare
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
            stage_rows.append(row)
            if "step_s" in row:
                print(f"  {v.name:<28} {row['step_s'] * 1000:9.1f} ms/step  {row['samples_per_s']:8.1f} samples/s"
                      f"  (first step {row['first_step_s']:.1f} s)")
        for r in stage_rows:
            if "step_s" in r and flops:
                r["tflop_per_step"] = flops / 1e12
                r["achieved_tflops"] = flops / r["step_s"] / 1e12
                r["mfu_pct"] = 100 * flops / r["step_s"] / peak[r["mixed_precision"]]
        rows += stage_rows
        summary.setdefault(stage, {}).update({"flops_per_step": flops, "trainable_params": n_params, "batch": batch})

        ok = [r for r in stage_rows if "mfu_pct" in r]
        best = max(ok, key=lambda r: r["mfu_pct"]) if ok else None
        if gpu:  # the goals are for the bf16 path
            best = max((r for r in ok if r["mixed_precision"] == "bf16"), key=lambda r: r["mfu_pct"], default=best)
        target = MFU_GOALS[stage]
        if best is None:
            goals.append(goal(f"{stage} MFU", None, "% MFU", f">= {target:.0f}% MFU on H100", "not measured here",
                              "every variant failed"))
        elif is_h100(device) and size == "base":
            goals.append(goal(f"{stage} MFU", best["mfu_pct"], "% MFU", f">= {target:.0f}% MFU on H100",
                              at_least(best["mfu_pct"], target), f"best variant: {best['variant']}, batch {batch}"))
        else:
            why = "no GPU" if not gpu else f"{device_name(device)} at size {size}, not an H100 at base"
            goals.append(goal(f"{stage} MFU", None, "% MFU", f">= {target:.0f}% MFU on H100", "not measured here",
                              f"not measurable here ({why}); here the best variant ({best['variant']}) reaches "
                              f"{best['mfu_pct']:.1f}% MFU against the measured "
                              f"{'bf16' if best['mixed_precision'] == 'bf16' else 'fp32'} dense rate"))

        if stage in XFORMERS_STAGES:
            goals.append(xformers_goal(stage, stage_rows, gpu, device))
        if args.no_loop or best is None:
            continue
        # (b) the DataLoader against the fastest step
        fastest = min((r for r in stage_rows if "step_s" in r), key=lambda r: r["step_s"])
        lr = loader_rate(setup, device, batches=16)
        # with worker processes the main process's CPU clock misses their work: wall clock then
        lclock = clock if workers == 0 else "wall"
        lrate = lr[lclock]
        srate = 1 / (fastest["step_cpu_s"] if lclock == "cpu" else fastest["step_wall_s"])
        rows.append({"stage": stage, "variant": "data loader", "batches_per_s": lrate, "clock": lclock,
                     "batches_per_wall_s": lr["wall"], "workers": workers, "fastest_step_per_s": srate,
                     "fastest_variant": fastest["variant"]})
        print(f"  {'data loader':<28} {lrate:9.1f} batches/s ({workers} workers) vs {srate:.2f} steps/s "
              f"({fastest['variant']})")
        goals.append(goal(f"{stage} data loader / step rate", lrate / srate, "x", ">= 1 (loader keeps up)",
                          at_least(lrate / srate, 1.0), f"{workers} workers, against {fastest['variant']} on "
                          f"{device_name(device)}"))
        # (a) the full loop against the bare step of the same recipe (the trainer's default precision
        # and optimizer: bf16 on CUDA, fp32 on the CPU, fused AdamW on both)
        ref_name = "bf16 eager" if gpu else "fp32 eager"
        ref = next((r for r in stage_rows if r["variant"] == ref_name and "step_s" in r), None)
        if ref is None:
            continue
        ref_variant = next(v for v in variants_for(stage, gpu, fast_dtype) if v.name == ref_name)
        loop = loop_rate(setup, ref_variant, device, work / f"loop-{stage}", warm_steps=IMAGES_PER_BATCH,
                         measure_steps=LOOP_EPOCHS * IMAGES_PER_BATCH, clock=clock)
        loop["samples_per_s"] = batch / loop["step_s"]
        replay_sps = batch / loop["bare_step_s"]
        ratio = loop["samples_per_s"] / replay_sps
        ratio_median = loop["ratio_median"]
        rows.append({"stage": stage, "variant": f"genvl train loop ({ref_name})", **loop,
                     "bare_samples_per_s": replay_sps, "bare_fixed_batch_samples_per_s": ref["samples_per_s"],
                     "ratio": ratio})
        print(f"  {'bare step, same batches':<28} {loop['bare_step_s'] * 1000:9.1f} ms/step  {replay_sps:8.1f} samples/s")
        print(f"  {'genvl train loop':<28} {loop['step_s'] * 1000:9.1f} ms/step  {loop['samples_per_s']:8.1f} "
              f"samples/s = {ratio:.3f} x the bare step (median of per-step ratios: {ratio_median:.3f})")
        extra_ms = (loop["step_s"] - loop["bare_step_s"]) * 1000
        loader_ms = 1000 / lrate if workers == 0 else None  # in-process loading is part of the loop's step
        goals.append(goal(f"{stage} train loop / bare step", ratio, "x", ">= 0.95", at_least(ratio, 0.95),
                          f"{ref_name}, EMA on, {workers} loader workers, bare step timed alternately with the loop "
                          f"on its {len(loop['step_all_s'])} batches (median of per-step ratios {ratio_median:.3f}); "
                          f"the loop takes {extra_ms:+.1f} ms/step over the bare step"
                          + (f", of which loading a batch in-process is {loader_ms:.1f} ms" if loader_ms else "")
                          + f"; on {device_name(device)}"))

    # tables
    print(f"\n{'stage':<8} {'variant':<28} {'ms/step':>9} {'samples/s':>10} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'first s':>8}" + ("  peak GiB" if gpu else f" {'wall ms':>9}"))
    for r in rows:
        if "first_step_s" in r:
            line = (f"{r['stage']:<8} {r['variant']:<28} {r['step_s'] * 1000:9.1f} {r['samples_per_s']:10.1f} "
                    f"{r.get('achieved_tflops', 0):8.3f} {r.get('mfu_pct', 0):6.1f} {r['first_step_s']:8.1f}")
            print(line + (f"  {r['peak_gib']:8.2f}" if gpu else f" {r['step_wall_s'] * 1000:9.1f}"))
        elif "error" in r:
            print(f"{r['stage']:<8} {r['variant']:<28} failed: {r['error'][:60]}")
    for r in rows:
        if "ratio" in r:
            print(f"{r['stage']:<8} {'genvl train loop':<28} {r['step_s'] * 1000:9.1f} {r['samples_per_s']:10.1f}"
                  f"  = {r['ratio']:.3f} x the bare step")
        elif "batches_per_s" in r:
            print(f"{r['stage']:<8} {'data loader':<28} {r['batches_per_s']:9.1f} batches/s ({r['workers']} workers)"
                  f" = {r['batches_per_s'] / r['fastest_step_per_s']:.2f} x the fastest step rate")
    print(f"\n{'stage':<8} {'GFLOP/step':>11} {'params':>10} " + " ".join(f"{'AdamW ' + k + ' ms':>18}" for k in
                                                                       ("for-loop", "foreach", "fused")))
    for stage, s in summary.items():
        opt = s.get("optimizer_s", {})
        cells = " ".join(f"{(opt.get(k) or float('nan')) * 1000:18.2f}" for k in ("for-loop", "foreach", "fused"))
        print(f"{stage:<8} {(s['flops_per_step'] or 0) / 1e9:11.2f} {s['trainable_params'] or 0:10,d} {cells}")
    print()
    print_goals(goals)
    merged_from = None
    if args.merge:
        known = {v.name for s in stages for dt in (None, "fp32", "bf16") for v in variants_for(s, gpu, dt)}
        rows, goals, summary, merged_from = merge_previous(args.json, device, size, rows, goals, summary, known)
    result = write_result(
        args.json, "train_speed", device, args, goals, rows, size=size, steps=steps,
        cpu_load_average={"start": load_start, "end": load_average()} if not gpu else None,
        clock=clock,
        clock_note="cpu: step times are this process's CPU seconds (one thread), so other processes on the "
                   "machine do not inflate them; wall-clock times are kept beside them (step_wall_s)"
                   if clock == "cpu" else "wall clock (CUDA synchronised)",
        mfu_reference={"bf16": refs["bf16"], "fp32": refs["no"],
                       "note": "MFU = counted FLOPs per step / step time / the dense rate of the variant's precision "
                               "measured in this run (bf16 autocast rows: bf16; fp32 rows: fp32)"
                               + ("; CPU: the faster of a 2048^3 matmul and a 3x3 convolution on the threads in use, "
                                  "not a GPU peak" if not gpu else "; CUDA: 8192^3 matmul, TF32 off")},
        stages=summary, merged_from=merged_from,
        flop_counting="torch.utils.flop_counter.FlopCounterMode over one forward + backward of task.loss "
                      "(fp32 eager model; matmul, convolution and attention FLOPs; frozen encoders in the loss included)",
    )
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
