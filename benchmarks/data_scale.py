"""Does reading data scale with the number of shards? Map-style against streaming.

Simulated sets of 10, 100 and 2,000 small webdataset shards (generated locally, 4 samples of
32 px PNG + caption each) are read by 1 and 2 processes, each process a fresh interpreter so
that its memory is its own:

- start-up: seconds from building the dataset to the first batch in hand;
- resident memory: the process's peak RSS (MiB) after reading;
- samples/s per process over the batches after the first.

Map-style (:class:`genvl.data.ImageTextDataset`) indexes every member of every shard on every
process before the first batch; streaming (:class:`genvl.data.streaming.StreamingImageText`)
opens only the shards of its own share as it reads them. Goal: on the streaming path start-up and
memory at 2,000 shards stay within 2x of the 10-shard figures.

A second part trains the prior (on the built-in demo's CLIP, a fresh tiny prior) from generated
images against the same set precomputed by ``genvl data embed``: samples/s of the training loop over
the same steps, and the one-time cost of embedding. Goal: >= 5x from embeddings. The images come in
two forms: a folder of 64 px PNGs (the demo's own scale) and img2dataset's default output (256 px
JPEG shards). By default the set holds more images than the timed steps read (4,000 against 60 x 64),
so every step is in the first epoch, as in a LAION-scale run where an epoch is long: the prior's
embedding cache (each image encoded once, kept by index) then never hits, and from images means
decoding and encoding every image. On the PNG folder a third run sets ``model.cache_inputs=false``
(no cache at all).

    python benchmarks/data_scale.py                       # table + benchmarks/results/data_scale.json
    python benchmarks/data_scale.py --shards 10,100 --batches 5 --prior-steps 0
    python benchmarks/data_scale.py --shards 2,4 --procs 1 --batches 1 --prior-steps 2 --prior-images 8 --prior-batch 4
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SAMPLES_PER_SHARD = 4


def make_shards(root: Path, n: int) -> str:
    """``n`` shards of 4 samples in ``root``; returns the brace pattern."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        path = root / f"{s:05d}.tar"
        if path.exists():
            continue
        with tarfile.open(path, "w") as tar:
            for j in range(SAMPLES_PER_SHARD):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), ((s * 37 + j) % 256, (s * 11) % 256, (j * 60) % 256)).save(buf, "PNG")
                for name, data in ((f"{s:05d}{j:03d}.png", buf.getvalue()),
                                   (f"{s:05d}{j:03d}.txt", f"shape {s % 17} colour {j}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{{00000..{n - 1:05d}}}.tar")


def child(mode: str, pattern: str, rank: int, world: int, batches: int, batch_size: int) -> dict:
    """One process's measurement (run in a fresh interpreter)."""
    import resource

    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if mode == "map":
        from genvl.data import collate_image_text, open_image_text

        ds = open_image_text(pattern, image_size=32, validate=False)
        rows = list(range(rank, len(ds), world))  # a distributed sampler's share
        loader = DataLoader(torch.utils.data.Subset(ds, rows), batch_size=batch_size, collate_fn=collate_image_text)
    else:
        from genvl.data.streaming import StreamingImageText, collate_stream

        ds = StreamingImageText(pattern, image_size=32, rank=rank, world_size=world)
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_stream)
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    t1, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["text"])
        except StopIteration:
            break
    rate = n / max(time.perf_counter() - t1, 1e-9)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"startup_s": startup, "rss_mib": rss, "samples_per_s": rate}


def _prior_images(folder: Path, images: int) -> None:
    """A folder of 64 px PNGs with captions: the demo CLIP's own scale (it reads 32 px)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(images):
        colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        img = Image.new("RGB", (64, 64), "white")
        img.paste(colour, (8 + i % 16, 8 + i % 24, 40 + i % 20, 44 + i % 16))
        img.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a shape of colour {i % 50}")


def _img2dataset_shards(folder: Path, images: int, per_shard: int = 1000) -> None:
    """The same pictures as img2dataset writes them by default: 256 px JPEG (quality 95) with a
    .txt caption and a .json per sample, shards of ``per_shard`` samples with a .parquet and a
    _stats.json beside each. Mild per-pixel noise gives the JPEGs a photo-like entropy (flat
    colours would decode unrealistically fast)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range((images + per_shard - 1) // per_shard):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
                img = Image.new("RGB", (64, 64), "white")
                img.paste(colour, (8 + i % 16, 8 + i % 24, 40 + i % 20, 44 + i % 16))
                px = np.asarray(img.resize((256, 256), Image.BICUBIC), dtype=np.float32)
                px = np.clip(px + rng.normal(0, 12, px.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(px).save(buf, format="JPEG", quality=95)
                key = f"{s:05d}{i % per_shard:04d}"
                caption = f"a shape of colour {i % 50}"
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1" + bytes(16) + b"PAR1")  # not read: stand-in
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))


def prior_speed(work: Path, images: int, steps: int, batch: int, compile_runs: bool = False) -> list[dict]:
    """Prior training samples/s from images and from precomputed embeddings (same data, seed, steps).

    Two image sets of the same pictures and captions: a folder of 64 px PNGs (the demo's scale)
    and img2dataset's default output (256 px JPEG shards); each against its own ``genvl data
    embed`` folder. With ``compile_runs`` both paths also run with ``compile: true``: samples/s still
    counts every step past the first, so a recompilation later on is in the figure."""
    from genvl.config import apply_overrides
    from genvl.data.embeddings import embed_image_text
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.prior import PriorTask

    sets = (("64 px PNG folder", work / "prior-images", _prior_images),
            ("img2dataset shards, 256 px JPEG", work / "prior-shards", _img2dataset_shards))
    cfg = ["model.fresh=true", f"batch_size={batch}", f"max_steps={steps}", "log_every=1", "save_every=0",
           "tracker=none", "data.caption_dropout=0.1"]
    rows = []
    for name, folder, make in sets:
        if not folder.exists():
            make(folder, images)
        t0 = time.perf_counter()
        emb = folder.with_name(folder.name + "-embeddings")
        embed_image_text("demo", folder, emb, device="cpu", progress=False)
        embed_s = time.perf_counter() - t0
        runs = [("images", folder, []), ("embeddings", emb, [])]
        if folder.name == "prior-images":
            runs.append(("images, no cache", folder, ["model.cache_inputs=false"]))
        if compile_runs:  # the recipe's compile option (torch.compile of the prior) on both paths
            runs += [("images, compiled", folder, ["compile=true"]), ("embeddings, compiled", emb, ["compile=true"])]
        for source, data, extra in runs:
            out = work / f"prior-run-{folder.name}-{source.replace(', ', '-').replace(' ', '-')}"
            res = train(PriorTask(apply_overrides(TrainConfig(), cfg + extra)), data, out, init="demo",
                        progress=False)
            seconds = sum(batch / r["samples_per_s"] for r in res.history[1:])  # every step past the first
            row = {"set": name, "path": f"prior from {source}", "steps": steps, "batch": batch,
                   "samples_per_s": batch * (len(res.history) - 1) / seconds, "final_loss": res.history[-1]["loss"]}
            if source == "embeddings":
                row["embed_once_s"] = embed_s
            rows.append(row)
    return rows


def measure(mode: str, pattern: str, world: int, batches: int, batch_size: int) -> dict:
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, pattern, str(r), str(world), str(batches),
                               str(batch_size)], stdout=subprocess.PIPE, text=True) for r in range(world)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"startup_s": max(o["startup_s"] for o in outs), "rss_mib": max(o["rss_mib"] for o in outs),
            "samples_per_s": sum(o["samples_per_s"] for o in outs) / world}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="10,100,2000", help="shard counts, comma-separated")
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--batches", type=int, default=20, help="batches timed after the first, per process")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prior-steps", type=int, default=60, help="prior training steps per path (0: skip that part)")
    ap.add_argument("--prior-images", type=int, default=4000,
                    help="images of the prior part's generated sets (more than steps x batch: one epoch, no cache hit)")
    ap.add_argument("--prior-batch", type=int, default=64,
                    help="batch of the prior part's training runs (at most --prior-images)")
    ap.add_argument("--prior-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also train both prior paths with compile: true (torch.compile; a C++ compiler on the CPU)")
    ap.add_argument("--work", default=None, help="where the shards go (default: a temp folder)")
    ap.add_argument("--json", default="benchmarks/results/data_scale.json")
    ap.add_argument("--child", nargs=6, metavar=("MODE", "PATTERN", "RANK", "WORLD", "BATCHES", "BS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, pattern, rank, world, batches, bs = args.child
        print(json.dumps(child(mode, pattern, int(rank), int(world), int(batches), int(bs))))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from train_common import device_name

    work = Path(args.work or tempfile.mkdtemp(prefix="data_scale-"))
    rows = []
    print(f"{'path':<10} {'shards':>7} {'procs':>5} {'start-up s':>11} {'RSS MiB':>8} {'samples/s/proc':>15}")
    for n in [int(x) for x in args.shards.split(",")]:
        pattern = make_shards(work / f"s{n}", n)
        for world in [int(x) for x in args.procs.split(",")]:
            for mode in ("map", "stream"):
                r = {"path": mode, "shards": n, "procs": world, **measure(mode, pattern, world, args.batches,
                                                                           args.batch_size)}
                rows.append(r)
                print(f"{mode:<10} {n:>7} {world:>5} {r['startup_s']:>11.3f} {r['rss_mib']:>8.0f} "
                      f"{r['samples_per_s']:>15.1f}")
    goals = []
    counts = sorted({r["shards"] for r in rows})
    if len(counts) > 1:
        for world in sorted({r["procs"] for r in rows}):
            by = {r["shards"]: r for r in rows if r["path"] == "stream" and r["procs"] == world}
            lo, hi = by[counts[0]], by[counts[-1]]
            for key in ("startup_s", "rss_mib"):
                ratio = hi[key] / max(lo[key], 1e-9)
                goals.append({"name": f"stream {key} {counts[-1]} / {counts[0]} shards, {world} proc",
                              "measured": round(ratio, 2), "unit": "x", "goal": "<= 2",
                              "status": "met" if ratio <= 2 else "missed",
                              "note": f"{lo[key]:.3g} -> {hi[key]:.3g}"})
    prior_rows = []
    if args.prior_steps > 0:
        import shutil

        for d in work.glob("prior-run-*"):
            shutil.rmtree(d)
        prior_rows = prior_speed(work, args.prior_images, args.prior_steps, args.prior_batch, args.prior_compile)
        print(f"\n{'set':<32} {'path':<32} {'steps':>5} {'samples/s':>10} {'final loss':>10}")
        for r in prior_rows:
            print(f"{r['set']:<32} {r['path']:<32} {r['steps']:>5} {r['samples_per_s']:>10.1f} "
                  f"{r['final_loss']:>10.4f}")
        epochs = args.prior_steps * args.prior_batch / args.prior_images
        print(f"(the timed steps read {epochs:.2f} epoch(s) of each set"
              + ("; past the first, the image runs hit their embedding cache)" if epochs > 1 else ")"))
        for name in dict.fromkeys(r["set"] for r in prior_rows):
            by = {r["path"]: r for r in prior_rows if r["set"] == name}
            emb = by["prior from embeddings"]
            print(f"(genvl data embed of the {args.prior_images} images of the {name}, once: {emb['embed_once_s']:.1f} s)")
            pairs = [("prior from embeddings", "prior from images", "from images"),
                     ("prior from embeddings", "prior from images, no cache", "from images, no cache"),
                     ("prior from embeddings, compiled", "prior from images, compiled", "from images, both compiled")]
            for fast, base, what in pairs:
                if fast in by and base in by:
                    speedup = by[fast]["samples_per_s"] / by[base]["samples_per_s"]
                    goals.append({"name": f"prior samples/s from embeddings / {what} ({name})",
                                  "measured": round(speedup, 2), "unit": "x", "goal": ">= 5",
                                  "status": "met" if speedup >= 5 else "missed",
                                  "note": f"{by[fast]['samples_per_s']:.0f} vs {by[base]['samples_per_s']:.0f} samples/s"})
    for g in goals:
        print(f"{g['name']:<92} {g['measured']:>6} (target {g['goal']}) {g['status']}")
    result = {"benchmark": "data_scale", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "samples_per_shard": SAMPLES_PER_SHARD, "config": {k: v for k, v in vars(args).items() if k != "child"},
              "rows": rows, "prior_rows": prior_rows, "goals": goals}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
