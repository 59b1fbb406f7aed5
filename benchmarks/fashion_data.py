"""Fashion-MNIST (Zalando, MIT licence) as captioned image folders, for ``benchmarks/custom_set.py``.

The set installs offline from Debian (``apt-get install dataset-fashion-mnist``: the four IDX files
under ``/usr/share/datasets/fashion-mnist``). It holds 70,000 28x28 grayscale product photos in 10
kinds: 60,000 in its training split and 10,000 in its test split. :func:`make_folders` writes
class-balanced subsets as image folders with a ``metadata.jsonl`` (``file_name``, ``text``, ``label``),
captioned from the labels ("a photo of a sneaker"), the layout any ``genvl --data`` reads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Label index -> (kind, caption); the captions read as English ("a pair of trousers", "an ankle boot").
CLASSES = [
    ("t-shirt", "a photo of a t-shirt"),
    ("trousers", "a photo of a pair of trousers"),
    ("pullover", "a photo of a pullover"),
    ("dress", "a photo of a dress"),
    ("coat", "a photo of a coat"),
    ("sandal", "a photo of a sandal"),
    ("shirt", "a photo of a shirt"),
    ("sneaker", "a photo of a sneaker"),
    ("bag", "a photo of a bag"),
    ("ankle boot", "a photo of an ankle boot"),
]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data) as an array."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, source: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise SystemExit(f"Fashion-MNIST not found in {source}: apt-get install dataset-fashion-mnist "
                         "(or pass the folder holding the four IDX files)")
    return _read_idx(images), _read_idx(labels)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random items of every label, in a fixed order (seeded)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise SystemExit(f"only {len(idx)} images of class {c}, {per_class} asked for")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def write_folder(out: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write PNGs and ``metadata.jsonl`` (file_name, text, label) into ``out``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"{i:05d}.png"
        Image.fromarray(img, mode="L").save(out / name)
        rows.append({"file_name": name, "text": CLASSES[int(label)][1], "label": int(label)})
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "metadata.jsonl")
    return out


def make_folders(out: Path, train_per_class: int = 2000, heldout_per_class: int = 100, seed: int = 0,
                 source: Path = DEBIAN_DIR) -> tuple[Path, Path]:
    """``out/train`` (from the training split) and ``out/heldout`` (from the test split), balanced."""
    x, y = load_split("train", source)
    keep = balanced_subset(y, train_per_class, seed)
    train = write_folder(out / "train", x[keep], y[keep])
    x, y = load_split("test", source)
    keep = balanced_subset(y, heldout_per_class, seed)
    heldout = write_folder(out / "heldout", x[keep], y[keep])
    return train, heldout


def read_folder(folder: Path, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size) float32 grayscale in [0, 1] and (N,) labels of a folder written above."""
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    xs = []
    for r in rows:
        with Image.open(folder / r["file_name"]) as im:
            xs.append(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0)
    return np.stack(xs), np.array([r["label"] for r in rows])
