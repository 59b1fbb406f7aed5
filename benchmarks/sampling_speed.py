"""unCLIP sampling speed: eager vs compiled vs CUDA graphs, decoder schedulers at equal quality, AR fast path.

Three parts; each measures genvl's path and its baseline in the same run:

a. ``speed``       :func:`genvl.sampling.unclip.text_to_image` images/s at batch 1 and 16 (one image
                   per prompt, the model's scheduler / guidance / prior candidates, no super-res) with
                   - ``eager``       the modules as loaded (the baseline)
                   - ``compile``     ``torch.compile`` of the prior and decoder forwards
                                     (:func:`genvl.sampling.fast.compile_components`, mode "default")
                   - ``cudagraphs``  the same in mode "reduce-overhead" (CUDA graphs; CUDA only -- on a
                                     CPU the rows say "not measurable")
                   Each mode has its own copy of the prior / decoder; the timed runs of the modes are
                   interleaved (eager, compile, cudagraphs, eager, ...) so a busy machine slows them
                   alike, and the median of ``--repeats`` is kept. The first call of a compiled mode
                   (compilation) is timed separately. The compiled images are checked against eager
                   ones (max abs difference). ``--decoder-size`` adds rows for randomly initialised
                   decoders of genvl's named sizes (speed only; "demo" = the model's own decoder).
                   Goal: at batch 1 the fastest non-eager mode >= 3x eager (a launch-bound GPU).
b. ``schedulers``  the decoder's samplers at their step counts (default DPM-Solver++ 20, DDIM 50,
                   DDPM 250) on the same prior embeddings (sampled once), so only the decoder's
                   scheduler differs: UNet evaluations, wall time, and the Frechet distance in a
                   judge CLIP's image-embedding space (genvl.evaluation.generation.frechet_distance)
                   between each sampler's images and a DDPM-250 reference set. The samplers draw
                   their initial noise from one seed, the reference from another; a second DDPM-250
                   run on the samplers' seed gives the noise floor FD(DDPM-250, DDPM-250'). A sampler
                   keeps the quality when its FD <= ``--fd-tolerance`` x the noise floor.
c. ``ar``          benchmarks/ar_sampling.py's run (genvl's decode loop vs transformers' generate),
                   its goal repeated here.

Prints one table per part and writes JSON (device name, torch version, config, goals, rows) to
``--json``. Defaults on CUDA: the demo and a random "base" decoder (300M, 64 px), the model's
sampling steps, 16 prompts x 4 images for the schedulers. On CPU (one thread unless ``--threads``):
the demo only, 10 decoder / 5 prior steps for the speed rows, 16 prompts x 1 image (~8 minutes on
a busy 2-core machine, most of it the two DDPM-250 runs and the first compilation).

    python benchmarks/sampling_speed.py                                  # CUDA
    python benchmarks/sampling_speed.py --device cpu                     # CPU, small
    python benchmarks/sampling_speed.py --parts speed --decoder-size demo,small --batches 1,4
    python benchmarks/sampling_speed.py --parts schedulers --schedulers dpm++:20,ddim:50,ddpm:250 --images 4
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ar_sampling  # noqa: E402
from ar_sampling import device_name, goal, sync  # noqa: E402

from genvl.checkpoint import open_model_dir  # noqa: E402
from genvl.evaluation.generation import clip_score, frechet_distance  # noqa: E402
from genvl.sampling.fast import compile_components  # noqa: E402
from genvl.sampling.unclip import UnclipComponents, sample_decoder, sample_prior, text_to_image  # noqa: E402

MODES = ("eager", "compile", "cudagraphs")
COMPILE_MODE = {"compile": "default", "cudagraphs": "reduce-overhead"}
SPEED_GOAL = 3.0  # x eager images/s at batch 1


def _model_defaults(md) -> dict:
    s = md.meta.get("sampling", {})
    return {"steps": int(s.get("steps", 50)), "prior_steps": int(s.get("prior_steps", 25)),
            "guidance": float(s.get("guidance", 3.0)), "prior_guidance": float(s.get("prior_guidance", 4.0)),
            "scheduler": str(s.get("scheduler", "ddim")), "prior_candidates": int(s.get("prior_candidates", 1))}


def _read_prompts(path: Path, n: int) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise SystemExit(f"{path}: no prompts")
    return [lines[i % len(lines)] for i in range(n)]


def _timed(fn, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------------------------- part a
def _decoder_variants(comps: UnclipComponents, sizes: list[str], device) -> list[tuple[str, UnclipComponents]]:
    from genvl.models.decoder import Decoder, decoder_config

    out = []
    for size in sizes:
        if size == "demo":
            out.append(("demo", comps))
            continue
        torch.manual_seed(0)
        cfg = decoder_config(size, embed_dim=comps.clip.config.embed_dim)
        dec = Decoder(cfg).to(device).eval()  # random weights: speed only
        out.append((f"{size} (random)", replace(comps, decoder=dec)))
    return out


def run_speed(comps: UnclipComponents, args, d: dict, device, prompts: list[str]) -> tuple[list[dict], list[dict]]:
    gpu = device.type == "cuda"
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for label, base in _decoder_variants(comps, args.decoder_size.split(","), device):
        torch.compiler.reset()  # each decoder size starts with empty compile caches
        runnable = {}
        for m in modes:
            if m == "cudagraphs" and not gpu:
                continue
            if m == "eager":
                runnable[m] = base
            else:  # own copies of the looped modules, compiled in place
                c = replace(base, prior=copy.deepcopy(base.prior), decoder=copy.deepcopy(base.decoder))
                runnable[m] = compile_components(c, COMPILE_MODE[m], parts=args.compile_parts.split(","))
        dec_params = sum(p.numel() for p in base.decoder.parameters())
        for B in [int(b) for b in args.batches.split(",")]:
            batch_prompts = prompts[:B] if B <= len(prompts) else [prompts[i % len(prompts)] for i in range(B)]

            def make(c):
                return lambda: text_to_image(
                    c, batch_prompts, num_images=1, steps=d["speed_steps"], prior_steps=d["speed_prior_steps"],
                    guidance=d["guidance"], prior_guidance=d["prior_guidance"], scheduler=d["scheduler"],
                    prior_candidates=d["prior_candidates"], superres=False, seed=0).images

            first, images, failed = {}, {}, {}
            for m, c in list(runnable.items()):  # warm-up: allocations, compilation
                try:
                    first[m], images[m] = _timed(make(c), device)
                except Exception as e:  # e.g. no compiler toolchain: keep the other modes
                    failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"  {label} batch {B} {m}: failed ({failed[m]})")
                    del runnable[m]
            times = {m: [] for m in runnable}
            for _ in range(args.repeats):  # interleaved timed runs
                for m, c in runnable.items():
                    times[m].append(_timed(make(c), device)[0])
            eager_ips = B / statistics.median(times["eager"]) if "eager" in times else None
            for m in modes:
                row = {"decoder": label, "decoder_params": dec_params, "batch": B, "mode": m,
                       "decoder_steps": d["speed_steps"], "prior_steps": d["speed_prior_steps"],
                       "unet_batch": 2 * B if d["guidance"] != 1.0 else B}
                if m in failed:
                    row["error"] = failed[m]
                    rows.append(row)
                    continue
                if m not in runnable:
                    row["error"] = "not measurable on this device (CUDA graphs need CUDA)"
                    rows.append(row)
                    continue
                sec = statistics.median(times[m])
                row.update(seconds=sec, images_per_s=B / sec, first_call_s=first[m],
                           ms_per_decoder_step=1000 * sec / d["speed_steps"],
                           speedup_vs_eager=(B / sec) / eager_ips if eager_ips else None)
                if m != "eager" and "eager" in images:
                    row["max_abs_diff_vs_eager"] = float((images[m].float() - images["eager"].float()).abs().max())
                rows.append(row)
        del runnable
    torch.compiler.reset()

    head = f"{'decoder':<16} {'batch':>5} {'mode':<11} {'images/s':>9} {'x eager':>8} {'ms/step':>8} {'1st call s':>10} {'max|diff|':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            why = "not measurable (needs CUDA)" if r["error"].startswith("not measurable") else "failed"
            print(f"{r['decoder']:<16} {r['batch']:>5} {r['mode']:<11} {why:>40}")
            continue
        diff = f"{r['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in r else "-"
        print(f"{r['decoder']:<16} {r['batch']:>5} {r['mode']:<11} {r['images_per_s']:>9.2f} "
              f"{r['speedup_vs_eager']:>8.2f} {r['ms_per_decoder_step']:>8.1f} {r['first_call_s']:>10.1f} {diff:>9}")
    return rows, speed_goals(rows, gpu)


def speed_goals(rows: list[dict], gpu: bool) -> list[dict]:
    name = "unCLIP sampling at batch 1: fastest compiled mode vs eager (demo model)"
    target = f">= {SPEED_GOAL:g}x eager images/s"
    b1 = [r for r in rows if r["decoder"] == "demo" and r["batch"] == 1 and "error" not in r]
    eager = next((r for r in b1 if r["mode"] == "eager"), None)
    fast = max((r for r in b1 if r["mode"] != "eager"), key=lambda r: r["images_per_s"], default=None)
    if eager is None or fast is None:
        return [goal(name, None, "x", target, "not measured here", "no eager or compiled batch-1 row for the demo")]
    ratio = fast["images_per_s"] / eager["images_per_s"]
    note = (f"{fast['mode']} {fast['images_per_s']:.2f} images/s vs eager {eager['images_per_s']:.2f} "
            f"({fast['decoder_steps']} decoder + {fast['prior_steps']} prior steps)")
    if not gpu:
        note += ("; CPU: the 32 px UNet at batch 1 spends its time in conv / attention arithmetic, not in kernel "
                 "launches, and compile only fuses the elementwise ops around them; CUDA graphs, the lever on a "
                 "launch-bound GPU, do not exist on CPU -- the 3x target is for CUDA")
    return [goal(name, ratio, "x", target, "met" if ratio >= SPEED_GOAL else "missed", note)]


# ---------------------------------------------------------------------------------------- part b
@torch.no_grad()
def run_schedulers(comps: UnclipComponents, args, d: dict, device, prompts: list[str]) -> tuple[list[dict], list[dict], dict]:
    from genvl.tokenizers.text import encode_texts

    samplers = []
    for item in args.schedulers.split(","):
        kind, steps = item.split(":")
        samplers.append((kind.strip(), int(steps)))
    ref_kind, ref_steps = samplers[-1]  # the last is the reference (DDPM 250)
    n = args.images
    P = len(prompts)

    judge_dir = args.judge or ("runs/demo-judge" if (ROOT / "runs/demo-judge/genvl.json").is_file() else None)
    if judge_dir and judge_dir != "self":
        jmd = open_model_dir(judge_dir if Path(judge_dir).is_absolute() else ROOT / judge_dir)
        judge, judge_tok = jmd.load("clip", device=str(device)).eval(), jmd.tokenizer()
    else:
        judge, judge_tok, judge_dir = comps.clip, comps.tokenizer, "the model's own CLIP"

    t0 = time.perf_counter()
    z = sample_prior(comps.prior, comps.clip, comps.tokenizer, prompts, num_images_per_prompt=n,
                     steps=d["prior_steps"], guidance=d["prior_guidance"], scheduler=d["scheduler"],
                     generator=torch.Generator().manual_seed(args.seed), candidates=d["prior_candidates"])
    prior_s = time.perf_counter() - t0
    N = len(z)
    owner = torch.arange(P).repeat_interleave(n)
    enc = encode_texts(judge_tok, prompts)
    z_txt = judge.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).embeds.float().cpu()

    calls = {"n": 0, "rows": 0}

    def count(_module, inputs):
        calls["n"] += 1
        calls["rows"] += inputs[0].shape[0]

    hook = comps.decoder.register_forward_pre_hook(count)

    def decode(kind: str, steps: int, seed: int) -> tuple[torch.Tensor, float, dict]:
        calls.update(n=0, rows=0)
        out, sec = [], 0.0
        for i in range(0, N, args.decode_batch):
            zb = z[i:i + args.decode_batch]
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + i + j) for j in range(len(zb))]
            dt, x = _timed(lambda: sample_decoder(comps.decoder, zb, steps=steps, guidance=d["guidance"],
                                                  scheduler=kind, generator=gens), device)
            out.append(x.cpu())
            sec += dt
        return torch.cat(out), sec, dict(calls)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([judge.encode_image(images[i:i + 64].to(device)).float().cpu() for i in range(0, len(images), 64)])

    seed_ref, seed_test = args.seed + 1, args.seed + 2
    runs = [(f"{ref_kind} {ref_steps} (reference, seed {seed_ref})", ref_kind, ref_steps, seed_ref, "reference")]
    runs += [(f"{k} {s}", k, s, seed_test, "sampler") for k, s in samplers]
    runs[-1] = (f"{ref_kind} {ref_steps} (noise floor, seed {seed_test})", ref_kind, ref_steps, seed_test, "floor")
    results = {}
    try:
        for label, kind, steps, seed, role in runs:
            images, sec, c = decode(kind, steps, seed)
            results[label] = {"kind": kind, "steps": steps, "seed": seed, "role": role, "images": images,
                              "seconds": sec, "calls": c, "emb": embed(images)}
            print(f"  {label}: {sec:.1f} s, {c['n']} UNet calls ({c['rows']} rows)")
    finally:
        hook.remove()
    ref = next(r for r in results.values() if r["role"] == "reference")
    floor = next(r for r in results.values() if r["role"] == "floor")
    fd_floor = frechet_distance(floor["emb"], ref["emb"])
    rows = []
    for label, r in results.items():
        fd = frechet_distance(r["emb"], ref["emb"]) if r is not ref else 0.0
        rows.append({
            "sampler": label, "scheduler": r["kind"], "steps": r["steps"], "seed": r["seed"], "role": r["role"],
            "images": N, "unet_calls": r["calls"]["n"], "unet_rows": r["calls"]["rows"],
            "unet_evals_per_image": r["calls"]["rows"] / N, "seconds": r["seconds"], "images_per_s": N / r["seconds"],
            "fd_vs_reference": fd if r is not ref else None,
            "fd_over_noise_floor": fd / fd_floor if r is not ref and fd_floor > 0 else None,
            "clip_score": clip_score(r["emb"], z_txt[owner]),
            "quality_kept": (fd <= args.fd_tolerance * fd_floor) if r["role"] == "sampler" else None,
        })
    ref_row = next(r for r in rows if r["role"] == "floor")
    for r in rows:
        r["speedup_vs_ddpm_reference"] = ref_row["seconds"] / r["seconds"]

    head = f"{'sampler':<34} {'UNet calls':>10} {'seconds':>8} {'x faster':>8} {'FD':>8} {'FD/floor':>8} {'CLIPscore':>9} {'kept':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        fd = f"{r['fd_vs_reference']:.4f}" if r["fd_vs_reference"] is not None else "-"
        ratio = f"{r['fd_over_noise_floor']:.2f}" if r["fd_over_noise_floor"] is not None else "-"
        kept = {True: "yes", False: "no", None: "-"}[r["quality_kept"]]
        print(f"{r['sampler']:<34} {r['unet_calls']:>10} {r['seconds']:>8.1f} {r['speedup_vs_ddpm_reference']:>8.1f} "
              f"{fd:>8} {ratio:>8} {r['clip_score']:>9.2f} {kept:>5}")

    info = {"judge": str(judge_dir), "prompts": P, "images_per_prompt": n, "images": N, "prior_seconds": prior_s,
            "fd_noise_floor": fd_floor, "embed_dim": int(ref["emb"].shape[1]),
            "quality_criterion": (f"a sampler keeps the quality when FD(sampler images, {ref_kind}-{ref_steps} reference "
                                  f"images) <= {args.fd_tolerance:g} x the noise floor FD({ref_kind}-{ref_steps} on the "
                                  "samplers' seed, reference); FD in the judge CLIP's image-embedding space, same prior "
                                  "embeddings for every set")}
    if N <= ref["emb"].shape[1]:
        info["caveat"] = (f"{N} images in a {ref['emb'].shape[1]}-d space: the covariances are rank-deficient and the "
                          "FDs noisy; the noise floor is measured at the same N, so the ratio is the comparable figure")
    return rows, scheduler_goals(rows, args, N), info


def scheduler_goals(rows: list[dict], args, N: int) -> list[dict]:
    goals = []
    floor = next(r for r in rows if r["role"] == "floor")
    for r in rows:
        if r["role"] != "sampler" or r["scheduler"] == "ddpm":
            continue
        note = (f"FD {r['fd_vs_reference']:.4f} vs noise floor {floor['fd_vs_reference']:.4f} ({N} images); "
                f"{r['unet_calls']} UNet calls, {r['speedup_vs_ddpm_reference']:.1f}x faster than "
                f"{floor['scheduler']} {floor['steps']}")
        goals.append(goal(f"decoder {r['scheduler']} {r['steps']} steps keeps {floor['scheduler']}-{floor['steps']} quality",
                          r["fd_over_noise_floor"], "x noise-floor FD", f"<= {args.fd_tolerance:g}x",
                          "met" if r["quality_kept"] else "missed", note))
    dpm = next((r for r in rows if r["role"] == "sampler" and r["scheduler"] == "dpm++"), None)
    if dpm is not None:
        evals = floor["unet_calls"] / dpm["unet_calls"]
        goals.append(goal(f"decoder dpm++ {dpm['steps']} wall time vs {floor['scheduler']} {floor['steps']}",
                          dpm["speedup_vs_ddpm_reference"], "x", f">= 10x with the quality kept ({evals:.1f}x fewer UNet calls)",
                          "met" if dpm["speedup_vs_ddpm_reference"] >= 10 and dpm["quality_kept"] else "missed",
                          f"{dpm['seconds']:.1f} s vs {floor['seconds']:.1f} s for {N} images"))
    return goals


# ---------------------------------------------------------------------------------------- part c
def run_ar(args, device) -> tuple[dict, list[dict]]:
    argv = ["--device", str(device), "--json", ""] + shlex.split(args.ar_args)
    if args.threads:
        argv += ["--threads", str(args.threads)]
    print(f"ar_sampling.py {' '.join(argv)}")
    res = ar_sampling.main(argv)
    goals = [{**g, "name": f"{g['name']} (ar_sampling re-run)"} for g in res["goals"]]
    return res, goals


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU)")
    p.add_argument("--model", default="demo", help="model directory (default: the built-in demo)")
    p.add_argument("--parts", default="speed,schedulers,ar", help="which parts to run")
    p.add_argument("--prompts", default=str(ROOT / "configs/demo-prompts.txt"), help="prompt file, one a line")
    # a. speed
    p.add_argument("--decoder-size", help="comma-separated: demo (the model's) and/or tiny, small, base (random "
                                          "weights); default demo on CPU, demo,base on CUDA")
    p.add_argument("--batches", default="1,16", help="batch sizes (images per text_to_image call)")
    p.add_argument("--modes", default=",".join(MODES), help="eager, compile, cudagraphs")
    p.add_argument("--compile-parts", default="prior,decoder", help="modules compiled in the compiled modes")
    p.add_argument("--speed-steps", type=int, help="decoder steps in the speed rows (default: the model's; 10 on CPU)")
    p.add_argument("--speed-prior-steps", type=int, help="prior steps in the speed rows (default: the model's; 5 on CPU)")
    p.add_argument("--repeats", type=int, help="timed runs per mode and batch (median; default 5 on CUDA, 3 on CPU)")
    # b. schedulers
    p.add_argument("--schedulers", default="dpm++:20,ddim:50,ddpm:250",
                   help="kind:steps,...; the last is the reference (and the noise floor)")
    p.add_argument("--num-prompts", type=int, default=16, help="prompts for the scheduler comparison")
    p.add_argument("--images", type=int, help="images per prompt (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--decode-batch", type=int, help="images per decoder call (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--judge", help="model dir of the CLIP that embeds the images (default runs/demo-judge if "
                                   "present, else the model's own; 'self' = the model's own)")
    p.add_argument("--fd-tolerance", type=float, default=1.5, help="quality kept: FD <= this x the noise floor")
    p.add_argument("--seed", type=int, default=0)
    # c. ar
    p.add_argument("--ar-args", default="", help="extra arguments for ar_sampling.py (quoted)")
    p.add_argument("--json", default="benchmarks/results/sampling_speed.json", help="where to write the results")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    md = open_model_dir(args.model)
    d = _model_defaults(md)
    args.decoder_size = args.decoder_size or ("demo,base" if gpu else "demo")
    args.repeats = args.repeats or (5 if gpu else 3)
    args.images = args.images or (4 if gpu else 1)
    args.decode_batch = args.decode_batch or (64 if gpu else 16)
    d["speed_steps"] = args.speed_steps or (d["steps"] if gpu else 10)
    d["speed_prior_steps"] = args.speed_prior_steps or (d["prior_steps"] if gpu else 5)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}

    comps = UnclipComponents.from_model_dir(md, device=str(device))
    prompts = _read_prompts(Path(args.prompts), max(args.num_prompts, 1))
    print(f"device: {device_name(device)}; torch {torch.__version__}; model {md.path}; sampling {d}")
    result = {"benchmark": "sampling_speed", "device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "config": {**vars(args), "device": str(device), "sampling": d,
                                                     "threads": torch.get_num_threads()},
              "goals": [], "rows": {}}
    if "speed" in parts:
        print("\n== a. text_to_image speed: eager vs torch.compile vs CUDA graphs")
        rows, goals = run_speed(comps, args, d, device, prompts)
        result["rows"]["speed"] = rows
        result["goals"] += goals
        if not gpu:
            result["goals"].append(goal("unCLIP sampling at batch 1: CUDA graphs (reduce-overhead) vs eager", None, "x",
                                        f">= {SPEED_GOAL:g}x eager images/s", "not measured here",
                                        "CUDA graphs need a CUDA device; run on CUDA for this row"))
    if "schedulers" in parts:
        print(f"\n== b. decoder schedulers: {args.schedulers} ({args.num_prompts} prompts x {args.images} images)")
        rows, goals, info = run_schedulers(comps, args, d, device, prompts[:args.num_prompts])
        result["rows"]["schedulers"] = rows
        result["schedulers"] = info
        result["goals"] += goals
    if "ar" in parts:
        print("\n== c. autoregressive fast path (benchmarks/ar_sampling.py)")
        res, goals = run_ar(args, device)
        result["rows"]["ar"] = res["rows"]
        result["ar_config"] = res["config"]
        result["goals"] += goals

    print("\ngoals:")
    for g in result["goals"]:
        m = f"{g['measured']:.3g} {g['unit']}" if g["measured"] is not None else "-"
        print(f"  [{g['status']}] {g['name']}: {m} (goal {g['goal']})")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
