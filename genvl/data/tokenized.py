"""Pre-tokenized image sets: VQ-VAE codes of a dataset, for fast token-LM training.

``genvl data tokenize PATH --model DIR --out FILE.safetensors`` writes two files::

    FILE.safetensors   tensor "codes": (N, h, w) int16 (int32 when the codebook has more than
                       32767 codes); metadata (strings): format "genvl-tokenized", version,
                       codebook_size, image_size, latent_size, n, captions (the sidecar's file
                       name), model (the model directory), vqvae_sha256 (of its weights), source
    FILE.jsonl         N lines, row i = {"file_name": ..., "text": caption or [caption variants]} of codes[i]

The codes identify a particular VQ-VAE: ``vqvae_sha256`` lets a reader check that the codes
belong to the tokenizer it decodes with. Both files are written to temporary names and renamed,
the sidecar first; :func:`read_tokenized` checks that the two agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genvl.errors import DataError

__all__ = ["FORMAT", "TokenizedSet", "TokenizedDataset", "tokenized_sidecar", "save_tokenized", "read_tokenized",
           "load_tokenized", "tokenize_dataset"]

FORMAT = "genvl-tokenized"
VERSION = "1"
SUFFIX = ".safetensors"


def tokenized_sidecar(path: str | Path) -> Path:
    """``codes.safetensors`` -> ``codes.jsonl`` (captions and file names)."""
    return Path(path).with_suffix(".jsonl")


@dataclass
class TokenizedSet:
    """A pre-tokenized image set.

    Attributes:
        codes: (N, h, w) long codes.
        captions: N captions, aligned with ``codes``.
        file_names: N image names in the source dataset.
        meta: the safetensors metadata (strings).
    """

    codes: torch.Tensor
    captions: list[str]
    file_names: list[str]
    meta: dict[str, str] = field(default_factory=dict)
    variants: list[tuple[str, ...]] | None = None  # caption variants per row (first = ``captions[i]``)


def _check_out(path: Path) -> None:
    if path.suffix != SUFFIX:
        raise DataError(f"{path}: a tokenized set is written as a {SUFFIX} file (e.g. {path.with_suffix(SUFFIX)})")


def save_tokenized(path: str | Path, codes: torch.Tensor, captions: list[str], file_names: list[str],
                   codebook_size: int, image_size: int, meta: dict[str, str] | None = None) -> Path:
    """Write codes (N, h, w) + the JSONL sidecar (see the module doc); returns the safetensors path."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_out(path)
    if codes.ndim != 3 or codes.shape[1] != codes.shape[2]:
        raise ValueError(f"codes must be (N, h, h), got {tuple(codes.shape)}")
    n = codes.shape[0]
    if len(captions) != n or len(file_names) != n:
        raise ValueError(f"{n} code grids but {len(captions)} captions and {len(file_names)} file names")
    dtype = torch.int16 if codebook_size <= torch.iinfo(torch.int16).max + 1 else torch.int32
    side = tokenized_sidecar(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT, "version": VERSION, "codebook_size": str(codebook_size), "image_size": str(image_size),
        "latent_size": str(codes.shape[1]), "n": str(n), "captions": side.name,
        **{k: str(v) for k, v in (meta or {}).items()},
    }
    tmp_side = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp_side.open("w") as f:
            for name, text in zip(file_names, captions):
                f.write(json.dumps({"file_name": name, "text": text}, ensure_ascii=False) + "\n")
        # codes of a codebook above 32768 entries do not fit int16; below, int16 halves the file
        save_file({"codes": codes.to(torch.int64).to(dtype).contiguous()}, str(tmp), metadata=header)
        os.replace(tmp_side, side)
        os.replace(tmp, path)
    finally:
        for t in (tmp_side, tmp):
            t.unlink(missing_ok=True)
    return path


def read_tokenized(path: str | Path) -> TokenizedSet:
    """Read a tokenized set written by :func:`save_tokenized`; problems are one-line DataErrors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenized set not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT or "codes" not in f.keys():
                raise DataError(f"{path}: not a genvl tokenized set (write one with: genvl data tokenize)")
            codes = f.get_tensor("codes")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: corrupt or truncated safetensors file ({msg})") from None
    side = path.with_name(meta.get("captions", tokenized_sidecar(path).name))
    if not side.is_file():
        raise DataError(f"{path}: its captions file {side.name} is missing (it belongs beside the codes)")
    captions, names, variants = [], [], []
    for i, line in enumerate(side.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
            variants.append(tuple(str(t) for t in text) if isinstance(text, list) and text else (str(text),))
            captions.append(variants[-1][0])
            names.append(str(row["file_name"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{side}:{i + 1}: not a {{\"file_name\", \"text\"}} JSON line") from None
    if codes.ndim != 3 or len(captions) != codes.shape[0]:
        raise DataError(f"{path}: {codes.shape[0] if codes.ndim else 0} code grids but {len(captions)} captions in "
                        f"{side.name} (the two files do not belong together)")
    return TokenizedSet(codes=codes.long(), captions=captions, file_names=names, meta=meta, variants=variants)


def load_tokenized(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """``(codes (N, h, w) LongTensor, captions list[str])`` of a tokenized set."""
    ts = read_tokenized(path)
    return ts.codes, ts.captions


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def tokenize_dataset(vq, dataset, out: str | Path, batch_size: int = 64, progress: bool = False,
                     meta: dict[str, str] | None = None, weights: str | Path | None = None) -> TokenizedSet:
    """Encode every image of an image-text dataset and write the tokenized set.

    Images that fail to decode (the dataset then returns the next good one) are left out, so
    every row is one distinct image with its own caption.

    Args:
        vq: a :class:`~genvl.tokenizers.vqvae.VQVAE` in eval mode.
        dataset: an :class:`~genvl.data.ImageTextDataset` opened at ``vq.config.image_size`` without
            caption dropout.
        out: the ``.safetensors`` file to write (the ``.jsonl`` sidecar goes beside it).
        batch_size: images per forward pass.
        progress: show a progress bar.
        meta: extra metadata strings (model directory, source).
        weights: the VQ-VAE's ``model.safetensors``, whose sha256 is recorded.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _check_out(out)
    variants_all = getattr(dataset, "_variants", None) or [(c,) for c in dataset.captions]
    codes, captions, names = [], [], []
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc="tokenizing", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        # an item whose index differs from the one asked for stands in for an undecodable image
        items = [it for i, it in zip(range(start, n), items) if it["index"] == i]
        if not items:
            continue
        px = torch.stack([it["pixel_values"] for it in items])  # (b, 3, S, S)
        codes.append(vq.encode(px).cpu())  # (b, h, w)
        captions += [list(variants_all[it["index"]]) if len(variants_all[it["index"]]) > 1
                     else variants_all[it["index"]][0] for it in items]
        names += [dataset.image_name(it["index"]) for it in items]
    if not codes:
        raise DataError(f"{getattr(dataset, 'root', 'the dataset')}: no image could be decoded")
    extra = dict(meta or {})
    if weights is not None and Path(weights).is_file():
        extra["vqvae_sha256"] = file_sha256(Path(weights))
    all_codes = torch.cat(codes)  # (N, h, w)
    save_tokenized(out, all_codes, captions, names, vq.config.codebook_size, vq.config.image_size, extra)
    variants = [tuple(c) if isinstance(c, list) else (c,) for c in captions]
    return TokenizedSet(codes=all_codes, captions=[v[0] for v in variants], file_names=names, meta=extra,
                        variants=variants)


class TokenizedDataset(torch.utils.data.Dataset):
    """A tokenized set as a training dataset: items ``{"codes": (h, w) long, "text", "index"}``.

    The same caption handling as :class:`~genvl.data.ImageTextDataset`: one variant drawn per epoch,
    caption dropout, both pure functions of (seed, epoch, index); ``set_epoch`` before each epoch.
    """

    format = "tokenized"

    def __init__(self, path: str | Path, caption_dropout: float = 0.0, seed: int = 0):
        self.path = Path(path)
        self.root = str(self.path)
        self.set = read_tokenized(self.path)
        self.caption_dropout = float(caption_dropout)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self._variants = self.set.variants or [(c,) for c in self.set.captions]

    def __len__(self) -> int:
        return self.set.codes.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def text(self, index: int) -> str:
        import random

        from genvl.data.datasets import caption_dropped

        if caption_dropped(self.caption_dropout, self.seed, self.epoch, index):
            return ""
        v = self._variants[index]
        return v[0] if len(v) == 1 else v[random.Random(f"variant:{self.seed}:{self.epoch}:{index}").randrange(len(v))]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return {"codes": self.set.codes[index], "text": self.text(index), "index": index}

    @property
    def captions(self) -> list[str]:
        return list(self.set.captions)

    @property
    def all_captions(self) -> list[str]:
        return [c for v in self._variants for c in v]

    def image_name(self, index: int) -> str:
        return self.set.file_names[index]
