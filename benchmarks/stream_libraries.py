"""Which library should genvl's shard stream stand on? webdataset, mosaicml-streaming and litdata
measured on the same img2dataset output.

The set is what img2dataset writes by default (256 px JPEG, quality 95, ``KEY.jpg`` + ``KEY.txt`` +
``KEY.json`` per sample in ``{shard}.tar``, with ``.parquet`` and ``_stats.json`` beside each), made
locally by ``data_scale.py``'s generator. Each library reads it its own way:

- webdataset: the tars as they are, through genvl's own stream (:class:`genvl.data.streaming.StreamingImageText`);
- mosaicml-streaming: after a conversion to its MDS shards (``MDSWriter``; the JPEG bytes kept as they are);
- litdata: after a conversion to its chunks (``litdata.optimize``; the JPEG bytes kept as they are).

Every path decodes each image the same way (genvl's ``load_rgb`` with JPEG draft mode, resize and
center crop to 32 px, tensor), in one process without loader workers, each in a fresh interpreter:

- prepare: seconds of the one-time conversion (none for webdataset) and the size on disk after it;
- start-up: seconds from building the dataset to the first sample in hand;
- samples/s over one full pass after the first sample; peak resident memory (MiB).

mosaicml-streaming and litdata are not genvl dependencies: install them beside it to run this
(``pip install mosaicml-streaming litdata``; a library that does not import is reported as such).

    python benchmarks/stream_libraries.py                  # table + benchmarks/results/stream_libraries.json
    python benchmarks/stream_libraries.py --images 200 --per-shard 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARIES = ("webdataset", "mosaicml-streaming", "litdata")
IMAGE_SIZE = 32


def _tar_samples(tars):
    """Every sample of the given tar shards, in order, as webdataset groups them ({"jpg": bytes, "txt": bytes, ...})."""
    import webdataset as wds

    return wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)


def _decode(jpg: bytes, text: str):
    from genvl.data.images import load_rgb, resize_center_crop, to_tensor

    return to_tensor(resize_center_crop(load_rgb(jpg, draft_size=IMAGE_SIZE), IMAGE_SIZE)), text


def _litdata_rows(tar_path: str):
    """litdata.optimize's fn: the samples of one shard (module-level: its workers pickle it)."""
    for s in _tar_samples([tar_path]):
        yield {"jpg": s["jpg"], "txt": s["txt"].decode()}


def prepare(library: str, shards: Path, out: Path) -> dict:
    """Convert the shards to the library's own format; seconds and MiB on disk."""
    t0 = time.perf_counter()
    if library == "webdataset":
        target = shards
    elif library == "mosaicml-streaming":
        from streaming import MDSWriter

        target = out
        with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit="64mb") as w:
            for s in _tar_samples(sorted(shards.glob("*.tar"))):
                w.write({"jpg": s["jpg"], "txt": s["txt"].decode()})
    else:
        import litdata

        target = out
        litdata.optimize(fn=_litdata_rows, inputs=[str(p) for p in sorted(shards.glob("*.tar"))],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=1, verbose=False)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return {"prepare_s": seconds, "disk_mib": size / 2**20}


def child(library: str, data: str) -> dict:
    """One library's read of the whole set (run in a fresh interpreter)."""
    import resource

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if library == "webdataset":
        from genvl.data.streaming import StreamingImageText

        ds = StreamingImageText(sorted(str(p) for p in Path(data).glob("*.tar")), image_size=IMAGE_SIZE, epochs=1)
        items = ((s["pixel_values"], s["text"]) for s in ds)
    elif library == "mosaicml-streaming":
        from streaming import StreamingDataset

        ds = StreamingDataset(local=data, shuffle=False, batch_size=1)
        items = (_decode(s["jpg"], s["txt"]) for s in ds)
    else:
        import litdata

        ds = litdata.StreamingDataset(input_dir=data)
        items = (_decode(s["jpg"], s["txt"]) for s in ds)
    first = next(items)
    startup = time.perf_counter() - t0
    assert first[0].shape == (3, IMAGE_SIZE, IMAGE_SIZE), first[0].shape
    t1, n = time.perf_counter(), 1
    for _ in items:
        n += 1
    rate = (n - 1) / max(time.perf_counter() - t1, 1e-9)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"startup_s": startup, "samples_per_s": rate, "samples": n, "rss_mib": rss}


def available(library: str) -> str | None:
    """None when the library imports, else why not."""
    module = {"webdataset": "webdataset", "mosaicml-streaming": "streaming", "litdata": "litdata"}[library]
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["import failed"])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000, help="samples in the generated img2dataset set")
    ap.add_argument("--per-shard", type=int, default=400, help="samples per shard")
    ap.add_argument("--repeats", type=int, default=3, help="reads per library (fresh processes); the median is kept")
    ap.add_argument("--work", default=None, help="where the set and conversions go (default: a temp folder)")
    ap.add_argument("--json", default="benchmarks/results/stream_libraries.json")
    ap.add_argument("--note", default="", help="a remark on the environment, kept in the JSON")
    ap.add_argument("--child", nargs=2, metavar=("LIBRARY", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import torch
    from data_scale import _img2dataset_shards
    from train_common import device_name

    work = Path(args.work or tempfile.mkdtemp(prefix="stream_libraries-"))
    shards = work / "img2dataset"
    if not shards.exists():
        _img2dataset_shards(shards, args.images, per_shard=args.per_shard)
    rows = []
    print(f"{'library':<20} {'prepare s':>10} {'disk MiB':>9} {'start-up s':>11} {'samples/s':>10} {'RSS MiB':>8}")
    for lib in LIBRARIES:
        why = available(lib)
        if why is not None:
            rows.append({"library": lib, "error": why})
            print(f"{lib:<20} not measured: {why}")
            continue
        out = work / lib
        shutil.rmtree(out, ignore_errors=True)
        prep = prepare(lib, shards, out)
        data = shards if lib == "webdataset" else out
        reads = []
        for _ in range(args.repeats):
            p = subprocess.run([sys.executable, __file__, "--child", lib, str(data)], capture_output=True, text=True)
            if p.returncode != 0:
                reads = None
                rows.append({"library": lib, **prep, "error": (p.stderr.strip().splitlines() or ["read failed"])[-1]})
                print(f"{lib:<20} read failed: {rows[-1]['error']}")
                break
            reads.append(json.loads(p.stdout.strip().splitlines()[-1]))
        if reads is None:
            continue
        med = {k: sorted(r[k] for r in reads)[len(reads) // 2] for k in ("startup_s", "samples_per_s", "rss_mib")}
        row = {"library": lib, **prep, **med, "samples": reads[0]["samples"],
               "reads_img2dataset_as_is": lib == "webdataset", "repeats": reads}
        rows.append(row)
        print(f"{lib:<20} {row['prepare_s']:>10.2f} {row['disk_mib']:>9.1f} {row['startup_s']:>11.3f} "
              f"{row['samples_per_s']:>10.1f} {row['rss_mib']:>8.0f}")
    summary = "; ".join(
        f"{r['library']}: " + (f"not measured ({r['error']})" if "error" in r else
                               f"{r['prepare_s']:.1f} s to convert, start-up {r['startup_s']:.2f} s, "
                               f"{r['samples_per_s']:.0f} samples/s, {r['rss_mib']:.0f} MiB")
        for r in rows) + f" ({args.images} img2dataset samples, one process, decoded to {IMAGE_SIZE} px)"
    print(summary)
    result = {"benchmark": "stream_libraries", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "versions": _versions(), "config": {k: v for k, v in vars(args).items() if k != "child"},
              "summary": summary, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("webdataset", "mosaicml-streaming", "litdata"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
