"""``genvl sample`` on a 2-core CPU: wall time against quality for the demo's unCLIP settings.

Three parts, each measuring the old default and its candidates in the same run:

a. ``frontier``  every sampling setting of ``--settings`` (today's recommended ones, ``old``, first)
                 draws ``--images`` images for each demo prompt (configs/demo-prompts.txt) through
                 :func:`genvl.sampling.unclip.text_to_image`, the loop ``genvl sample`` runs, at the
                 model's full size (decoder, then super-resolution). The settings take turns prompt
                 by prompt (old, a, b, ..., old, a, b, ...), so a busy machine slows them alike; the
                 wall time per image is the median over the prompts of one call's time / images.
                 Quality, in a judge CLIP's image-embedding space (runs/demo-judge, an independent
                 CLIP trained with genvl/recipes/demo-judge-clip.yaml, when present; else the
                 model's own CLIP):
                 - FD: the Frechet distance (genvl.evaluation.generation.frechet_distance) between
                   a setting's images and a reference set, the old default's images of another
                   seed. The old default's own FD to that reference, and that of a third seed, are
                   the noise band: a setting is within noise when its FD is at most the larger of
                   the two plus their spread (times ``--fd-tolerance``, default 1).
                 - CLIP score (genvl.evaluation.generation.clip_score) against each image's prompt;
                   within noise when it is no lower than the lowest of the old default's seeds
                   minus their spread.
                 - detail: the super-resolution stage's share of the image, the mean absolute
                   difference between the 64 px image and its 32 px version upsampled (x100; the
                   judge sees 32 px and is blind to it); within noise when inside the old
                   default's seeds' range widened by their spread on both sides.
b. ``e2e``       ``genvl sample PROMPT`` end to end in fresh processes (start-up, imports, model
                 loading, sampling, PNG writing): today's command (the old settings, with the
                 OpenMP threads left at libgomp's default of spinning while they wait: torch is
                 imported before the command line, which then cannot change it), the old settings
                 with the command line's thread set-up (sleeping workers when other tasks are
                 runnable at start, genvl.cli.passive_omp_waits), and the new default; plus the
                 floor, a process that only imports and loads the pipeline. Interleaved, median
                 of ``--repeats``; each run records whether other tasks were runnable just before
                 it started. With ``--busy N`` (default 2) the commands run again while N other
                 2-thread torch processes keep both cores busy, as other work on a shared machine
                 does (the case the command line's thread set-up is for).
c. ``png``       a side-by-side PNG of the old and the new default's images of every prompt (same seed).

Writes JSON (device, settings, rows, goals) to ``--json`` and the PNG to ``--png``.

    python benchmarks/cpu_sampling.py                          # all parts (~25-45 min on a 2-core machine)
    python benchmarks/cpu_sampling.py --parts frontier --images 2 --num-prompts 8
    python benchmarks/cpu_sampling.py --parts e2e --keep        # redo b, keep the file's frontier
    python benchmarks/cpu_sampling.py --settings "old;new;dpm++ 20/10/8 sr 10=scheduler:dpm++,steps:20,prior_steps:10,sr_steps:10"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# As the genvl command line does, before torch loads libgomp: idle OpenMP workers sleep instead of
# spinning when other tasks are runnable at start (genvl.cli.passive_omp_waits).
from genvl.cli import others_running, passive_omp_waits  # noqa: E402  (no torch import)

passive_omp_waits()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genvl.checkpoint import open_model_dir  # noqa: E402
from genvl.evaluation.generation import clip_score, frechet_distance  # noqa: E402
from genvl.pipelines import UnclipPipeline  # noqa: E402
from genvl.sampling.unclip import text_to_image  # noqa: E402
from genvl.tokenizers.text import encode_texts  # noqa: E402

#: The demo's recommended settings before this benchmark's change (genvl.json "sampling", super-res
#: at the pipelines' 25 steps): the baseline every row is compared with.
OLD_DEFAULT = {"steps": 50, "prior_steps": 25, "guidance": 1.5, "prior_guidance": 2.0, "scheduler": "ddim",
               "prior_candidates": 8, "coarse_start": 0.6, "sr_steps": 25}
#: The candidates of the frontier besides the old and the new default: "label=key:value,...", each
#: over the old default's settings.
CANDIDATES = (
    "dpm++ 20/10 x8 sr10=scheduler:dpm++,steps:20,prior_steps:10,sr_steps:10",
    "dpm++ 15/8 x4 sr6=scheduler:dpm++,steps:15,prior_steps:8,prior_candidates:4,sr_steps:6",
    "dpm++ 10/8 x4 sr5=scheduler:dpm++,steps:10,prior_steps:8,prior_candidates:4,sr_steps:5",
)
E2E_PROMPT = "a corgi in a sushi house"
GOAL_SPEEDUP = 3.0
INT_KEYS = ("steps", "prior_steps", "prior_candidates", "sr_steps")
FLOAT_KEYS = ("guidance", "prior_guidance", "coarse_start")


def device_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def goal(name: str, measured: float | None, unit: str, target: str, status: str, note: str) -> dict:
    """One entry of the results' ``goals`` (the schema every benchmark here writes)."""
    return {"name": name, "measured": measured, "unit": unit, "goal": target, "status": status, "note": note}


def new_default(model: str) -> dict:
    """The model's recommended settings now (genvl.json "sampling", completed as the pipelines do)."""
    from genvl.pipelines.base import resolve_settings

    return resolve_settings(open_model_dir(model).meta.get("sampling", {}), {})


def parse_settings(spec: str, new: dict) -> list[tuple[str, dict]]:
    """``--settings``: ";"-separated "old", "new" or "label=key:value,..." (over the old default)."""
    out: list[tuple[str, dict]] = []
    for item in (s.strip() for s in spec.split(";")):
        if not item:
            continue
        if item == "old":
            out.append(("old default", dict(OLD_DEFAULT)))
        elif item == "new":
            out.append(("new default", dict(new)))
        else:
            label, _, body = item.partition("=")
            s = dict(OLD_DEFAULT)
            for kv in body.split(","):
                key, _, value = kv.partition(":")
                key = key.strip()
                if key not in OLD_DEFAULT:
                    raise SystemExit(f"--settings {item!r}: unknown key {key!r}")
                s[key] = int(value) if key in INT_KEYS else float(value) if key in FLOAT_KEYS else value.strip()
            out.append((label.strip(), s))
    if not out or out[0][0] != "old default":
        raise SystemExit("--settings must start with 'old' (the baseline)")
    return out


def describe(s: dict) -> str:
    return (f"{s['scheduler']} {s['steps']} x coarse {s['coarse_start']:g} (= {decoder_evals(s)} decoder steps), "
            f"prior {s['prior_steps']} x {s['prior_candidates']} candidates, sr {s['sr_steps']}")


def decoder_evals(s: dict) -> int:
    from genvl.sampling.decoder import decoder_steps

    return decoder_steps(s["steps"], s["coarse_start"])


def read_prompts(path: Path, n: int) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[:n]


# ---------------------------------------------------------------------------------------- part a
def detail(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1] -> (N,) x100 mean |image - its half-size version upsampled|."""
    half = F.interpolate(images, scale_factor=0.5, mode="area")
    up = F.interpolate(half, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return 100 * (images - up).abs().mean(dim=(1, 2, 3))


@torch.no_grad()
def run_frontier(pipe: UnclipPipeline, settings: list[tuple[str, dict]], prompts: list[str], args) -> dict:
    judge_dir = args.judge or ("runs/demo-judge" if (ROOT / "runs/demo-judge/genvl.json").is_file() else "self")
    if judge_dir != "self":
        jmd = open_model_dir(judge_dir if Path(judge_dir).is_absolute() else ROOT / judge_dir)
        judge, judge_tok = jmd.load("clip").eval(), jmd.tokenizer()
    else:
        judge, judge_tok, judge_dir = pipe.components.clip, pipe.components.tokenizer, "the model's own CLIP"
    enc = encode_texts(judge_tok, prompts)
    z_txt = judge.encode_text(enc["input_ids"], enc["attention_mask"]).embeds.float()  # (P, D)

    seed_test, seed_ref, seed_third = args.seed, args.seed + 1000, args.seed + 2000
    # (label, settings, seed, role): the old default on the candidates' seed first, then each
    # candidate, then the reference and a third seed of the old default (the noise band)
    runs = [(label, s, seed_test, "old" if i == 0 else "candidate") for i, (label, s) in enumerate(settings)]
    runs += [("old default, reference seed", settings[0][1], seed_ref, "reference"),
             ("old default, third seed", settings[0][1], seed_third, "band")]
    n = args.images
    images = {r[0]: [] for r in runs}
    times = {r[0]: [] for r in runs}
    text_to_image(pipe.components, prompts[0], num_images=1, **{**settings[0][1], "steps": 2, "prior_steps": 2,
                                                                "sr_steps": 2}, seed=0)  # warm-up
    for i, prompt in enumerate(prompts):  # interleaved: every run draws this prompt before the next prompt
        for label, s, seed, _ in runs:
            t0 = time.perf_counter()
            out = text_to_image(pipe.components, prompt, num_images=n, seed=seed + i, **s)
            times[label].append((time.perf_counter() - t0) / n)
            images[label].append(out.images)
        print(f"  prompt {i + 1}/{len(prompts)} {prompt!r}: " +
              ", ".join(f"{label} {times[label][-1]:.2f}" for label, *_ in runs) + " s/image", flush=True)

    owner = torch.arange(len(prompts)).repeat_interleave(n)
    emb, stats = {}, {}
    for label, *_ in runs:
        x = torch.cat(images[label])  # (P*n, 3, 64, 64)
        images[label] = x
        emb[label] = torch.cat([judge.encode_image(x[j:j + 64]).float() for j in range(0, len(x), 64)])
        stats[label] = {"clip_score": clip_score(emb[label], z_txt[owner]), "detail": float(detail(x).mean())}
    ref = emb["old default, reference seed"]
    fd = {label: frechet_distance(e, ref) for label, e in emb.items() if label != "old default, reference seed"}
    old_label = settings[0][0]
    old_fds = [fd[old_label], fd["old default, third seed"]]
    band_fd = max(old_fds) + (max(old_fds) - min(old_fds))  # the band's upper edge
    clips = [stats[r[0]]["clip_score"] for r in runs if r[3] in ("old", "reference", "band")]
    details = [stats[r[0]]["detail"] for r in runs if r[3] in ("old", "reference", "band")]
    clip_lo = min(clips) - (max(clips) - min(clips))
    det_lo = min(details) - (max(details) - min(details))
    det_hi = max(details) + (max(details) - min(details))
    old_sec = statistics.median(times[old_label])

    rows = []
    for label, s, seed, role in runs:
        if role == "reference":
            continue
        sec = statistics.median(times[label])
        st = stats[label]
        within = {"fd": fd[label] <= args.fd_tolerance * band_fd, "clip_score": st["clip_score"] >= clip_lo,
                  "detail": det_lo <= st["detail"] <= det_hi}
        rows.append({"setting": label, "role": role, "seed": seed, "sampling": s, "decoder_evals": decoder_evals(s),
                     "seconds_per_image": sec, "seconds_per_image_all": times[label],
                     "speedup_vs_old": old_sec / sec, "fd": fd[label], "fd_over_band": fd[label] / band_fd,
                     "clip_score": st["clip_score"], "detail": st["detail"], "within_noise": within,
                     "equal_quality": all(within.values())})
    info = {"judge": str(judge_dir), "prompts": prompts, "images_per_prompt": n, "images": len(owner),
            "seeds": {"candidates": seed_test, "reference": seed_ref, "third": seed_third, "per_prompt": "seed + i"},
            "reference": {"clip_score": stats["old default, reference seed"]["clip_score"],
                          "detail": stats["old default, reference seed"]["detail"],
                          "seconds_per_image": statistics.median(times["old default, reference seed"])},
            "noise_band": {"fd_max": band_fd, "fds_old_seeds": old_fds, "fd_tolerance": args.fd_tolerance,
                           "clip_score_min": clip_lo,
                           "clip_scores_old_seeds": clips, "detail_range": [det_lo, det_hi],
                           "details_old_seeds": details},
            "criteria": (f"within noise: FD to the reference (the old default, seed {seed_ref}) <= {args.fd_tolerance:g} x "
                         "(the larger FD of the old default's own two seeds to it + their spread); CLIP score >= the "
                         "lowest of the old "
                         "default's three seeds minus their spread; detail inside their range widened by their "
                         "spread on both sides")}
    if len(owner) <= ref.shape[1]:
        info["caveat"] = (f"{len(owner)} images in a {ref.shape[1]}-d space: covariances are rank-deficient and FDs "
                          "noisy; the band is measured at the same N, so FD / band is the comparable figure")

    head = f"{'setting':<22} {'dec evals':>9} {'s/image':>8} {'x old':>6} {'FD':>7} {'FD/band':>8} {'CLIPscore':>9} {'detail':>7} {'equal':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['setting']:<22} {r['decoder_evals']:>9} {r['seconds_per_image']:>8.3f} {r['speedup_vs_old']:>6.2f} "
              f"{r['fd']:>7.4f} {r['fd_over_band']:>8.2f} {r['clip_score']:>9.2f} {r['detail']:>7.3f} "
              f"{'yes' if r['equal_quality'] else 'no':>6}")
    print(f"noise band: FD <= {args.fd_tolerance:g} x {band_fd:.4f} (old seeds {', '.join(f'{f:.4f}' for f in old_fds)}); "
          f"CLIP score >= {clip_lo:.2f} "
          f"(old seeds {', '.join(f'{c:.2f}' for c in clips)}); detail in [{det_lo:.3f}, {det_hi:.3f}]")
    return {"rows": rows, "info": info, "images": {r["setting"]: images[r["setting"]] for r in rows}}


def frontier_goals(rows: list[dict]) -> list[dict]:
    new = next((r for r in rows if r["setting"] == "new default"), None)
    if new is None:
        return []
    w = new["within_noise"]
    return [goal("genvl sample's sampling (prior, decoder, super-res) at equal quality: new default vs old",
                 new["speedup_vs_old"], "x", f">= {GOAL_SPEEDUP:g}x s/image, FD, CLIP score and detail within noise",
                 "met" if new["speedup_vs_old"] >= GOAL_SPEEDUP and new["equal_quality"] else "missed",
                 f"{new['seconds_per_image']:.3f} s/image; FD {new['fd']:.4f} ({new['fd_over_band']:.2f} x band, "
                 f"{'within' if w['fd'] else 'outside'}), CLIP score {new['clip_score']:.2f} "
                 f"({'within' if w['clip_score'] else 'outside'}), detail {new['detail']:.3f} "
                 f"({'within' if w['detail'] else 'outside'})")]


# ---------------------------------------------------------------------------------------- part b
def _flags(s: dict) -> list[str]:
    return ["--steps", str(s["steps"]), "--prior-steps", str(s["prior_steps"]), "--guidance", str(s["guidance"]),
            "--prior-guidance", str(s["prior_guidance"]), "--scheduler", s["scheduler"],
            "--prior-candidates", str(s["prior_candidates"]), "--coarse-start", str(s["coarse_start"]),
            "--sr-steps", str(s["sr_steps"])]


#: A stand-in for other work on the machine: a 2-thread torch loop with libgomp's default policy.
HOG = ("import time, torch\n"
       "a = torch.randn(256, 256)\n"
       "while True:\n"
       "    a = torch.tanh(a @ a.T / 16)\n")


def run_e2e(args, work: Path, others: int = 0) -> tuple[list[dict], list[dict]]:
    """The end-to-end commands, interleaved; with ``others`` > 0 while that many :data:`HOG`
    processes keep the cores busy (started here, stopped at the end)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    py = sys.executable
    cli = ["-m", "genvl", "sample", E2E_PROMPT, "--no-progress", "--overwrite"]
    # torch first: libgomp then starts with its default wait policy, as it did before the command
    # line set one, and the command line's set-up has no effect (that is today's command)
    old_cli = ["-c", "import sys, torch; from genvl.cli import main; sys.exit(main(sys.argv[1:]))",
               *cli[2:]]
    floor = ["-c", "from genvl.cli import passive_omp_waits; passive_omp_waits(); "
                   "from genvl.pipelines import UnclipPipeline; UnclipPipeline.from_pretrained('demo')"]
    cases = [
        ("old default (today's command)", [py, *old_cli, *_flags(OLD_DEFAULT)], "baseline"),
        ("old settings, new thread set-up", [py, *cli, *_flags(OLD_DEFAULT)], "part"),
        ("new default", [py, *cli], "new"),
        ("floor: start-up, imports, model loading", [py, *floor], "floor"),
    ]
    hogs = [subprocess.Popen([py, "-c", HOG], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(others)]
    try:
        if hogs:
            time.sleep(3.0)  # past their start-up: both cores busy
        times: dict[str, list[float]] = {c[0]: [] for c in cases}
        busy: dict[str, list[bool]] = {c[0]: [] for c in cases}
        for r in range(args.repeats):
            for label, cmd, role in cases:
                out = work / f"e2e-{others}-{r}-{role}"
                full = cmd + (["--out", str(out)] if role != "floor" else [])
                busy[label].append(others_running())
                t0 = time.perf_counter()
                proc = subprocess.run(full, env=env, cwd=work, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{label} failed ({proc.returncode}): {proc.stderr[-2000:]}")
                if role != "floor" and len(list(out.glob("*.png"))) != 4:
                    raise SystemExit(f"{label}: expected 4 PNGs in {out}, got {sorted(out.iterdir())}")
                times[label].append(dt)
                print(f"  e2e repeat {r + 1}/{args.repeats} {label}: {dt:.2f} s"
                      f"{' (other tasks runnable at start)' if busy[label][-1] else ''}", flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    base = statistics.median(times[cases[0][0]])
    rows = [{"command": label, "role": role, "other_processes": others, "seconds": statistics.median(times[label]),
             "seconds_all": times[label], "others_running_at_start": busy[label],
             "speedup_vs_old": base / statistics.median(times[label])} for label, _, role in cases]
    where = "an otherwise idle machine" if not others else f"{others} other 2-thread torch processes running"
    head = f"{'genvl sample, end to end (' + where + ')':<70} {'median s':>8} {'x old':>6}  runs"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['command']:<70} {r['seconds']:>8.2f} {r['speedup_vs_old']:>6.2f}  "
              + " ".join(f"{t:.1f}" for t in r["seconds_all"]))
    new = next(r for r in rows if r["role"] == "new")
    fl = next(r for r in rows if r["role"] == "floor")
    note = (f"'{E2E_PROMPT}', 4 images at 64 px, {where}, median of {args.repeats} interleaved runs: old "
            f"{base:.2f} s, new {new['seconds']:.2f} s; floor (start-up + imports + loading, no sampling) "
            f"{fl['seconds']:.2f} s = {base / fl['seconds']:.2f}x the old time at most for any sampling setting")
    name = "genvl sample end to end (process start-up included): new default vs old, 2-core CPU"
    if others:
        name += f", {others} other torch processes running"
    goals = [goal(name, new["speedup_vs_old"], "x", f">= {GOAL_SPEEDUP:g}x (<= 1/3 of the old time)",
                  "met" if new["speedup_vs_old"] >= GOAL_SPEEDUP else "missed", note)]
    return rows, goals


# ---------------------------------------------------------------------------------------- part c
def side_by_side(prompts: list[str], old: torch.Tensor, new: torch.Tensor, n: int, path: Path,
                 scale: int = 2) -> Path:
    """One row per prompt: the old default's ``n`` images, a gap, the new default's (same seeds),
    each enlarged ``scale`` times (nearest neighbour, so the pixels stay as sampled)."""
    from PIL import Image, ImageDraw

    S = old.shape[-1] * scale
    label_w, gap, head = 150, 12, 18
    W, H = label_w + 2 * n * S + gap, head + len(prompts) * S
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 3), "old default", fill="black")
    draw.text((label_w + n * S + gap, 3), "new default", fill="black")

    def pil(x: torch.Tensor) -> Image.Image:
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr).resize((S, S), Image.Resampling.NEAREST)

    for i, prompt in enumerate(prompts):
        y = head + i * S
        draw.text((4, y + S // 2 - 6), prompt[:24], fill="black")
        for j in range(n):
            canvas.paste(pil(old[i * n + j]), (label_w + j * S, y))
            canvas.paste(pil(new[i * n + j]), (label_w + n * S + gap + j * S, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="frontier,e2e,png", help="frontier, e2e, png (png needs frontier)")
    p.add_argument("--model", default="demo", help="model directory (default: the built-in demo)")
    p.add_argument("--settings", default=";".join(("old", "new", *CANDIDATES)),
                   help="';'-separated: old (first, the baseline), new (the model's recommended now), "
                        "label=key:value,... over the old default")
    p.add_argument("--prompts", default=str(ROOT / "configs/demo-prompts.txt"))
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--images", type=int, default=4, help="images per prompt (genvl sample's default: 4)")
    p.add_argument("--judge", help="model dir of the judge CLIP (default runs/demo-judge if present; 'self' = the "
                                   "model's own)")
    p.add_argument("--fd-tolerance", type=float, default=1.0, help="within noise: FD <= this x the band")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs of each command (median)")
    p.add_argument("--busy", type=int, default=2, help="also time the end-to-end commands while this many other "
                                                       "2-thread torch processes run (0: only on the idle machine)")
    p.add_argument("--keep", action="store_true", help="keep the --json file's results of the parts not run now")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/cpu_sampling.json"))
    p.add_argument("--png", default=str(ROOT / "benchmarks/results/cpu_sampling.png"))
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}

    new = new_default(args.model)
    settings = parse_settings(args.settings, new)
    prompts = read_prompts(Path(args.prompts), args.num_prompts)
    print(f"device: {device_name()}; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (unset: libgomp's default, spinning)")
    for label, s in settings:
        print(f"  {label}: {describe(s)}")
    result = {"benchmark": "cpu_sampling", "device": device_name(), "torch": torch.__version__,
              "config": {**vars(args), "threads": torch.get_num_threads(),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_start": os.getloadavg()},
              "old_default": OLD_DEFAULT, "new_default": new, "goals": [], "rows": {}}
    if "frontier" in parts:
        print(f"\n== a. frontier: {len(prompts)} prompts x {args.images} images per setting")
        pipe = UnclipPipeline.from_pretrained(args.model)
        res = run_frontier(pipe, settings, prompts, args)
        result["rows"]["frontier"] = res["rows"]
        result["frontier"] = res["info"]
        result["goals"] += [{**g, "part": "frontier"} for g in frontier_goals(res["rows"])]
        if "png" in parts and "new default" in res["images"]:
            path = side_by_side(prompts, res["images"]["old default"], res["images"]["new default"], args.images,
                                Path(args.png))
            result["png"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
            print(f"wrote {path}")
    if "e2e" in parts:
        result["rows"]["e2e"] = []
        for others in sorted({0, args.busy}):
            print(f"\n== b. genvl sample end to end, {args.repeats} interleaved runs each, {others} other processes")
            with tempfile.TemporaryDirectory(prefix="cpu_sampling-") as work:
                rows, goals = run_e2e(args, Path(work), others)
            result["rows"]["e2e"] += rows
            result["goals"] += [{**g, "part": "e2e"} for g in goals]
    if args.json and args.keep and Path(args.json).is_file():  # parts not run this time: the file's results
        before = json.loads(Path(args.json).read_text())
        for part in ("frontier", "e2e"):
            if part not in parts and part in before.get("rows", {}):
                result["rows"][part] = before["rows"][part]
                result["goals"] += [g for g in before["goals"] if g.get("part") == part]
                if part == "frontier":
                    result["frontier"] = before.get("frontier")
                    result["png"] = before.get("png")
        result["goals"].sort(key=lambda g: g.get("part") != "frontier")
    result["config"]["load_average_end"] = os.getloadavg()
    print("\ngoals:")
    for g in result["goals"]:
        m = f"{g['measured']:.3g} {g['unit']}" if g["measured"] is not None else "-"
        print(f"  [{g['status']}] {g['name']}: {m} (goal {g['goal']})\n      {g['note']}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
