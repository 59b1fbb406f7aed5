"""``genvl data check PATH``: decode every image of a dataset and summarise it.

Unlike dataset construction (which only runs PIL's ``verify()``), the check fully decodes each
image, so it also finds files that would only fail during training, such as truncated JPEGs.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar, Union

from tqdm.auto import tqdm

from genvl.data.datasets import ImageTextDataset
from genvl.data.documents import parse_interleaved
from genvl.data.images import BadImageError, load_rgb

__all__ = ["Spread", "DataReport", "check_dataset", "format_report"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Spread:
    """Minimum, median and maximum of a list of numbers."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread | None":
        """The spread of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(min(values), statistics.median(values), max(values))


@dataclass
class DataReport:
    """What :func:`check_dataset` found.

    Attributes:
        path: The dataset path as given.
        format: ``"metadata.jsonl"``, ``"metadata.csv"``, ``"txt"``, ``"tar"`` or
            ``"interleaved"``.
        num_pairs: Image-text pairs whose image decoded (image-text formats; 0 for interleaved).
        width: Spread of image widths in pixels (before any resizing).
        height: Spread of image heights in pixels.
        caption_chars: Spread of caption lengths in characters (text segments for interleaved).
        caption_words: Spread of caption lengths in whitespace-separated words.
        empty_captions: Captions (or text segments) that are empty or only whitespace.
        bad: ``(path, reason)`` for every file or line that cannot be used.
        num_documents: Usable documents (interleaved only).
        num_segments: Segments in the usable documents (interleaved only).
        num_images: Decoded images: the pairs' images, or the image segments of usable documents.
    """

    path: str
    format: str
    num_pairs: int = 0
    width: Spread | None = None
    height: Spread | None = None
    caption_chars: Spread | None = None
    caption_words: Spread | None = None
    empty_captions: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    num_documents: int = 0
    num_segments: int = 0
    num_images: int = 0


def _parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, progress: bool) -> Iterable[R]:
    """``map(fn, items)`` in order, on a thread pool: PIL releases the GIL while decoding."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(fn, items):
            bar.update(1)
            yield result
    bar.close()


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def _decode_size(load: Callable[[], object]) -> tuple[int, int] | str:
    """Decode an image; its (width, height), or the reason it failed."""
    try:
        img = load()
    except BadImageError as e:
        return e.reason
    return img.size  # type: ignore[attr-defined]


def _text_stats(report: DataReport, texts: Sequence[str]) -> None:
    report.caption_chars = Spread.of([len(t) for t in texts])
    report.caption_words = Spread.of([len(t.split()) for t in texts])
    report.empty_captions = sum(1 for t in texts if not t.strip())


def check_dataset(
    path: Union[str, "os.PathLike[str]"],
    progress: bool = True,
    num_workers: int | None = None,
) -> DataReport:
    """Fully decode every image of a dataset and report on it.

    Works for the three image-text formats of :func:`~genvl.data.datasets.open_image_text` and
    for an interleaved-documents ``.jsonl`` file.

    Args:
        path: Dataset folder, ``.tar`` shard, shard pattern, or interleaved ``.jsonl`` file.
        progress: Show a progress bar while decoding.
        num_workers: Decoding threads (default: up to 8, one per CPU).

    Returns:
        The :class:`DataReport`.

    Raises:
        DataError: Missing path, unknown format, or nothing that could even be listed.
    """
    path_str = os.fspath(path)
    workers = num_workers or _default_workers()
    if path_str.lower().endswith(".jsonl") and os.path.basename(path_str) != "metadata.jsonl":
        return _check_interleaved(path_str, progress, workers)

    # validate=False: the full decode below finds everything verify() would, and more.
    ds = ImageTextDataset(path_str, validate=False)
    report = DataReport(path=path_str, format=ds.format, bad=list(ds.skipped))
    sizes = list(
        _parallel_map(
            lambda i: _decode_size(lambda: ds.load_image(i)), range(len(ds)), workers, "decoding images", progress
        )
    )
    ds.close()
    good = [i for i, s in enumerate(sizes) if not isinstance(s, str)]
    report.bad.extend((ds.image_name(i), s) for i, s in enumerate(sizes) if isinstance(s, str))
    report.num_pairs = report.num_images = len(good)
    report.width = Spread.of([sizes[i][0] for i in good])
    report.height = Spread.of([sizes[i][1] for i in good])
    captions = ds.captions
    _text_stats(report, [captions[i] for i in good])
    return report


def _check_interleaved(path: str, progress: bool, workers: int) -> DataReport:
    docs, lines, skipped = parse_interleaved(path)
    report = DataReport(path=path, format="interleaved", bad=list(skipped))
    images = sorted({seg["image"] for doc in docs for seg in doc if "image" in seg})
    results = _parallel_map(lambda p: _decode_size(lambda: load_rgb(p)), images, workers, "decoding images", progress)
    size_of = dict(zip(images, results))
    for image, s in size_of.items():
        if isinstance(s, str):
            report.bad.append((image, s))
    widths, heights, texts = [], [], []
    for doc, lineno in zip(docs, lines):
        doc_images = [seg["image"] for seg in doc if "image" in seg]
        if any(isinstance(size_of[p], str) for p in doc_images):
            report.bad.append((f"{path}:{lineno}", "document dropped: it has a bad image"))
            continue
        report.num_documents += 1
        report.num_segments += len(doc)
        report.num_images += len(doc_images)
        for p in doc_images:
            widths.append(size_of[p][0])
            heights.append(size_of[p][1])
        texts.extend(seg["text"] for seg in doc if "text" in seg)
    report.width, report.height = Spread.of(widths), Spread.of(heights)
    _text_stats(report, texts)
    return report


def _fmt_num(x: float) -> str:
    return f"{x:,.1f}" if isinstance(x, float) and not x.is_integer() else f"{int(x):,}"


def format_report(report: DataReport, max_bad: int | None = None) -> str:
    """Render a :class:`DataReport` as a readable multi-line table.

    Args:
        report: The report.
        max_bad: List at most this many bad files (all when None); the rest are counted.

    Returns:
        The text, without a trailing newline.
    """
    lines = [f"dataset        {report.path}", f"format         {report.format}"]
    if report.format == "interleaved":
        lines.append(f"documents      {report.num_documents:,}")
        lines.append(f"segments       {report.num_segments:,}")
        lines.append(f"images         {report.num_images:,}")
        text_label = "text"
    else:
        lines.append(f"good pairs     {report.num_pairs:,}")
        text_label = "caption"
    lines.append(f"bad            {len(report.bad):,}")
    rows = [
        ("width (px)", report.width),
        ("height (px)", report.height),
        (f"{text_label} chars", report.caption_chars),
        (f"{text_label} words", report.caption_words),
    ]
    if any(spread is not None for _, spread in rows):
        lines.append("")
        lines.append(f"{'':<16}{'min':>10}{'median':>10}{'max':>10}")
        for label, spread in rows:
            if spread is None:
                lines.append(f"{label:<16}{'-':>10}{'-':>10}{'-':>10}")
            else:
                lines.append(
                    f"{label:<16}{_fmt_num(spread.min):>10}{_fmt_num(spread.median):>10}{_fmt_num(spread.max):>10}"
                )
    empty_label = "empty captions" if text_label == "caption" else "empty text"
    lines.append("")
    lines.append(f"{empty_label:<16}{report.empty_captions:,}")
    if report.bad:
        shown = report.bad if max_bad is None else report.bad[:max_bad]
        lines.append("")
        lines.append("bad files:")
        lines.extend(f"  {p}: {reason}" for p, reason in shown)
        if len(shown) < len(report.bad):
            lines.append(f"  ... and {len(report.bad) - len(shown):,} more")
    return "\n".join(lines)
