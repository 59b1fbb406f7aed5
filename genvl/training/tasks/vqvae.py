"""Training of the VQ-VAE image tokenizer (the image side of the autoregressive token LM).

``genvl train vqvae --data PATH --out DIR [--config demo-vqvae] [--init DIR]``

Loss per batch (pixels ``x`` in [-1, 1], reconstruction ``x̂``)::

    L = rec(x̂, x) + commit + codebook  [+ gan_weight * lambda * L_G + L_D   once step >= gan_start]

- ``rec``: mean absolute (``model.recon_loss: l1``, default) or squared (``mse``) error;
- ``commit`` = beta ||z - sg(e)||^2 and ``codebook`` = ||sg(z) - e||^2 (0 for the EMA quantizer),
  from :class:`~genvl.tokenizers.vqvae.VQVAE`;
- optional PatchGAN term (VQGAN, Esser et al. 2021, arXiv:2012.09841), on when ``model.gan_weight``
  > 0: generator loss ``L_G = -mean D(x̂)`` through the discriminator with detached weights, hinge
  discriminator loss ``L_D = (relu(1 - D(x)) + relu(1 + D(sg(x̂)))) / 2``. ``lambda`` is VQGAN's
  adaptive weight ``|grad rec| / |grad L_G|`` at the decoder's last layer (``model.gan_adaptive:
  true``, default) or 1. The discriminator sits beside the VQ-VAE in one
  :class:`~genvl.tokenizers.vqvae.AdversarialVQVAE`, so the trainer's single optimizer steps both;
  detaching keeps each term's gradient on its own side. No perceptual loss (it would need
  downloaded VGG weights).

Logged besides the loss: ``rec``, ``commit``, ``codebook``, ``psnr`` (of the training batch),
``perplexity`` (of the batch's codes), ``usage`` (fraction of the codebook used in the last
``usage_window`` batches), ``restarts`` (dead codes restarted so far) and, with the GAN on,
``g_loss``, ``d_loss``, ``gan_lambda``.

``--init DIR``: when DIR holds a ``vqvae`` it is finetuned (its architecture is kept; only
``beta``, ``ema_decay``, ``dead_code_steps`` and ``seed`` may be changed by the recipe). Other
components of DIR, and its tokenizer, are carried into ``--out``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from genvl.errors import ConfigError
from genvl.evaluation.reconstruction import psnr
from genvl.tokenizers.vqvae import VQVAE, AdversarialVQVAE, VQVAEConfig, PatchDiscriminator, vqvae_config
from genvl.training.previews import fixed_items, save_grid
from genvl.training.trainer import Task

RECON_LOSSES = ("l1", "mse")
# VQVAEConfig fields that change training behaviour but no tensor: a finetune may set them.
TUNABLE = ("beta", "ema_decay", "dead_code_steps", "seed")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss: ``-mean D(x̂)``."""
    return -fake_logits.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance ``|d rec / d W| / (|d L_G / d W| + 1e-4)`` at the decoder's last weight W (detached)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def recon_error(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``mse``) error of (B, 3, S, S) images."""
    if kind == "l1":
        return (recon.float() - target.float()).abs().mean()
    return (recon.float() - target.float()).pow(2).mean()


def _parts(model) -> tuple[VQVAE, AdversarialVQVAE | None]:
    """(the VQ-VAE, the adversarial wrapper or None) of a possibly DDP-wrapped training module."""
    m = getattr(model, "module", model)
    if isinstance(m, AdversarialVQVAE):
        return m.vq, m
    return m, None


class VQVAETask(Task):
    """VQ-VAE: reconstruct training images through a grid of discrete codes.

    ``model`` recipe keys: ``size`` (tiny | small | base) and overrides of
    :class:`~genvl.tokenizers.vqvae.VQVAEConfig` (``image_size`` comes from ``data.image_size``);
    ``recon_loss`` (l1 | mse, default l1); ``gan_weight`` (default 0 = no GAN), ``gan_start``
    (optimizer steps before the GAN term starts, default 0), ``gan_adaptive`` (default true),
    ``disc_channels`` (default 64), ``disc_layers`` (default 2).
    """

    model_config = VQVAEConfig
    recipe_keys = {"size": str, "recon_loss": str, "gan_weight": float, "gan_start": int, "gan_adaptive": bool,
                   "disc_channels": int, "disc_layers": int}
    stage = "vqvae"
    component = "vqvae"
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.recon_loss = "l1"
        self.gan_weight = 0.0
        self.gan_start = 0
        self.gan_adaptive = True
        self.step0 = 0  # the quantizer's train_steps when this run's model was built
        self.fixed_pixels = None  # (n, 3, S, S) first training images, for the sample grid

    def _pop_task_keys(self, overrides: dict) -> dict:
        try:
            self.recon_loss = str(overrides.pop("recon_loss", "l1"))
            self.gan_weight = float(overrides.pop("gan_weight", 0.0))
            self.gan_start = int(overrides.pop("gan_start", 0))
            self.gan_adaptive = bool(overrides.pop("gan_adaptive", True))
            disc = {"channels": int(overrides.pop("disc_channels", 64)), "layers": int(overrides.pop("disc_layers", 2))}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad vqvae model config: {e}") from None
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"bad vqvae model config: recon_loss must be one of {', '.join(RECON_LOSSES)}, "
                              f"got {self.recon_loss!r}")
        if self.gan_weight < 0 or self.gan_start < 0:
            raise ConfigError("bad vqvae model config: gan_weight and gan_start must be >= 0")
        return disc

    def build(self, dataset, init, tokenizer=None):
        S = self.cfg.data.image_size
        if init is not None and (init.path / init.meta.get("tokenizer", "tokenizer")).is_dir():
            self.tokenizer = tokenizer or init.tokenizer()  # carried so the released directory stays complete
        overrides = dict(self.cfg.model)
        size = overrides.pop("size", "tiny")
        disc = self._pop_task_keys(overrides)
        if "image_size" in overrides and overrides.pop("image_size") != S:
            raise ConfigError(f"bad vqvae model config: model.image_size is fixed by data.image_size ({S})")
        if init is not None and init.has("vqvae"):
            vq = self._finetune(init, overrides, S)
        else:
            try:
                vq = VQVAE(vqvae_config(size, image_size=S, **overrides))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad vqvae model config: {e}") from None
        self.step0 = int(vq.quantizer.train_steps.item())
        self.fixed_pixels, _ = fixed_items(dataset)
        model = vq
        if self.gan_weight > 0:
            try:
                model = AdversarialVQVAE(vq, PatchDiscriminator(disc["channels"], disc["layers"]))
            except ValueError as e:
                raise ConfigError(f"bad vqvae model config: {e}") from None
        return model.train()

    def _finetune(self, init, overrides: dict, S: int) -> VQVAE:
        vq = init.load("vqvae")
        c = vq.config
        if c.image_size != S:
            raise ConfigError(f"data.image_size is {S} but the vqvae in {init.path} works at {c.image_size} px")
        tuned = {}
        for key, value in overrides.items():
            if not hasattr(c, key):
                raise ConfigError(f"bad vqvae model config: unknown field {key!r}")
            if key in TUNABLE:
                tuned[key] = value
            elif getattr(c, key) != value:
                raise ConfigError(
                    f"bad vqvae model config: model.{key} is {value!r} but the vqvae in {init.path} has "
                    f"{getattr(c, key)!r} (a finetune keeps the architecture; may change: {', '.join(TUNABLE)})"
                )
        if tuned:
            try:
                new = VQVAE(replace(c, **tuned))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"bad vqvae model config: {e}") from None
            new.load_state_dict(vq.state_dict(), strict=True)
            vq = new
        return vq

    def collate(self, items: list[dict]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}  # (B, 3, S, S)

    def components(self, model):
        return {"vqvae": _parts(model)[0]}

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-D tensors nor on the codebook (its rows are normalised)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith("quantizer.embedding") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def optimizer_step(self, model) -> int:
        """Optimizer steps this run has taken before the current micro-batch."""
        vq, _ = _parts(model)
        return (int(vq.quantizer.train_steps.item()) - self.step0) // self.cfg.grad_accum

    def loss(self, model, batch):
        px = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]
        vq, adv = _parts(model)
        gan_on = adv is not None and self.optimizer_step(model) >= self.gan_start
        if adv is None:
            out, aout = model(px), None
        else:
            aout = model(px, gan_on)
            out = aout.vq
        rec = recon_error(out.recon, px, self.recon_loss)
        loss = rec + out.commit_loss + out.codebook_loss
        logs = {
            "rec": rec.item(), "commit": out.commit_loss.item(), "codebook": out.codebook_loss.item(),
            "psnr": psnr(out.recon, px).item(), "perplexity": out.perplexity.item(),
            "usage": vq.quantizer.usage(), "restarts": float(vq.quantizer.restarts_total.item()),
        }
        if aout is not None:
            if gan_on:
                g = generator_loss(aout.fake_logits_g)
                if self.gan_adaptive:
                    lam = adaptive_gan_weight(rec, g, vq.last_layer)
                else:
                    lam = torch.ones((), device=px.device)
                d = hinge_d_loss(aout.real_logits, aout.fake_logits_d)
                loss = loss + self.gan_weight * lam * g + d
                logs.update(g_loss=g.item(), d_loss=d.item(), gan_lambda=lam.item())
            else:
                loss = loss + aout.disc_anchor  # 0, but every discriminator parameter takes part (DDP)
        return loss, logs

    def sample(self, model, path, step):
        """Top row: fixed training images; bottom row: ``decode_codes(encode(x))``."""
        vq, _ = _parts(model)
        was_training = vq.training
        vq.eval()
        try:
            with torch.no_grad():
                recon = vq.reconstruct(self.fixed_pixels.to(vq.device)).cpu()
        finally:
            vq.train(was_training)
        return save_grid([self.fixed_pixels, recon], path)
