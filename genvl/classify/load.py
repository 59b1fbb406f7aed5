"""Build a classifier of any method from a model directory (used by the CLI and the benchmark)."""

from __future__ import annotations

from genvl.classify.montecarlo import Elimination, Schedule
from genvl.errors import GenvlError

METHODS = ("clip", "diffusion", "prior", "ar")

# The components each method needs.
REQUIRES: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "diffusion": ("clip", "prior", "decoder"),
    "prior": ("clip", "prior"),
    "ar": ("lm", "vqvae"),
}


def supported_methods(md) -> list[str]:
    """The methods a :class:`~genvl.checkpoint.ModelDir` has the components for."""
    return [m for m in METHODS if all(md.has(c) for c in REQUIRES[m])]


def load_classifier(md, method: str, device: str = "cpu", samples: int | None = None,
                    schedule: Schedule | None = None, seed: int = 0, batch_size: int | None = None,
                    prior_samples: int = 4, prior_steps: int = 25, elimination: Elimination | None = None,
                    t_range: tuple[int, int] | None = None, weighting: str | None = None):
    """A scorer (``scores``, ``evals_per_image``, ``image_size``) for ``method`` from ``md``.

    Args:
        md: the model directory.
        method: clip | diffusion | prior | ar.
        device: where the models run.
        samples: (t, eps) pairs per class for diffusion (default 32) / prior (default 64).
        schedule: adaptive elimination for diffusion / prior.
        seed: seed of the shared pairs (and of the prior samples that condition the decoder).
        batch_size: rows per forward (default: the method's).
        prior_samples, prior_steps: the prior draws that turn a class prompt into the decoder's condition.
        elimination: "top-k" (default) or a :class:`~genvl.classify.montecarlo.Confidence` rule for
            ``schedule``.
        t_range: diffusion: [t_min, t_max) of the shared timesteps (default: all of them).
        weighting: diffusion: "uniform" (default) | "min-snr"; prior: "x0" (default) | "eps" | "min-snr".

    Raises:
        GenvlError: an unknown method, or a directory without the components it needs.
    """
    if method not in METHODS:
        raise GenvlError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    missing = [c for c in REQUIRES[method] if not md.has(c)]
    if missing:
        have = ", ".join(md.components) or "none"
        can = ", ".join(supported_methods(md)) or "none"
        raise GenvlError(f"--method {method} needs the {' and '.join(missing)} component(s); {md.path} has {have} "
                         f"(methods it supports: {can})")
    bs = {} if batch_size is None else {"batch_size": batch_size}
    if method == "clip":
        from genvl.classify.clip import CLIPClassifier

        clip = md.load("clip", device=device)
        clf = CLIPClassifier(clip, md.tokenizer(), device=device)
        clf.image_size = clip.config.image_size
        return clf
    if method == "ar":
        from genvl.classify.ar import ARClassifier

        return ARClassifier(md.load("lm", device=device), md.load("vqvae", device=device), md.tokenizer(), **bs)
    clip = md.load("clip", device=device)
    prior = md.load("prior", device=device)
    tok = md.tokenizer()
    if method == "prior":
        from genvl.classify.prior import PriorClassifier

        return PriorClassifier(prior, clip, tok, samples=samples or 64, schedule=schedule, seed=seed,
                               elimination=elimination, weighting=weighting or "x0", **bs)
    from genvl.classify.diffusion import DiffusionClassifier, PriorConditioner

    decoder = md.load("decoder", device=device)
    cond = PriorConditioner(prior, clip, tok, text_width=getattr(decoder.config, "text_width", 0),
                            samples=prior_samples, steps=prior_steps, seed=seed)
    return DiffusionClassifier(decoder, cond, samples=samples or 32, schedule=schedule, seed=seed,
                               elimination=elimination, t_range=t_range, weighting=weighting or "uniform", **bs)
