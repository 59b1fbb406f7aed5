"""``genvl data embed DATA --model DIR --out EMB``: CLIP embeddings of an image-text set, computed
once, for stages that only need them (the prior never looks at pixels).

Layout of ``EMB/`` (safetensors shards, readable without genvl)::

    embeddings.json           {"model": ..., "model_sha256": ..., "data": ..., "count": N, "shard_size": S,
                               "text_len": L, "shards": ["00000.safetensors", ...], "captions": "captions.jsonl"}
    00000.safetensors         image_embeds (n, D) float32, text_embeds (n, D) float32,
                              text_states (n, L, W) float16, text_mask (n, L) uint8, index (n,) int64
    captions.jsonl            one {"index": i, "caption": ...} per row, in row order

Shard ``k`` holds dataset rows ``[k * S, (k + 1) * S)``; each is written atomically, so a run that
stops resumes at the first missing shard. Text states are padded to ``L`` (the CLIP text tower is
causal, so a real token's state does not depend on the padding after it) and stored as float16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genvl.data.datasets import caption_dropped, open_image_text
from genvl.errors import DataError

__all__ = ["EMBEDDINGS_META", "EMBEDDING_FIELDS", "embed_image_text", "EmbeddingSet", "image_embeddings_for"]

EMBEDDINGS_META = "embeddings.json"
EMBEDDING_FIELDS = ("image_embeds", "text_embeds", "text_states", "text_mask")  # tensor fields of a row


def _encode_texts(clip, tokenizer, texts: list[str], text_len: int, device) -> dict[str, torch.Tensor]:
    from genvl.tokenizers.text import encode_texts

    enc = encode_texts(tokenizer, texts, max_length=text_len)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    out = clip.encode_text(ids, mask)
    states = torch.zeros(len(texts), text_len, out.token_states.shape[-1])
    full_mask = torch.zeros(len(texts), text_len, dtype=torch.uint8)
    states[:, : ids.shape[1]] = out.token_states.float().cpu()
    full_mask[:, : ids.shape[1]] = mask.cpu().to(torch.uint8)
    return {"text_embeds": out.embeds.float().cpu(), "text_states": states.half(), "text_mask": full_mask}


@torch.no_grad()
def embed_image_text(model: str | Path, data: str | Path, out: str | Path, batch_size: int = 64,
                     shard_size: int = 4096, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the CLIP embeddings of every pair of ``data`` into ``out`` (see the module docstring);
    shards already there from an interrupted run of the same model and data are kept."""
    from safetensors.torch import save_file

    from genvl.checkpoint import model_dir_hash, open_model_dir

    if batch_size < 1 or shard_size < 1:
        raise DataError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    md = open_model_dir(model)
    md.require("clip", purpose="genvl data embed")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip = md.load("clip", device=device)
    tokenizer = md.tokenizer()
    text_len = int(clip.config.max_text_len)
    ds = open_image_text(data, image_size=clip.config.image_size, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(md.path), "model_sha256": model_dir_hash(md.path), "clip_sha256": clip_weights_hash(md),
            "data": str(data), "count": len(ds),
            "shard_size": shard_size, "text_len": text_len, "embed_dim": clip.config.embed_dim,
            "captions": "captions.jsonl", "shards": []}
    old = out / EMBEDDINGS_META
    if old.is_file():
        prev = json.loads(old.read_text())
        same = {k: prev.get(k) for k in ("model_sha256", "data", "count", "shard_size")} == \
               {k: meta[k] for k in ("model_sha256", "data", "count", "shard_size")}
        if not same:
            raise DataError(f"{out}: holds embeddings of another model, data or shard size; choose a new folder")
    n_shards = -(-len(ds) // shard_size)
    names = [f"{k:05d}.safetensors" for k in range(n_shards)]
    todo = [k for k in range(n_shards) if not (out / names[k]).is_file()]
    bar = tqdm(total=len(ds), desc=f"embedding {data}", unit="img", disable=not progress,
               initial=len(ds) - sum(min(shard_size, len(ds) - k * shard_size) for k in todo))
    for k in todo:
        rows = list(range(k * shard_size, min((k + 1) * shard_size, len(ds))))
        parts: dict[str, list[torch.Tensor]] = {f: [] for f in EMBEDDING_FIELDS}
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            pixels = torch.stack([ds[j]["pixel_values"] for j in chunk]).to(device)
            parts["image_embeds"].append(clip.encode_image(pixels).float().cpu())
            for f, v in _encode_texts(clip, tokenizer, [ds.captions[j] for j in chunk], text_len, device).items():
                parts[f].append(v)
            bar.update(len(chunk))
        tensors = {f: torch.cat(v) for f, v in parts.items()} | {"index": torch.tensor(rows, dtype=torch.long)}
        tmp = out / f".{names[k]}.part"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / names[k])
    bar.close()
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, c in enumerate(ds.captions):
            f.write(json.dumps({"index": i, "caption": c}, ensure_ascii=False) + "\n")
    meta["shards"] = names
    meta["skipped"] = len(ds.skipped)
    old.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def is_embedding_set(path: str | Path) -> bool:
    return (Path(path) / EMBEDDINGS_META).is_file()


def clip_weights_hash(md) -> str:
    """sha256 of a model directory's CLIP weights (the file its clip component loads), first 16 hex
    digits: which CLIP a set of embeddings belongs to."""
    from genvl.data.tokenized import file_sha256

    return file_sha256(md.lineage("clip")[-1][1] / "model.safetensors")[:16]


class EmbeddingSet(Dataset):
    """Rows of a ``genvl data embed`` folder: ``{"image_embeds", "text_embeds", "text_states",
    "text_mask", "text", "index"}``. With ``caption_dropout`` a dropped row's ``text`` is "" (decided
    as :func:`~genvl.data.datasets.caption_dropped` decides for images) and its stored text fields
    are left for the consumer to replace by its unconditional input (the prior's: zeros)."""

    format = "embeddings"

    def __init__(self, path: str | Path, caption_dropout: float = 0.0, seed: int = 0):
        from safetensors.torch import load_file

        path = Path(path)
        if not is_embedding_set(path):
            raise DataError(f"{path}: not a `genvl data embed` folder (no {EMBEDDINGS_META})")
        self.meta = json.loads((path / EMBEDDINGS_META).read_text())
        missing = [s for s in self.meta["shards"] if not (path / s).is_file()]
        if missing or not self.meta["shards"]:
            raise DataError(f"{path}: incomplete embeddings (missing {missing[0] if missing else 'every shard'}); "
                            "run genvl data embed again to finish them")
        shards = [load_file(str(path / s)) for s in self.meta["shards"]]
        self.tensors = {f: torch.cat([s[f] for s in shards]) for f in (*EMBEDDING_FIELDS, "index")}
        self.skipped: list[tuple[str, str]] = []  # bad files were left out when the embeddings were made
        with open(path / self.meta["captions"], encoding="utf-8") as f:
            self.captions = [json.loads(line)["caption"] for line in f]
        self.caption_dropout, self.seed, self.epoch = float(caption_dropout), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.tensors["index"].shape[0]

    def _text(self, i: int) -> str:
        return "" if caption_dropped(self.caption_dropout, self.seed, self.epoch, i) else self.captions[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{f: self.tensors[f][i] for f in EMBEDDING_FIELDS}, "text": self._text(i), "index": i}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """Rows ``indices`` as one batch: each tensor field stacked (one gather, not a tensor per row and
        field), ``text`` and ``index`` as lists. torch's DataLoader fetches with this when it exists
        and hands the dict to the collate function, which therefore takes it as well as a list of rows
        (:meth:`genvl.training.tasks.prior.PriorTask.collate`). Fetching was a tenth of a tiny prior's
        training step from embeddings (about 1 ms per batch of 64 on 2 cores)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {**{f: self.tensors[f][idx] for f in EMBEDDING_FIELDS}, "text": [self._text(i) for i in indices],
                "index": [int(i) for i in indices]}


def image_embeddings_for(path: str | Path, dataset, clip_hash: str) -> torch.Tensor:
    """(N, D) float32 CLIP image embeddings of ``dataset``'s N rows, by dataset index, read from a
    ``genvl data embed`` folder made from the same data with the CLIP whose weights hash to
    ``clip_hash`` (:func:`clip_weights_hash`); anything else is refused with the reason."""
    es = EmbeddingSet(path)
    if es.meta.get("clip_sha256") != clip_hash:
        raise DataError(f"{path}: embeddings of another CLIP ({es.meta.get('model')}); embed the data again "
                        "with the --init model (genvl data embed DATA --model DIR --out EMB)")
    n = len(dataset)
    if len(es) != n or es.captions != list(dataset.captions):
        raise DataError(f"{path}: embeddings of another set ({es.meta.get('data')}: {len(es)} pairs) than this "
                        f"run's data ({n} pairs); embed this data")
    table = torch.zeros(n, es.tensors["image_embeds"].shape[1])
    table[es.tensors["index"]] = es.tensors["image_embeds"].float()
    return table
