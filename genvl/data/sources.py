"""Where the samples of a custom image-text set are: format detection and indexing.

Three on-disk image-text formats are detected (:func:`detect_format`):

* ``metadata.jsonl`` / ``metadata.csv`` beside the images (HF imagefolder convention),
* images with a same-named ``.txt`` caption (searched recursively),
* webdataset ``.tar`` shards (one file, a folder of them, or a brace pattern).

:func:`discover_entries` lists every candidate sample (:class:`Entry`: a display name, a path or a
:class:`TarMember`, its caption) and, with its reason, every one it leaves out: a metadata line that
is not UTF-8, malformed or longer than :data:`~genvl.limits.MAX_LINE_BYTES`; a ``file_name`` that
leads outside the dataset folder; a caption longer than :data:`~genvl.limits.MAX_CAPTION_CHARS`
characters; a caption file that is not a regular file; the damaged end of a tar shard. Nothing here
decodes an image.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from typing import Any, NamedTuple, Union

from tqdm.auto import tqdm

from genvl.data.images import IMAGE_EXTENSIONS
from genvl.errors import DataError
from genvl.limits import MAX_CAPTION_CHARS, MAX_LINE_BYTES

__all__ = ["FORMATS", "EXPECTED", "TarMember", "Entry", "expand_braces", "detect_format", "discover_entries",
           "caption_problem", "read_lines", "no_pairs_error"]

#: Values of ``ImageTextDataset.format``.
FORMATS = ("metadata.jsonl", "metadata.csv", "txt", "tar")

#: What a path must be, for error messages.
EXPECTED = (
    "expected a folder with metadata.jsonl or metadata.csv, a folder of images with same-named "
    ".txt captions, or webdataset .tar shards (a file, a folder of them, or a pattern like "
    "shard-{000..009}.tar)"
)


class TarMember(NamedTuple):
    """Where an image member's bytes live inside a shard."""

    shard: int
    offset: int
    size: int


class Entry(NamedTuple):
    """One candidate sample: a display name, where its image is, and its caption."""

    name: str
    source: Union[str, TarMember]
    caption: str | tuple[str, ...]  # a tuple holds caption variants (metadata.jsonl "text" list)



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


def no_pairs_error(root: str, skipped: list[tuple[str, str]], what: str = "image-text pairs") -> DataError:
    """The error for a dataset whose every candidate was skipped."""
    msg = f"no usable {what} in {root}: {len(skipped)} files skipped"
    if skipped:
        path, reason = skipped[0]
        msg += f" (first: {path}: {reason})"
    return DataError(msg)


# --------------------------------------------------------------------------------------------
# discovery of the three image-text formats


def detect_format(path: str) -> tuple[str, str, list[str]]:
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
                f"for image-text pairs {EXPECTED}"
            )
        raise DataError(f"unknown dataset format: {path}; {EXPECTED}")
    if not os.path.isdir(path):
        raise DataError(f"unknown dataset format: {path}; {EXPECTED}")
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


def caption_problem(text: str) -> str | None:
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


def _entry_for_file(root: str, file_name: Any, text: Any, where: str) -> tuple[Entry | None, tuple[str, str] | None]:
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
        problem = next((p for p in map(caption_problem, variants) if p), None)
        if problem:
            return None, (image, problem)
        return Entry(image, image, variants), None
    if not isinstance(text, str):
        return None, (image, f"text is not a string ({type(text).__name__})")
    problem = caption_problem(text.strip())
    if problem:
        return None, (image, problem)
    return Entry(image, image, text.strip()), None


def read_lines(path: str, lossy: bool = False) -> Iterator[tuple[int, str | None, str]]:
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


def _read_metadata_jsonl(root: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    meta = os.path.join(root, "metadata.jsonl")
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for lineno, line, problem in read_lines(meta):
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
    for lineno, line, problem in read_lines(meta, lossy=True):
        if line is None:
            skipped.append((f"{meta}:{lineno}", problem))
            yield "\n"
            continue
        yield line


def _read_metadata_csv(root: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    meta = os.path.join(root, "metadata.csv")
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    # spreadsheet programs like to start CSV files with a byte-order mark (dropped by read_lines)
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
    problem = caption_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _scan_txt_folder(root: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Images anywhere under ``root`` with a ``.txt`` of the same stem beside them.

    Hidden files and folders (names starting with ".") are ignored.
    """
    entries: list[Entry] = []
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
            entries.append(Entry(image, image, caption))
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
    problem = caption_problem(text)
    return (None, problem) if problem else (text, None)


def _index_shard(shard_index: int, shard: str) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Index one webdataset shard: image member offsets and the captions, grouped by key.

    The key is the member path without its extension (``a/0001.jpg`` and ``a/0001.txt`` pair up).
    Captions are small and read now; image bytes are read later by offset.
    """
    images: dict[str, tuple[str, TarMember]] = {}
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
                    images[key] = (member.name, TarMember(shard_index, member.offset_data, member.size))
                else:
                    continue
                order.setdefault(key)
        damage = _trailing_damage(shard, end)
        if damage:
            skipped.append((shard, damage))
    except (tarfile.TarError, OSError, EOFError) as e:
        # Keep whatever was indexed before the damage.
        skipped.append((shard, f"corrupt or truncated tar shard: {' '.join(str(e).split())}"))
    entries: list[Entry] = []
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
            entries.append(Entry(name, where, captions[key]))  # type: ignore[arg-type]
    return entries, skipped


# --------------------------------------------------------------------------------------------
# the image-text dataset


def discover_entries(
    format: str, root: str, shards: list[str], progress: bool = False
) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Every candidate sample of a set :func:`detect_format` found, and ``(path, reason)`` for each
    one left out (bad text, a file name outside the folder, a damaged shard).

    Raises:
        DataError: A ``.txt`` caption folder with neither images nor captions.
    """
    if format == "metadata.jsonl":
        return _read_metadata_jsonl(root)
    if format == "metadata.csv":
        return _read_metadata_csv(root)
    if format == "txt":
        entries, skipped = _scan_txt_folder(root)
        if not entries and not skipped:
            raise DataError(f"no image-text data found in {root}: {EXPECTED}")
        return entries, skipped
    entries, skipped = [], []
    bar = tqdm(shards, desc="indexing shards", unit="shard", disable=not progress or len(shards) < 2)
    for i, shard in enumerate(bar):
        e, s = _index_shard(i, shard)
        entries.extend(e)
        skipped.extend(s)
    return entries, skipped
