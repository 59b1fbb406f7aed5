"""Generative zero-shot classification with the pixel diffusion decoder.

Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier" (arXiv:2303.16203)::

    score(x, c) = - E_{t, eps} || eps - eps_theta(x_t, t, c) ||^2,   x_t = sqrt(a_t) x + sqrt(1 - a_t) eps

with ||.||^2 summed over the pixels and the expectation estimated with K shared (t, eps) pairs
(:mod:`genvl.classify.montecarlo`: same pairs for every class, adaptive elimination).

The class condition. genvl's decoder is conditioned on a CLIP *image* embedding, not on text, so a
class prompt first becomes an image embedding through the diffusion prior (as at sampling time):
:class:`PriorConditioner` samples ``samples`` embeddings per prompt with a fixed seed, averages
them and re-normalises to the unit sphere (the mean of a few draws is a less noisy "typical image
of the class" than one draw). A text-conditioned decoder (``text_width > 0``) also gets the
prompt's CLIP token states, as in training. Any callable ``prompts -> ClassConditions`` can stand
in for it (e.g. fixed embeddings in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genvl.classify.montecarlo import (
    Elimination,
    EvalLedger,
    RowError,
    Schedule,
    adaptive_scores,
    check_elimination,
    check_schedule,
    evals_per_image,
    full_table,
    shared_pairs,
)
from genvl.errors import GenvlError
from genvl.limits import MAX_BATCH_SIZE, MAX_SAMPLES, check_count, check_memory, unet_bytes


@dataclass
class ClassConditions:
    """The decoder's condition for each of C classes.

    Attributes:
        image_embeds: (C, D) unit CLIP image embeddings.
        text_states: (C, L, W) CLIP token states, or None (decoders without text conditioning).
        text_mask: (C, L) 1 on real tokens, or None.
    """

    image_embeds: torch.Tensor
    text_states: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


class PriorConditioner:
    """Class prompts -> decoder conditions through the diffusion prior (see the module docstring).

    Args:
        prior: the :class:`~genvl.models.prior.DiffusionPrior`.
        clip: the CLIP core conditioning the prior (and the decoder's text).
        tokenizer: the CLIP's text tokenizer.
        text_width: the decoder's ``text_width`` (0: no token states are passed).
        samples: prior samples averaged per prompt.
        steps: prior sampling steps (DDIM).
        guidance: prior classifier-free guidance.
        seed: the prior's noise seed (the same for every call: deterministic conditions).
    """

    def __init__(self, prior, clip, tokenizer, text_width: int = 0, samples: int = 4, steps: int = 25,
                 guidance: float = 4.0, seed: int = 0):
        self.prior, self.clip, self.tokenizer = prior, clip, tokenizer
        self.text_width, self.samples, self.steps, self.guidance, self.seed = text_width, samples, steps, guidance, seed

    def evals(self, num_classes: int) -> int:
        """Prior forwards per call (shared by all images): classes x samples x steps x (2 with guidance)."""
        return num_classes * self.samples * self.steps * (2 if self.guidance != 1.0 else 1)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> ClassConditions:
        from genvl.sampling.prior import encode_prompts, sample_prior

        C = len(prompts)
        g = torch.Generator().manual_seed(self.seed)
        z = sample_prior(self.prior, self.clip, self.tokenizer, prompts, num_images_per_prompt=self.samples,
                         steps=self.steps, guidance=self.guidance, scheduler="ddim", generator=g)  # (C * n, D)
        z = F.normalize(z.float().view(C, self.samples, -1).mean(1), dim=-1)  # (C, D)
        if not self.text_width:
            return ClassConditions(image_embeds=z)
        text = encode_prompts(self.clip, self.tokenizer, prompts)
        return ClassConditions(image_embeds=z, text_states=text.token_states, text_mask=text.attention_mask)


WEIGHTINGS = ("uniform", "min-snr")



def timestep_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str | Callable,
                     gamma: float = 5.0) -> torch.Tensor:
    """(K,) weight of each pair's error.

    ``uniform``: 1 (Li et al.'s choice: the simple loss). ``min-snr``: min(SNR_t, gamma) / SNR_t, the
    Min-SNR-gamma weighting of the epsilon loss (Hang et al. 2023), which the decoder trains with:
    down-weights the nearly clean steps, whose error carries little class information. A callable
    maps (K,) timesteps to (K,) weights.
    """
    if callable(weighting):
        return weighting(t).double()
    a = alphas_cumprod.double()[t]
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "min-snr":
        snr = a / (1 - a)
        return snr.clamp(max=gamma) / snr
    raise GenvlError(f"unknown timestep weighting {weighting!r}; choose {', '.join(WEIGHTINGS)} or a function")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DiffusionClassifier:
    """Zero-shot classification by the decoder's denoising error (see the module docstring).

    Args:
        decoder: an epsilon-returning :class:`~genvl.models.decoder.Decoder` (or any module with its
            forward signature, ``config.image_size`` and ``make_scheduler``).
        conditioner: prompts -> :class:`ClassConditions` (usually a :class:`PriorConditioner`).
        samples: K, the (t, eps) pairs per class of the naive estimator (used when ``schedule`` is None).
        schedule: adaptive elimination [(samples, keep), ...], e.g. [(8, 5), (32, 2), (64, 1)].
        elimination: how a schedule eliminates classes: "top-k" (keep the ``keep`` best after each
            stage) or a :class:`~genvl.classify.montecarlo.Confidence` rule ("confidence": z = 2).
        weighting: "uniform" | "min-snr" | callable (K,) timesteps -> (K,) weights.
        t_range: [t_min, t_max) of the timesteps (default: the whole schedule). On the demo model
            a middle range ([50, 900) of 1000) helped neither the naive estimator nor the confidence
            rule at equal evaluations (benchmarks/results/zero_shot_emoji10.json).
        batch_size: (image, class, t) rows per decoder forward.
        seed: seed of the shared pairs.
        device: where the decoder runs (default: its own device).
    """

    method = "diffusion"

    def __init__(self, decoder: nn.Module, conditioner: Callable[[list[str]], ClassConditions], samples: int = 32,
                 schedule: Schedule | None = None, weighting: str | Callable = "uniform",
                 t_range: tuple[int, int] | None = None, batch_size: int = 64, seed: int = 0, device=None,
                 elimination: Elimination | None = None):
        check_count("samples", samples, MAX_SAMPLES, what="samples per class")
        check_count("batch_size", batch_size, MAX_BATCH_SIZE, what="rows per forward")
        self.decoder = decoder.eval()
        self.conditioner = conditioner
        self.schedule = check_schedule(schedule) if schedule else None
        self.elimination = check_elimination(elimination)
        self.ledger = EvalLedger()
        self.samples = samples
        self.weighting = weighting
        T = decoder.config.num_train_timesteps
        self.t_range = tuple(t_range) if t_range else (0, T)
        if not 0 <= self.t_range[0] < self.t_range[1] <= T:
            raise GenvlError(f"t_range must satisfy 0 <= t_min < t_max <= {T}, got {self.t_range}")
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device) if device is not None else next(decoder.parameters()).device
        self.scheduler = decoder.make_scheduler("ddpm")  # its add_noise is the training forward process
        self.image_size = decoder.config.image_size
        S = self.image_size
        # (3, S, S) pixels or (C, s, s) latents; encode: pixels -> clean samples (identity for pixels)
        self.sample_shape = tuple(getattr(decoder, "sample_shape", (3, S, S)))
        self._encode = getattr(decoder, "encode", None) or (lambda px: px)
        self._check_memory()
        self.last_evals: torch.Tensor | None = None  # (N,) rows spent per image by the last call
        self._cond: ClassConditions | None = None
        self._cond_key: tuple[str, ...] | None = None

    def _check_memory(self) -> None:
        """Refuse settings whose shared noise (K samples) and decoder batch are estimated not to fit."""
        K = sum(n for n, _ in self.schedule) if self.schedule else self.samples
        cfg = self.decoder.config
        numel = 1
        for d in self.sample_shape:
            numel *= int(d)
        need = 4 * K * numel + unet_bytes(list(getattr(cfg, "block_out_channels", [64])), int(self.sample_shape[-1]),
                                          int(getattr(cfg, "layers_per_block", 2)),
                                          int(getattr(cfg, "attention_head_dim", 64)), self.batch_size)
        check_memory(need, f"diffusion scoring with {K} samples per class and batches of {self.batch_size}",
                     "use fewer --samples or a smaller --batch-size", self.device)

    def stages(self, num_classes: int) -> Schedule:
        return self.schedule or [(self.samples, num_classes)]

    def evals_per_image(self, num_classes: int) -> float:
        """Decoder rows per image: exact for top-k, the measured mean for a confidence rule."""
        return evals_per_image(self.stages(num_classes), num_classes, self.elimination, self.ledger)

    def noise_pairs(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared pairs: t (K,) long, eps (K, *sample_shape) (deterministic in ``seed``)."""
        return shared_pairs(num, self.sample_shape, self.t_range, self.seed)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], C prompts -> (N, C) scores -E||eps - eps_theta||^2."""
        return self.scores_with_conditions(images, self.conditions(prompts))

    def conditions(self, prompts: list[str]) -> ClassConditions:
        """The C prompts' decoder conditions, computed once per prompt list and reused."""
        key = tuple(prompts)
        if self._cond_key != key:
            self._cond, self._cond_key = self.conditioner(list(prompts)), key
        return self._cond

    def use_conditions(self, prompts: list[str], cond: ClassConditions) -> None:
        """Score ``prompts`` with the given conditions from now on (e.g. ones computed before and
        stored), instead of running the conditioner."""
        if cond.image_embeds.shape[0] != len(prompts):
            raise GenvlError(f"{cond.image_embeds.shape[0]} class conditions for {len(prompts)} prompts")
        self._cond, self._cond_key = cond, tuple(prompts)

    @torch.no_grad()
    def scores_with_conditions(self, images: torch.Tensor, cond: ClassConditions) -> torch.Tensor:
        """As :meth:`scores`, with the C class conditions given."""
        C = cond.image_embeds.shape[0]
        stages = self.stages(C)
        K = sum(n for n, _ in stages)
        row_error, weights, N = self.row_error(images, cond, K)
        scores, evals = adaptive_scores(N, C, stages, weights, row_error, self.batch_size, self.elimination)
        self.last_evals = evals
        self.ledger.add(C, evals)
        return scores

    @torch.no_grad()
    def row_error(self, images: torch.Tensor, cond: ClassConditions, num_pairs: int
                  ) -> tuple[RowError, torch.Tensor, int]:
        """The per-row error of :func:`~genvl.classify.montecarlo.adaptive_scores` over the first
        ``num_pairs`` shared pairs.

        Returns:
            row_error: (n_idx, c_idx, k_idx) (R,) long -> (R,) ||eps_k - eps_theta(x_t, t_k, c)||^2,
                one decoder forward of R rows.
            weights: (K,) float64 w(t_k).
            N: the number of images.
        """
        dev = self.device
        x0 = self._encode(_resize(images.float(), self.image_size).to(dev)).float()  # (N, C, s, s) clean samples
        t, eps = self.noise_pairs(num_pairs)  # (K,), (K, C, s, s)
        weights = timestep_weights(self.scheduler.alphas_cumprod, t, self.weighting)  # (K,)
        eps, t_dev = eps.to(dev), t.to(dev)
        z = cond.image_embeds.float().to(dev)  # (C, D)
        states = cond.text_states.float().to(dev) if cond.text_states is not None else None  # (C, L, W)
        mask = cond.text_mask.to(dev) if cond.text_mask is not None else None  # (C, L)
        dtype = getattr(self.decoder, "dtype", torch.float32)

        def row_error(n: torch.Tensor, c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            n, c, k = n.to(dev), c.to(dev), k.to(dev)
            e = eps[k]  # (R, C, s, s)
            noisy = self.scheduler.add_noise(x0[n], e, t_dev[k])  # (R, C, s, s) x_t
            pred = self.decoder(noisy.to(dtype), t_dev[k], z[c], states[c] if states is not None else None,
                                mask[c] if mask is not None else None)  # (R, C, s, s) epsilon
            return (e - pred.float()).pow(2).flatten(1).sum(1)  # (R,)

        return row_error, weights, x0.shape[0]

    @torch.no_grad()
    def error_table(self, images: torch.Tensor, cond: ClassConditions, num_pairs: int) -> torch.Tensor:
        """(N, C, K) float64 unweighted errors of every image, class and one of the first K shared
        pairs (N C K decoder rows). Replaying any schedule on it with
        :func:`~genvl.classify.montecarlo.table_row_error` gives exactly the scores (and evaluation
        counts) that :meth:`scores_with_conditions` would compute with that schedule and this seed."""
        row_error, _, N = self.row_error(images, cond, num_pairs)
        return full_table(N, cond.image_embeds.shape[0], num_pairs, row_error, self.batch_size)
