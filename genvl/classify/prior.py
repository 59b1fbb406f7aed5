"""Generative zero-shot classification with the diffusion prior, in CLIP embedding space.

The same estimator as :mod:`genvl.classify.diffusion`, on the image's CLIP embedding instead of
its pixels: x0 = the prior-normalised ``clip.encode_image(x)`` (D numbers instead of 3 H W), the
class condition = the prompt's CLIP text (pooled embedding + token states), as the prior is
trained. Each row is one prior forward on a D-vector: orders of magnitude cheaper than a UNet.

The error. The prior predicts x0, not epsilon. The default (``weighting="x0"``) is the plain x0
MSE, -E_{t,eps} ||x0 - x0_theta(x_t, t, c)||^2 summed over the D normalised dims, the prior's own
training loss (DALL-E 2 sec. 2.1). ``"eps"`` converts it to the epsilon error of the same
prediction, ||eps - eps_hat||^2 = SNR_t ||x0 - x0_hat||^2 (the ELBO's weighting under the simple
loss), which is dominated by the few nearly clean steps and so noisier; ``"min-snr"`` caps SNR_t
at 5 (min(SNR, 5) ||x0 - x0_hat||^2).
"""

from __future__ import annotations

import torch

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
from genvl.limits import MAX_SAMPLES, check_count

PRIOR_WEIGHTINGS = ("x0", "eps", "min-snr")


class PriorClassifier:
    """Zero-shot classification by the prior's x0 error (see the module docstring).

    Args:
        prior: the :class:`~genvl.models.prior.DiffusionPrior`.
        clip: the CLIP core (image embedding of the input, text of the classes).
        tokenizer: the CLIP's text tokenizer.
        samples: K shared (t, eps) pairs per class (naive estimator).
        schedule: optional adaptive elimination [(samples, keep), ...].
        elimination: "top-k" or a :class:`~genvl.classify.montecarlo.Confidence` rule (as for the
            pixel classifier).
        weighting: "x0" | "eps" | "min-snr".
        batch_size: (image, class, t) rows per prior forward.
        seed: seed of the shared pairs.
    """

    method = "prior"

    def __init__(self, prior, clip, tokenizer, samples: int = 64, schedule: Schedule | None = None,
                 weighting: str = "x0", batch_size: int = 1024, seed: int = 0,
                 elimination: Elimination | None = None):
        if weighting not in PRIOR_WEIGHTINGS:
            raise GenvlError(f"unknown prior weighting {weighting!r}; choose {', '.join(PRIOR_WEIGHTINGS)}")
        check_count("samples", samples, MAX_SAMPLES, what="samples per class")
        self.prior, self.clip, self.tokenizer = prior.eval(), clip.eval(), tokenizer
        self.samples, self.weighting, self.batch_size, self.seed = samples, weighting, batch_size, seed
        self.schedule = check_schedule(schedule) if schedule else None
        self.elimination = check_elimination(elimination)
        self.ledger = EvalLedger()
        self.scheduler = prior.make_scheduler("ddpm")
        self.image_size = clip.config.image_size
        self.last_evals: torch.Tensor | None = None

    def stages(self, num_classes: int) -> Schedule:
        return self.schedule or [(self.samples, num_classes)]

    def evals_per_image(self, num_classes: int) -> float:
        # prior rows; the one CLIP image-tower pass per image is not counted (as for clip's text).
        return evals_per_image(self.stages(num_classes), num_classes, self.elimination, self.ledger)

    def noise_pairs(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (K,) long, eps (K, D)."""
        return shared_pairs(num, (self.prior.config.embed_dim,), (0, self.prior.config.num_train_timesteps), self.seed)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], C prompts -> (N, C) scores -E w(t) ||x0 - x0_theta||^2."""
        C = len(prompts)
        stages = self.stages(C)
        row_error, weights, N = self.row_error(images, prompts, sum(n for n, _ in stages))
        scores, evals = adaptive_scores(N, C, stages, weights, row_error, self.batch_size, self.elimination)
        self.last_evals = evals
        self.ledger.add(C, evals)
        return scores

    @torch.no_grad()
    def row_error(self, images: torch.Tensor, prompts: list[str], num_pairs: int
                  ) -> tuple[RowError, torch.Tensor, int]:
        """(row_error, (K,) weights, N) over the first ``num_pairs`` shared pairs: one prior forward
        per call of R rows -> (R,) ||x0 - x0_theta||^2 (as :meth:`DiffusionClassifier.row_error`)."""
        from genvl.sampling.prior import check_prior_fits, encode_for_prior

        check_prior_fits(self.prior, self.clip)
        dev = next(self.prior.parameters()).device
        clip_dev = next(self.clip.parameters()).device
        z = self.clip.encode_image(images.float().to(clip_dev)).float().to(dev)  # (N, D) unit
        x0 = self.prior.normalize(z)  # (N, D) normalised diffusion space
        text = encode_for_prior(self.clip, self.tokenizer, self.prior, list(prompts))  # on the prior's device
        t, eps = self.noise_pairs(num_pairs)  # (K,), (K, D)
        a = self.scheduler.alphas_cumprod.double()[t]
        snr = a / (1 - a)
        weights = {"x0": torch.ones_like(a), "eps": snr, "min-snr": snr.clamp(max=5.0)}[self.weighting]  # (K,)
        eps, t_dev = eps.to(dev), t.to(dev)

        def row_error(n: torch.Tensor, c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            n, c, k = n.to(dev), c.to(dev), k.to(dev)
            noisy = self.scheduler.add_noise(x0[n], eps[k], t_dev[k])  # (R, D) x_t
            pred = self.prior(noisy, t_dev[k], text.embeds[c], text.token_states[c], text.attention_mask[c])  # (R, D)
            return (x0[n] - pred.float()).pow(2).sum(1)  # (R,)

        return row_error, weights, x0.shape[0]

    @torch.no_grad()
    def error_table(self, images: torch.Tensor, prompts: list[str], num_pairs: int) -> torch.Tensor:
        """(N, C, K) float64 unweighted errors of every image, class and one of the first K pairs
        (see :meth:`DiffusionClassifier.error_table`)."""
        row_error, _, N = self.row_error(images, prompts, num_pairs)
        return full_table(N, len(prompts), num_pairs, row_error, self.batch_size)
