"""Map-style datasets over custom image-text sets.

:func:`open_image_text` detects the format (see :mod:`genvl.data.sources`) and returns an
:class:`ImageTextDataset`. Bad images never crash a run: they are found at construction (cheap
``verify()``, no decode) and listed in ``dataset.skipped``, beside the bad text the index left out;
one that only fails at full decode is recorded in ``dataset.failed`` and replaced by the next good
sample. Interleaved documents are in :mod:`genvl.data.documents`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections import OrderedDict
from typing import Any, BinaryIO, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genvl.data.documents import InterleavedDataset, parse_interleaved
from genvl.data.images import BadImageError, load_rgb, resize_center_crop, to_tensor, verify_image
from genvl.data.sources import FORMATS, Entry, TarMember, detect_format, discover_entries, expand_braces, no_pairs_error
from genvl.errors import DataError

__all__ = [
    "ImageTextDataset",
    "InterleavedDataset",
    "open_image_text",
    "collate_image_text",
    "caption_dropped",
    "expand_braces",
    "parse_interleaved",
    "FORMATS",
]

logger = logging.getLogger(__name__)

#: How many tar shards one process keeps open at a time while reading members.
_MAX_OPEN_SHARDS = 16


def caption_dropped(probability: float, seed: int, epoch: int, index: int) -> bool:
    """Whether the caption of sample ``index`` is dropped (replaced by "") in ``epoch``.

    The decision depends only on its arguments, so it is the same in every DataLoader worker and
    across restarts.

    Args:
        probability: Chance of dropping, in [0, 1].
        seed: Dataset seed.
        epoch: Epoch number (see :meth:`ImageTextDataset.set_epoch`).
        index: Sample index.

    Returns:
        True if the caption should be replaced by the empty string.
    """
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    # A string seed goes through SHA-512 in random.seed, so this is independent of
    # PYTHONHASHSEED and of the platform's hash width.
    return random.Random(f"{seed}:{epoch}:{index}").random() < probability


class ImageTextDataset(Dataset):
    """Image-caption pairs from any of the supported on-disk formats (map-style).

    Items are ``{"pixel_values": FloatTensor(3, S, S) in [-1, 1], "text": str, "index": int}``.
    ``index`` is the sample actually returned: when an image fails to decode in
    ``__getitem__``, the next good one is returned instead (deterministically) and the failure is
    recorded in :attr:`failed` (per process: each DataLoader worker keeps its own list).

    Attributes:
        root: The dataset folder (also when opened from its ``metadata.*`` file), or the shard /
            pattern for tar shards.
        format: ``"metadata.jsonl"``, ``"metadata.csv"``, ``"txt"`` or ``"tar"``.
        skipped: ``(path, reason)`` for every candidate left out at construction (and for
            damaged tar shards, whose readable members are kept).
        failed: ``(path, reason)`` for images that failed full decoding in this process.
        shards: The tar shards (tar format only).

    Args:
        path: Dataset folder, ``.tar`` shard, or shard pattern such as ``data/s-{000..009}.tar``.
        image_size: Side of the square images returned (resize shorter side + centre crop).
        caption_dropout: Probability that ``text`` is "" (for classifier-free guidance).
        seed: Seed of the caption dropout decisions.
        validate: Check every image at construction (header, size limit, ``verify()``; no full
            decode). Without it, bad files are only found in ``__getitem__``.
        progress: Show a progress bar while validating.

    Raises:
        DataError: Missing path, unknown format, or no usable pair.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        image_size: int = 64,
        caption_dropout: float = 0.0,
        seed: int = 0,
        validate: bool = True,
        progress: bool = False,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.image_size = int(image_size)
        self.caption_dropout = float(caption_dropout)
        self.seed = int(seed)
        self.epoch = 0
        self.failed: list[tuple[str, str]] = []
        self._failed_indices: set[int] = set()
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        self._handles_pid = os.getpid()
        self._lock = threading.Lock()

        self.format, self.root, self.shards = detect_format(os.fspath(path))
        entries, self.skipped = discover_entries(self.format, self.root, self.shards, progress)
        if validate and entries:
            entries = self._validate(entries, progress)
        self.close()
        if not entries:
            raise no_pairs_error(self.root, self.skipped)
        self._names = [e.name for e in entries]
        self._sources = [e.source for e in entries]
        # caption variants per sample (a metadata.jsonl "text" may be a list); the first is canonical
        self._variants = [e.caption if isinstance(e.caption, tuple) else (e.caption,) for e in entries]
        self._captions = [v[0] for v in self._variants]

    # -- construction -------------------------------------------------------------------------

    def _validate(self, entries: list[Entry], progress: bool) -> list[Entry]:
        kept = []
        for entry in tqdm(entries, desc=f"checking images in {self.root}", unit="img", disable=not progress):
            try:
                verify_image(self._read_source(entry.source))
            except BadImageError as e:
                self.skipped.append((entry.name, e.reason))
                continue
            kept.append(entry)
        return kept

    # -- reading ------------------------------------------------------------------------------

    def _read_source(self, source: Union[str, TarMember]) -> Union[str, bytes]:
        """A path for folder formats; the member's bytes for tar shards."""
        if isinstance(source, str):
            return source
        with self._lock:
            try:
                fp = self._shard_file(source.shard)
                fp.seek(source.offset)
                data = fp.read(source.size)
            except OSError as e:
                raise BadImageError(f"cannot read tar member: {e.strerror or e}") from None
        if len(data) < source.size:
            raise BadImageError("truncated tar member (shard ends early)")
        return data

    def _shard_file(self, shard: int) -> BinaryIO:
        """An open file for ``shard``, reopened per process (handles must not be shared).

        Called with ``self._lock`` held. Handles inherited through a fork share their file
        position with the parent's, so a forked worker drops them and opens its own.
        """
        if self._handles_pid != os.getpid():
            self._handles = OrderedDict()
            self._handles_pid = os.getpid()
        fp = self._handles.get(shard)
        if fp is None:
            fp = open(self.shards[shard], "rb")  # noqa: SIM115 - cached, closed in close()
            self._handles[shard] = fp
            while len(self._handles) > _MAX_OPEN_SHARDS:
                _, old = self._handles.popitem(last=False)
                old.close()
        else:
            self._handles.move_to_end(shard)
        return fp

    def close(self) -> None:
        """Close the tar shards this process has open (they reopen on demand)."""
        with self._lock:
            if self._handles_pid == os.getpid():
                for fp in self._handles.values():
                    fp.close()
            self._handles = OrderedDict()
            self._handles_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Open files and locks cannot be pickled (spawned DataLoader workers); drop them.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles_pid = os.getpid()
        self._lock = threading.Lock()

    def image_name(self, index: int) -> str:
        """Display path of sample ``index`` (``shard.tar:member`` for tar shards)."""
        return self._names[index]

    def image_bytes(self, index: int) -> bytes:
        """The encoded image file of sample ``index`` as stored (for re-sharding without re-encoding)."""
        source = self._read_source(self._sources[index])
        if isinstance(source, bytes):
            return source
        with open(source, "rb") as f:
            return f.read()

    def load_image(self, index: int, draft_size: int | None = None) -> Image.Image:
        """Fully decode the image of sample ``index`` at its original size, in RGB.

        Args:
            index: Sample index.
            draft_size: Passed to :func:`~genvl.data.images.load_rgb` (faster JPEG decoding).

        Raises:
            BadImageError: If the image cannot be decoded (the path is in ``.path``).
        """
        try:
            return load_rgb(self._read_source(self._sources[index]), draft_size=draft_size)
        except BadImageError as e:
            raise BadImageError(e.reason, self._names[index]) from None

    def _record_failure(self, index: int, reason: str) -> None:
        self._failed_indices.add(index)
        self.failed.append((self._names[index], reason))
        # Each index fails at most once per process, so this warns once per file.
        logger.warning("skipping image that failed to decode: %s: %s", self._names[index], reason)

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self._sources)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            j = (index + step) % n
            if j in self._failed_indices:
                continue
            try:
                img = self.load_image(j, draft_size=self.image_size)
            except BadImageError as e:
                self._record_failure(j, e.reason)
                continue
            pixels = to_tensor(resize_center_crop(img, self.image_size))
            return {"pixel_values": pixels, "text": self.text(j), "index": j}
        raise DataError(f"no image in {self.root} could be decoded ({n} failed)")

    # -- captions -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that caption dropout depends on (call before each epoch's DataLoader
        iteration; workers created afterwards see it, persistent workers do not)."""
        self.epoch = int(epoch)

    def text(self, index: int) -> str:
        """The caption of sample ``index`` as returned this epoch ("" when dropped)."""
        if caption_dropped(self.caption_dropout, self.seed, self.epoch, index):
            return ""
        variants = self._variants[index]
        if len(variants) == 1:
            return variants[0]
        return variants[random.Random(f"variant:{self.seed}:{self.epoch}:{index}").randrange(len(variants))]

    def variants(self, index: int) -> tuple[str, ...]:
        """Every caption variant of sample ``index``, without dropout (the first is canonical)."""
        return self._variants[index]

    @property
    def captions(self) -> list[str]:
        """The canonical (first) caption of every sample, without dropout."""
        return list(self._captions)

    @property
    def all_captions(self) -> list[str]:
        """Every caption variant of every sample (e.g. for training a tokenizer)."""
        return [c for v in self._variants for c in v]

    def __repr__(self) -> str:
        return (
            f"ImageTextDataset(root={self.root!r}, format={self.format!r}, samples={len(self)}, "
            f"skipped={len(self.skipped)}, image_size={self.image_size})"
        )


def open_image_text(
    path: Union[str, "os.PathLike[str]"],
    image_size: int = 64,
    caption_dropout: float = 0.0,
    seed: int = 0,
    validate: bool = True,
    progress: bool = False,
) -> ImageTextDataset:
    """Open an image-text set, detecting its format.

    Detection order for a folder: ``metadata.jsonl``, then ``metadata.csv``, then ``*.tar``
    shards directly inside it, else images with ``.txt`` captions (recursive). A ``.tar`` file or
    a brace pattern (``data/shard-{000..009}.tar``) is read as webdataset shards.

    Args:
        path: Folder, ``.tar`` file or shard pattern.
        image_size: Side of the square images returned.
        caption_dropout: Probability of returning "" as the caption.
        seed: Seed for caption dropout.
        validate: Check every image at construction (no full decode).
        progress: Show a progress bar while validating.

    Returns:
        The dataset.

    Raises:
        DataError: Missing path, unknown format, or no usable pair.
    """
    return ImageTextDataset(
        path,
        image_size=image_size,
        caption_dropout=caption_dropout,
        seed=seed,
        validate=validate,
        progress=progress,
    )


def collate_image_text(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`ImageTextDataset` items for a DataLoader.

    Args:
        batch: Items from the dataset.

    Returns:
        ``{"pixel_values": (B, 3, S, S), "text": list[str], "index": LongTensor(B)}``.
    """
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "text": [item["text"] for item in batch],
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }
