"""Text-to-image on a real, public, labelled set, judged by an independent classifier.

The set is Fashion-MNIST (Zalando, MIT licence; Debian: ``apt-get install dataset-fashion-mnist``,
the data inside the package): 28x28 grayscale product photos of 10 kinds, captioned from their
labels ("a photo of a sneaker"). ``--make DIR`` writes ``DIR/train`` (2,000 photos per kind from its
training split) and ``DIR/heldout`` (100 per kind from its test split).

A run:

1. trains the **judge**, a small CNN, on the real training photos only (never the model's CLIP), and
   measures its accuracy on the real held-out photos;
2. runs the one command a user runs, ``genvl train t2i --data DIR/train --heldout DIR/heldout
   --budget B [--init ...]``, as a subprocess, and times it;
3. generates ``--per-label`` images for each held-out caption with the model's recommended
   settings, and lets the judge classify them: accuracy on generated images and its ratio to the
   accuracy on real held-out photos (the goal: >= 0.8);
4. adds ``genvl evaluate generation``'s held-out figures (CLIP score, prompt retrieval with
   duplicate captions grouped, FD against the held-out photos, in the model's own CLIP space).

Both real and generated images reach the judge through the same path (32 px RGB as genvl sees them,
then grayscale and 28 px), so the judge is not fooled by the resize. Writes JSON (device included),
a grid PNG (one row per kind) and prints a table.

    python benchmarks/custom_set.py --make data/fmnist
    python benchmarks/custom_set.py --data data/fmnist --out runs/fm-demo              # the default path (demo, 18m)
    python benchmarks/custom_set.py --data data/fmnist --out runs/fm-scratch --init scratch --budget 55m
    python benchmarks/custom_set.py --data data/fmnist --model runs/fm-scratch      # judge an existing model
"""

from __future__ import annotations

import argparse
import json
import re
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_data import CLASSES, make_folders  # noqa: E402

GOAL_RATIO = 0.8
JUDGE_SIZE = 28


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------- judge
def judge_view(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] (genvl's images) -> (N, 1, 28, 28) grayscale in [0, 1], the judge's input."""
    gray = (images.float().clamp(-1, 1).mean(1, keepdim=True) + 1) / 2  # (N, 1, S, S)
    if gray.shape[-1] != JUDGE_SIZE:
        gray = nn.functional.interpolate(gray, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True,
                                         align_corners=False)
    return gray


def load_view(folder: Path, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder's images as genvl reads them (``image_size`` px RGB), then as the judge sees them; and labels."""
    from genvl.data import open_image_text

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    label_of = {r["file_name"]: int(r["label"]) for r in rows}
    ds = open_image_text(str(folder), image_size=image_size, validate=False, progress=False)
    xs, ys = [], []
    for i in range(len(ds)):
        xs.append(ds[i]["pixel_values"])
        ys.append(label_of[Path(ds.image_name(i)).name])
    return judge_view(torch.stack(xs)), torch.tensor(ys)


class Judge(nn.Module):
    """A small CNN on 28x28 grayscale: two conv blocks and a linear head (about 90% on Fashion-MNIST)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def train_judge(x: torch.Tensor, y: torch.Tensor, epochs: int = 4, seed: int = 0) -> Judge:
    """Adam, batch 128, light shift augmentation; a few seconds per epoch on 2 cores."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Judge()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for j in range(0, len(x) - 127, 128):
            idx = perm[j:j + 128]
            xb = x[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Judge, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(x[j:j + 512]).argmax(1) for j in range(0, len(x), 512)])
    return 100 * float((pred == y).float().mean())


# ---------------------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(model_dir: str, per_label: int, seed: int, **changes) -> tuple[torch.Tensor, torch.Tensor, dict, float]:
    """``per_label`` images for each kind's caption with the model's recommended settings (``changes`` on top).

    Returns images (N, 3, S, S), their labels, the settings, and seconds per image.
    """
    from genvl.limits import MAX_IMAGES
    from genvl.pipelines import UnclipPipeline

    pipe = UnclipPipeline.from_pretrained(model_dir)
    settings = pipe.settings(**changes)
    images, labels = [], []
    t0 = time.perf_counter()
    for label, (_, caption) in enumerate(CLASSES):
        for start in range(0, per_label, MAX_IMAGES):
            n = min(MAX_IMAGES, per_label - start)
            out = pipe(caption, num_images=n, seed=seed + 1000 * label + start, **changes)
            images.append(out.tensors.cpu())
            labels += [label] * n
    seconds = (time.perf_counter() - t0) / len(labels)
    return torch.cat(images), torch.tensor(labels), settings, seconds


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_row: int = 10) -> None:
    from genvl.sampling.io import make_grid, to_pil_images

    rows = []
    for c in range(len(CLASSES)):
        rows += to_pil_images(images[labels == c][:per_row])
    make_grid(rows, ncols=per_row).save(path)


def heldout_figures(model_dir: str, heldout: Path, seed: int) -> dict:
    """``genvl evaluate generation --data HELDOUT`` (held-out captions as prompts, 8 images each)."""
    from genvl.checkpoint import open_model_dir
    from genvl.data import open_image_text
    from genvl.evaluation.generation import evaluate_heldout
    from genvl.sampling.unclip import UnclipComponents

    md = open_model_dir(model_dir)
    comps = UnclipComponents.from_model_dir(md)
    ds = open_image_text(str(heldout), image_size=comps.decoder.config.image_size, progress=False)
    r = evaluate_heldout(comps, ds, num_images=8, seed=seed, **md.meta.get("sampling", {}))
    return {k: r[k] for k in ("clip_score", "prompt_retrieval_accuracy", "chance_prompt_retrieval", "fd_clip",
                              "num_images", "reference_images")}


def dir_size_mb(path: Path) -> float:
    """Bytes of the model's release files (components, tokenizer, card), not the run's checkpoints."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and "train" not in p.relative_to(path).parts[:1]:
            total += p.stat().st_size
    return total / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", metavar="DIR", help="write DIR/train and DIR/heldout from the Debian package and stop")
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder of the four IDX files")
    ap.add_argument("--train-per-class", type=int, default=2000)
    ap.add_argument("--heldout-per-class", type=int, default=100)
    ap.add_argument("--data", help="folder written by --make")
    ap.add_argument("--out", help="model directory for genvl train t2i")
    ap.add_argument("--model", help="judge an existing model directory instead of training one")
    ap.add_argument("--init", default="demo", help="--init of genvl train t2i (demo, its default; scratch or a directory)")
    ap.add_argument("--budget", default="18m", help="--budget of genvl train t2i")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--clip", choices=["auto", "keep", "finetune"], help="--clip of genvl train t2i")
    ap.add_argument("--per-label", type=int, default=50, help="generated images per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", help="row name in the table (default: from --init)")
    ap.add_argument("--json", default="benchmarks/results/custom_set.json", help="results file (rows are merged by name)")
    ap.add_argument("--sweep", metavar="G:PG,...", help="also judge these decoder:prior guidance pairs, e.g. "
                    "1.5:2,3:2,5:2,3:1,3:4 (with --sweep-per-label images per kind each)")
    ap.add_argument("--sweep-per-label", type=int, default=20)
    args = ap.parse_args(argv)

    if args.make:
        train, held = make_folders(Path(args.make), args.train_per_class, args.heldout_per_class, source=Path(args.source))
        print(f"wrote {train} and {held}")
        return 0
    if not args.data or not (args.out or args.model):
        ap.error("give --data and --out (train) or --model (judge only)")
    data = Path(args.data)
    train_dir, held_dir = data / "train", data / "heldout"

    t0 = time.perf_counter()
    x_tr, y_tr = load_view(train_dir)
    x_te, y_te = load_view(held_dir)
    judge = train_judge(x_tr, y_tr, seed=args.seed)
    real_acc = accuracy(judge, x_te, y_te)
    print(f"judge: CNN on {len(x_tr)} real training photos, {real_acc:.1f}% on {len(x_te)} real held-out photos "
          f"({time.perf_counter() - t0:.0f} s)")

    model_dir = args.model
    train_s = None
    command = None
    if model_dir is None:
        model_dir = args.out
        cmd = ["genvl", "train", "t2i", "--data", str(train_dir), "--out", args.out, "--init", args.init,
               "--budget", args.budget, "--heldout", str(held_dir)]
        if args.lora_rank:
            cmd += ["--lora-rank", str(args.lora_rank)]
        if args.clip:
            cmd += ["--clip", args.clip]
        command = " ".join(shlex.quote(c) for c in cmd)
        print(f"$ {command}")
        t1 = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t1

    images, labels, settings, s_per_image = generate(model_dir, args.per_label, args.seed)
    gen_acc = accuracy(judge, judge_view(images), labels)
    per_class = {CLASSES[c][0]: accuracy(judge, judge_view(images[labels == c]), labels[labels == c])
                 for c in range(len(CLASSES))}
    res_path = Path(args.json)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    name = args.name or (f"{args.init}" + (f" + LoRA {args.lora_rank}" if args.lora_rank else ""))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    grid = res_path.with_name(f"{res_path.stem}-{slug}.png")
    save_grid(images, labels, grid)
    figures = heldout_figures(model_dir, held_dir, args.seed)

    sweep = []
    for pair in (args.sweep.split(",") if args.sweep else []):
        g, pg = (float(v) for v in pair.split(":"))
        im, lb, st, _ = generate(model_dir, args.sweep_per_label, args.seed + 7, guidance=g, prior_guidance=pg)
        sweep.append({"guidance": g, "prior_guidance": pg, "judge_generated_accuracy": accuracy(judge, judge_view(im), lb),
                      "images": len(lb)})
        print(f"sweep: guidance {g}, prior guidance {pg}: judge {sweep[-1]['judge_generated_accuracy']:.1f}% "
              f"on {len(lb)} images")

    plan_path = Path(model_dir) / "train" / "t2i" / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    stages = plan.get("stages", [])
    if train_s is None and plan.get("finished"):  # judged afterwards: the run's own record of its time
        train_s = plan["elapsed"]
        budget = plan["options"]["budget_s"]
        args.budget = f"{budget / 60:.0f}m"
        args.init = plan["options"]["init"]
        args.lora_rank = plan["options"]["lora_rank"]
    row = {
        "name": name, "model": str(model_dir), "init": args.init, "lora_rank": args.lora_rank, "budget": args.budget,
        "command": command, "train_seconds": train_s, "size_mb": dir_size_mb(Path(model_dir)),
        "judge_real_accuracy": real_acc, "judge_generated_accuracy": gen_acc, "ratio": gen_acc / real_acc,
        "per_class_generated_accuracy": per_class, "generated_per_label": args.per_label,
        "seconds_per_image": s_per_image, "settings": settings, "grid": str(grid), **figures,
        "stages": [{k: s[k] for k in ("stage", "steps", "seconds", "why")} for s in stages],
        "sweep": sweep,
    }
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    rows = [r for r in results.get("rows", []) if r["name"] != name] + [row]
    results = {
        "benchmark": "custom_set", "device": device_label(), "torch": torch.__version__,
        "data": "Fashion-MNIST (Zalando, MIT; Debian dataset-fashion-mnist): "
                f"{len(x_tr)} training / {len(x_te)} held-out photos, captions 'a photo of a {{kind}}'",
        "config": {"per_label": args.per_label, "seed": args.seed, "judge": "small CNN (Judge), 4 epochs"},
        "goals": [{
            "name": f"custom set, {r['name']}: judge accuracy on generated / on real held-out photos",
            "measured": round(r["ratio"], 3), "unit": "ratio", "goal": f">= {GOAL_RATIO}",
            "status": "met" if r["ratio"] >= GOAL_RATIO else "missed",
            "note": (f"judge {r['judge_generated_accuracy']:.1f}% on {10 * r['generated_per_label']} generated vs "
                     f"{r['judge_real_accuracy']:.1f}% on real held-out; budget {r['budget']}"
                     + (f", trained in {r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "")
                     + f"; CLIP score {r['clip_score']:.1f}, retrieval {r['prompt_retrieval_accuracy']:.1f}% "
                       f"(chance {r['chance_prompt_retrieval']:.0f}%), FD {r['fd_clip']:.3f}")} for r in rows],
        "rows": rows,
    }
    res_path.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("| run | train time | size | judge real | judge generated | ratio | CLIP score | retrieval (chance) | FD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "-"
        print(f"| {r['name']} | {t} | {r['size_mb']:.1f} MB | {r['judge_real_accuracy']:.1f}% | "
              f"{r['judge_generated_accuracy']:.1f}% | {r['ratio']:.2f} | {r['clip_score']:.1f} | "
              f"{r['prompt_retrieval_accuracy']:.1f}% ({r['chance_prompt_retrieval']:.0f}%) | {r['fd_clip']:.3f} |")
    print("\nper kind (generated): " + ", ".join(f"{k} {v:.0f}%" for k, v in per_class.items()))
    print(f"results: {res_path}; grid: {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
