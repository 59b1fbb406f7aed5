"""Training of the token LM (Parti / Chameleon style) on top of a frozen VQ-VAE.

``genvl train lm --data PATH --out DIR --init VQ_MODEL_DIR``: ``--init`` is required and must hold a
``vqvae`` component. Its text tokenizer is used when it has one; otherwise a BPE is trained on the
dataset's captions (``tokenizer_vocab``, ``text_len``), as the CLIP stage does. When ``--init`` also
holds an ``lm``, training continues from it (finetuning; its vocabulary must fit the tokenizer and
the VQ-VAE).

Every batch mixes both orders of :mod:`genvl.models.lm`: each sample is a text -> image sequence
with probability ``model.t2i_fraction`` (default 0.5), else image -> text. Images are encoded to
codes on the fly by the frozen VQ-VAE inside :meth:`LMTask.loss`.

Classifier-free guidance (Parti, Yu et al. 2022, arXiv:2206.10789): a fraction ``model.cond_drop``
(default 0.1) of the text -> image samples get an empty caption ("<bos> <boi> codes <eoi>"), the
unconditional input the sampler uses. Order and dropping are pure functions of
(seed, epoch, dataset index), so runs repeat and resume exactly. A caption emptied by the data
layer (``data.caption_dropout``) also makes an unconditional text -> image sample (an empty caption
is never an image -> text target).

Loss: next-token cross-entropy on the targets only (the codes and <eoi> of text -> image rows, the
caption and <eos> of image -> text rows), averaged over target tokens; caption tokens are weighted
by ``model.caption_weight`` (default 1). ``image_loss`` and ``text_loss`` are logged apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genvl.errors import ConfigError, ModelDirError
from genvl.models.lm import TokenLayout, TokenLM, TokenLMConfig, encode_captions, lm_config
from genvl.tokenizers.text import train_text_tokenizer
from genvl.training.tasks.conditioning import keyed_coin
from genvl.training.trainer import Task

NUM_FIXED = 8  # training captions shown in the sample grids
SAMPLE_GUIDANCE = 3.0


def t2i_order(fraction: float, seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is a text -> image sequence in ``epoch`` (else image -> text)."""
    return keyed_coin(fraction, f"lm-order:{seed}:{epoch}:{index}")


def cond_dropped(probability: float, seed: int, epoch: int, index: int) -> bool:
    """Whether the caption of text -> image sample ``index`` is dropped in ``epoch`` (CFG)."""
    return keyed_coin(probability, f"lm-cond:{seed}:{epoch}:{index}")


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, image_targets: torch.Tensor, text_targets: torch.Tensor,
            caption_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the target positions.

    Args:
        logits: (B, L, V) the LM's logits (position t predicts token t + 1).
        input_ids: (B, L) the sequences.
        image_targets: (B, L) bool, image-code targets (and <eoi>).
        text_targets: (B, L) bool, caption targets (and <eos>).
        caption_weight: weight of a caption token relative to an image token.

    Returns:
        (loss, image_loss, text_loss): the weighted mean over all targets, and the mean over each
        kind (0 when the batch has none of that kind); scalars.
    """
    B, L, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(B, L - 1)  # ce[:, t] = -log p(token t + 1 | tokens <= t)
    img, txt = image_targets[:, 1:].float(), text_targets[:, 1:].float()
    n_img, n_txt = img.sum(), txt.sum()
    img_sum, txt_sum = (ce * img).sum(), (ce * txt).sum()
    loss = (img_sum + caption_weight * txt_sum) / (n_img + caption_weight * n_txt).clamp_min(1e-6)
    return loss, img_sum / n_img.clamp_min(1), txt_sum / n_txt.clamp_min(1)


class LMTask(Task):
    """Token LM over text ids and VQ-VAE codes, both orders in every batch.

    ``model`` recipe keys: ``size`` (tiny | small | base | medium), overrides of
    :class:`~genvl.models.lm.TokenLMConfig` (the layout fields come from the tokenizer and the
    VQ-VAE, ``text_len`` from the recipe's ``text_len``), ``t2i_fraction`` (default 0.5),
    ``cond_drop`` (default 0.1) and ``caption_weight`` (default 1).

    ``--data`` may be images (encoded by the frozen VQ-VAE in every step) or a tokenized set from
    ``genvl data tokenize`` (a ``.safetensors`` of codes, checked to come from the same VQ-VAE),
    which skips the encoder.
    """

    model_config = TokenLMConfig
    recipe_keys = {"size": str, "t2i_fraction": float, "cond_drop": float, "caption_weight": float}
    stage = "lm"
    component = "lm"
    accepts_tokenized = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vq = None
        self.dataset = None
        self.t2i_fraction = 0.5
        self.cond_drop = 0.1
        self.caption_weight = 1.0
        self.text_len = cfg.text_len
        self.fixed_pixels = None  # (n, 3, S, S) first training images, for the sample grid
        self.fixed_texts: list[str] = []

    def _pop_float(self, overrides: dict, key: str, default: float, lo: float, hi: float | None) -> float:
        value = overrides.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ConfigError(f"bad lm model config: {key} must be a number in {rng}, got {value!r}")
        return float(value)

    def build(self, dataset, init, tokenizer=None) -> TokenLM:
        if init is None:
            raise ModelDirError("the lm stage needs --init DIR: a model directory with a trained vqvae component")
        init.require("vqvae", purpose="training the lm (--init)")
        vq = init.load("vqvae")
        vq.requires_grad_(False)
        self.vq = vq.eval()
        S = self.cfg.data.image_size
        if vq.config.image_size != S:
            raise ConfigError(f"data.image_size is {S} but the vqvae in {init.path} works at {vq.config.image_size} px")

        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif (init.path / init.meta.get("tokenizer", "tokenizer")).is_dir():
            self.tokenizer = init.tokenizer()
        else:
            self.tokenizer = train_text_tokenizer(
                getattr(dataset, "all_captions", dataset.captions), vocab_size=self.cfg.tokenizer_vocab, model_max_length=self.cfg.text_len
            )

        overrides = dict(self.cfg.model)
        size = overrides.pop("size", "tiny")
        self.t2i_fraction = self._pop_float(overrides, "t2i_fraction", 0.5, 0.0, 1.0)
        self.cond_drop = self._pop_float(overrides, "cond_drop", 0.1, 0.0, 1.0)
        self.caption_weight = self._pop_float(overrides, "caption_weight", 1.0, 0.0, None)
        try:
            layout = TokenLayout.from_tokenizer(self.tokenizer, vq.config.codebook_size, vq.tokens_per_image)
        except ValueError as e:
            raise ModelDirError(f"{init.path}: {e}") from None
        fixed = {"text_vocab_size": layout.text_vocab_size, "codebook_size": layout.codebook_size,
                 "image_tokens": layout.image_tokens, "pad_id": layout.pad_id, "unk_id": layout.unk_id,
                 "bos_id": layout.bos_id, "eos_id": layout.eos_id}
        if init.has("lm"):
            model = init.load("lm")
            if model.config.layout != layout:
                raise ModelDirError(
                    f"{init.path}: its lm was trained for {model.config.layout}, but its tokenizer and vqvae give {layout}"
                )
        else:
            for key, value in fixed.items():
                if key in overrides and overrides[key] != value:
                    raise ConfigError(f"bad lm model config: model.{key} is fixed by the tokenizer / vqvae ({value})")
                overrides.pop(key, None)
            overrides.setdefault("text_len", self.cfg.text_len)
            try:
                model = TokenLM(lm_config(size, **fixed, **overrides))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad lm model config: {e}") from None
        self.text_len = model.config.text_len
        self.dataset = dataset
        if getattr(dataset, "format", "") == "tokenized":
            self._check_tokenized(dataset, init, vq)
        items = [dataset[i] for i in range(min(NUM_FIXED, len(dataset)))]
        captions = getattr(dataset, "captions", None)
        if "codes" in items[0]:  # a tokenized set: its images are the VQ-VAE's reconstructions
            with torch.no_grad():
                self.fixed_pixels = vq.decode_codes(torch.stack([it["codes"] for it in items])).float()
        else:
            self.fixed_pixels = torch.stack([it["pixel_values"] for it in items])
        self.fixed_texts = [captions[it["index"]] if captions is not None else it["text"] for it in items]
        return model.train()

    @staticmethod
    def _check_tokenized(dataset, init, vq) -> None:
        """The codes must come from this very VQ-VAE (same weights, codebook and grid)."""
        meta = dataset.set.meta
        h = dataset.set.codes.shape[1]
        if int(meta.get("codebook_size", vq.config.codebook_size)) != vq.config.codebook_size or h != vq.latent_size:
            raise ConfigError(
                f"{dataset.path}: codes of a {meta.get('codebook_size')}-code, {h}x{h} tokenizer, but the vqvae in "
                f"{init.path} has {vq.config.codebook_size} codes, {vq.latent_size}x{vq.latent_size}"
            )
        want = meta.get("vqvae_sha256")
        weights = init.path / "vqvae" / "model.safetensors"
        if want and weights.is_file():
            from genvl.data.tokenized import file_sha256

            if file_sha256(weights) != want:
                raise ConfigError(
                    f"{dataset.path} was tokenized with other vqvae weights than {weights}; "
                    f"re-run genvl data tokenize with --model {init.path}"
                )

    def collate(self, items: list[dict]) -> dict[str, Any]:
        # The dataset's epoch is current here: set before each epoch's loader (and its workers) starts.
        epoch = getattr(self.dataset, "epoch", 0)
        seed = self.cfg.seed
        texts = [it["text"] for it in items]
        t2i, drop = [], []
        for it, text in zip(items, texts):
            empty = not text.strip()
            forward = empty or t2i_order(self.t2i_fraction, seed, epoch, it["index"])
            t2i.append(forward)
            drop.append(forward and (empty or cond_dropped(self.cond_drop, seed, epoch, it["index"])))
        ids = encode_captions(self.tokenizer, texts, self.text_len)
        ids = [[] if d else t for t, d in zip(ids, drop)]
        if "codes" in items[0]:  # pre-tokenized
            visual = {"codes": torch.stack([it["codes"] for it in items])}  # (B, h, w)
        else:
            visual = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}  # (B, 3, S, S)
        return {
            **visual,
            "text_ids": ids,  # B lists of caption ids (empty: unconditional)
            "t2i": t2i,  # B order flags
        }

    def to_device(self, device: torch.device) -> None:
        self.vq.to(device)

    def loss(self, model, batch):
        lm = getattr(model, "module", model)
        with torch.no_grad():
            codes = batch["codes"] if "codes" in batch else self.vq.encode(batch["pixel_values"])  # (B, h, w)
            seq = lm.layout.build_batch(batch["text_ids"], codes, batch["t2i"])
        logits = model(seq.input_ids, attention_mask=seq.attention_mask).logits  # (B, L, V)
        loss, image_loss, text_loss = lm_loss(logits, seq.input_ids, seq.image_targets, seq.text_targets,
                                              self.caption_weight)
        return loss, {"image_loss": image_loss.item(), "text_loss": text_loss.item(),
                      "t2i_frac": sum(batch["t2i"]) / len(batch["t2i"])}

    def sample(self, model, path, step):
        """Rows: VQ-VAE reconstructions of fixed training images; images generated for their captions.

        The captions the LM writes for those images go to a ``.txt`` beside the PNG.
        """
        from genvl.sampling.autoregressive import caption, text_to_image
        from genvl.training.previews import save_grid

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = model.device
                recon = self.vq.decode_codes(self.vq.encode(self.fixed_pixels.to(device))).float().cpu()
                out = text_to_image(model, self.vq, self.tokenizer, None, self.fixed_texts, guidance=SAMPLE_GUIDANCE,
                                    temperature=1.0, top_k=0, seed=self.cfg.seed)
                caps = caption(model, self.vq, self.tokenizer, None, self.fixed_pixels.to(device),
                               max_new_tokens=self.text_len + 1)
        finally:
            model.train(was_training)
        path = save_grid([recon.clamp(-1, 1), out.images.cpu()], Path(path))
        lines = [f"{t}\t->\t{c}" for t, c in zip(self.fixed_texts, caps.captions)]
        path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        return path

