"""Training of the DALL-E 2 diffusion prior on top of a frozen CLIP core.

``genvl train prior --data PATH --out DIR --init CLIP_MODEL_DIR``: ``--init`` is required and must
hold a ``clip`` component (and its tokenizer). When it also holds a ``prior``, training continues
from that prior (finetuning, its embedding statistics kept); otherwise a new prior is built with
the CLIP's dimensions and its embedding statistics are measured on the training images.

Classifier-free guidance: the prior learns the unconditional case from captions the data layer
drops (``data.caption_dropout``; recipes set 0.1 for this stage, as DALL-E 2). A dropped caption
("" from the data layer) is replaced by :func:`genvl.models.prior.unconditional_text`, the same
input the sampler uses for its unconditional branch. No further dropout happens here, so the
dropped captions are fixed by (seed, epoch, index) and resume exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from genvl.data.embeddings import EMBEDDING_FIELDS
from genvl.errors import ConfigError, ModelDirError
from genvl.models.prior import DiffusionPrior, PriorConfig, prior_config, unconditional_text
from genvl.tokenizers.text import encode_texts
from genvl.training.cache import EncodingCache
from genvl.training.trainer import Task

STATS_MAX_IMAGES = 2000  # images used to measure the embedding mean / std of a new prior


@torch.no_grad()
def clip_image_stats(
    clip, dataset, max_images: int = STATS_MAX_IMAGES, batch_size: int = 64, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of ``clip.encode_image`` over up to ``max_images`` dataset images.

    The images are spread evenly over the dataset (it may be sorted by class). The std is clamped
    to at least a tenth of its mean over dimensions, so that near-constant dimensions (frequent in
    small datasets) do not blow up the normalised space.

    Returns:
        mean (D,), std (D,) as float32 on the CPU.
    """
    n = len(dataset)
    k = min(n, max_images)
    idx = torch.linspace(0, n - 1, k).round().long().unique().tolist()
    if hasattr(dataset, "tensors"):  # precomputed embeddings (genvl data embed): no image to encode
        z = dataset.tensors["image_embeds"][idx].float()  # (k, D)
    else:
        chunks = []
        for start in range(0, len(idx), batch_size):
            pixels = torch.stack([dataset[i]["pixel_values"] for i in idx[start:start + batch_size]])  # (b, 3, S, S)
            chunks.append(clip.encode_image(pixels.to(device)).float().cpu())  # (b, D)
        z = torch.cat(chunks)  # (k, D)
    mean = z.mean(0)
    std = z.std(0, correction=0)
    std = std.clamp_min(max(0.1 * float(std.mean()), 1e-6))
    return mean, std


class PriorTask(Task):
    """Diffusion prior: predict the clean CLIP image embedding from a noised one and the caption.

    ``model`` recipe keys: ``size`` (tiny | small | base) and overrides of
    :class:`~genvl.models.prior.PriorConfig` (``embed_dim`` and ``text_width`` come from the CLIP),
    ``cache_inputs`` (default true: each training image's CLIP embedding is computed once and
    kept by dataset index; captions are encoded every step, as their variants change per epoch),
    ``fresh`` (bool: build a new prior even when ``--init`` holds one) and ``restat`` (bool: keep the
    prior of ``--init`` but measure its embedding statistics anew, for a CLIP finetuned since).

    ``--data`` may also be a ``genvl data embed`` folder of the ``--init`` CLIP's embeddings: the
    stage then reads them instead of encoding images and captions (same batches, same loss).
    """

    model_config = PriorConfig
    recipe_keys = {"size": str, "cache_inputs": bool, "fresh": bool, "restat": bool}
    stage = "prior"
    component = "prior"
    accepts_embeddings = True
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.clip = None
        self.scheduler = None
        self.text_len = None
        self.dataset_size = 0
        self.cache_inputs = True
        self._cache: EncodingCache | None = None  # CLIP image embeddings (N, D) by dataset index
        self.fresh = False  # model.fresh: a new prior although --init holds one

    def build(self, dataset, init, tokenizer=None) -> DiffusionPrior:
        from accelerate import PartialState

        if init is None:
            raise ModelDirError("the prior stage needs --init DIR: a model directory with a trained clip component")
        init.require("clip", purpose="training the prior (--init)")
        self.cache_inputs = bool(self.cfg.model.get("cache_inputs", True))
        fresh = self.fresh = bool(self.cfg.model.get("fresh", False))
        restat = bool(self.cfg.model.get("restat", False))
        self.dataset_size = len(dataset)
        if hasattr(dataset, "tensors"):
            from genvl.data.embeddings import clip_weights_hash

            made_with = dataset.meta.get("clip_sha256")
            if made_with != clip_weights_hash(init):
                raise ModelDirError(f"{init.path}: its clip is not the one the embeddings in --data were computed with "
                                    f"({dataset.meta.get('model')}); embed the data again with this model")
        clip = init.load("clip")
        clip.requires_grad_(False)
        self.clip = clip.eval()
        self.tokenizer = tokenizer or init.tokenizer()
        D, W = clip.config.embed_dim, clip.config.text_width
        text_len = clip.config.max_text_len
        tok_len = self.tokenizer.model_max_length
        if tok_len <= 100_000:  # tokenizers saved without a limit report a huge sentinel
            text_len = min(text_len, tok_len)

        if init.has("prior") and not fresh:
            model = init.load("prior")
            pc = model.config
            if (pc.embed_dim, pc.text_width) != (D, W):
                raise ModelDirError(
                    f"{init.path}: its prior expects CLIP embed_dim {pc.embed_dim} / text_width {pc.text_width}, "
                    f"its clip has {D} / {W}"
                )
            if restat and not self.resuming:  # a CLIP finetuned since: its embeddings' statistics moved
                device = PartialState().device
                self.clip.to(device)
                model.set_embedding_stats(*clip_image_stats(self.clip, dataset, device=device))
        else:
            overrides = dict(self.cfg.model)
            for key in ("cache_inputs", "fresh", "restat"):
                overrides.pop(key, None)
            size = overrides.pop("size", "tiny")
            for key, value in (("embed_dim", D), ("text_width", W)):
                if key in overrides and overrides[key] != value:
                    raise ConfigError(f"bad prior model config: model.{key} is fixed by the CLIP core ({value})")
                overrides.pop(key, None)
            overrides.setdefault("text_len", text_len)
            try:
                pcfg = prior_config(size, embed_dim=D, text_width=W, **overrides)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad prior model config: {e}") from None
            model = DiffusionPrior(pcfg)
            device = PartialState().device
            self.clip.to(device)
            mean, std = clip_image_stats(self.clip, dataset, device=device)
            model.set_embedding_stats(mean, std)
        self.text_len = min(text_len, model.config.text_len)
        self.scheduler = model.make_scheduler("ddpm")
        return model.train()

    def collate(self, items: list[dict] | dict[str, Any]) -> dict[str, Any]:
        """A list of rows, or (precomputed embeddings) a dict of rows already stacked by
        :meth:`genvl.data.embeddings.EmbeddingSet.__getitems__`."""
        if isinstance(items, dict) or "image_embeds" in items[0]:
            return self._collate_embeddings(items)
        texts = [it["text"] for it in items]
        uncond = torch.tensor([not t.strip() for t in texts], dtype=torch.bool)  # (B,) dropped captions
        enc = encode_texts(self.tokenizer, texts, max_length=self.text_len)
        batch = {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),  # (B, 3, S, S)
            "input_ids": enc["input_ids"],  # (B, L)
            "attention_mask": enc["attention_mask"],  # (B, L)
            "uncond": uncond,
        }
        if "index" in items[0]:  # map-style: each image's embedding is cached by index (streams have none)
            batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)  # (B,)
        return batch

    def _collate_embeddings(self, items: list[dict] | dict[str, Any]) -> dict[str, Any]:
        """Precomputed rows: the embeddings and the text states, cut to the batch's longest caption."""
        if not isinstance(items, dict):
            items = {**{f: torch.stack([it[f] for it in items]) for f in EMBEDDING_FIELDS},
                     "text": [it["text"] for it in items]}
        uncond = torch.tensor([not t.strip() for t in items["text"]], dtype=torch.bool)  # (B,) dropped captions
        mask = items["text_mask"].long()  # (B, text_len)
        L = min(self.text_len, max(int(mask.sum(1).max()), 1))
        return {
            "image_embeds": items["image_embeds"].float(),  # (B, D)
            "text_embeds": items["text_embeds"].float(),  # (B, D)
            "text_states": items["text_states"][:, :L].float(),  # (B, L, W)
            "text_mask": mask[:, :L],  # (B, L)
            "uncond": uncond,
        }

    def to_device(self, device: torch.device) -> None:
        self.clip.to(device)

    def _image_embeds(self, batch) -> torch.Tensor:
        """(B, D) CLIP image embeddings of the batch; with ``model.cache_inputs`` (default true) each
        training image is encoded once (the images are not augmented), the captions every time
        (their variants and dropout change per epoch)."""
        px = batch["pixel_values"]
        if not self.cache_inputs or "index" not in batch or self.dataset_size < 1:
            return self.clip.encode_image(px).float()
        if self._cache is None:
            self._cache = EncodingCache(self.dataset_size)
        (z,) = self._cache.lookup(batch["index"], lambda rows: (self.clip.encode_image(px[rows]).float(),))
        return z

    def loss(self, model, batch):
        prior = getattr(model, "module", model)
        with torch.no_grad():
            if "image_embeds" in batch:  # precomputed by genvl data embed
                z_image, embeds = batch["image_embeds"], batch["text_embeds"]  # (B, D), (B, D)
                states, mask = batch["text_states"], batch["text_mask"]  # (B, L, W), (B, L)
            else:
                z_image = self._image_embeds(batch)  # (B, D) unit vectors
                text = self.clip.encode_text(batch["input_ids"], batch["attention_mask"])
                embeds = text.embeds.float()  # (B, D)
                states = text.token_states.float()  # (B, L, W)
                mask = text.attention_mask  # (B, L)
            drop = batch["uncond"]  # (B,) bool
            if bool(drop.any()):
                B, L, W = states.shape
                u = unconditional_text(B, L, W, embeds.shape[1], device=embeds.device)
                embeds = torch.where(drop[:, None], u.embeds, embeds)
                states = torch.where(drop[:, None, None], u.token_states, states)
                mask = torch.where(drop[:, None], u.attention_mask, mask.long())
            x0 = prior.normalize(z_image)  # (B, D)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)  # (B, D)
        pred = model(x_t, t, embeds, states, mask)  # (B, D) predicted x0
        loss = F.mse_loss(pred.float(), x0)
        with torch.no_grad():
            cos = F.cosine_similarity(prior.denormalize(pred.detach().float()), z_image, dim=-1).mean()
        return loss, {"cos_z_image": cos.item()}
