"""Generative zero-shot classification: accuracy against model evaluations per image, and the
throughput of batched scoring.

On a labelled folder (``DIR/CLASS_NAME/*.png``) and a model directory, for every method the
directory supports:

- ``diffusion naive K``      the decoder's denoising error with K shared (t, eps) pairs per class
- ``diffusion adaptive S``   the same with adaptive elimination schedule S (samples:keep stages)
- ``prior K``                the prior's x0 error in CLIP space with K pairs per class
- ``ar``, ``clip``           one evaluation per (image, class) / per image

Each point: accuracy, decoder/prior/LM/CLIP evaluations per image, seconds per image. Then the
throughput of batched scoring (rows/s through ``DiffusionClassifier``: add_noise, gather of
conditions, error reduction included) against a plain batched decoder forward of the same rows on
random inputs. Writes a PNG (accuracy vs evaluations per image, log x) and JSON with the device name
and a ``goals`` list (:func:`zero_shot_goals`): adaptive elimination within one accuracy point of
naive scoring at far fewer evaluations; batched scoring >= 0.8x the plain forward's throughput.
``--add-goals JSON`` writes that list into an existing results file (from its recorded points).

    python benchmarks/zero_shot.py --make-shapes /tmp/shapes_lab             # a 4-class labelled folder
    python benchmarks/zero_shot.py --make-digits /tmp/digits                 # sklearn's digits (if installed)
    python benchmarks/zero_shot.py --make-emoji /tmp/emoji10 --emoji-data data/emoji   # 10 emoji classes
    python benchmarks/zero_shot.py --model DIR --data /tmp/shapes_lab --limit 40 --device cpu
    python benchmarks/zero_shot.py --add-goals benchmarks/results/zero_shot_emoji10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genvl.checkpoint import open_model_dir  # noqa: E402
from genvl.classify import expand_classes, load_classifier, supported_methods, zero_shot_metrics  # noqa: E402
from genvl.classify.montecarlo import parse_schedule  # noqa: E402
from genvl.data.labelled import open_labelled  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """The results JSON's ``device``: the GPU's name, or the CPU with its cores and threads."""
    if device.type == "cuda":
        return device_name(device)
    return f"CPU ({device_name(device)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


ADAPTIVE_GAP = 1.0  # accuracy points an adaptive schedule may lose against naive scoring
ADAPTIVE_EVALS = 0.5  # "far fewer": at most this fraction of the naive reference's evaluations
SCORING_THROUGHPUT = 0.8  # batched scoring rows/s over plain forward rows/s


def _goal(name: str, measured, unit: str, target: str, status: str, note: str) -> dict:
    return {"name": name, "measured": measured, "unit": unit, "goal": target, "status": status, "note": note}


def zero_shot_goals(out: dict) -> list[dict]:
    """The goals of this benchmark, from its recorded ``points`` and ``throughput``.

    Adaptive elimination (per method with naive and adaptive points): the naive reference is the
    naive point with the most samples per class (the least noisy estimate of the classifier that
    adaptive elimination approximates); among the adaptive schedules that use at most
    ``ADAPTIVE_EVALS`` of its evaluations the most accurate one is compared. Met when it is at most
    ``ADAPTIVE_GAP`` points below. Throughput: batched scoring rows/s over plain forward rows/s.
    """
    goals = []
    n = out.get("n") or 0
    points = out.get("points") or []
    for m in ("diffusion", "prior"):
        naive = [q for q in points if q["method"] == m and "naive" in q["label"]]
        adaptive = [q for q in points if q["method"] == m and "adaptive" in q["label"]]
        name = f"zero-shot {m}: adaptive elimination vs naive accuracy"
        target = f">= -{ADAPTIVE_GAP:g} point at <= {ADAPTIVE_EVALS:g}x the evaluations"
        if not naive or not adaptive:
            goals.append(_goal(name, None, "accuracy points", target, "not measured here",
                               f"no naive and adaptive {m} points in this run"))
            continue
        ref = max(naive, key=lambda q: (q["evals_per_image"], q["accuracy"]))
        cheap = [q for q in adaptive if q["evals_per_image"] <= ADAPTIVE_EVALS * ref["evals_per_image"]]
        best = max(cheap or adaptive, key=lambda q: (q["accuracy"], -q["evals_per_image"]))
        gap = 100 * (best["accuracy"] - ref["accuracy"])
        top = max(naive, key=lambda q: q["accuracy"])
        met = bool(cheap) and gap >= -ADAPTIVE_GAP - 1e-4
        note = (f"{best['label']}: {100 * best['accuracy']:.1f}% at {best['evals_per_image']:g} evals/image vs "
                f"{ref['label']}: {100 * ref['accuracy']:.1f}% at {ref['evals_per_image']:g} "
                f"({best['evals_per_image'] / ref['evals_per_image']:.2f}x the evaluations); best naive point "
                f"{top['label']}: {100 * top['accuracy']:.1f}% ({100 * (best['accuracy'] - top['accuracy']):+.1f} points)")
        if n:
            note += f"; {n} test images, so one image is {100 / n:.2g} accuracy point(s)"
        goals.append(_goal(name, round(gap, 3), "accuracy points", target, "met" if met else "missed", note))
    tp = out.get("throughput")
    name = "zero-shot batched scoring throughput vs plain decoder forward"
    target = f">= {SCORING_THROUGHPUT:g}x"
    if not tp:
        goals.append(_goal(name, None, "x", target, "not measured here", "no diffusion method in this run"))
    else:
        ratio = tp["scoring_rows_per_s"] / tp["plain_forward_rows_per_s"]
        goals.append(_goal(name, ratio, "x", target, "met" if ratio >= SCORING_THROUGHPUT else "missed",
                           f"{tp['scoring_rows_per_s']:.1f} vs {tp['plain_forward_rows_per_s']:.1f} rows/s at "
                           f"{tp['rows']} rows per forward"))
    return goals


def add_goals(path: Path) -> None:
    """Write :func:`zero_shot_goals` (and the shared schema's keys) into an existing results JSON."""
    out = json.loads(path.read_text())
    out["goals"] = zero_shot_goals(out)
    if out.get("device") in ("cpu", None) or "device_type" not in out:
        out["device_type"] = "cuda" if str(out.get("device", "")).startswith("cuda") else "cpu"
        name = out.get("device_name") or out.get("device") or "unknown"
        out["device"] = f"CPU ({name})" if out["device_type"] == "cpu" else name
    out.setdefault("config", {"model": out.get("model"), "data": out.get("data"), "n": out.get("n"),
                              "note": "the run's arguments were not recorded; model, data and n from its JSON"})
    out.setdefault("rows", out.get("points") or [])
    out["goals_source"] = "computed from the recorded points by `zero_shot.py --add-goals` (no re-run)"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    for g in out["goals"]:
        print(f"[{g['status']}] {g['name']}: {g['measured']} {g['unit']} (goal {g['goal']}) -- {g['note']}")
    print(f"wrote {path}")


def make_shapes(out: Path, per_class: int = 20, size: int = 32) -> None:
    """A labelled folder of four visually distinct classes (coloured shapes, jittered)."""
    from PIL import Image, ImageDraw

    import numpy as np

    classes = {"red_circle": ((220, 30, 30), "circle"), "blue_square": ((30, 60, 220), "square"),
               "green_triangle": ((30, 180, 60), "triangle"), "yellow_circle": ((235, 210, 30), "circle")}
    rng = np.random.default_rng(0)
    for name, (color, shape) in classes.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), "white")
            d = ImageDraw.Draw(img)
            dx, dy = rng.integers(-3, 4, 2)
            m = size // 5
            box = (m + dx, m + dy, size - m + dx, size - m + dy)
            if shape == "circle":
                d.ellipse(box, fill=color)
            elif shape == "square":
                d.rectangle(box, fill=color)
            else:
                d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
            img.save(out / name / f"{i:03d}.png")


def make_digits(out: Path, size: int = 32) -> None:
    """scikit-learn's 8x8 digits as a labelled folder ``zero/ ... nine/`` (needs scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--make-digits needs scikit-learn (pip install scikit-learn); it is not a genvl dependency")
    from PIL import Image

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = out / f"digit_{names[y]}"
        folder.mkdir(parents=True, exist_ok=True)
        g = (255 - img / 16 * 255).clip(0, 255).astype("uint8")  # dark digit on white
        Image.fromarray(g).convert("RGB").resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i:04d}.png")


#: The ten classes of ``--make-emoji``: the head noun of an emoji's name (the last word before
#: " with "), so "smiling cat with heart-eyes" is a cat and "heart with arrow" a heart.
EMOJI_CLASSES = ("cat", "heart", "clock", "moon", "square", "arrow", "hand", "tree", "car", "book")


def emoji_head(name: str) -> str:
    head = name.split(" with ")[0].strip().split(" ")[-1]
    return "clock" if head.endswith("o’clock") or head.endswith("o'clock") else head


def make_emoji(out: Path, emoji_data: Path, per_class: int = 10, size: int = 32) -> None:
    """A 10-class labelled folder from an emoji set folder (built by ``scripts/emoji_set.py``): the first
    ``per_class`` images (in the folder's order) whose name's head noun is one of :data:`EMOJI_CLASSES`;
    skin-tone variations are left out."""
    from PIL import Image

    counts = dict.fromkeys(EMOJI_CLASSES, 0)
    meta = emoji_data / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found: build it with `python scripts/emoji_set.py {emoji_data}`")
    for line in meta.read_text().splitlines():
        row = json.loads(line)
        texts = row["text"] if isinstance(row["text"], list) else [row["text"]]
        if "skin tone" in texts[0]:
            continue
        name = texts[0].split(",")[0]  # "grinning cat, smiling cat face ..., google noto style"
        head = emoji_head(name)
        if head in counts and counts[head] < per_class:
            (out / head).mkdir(parents=True, exist_ok=True)
            img = Image.open(emoji_data / row["file_name"]).convert("RGBA")
            bg = Image.new("RGBA", img.size, "white")
            bg.alpha_composite(img)
            bg.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(out / head / f"{counts[head]:03d}.png")
            counts[head] += 1
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def run_point(clf, data, prompts, batch: int) -> dict:
    images = data.pixels(clf.image_size)
    t0 = time.perf_counter()
    scores = torch.cat([clf.scores(images[i:i + batch], prompts) for i in range(0, len(data), batch)])
    sec = time.perf_counter() - t0
    m = zero_shot_metrics(scores, data.labels, data.classes, 1.0)
    return {"accuracy": m["accuracy"], "evals_per_image": clf.evals_per_image(len(prompts)), "seconds_per_image": sec / len(data)}


@torch.no_grad()
def throughput(clf, rows: int, repeats: int) -> dict:
    """Rows/s of batched scoring vs a plain batched decoder forward of the same number of rows."""
    dec = clf.decoder
    S, D = dec.config.image_size, dec.config.embed_dim
    dev = clf.device
    x = torch.rand(max(1, rows // 2), 3, S, S, device=dev) * 2 - 1
    from genvl.classify import ClassConditions

    E = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    plain_in = (torch.randn(rows, 3, S, S, device=dev), torch.randint(0, 1000, (rows,), device=dev),
                torch.nn.functional.normalize(torch.randn(rows, D, device=dev), dim=-1))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    old = clf.samples, clf.schedule, clf.batch_size
    clf.samples, clf.schedule, clf.batch_size = 1, None, rows  # x: rows / 2 images x 2 classes x 1 pair = rows
    t_score = timed(lambda: clf.scores_with_conditions(x, ClassConditions(E)))
    clf.samples, clf.schedule, clf.batch_size = old
    t_plain = timed(lambda: dec(*plain_in))
    n = 2 * x.shape[0]
    return {"rows": n, "scoring_rows_per_s": n / t_score, "plain_forward_rows_per_s": rows / t_plain,
            "overhead": (n / rows) * t_plain / t_score}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory")
    p.add_argument("--data", help="labelled folder DIR/CLASS_NAME/*.png")
    p.add_argument("--make-shapes", metavar="OUT", help="write a 4-class shapes labelled folder and exit")
    p.add_argument("--make-digits", metavar="OUT", help="write scikit-learn's digits as a labelled folder and exit")
    p.add_argument("--make-emoji", metavar="OUT", help="write 10 emoji classes as a labelled folder and exit")
    p.add_argument("--emoji-data", default="data/emoji",
                   help="the emoji set folder (built by scripts/emoji_set.py) for --make-emoji")
    p.add_argument("--per-class", type=int, default=10, help="images per class for --make-emoji")
    p.add_argument("--limit", type=int, help="first N images (classes balanced)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the model's methods (default: all)")
    p.add_argument("--template", default=None, help="prompt template with {}")
    p.add_argument("--budgets", default="2,4,8,16", help="naive diffusion / prior samples per class")
    p.add_argument("--schedules", default="2:2,6:1;4:2,12:1", help="adaptive schedules, ';'-separated")
    p.add_argument("--batch", type=int, default=16, help="images per scoring call")
    p.add_argument("--rows", type=int, default=64, help="rows per forward in the throughput test")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU)")
    p.add_argument("--add-goals", metavar="JSON", help="write the goals list into an existing results JSON and exit")
    p.add_argument("--out", default="benchmarks/results/zero_shot", help="output prefix: OUT.json and OUT.png")
    args = p.parse_args()
    if args.add_goals:
        add_goals(Path(args.add_goals))
        return
    if args.make_shapes:
        make_shapes(Path(args.make_shapes))
        print(f"wrote {args.make_shapes}")
        return
    if args.make_digits:
        make_digits(Path(args.make_digits))
        print(f"wrote {args.make_digits}")
        return
    if args.make_emoji:
        make_emoji(Path(args.make_emoji), Path(args.emoji_data), args.per_class)
        print(f"wrote {args.make_emoji}")
        return
    if not (args.model and args.data):
        p.error("--model and --data are required (or --make-shapes / --make-digits / --make-emoji)")
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    md = open_model_dir(args.model)
    data = open_labelled(args.data, limit=args.limit)
    prompts = expand_classes(data.classes, args.template)
    methods = supported_methods(md)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            p.error(f"{md.path} supports {methods}, not {unknown}")
        methods = [m for m in methods if m in wanted]
    budgets = [int(b) for b in args.budgets.split(",")]
    points = []
    print(f"device: {device_name(device)}; {len(data)} images, {len(data.classes)} classes; methods: {methods}")
    for m in methods:
        if m in ("diffusion", "prior"):
            configs = [(f"{m} naive {k}", {"samples": k}) for k in budgets]
            configs += [(f"{m} adaptive {s}", {"schedule": parse_schedule(s)}) for s in args.schedules.split(";")]
        else:
            configs = [(m, {})]
        for label, opts in configs:
            clf = load_classifier(md, m, device=str(device), **opts)
            r = {"label": label, "method": m, **opts, **run_point(clf, data, prompts, args.batch)}
            points.append(r)
            print(f"{label:<28} acc {r['accuracy']:.3f}  evals/img {r['evals_per_image']:8g}  "
                  f"s/img {r['seconds_per_image']:.4f}")
    tp = None
    if "diffusion" in methods:
        tp = throughput(load_classifier(md, "diffusion", device=str(device)), args.rows, args.repeats)
        print(f"throughput: batched scoring {tp['scoring_rows_per_s']:.1f} rows/s, plain forward "
              f"{tp['plain_forward_rows_per_s']:.1f} rows/s (scoring / plain = {tp['overhead']:.2f})")
    out = {"benchmark": "zero_shot", "device": device_label(device), "device_type": device.type,
           "device_name": device_name(device), "torch": torch.__version__, "config": vars(args),
           "model": str(md.path), "data": str(args.data), "n": len(data),
           "classes": data.classes, "points": points, "throughput": tp}
    out["goals"] = zero_shot_goals(out)
    out["rows"] = points
    for g in out["goals"]:
        print(f"goal [{g['status']}] {g['name']}: {g['measured']} {g['unit']} (goal {g['goal']})")
    Path(args.out + ".json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            for kind in ("naive", "adaptive", ""):
                pts = [q for q in points if q["method"] == m and (kind in q["label"] if kind else q["label"] == m)]
                if pts:
                    ax.plot([q["evals_per_image"] for q in pts], [q["accuracy"] for q in pts], "o-" if kind != "adaptive"
                            else "s--", label=f"{m} {kind}".strip())
        ax.axhline(1 / len(data.classes), color="gray", lw=0.8, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per image")
        ax.set_ylabel("accuracy")
        ax.set_title(f"zero-shot on {Path(args.data).name} ({device_name(device)})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
        print(f"wrote {args.out}.json and {args.out}.png")
    except ImportError:
        print(f"wrote {args.out}.json (matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
