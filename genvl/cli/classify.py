"""``genvl classify IMAGE... --classes "a,b,c"``: zero-shot classification through :mod:`genvl.classify`."""

from __future__ import annotations

from pathlib import Path

from genvl.cli.common import (
    Formatter,
    limited,
    load_images,
    read_text,
    seed_arg,
    write_json,
)
from genvl.errors import GenvlError
from genvl.limits import MAX_CLASSES, MAX_SAMPLES
from genvl.runtime import (
    CLASSIFY_DEFAULTS,
    choose_device,
    classify_temperature,
    open_model,
)


def read_classes(args) -> list[str]:
    from genvl.limits import MAX_CLASSES

    if args.classes_file:
        p = Path(args.classes_file)
        if not p.is_file():
            raise GenvlError(f"classes file not found: {p}")
        if p.stat().st_size > 64 * 1024 * MAX_CLASSES:
            raise GenvlError(f"{p}: {p.stat().st_size:,} bytes is too large for a list of at most {MAX_CLASSES} "
                             "classes")
        classes = [line.strip() for line in read_text(p).splitlines() if line.strip()]
    elif args.classes is None:
        raise GenvlError("give the class names with --classes \"a,b,c\" or --classes-file FILE")
    else:
        classes = [c for c in args.classes.split(",")]
    if len(classes) > MAX_CLASSES:
        raise GenvlError(f"{len(classes)} classes is above genvl's limit of {MAX_CLASSES}; give at most {MAX_CLASSES}")
    return classes


def classify_options(args) -> dict:
    """Scoring settings shared by classify and evaluate zero-shot (checked before any model loads)."""
    from genvl.classify import parse_adaptive

    schedule, elimination = parse_adaptive(args.schedule) if getattr(args, "schedule", None) else (None, None)
    opts = {"samples": args.samples, "schedule": schedule, "elimination": elimination, "seed": args.seed}
    shortlist, shortlist_samples = getattr(args, "shortlist", None), getattr(args, "shortlist_samples", None)
    if shortlist is not None or shortlist_samples is not None:
        methods = [m.strip() for m in (getattr(args, "methods", None) or args.method).split(",")]
        if methods != ["cascade"]:
            raise GenvlError("--shortlist and --shortlist-samples apply to --method cascade only")
        opts.update(shortlist=shortlist, shortlist_samples=shortlist_samples)
    return opts


def cmd_classify(args) -> int:
    from genvl.classify import classify, expand_classes, load_classifier

    classes = read_classes(args)
    expand_classes(classes, args.template)  # check names and template before loading anything
    opts = classify_options(args)
    md = open_model(args.model, "classification")
    device = choose_device(args.device)
    clf = load_classifier(md, args.method, device=device, **opts)
    images = load_images(args.images, clf.image_size)
    res = classify(clf, images, classes, template=args.template,
                   temperature=classify_temperature(md, args.method, args.temperature))
    rows = []
    width = max(len(c) for c in res.classes)
    for path, probs in zip(args.images, res.probs.tolist()):
        best = max(range(len(probs)), key=probs.__getitem__)
        print(f"{path}: {res.classes[best]} ({probs[best]:.1%})")
        for c, p in sorted(zip(res.classes, probs), key=lambda t: -t[1]):
            print(f"  {c:<{width}}  {p:6.1%}")
        rows.append({"image": path, "prediction": res.classes[best], "probs": dict(zip(res.classes, probs))})
    print(f"method {args.method}: {res.evals_per_image:g} model evaluations per image, temperature {res.temperature:g}")
    extra = {}
    if hasattr(clf, "evals_breakdown"):  # the cascade: pixel and prior evaluations apart
        extra["evals"] = clf.evals_breakdown(len(classes))
        e = extra["evals"]
        print(f"  {e['pixel']:g} pixel-decoder + {e['prior']:g} prior evaluations per image; cost-weighted "
              f"{e['cost_weighted']:.3g} pixel-evaluation equivalents (a prior evaluation costs {e['prior_cost']:g})")
    if args.json:
        write_json(args, {"method": args.method, "evals_per_image": res.evals_per_image,
                           "temperature": res.temperature, **extra, "results": rows})
    return 0


# ----------------------------------------------------------------------------------------- parser
def add_shortlist_args(parser, prefix: str = "") -> None:
    """The cascade's options (``--method cascade``), shared by classify and evaluate zero-shot."""
    from genvl.runtime import CASCADE_DEFAULTS

    parser.add_argument("--shortlist", type=limited(MAX_CLASSES, "classes", lo=2), metavar="K",
                        help=f"{prefix}cascade: classes per image the prior keeps for the pixel decoder (default "
                        f"{CASCADE_DEFAULTS['shortlist']}); --samples / --schedule set the pixel stage (default "
                        f"--schedule {CASCADE_DEFAULTS['schedule']})")
    parser.add_argument("--shortlist-samples", type=limited(MAX_SAMPLES, "samples per class"), metavar="N",
                        help=f"{prefix}cascade: the prior's (t, noise) samples per class (default "
                        f"{CASCADE_DEFAULTS['prior_samples']})")


def add_parsers(sub) -> None:
    """Add ``classify`` to the subcommands ``sub``."""
    k = sub.add_parser("classify", help="zero-shot classify images", formatter_class=Formatter,
                       description="Zero-shot classification: each image against class names; prints probabilities.")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--model", help="model directory (default: the built-in demo)")
    k.add_argument("--classes", help="comma-separated class names, e.g. \"a cat,a dog\"")
    k.add_argument("--classes-file", help="file with one class name per line")
    k.add_argument("--template", help="prompt template with {} for the class name, e.g. \"a photo of a {}\"")
    k.add_argument("--method", choices=["clip", "diffusion", "prior", "ar", "cascade"],
                   default=CLASSIFY_DEFAULTS["method"],
                   help="scoring method; cascade: the prior shortlists the likeliest classes, the pixel decoder's "
                   "confidence race decides among them")
    k.add_argument("--samples", type=limited(MAX_SAMPLES, "samples per class"),
                   help="diffusion / prior: (t, noise) samples per class "
                   "(default 32 / 64)")
    k.add_argument("--schedule", help="diffusion / prior: adaptive elimination: \"confidence\" (racing on paired "
                   "confidence bounds, each image stops once decided; confidence:Z sets the bound width, default 2) "
                   "or samples:keep per stage, e.g. 8:5,32:1")
    add_shortlist_args(k)
    k.add_argument("--seed", type=seed_arg, default=CLASSIFY_DEFAULTS["seed"],
                   help="seed of the shared (t, noise) samples")
    k.add_argument("--temperature", type=float, help="softmax temperature (default: the model's fitted one, else "
                   "the method's default)")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    k.add_argument("--json", help="also write the results to this JSON file (an existing one is an error)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    k.set_defaults(func=cmd_classify)
