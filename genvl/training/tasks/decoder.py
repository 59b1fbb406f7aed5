"""Training of the DALL-E 2 pixel decoder (on a frozen CLIP) and of the super-resolution stage.

``genvl train decoder --data PATH --out DIR --init CLIP_MODEL_DIR``: ``--init`` is required and must
hold a ``clip`` component (and its tokenizer). When it also holds a ``decoder``, training continues
from that decoder (finetuning); otherwise a new one is built with the CLIP's dimensions at
``data.image_size``. The loss is the MSE of the UNet's prediction (v or epsilon) on
``x_t = add_noise(x_0, eps, t)``, t uniform over the training timesteps, conditioned on
``z_image = clip.encode_image(x_0)``, each sample weighted by its timestep's SNR as
``model.loss_weighting`` says: Min-SNR-gamma (the default; ``model.snr_gamma``, default 5) or
truncated SNR, see :func:`diffusion_loss`.

Classifier-free guidance (Ho & Salimans 2022): for a fraction ``model.cond_drop`` (default 0.1,
as DALL-E 2) of the samples, ``z_image`` is zeroed and, for a text-conditioned decoder
(``model.text_conditioning: true``), the text is masked out: the unconditional input of
:class:`~genvl.models.decoder.Decoder`. Which samples are dropped is a pure function of
(seed, epoch, dataset index), so runs repeat and resume exactly. Captions dropped by the data layer
(``data.caption_dropout``) mask only the text.

``genvl train sr --data PATH --out DIR [--init DIR]``: the super-resolution UNet learns
``data.image_size`` from ``low_res_size`` (area-downsampled), with the low-res image
noise-augmented at a random level in [0, ``max_aug_level``) (Cascaded Diffusion Models,
arXiv:2106.15282). It needs no CLIP; ``--init`` only carries the other components along.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genvl.config import to_dict
from genvl.errors import ConfigError, ModelDirError
from genvl.models.decoder import (
    SUPERRES_SIZES,
    CoarseLayouts,
    Decoder,
    DecoderConfig,
    SuperRes,
    SuperResConfig,
    coarse_loss,
    decoder_config,
    superres_config,
)
from genvl.tokenizers.text import encode_texts
from genvl.training.cache import EncodingCache
from genvl.training.trainer import Task

NUM_FIXED = 8  # training images shown in the sample grids
SAMPLE_STEPS = 25  # DDIM steps of the sample grids
SNR_GAMMA = 5.0  # Min-SNR loss weighting (the paper's recommended gamma); recipes set model.snr_gamma


def cond_dropped(probability: float, seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is trained unconditionally in ``epoch`` (classifier-free guidance).

    Independent of the data layer's caption dropout (another key), fresh every epoch.
    """
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    return random.Random(f"decoder-cond:{seed}:{epoch}:{index}").random() < probability


def _rows(pred: CoarseLayouts, keep: torch.Tensor) -> CoarseLayouts:
    """The rows ``keep`` of the coarse layout path's output."""
    return CoarseLayouts(pred.layouts[keep], None if pred.scores is None else pred.scores[keep])


def _variants(dataset, index: int) -> tuple[str, ...]:
    """Caption variants of sample ``index``: all of them where the dataset keeps several."""
    if hasattr(dataset, "variants"):
        return tuple(dataset.variants(index))
    return (dataset[index]["text"],)


def _prior_settings(recommended: dict) -> dict[str, Any]:
    """Prior sampling settings for ``prior_samples``: the model directory's recommended ones
    (``genvl.json`` ``sampling``), else :func:`~genvl.sampling.unclip.sample_prior`'s defaults;
    one candidate per embedding."""
    import inspect

    from genvl.sampling.unclip import sample_prior

    default = {name: p.default for name, p in inspect.signature(sample_prior).parameters.items()}
    scheduler = recommended.get("prior_scheduler") or recommended.get("scheduler") or default["scheduler"]
    return {"steps": int(recommended.get("prior_steps", default["steps"])),
            "guidance": float(recommended.get("prior_guidance", default["guidance"])), "scheduler": str(scheduler)}


class _Counter(logging.Filter):
    """Swallows and counts a logger's records (warnings about prompts cut to the text tower)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False


#: Per-timestep loss weightings, as a weight on the x0 error (see :func:`diffusion_loss`).
LOSS_WEIGHTINGS = ("min-snr", "truncated-snr")


def diffusion_loss(out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   alphas_cumprod: torch.Tensor, parameterization: str, weighting: str = "min-snr",
                   snr_gamma: float = SNR_GAMMA) -> torch.Tensor:
    """MSE of the UNet's own output (v or epsilon) against its target, weighted per timestep.

    Per sample, the epsilon MSE is ``SNR * |x0_pred - x0|^2`` and the v MSE ``(SNR + 1) * |...|^2``
    (``SNR = a / (1 - a)``, ``a`` = alpha_bar_t). Each weighting is a weight ``w(SNR)`` on that x0
    error; the loss is ``mean(mse * w / base)`` with ``base`` the factor of the parameterization.
    Taking the MSE of the raw output, not of an epsilon converted from v, keeps the noisiest steps
    exact: there epsilon is nearly x_t and the model's part of it (``sqrt(a) v``) is below the
    precision of bf16.

    - ``min-snr`` (Hang et al. 2023, arXiv:2303.09556): ``w = min(SNR, snr_gamma)``; ``snr_gamma`` 0
      gives ``w = SNR``, the plain epsilon MSE of DDPM. At the noisy half of the schedule (SNR < 1)
      the x0 error counts only SNR times: at the steps that set an image's layout from its
      conditioning the weight is 0.001 to 0.1.
    - ``truncated-snr`` (Salimans & Ho 2022, arXiv:2202.00512, sec. 4): ``w = max(SNR, 1)``: the x0
      error counts fully at the noisy steps, the epsilon error at the clean ones; with v
      prediction it is the v MSE times ``max(SNR, 1) / (SNR + 1)``, between 1/2 and 1.

    Args:
        out: (B, C, H, W) the UNet's prediction, v or epsilon (``forward(..., raw=True)``).
        x0, noise: (B, C, H, W) the clean sample and the noise that made x_t.
        t: (B,) long timesteps.
        alphas_cumprod: (T,) alpha_bar of the schedule.
        parameterization: "v" or "epsilon", what ``out`` is.
        weighting: one of :data:`LOSS_WEIGHTINGS`.
        snr_gamma: the min-snr cap.
    """
    a = alphas_cumprod.to(t.device)[t].float()  # (B,)
    snr = a / (1 - a)
    if parameterization == "v":
        ab = a.view(-1, *([1] * (x0.ndim - 1)))
        target, base = ab.sqrt() * noise.float() - (1 - ab).sqrt() * x0.float(), snr + 1
    elif parameterization == "epsilon":
        target, base = noise.float(), snr
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    per = (out.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weighting == "min-snr":
        w = snr.clamp(max=snr_gamma) if snr_gamma > 0 else snr
    elif weighting == "truncated-snr":
        w = snr.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; known: {', '.join(LOSS_WEIGHTINGS)}")
    return (per * (w / base)).mean()


def _pop_snr_gamma(overrides: dict) -> float:
    gamma = float(overrides.pop("snr_gamma", SNR_GAMMA))
    if gamma < 0:
        raise ConfigError(f"bad model config: snr_gamma must be >= 0 (0 = unweighted), got {gamma}")
    return gamma


def _pop_weighting(overrides: dict) -> str:
    weighting = str(overrides.pop("loss_weighting", "min-snr"))
    if weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"bad model config: loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
    return weighting


def _fixed_items(dataset, n: int = NUM_FIXED) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` images of ``dataset`` (B, 3, S, S) and their captions (without dropout)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    captions = getattr(dataset, "captions", None)
    texts = [captions[it["index"]] if captions is not None else it["text"] for it in items]
    return torch.stack([it["pixel_values"] for it in items]), texts


def _save_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """Write rows of (n, 3, H, W) images in [-1, 1] as one PNG grid, one row per tensor."""
    from genvl.sampling.io import make_grid, to_pil_images

    ncols = rows[0].shape[0]
    images = [im for row in rows for im in to_pil_images(row)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    make_grid(images, ncols=ncols).save(tmp)
    tmp.replace(path)
    return path


#: Where the decoder stage keeps the prior's draws (model.prior_samples) in its run folder, so that a
#: resumed or repeated run with the same prior, settings and captions reads them instead of drawing again.
PRIOR_SAMPLES_FILE = "prior_samples.safetensors"


def _prior_samples_key(prior, opts: dict, K: int, N: int, D: int, seed: int, pairs: list) -> str:
    """A digest of everything the prior's draws depend on: its weights, the sampling settings, K, the
    seed and the (image index, caption) pairs drawn from."""
    import hashlib
    import json

    h = hashlib.sha256()
    for name, t in sorted(prior.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"opts": opts, "K": K, "N": N, "D": D, "seed": seed}, sort_keys=True, default=str).encode())
    h.update(json.dumps(pairs).encode())
    return h.hexdigest()


def _read_prior_samples(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The draws kept at ``path`` when they were made under ``key``; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("embeddings").float(), f.get_tensor("drawn").bool()
    except (OSError, SafetensorError, KeyError):  # a partial or foreign file: draw again
        return None


def _write_prior_samples(path: Path, key: str, table: torch.Tensor, has: torch.Tensor) -> None:
    """Keep the draws at ``path`` (written whole, then renamed into place)."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": table.contiguous(), "drawn": has.to(torch.uint8)}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


class DecoderTask(Task):
    """Diffusion decoder: predict the noise of a noised training image given its CLIP embedding.

    ``model`` recipe keys: ``size`` (tiny | small | base), overrides of
    :class:`~genvl.models.decoder.DecoderConfig` (``image_size`` comes from ``data.image_size``,
    ``embed_dim`` / ``text_width`` from the CLIP), ``text_conditioning`` (bool, default false: also
    condition on the CLIP text token states), ``cond_drop`` (default 0.1), ``loss_weighting``
    (``min-snr``, the default, or ``truncated-snr``: :func:`diffusion_loss`), ``snr_gamma`` (the
    Min-SNR cap, default 5; 0 = plain epsilon MSE), ``latent`` (bool, default false:
    denoise the latents of the ``vqvae`` component of ``--init``, which the decoder then holds, frozen,
    instead of pixels), ``fresh`` (bool: build a new decoder even when ``--init`` holds one; the
    released directory's decoder is replaced) and ``cache_inputs`` (default true for decoders without
    text: each training image's CLIP embedding and latents are computed once and kept by dataset
    index, as both come from frozen models and the images are not augmented).

    Coarse layout path (:class:`~genvl.models.decoder.Decoder`, ``coarse_size``): ``coarse_size`` (0 =
    off; a decoder from ``--init`` without one is grown with :meth:`~genvl.models.decoder.Decoder.add_coarse`),
    ``coarse_hidden`` (default 1024), ``coarse_heads`` (default 1; K > 1: the path proposes K
layouts and passes on the best-scored one, fitted winner-takes-all, so a prompt that leaves two
styles open gets one of them rather than their blur; changing it on a decoder from ``--init``
needs ``coarse_refit``), ``coarse_weight`` (default 1: weight of its auxiliary MSE onto the
    clean sample average-pooled to ``coarse_size``, on the conditioned samples) and ``coarse_fit_steps``
    (default 2000: a new path is first fitted alone by that regression, on the CLIP embeddings of up to
    8,192 training images at batch 256, before the diffusion training starts; 0 = not) and
    ``coarse_only`` (default false; true: train only the coarse layout path, by its regression on the
    conditioned samples, the UNet frozen and not run, e.g. to give an already trained decoder a
    layout path for ``genvl sample --coarse-start`` without changing what it computes),
    ``coarse_refit`` (default false; true: replace the coarse path of a decoder from ``--init`` by a
    new one and fit it as above).

    Training on the prior's samples: ``prior_samples`` (default 0). With K > 0 the prior of
    ``--init`` first draws K embeddings per training image from K of its captions (with that
    model's recommended prior settings, one candidate each); each conditioned training embedding
    is then one of the image's K + 1 (its own, or one of its draws) with equal odds, and a coarse
    fit regresses the image from all K + 1. At text-to-image time the decoder reads the prior's
    samples, which lie off the image embeddings it is otherwise trained on (cosine about 0.9 to
    their nearest image in the demo, where images' nearest neighbours are at about 0.84); trained
    on image embeddings alone, it maps them to blurred, cluttered averages.
    """

    model_config = DecoderConfig
    recipe_keys = {"size": str, "text_conditioning": bool, "cond_drop": float, "snr_gamma": float,
                   "loss_weighting": str, "latent": bool, "fresh": bool, "cache_inputs": bool,
                   "coarse_weight": float, "coarse_fit_steps": int, "coarse_only": bool, "coarse_refit": bool,
                   "prior_samples": int}
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
        self.coarse_weight = 1.0
        self.coarse_only = False  # model.coarse_only: only the coarse layout path trains
        self.prior_samples = 0  # model.prior_samples: prior-drawn embeddings per image
        self._prior = None  # (prior, its sampling settings) of --init, for prior_samples
        # (N, K, D) prior-drawn embeddings by dataset index and (N,) which rows have them
        self._prior_table: tuple[torch.Tensor, torch.Tensor] | None = None
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

        overrides = dict(self.cfg.model)
        size = overrides.pop("size", "tiny")
        text_flag = overrides.pop("text_conditioning", None)
        self.cond_drop = float(overrides.pop("cond_drop", 0.1))
        self.snr_gamma = _pop_snr_gamma(overrides)
        self.weighting = _pop_weighting(overrides)
        latent = bool(overrides.pop("latent", False))
        fresh = self.fresh = bool(overrides.pop("fresh", False))
        self.cache_inputs = bool(overrides.pop("cache_inputs", True))
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ConfigError(f"bad decoder model config: cond_drop must be in [0, 1], got {self.cond_drop}")
        self.coarse_weight = float(overrides.pop("coarse_weight", 1.0))
        fit_steps = int(overrides.pop("coarse_fit_steps", 2000))
        if self.coarse_weight < 0 or fit_steps < 0:
            raise ConfigError("bad decoder model config: coarse_weight and coarse_fit_steps must be >= 0")
        self.coarse_only = bool(overrides.pop("coarse_only", False))
        refit = bool(overrides.pop("coarse_refit", False))
        self.prior_samples = int(overrides.pop("prior_samples", 0))
        if self.prior_samples < 0:
            raise ConfigError(f"bad decoder model config: prior_samples must be >= 0, got {self.prior_samples}")
        if self.prior_samples:
            init.require("prior", purpose="model.prior_samples (embeddings drawn by the prior of --init)")
            self._prior = (init.load("prior").eval().requires_grad_(False), _prior_settings(init.meta.get("sampling", {})))
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
        fit = new_coarse and fit_steps and not self.resuming
        if self.prior_samples:
            self._prior_table = self._draw_prior_samples(dataset)
        if fit:
            self._fit_coarse(model, dataset, fit_steps)

        self.text = model.config.text_width > 0
        text_len = clip.config.max_text_len
        tok_len = self.tokenizer.model_max_length
        if tok_len <= 100_000:  # tokenizers saved without a limit report a huge sentinel
            text_len = min(text_len, tok_len)
        self.text_len = text_len
        self.scheduler = model.make_scheduler("ddpm")
        self.dataset = dataset
        self.fixed_pixels, self.fixed_texts = _fixed_items(dataset)
        return model.train()

    @torch.enable_grad()
    def _fit_coarse(self, decoder: Decoder, dataset, steps: int, limit: int = 8192, batch: int = 256) -> None:
        """Fit a new coarse layout path alone: MSE of ``coarse_image(z)`` onto the pooled clean samples."""
        from tqdm.auto import tqdm

        s = decoder.config.coarse_size
        rng = random.Random(f"coarse:{self.cfg.seed}")
        idx = sorted(rng.sample(range(len(dataset)), min(limit, len(dataset))))
        zs, ys = [], []
        with torch.no_grad():
            for i in tqdm(range(0, len(idx), batch), desc="coarse layout: encoding", disable=not self.show_progress, leave=False):
                px = torch.stack([dataset[j]["pixel_values"] for j in idx[i:i + batch]])  # (b, 3, S, S)
                zs.append(self.clip.encode_image(px).float())
                ys.append(F.adaptive_avg_pool2d(decoder.encode(px), s))  # (b, C, s, s)
        z, y = torch.cat(zs), torch.cat(ys)
        n_exact, n_prior = len(z), 0
        if self._prior_table is not None:  # add (prior-drawn embedding, its image's target) pairs
            table, has = self._prior_table
            keep = has[idx]
            rows = torch.tensor(idx)[keep]
            K = table.shape[1]
            z = torch.cat([z, table[rows].reshape(-1, table.shape[-1])])
            y = torch.cat([y, y[keep].repeat_interleave(K, dim=0)])
            n_prior = len(rows) * K
        # The unconditional input (zero embedding, the guidance's other branch) gets the mean image
        # as its layout, what a regression over all images gives it; fitted explicitly, as a mixture
        # would otherwise hand it one arbitrary head, never trained (1% of the rows, at least 8).
        n_real = len(z)
        n_zero = max(8, n_real // 100)
        z = torch.cat([z, z.new_zeros(n_zero, z.shape[1])])
        y = torch.cat([y, y.mean(0, keepdim=True).expand(n_zero, *y.shape[1:])])
        opt = torch.optim.AdamW(decoder.coarse.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for _ in tqdm(range(steps), desc="coarse layout: fitting", disable=not self.show_progress, leave=False):
            rows = torch.randint(0, len(z), (min(batch, len(z)),), generator=gen)
            loss, _ = coarse_loss(decoder.coarse_layouts(z[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            z, y = z[:n_real], y[:n_real]
            mse = sum(F.mse_loss(decoder.coarse_image(z[i:i + batch]).float(), y[i:i + batch], reduction="sum").item()
                      for i in range(0, len(z), batch)) / y.numel()
            base = F.mse_loss(y.mean(0, keepdim=True).expand_as(y), y).item()
        if self.is_main:
            extra = f" + {n_prior} prior-drawn embeddings" if n_prior else ""
            print(f"genvl: coarse layout path ({s}x{s}) fitted on {n_exact} images{extra} in {steps} steps: "
                  f"MSE {mse:.4f} (the mean image: {base:.4f})")
        self.coarse_fit = {"images": n_exact, "prior_samples": n_prior, "steps": steps, "mse": mse, "mean_image_mse": base}

    @torch.no_grad()
    def _draw_prior_samples(self, dataset, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``prior_samples`` K embeddings per image drawn by the prior of ``--init`` from the
        image's captions (K distinct caption variants where it has as many, else repeats), with
        the sampling settings recommended for that model: what the layout path sees at text-to-image
        time, which lies off the image embeddings it is otherwise fitted on. The draws are kept in
        the run folder (:data:`PRIOR_SAMPLES_FILE`) and read back by a resumed or repeated run whose
        prior weights, settings, seed and captions are the same.

        Returns ((N, K, D) embeddings by dataset index, (N,) bool: the rows drawn: those with a
        non-empty caption).
        """
        from tqdm.auto import tqdm

        from genvl.sampling.unclip import sample_prior

        prior, opts = self._prior
        K, N, D = self.prior_samples, len(dataset), self.clip.config.embed_dim
        crng = random.Random(f"prior-samples:{self.cfg.seed}")
        pairs = []  # (dataset index, caption)
        for j in range(N):
            variants = [v for v in _variants(dataset, j) if v.strip()]
            if not variants:
                continue
            chosen = crng.sample(variants, K) if len(variants) >= K else [crng.choice(variants) for _ in range(K)]
            pairs += [(j, text) for text in chosen]
        table, has = torch.zeros(N, K, D), torch.zeros(N, dtype=torch.bool)
        if not pairs:
            return table, has
        key = _prior_samples_key(prior, opts, K, N, D, self.cfg.seed, pairs)
        path = self.run_dir / PRIOR_SAMPLES_FILE if self.run_dir is not None else None
        cached = _read_prior_samples(path, key) if path is not None else None
        if cached is not None:
            if self.is_main:
                print(f"genvl: {len(pairs)} prior-drawn embeddings read from {path} (same prior, settings and captions)")
            return cached
        device = self.clip.device
        prior.to(device)
        gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
        zs = []
        bar = tqdm(total=len(pairs), desc="prior samples", disable=not self.show_progress, leave=False)
        text_log = logging.getLogger("genvl.tokenizers.text")  # captions cut to the text tower: counted, told once
        cut = _Counter()
        text_log.addFilter(cut)
        try:
            for i in range(0, len(pairs), batch):
                texts = [t for _, t in pairs[i:i + batch]]
                zs.append(sample_prior(prior, self.clip, self.tokenizer, texts, generator=gen, **opts).float().cpu())
                bar.update(len(texts))
        finally:
            text_log.removeFilter(cut)
            bar.close()
        prior.cpu()
        z = torch.cat(zs).view(-1, K, D)  # pairs are image-major, K per image
        rows = torch.tensor([j for j, _ in pairs[::K]])
        table[rows], has[rows] = z, True
        if self.is_main:
            print(f"genvl: {len(pairs)} embeddings drawn by the prior "
                  f"({opts['steps']} steps, guidance {opts['guidance']}, {opts['scheduler']}) for {len(rows)} images"
                  + (f"; {cut.count} of them from captions cut to the text tower's length" if cut.count else ""))
            if path is not None:
                _write_prior_samples(path, key, table, has)
        return table, has

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
        if not self.cache_inputs or self.text or index is None:
            return self.clip.encode_image(px).float(), decoder.encode(px)
        if self._cache is None:
            self._cache = EncodingCache(len(self.dataset))
        if decoder.vae is None:
            (z,) = self._cache.lookup(index, lambda rows: (self.clip.encode_image(px[rows]).float(),))
            return z, decoder.encode(px)
        return self._cache.lookup(index, lambda rows: (self.clip.encode_image(px[rows]).float(), decoder.encode(px[rows])))

    def loss(self, model, batch):
        px = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]
        B = px.shape[0]
        decoder = getattr(model, "module", model)  # DDP wraps it; encode is the decoder's own
        with torch.no_grad():
            z, x0 = self._inputs(decoder, px, batch.get("index"))  # (B, D), (B, C, s, s)
            states = mask = None
            if self.text:
                _, states, mask = self._condition(px, batch.get("input_ids"), batch.get("attention_mask"))
            z = z * (~batch["drop"]).to(z.dtype)[:, None]  # zeros = unconditional
            if self._prior_table is not None:  # each embedding is one of K+1 equally likely: the image's or a prior draw
                z = self._mix_prior_samples(z, batch["index"], ~batch["drop"])
            if states is not None:
                mask = mask * (~batch["text_drop"]).to(mask.dtype)[:, None]  # (B, L)
        if self.coarse_only:  # the layout path alone: its regression on the conditioned samples
            keep = ~batch["drop"]
            coarse = model(x0, None, z, states, mask, coarse_only=True)  # CoarseLayouts (B, K, C, c, c)
            target = F.adaptive_avg_pool2d(x0, decoder.config.coarse_size)
            if not keep.any():
                return coarse.layouts.sum() * 0.0, {}
            loss, mse = coarse_loss(_rows(coarse, keep), target[keep])
            return loss, {"coarse_mse": mse.item()}
        noise = torch.randn_like(x0)  # (B, C, s, s)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=px.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        coarse_path = decoder.coarse is not None
        out = model(x_t, t, z, states, mask, raw=True, return_coarse=coarse_path)
        if coarse_path:
            out, coarse = out
        loss = diffusion_loss(out, x0, noise, t, self.scheduler.alphas_cumprod, decoder.config.parameterization,
                              self.weighting, self.snr_gamma)
        logs = {"cond_frac": 1.0 - batch["drop"].float().mean().item()}
        if coarse_path:
            keep = ~batch["drop"]  # the unconditional samples' coarse image is free (a learned mean)
            target = F.adaptive_avg_pool2d(x0, decoder.config.coarse_size)
            if keep.any():
                aux, mse = coarse_loss(_rows(coarse, keep), target[keep])
                logs["coarse_mse"] = mse.item()
                if self.coarse_weight:
                    loss = loss + self.coarse_weight * aux
        return loss, logs

    def _mix_prior_samples(self, z: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Replace each kept row's embedding, with probability K / (K + 1), by one of its K prior draws."""
        table, has = self._prior_table
        K = table.shape[1]
        index = index.cpu()
        pick = torch.randint(0, K + 1, (len(index),))  # K = the image's own embedding
        swap = has[index] & (pick < K) & keep.cpu()
        if not swap.any():
            return z
        z = z.clone()
        z[swap.to(z.device)] = table[index[swap], pick[swap]].to(z.device, z.dtype)
        return z

    @torch.no_grad()
    def reconstruct(self, decoder: Decoder, pixels: torch.Tensor, texts: list[str] | None = None,
                    steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
        """Decode images from their CLIP embeddings with a short DDIM loop (no guidance).

        Args:
            decoder: the (unwrapped) decoder.
            pixels: (n, 3, S, S) images in [-1, 1].
            texts: their captions (used when the decoder is text-conditioned).
            steps: DDIM steps.
            seed: seed of the starting noise.

        Returns:
            (n, 3, S, S) reconstructions in [-1, 1].
        """
        device = decoder.device
        pixels = pixels.to(device)
        n = pixels.shape[0]
        ids = mask = None
        if self.text:
            enc = encode_texts(self.tokenizer, texts, max_length=self.text_len)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        z, states, tmask = self._condition(pixels, ids, mask)
        scheduler = decoder.make_scheduler("ddim")
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *decoder.sample_shape, generator=g).to(device) * scheduler.init_noise_sigma  # x_T
        for t in scheduler.timesteps:
            tt = t.to(device).long().expand(n)  # (n,)
            eps = decoder(x, tt, z) if states is None else decoder(x, tt, z, states, tmask)
            x = scheduler.step(eps, t, x).prev_sample
        return decoder.decode(x)

    def sample(self, model, path, step):
        """Top row: fixed training images; bottom row: their reconstructions from CLIP embeddings."""
        was_training = model.training
        model.eval()
        try:
            recon = self.reconstruct(model, self.fixed_pixels, self.fixed_texts, seed=self.cfg.seed)
        finally:
            model.train(was_training)
        return _save_grid([self.fixed_pixels, recon.cpu()], path)


class SuperResTask(Task):
    """Super-resolution: predict the noise of a noised high-res image given its low-res version.

    ``model`` recipe keys: ``size`` (tiny | small | base) and overrides of
    :class:`~genvl.models.decoder.SuperResConfig`. ``image_size`` comes from ``data.image_size``;
    ``low_res_size`` defaults to it divided by the size's upscale factor (tiny / small 2x, base 4x).
    ``loss_weighting`` and ``snr_gamma`` as in :class:`DecoderTask`. ``train_crop``: train on random
    crops of this many pixels (aligned to the upscale factor; a convolutional upsampler only), about
    (image_size / train_crop)^2 times cheaper per step; sampling still works on the whole image.
    """

    model_config = SuperResConfig
    recipe_keys = {"size": str, "snr_gamma": float, "loss_weighting": str, "train_crop": int}
    stage = "sr"
    component = "sr"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scheduler = None
        self.snr_gamma = SNR_GAMMA
        self.weighting = "min-snr"
        self.fixed_pixels = None
        self.train_crop = 0

    def build(self, dataset, init, tokenizer=None) -> SuperRes:
        S = self.cfg.data.image_size
        if init is not None and (init.path / init.meta.get("tokenizer", "tokenizer")).is_dir():
            self.tokenizer = tokenizer or init.tokenizer()  # kept so the released directory stays complete
        overrides = dict(self.cfg.model)
        size = overrides.pop("size", "tiny")
        self.snr_gamma = _pop_snr_gamma(overrides)
        self.weighting = _pop_weighting(overrides)
        self.train_crop = int(overrides.pop("train_crop", 0) or 0)
        if init is not None and init.has("sr"):
            model = init.load("sr")
            if model.config.image_size != S:
                raise ConfigError(
                    f"data.image_size is {S} but the super-resolution model in {init.path} "
                    f"works at {model.config.image_size} px"
                )
        else:
            if "image_size" in overrides and overrides.pop("image_size") != S:
                raise ConfigError(f"bad super-resolution model config: model.image_size is fixed by data.image_size ({S})")
            if size not in SUPERRES_SIZES:
                raise ConfigError(f"bad super-resolution model config: unknown size {size!r}; known: {', '.join(SUPERRES_SIZES)}")
            table = SUPERRES_SIZES[size]
            overrides.setdefault("low_res_size", max(1, S * table.low_res_size // table.image_size))
            try:
                scfg = superres_config(size, image_size=S, **overrides)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad super-resolution model config: {e}") from None
            model = SuperRes(scfg)
        c = model.config
        factor = c.image_size // c.low_res_size
        if self.train_crop and not (0 < self.train_crop <= c.image_size and self.train_crop % factor == 0
                                    and c.image_size % c.low_res_size == 0 and c.attention_levels == 0):
            raise ConfigError(f"bad super-resolution recipe: model.train_crop {self.train_crop} must be a multiple of the "
                              f"upscale factor {factor} up to {c.image_size}, for a model without attention levels")
        self.scheduler = model.make_scheduler("ddpm")
        self.fixed_pixels, _ = _fixed_items(dataset)
        return model.train()

    def crop(self, pixels: torch.Tensor, size: int, factor: int) -> torch.Tensor:
        """A random ``size`` x ``size`` crop per image, its corner on the low-res grid (``factor`` px)."""
        B, _, H, W = pixels.shape
        ys = torch.randint(0, (H - size) // factor + 1, (B,)) * factor
        xs = torch.randint(0, (W - size) // factor + 1, (B,)) * factor
        return torch.stack([pixels[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])

    def collate(self, items: list[dict]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}  # (B, 3, S, S)

    def components(self, model):
        return {"sr": model}

    def low_res(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 3, size, size) area-downsampled."""
        return F.interpolate(pixels, size=(size, size), mode="area")

    def loss(self, model, batch):
        sr = getattr(model, "module", model)
        c = sr.config
        hi = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]
        B = hi.shape[0]
        factor = c.image_size // c.low_res_size
        if self.train_crop and self.train_crop < c.image_size:
            hi = self.crop(hi, self.train_crop, factor)  # (B, 3, crop, crop)
        lo = self.low_res(hi, hi.shape[-1] // factor)  # (B, 3, s, s) (of the crop)
        if c.max_aug_level > 0:
            aug = torch.randint(0, c.max_aug_level, (B,), device=hi.device)
            lo = self.scheduler.add_noise(lo, torch.randn_like(lo), aug)  # noise augmentation
        else:
            aug = torch.zeros(B, dtype=torch.long, device=hi.device)
        noise = torch.randn_like(hi)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=hi.device)
        x_t = self.scheduler.add_noise(hi, noise, t)
        out = model(x_t, t, lo, aug, raw=True)
        return diffusion_loss(out, hi, noise, t, self.scheduler.alphas_cumprod, c.parameterization,
                              self.weighting, self.snr_gamma), {}

    @torch.no_grad()
    def upscale(self, sr: SuperRes, low_res: torch.Tensor, steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
        """Upscale clean low-res images (augmentation level 0) with a short DDIM loop.

        Returns:
            (n, 3, S, S) in [-1, 1].
        """
        device = sr.device
        low_res = low_res.to(device)
        n, S = low_res.shape[0], sr.config.image_size
        aug = torch.zeros(n, dtype=torch.long, device=device)
        scheduler = sr.make_scheduler("ddim")
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, S, S, generator=g).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = sr(x, t.to(device).long().expand(n), low_res, aug)
            x = scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    def sample(self, model, path, step):
        """Rows: low-res input (nearest-upsampled), super-resolved, original."""
        S, s = model.config.image_size, model.config.low_res_size
        lo = self.low_res(self.fixed_pixels, s)
        was_training = model.training
        model.eval()
        try:
            up = self.upscale(model, lo, seed=self.cfg.seed).cpu()
        finally:
            model.train(was_training)
        shown = F.interpolate(lo, size=(S, S), mode="nearest")
        return _save_grid([shown, up, self.fixed_pixels], path)
