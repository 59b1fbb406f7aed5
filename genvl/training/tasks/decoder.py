"""Training of the DALL-E 2 pixel decoder, on a frozen CLIP (the super-resolution stage:
:mod:`genvl.training.tasks.superres`).

``genvl train decoder --data PATH --out DIR --init CLIP_MODEL_DIR``: ``--init`` is required and must
hold a ``clip`` component (and its tokenizer). When it also holds a ``decoder``, training continues
from that decoder (finetuning); otherwise a new one is built with the CLIP's dimensions at
``data.image_size``. The loss is the MSE of the UNet's prediction (v or epsilon) on
``x_t = add_noise(x_0, eps, t)``, t uniform over the training timesteps, conditioned on
``z_image = clip.encode_image(x_0)``, each sample weighted by its timestep's SNR as
``model.loss_weighting`` says: Min-SNR-gamma (the default; ``model.snr_gamma``, default 5) or
truncated SNR, see :func:`~genvl.training.tasks.diffusion.diffusion_loss`.

Classifier-free guidance (Ho & Salimans 2022): for a fraction ``model.cond_drop`` (default 0.1,
as DALL-E 2) of the samples, ``z_image`` is zeroed and, for a text-conditioned decoder
(``model.text_conditioning: true``), the text is masked out: the unconditional input of
:class:`~genvl.models.decoder.Decoder`. Which samples are dropped is a pure function of
(seed, epoch, dataset index), so runs repeat and resume exactly. Captions dropped by the data layer
(``data.caption_dropout``) mask only the text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from genvl.config import to_dict
from genvl.errors import ConfigError, ModelDirError
from genvl.models.decoder import (
    CoarseLayouts,
    CoarseLayoutPath,
    Decoder,
    DecoderConfig,
    coarse_loss,
    decoder_config,
)
from genvl.tokenizers.text import encode_texts
from genvl.training.cache import EncodingCache
from genvl.training.previews import SAMPLE_STEPS, fixed_items, save_grid
from genvl.training.tasks.conditioning import cond_dropped, draw_prior_samples, mix_prior_samples, prior_settings
from genvl.training.recipes import take_options
from genvl.training.tasks.diffusion import SNR_GAMMA, check_weighting, diffusion_loss
from genvl.training.phases import Phase
from genvl.training.trainer import Task


def _rows(pred: CoarseLayouts, keep: torch.Tensor) -> CoarseLayouts:
    """The rows ``keep`` of the coarse layout path's output."""
    return CoarseLayouts(pred.layouts[keep], None if pred.scores is None else pred.scores[keep])


def _coarse_phase_loss(path: CoarseLayoutPath, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of the layout path's first phase: rows of embeddings and their pooled clean samples."""
    return coarse_loss(path(z), target)[0]


@dataclass
class DecoderOptions:
    """The decoder stage's training options: ``model`` recipe keys beside
    :class:`~genvl.models.decoder.DecoderConfig`'s fields (described in :class:`DecoderTask`)."""

    size: str = "tiny"
    text_conditioning: bool | None = None  # None: as the decoder of --init (a new one: false)
    cond_drop: float = 0.1
    snr_gamma: float = SNR_GAMMA
    loss_weighting: str = "min-snr"
    latent: bool = False
    fresh: bool = False
    cache_inputs: bool = True
    coarse_weight: float = 1.0
    coarse_fit_steps: int = 2000
    coarse_only: bool = False
    coarse_refit: bool = False
    prior_samples: int = 0
    image_embeds: str = ""  # a genvl data embed folder of --data and --init's CLIP: z read, not encoded


class DecoderTask(Task):
    """Diffusion decoder: predict the noise of a noised training image given its CLIP embedding.

    ``model`` recipe keys (:class:`DecoderOptions`): ``size`` (tiny | small | base), overrides of
    :class:`~genvl.models.decoder.DecoderConfig` (``image_size`` comes from ``data.image_size``,
    ``embed_dim`` / ``text_width`` from the CLIP), ``text_conditioning`` (bool, default false: also
    condition on the CLIP text token states), ``cond_drop`` (default 0.1), ``loss_weighting``
    (``min-snr``, the default, or ``truncated-snr``: :func:`diffusion_loss`), ``snr_gamma`` (the
    Min-SNR cap, default 5; 0 = plain epsilon MSE), ``latent`` (bool, default false:
    denoise the latents of the ``vqvae`` component of ``--init``, which the decoder then holds, frozen,
    instead of pixels), ``fresh`` (bool: build a new decoder even when ``--init`` holds one; the
    released directory's decoder is replaced) and ``cache_inputs`` (default true for decoders without
    text: each training image's CLIP embedding and latents are computed once and kept by dataset
    index, as both come from frozen models and the images are not augmented) and ``image_embeds``
    (a ``genvl data embed`` folder of the same ``--data`` made with the CLIP of ``--init``: every
    image's CLIP embedding is read from it instead of computed, in the first epoch and in the
    coarse path's first phase; ``genvl data embed`` encodes at the CLIP's own image size).

    Coarse layout path (what it is and how it trains: :mod:`genvl.models.decoder`): ``coarse_size``
    (0 = off; a decoder from ``--init`` without one is grown with ``add_coarse``), ``coarse_hidden``
    (default 1024), ``coarse_heads`` (default 1; changing it on a decoder from ``--init`` needs
    ``coarse_refit``), ``coarse_weight`` (default 1: weight of its loss, on the conditioned samples),
    ``coarse_fit_steps`` (default 2000: a new path is first fitted alone, the trainer's first phase
    (:meth:`first_phase`), on the CLIP embeddings of up to 8,192 training images at batch 256; 0 =
    not), ``coarse_only`` (default false; true: the trainer trains only the path (:meth:`trainable`),
    the UNet frozen and not run, e.g. to give an already trained decoder a layout path for
    ``genvl sample --coarse-start`` without changing what it computes) and ``coarse_refit`` (default
    false; true: replace the path of a decoder from ``--init`` by a new one and fit it as above).

    Training on the prior's samples (:mod:`genvl.training.tasks.conditioning`): ``prior_samples``
    (default 0). With K > 0 each conditioned training embedding is one of the image's own and K
    embeddings the prior of ``--init`` drew from its captions, and the first phase fits the layout
    path on all K + 1.
    """

    model_config = DecoderConfig
    options = DecoderOptions
    stage = "decoder"
    component = "decoder"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.clip = None
        self.scheduler = None
        self.dataset = None
        self.cond_drop = 0.1
        self.snr_gamma = SNR_GAMMA
        self.weighting = "min-snr"
        self.text = False
        self.text_len = None
        self.fixed_pixels = None  # (n, 3, S, S) first training images, for the sample grid
        self.fixed_texts: list[str] = []
        self.cache_inputs = True
        self.fresh = False  # model.fresh: a new decoder although --init holds one
        self._cache: EncodingCache | None = None  # z (N, D) [and latents (N, C, s, s)] by dataset index
        self.z_table: torch.Tensor | None = None  # (N, D) CLIP image embeddings read from model.image_embeds
        self.coarse_weight = 1.0
        self.coarse_only = False  # model.coarse_only: only the coarse layout path trains
        self.prior_samples = 0  # model.prior_samples: prior-drawn embeddings per image
        self._prior = None  # (prior, its sampling settings) of --init, for prior_samples
        # (N, K, D) prior-drawn embeddings by dataset index and (N,) which rows have them
        self.prior_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decoder: Decoder | None = None
        self.fit_steps = 0  # coarse_fit_steps of a new layout path; 0 = no first phase
        # what the first phase achieved: images, prior_samples, steps, mse, mean_image_mse
        self.coarse_fit: dict[str, Any] | None = None

    def build(self, dataset, init, tokenizer=None) -> Decoder:
        if init is None:
            raise ModelDirError("the decoder stage needs --init DIR: a model directory with a trained clip component")
        init.require("clip", purpose="training the decoder (--init)")
        clip = init.load("clip")
        clip.requires_grad_(False)
        self.clip = clip.eval()
        self.tokenizer = tokenizer or init.tokenizer()
        D, W_clip, S = clip.config.embed_dim, clip.config.text_width, self.cfg.data.image_size

        overrides = dict(self.cfg.model)  # DecoderConfig's fields once the options are taken out
        o = take_options(DecoderOptions, overrides)
        size, text_flag, latent, refit = o.size, o.text_conditioning, bool(o.latent), bool(o.coarse_refit)
        self.cond_drop = float(o.cond_drop)
        self.weighting, self.snr_gamma = check_weighting(o.loss_weighting, o.snr_gamma)
        fresh = self.fresh = bool(o.fresh)
        self.cache_inputs = bool(o.cache_inputs)
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ConfigError(f"bad decoder model config: cond_drop must be in [0, 1], got {self.cond_drop}")
        self.coarse_weight = float(o.coarse_weight)
        fit_steps = int(o.coarse_fit_steps)
        if self.coarse_weight < 0 or fit_steps < 0:
            raise ConfigError("bad decoder model config: coarse_weight and coarse_fit_steps must be >= 0")
        self.coarse_only = bool(o.coarse_only)
        self.prior_samples = int(o.prior_samples)
        if self.prior_samples < 0:
            raise ConfigError(f"bad decoder model config: prior_samples must be >= 0, got {self.prior_samples}")
        if self.prior_samples:
            init.require("prior", purpose="model.prior_samples (embeddings drawn by the prior of --init)")
            self._prior = (init.load("prior").eval().requires_grad_(False), prior_settings(init.meta.get("sampling", {})))
        new_coarse = False

        if init.has("decoder") and not fresh:
            model = init.load("decoder")
            dc = model.config
            if dc.embed_dim != D or (dc.text_width and dc.text_width != W_clip):
                raise ModelDirError(
                    f"{init.path}: its decoder expects CLIP embed_dim {dc.embed_dim} / text_width {dc.text_width}, "
                    f"its clip has {D} / {W_clip}"
                )
            if dc.image_size != S:
                raise ConfigError(f"data.image_size is {S} but the decoder in {init.path} works at {dc.image_size} px")
            if text_flag is not None and bool(text_flag) != (dc.text_width > 0):
                raise ConfigError(
                    f"model.text_conditioning is {bool(text_flag)} but the decoder in {init.path} "
                    f"{'is' if dc.text_width else 'is not'} text-conditioned"
                )
            if "latent" in self.cfg.model and latent != bool(dc.vae):
                raise ConfigError(
                    f"model.latent is {latent} but the decoder in {init.path} works in "
                    f"{'latent' if dc.vae else 'pixel'} space (model.fresh: true builds a new one)"
                )
            size_wanted = int(overrides.get("coarse_size", dc.coarse_size))
            heads_wanted = int(overrides.get("coarse_heads", dc.coarse_heads if dc.coarse_size else 1))
            if size_wanted != dc.coarse_size:
                if dc.coarse_size:
                    raise ConfigError(
                        f"model.coarse_size is {size_wanted} but the decoder in {init.path} has a coarse layout path "
                        f"of size {dc.coarse_size} (model.fresh: true builds a new decoder)"
                    )
                try:
                    model = model.add_coarse(size_wanted, int(overrides.get("coarse_hidden", dc.coarse_hidden)), heads_wanted)
                except ValueError as e:
                    raise ConfigError(f"bad decoder model config: {e}") from None
                new_coarse = True
            elif refit:
                if not dc.coarse_size:
                    raise ConfigError(f"model.coarse_refit: the decoder in {init.path} has no coarse layout path (set model.coarse_size)")
                try:
                    model.reset_coarse(heads=heads_wanted)
                except ValueError as e:
                    raise ConfigError(f"bad decoder model config: {e}") from None
                new_coarse = True
            elif dc.coarse_size and heads_wanted != dc.coarse_heads:
                raise ConfigError(
                    f"model.coarse_heads is {heads_wanted} but the coarse layout path of the decoder in {init.path} "
                    f"has {dc.coarse_heads} (model.coarse_refit: true replaces it by a new one)"
                )
        else:
            W = W_clip if text_flag else 0
            for key, value in (("image_size", S), ("embed_dim", D), ("text_width", W)):
                if key in overrides and overrides[key] != value:
                    where = "data.image_size" if key == "image_size" else "the CLIP core / text_conditioning"
                    raise ConfigError(f"bad decoder model config: model.{key} is fixed by {where} ({value})")
                overrides.pop(key, None)
            vq = None
            if latent:
                init.require("vqvae", purpose="a latent decoder (model.latent: true)")
                vq = init.load("vqvae")
                if vq.config.image_size != S:
                    raise ConfigError(f"data.image_size is {S} but the vqvae in {init.path} works at {vq.config.image_size} px")
                # Code vectors are unit vectors: coordinates have RMS 1/sqrt(code_dim) exactly, so this
                # scale gives the diffusion unit-RMS latents, bounded by the scale.
                overrides["vae"] = to_dict(vq.config)
                overrides["latent_scale"] = math.sqrt(vq.config.code_dim)
            try:
                dcfg = decoder_config(size, image_size=S, embed_dim=D, text_width=W, **overrides)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad decoder model config: {e}") from None
            model = Decoder(dcfg)
            if vq is not None:
                model.vae.load_state_dict(vq.state_dict())
            new_coarse = dcfg.coarse_size > 0
        if self.coarse_only:
            if model.coarse is None:
                raise ConfigError("model.coarse_only needs a coarse layout path: set model.coarse_size (e.g. 16)")
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("coarse."))  # the UNet and embedding projections stay as they are
        self.fit_steps = fit_steps if new_coarse else 0
        if self.prior_samples:
            prior, opts = self._prior
            self.prior_table = draw_prior_samples(prior, opts, clip, self.tokenizer, dataset, self.prior_samples,
                                                  self.cfg.seed, self.run_dir, self.is_main, self.show_progress)

        self.text = model.config.text_width > 0
        text_len = clip.config.max_text_len
        tok_len = self.tokenizer.model_max_length
        if tok_len <= 100_000:  # tokenizers saved without a limit report a huge sentinel
            text_len = min(text_len, tok_len)
        self.text_len = text_len
        self.scheduler = model.make_scheduler("ddpm")
        self.dataset = dataset
        if o.image_embeds:
            from genvl.data.embeddings import clip_weights_hash, image_embeddings_for

            self.z_table = image_embeddings_for(o.image_embeds, dataset, clip_weights_hash(init))
        self.decoder = model
        self.fixed_pixels, self.fixed_texts = fixed_items(dataset)
        return model.train()

    def trainable(self, model: Decoder):
        """The coarse layout path alone with ``coarse_only``, else the whole decoder."""
        return model.coarse if self.coarse_only else model

    def first_phase(self, model: Decoder) -> Phase | None:
        """The fit of a new coarse layout path alone (``coarse_fit_steps``), before the main loop:
        :func:`~genvl.models.decoder.coarse_loss` of ``model.coarse(z)`` against the pooled clean
        samples, on the CLIP embeddings of up to 8,192 training images (and their prior draws)."""
        if not self.fit_steps:
            return None
        z, y, n_exact, n_prior = self._coarse_fit_rows(model)
        # The unconditional input (zero embedding, the guidance's other branch) gets the mean image
        # as its layout, what a regression over all images gives it; fitted explicitly, as a mixture
        # would otherwise hand it one arbitrary head, never trained (1% of the rows, at least 8).
        n_zero = max(8, len(z) // 100)
        fit_z = torch.cat([z, z.new_zeros(n_zero, z.shape[1])])
        fit_y = torch.cat([y, y.mean(0, keepdim=True).expand(n_zero, *y.shape[1:])])
        steps = self.fit_steps

        @torch.no_grad()
        def done():
            mse = sum(F.mse_loss(model.coarse_image(z[i:i + 256]).float(), y[i:i + 256], reduction="sum").item()
                      for i in range(0, len(z), 256)) / y.numel()
            base = F.mse_loss(y.mean(0, keepdim=True).expand_as(y), y).item()
            if self.is_main:
                s = model.config.coarse_size
                extra = f" + {n_prior} prior-drawn embeddings" if n_prior else ""
                print(f"genvl: coarse layout path ({s}x{s}) fitted on {n_exact} images{extra} in {steps} steps: "
                      f"MSE {mse:.4f} (the mean image: {base:.4f})")
            self.coarse_fit = {"images": n_exact, "prior_samples": n_prior, "steps": steps, "mse": mse,
                               "mean_image_mse": base}

        return Phase("coarse layout: fitting", model.coarse, (fit_z, fit_y), _coarse_phase_loss, steps,
                     lr=1e-3, batch_size=256, done=done)

    @torch.no_grad()
    def _coarse_fit_rows(self, decoder: Decoder, limit: int = 8192, batch: int = 256):
        """(z (n, D), pooled x0 (n, C, s, s), images, prior draws) for the layout path's first phase."""
        from tqdm.auto import tqdm

        dataset, s = self.dataset, decoder.config.coarse_size
        rng = random.Random(f"coarse:{self.cfg.seed}")
        idx = sorted(rng.sample(range(len(dataset)), min(limit, len(dataset))))
        zs, ys = [], []
        for i in tqdm(range(0, len(idx), batch), desc="coarse layout: encoding", disable=not self.show_progress, leave=False):
            px = torch.stack([dataset[j]["pixel_values"] for j in idx[i:i + batch]])  # (b, 3, S, S)
            zs.append(self.z_table[idx[i:i + batch]] if self.z_table is not None else self.clip.encode_image(px).float())
            ys.append(F.adaptive_avg_pool2d(decoder.encode(px), s))  # (b, C, s, s)
        z, y = torch.cat(zs), torch.cat(ys)
        n_exact, n_prior = len(z), 0
        if self.prior_table is not None:  # add (prior-drawn embedding, its image's target) pairs
            table, has = self.prior_table
            keep = has[idx]
            rows = torch.tensor(idx)[keep]
            K = table.shape[1]
            z = torch.cat([z, table[rows].reshape(-1, table.shape[-1])])
            y = torch.cat([y, y[keep].repeat_interleave(K, dim=0)])
            n_prior = len(rows) * K
        return z, y, n_exact, n_prior

    def collate(self, items: list[dict]) -> dict[str, Any]:
        # The dataset's epoch is current here: set before each epoch's loader (and its workers) starts.
        epoch = getattr(self.dataset, "epoch", 0)
        drop = [cond_dropped(self.cond_drop, self.cfg.seed, epoch, it["index"]) for it in items]
        batch = {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),  # (B, 3, S, S)
            "drop": torch.tensor(drop, dtype=torch.bool),  # (B,) unconditional samples
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),  # (B,) dataset indices
        }
        if self.text:
            texts = [it["text"] for it in items]
            enc = encode_texts(self.tokenizer, texts, max_length=self.text_len)
            batch["input_ids"] = enc["input_ids"]  # (B, L)
            batch["attention_mask"] = enc["attention_mask"]  # (B, L)
            # text masked out: the whole conditioning dropped, or the caption dropped by the data layer
            batch["text_drop"] = torch.tensor([d or not t.strip() for d, t in zip(drop, texts)], dtype=torch.bool)
        return batch

    def to_device(self, device: torch.device) -> None:
        self.clip.to(device)

    def components(self, model):
        return {"decoder": model}

    def _condition(self, pixels: torch.Tensor, input_ids=None, attention_mask=None):
        """CLIP conditioning of a batch: z_image (B, D), and text states (B, L, W) + mask (B, L) or None."""
        z = self.clip.encode_image(pixels).float()  # (B, D) unit vectors
        if not self.text:
            return z, None, None
        out = self.clip.encode_text(input_ids, attention_mask)
        return z, out.token_states.float(), out.attention_mask

    def _inputs(self, decoder: Decoder, px: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_image (B, D), x0 (B, C, s, s)) of a batch, from the cache where computed before.

        A pixel decoder's x0 is the batch itself, so only the CLIP embedding is cached; a latent
        decoder caches its latents beside it.
        """
        if self.z_table is not None and index is not None:  # read from model.image_embeds
            z = self.z_table[index.cpu()].to(px.device)
            if decoder.vae is None or not self.cache_inputs:
                return z, decoder.encode(px)
            if self._cache is None:
                self._cache = EncodingCache(len(self.dataset))
            (x0,) = self._cache.lookup(index, lambda rows: (decoder.encode(px[rows]),))
            return z, x0
        if not self.cache_inputs or self.text or index is None:
            return self.clip.encode_image(px).float(), decoder.encode(px)
        if self._cache is None:
            self._cache = EncodingCache(len(self.dataset))
        if decoder.vae is None:
            (z,) = self._cache.lookup(index, lambda rows: (self.clip.encode_image(px[rows]).float(),))
            return z, decoder.encode(px)
        return self._cache.lookup(index, lambda rows: (self.clip.encode_image(px[rows]).float(), decoder.encode(px[rows])))

    def loss(self, model, batch):
        """``model``: the decoder, or with ``coarse_only`` its coarse layout path (:meth:`trainable`),
        either possibly wrapped for distributed training."""
        px = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]
        B = px.shape[0]
        decoder = self.decoder if self.coarse_only else getattr(model, "module", model)  # encode is the decoder's own
        keep = ~batch["drop"]  # the unconditional samples' layout is free (a learned mean)
        with torch.no_grad():
            z, x0 = self._inputs(decoder, px, batch.get("index"))  # (B, D), (B, C, s, s)
            states = mask = None
            if self.text:
                _, states, mask = self._condition(px, batch.get("input_ids"), batch.get("attention_mask"))
            z = z * keep.to(z.dtype)[:, None]  # zeros = unconditional
            if self.prior_table is not None:  # each embedding is one of K+1 equally likely: the image's or a prior draw
                z = mix_prior_samples(*self.prior_table, z, batch["index"], keep)
            if states is not None:
                mask = mask * (~batch["text_drop"]).to(mask.dtype)[:, None]  # (B, L)
        if self.coarse_only:  # the layout path alone: its regression on the conditioned samples
            coarse = model(z)  # CoarseLayouts (B, K, C, c, c)
            if not keep.any():
                return coarse.layouts.sum() * 0.0, {}
            loss, mse = coarse_loss(_rows(coarse, keep), F.adaptive_avg_pool2d(x0, decoder.config.coarse_size)[keep])
            return loss, {"coarse_mse": mse.item()}
        noise = torch.randn_like(x0)  # (B, C, s, s)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=px.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = model(x_t, t, z, states, mask, target="unet")
        loss = diffusion_loss(out, x0, noise, t, self.scheduler.alphas_cumprod, decoder.config.parameterization,
                              self.weighting, self.snr_gamma)
        logs = {"cond_frac": 1.0 - batch["drop"].float().mean().item()}
        if decoder.coarse is not None and keep.any():
            # The path's own output, beside the wrapped forward that fed its picked layout to the UNet:
            # its weights get both gradients in the one backward (see genvl.models.decoder).
            coarse = decoder.coarse(z)
            aux, mse = coarse_loss(_rows(coarse, keep), F.adaptive_avg_pool2d(x0, decoder.config.coarse_size)[keep])
            logs["coarse_mse"] = mse.item()
            if self.coarse_weight:
                loss = loss + self.coarse_weight * aux
        return loss, logs

    @torch.no_grad()
    def reconstruct(self, decoder: Decoder, pixels: torch.Tensor, texts: list[str] | None = None,
                    steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
        """Decode images from their CLIP embeddings (``sample_decoder``: DDIM, no guidance).

        Args:
            decoder: the (unwrapped) decoder.
            pixels: (n, 3, S, S) images in [-1, 1].
            texts: their captions (used when the decoder is text-conditioned).
            steps: DDIM steps.
            seed: seed of the starting noise.

        Returns:
            (n, 3, S, S) reconstructions in [-1, 1].
        """
        from genvl.sampling.unclip import sample_decoder

        device = decoder.device
        pixels = pixels.to(device)
        ids = mask = None
        if self.text:
            enc = encode_texts(self.tokenizer, texts, max_length=self.text_len)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        z, states, tmask = self._condition(pixels, ids, mask)
        return sample_decoder(decoder, z, steps=steps, guidance=1.0, scheduler="ddim",
                              generator=torch.Generator().manual_seed(seed), text_states=states, text_mask=tmask)

    def sample(self, model, path, step):
        """Top row: fixed training images; bottom row: their reconstructions from CLIP embeddings."""
        was_training = model.training
        model.eval()
        try:
            recon = self.reconstruct(model, self.fixed_pixels, self.fixed_texts, seed=self.cfg.seed)
        finally:
            model.train(was_training)
        return save_grid([self.fixed_pixels, recon.cpu()], path)
