"""Streaming image-text shards: each process reads only its own share, and resumes exactly.

The map-style :class:`~genvl.data.datasets.ImageTextDataset` indexes every member of every shard
on every process before the first batch, so start-up time and memory grow with the set. For sets
that do not fit on one disk, :class:`StreamingImageText` reads webdataset ``.tar`` shards as a
stream (webdataset's tar reader and URL opener; img2dataset's output as it is: ``KEY.jpg`` /
``.png`` / ``.webp`` with ``KEY.txt`` or a ``KEY.json`` holding ``caption``):

* **Sharding.** Epoch ``e`` orders the shards by a permutation seeded by ``(seed, e)``; shard ``i``
  of that order belongs to process ``i % world_size`` and, inside it, to DataLoader worker
  ``(i // world_size) % num_workers``. Nothing is indexed up front: start-up opens one shard.
* **Endless, epoch after epoch.** Each worker's stream goes on to its shards of the next epoch, so
  processes with more samples never wait for others (the trainer counts steps, not epochs), and
  every sample of an epoch is seen exactly once by exactly one process.
* **Positions.** Every item carries ``(epoch, shard, offset)`` (offset: the sample's ordinal in
  its shard, bad samples included) and ``last`` on a shard's final sample. :class:`StreamPosition`
  folds the items a process has *consumed* (not merely prefetched) into a small state; a run
  resumed from the states of all its processes (merged: :meth:`StreamPosition.merge`) skips every
  consumed sample and nothing else, with any number of processes and workers, because the state
  is keyed by shard, not by process.
* **Bad samples** (undecodable image, missing or empty caption, a truncated or unreadable shard)
  are skipped and reported in the next item's ``skipped`` list, so each process counts them and the
  trainer can sum them over processes; they are never fatal.

Resampled shards (webdataset's ``ResampledShards``: each worker draws shards at random, with
replacement) need no state at all but see some samples twice and others not at all in an epoch;
exact resume is worth its small state here because small sets are trained for few epochs.

URLs: a local path or brace pattern (``data/shard-{000..099}.tar``), ``http(s)://`` (streamed
with the standard library), or any fsspec URL (``s3://``, ``gs://``...)
whose fsspec package is installed.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from genvl.data.datasets import caption_dropped
from genvl.data.images import BadImageError, load_rgb, resize_center_crop, to_tensor
from genvl.data.sources import caption_problem, expand_braces
from genvl.errors import DataError

__all__ = ["ProbeSet", "StreamCollate", "StreamingImageText", "StreamPosition", "collate_stream", "expand_shards",
           "is_remote", "open_shard"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern, a folder of ``.tar`` files, a list, or ``a.tar::b.tar``."""
    if not isinstance(spec, str):
        out = [u for s in spec for u in expand_shards(s)]
    elif "::" in spec:
        out = [u for s in spec.split("::") for u in expand_shards(s)]
    elif "://" not in spec and os.path.isdir(spec):
        out = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
    else:
        out = expand_braces(spec)
    if not out:
        raise DataError(f"no .tar shards in {spec}")
    return out


def is_remote(spec: str | Sequence[str]) -> bool:
    """Whether ``spec`` names shards behind a URL (``http(s)://``, ``s3://``...), which only the
    streaming path can read."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return any("://" in s and not s.startswith("file://") for s in map(str, specs))


def open_shard(url: str):
    """A binary stream of one shard: a local file, ``http(s)://``, or an fsspec URL."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme or scheme == "file":
        return open(url[len("file://"):] if scheme else url, "rb")  # noqa: SIM115 - the reader closes it
    if scheme in ("http", "https"):
        import urllib.request

        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - the user's own shard URL
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as e:
        raise DataError(f"{url}: reading {scheme}:// needs its fsspec package ({e})") from None


def _samples(url: str) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """``(key, files, problem)`` for each sample of a shard in order, files by extension (read and
    grouped by webdataset's tar iterator); a damaged shard ends with one entry whose ``files`` is
    None and whose problem says what happened."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def with_url(files):
        for f in files:
            f["__url__"] = url
            yield f

    key = None
    try:
        with open_shard(url) as stream:
            for sample in group_by_keys(with_url(tar_file_iterator(stream))):
                key = sample["__key__"]
                if os.path.basename(key).startswith("_"):
                    continue  # metadata members (img2dataset keeps its stats beside the shards)
                yield key, {k: v for k, v in sample.items() if not k.startswith("__")}, None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        where = f"after {key}" if key is not None else "at its start"
        yield f"{url}", None, f"shard unreadable {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _caption(files: dict[str, bytes]) -> tuple[str | None, str | None]:
    raw = files.get("txt")
    if raw is None and "json" in files:
        try:
            meta = json.loads(files["json"])
            raw = meta.get("caption") if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, "malformed .json"
        if raw is not None and not isinstance(raw, str):
            return None, "caption is not a string"
        raw = raw.encode() if raw is not None else None
    if raw is None:
        return None, "no caption (.txt or .json caption)"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "caption is not UTF-8"
    if not text:
        return None, "empty caption"
    problem = caption_problem(text)
    return (None, problem) if problem else (text, None)


@dataclass
class StreamPosition:
    """What a stream's consumer has taken: per epoch, the finished shards and the last offset taken
    in each unfinished one. JSON-able (``to_dict`` / ``from_dict``)."""

    done: dict[int, set[str]] = field(default_factory=dict)
    partial: dict[int, dict[str, int]] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        """Fold in a consumed batch of :func:`collate_stream`."""
        for epoch, shard, offset, last in zip(batch["epoch"], batch["shard"], batch["offset"], batch["last"]):
            self.take(int(epoch), shard, int(offset), bool(last))

    def take(self, epoch: int, shard: str, offset: int, last: bool) -> None:
        if last:
            self.done.setdefault(epoch, set()).add(shard)
            self.partial.get(epoch, {}).pop(shard, None)
        else:
            part = self.partial.setdefault(epoch, {})
            part[shard] = max(offset, part.get(shard, -1))

    def skip_to(self, epoch: int, shard: str) -> int | None:
        """The first offset still to read of ``shard`` in ``epoch`` (None: the shard is done)."""
        if shard in self.done.get(epoch, ()):
            return None
        return self.partial.get(epoch, {}).get(shard, -1) + 1

    def first_open_epoch(self, shards: Sequence[str]) -> int:
        """The first epoch in which some of ``shards`` is not finished. Earlier epochs are dropped
        from the state, so it stays as small as one epoch's shards however long the run."""
        every = set(shards)
        epoch = 0
        while every <= self.done.get(epoch, set()):
            epoch += 1
        for e in [e for e in self.done if e < epoch]:
            del self.done[e]
        for e in [e for e in self.partial if e < epoch]:
            del self.partial[e]
        return epoch

    @classmethod
    def merge(cls, states: Sequence["StreamPosition"]) -> "StreamPosition":
        """The union of several processes' positions (for a resume with any number of processes)."""
        out = cls()
        for s in states:
            for e, shards in s.done.items():
                out.done.setdefault(e, set()).update(shards)
            for e, part in s.partial.items():
                for shard, off in part.items():
                    out.take(e, shard, off, False)
        for e, shards in out.done.items():
            for shard in shards:
                out.partial.get(e, {}).pop(shard, None)
        return out

    def to_dict(self) -> dict:
        return {"done": {str(e): sorted(s) for e, s in self.done.items()},
                "partial": {str(e): dict(p) for e, p in self.partial.items() if p}}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(done={int(e): set(s) for e, s in d.get("done", {}).items()},
                   partial={int(e): {k: int(v) for k, v in p.items()} for e, p in d.get("partial", {}).items()})


class StreamingImageText(IterableDataset):
    """Image-caption pairs streamed from webdataset shards (see the module docstring).

    Items: ``{"pixel_values": (3, S, S) in [-1, 1], "text": str, "epoch", "shard", "offset",
    "last", "skipped": [(name, reason), ...]}``.

    Args:
        shards: a brace pattern, a folder of ``.tar`` files, URLs, or a list of them.
        image_size: side of the square images (resize shorter side + centre crop).
        caption_dropout: probability that ``text`` is "" (classifier-free guidance).
        seed: seed of the shard order and of caption dropout.
        rank, world_size: this process and the number of processes (default: torch.distributed's,
            else 0 and 1).
        start_epoch: the first epoch to read.
        position: what was consumed already (merged over processes); those samples are skipped.
        epochs: how many epochs to stream (None: endless).
    """

    def __init__(self, shards: str | Sequence[str], image_size: int = 64, caption_dropout: float = 0.0,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, start_epoch: int = 0,
                 position: StreamPosition | None = None, epochs: int | None = None):
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.shards = expand_shards(shards)
        self.image_size, self.caption_dropout, self.seed = int(image_size), float(caption_dropout), int(seed)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.epochs = int(start_epoch), epochs
        self.position = position or StreamPosition()

    def epoch_order(self, epoch: int) -> list[str]:
        """Every shard, in epoch ``epoch``'s order."""
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def my_shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this process's ``worker`` reads in ``epoch``."""
        order = self.epoch_order(epoch)
        return [s for i, s in enumerate(order)
                if i % self.world_size == self.rank and (i // self.world_size) % num_workers == worker]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: list[tuple[str, str]] = []
        epoch = self.start_epoch
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            mine = self.my_shards(epoch, worker, num_workers)
            if not mine:
                raise DataError(f"process {self.rank} (worker {worker}) has no shard: {len(self.shards)} shard(s) for "
                                f"{self.world_size} process(es) x {num_workers} worker(s); make more, smaller shards")
            readable = False  # an endless stream of shards that never give a sample would hang the caller
            for shard in mine:
                start = self.position.skip_to(epoch, shard)
                if start is None:
                    readable = True
                    continue
                pending = None  # one sample of lookahead marks a shard's last one
                for offset, (key, files, problem) in enumerate(_samples(shard)):
                    if offset < start:
                        continue
                    item, reason = (None, problem) if files is None else self._decode(files, epoch, shard, offset)
                    if item is None:
                        skipped.append((f"{shard}:{key}" if files is not None else key, reason))
                        continue
                    if pending is not None:
                        pending["skipped"], skipped = skipped, []
                        yield pending
                    pending, readable = item, True
                if pending is not None:
                    pending["last"] = True
                    pending["skipped"], skipped = skipped, []
                    yield pending
                elif start > 0:
                    readable = True  # resumed after the shard's last good sample
            if not readable:
                raise DataError(f"no readable image-caption sample in the shards of process {self.rank} "
                                f"(worker {worker}) in epoch {epoch}: {skipped[:3]}")
            epoch += 1

    def probe(self, max_items: int) -> "ProbeSet":
        """The first ``max_items`` good samples in the shards' given order (the same on every
        process), as a small map-style set: what a stage needs before training starts (captions for
        a new tokenizer, images for embedding statistics, fixed preview images). Reads only as many
        shards as that takes."""
        items: list[tuple[bytes, str, str]] = []
        skipped: list[tuple[str, str]] = []
        for shard in self.shards:
            for key, files, problem in _samples(shard):
                if files is not None:
                    text, problem = _caption(files)
                    ext = next((e for e in _IMAGE_EXTS if e in files), None)
                    if text is not None and ext is None:
                        problem = "no image (.jpg/.png/.webp)"
                    if text is not None and ext is not None:
                        try:
                            load_rgb(files[ext], draft_size=self.image_size)
                        except BadImageError as e:
                            skipped.append((f"{shard}:{key}", e.reason))
                            continue
                        items.append((files[ext], text, f"{shard}:{key}"))
                        if len(items) >= max_items:
                            return self._probe_set(items, skipped)
                        continue
                skipped.append((f"{shard}:{key}" if files is not None else key, problem))
        if not items:
            raise DataError(f"no readable image-caption sample in {len(self.shards)} shard(s) starting {self.shards[0]}")
        return self._probe_set(items, skipped)

    def _probe_set(self, items, skipped) -> "ProbeSet":
        out = ProbeSet(items, self.image_size, skipped)
        out.num_shards = len(self.shards)
        return out

    def _decode(self, files: dict[str, bytes], epoch: int, shard: str, offset: int):
        text, problem = _caption(files)
        if text is None:
            return None, problem
        ext = next((e for e in _IMAGE_EXTS if e in files), None)
        if ext is None:
            return None, "no image (.jpg/.png/.webp)"
        try:
            img = load_rgb(files[ext], draft_size=self.image_size)
        except BadImageError as e:
            return None, e.reason
        index = zlib.crc32(f"{shard}:{offset}".encode())
        if caption_dropped(self.caption_dropout, self.seed, epoch, index):
            text = ""
        return {"pixel_values": to_tensor(resize_center_crop(img, self.image_size)), "text": text,
                "epoch": epoch, "shard": shard, "offset": offset, "last": False}, None


class ProbeSet:
    """The first samples of a stream as a map-style set (:meth:`StreamingImageText.probe`): images
    kept encoded and decoded on access. Items: ``{"pixel_values", "text", "index"}``."""

    format = "stream"

    def __init__(self, items: list[tuple[bytes, str, str]], image_size: int, skipped: list[tuple[str, str]]):
        self._items, self.image_size, self.skipped = items, image_size, skipped
        self.num_shards = 0  # of the whole stream (set by StreamingImageText.probe)
        self.captions = [text for _, text, _ in items]
        self.keys = [key for _, _, key in items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw, text, key = self._items[index]
        try:
            img = load_rgb(raw, draft_size=self.image_size)
        except BadImageError as e:
            raise DataError(f"{key}: {e.reason}") from None
        return {"pixel_values": to_tensor(resize_center_crop(img, self.image_size)), "text": text, "index": index}


class StreamCollate:
    """A stage's collate for stream items: its batch, plus ``"stream"``: the items' positions and
    the samples skipped before them (:func:`collate_stream` without the pixels), which the trainer
    folds into its :class:`StreamPosition` when it consumes the batch."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        batch["stream"] = {
            "epoch": [it["epoch"] for it in items], "shard": [it["shard"] for it in items],
            "offset": [it["offset"] for it in items], "last": [it["last"] for it in items],
            "skipped": [s for it in items for s in it["skipped"]],
        }
        return batch


def collate_stream(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`StreamingImageText` items: stacked pixels, lists for the rest, and every
    sample skipped since the previous batch of the same worker."""
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "text": [b["text"] for b in batch],
        "epoch": [b["epoch"] for b in batch], "shard": [b["shard"] for b in batch],
        "offset": [b["offset"] for b in batch], "last": [b["last"] for b in batch],
        "skipped": [s for b in batch for s in b["skipped"]],
    }
