"""Build a classifier of any method from a model directory (used by the CLI and the benchmark)."""

from __future__ import annotations

from genvl.classify.montecarlo import Elimination, Schedule
from genvl.errors import GenvlError

#: The methods that score with one model each; ``supported_methods`` (and ``--methods all``) lists these.
BASE_METHODS = ("clip", "diffusion", "prior", "ar")
#: Every method ``load_classifier`` builds: the base ones and the cascade (prior shortlist + pixel decoder).
METHODS = BASE_METHODS + ("cascade",)

# The components each method needs.
REQUIRES: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "diffusion": ("clip", "prior", "decoder"),
    "prior": ("clip", "prior"),
    "ar": ("lm", "vqvae"),
    "cascade": ("clip", "prior", "decoder"),
}


def supported_methods(md, cascade: bool = False) -> list[str]:
    """The base methods a :class:`~genvl.checkpoint.ModelDir` has the components for (and the
    cascade too with ``cascade=True``: it combines the prior and diffusion methods, so it is not one
    of ``--methods all``)."""
    return [m for m in (METHODS if cascade else BASE_METHODS) if all(md.has(c) for c in REQUIRES[m])]


def load_classifier(md, method: str, device: str = "cpu", samples: int | None = None,
                    schedule: Schedule | None = None, seed: int = 0, batch_size: int | None = None,
                    prior_samples: int = 4, prior_steps: int = 25, elimination: Elimination | None = None,
                    t_range: tuple[int, int] | None = None, weighting: str | None = None,
                    shortlist: int | None = None, shortlist_samples: int | None = None,
                    prior_cost: float | None = None):
    """A scorer (``scores``, ``evals_per_image``, ``image_size``) for ``method`` from ``md``.

    Args:
        md: the model directory.
        method: clip | diffusion | prior | ar | cascade.
        device: where the models run.
        samples: (t, eps) pairs per class for diffusion (default 32) / prior (default 64) / the
            cascade's pixel stage (naive, when no ``schedule`` is given).
        schedule: adaptive elimination for diffusion / prior / the cascade's pixel stage (cascade
            default: ``CASCADE_DEFAULTS["schedule"]`` unless ``samples`` is given).
        seed: seed of the shared pairs (and of the prior samples that condition the decoder).
        batch_size: rows per forward (default: the method's).
        prior_samples, prior_steps: the prior draws that turn a class prompt into the decoder's condition.
        elimination: "top-k" (default) or a :class:`~genvl.classify.montecarlo.Confidence` rule for
            ``schedule``.
        t_range: diffusion and the cascade's pixel stage: [t_min, t_max) of the shared timesteps (default: all of them).
        weighting: diffusion and the cascade's pixel stage: "uniform" (default) | "min-snr"; prior: "x0" (default) | "eps" | "min-snr".
        shortlist: cascade: classes per image the prior keeps for the pixel stage (default
            ``CASCADE_DEFAULTS["shortlist"]``); refused for the other methods.
        shortlist_samples: cascade: the prior's (t, eps) pairs per class (default
            ``CASCADE_DEFAULTS["prior_samples"]``); refused for the other methods.
        prior_cost: cascade: prior / pixel seconds per evaluation for the cost-weighted count
            (default :data:`~genvl.classify.cascade.PRIOR_PIXEL_COST`).

    Raises:
        GenvlError: an unknown method, or a directory without the components it needs.
    """
    if method not in METHODS:
        raise GenvlError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    missing = [c for c in REQUIRES[method] if not md.has(c)]
    if missing:
        have = ", ".join(md.components) or "none"
        can = ", ".join(supported_methods(md, cascade=True)) or "none"
        raise GenvlError(f"--method {method} needs the {' and '.join(missing)} component(s); {md.path} has {have} "
                         f"(methods it supports: {can})")
    if method != "cascade" and (shortlist is not None or shortlist_samples is not None):
        raise GenvlError(f"--shortlist and --shortlist-samples apply to --method cascade, not --method {method}")
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

    if method == "cascade":
        from genvl.classify.cascade import CASCADE_DEFAULTS, PRIOR_PIXEL_COST, CascadeClassifier, check_shortlist
        from genvl.classify.montecarlo import parse_adaptive
        from genvl.classify.prior import PriorClassifier

        shortlist = check_shortlist(CASCADE_DEFAULTS["shortlist"] if shortlist is None else shortlist)
        if schedule is None and samples is None:
            schedule, elimination = parse_adaptive(str(CASCADE_DEFAULTS["schedule"]))
    decoder = md.load("decoder", device=device)
    cond = PriorConditioner(prior, clip, tok, text_width=getattr(decoder.config, "text_width", 0),
                            samples=prior_samples, steps=prior_steps, seed=seed)
    pixel = DiffusionClassifier(decoder, cond, samples=samples or 32, schedule=schedule, seed=seed,
                                elimination=elimination, t_range=t_range,
                                weighting=weighting or "uniform", **bs)
    if method == "diffusion":
        return pixel
    short = PriorClassifier(prior, clip, tok, samples=shortlist_samples or int(CASCADE_DEFAULTS["prior_samples"]),
                            seed=seed)
    return CascadeClassifier(short, pixel, shortlist=shortlist,
                             prior_cost=PRIOR_PIXEL_COST if prior_cost is None else prior_cost)
