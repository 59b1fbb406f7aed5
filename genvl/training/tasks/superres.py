"""Training of the super-resolution stage.

``genvl train sr --data PATH --out DIR [--init DIR]``: the super-resolution UNet learns
``data.image_size`` from ``low_res_size`` (area-downsampled), with the low-res image
noise-augmented at a random level in [0, ``max_aug_level``) (Cascaded Diffusion Models,
arXiv:2106.15282). It needs no CLIP; ``--init`` only carries the other components along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from genvl.errors import ConfigError
from genvl.models.superres import SUPERRES_SIZES, SuperRes, SuperResConfig, superres_config
from genvl.training.previews import SAMPLE_STEPS, fixed_items, save_grid
from genvl.training.recipes import take_options
from genvl.training.tasks.diffusion import SNR_GAMMA, check_weighting, diffusion_loss
from genvl.training.trainer import Task


@dataclass
class SuperResOptions:
    """The super-resolution stage's training options: ``model`` recipe keys beside
    :class:`~genvl.models.superres.SuperResConfig`'s fields (described in :class:`SuperResTask`)."""

    size: str = "tiny"
    snr_gamma: float = SNR_GAMMA
    loss_weighting: str = "min-snr"
    train_crop: int = 0


class SuperResTask(Task):
    """Super-resolution: predict the noise of a noised high-res image given its low-res version.

    ``model`` recipe keys (:class:`SuperResOptions`): ``size`` (tiny | small | base) and overrides of
    :class:`~genvl.models.superres.SuperResConfig`. ``image_size`` comes from ``data.image_size``;
    ``low_res_size`` defaults to it divided by the size's upscale factor (tiny / small 2x, base 4x).
    ``loss_weighting`` and ``snr_gamma`` as in :class:`~genvl.training.tasks.decoder.DecoderTask`. ``train_crop``: train on random
    crops of this many pixels (aligned to the upscale factor; a convolutional upsampler only), about
    (image_size / train_crop)^2 times cheaper per step; sampling still works on the whole image.
    """

    model_config = SuperResConfig
    options = SuperResOptions
    stage = "sr"
    component = "sr"
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scheduler = None
        self.weighting, self.snr_gamma = "min-snr", SNR_GAMMA  # model.loss_weighting, model.snr_gamma
        self.fixed_pixels = None
        self.train_crop = 0

    def build(self, dataset, init, tokenizer=None) -> SuperRes:
        S = self.cfg.data.image_size
        if init is not None and (init.path / init.meta.get("tokenizer", "tokenizer")).is_dir():
            self.tokenizer = tokenizer or init.tokenizer()  # kept so the released directory stays complete
        overrides = dict(self.cfg.model)  # SuperResConfig's fields once the options are taken out
        o = take_options(SuperResOptions, overrides)
        size = o.size
        self.weighting, self.snr_gamma = check_weighting(o.loss_weighting, o.snr_gamma)
        self.train_crop = int(o.train_crop or 0)
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
        self.fixed_pixels, _ = fixed_items(dataset)
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
        out = model(x_t, t, lo, aug, target="unet")
        return diffusion_loss(out, hi, noise, t, self.scheduler.alphas_cumprod, c.parameterization,
                              self.weighting, self.snr_gamma), {}

    @torch.no_grad()
    def upscale(self, sr: SuperRes, low_res: torch.Tensor, steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
        """Upscale clean low-res images (augmentation level 0; ``sample_superres``: DDIM).

        Returns:
            (n, 3, S, S) in [-1, 1].
        """
        from genvl.sampling.unclip import sample_superres

        return sample_superres(sr, low_res.to(sr.device), steps=steps, aug_level=0, scheduler="ddim",
                               generator=torch.Generator().manual_seed(seed))

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
        return save_grid([shown, up, self.fixed_pixels], path)
