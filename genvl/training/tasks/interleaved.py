"""Training of the Emu-style interleaved LM on top of a frozen CLIP core.

``genvl train interleaved --data PATH --out DIR --init CLIP_MODEL_DIR``: ``--init`` is required and
must hold a ``clip`` component and its tokenizer (the text vocabulary and the image embeddings
come from them). Its other components (the unCLIP ``decoder`` that draws the generated
embeddings, a prior) are carried along into ``--out``. When ``--init`` also holds an
``interleaved`` component, training continues from it.

``--data`` is one source or several joined with ``+`` (``data/emoji+data/docs.jsonl``):

* an interleaved JSONL file (``.jsonl``; each line a list of ``{"text"}`` / ``{"image": path}``
  segments, the format of ``DESIGN.md``), used as written;
* an image-text set in any format of :mod:`genvl.data`, whose pairs become documents on the fly
  (:meth:`InterleavedTask.collate`): each pair is "caption image" (caption -> image) with
  probability ``model.caption_first`` (default 0.5), else "image caption"; with probability
  ``model.concat`` (default 0.3) a pair and the next ones of the batch (2 .. ``model.max_pairs``,
  default 3) make one document of several pairs.

Related pairs, for in-context use: images of one set that share a file name in different folders
(the Google and Twitter styles of one emoji) make documents "image_a the same in <what differs>
image_b", where <what differs> is the end of b's caption after the words it shares with a's
("the same in twitter twemoji style"). ``model.related`` (default 0) adds that many such documents per
pair (drawn by a hash of the pair, so the choice is stable); at sampling, "[image] the same in ..."
conditions a new image on the given one.

Classifier-free guidance for images: with probability ``model.cond_drop`` (default 0.1) a document
loses everything before one of its images (one preceded by context, drawn at random), so the
model also learns "<bos> <img> ...", the unconditional input of the sampler.

Every decision is a pure function of (seed, epoch, dataset index), so runs repeat and resume
exactly; caption variants and ``data.caption_dropout`` act as for the other stages.

Held-out pairs: ``model.holdout`` (default 0) leaves out the pairs whose image file name (without
folder and extension) hashes below that fraction (:func:`heldout`), and documents holding such an
image; ``genvl evaluate interleaved`` measures on exactly those pairs (it reads the fraction from
the recorded recipe).

Loss (:func:`interleaved_loss`): next-token cross-entropy at the text targets, plus
``model.regression_weight`` (default 1) times the l2 regression of the image slots, plus
``model.cosine_weight`` (default 0) times 1 - cosine of the assembled embeddings.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genvl.errors import ConfigError, DataError, ModelDirError
from genvl.models.interleaved import (
    InterleavedBatch,
    InterleavedConfig,
    InterleavedLayout,
    InterleavedLM,
    interleaved_config,
)
from genvl.training.trainer import Task

NUM_FIXED = 8  # training pairs shown in the sample grids
SAMPLE_STEPS = 25  # DDIM steps of the sample grids


# -------------------------------------------------------------------------------------- decisions
def _draw(kind: str, seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"interleaved-{kind}:{seed}:{epoch}:{index}")


def caption_first(fraction: float, seed: int, epoch: int, index: int) -> bool:
    """Whether pair ``index`` is "caption image" in ``epoch`` (else "image caption")."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    return _draw("order", seed, epoch, index).random() < fraction


def group_size(concat: float, max_pairs: int, seed: int, epoch: int, index: int) -> int:
    """How many pairs (from ``index`` on) make one document in ``epoch``: 1, or 2..max_pairs."""
    if max_pairs < 2 or concat <= 0.0:
        return 1
    r = _draw("concat", seed, epoch, index)
    return r.randint(2, max_pairs) if r.random() < concat else 1


def context_dropped(probability: float, seed: int, epoch: int, index: int) -> random.Random | None:
    """A generator to pick the image whose context is dropped, or None when the document keeps it."""
    if probability <= 0.0:
        return None
    r = _draw("cond", seed, epoch, index)
    return r if probability >= 1.0 or r.random() < probability else None


RELATED_TEXT = "the same in {}"


def related_text(caption_a: str, caption_b: str) -> str:
    """The text between two related images: b's caption after the words it shares with a's."""
    a, b = caption_a.replace(",", " ,").split(), caption_b.replace(",", " ,").split()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    rest = " ".join(w for w in b[n:] if w != ",").strip()
    return RELATED_TEXT.format(rest) if rest else "the same"


def _file_stem(name: str) -> str:
    return os.path.splitext(os.path.basename(str(name).split(":")[-1]))[0]


def heldout(name: str, fraction: float) -> bool:
    """Whether the image ``name`` (a path; its file name without extension counts) is held out.

    A hash of the stem, so the same picture in another folder (another style of one emoji) is
    held out with it, and the split does not depend on the order or the number of files.
    """
    if fraction <= 0.0:
        return False
    return _unit_hash(_file_stem(name)) < fraction


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


# ------------------------------------------------------------------------------------------- loss
@dataclass
class InterleavedLoss:
    """The loss of one batch and its parts (scalars).

    Attributes:
        loss: text_loss + regression_weight * regression_loss + cosine_weight * (1 - cosine).
        text_loss: mean cross-entropy over the text targets (0 when there are none).
        regression_loss: mean squared error over the slot coordinates (in the scaled slot space:
            equal to the mean squared l2 distance of the unit embeddings), 0 without images.
        cosine: mean cosine between the assembled predicted and true embeddings (teacher forced).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    regression_loss: torch.Tensor
    cosine: torch.Tensor


def interleaved_loss(
    logits: torch.Tensor,
    regression: torch.Tensor,
    batch: InterleavedBatch,
    targets: torch.Tensor,
    visual_tokens: int,
    regression_weight: float = 1.0,
    cosine_weight: float = 0.0,
) -> InterleavedLoss:
    """Cross-entropy at the text targets, regression at the slot targets, nothing elsewhere.

    Args:
        logits: (B, L, V) the LM's next-token logits (position t predicts element t + 1).
        regression: (B, L, C) its next-slot predictions.
        batch: the sequences (their ``input_ids`` give the text targets, their masks the positions).
        targets: (Nv, C) the true slot values of the batch's slot positions, row-major.
        visual_tokens: k (consecutive slot targets of one image assemble its embedding).
        regression_weight, cosine_weight: weights of the l2 and cosine terms.

    Returns:
        InterleavedLoss.
    """
    text = batch.text_targets[:, 1:]  # (B, L - 1): element t + 1 is a text target
    vis = batch.visual_targets[:, 1:]  # (B, L - 1): element t + 1 is a slot
    zero = regression.sum() * 0.0  # keeps every head in the graph when a kind is missing
    if text.any():
        ce = F.cross_entropy(logits[:, :-1][text].float(), batch.input_ids[:, 1:][text])
    else:
        ce = zero
    pred = regression[:, :-1][vis].float()  # (Nv, C), row-major like the targets
    if pred.shape != targets.shape:
        raise ValueError(f"{pred.shape[0]} slot positions but targets of shape {tuple(targets.shape)}")
    if pred.shape[0]:
        mse = (pred - targets.float()).pow(2).mean()
        if pred.shape[0] % visual_tokens:
            raise ValueError(f"{pred.shape[0]} slot targets are not whole images of {visual_tokens} slots")
        cos = F.cosine_similarity(pred.reshape(-1, visual_tokens * pred.shape[1]),
                                  targets.float().reshape(-1, visual_tokens * pred.shape[1]), dim=-1).mean()
    else:
        mse, cos = zero, zero + 1.0
    loss = ce + regression_weight * mse + cosine_weight * (1.0 - cos)
    return InterleavedLoss(loss=loss, text_loss=ce, regression_loss=mse, cosine=cos)


# ------------------------------------------------------------------------------------------- data
class DocumentSources(Dataset):
    """Image-text pairs and interleaved documents from one or more sources, as one map-style set.

    Items: ``{"kind": "pair", "pixel_values": (3, S, S), "text": str, "index": int}`` or
    ``{"kind": "doc", "segments": [{"text": str} | {"image": (3, S, S)}], "index": int}`` (JSONL
    documents and documents of related pairs); ``index`` is the item's place in this set (the key of
    every random decision).

    Args:
        path: one source, or several joined with ``+``: ``.jsonl`` documents or image-text sets.
        image_size: side of the images.
        caption_dropout: probability of an empty caption (pairs).
        seed: seed of caption dropout and caption variants.
        holdout: fraction of images held out (see :func:`heldout`).
        related: documents of related pairs to add, per pair (see the module doc).
        validate: check every image at construction.
        progress: progress bars while validating.
    """

    def __init__(self, path: str | os.PathLike, image_size: int = 32, caption_dropout: float = 0.0, seed: int = 0,
                 holdout: float = 0.0, related: float = 0.0, validate: bool = True, progress: bool = False):
        from genvl.data import InterleavedDataset, open_image_text

        self.root = str(path)
        self.epoch = 0
        self.sources, self.skipped, formats = [], [], []
        self._index: list[tuple[int, Any]] = []  # (source, item in source | (item a, item b) related)
        self.heldout = self.related = 0
        names = [p for p in str(path).split("+") if p.strip()]
        if not names:
            raise DataError(f"no dataset in {path!r}")
        for s, name in enumerate(names):
            pairs: list[tuple[int, int]] = []
            if name.lower().endswith(".jsonl") and os.path.basename(name).lower() != "metadata.jsonl":
                ds = InterleavedDataset(name, image_size=image_size, validate=validate, progress=progress)
                keep = [i for i in range(len(ds)) if not any(heldout(p, holdout) for p in ds.image_paths(i))]
                formats.append("documents")
            else:
                ds = open_image_text(name, image_size=image_size, caption_dropout=caption_dropout, seed=seed,
                                     validate=validate, progress=progress)
                keep = [i for i in range(len(ds)) if not heldout(ds.image_name(i), holdout)]
                formats.append(ds.format)
                if related > 0:
                    pairs = self._related(ds, keep, related)
            self.heldout += len(ds) - len(keep)
            self.sources.append(ds)
            self.skipped.extend(ds.skipped)
            self._index.extend((s, i) for i in keep)
            self._index.extend((s, p) for p in pairs)
            self.related += len(pairs)
        if not self._index:
            raise DataError(f"{path}: every item is held out (model.holdout {holdout})")
        self.format = "+".join(formats)

    @staticmethod
    def _related(ds, keep: list[int], per_pair: float) -> list[tuple[int, int]]:
        """Ordered pairs (a, b) of kept images sharing a file name in different folders, at most
        ``per_pair * len(keep)`` of them, chosen by a hash of their names."""
        groups: dict[str, list[int]] = {}
        for i in keep:
            groups.setdefault(_file_stem(ds.image_name(i)), []).append(i)
        pairs = [(a, b) for members in groups.values() for a in members for b in members
                 if a != b and os.path.dirname(ds.image_name(a)) != os.path.dirname(ds.image_name(b))]
        pairs.sort(key=lambda p: _unit_hash(f"{ds.image_name(p[0])}|{ds.image_name(p[1])}"))
        return sorted(pairs[: round(per_pair * len(keep))])

    def __len__(self) -> int:
        return len(self._index)

    def is_pair(self, index: int) -> bool:
        s, i = self._index[index]
        return isinstance(i, int) and not hasattr(self.sources[s], "image_paths")

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, i = self._index[index]
        src = self.sources[s]
        if isinstance(i, tuple):  # related pair: image a, what differs, image b
            a, b = src[i[0]], src[i[1]]
            text = related_text(src.captions[a["index"]], src.captions[b["index"]])
            segs = [{"image": a["pixel_values"]}, {"text": text}, {"image": b["pixel_values"]}]
            return {"kind": "doc", "segments": segs, "index": index}
        if hasattr(src, "image_paths"):
            segs = [{"text": g["text"]} if "text" in g else {"image": g["image"]} for g in src[i]]
            return {"kind": "doc", "segments": segs, "index": index}
        item = src[i]
        return {"kind": "pair", "pixel_values": item["pixel_values"], "text": item["text"], "index": index}

    def caption(self, index: int) -> str:
        """The canonical caption of pair ``index`` (no dropout, first variant)."""
        s, i = self._index[index]
        return self.sources[s].captions[i]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for src in self.sources:
            if hasattr(src, "set_epoch"):
                src.set_epoch(epoch)

    def __repr__(self) -> str:
        return f"DocumentSources(root={self.root!r}, items={len(self)}, heldout={self.heldout}, related={self.related})"


# ------------------------------------------------------------------------------------------- task
class InterleavedTask(Task):
    """Emu-style interleaved LM: text cross-entropy and image-embedding regression in one sequence.

    ``model`` recipe keys: ``size`` (tiny | small | base), overrides of
    :class:`~genvl.models.interleaved.InterleavedConfig` (``text_vocab_size`` and the special ids
    come from the tokenizer, ``embed_dim`` from the CLIP), ``caption_first`` (0.5), ``concat``
    (0.3), ``max_pairs`` (3), ``cond_drop`` (0.1), ``regression_weight`` (1), ``cosine_weight`` (0),
    ``holdout`` (0) and ``related`` (0).
    """

    stage = "interleaved"
    component = "interleaved"

    OPTIONS = {  # key: (default, low, high)
        "caption_first": (0.5, 0.0, 1.0),
        "concat": (0.3, 0.0, 1.0),
        "max_pairs": (3, 1, None),
        "cond_drop": (0.1, 0.0, 1.0),
        "regression_weight": (1.0, 0.0, None),
        "cosine_weight": (0.0, 0.0, None),
        "holdout": (0.0, 0.0, 0.99),
        "related": (0.0, 0.0, None),
    }
    model_config = InterleavedConfig
    recipe_keys = {"size": str, **{k: type(v[0]) for k, v in OPTIONS.items()}}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.clip = None
        self.decoder = None
        self.dataset = None
        overrides = dict(cfg.model)
        self.options = {k: self._pop(overrides, k, *v) for k, v in self.OPTIONS.items()}
        self.model_overrides = overrides  # size and InterleavedConfig fields
        self.fixed_pixels = None  # (n, 3, S, S) training images of the sample grid
        self.fixed_texts: list[str] = []

    @staticmethod
    def _pop(overrides: dict, key: str, default, lo, hi):
        value = overrides.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ConfigError(f"bad interleaved model config: {key} must be a number in {rng}, got {value!r}")
        return type(default)(value)

    def open_dataset(self, data_path, progress: bool = False) -> DocumentSources:
        """The training set: documents and pairs of ``--data``, held-out images left out."""
        d = self.cfg.data
        return DocumentSources(data_path, image_size=d.image_size, caption_dropout=d.caption_dropout,
                               seed=self.cfg.seed, holdout=self.options["holdout"], related=self.options["related"],
                               validate=d.validate,
                               progress=progress)

    def build(self, dataset, init, tokenizer=None) -> InterleavedLM:
        if init is None:
            raise ModelDirError("the interleaved stage needs --init DIR: a model directory with a trained clip "
                                "component (and, to draw images, a decoder)")
        init.require("clip", purpose="training the interleaved LM (--init)")
        clip = init.load("clip")
        clip.requires_grad_(False)
        self.clip = clip.eval()
        self.tokenizer = tokenizer or init.tokenizer()
        if init.has("decoder"):
            self.decoder = init.load("decoder").eval()
            self.decoder.requires_grad_(False)
        D = clip.config.embed_dim
        overrides = dict(self.model_overrides)
        size = overrides.pop("size", "tiny")
        k = overrides.get("visual_tokens")
        try:
            layout = InterleavedLayout.from_tokenizer(self.tokenizer, 1)
        except ValueError as e:
            raise ModelDirError(f"{init.path}: {e}") from None
        fixed = {"text_vocab_size": layout.text_vocab_size, "embed_dim": D, "pad_id": layout.pad_id,
                 "unk_id": layout.unk_id, "bos_id": layout.bos_id, "eos_id": layout.eos_id}
        if init.has("interleaved"):
            model = init.load("interleaved")
            mc = model.config
            got = {key: getattr(mc, key) for key in fixed}
            if got != fixed:
                raise ModelDirError(f"{init.path}: its interleaved LM was trained for {got}, but its tokenizer and "
                                    f"clip give {fixed}")
            if k is not None and k != mc.visual_tokens:
                raise ConfigError(f"model.visual_tokens is {k} but the interleaved LM in {init.path} has "
                                  f"{mc.visual_tokens}")
        else:
            for key, value in fixed.items():
                if key in overrides and overrides[key] != value:
                    raise ConfigError(f"bad interleaved model config: model.{key} is fixed by the tokenizer / clip "
                                      f"({value})")
                overrides.pop(key, None)
            try:
                model = InterleavedLM(interleaved_config(size, **fixed, **overrides))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad interleaved model config: {e}") from None
        self.dataset = dataset
        pairs = [i for i in range(len(dataset)) if getattr(dataset, "is_pair", lambda _: True)(i)][:NUM_FIXED]
        if pairs:
            self.fixed_pixels = torch.stack([dataset[i]["pixel_values"] for i in pairs])
            self.fixed_texts = [dataset.caption(i) for i in pairs]
        return model.train()

    # -- batches ----------------------------------------------------------------------------------
    def collate(self, items: list[dict]) -> dict[str, Any]:
        """Pairs -> documents (order, concatenation), context dropping; text tokenized.

        Returns:
            ``{"pixel_values": (M, 3, S, S), "docs": B lists of elements (text ids / image
            indices into pixel_values), "pairs": pairs in the batch, "groups": multi-pair documents}``.
        """
        # The dataset's epoch is current here: set before each epoch's loader (and its workers) starts.
        epoch = getattr(self.dataset, "epoch", 0)
        seed, o = self.cfg.seed, self.options
        pixels, docs, keys = [], [], []  # docs hold strings (text) and ints (images) until tokenized
        n_pairs = groups = 0
        i = 0
        while i < len(items):
            it = items[i]
            keys.append(it["index"])
            if it["kind"] == "doc":
                doc = []
                for seg in it["segments"]:
                    if "text" in seg:
                        doc.append(seg["text"])
                    else:
                        doc.append(len(pixels))
                        pixels.append(seg["image"])
                docs.append(doc)
                i += 1
                continue
            n = group_size(o["concat"], o["max_pairs"], seed, epoch, it["index"])
            group = [items[i]]
            while len(group) < n and i + len(group) < len(items) and items[i + len(group)]["kind"] == "pair":
                group.append(items[i + len(group)])
            doc = []
            for p in group:
                img = len(pixels)
                pixels.append(p["pixel_values"])
                forward = caption_first(o["caption_first"], seed, epoch, p["index"])
                doc += [p["text"], img] if forward else [img, p["text"]]
            docs.append(doc)
            n_pairs += len(group)
            groups += len(group) > 1
            i += len(group)
        # classifier-free guidance: drop the context before one image of some documents
        for d, (doc, key) in enumerate(zip(docs, keys)):
            r = context_dropped(o["cond_drop"], seed, epoch, key)
            if r is None:
                continue
            places = [j for j, el in enumerate(doc) if isinstance(el, int) and j > 0]
            if places:
                docs[d] = doc[r.choice(places):]
        # tokenize every text at once
        texts = [el for doc in docs for el in doc if isinstance(el, str)]
        ids = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        tokenized = []
        for doc in docs:
            out = []
            for el in doc:
                if isinstance(el, str):
                    t = next(ids)
                    if el.strip() and t:
                        out.append(list(t))
                else:
                    out.append(el)
            tokenized.append(out)
        S = self.cfg.data.image_size
        px = torch.stack(pixels) if pixels else torch.zeros(0, 3, S, S)
        return {"pixel_values": px, "docs": tokenized, "pairs": n_pairs, "groups": groups}

    def to_device(self, device: torch.device) -> None:
        self.clip.to(device)
        if self.decoder is not None:
            self.decoder.to(device)

    def loss(self, model, batch):
        lm = getattr(model, "module", model)
        c = lm.config
        px = batch["pixel_values"]
        with torch.no_grad():
            if px.shape[0]:
                z = self.clip.encode_image(px).float()  # (M, D) unit, as the decoder was trained on
            else:
                z = torch.zeros(0, c.embed_dim, device=px.device)
            seq = lm.layout.build_batch(batch["docs"], max_len=c.max_len, device=px.device)
            vis = seq.slot_values(lm.image_slots(z))  # (Nv, C): the slots' inputs and regression targets
        out = model(seq.input_ids, vis, attention_mask=seq.attention_mask)
        res = interleaved_loss(out.logits, out.regression, seq, vis, c.visual_tokens,
                               self.options["regression_weight"], self.options["cosine_weight"])
        return res.loss, {"text_loss": res.text_loss.item(), "regression_loss": res.regression_loss.item(),
                          "cosine": res.cosine.item(), "docs": float(len(batch["docs"]))}

    # -- samples ----------------------------------------------------------------------------------
    def sample(self, model, path, step):
        """Rows: fixed training images; the decoder's drawing of the embedding the LM regresses for
        their captions. The ``.txt`` beside it: caption, cosine to the true embedding, the caption the
        LM writes for the image."""
        if self.fixed_pixels is None:
            return None
        from genvl.sampling.interleaved import InterleavedParts, generate_document, generate_image_embeds
        from genvl.sampling.unclip import sample_decoder
        from genvl.training.previews import save_grid

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = model.device
                px = self.fixed_pixels.to(device)
                z = self.clip.encode_image(px).float()  # (n, D)
                ids = [self.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in self.fixed_texts]
                z_hat = generate_image_embeds(model, ids, guidance=1.0)  # (n, D)
                cos = F.cosine_similarity(z_hat, z, dim=-1).tolist()
                parts = InterleavedParts(model=model, clip=self.clip, tokenizer=self.tokenizer, decoder=None)
                caps = [generate_document(parts, [{"image": p}], max_new_tokens=16, max_images=0, temperature=0.0,
                                          decode_images=False, seed=0).generated_text for p in px.cpu()]
                rows = [self.fixed_pixels]
                if self.decoder is not None:
                    g = torch.Generator().manual_seed(self.cfg.seed)
                    rows.append(sample_decoder(self.decoder, z_hat.to(self.decoder.device), steps=SAMPLE_STEPS,
                                               guidance=1.0, generator=g).cpu())
        finally:
            model.train(was_training)
        path = Path(path)
        lines = [f"{t}\tcos {c:.3f}\t->\t{cap}" for t, c, cap in zip(self.fixed_texts, cos, caps)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        if len(rows) < 2:
            return path.with_suffix(".txt")
        return save_grid(rows, path)
