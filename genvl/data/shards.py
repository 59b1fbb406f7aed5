"""``genvl data shard SRC OUT``: any supported image-text set as webdataset shards, laid out as
img2dataset writes them (``00000.tar`` holding ``KEY.jpg`` / ``.png`` with ``KEY.txt`` and
``KEY.json``, and ``00000_stats.json`` beside it), so one streaming reader serves both.

Images are copied as stored (no re-encoding); every caption variant goes into the ``.json``
(``caption`` is the canonical one). Shards are written through webdataset's ``ShardWriter`` into
temporary names and renamed when complete, so an interrupted run leaves only whole shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from genvl.data.datasets import open_image_text
from genvl.errors import DataError

__all__ = ["ShardResult", "write_shards"]


@dataclass
class ShardResult:
    shards: list[str]
    samples: int
    skipped: int


def write_shards(src: str | Path, out: str | Path, samples_per_shard: int = 10_000, max_size: int = 1 << 30,
                 progress: bool = True) -> ShardResult:
    """Write the image-text set ``src`` (any format :func:`~genvl.data.open_image_text` reads) as
    shards in ``out`` (created; must not hold shards already).

    Args:
        samples_per_shard: most samples in one shard.
        max_size: most bytes in one shard (a shard ends at the first sample past it).
    """
    from webdataset import ShardWriter

    if samples_per_shard < 1 or max_size < 1:
        raise DataError(f"samples per shard and max size must be >= 1, got {samples_per_shard} and {max_size}")
    out = Path(out)
    if out.exists() and any(out.glob("*.tar")):
        raise DataError(f"{out}: already holds .tar shards; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    ds = open_image_text(src, validate=True, progress=progress)
    written: list[str] = []
    counts: dict[str, int] = {}

    def opener(name: str):
        return open(name + ".part", "wb")  # noqa: SIM115 - closed by the writer

    def finished(name: str) -> None:
        os.replace(name + ".part", name)
        stats = {"count": counts.get(name, 0), "successes": counts.get(name, 0), "failed_to_download": 0}
        Path(name[: -len(".tar")] + "_stats.json").write_text(json.dumps(stats) + "\n")
        written.append(name)

    writer = ShardWriter(str(out / "%05d.tar"), maxcount=samples_per_shard, maxsize=max_size, verbose=0,
                         opener=opener, post=finished)
    try:
        for i in tqdm(range(len(ds)), desc=f"sharding {src}", unit="img", disable=not progress):
            ext = Path(ds.image_name(i)).suffix.lower().lstrip(".") or "png"
            ext = "jpg" if ext == "jpeg" else ext
            variants = ds.variants(i)
            writer.write({"__key__": f"{i:09d}", ext: ds.image_bytes(i), "txt": variants[0],
                          "json": {"key": f"{i:09d}", "caption": variants[0], "captions": list(variants),
                                   "source": ds.image_name(i)}})
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    finally:
        writer.close()
    return ShardResult(shards=written, samples=len(ds), skipped=len(ds.skipped))
