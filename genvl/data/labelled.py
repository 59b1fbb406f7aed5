"""Labelled image folders for zero-shot evaluation: ``DIR/CLASS_NAME/*.png``.

Class names are the subfolder names (sorted), underscores read as spaces ("red_circle" -> "red
circle"). Unreadable images are skipped and counted, never crash a run; a missing folder, or one
with fewer than two non-empty classes, is a one-line :class:`~genvl.errors.DataError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from genvl.data.images import IMAGE_EXTENSIONS, load_rgb, resize_center_crop, to_tensor
from genvl.errors import DataError, GenvlError


@dataclass
class LabelledImages:
    """Attributes:
    root: the folder.
    classes: C class names (subfolder names, ``_`` -> space), in label order.
    paths: the readable images, classes interleaved (round-robin), so a prefix is balanced.
    labels: (N,) long class index of each path.
    skipped: (path, reason) of every unreadable image.
    """

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _images: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, size: int) -> torch.Tensor:
        """(N, 3, size, size) in [-1, 1] (resized, centre-cropped)."""
        return torch.stack([to_tensor(resize_center_crop(im, size)) for im in self._images])


def open_labelled(root: str | Path, limit: int | None = None) -> LabelledImages:
    """Read ``root/CLASS/*`` (every image decoded once; bad files skipped and counted).

    Args:
        root: the labelled folder.
        limit: keep the first ``limit`` readable images of the round-robin order (balanced classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"labelled image folder not found: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class, skipped = [], []
    for d in dirs:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        per_class.append(files)
    kept = [(d, f) for d, f in zip(dirs, per_class) if f]
    if len(kept) < 2:
        raise DataError(f"{root}: need at least two class subfolders with images (DIR/CLASS_NAME/*.png), "
                        f"found {len(kept)}")
    classes = [d.name.replace("_", " ") for d, _ in kept]
    paths, labels, images = [], [], []
    longest = max(len(f) for _, f in kept)
    for i in range(longest):
        for c, (_, files) in enumerate(kept):
            if i >= len(files) or (limit is not None and len(paths) >= limit):
                continue
            try:
                img = load_rgb(files[i])
            except GenvlError as e:
                skipped.append((str(files[i]), str(e)))
                continue
            paths.append(files[i])
            labels.append(c)
            images.append(img)
    if not paths:
        raise DataError(f"{root}: no readable images ({len(skipped)} unreadable)")
    return LabelledImages(root=root, classes=classes, paths=paths, labels=torch.tensor(labels, dtype=torch.long),
                          skipped=skipped, _images=images)
