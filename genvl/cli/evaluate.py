"""``genvl evaluate KIND``: retrieval, generation, reconstruction, zero-shot and interleaved figures
of a model directory (:mod:`genvl.evaluation`), printed, written to ``--json`` and, with ``--record``,
recorded in the model directory's card."""

from __future__ import annotations

from pathlib import Path

from genvl.cli.classify import add_shortlist_args, classify_options
from genvl.cli.common import (
    Formatter,
    fill_sample_defaults,
    limited,
    positive_int,
    read_text,
    seed_arg,
    write_json,
)
from genvl.errors import GenvlError
from genvl.limits import (
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    MAX_PRIOR_CANDIDATES,
    MAX_SAMPLES,
    MAX_STEPS,
)
from genvl.runtime import choose_device, classify_temperature, open_model


def cmd_evaluate(args) -> int:
    if args.kind == "zero-shot":
        return _evaluate_zero_shot(args)
    if args.kind == "generation":
        return _evaluate_generation(args)
    if args.kind == "reconstruction":
        return _evaluate_reconstruction(args)
    if args.kind == "interleaved":
        return _evaluate_interleaved(args)
    if args.kind != "retrieval":
        raise GenvlError(
            f"evaluate {args.kind} is not available in this version of genvl (available: retrieval, generation, "
            "reconstruction, zero-shot)"
        )
    from genvl.evaluation.embeddings import embed_pairs
    from genvl.evaluation.retrieval import chance_recall, retrieval_metrics

    md, device, clip, ds = _model_and_data(args, "clip", "an image-text dataset")
    if args.limit:
        import torch.utils.data as tud

        ds_eval = tud.Subset(ds, range(min(args.limit, len(ds))))
    else:
        ds_eval = ds
    n = len(ds_eval)
    img, txt = embed_pairs(clip, md.tokenizer(), ds_eval, batch_size=args.batch_size, device=device,
                           progress=not args.no_progress)
    captions = [ds.captions[i] for i in (ds_eval.indices if hasattr(ds_eval, "indices") else range(n))]
    metrics = retrieval_metrics(img, txt, captions=captions)  # identical captions: one group of matches
    print(f"retrieval on {n} pairs from {args.data} ({len(ds.skipped)} bad files skipped)")
    print(f"{'metric':<24} {'value':>8} {'chance':>8}")
    for k, v in metrics.items():
        chance = ""
        if "@" in k:
            chance = f"{chance_recall(n, int(k.split('@')[1])):8.2f}"
        print(f"{k:<24} {v:8.2f} {chance}")
    _save_evaluation(args, md, "retrieval", metrics, n)
    return 0


def _model_and_data(args, component: str, data_needed: str):
    """(model directory, device, its ``component`` loaded, ``--data`` opened at the component's image size)
    for ``evaluate retrieval`` / ``evaluate reconstruction``."""
    from genvl.data import open_image_text

    what = f"{args.kind} evaluation"
    if args.data is None:
        raise GenvlError(f"evaluate {args.kind} needs --data PATH ({data_needed})")
    md = open_model(args.model, what)
    md.require(component, purpose=what)
    device = choose_device(args.device)
    model = md.load(component, device=device)
    ds = open_image_text(args.data, image_size=model.config.image_size, progress=not args.no_progress)
    return md, device, model, ds


def _save_evaluation(args, md, kind: str, metrics: dict, n: int) -> None:
    """--json FILE gets the results; with --record the model directory's card gets them too."""
    from genvl.checkpoint import record_metrics

    result = {"kind": kind, "model": str(md.path), "data": str(args.data), "n": n, "metrics": metrics}
    if args.json:
        write_json(args, result)
    if args.record:
        record_metrics(md.path, kind, metrics, {"data": str(args.data), "n": n})


def _evaluate_reconstruction(args) -> int:
    """PSNR, codebook usage and perplexity of the model's VQ-VAE on held-out images."""
    from genvl.evaluation.reconstruction import evaluate_reconstruction

    md, _, vq, ds = _model_and_data(args, "vqvae", "held-out images")
    n = min(args.limit, len(ds)) if args.limit else len(ds)
    metrics = evaluate_reconstruction(vq, ds, batch_size=args.batch_size, limit=n, progress=not args.no_progress)
    print(f"reconstruction on {n} images from {args.data} ({len(ds.skipped)} bad files skipped); "
          f"{vq.tokens_per_image} codes per image, codebook {vq.config.codebook_size}")
    print(f"{'metric':<16} {'value':>10}")
    for k, v in metrics.items():
        print(f"{k:<16} {v:10.4g}")
    _save_evaluation(args, md, "reconstruction", metrics, n)
    return 0


def _evaluate_zero_shot(args) -> int:
    """Accuracy, per-class accuracy, confusion, evaluations per image, time and ECE on a labelled folder."""
    import time

    import torch

    from genvl.checkpoint import record_metrics
    from genvl.classify import (
        cross_fit_temperature,
        expand_classes,
        load_classifier,
        supported_methods,
        zero_shot_metrics,
    )
    from genvl.data.labelled import open_labelled

    if args.data is None:
        raise GenvlError("evaluate zero-shot needs --data DIR (a labelled folder: DIR/CLASS_NAME/*.png)")
    opts = classify_options(args)
    md = open_model(args.model, "zero-shot evaluation")
    if args.methods:
        methods = supported_methods(md) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
        if not methods:
            raise GenvlError(f"{md.path} supports no zero-shot method (it has: {', '.join(md.components) or 'none'})")
    else:
        methods = [args.method]
    device = choose_device(args.device)
    classifiers = {m: load_classifier(md, m, device=device, **opts) for m in methods}  # fail early on any
    data = open_labelled(args.data, limit=args.limit)
    prompts = expand_classes(data.classes, args.template)
    n = len(data)
    print(f"zero-shot on {n} images, {len(data.classes)} classes from {args.data} ({len(data.skipped)} unreadable "
          f"skipped)")
    results = {}
    for m, clf in classifiers.items():
        images = data.pixels(clf.image_size)
        t0 = time.perf_counter()
        scores = torch.cat([clf.scores(images[i:i + args.batch_size], prompts) for i in range(0, n, args.batch_size)])
        seconds = time.perf_counter() - t0
        temp = classify_temperature(md, m, args.temperature)
        met = zero_shot_metrics(scores, data.labels, data.classes, temp)
        t_fit, ece_cal = cross_fit_temperature(scores, data.labels)
        if hasattr(clf, "evals_breakdown"):  # the cascade: pixel and prior evaluations apart, cost-weighted total
            met["evals"] = clf.evals_breakdown(len(prompts))
        results[m] = {**met, "evals_per_image": clf.evals_per_image(len(prompts)), "seconds": seconds,
                      "seconds_per_image": seconds / n, "temperature": temp, "temperature_fitted": t_fit,
                      "ece_calibrated": ece_cal}
    print(f"{'method':<10} {'accuracy':>8} {'ECE':>6} {'ECE(fit)':>8} {'T':>6} {'T fit':>7} {'evals/img':>9} "
          f"{'s/img':>8}")
    for m, r in results.items():
        print(f"{m:<10} {r['accuracy']:8.3f} {r['ece']:6.3f} {r['ece_calibrated']:8.3f} {r['temperature']:6.3g} "
              f"{r['temperature_fitted']:7.3g} {r['evals_per_image']:9g} {r['seconds_per_image']:8.4f}")
    width = max(len(c) for c in data.classes)
    for m, r in results.items():
        print(f"\n{m}: per-class accuracy and confusion (rows: true, columns: predicted)")
        for i, c in enumerate(data.classes):
            acc = r["per_class_accuracy"][c]
            cells = " ".join(f"{v:4d}" for v in r["confusion"][i])
            print(f"  {c:<{width}}  {'-' if acc is None else f'{acc:.3f}':>6}  {cells}")
    out = {"kind": "zero-shot", "model": str(md.path), "data": str(args.data), "n": n, "classes": data.classes,
           "prompts": prompts, "skipped": len(data.skipped), "device": device, "methods": results,
           "settings": {"samples": args.samples, "schedule": args.schedule, "seed": args.seed, "template": args.template,
                        "shortlist": args.shortlist, "shortlist_samples": args.shortlist_samples}}
    if args.json:
        write_json(args, out)
    if args.record:
        for m, r in results.items():
            values = {k: r[k] for k in ("accuracy", "ece", "ece_calibrated", "temperature_fitted", "evals_per_image",
                                        "seconds_per_image")}
            # the fitted temperature becomes the one genvl classify applies to this model (over the defaults)
            record_metrics(md.path, f"zero-shot {m}", values, {"data": str(args.data), "n": n},
                           temperatures={m: r["temperature_fitted"]})
    return 0


def _evaluate_generation(args) -> int:
    from genvl.checkpoint import open_model_dir, record_metrics
    from genvl.evaluation.generation import evaluate_generation, evaluate_heldout
    from genvl.sampling.io import make_grid, to_pil_images
    from genvl.sampling.unclip import UnclipComponents

    if not args.prompts and not args.data:
        raise GenvlError("evaluate generation needs --data HELDOUT (a captioned image set: its distinct captions are "
                         "the prompts) or --prompts FILE (one prompt per line)")
    if args.max_prompts < 2:
        raise GenvlError(f"--max-prompts must be at least 2, got {args.max_prompts}")
    prompts = None
    if args.prompts:
        pfile = Path(args.prompts)
        if not pfile.is_file():
            raise GenvlError(f"prompts file not found: {pfile}")
        prompts = list(dict.fromkeys(line.strip() for line in read_text(pfile).splitlines() if line.strip()))
        if len(prompts) < 2:
            raise GenvlError(f"{pfile}: need at least two distinct prompts, found {len(prompts)}")
    md = open_model(args.model, "generation evaluation")
    device = choose_device(args.device)
    fill_sample_defaults(args, md.meta.get("sampling", {}))
    comps = UnclipComponents.from_model_dir(md, device=device)
    judge = judge_tok = None
    if args.clip:
        jd = open_model_dir(args.clip)
        jd.require("clip", purpose="--clip")
        judge, judge_tok = jd.load("clip", device=device), jd.tokenizer()
    reference = None
    if args.data:
        import torch.utils.data as tud

        from genvl.data import open_image_text

        # real images at the size the model outputs (the super-resolved one when it has an sr stage)
        out_size = (comps.sr if comps.sr is not None else comps.decoder).config.image_size
        reference = open_image_text(args.data, image_size=out_size)
        if args.limit:
            reference = tud.Subset(reference, range(min(args.limit, len(reference))))
    kwargs = dict(judge=judge, judge_tokenizer=judge_tok, num_images=args.num_images, seed=args.seed,
                  progress=not args.no_progress, steps=args.steps, prior_steps=args.prior_steps,
                  guidance=args.guidance, prior_guidance=args.prior_guidance, scheduler=args.scheduler,
                  prior_candidates=args.prior_candidates, coarse_start=args.coarse_start, sr_steps=args.sr_steps)
    if prompts is None:
        res = evaluate_heldout(comps, reference, max_prompts=args.max_prompts, **kwargs)
        prompts = res["prompts"]
        source = f"the distinct captions of {args.data}"
    else:
        res = evaluate_generation(comps, prompts, reference=reference, **kwargs)
        source = str(args.prompts)
    images = res.pop("images")
    res["image_prompt_index"] = res["image_prompt_index"].tolist()
    metrics = {k: res[k] for k in ("clip_score", "prompt_retrieval_accuracy", "fd_clip") if k in res}
    print(f"generation on {len(prompts)} prompts ({source}) x {args.num_images} images "
          f"(judge: {args.clip or 'the model' + chr(39) + 's own CLIP'})")
    print(f"{'metric':<28} {'value':>8}")
    for k, v in metrics.items():
        print(f"{k:<28} {v:8.2f}")
    print(f"{'chance_prompt_retrieval':<28} {res['chance_prompt_retrieval']:8.2f}")
    print(f"{'prompts':<28} {len(prompts):8d}")
    if "reference_images" in res:
        print(f"{'reference_images':<28} {res['reference_images']:8d}")
    settings = {"steps": args.steps, "prior_steps": args.prior_steps, "guidance": args.guidance,
                "scheduler": args.scheduler,
                "prior_guidance": args.prior_guidance, "prior_candidates": args.prior_candidates, "seed": args.seed,
                "num_images": args.num_images}
    if args.coarse_start < 1.0:
        settings["coarse_start"] = args.coarse_start
    if comps.sr is not None:
        settings["sr_steps"] = args.sr_steps
    result = {"kind": "generation", "model": str(md.path), "judge": args.clip or "own", "reference": args.data,
              "prompt_source": "file" if args.prompts else "data", **res, "prompts": prompts, "metrics": metrics,
              "settings": settings}
    if args.json:
        from genvl.sampling.io import output_path

        write_json(args, result)
        grid = output_path(Path(args.json).with_suffix(".png"), args.overwrite)  # a new name if taken (printed)
        make_grid(to_pil_images(images), ncols=args.num_images).save(grid)
        print(f"samples: {grid}")
    if args.record:
        record_metrics(md.path, "generation", metrics, {"data": args.data or "", "n": len(images),
                                                         "prompts": len(prompts), "judge": args.clip or "own",
                                                         "settings": settings})
    return 0


def _evaluate_interleaved(args) -> int:
    """Regression error of the interleaved LM on held-out caption -> image pairs (see genvl.evaluation.interleaved)."""
    from genvl.data import open_image_text
    from genvl.evaluation.interleaved import evaluate_interleaved, recorded_holdout
    from genvl.sampling.interleaved import DEFAULT_IMAGE_GUIDANCE
    from genvl.training.tasks.interleaved import heldout

    if args.data is None:
        raise GenvlError("evaluate interleaved needs --data PATH (image-text pairs; the model's held-out ones are used)")
    md = open_model(args.model, "interleaved evaluation")
    md.require("interleaved", "clip", purpose="interleaved evaluation")
    device = choose_device(args.device)
    model, clip, tok = md.load("interleaved", device=device), md.load("clip", device=device), md.tokenizer()
    ds = open_image_text(args.data, image_size=clip.config.image_size, progress=not args.no_progress)
    fraction = recorded_holdout(md)
    indices = [i for i in range(len(ds)) if heldout(ds.image_name(i), fraction)] if fraction > 0 else list(range(len(ds)))
    if args.limit:
        indices = indices[: args.limit]
    if len(indices) < 2:
        raise GenvlError(f"{args.data}: {len(indices)} held-out pair(s) (model.holdout {fraction}); need at least two")
    guidance = args.guidance
    if guidance is None:
        guidance = float(md.meta.get("sampling", {}).get("image_guidance", DEFAULT_IMAGE_GUIDANCE))
    metrics = evaluate_interleaved(model, clip, tok, ds, indices, batch_size=args.batch_size, guidance=guidance,
                                   progress=not args.no_progress)
    split = f"held-out pairs (model.holdout {fraction:g})" if fraction > 0 else "pairs (the model holds none out)"
    print(f"interleaved regression on {len(indices)} {split} from {args.data}; image guidance {guidance:g}")
    print(f"{'metric':<16} {'value':>8}")
    for k, v in metrics.items():
        print(f"{k:<16} {v:8.4g}")
    metrics = {**metrics, "image_guidance": guidance, "holdout": fraction}
    _save_evaluation(args, md, "interleaved", metrics, len(indices))
    return 0


# ----------------------------------------------------------------------------------------- parser
DESCRIPTION = """\
Evaluate a model directory.
  retrieval:  image<->text R@1/5/10 on an image-text set (--data)
  generation: images for the distinct captions of a held-out set --data (at most
              --max-prompts) or for --prompts, scored by CLIP score, prompt-retrieval
              accuracy among the distinct prompts and (with --data) the Frechet distance in
              CLIP space to the real images of --data
  reconstruction: PSNR, codebook usage and code perplexity of the VQ-VAE on held-out
              images (--data)
  zero-shot:  accuracy, per-class accuracy, confusion, ECE, evaluations and time per image of
              --method (or --methods all) on a labelled folder --data DIR/CLASS_NAME/*.png
  interleaved: cosine / l2 between the image embedding the interleaved LM regresses after a
              caption and the real image's, on the pairs of --data its training held out
              (--guidance: guidance of the regressed embedding)
--record also stores the figures in the model directory and its card (a directory you own: genvl
never writes into its installed package, so the built-in demo is evaluated without --record)."""


def add_parsers(sub) -> None:
    """Add ``evaluate`` to the subcommands ``sub``."""
    e = sub.add_parser("evaluate", help="measure a model", formatter_class=Formatter,
                       description=DESCRIPTION)
    e.add_argument("kind", choices=["retrieval", "generation", "zero-shot", "reconstruction", "interleaved"])
    e.add_argument("--model", help="model directory (default: the built-in demo)")
    e.add_argument("--data", help="image-text dataset (retrieval; generation: the held-out set whose distinct "
                   "captions are the prompts unless --prompts, and whose images are the FD's reference)")
    e.add_argument("--prompts", help="generation: file with one prompt per line (default: the captions of --data)")
    e.add_argument("--max-prompts", type=int, default=64, metavar="N",
                   help="generation from --data: at most N distinct captions (more: a fixed seeded subset)")
    e.add_argument("--clip", help="generation: model directory of the CLIP that scores (default: the model's own)")
    e.add_argument("--num-images", type=limited(MAX_IMAGES, "images per prompt"), default=4,
                   help="generation: images per prompt")
    e.add_argument("--steps", type=limited(MAX_STEPS, "steps"), help="generation: decoder steps (default: the "
                   "model's, else 50)")
    e.add_argument("--prior-steps", type=limited(MAX_STEPS, "steps"), help="generation: prior steps (default: "
                   "model's, else 25)")
    e.add_argument("--guidance", type=float, help="generation: decoder guidance (default: model's, else 3)")
    e.add_argument("--prior-guidance", type=float, help="generation: prior guidance (default: model's, else 4)")
    e.add_argument("--prior-candidates", type=limited(MAX_PRIOR_CANDIDATES, "candidates per image"),
                   help="generation: prior samples per image, the closest to the prompt kept (default: model's, else 1)")
    e.add_argument("--scheduler", help="generation: ddpm, ddim or dpm++ (default: model's, else ddim)")
    e.add_argument("--coarse-start", type=float, metavar="F",
                   help="generation: start the decoder from its coarse layout image at this noise fraction "
                        "(1 = from pure noise; default: model's, else 1)")
    e.add_argument("--sr-steps", type=limited(MAX_STEPS, "steps"),
                   help="generation: super-resolution steps, with an sr stage (default: model's, else 25)")
    e.add_argument("--seed", type=seed_arg, default=0, help="generation: first seed (prompt i uses seed + i)")
    e.add_argument("--json", help="write the results to this JSON file (an existing one is an error)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--method", choices=["clip", "diffusion", "prior", "ar", "cascade"], default="clip",
                   help="zero-shot: scoring method (cascade: prior shortlist, then the pixel decoder)")
    e.add_argument("--methods", help="zero-shot: comma-separated methods, or 'all' (every method the model supports)")
    e.add_argument("--template", help="zero-shot: prompt template with {} for the class name")
    e.add_argument("--samples", type=limited(MAX_SAMPLES, "samples per class"),
                   help="zero-shot diffusion / prior: (t, noise) samples per class")
    e.add_argument("--schedule", help="zero-shot diffusion / prior: adaptive elimination, confidence[:Z] or "
                   "samples:keep stages, e.g. 8:5,32:1")
    add_shortlist_args(e, "zero-shot ")
    e.add_argument("--temperature", type=float, help="zero-shot: softmax temperature (default: model's / method's)")
    e.add_argument("--limit", type=positive_int, help="use only the first N pairs")
    e.add_argument("--batch-size", type=limited(MAX_BATCH_SIZE, "rows per batch"), default=64)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    e.add_argument("--record", action="store_true", help="also write the figures into the model directory's "
                   "genvl.json and card (not for the built-in demo, which is read-only)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)
