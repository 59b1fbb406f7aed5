"""Interleaved documents: JSONL lines of text and image segments, checked and loaded.

Each line is ``{"segments": [{"text": ...}, {"image": "relative/path.png"}, ...]}``; a malformed
line, a caption too long or an image that fails its check is skipped with its reason (see
:func:`parse_interleaved` and :class:`InterleavedDataset`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Union

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genvl.data.images import BadImageError, load_rgb, resize_center_crop, to_tensor, verify_image
from genvl.data.sources import caption_problem, no_pairs_error, read_lines
from genvl.errors import DataError

__all__ = ["parse_interleaved", "InterleavedDataset"]

logger = logging.getLogger(__name__)


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
        return caption_problem(seg["text"]) or {"text": seg["text"]}
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
    for lineno, line, problem in read_lines(path):
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
            raise no_pairs_error(self.path, self.skipped, what="documents")
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
