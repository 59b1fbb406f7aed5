"""Map-style datasets over custom image-text sets and interleaved documents.

Three on-disk image-text formats are detected automatically (see :func:`open_image_text`):

* ``metadata.jsonl`` / ``metadata.csv`` beside the images (HF imagefolder convention),
* images with a same-named ``.txt`` caption (searched recursively),
* webdataset ``.tar`` shards (one file, a folder of them, or a brace pattern).

Bad images never crash a run: they are found at construction (cheap ``verify()``, no decode) and
listed in ``dataset.skipped``; one that only fails at full decode is recorded in
``dataset.failed`` and replaced by the next good sample. Bad text is skipped the same way, with its
reason: a metadata line that is not UTF-8, malformed or longer than
:data:`~genvl.limits.MAX_LINE_BYTES`; a ``file_name`` that leads outside the dataset folder; a
caption longer than :data:`~genvl.limits.MAX_CAPTION_CHARS` characters; a caption file that is not
a regular file.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import posixpath
import random
import re
import stat
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genvl.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    load_rgb,
    resize_center_crop,
    to_tensor,
    verify_image,
)
from genvl.errors import DataError
from genvl.limits import MAX_CAPTION_CHARS, MAX_LINE_BYTES

__all__ = [
    "ImageTextDataset",
    "InterleavedDataset",
    "open_image_text",
    "collate_image_text",
    "caption_dropped",
    "expand_braces",
    "parse_interleaved",
]

logger = logging.getLogger(__name__)

#: Values of ``ImageTextDataset.format``.
FORMATS = ("metadata.jsonl", "metadata.csv", "txt", "tar")

#: How many tar shards one process keeps open at a time while reading members.
_MAX_OPEN_SHARDS = 16

_EXPECTED = (
    "expected a folder with metadata.jsonl or metadata.csv, a folder of images with same-named "
    ".txt captions, or webdataset .tar shards (a file, a folder of them, or a pattern like "
    "shard-{000..009}.tar)"
)


class _TarMember(NamedTuple):
    """Where an image member's bytes live inside a shard."""

    shard: int
    offset: int
    size: int


class _Entry(NamedTuple):
    """One candidate sample: a display name, where its image is, and its caption."""

    name: str
    source: Union[str, _TarMember]
    caption: str | tuple[str, ...]  # a tuple holds caption variants (metadata.jsonl "text" list)


# --------------------------------------------------------------------------------------------
# helpers


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


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``shard-{000..002}.tar`` and ``{a,b}.tar``.

    Zero padding of numeric ranges is kept (``{000..009}`` gives ``000`` ... ``009``); several
    groups expand as a cross product, left to right. Braces that are neither a range nor a
    comma list are kept literally.

    Args:
        pattern: A path pattern.

    Returns:
        The expanded paths, in order.
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = _RANGE.fullmatch(body)
    if rng:
        a_text, b_text = rng.group(1), rng.group(2)
        a, b = int(a_text), int(b_text)
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (a_text, b_text))
        width = max(len(a_text), len(b_text)) if padded else 0
        step = 1 if b >= a else -1
        choices = [f"{i:0{width}d}" for i in range(a, b + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _no_pairs_error(root: str, skipped: list[tuple[str, str]], what: str = "image-text pairs") -> DataError:
    """The error for a dataset whose every candidate was skipped."""
    msg = f"no usable {what} in {root}: {len(skipped)} files skipped"
    if skipped:
        path, reason = skipped[0]
        msg += f" (first: {path}: {reason})"
    return DataError(msg)


# --------------------------------------------------------------------------------------------
# discovery of the three image-text formats


def _detect(path: str) -> tuple[str, str, list[str]]:
    """Return ``(format, folder, shards)``.

    ``folder`` is where metadata / images are looked up (the parent when ``path`` is a
    ``metadata.*`` file); ``shards`` is only filled for the tar format.
    """
    if not os.path.exists(path):
        if "{" in path:
            shards = expand_braces(path)
            if len(shards) > 1 or shards[0] != path:
                missing = [s for s in shards if not os.path.isfile(s)]
                if len(missing) == len(shards):
                    raise DataError(f"dataset not found: {path} (no shard of the pattern exists)")
                if missing:
                    raise DataError(
                        f"dataset not found: {missing[0]} ({len(missing)} of {len(shards)} shards "
                        f"of {path} are missing)"
                    )
                return "tar", path, shards
        raise DataError(f"dataset not found: {path}")
    if os.path.isfile(path):
        lower = path.lower()
        name = os.path.basename(lower)
        if lower.endswith(".tar"):
            return "tar", path, [path]
        if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise DataError(
                f"compressed tar shards cannot be read by offset: {path}; expected uncompressed .tar"
            )
        if name in ("metadata.jsonl", "metadata.csv"):
            return name, os.path.dirname(path) or ".", []
        if lower.endswith(".jsonl"):
            raise DataError(
                f"{path} is a .jsonl file: interleaved documents are read by InterleavedDataset; "
                f"for image-text pairs {_EXPECTED}"
            )
        raise DataError(f"unknown dataset format: {path}; {_EXPECTED}")
    if not os.path.isdir(path):
        raise DataError(f"unknown dataset format: {path}; {_EXPECTED}")
    for name in ("metadata.jsonl", "metadata.csv"):
        if os.path.isfile(os.path.join(path, name)):
            return name, path, []
    try:
        names = os.listdir(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    shards = sorted(
        os.path.join(path, n) for n in names if n.lower().endswith(".tar") and os.path.isfile(os.path.join(path, n))
    )
    if shards:
        return "tar", path, shards
    return "txt", path, []


def _caption_problem(text: str) -> str | None:
    """Why a caption cannot be used (too long), or None."""
    if len(text) > MAX_CAPTION_CHARS:
        return f"caption is {len(text):,} characters, longer than the limit of {MAX_CAPTION_CHARS:,}"
    return None


def _inside(root: str, file_name: str) -> str | None:
    """``root/file_name`` normalised, or None when ``file_name`` is absolute or leads out of ``root``
    with ``..`` (checked on the names: symbolic links inside the folder are followed)."""
    if os.path.isabs(file_name) or "\0" in file_name:
        return None
    image = os.path.normpath(os.path.join(root, file_name))
    base = os.path.normpath(root)
    try:
        if os.path.commonpath([os.path.abspath(base), os.path.abspath(image)]) != os.path.abspath(base):
            return None
    except ValueError:  # different drives (Windows)
        return None
    return image if image != base else None


def _entry_for_file(root: str, file_name: Any, text: Any, where: str) -> tuple[_Entry | None, tuple[str, str] | None]:
    """Validate one metadata row; returns an entry or a (path, reason) skip."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None, (where, "missing file_name")
    image = _inside(root, file_name)
    if image is None:
        return None, (where, f"file_name {file_name[:200]!r} is not a path inside the dataset folder")
    if text is None:
        return None, (image, "missing text")
    if isinstance(text, list):  # caption variants: one is drawn per epoch
        if not text or not all(isinstance(t, str) for t in text):
            return None, (image, "text is a list but not a non-empty list of strings")
        variants = tuple(t.strip() for t in text)
        problem = next((p for p in map(_caption_problem, variants) if p), None)
        if problem:
            return None, (image, problem)
        return _Entry(image, image, variants), None
    if not isinstance(text, str):
        return None, (image, f"text is not a string ({type(text).__name__})")
    problem = _caption_problem(text.strip())
    if problem:
        return None, (image, problem)
    return _Entry(image, image, text.strip()), None


def _read_lines(path: str, lossy: bool = False) -> Iterator[tuple[int, str | None, str]]:
    """The lines of a text file, decoded one at a time: ``(number, text, "")``, or ``(number, None,
    reason)`` for a line that is not UTF-8 or longer than :data:`~genvl.limits.MAX_LINE_BYTES` (read
    past in pieces, never held whole). One bad byte costs its line, not the file. ``lossy``: bytes
    that are not UTF-8 become surrogates (``\\udcff``) instead, for the caller to judge.

    Raises:
        DataError: the file cannot be opened or read.
    """
    try:
        with open(path, "rb") as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES:
                    while raw and not raw.endswith(b"\n"):  # the rest of the line
                        raw = f.readline(MAX_LINE_BYTES + 1)
                    yield lineno, None, f"line longer than {MAX_LINE_BYTES:,} bytes"
                    continue
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    text = raw.decode("utf-8", "surrogateescape" if lossy else "strict")
                except UnicodeDecodeError as e:
                    yield lineno, None, f"line is not UTF-8 (byte {e.start + 1})"
                    continue
                yield lineno, text, ""
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_metadata_jsonl(root: str) -> tuple[list[_Entry], list[tuple[str, str]]]:
    meta = os.path.join(root, "metadata.jsonl")
    entries: list[_Entry] = []
    skipped: list[tuple[str, str]] = []
    for lineno, line, problem in _read_lines(meta):
        where = f"{meta}:{lineno}"
        if line is None:
            skipped.append((where, problem))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            skipped.append((where, "malformed JSON line"))
            continue
        if not isinstance(row, dict):
            skipped.append((where, "line is not a JSON object"))
            continue
        entry, skip = _entry_for_file(root, row.get("file_name"), row.get("text"), where)
        if entry is not None:
            entries.append(entry)
        else:
            skipped.append(skip)
    return entries, skipped


def _has_undecodable(values) -> bool:
    """Whether any string holds a byte that was not UTF-8 (decoded with ``surrogateescape``)."""
    return any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in values)


def _csv_lines(meta: str, skipped: list[tuple[str, str]]) -> Iterator[str]:
    """The lines of ``meta`` for the csv module: bytes that are not UTF-8 kept as surrogates (the rows
    holding them are skipped by the reader), lines longer than the limit replaced by an empty line."""
    for lineno, line, problem in _read_lines(meta, lossy=True):
        if line is None:
            skipped.append((f"{meta}:{lineno}", problem))
            yield "\n"
            continue
        yield line


def _read_metadata_csv(root: str) -> tuple[list[_Entry], list[tuple[str, str]]]:
    meta = os.path.join(root, "metadata.csv")
    entries: list[_Entry] = []
    skipped: list[tuple[str, str]] = []
    # spreadsheet programs like to start CSV files with a byte-order mark (dropped by _read_lines)
    reader = csv.reader(_csv_lines(meta, skipped))
    try:
        columns = next(reader, None) or []
    except csv.Error as e:
        raise DataError(f"cannot read {meta}: {e}") from None
    if _has_undecodable(columns):
        raise DataError(f"cannot read {meta}: its header line is not UTF-8")
    for col in ("file_name", "text"):
        if col not in columns:
            raise DataError(f"{meta} has no '{col}' column (columns: {', '.join(columns) or 'none'})")
    i_file, i_text = columns.index("file_name"), columns.index("text")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a field over the csv module's size limit, a NUL byte, ...: that row only
            skipped.append((f"{meta}:{reader.line_num}", f"malformed CSV row ({e})"))
            continue
        where = f"{meta}:{reader.line_num}"
        if not row or not any(v.strip() for v in row):
            continue
        if _has_undecodable(row):
            skipped.append((where, "row is not UTF-8"))
            continue
        file_name = row[i_file] if i_file < len(row) else None
        text = row[i_text] if i_text < len(row) else None
        entry, skip = _entry_for_file(root, file_name, text, where)
        if entry is not None:
            entries.append(entry)
        else:
            skipped.append(skip)
    return entries, skipped


def _read_caption_file(path: str) -> str:
    """The stripped caption in ``path``; OSError or UnicodeDecodeError when unreadable, ValueError
    (with the reason) for a file that is not a regular file or too long to be a caption."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("caption is not a regular file")
    if st.st_size > MAX_LINE_BYTES:  # read no further than that
        raise ValueError(f"caption file is {st.st_size:,} bytes, more than the limit of {MAX_LINE_BYTES:,}")
    with open(path, "rb") as f:
        text = f.read(MAX_LINE_BYTES + 1).decode("utf-8-sig").strip()
    problem = _caption_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _scan_txt_folder(root: str) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """Images anywhere under ``root`` with a ``.txt`` of the same stem beside them.

    Hidden files and folders (names starting with ".") are ignored.
    """
    entries: list[_Entry] = []
    skipped: list[tuple[str, str]] = []

    def unreadable(e: OSError) -> None:  # os.walk skips folders it cannot list; count them
        skipped.append((e.filename or root, f"folder unreadable: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for fname in sorted(filenames):
            if fname.startswith(".") or not _is_image_name(fname):
                continue
            image = os.path.join(dirpath, fname)
            caption_name = os.path.splitext(fname)[0] + ".txt"
            if caption_name not in names:
                skipped.append((image, "no caption"))
                continue
            try:
                caption = _read_caption_file(os.path.join(dirpath, caption_name))
            except UnicodeDecodeError:
                skipped.append((image, "caption is not UTF-8"))
                continue
            except OSError as e:
                skipped.append((image, f"caption unreadable: {e.strerror or e}"))
                continue
            except ValueError as e:
                skipped.append((image, str(e)))
                continue
            entries.append(_Entry(image, image, caption))
    return entries, skipped


def _trailing_damage(shard: str, end: int) -> str | None:
    """Why the bytes after the last member tarfile could read are suspicious, if they are.

    ``tarfile`` stops silently at a truncated or corrupt header past the first member, which
    would lose the rest of the shard without a word. A healthy archive has only zero padding
    after its last member.
    """
    size = os.path.getsize(shard)
    if end > size:
        return f"shard is truncated: the last member ends at byte {end:,} of {size:,}"
    if end and size - end < 2 * tarfile.BLOCKSIZE:
        return "no end-of-archive marker: the shard may be truncated"
    with open(shard, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return f"unreadable data after byte {end:,}: shard truncated or corrupt"
    return None


def _tar_caption(tf: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(caption, None) of a ``.txt`` member, or (None, why it cannot be used); a member larger than
    the limit is not read."""
    if member.size > MAX_LINE_BYTES:
        return None, f"caption is {member.size:,} bytes, more than the limit of {MAX_LINE_BYTES:,}"
    try:
        text = tf.extractfile(member).read().decode("utf-8-sig").strip()  # type: ignore[union-attr]
    except UnicodeDecodeError:
        return None, "caption is not UTF-8"
    problem = _caption_problem(text)
    return (None, problem) if problem else (text, None)


def _index_shard(shard_index: int, shard: str) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """Index one webdataset shard: image member offsets and the captions, grouped by key.

    The key is the member path without its extension (``a/0001.jpg`` and ``a/0001.txt`` pair up).
    Captions are small and read now; image bytes are read later by offset.
    """
    images: dict[str, tuple[str, _TarMember]] = {}
    captions: dict[str, str | None] = {}  # None: unusable, see bad_caption
    bad_caption: dict[str, str] = {}
    order: dict[str, None] = {}  # keys in first-seen order (a dict as an ordered set)
    skipped: list[tuple[str, str]] = []
    end = 0  # where the data of the last member read ends, padded to the 512-byte block
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for member in tf:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile() or posixpath.basename(member.name).startswith("."):
                    continue
                key, ext = posixpath.splitext(member.name)
                ext = ext.lower()
                if ext == ".txt":
                    if key in captions:
                        continue
                    captions[key], problem = _tar_caption(tf, member)
                    if problem:
                        bad_caption[key] = problem
                elif ext in IMAGE_EXTENSIONS and key not in images:
                    images[key] = (member.name, _TarMember(shard_index, member.offset_data, member.size))
                else:
                    continue
                order.setdefault(key)
        damage = _trailing_damage(shard, end)
        if damage:
            skipped.append((shard, damage))
    except (tarfile.TarError, OSError, EOFError) as e:
        # Keep whatever was indexed before the damage.
        skipped.append((shard, f"corrupt or truncated tar shard: {' '.join(str(e).split())}"))
    entries: list[_Entry] = []
    for key in order:
        if key not in images:
            skipped.append((f"{shard}:{key}", "no image"))
            continue
        member_name, where = images[key]
        name = f"{shard}:{member_name}"
        if key not in captions:
            skipped.append((name, "no caption"))
        elif captions[key] is None:
            skipped.append((name, bad_caption[key]))
        else:
            entries.append(_Entry(name, where, captions[key]))  # type: ignore[arg-type]
    return entries, skipped


# --------------------------------------------------------------------------------------------
# the image-text dataset


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

        self.format, self.root, self.shards = _detect(os.fspath(path))
        entries, self.skipped = self._discover(progress)
        if validate and entries:
            entries = self._validate(entries, progress)
        self.close()
        if not entries:
            raise _no_pairs_error(self.root, self.skipped)
        self._names = [e.name for e in entries]
        self._sources = [e.source for e in entries]
        # caption variants per sample (a metadata.jsonl "text" may be a list); the first is canonical
        self._variants = [e.caption if isinstance(e.caption, tuple) else (e.caption,) for e in entries]
        self._captions = [v[0] for v in self._variants]

    # -- construction -------------------------------------------------------------------------

    def _discover(self, progress: bool) -> tuple[list[_Entry], list[tuple[str, str]]]:
        if self.format == "metadata.jsonl":
            return _read_metadata_jsonl(self.root)
        if self.format == "metadata.csv":
            return _read_metadata_csv(self.root)
        if self.format == "txt":
            entries, skipped = _scan_txt_folder(self.root)
            if not entries and not skipped:
                raise DataError(f"no image-text data found in {self.root}: {_EXPECTED}")
            return entries, skipped
        entries, skipped = [], []
        shards = tqdm(self.shards, desc="indexing shards", unit="shard", disable=not progress or len(self.shards) < 2)
        for i, shard in enumerate(shards):
            e, s = _index_shard(i, shard)
            entries.extend(e)
            skipped.extend(s)
        return entries, skipped

    def _validate(self, entries: list[_Entry], progress: bool) -> list[_Entry]:
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

    def _read_source(self, source: Union[str, _TarMember]) -> Union[str, bytes]:
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


# --------------------------------------------------------------------------------------------
# interleaved documents


def _parse_segment(seg: Any, folder: str) -> dict[str, str] | str:
    """A checked segment (image paths made absolute), or the reason it is malformed."""
    if not isinstance(seg, dict):
        return "segment is not a JSON object"
    has_text, has_image = "text" in seg, "image" in seg
    if has_text == has_image:
        return "segment needs exactly one of 'text' or 'image'"
    if has_text:
        if not isinstance(seg["text"], str):
            return "'text' is not a string"
        return _caption_problem(seg["text"]) or {"text": seg["text"]}
    image = seg["image"]
    if not isinstance(image, str) or not image.strip() or "\0" in image:
        return "'image' is not a path"
    return {"image": os.path.normpath(os.path.join(folder, image))}


def parse_interleaved(
    path: Union[str, "os.PathLike[str]"],
) -> tuple[list[list[dict[str, str]]], list[int], list[tuple[str, str]]]:
    """Read an interleaved-documents JSONL file without opening any image.

    Args:
        path: The ``.jsonl`` file; relative image paths are relative to its folder.

    Returns:
        ``(documents, line_numbers, skipped)``: well-formed documents as lists of
        ``{"text": str}`` / ``{"image": absolute path}``, the line each came from, and
        ``(where, reason)`` for malformed lines.

    Raises:
        DataError: If the file is missing, unreadable, or empty.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"dataset not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"expected a .jsonl file of interleaved documents, got a folder: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    docs: list[list[dict[str, str]]] = []
    line_numbers: list[int] = []
    skipped: list[tuple[str, str]] = []
    nonempty = False
    for lineno, line, problem in _read_lines(path):
        where = f"{path}:{lineno}"
        if line is None:
            nonempty = True
            skipped.append((where, problem))
            continue
        if not line.strip():
            continue
        nonempty = True
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            skipped.append((where, "malformed JSON line"))
            continue
        if not isinstance(raw, list) or not raw:
            skipped.append((where, "line is not a non-empty JSON list of segments"))
            continue
        segments = [_parse_segment(s, folder) for s in raw]
        problem = next((s for s in segments if isinstance(s, str)), None)
        if problem is not None:
            skipped.append((where, problem))
            continue
        docs.append(segments)  # type: ignore[arg-type]
        line_numbers.append(lineno)
    if not nonempty:
        raise DataError(f"no documents in {path}: the file is empty")
    return docs, line_numbers, skipped


class InterleavedDataset(Dataset):
    """Interleaved image-text documents from a JSONL file (map-style).

    Each line is a JSON list of segments ``{"text": str}`` or ``{"image": path}`` (relative to the
    file's folder, or absolute). Items are lists of ``{"text": str}`` / ``{"image":
    FloatTensor(3, S, S)}`` in document order. Malformed lines and documents with a bad image are
    left out and listed in :attr:`skipped`; a document whose image only fails at full decode is
    replaced by the next document and listed in :attr:`failed`.

    Args:
        path: The ``.jsonl`` file.
        image_size: Side of the square images returned.
        validate: Check every image at construction (no full decode).
        progress: Show a progress bar while validating.

    Raises:
        DataError: Missing or empty file, or no usable document.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        image_size: int = 64,
        validate: bool = True,
        progress: bool = False,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.path = os.fspath(path)
        self.root = os.path.dirname(os.path.abspath(self.path))
        self.image_size = int(image_size)
        self.failed: list[tuple[str, str]] = []
        self._failed_indices: set[int] = set()
        docs, lines, self.skipped = parse_interleaved(self.path)
        if validate:
            docs, lines = self._validate(docs, lines, progress)
        if not docs:
            raise _no_pairs_error(self.path, self.skipped, what="documents")
        self._docs = docs
        self._lines = lines

    def _validate(self, docs, lines, progress):
        verdicts: dict[str, str | None] = {}  # image path -> reason it is bad (None: good)
        kept_docs, kept_lines = [], []
        for doc, lineno in tqdm(list(zip(docs, lines)), desc="checking documents", unit="doc", disable=not progress):
            bad = None
            for seg in doc:
                if "image" not in seg:
                    continue
                image = seg["image"]
                if image not in verdicts:
                    try:
                        verify_image(image)
                        verdicts[image] = None
                    except BadImageError as e:
                        verdicts[image] = e.reason
                if verdicts[image] is not None:
                    bad = (image, f"{verdicts[image]} (document on line {lineno} dropped)")
                    break
            if bad:
                self.skipped.append(bad)
            else:
                kept_docs.append(doc)
                kept_lines.append(lineno)
        return kept_docs, kept_lines

    @property
    def num_images(self) -> int:
        """Number of image segments in the kept documents."""
        return sum(1 for doc in self._docs for seg in doc if "image" in seg)

    def __len__(self) -> int:
        return len(self._docs)

    def image_paths(self, index: int) -> list[str]:
        """The image paths of document ``index``, in order (no image is opened)."""
        return [seg["image"] for seg in self._docs[index] if "image" in seg]

    def _load(self, index: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for seg in self._docs[index]:
            if "text" in seg:
                items.append({"text": seg["text"]})
            else:
                try:
                    img = load_rgb(seg["image"], draft_size=self.image_size)
                except BadImageError as e:
                    raise BadImageError(e.reason, seg["image"]) from None
                items.append({"image": to_tensor(resize_center_crop(img, self.image_size))})
        return items

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        n = len(self._docs)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} documents")
        for step in range(n):
            j = (index + step) % n
            if j in self._failed_indices:
                continue
            try:
                return self._load(j)
            except BadImageError as e:
                self._failed_indices.add(j)
                self.failed.append((e.path or self.path, e.reason))
                logger.warning("skipping document on line %d of %s: %s", self._lines[j], self.path, e)
        raise DataError(f"no document in {self.path} could be decoded ({n} failed)")

    def __repr__(self) -> str:
        return f"InterleavedDataset(path={self.path!r}, documents={len(self)}, skipped={len(self.skipped)})"
