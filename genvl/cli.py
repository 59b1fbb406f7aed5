"""The ``genvl`` command line: a thin layer over the library's functions.

Every subcommand: exit status 0 on success, 2 on bad input with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from genvl import __version__
from genvl.errors import GenvlError
from genvl.limits import (
    MAX_BATCH_SIZE,
    MAX_DOC_IMAGES,
    MAX_FRAMES,
    MAX_IMAGES,
    MAX_NEW_TOKENS,
    MAX_PRIOR_CANDIDATES,
    MAX_SAMPLES,
    MAX_STEPS,
)

DEMO_DIR = Path(__file__).parent / "assets" / "demo"


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control or invisible characters escaped (``\\n``,
    ``\\u202e``), so that an error naming a file or a value stays one line and shows what it names."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")

    def _get_values(self, action, arg_strings):
        # argparse (before Python 3.13) drops a "--" given as an option's value (--seed=--) and
        # hands the option an empty list instead of an error.
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument")
        return super()._get_values(action, arg_strings)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Raw descriptions; "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _limited(hi: int, what: str, lo: int = 1):
    """An argparse type: an integer in [lo, hi], ``hi`` a limit of :mod:`genvl.limits` (checked before
    anything is allocated; the message names the limit)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {'a positive integer' if lo == 1 else f'an integer >= {lo}'}, "
                                             f"got {v}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"{v} is above genvl's limit of {hi} {what}; ask for at most {hi}")
        return v

    return parse


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {v}")
    return v


def _port(text: str) -> int:
    v = _positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a port must be in [1, 65535], got {v}")
    return v


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise GenvlError(f"--device {text}: no CUDA device is available (use --device cpu)")
    if text not in ("cpu", "mps") and not text.startswith("cuda"):
        raise GenvlError(f"--device must be auto, cpu, cuda[:N] or mps, got {text!r}")
    return text


def _model_dir(path: str | None, purpose: str):
    from genvl.checkpoint import open_model_dir

    if path is None:
        if not (DEMO_DIR / "genvl.json").is_file():
            raise GenvlError(
                f"no --model given and this install has no built-in demo model yet; {purpose} needs a model "
                "directory (train one: genvl train clip --data FOLDER --out DIR)"
            )
        path = str(DEMO_DIR)
    return open_model_dir(path)


# ----------------------------------------------------------------------------------------- sample
def _check_sample_args(args) -> None:
    """Cheap checks before any model loads."""
    if args.variations is None and args.interpolate is None:
        if args.prompt is None or not args.prompt.strip():
            raise GenvlError("empty prompt: give a text description, e.g. genvl sample \"a red heart\"")
    if any(g is not None and g < 0 for g in (args.guidance, args.prior_guidance)):
        raise GenvlError("guidance scales must be >= 0 (1 = no guidance)")
    if args.size is not None and args.size % 8:
        raise GenvlError(f"--size must be a multiple of 8, got {args.size}")
    if args.coarse_start is not None and not 0.0 < args.coarse_start <= 1.0:
        raise GenvlError(f"--coarse-start must be in (0, 1] (1 = from pure noise), got {args.coarse_start}")
    if args.coarse_start is not None and args.coarse_start < 1.0 and args.invert:
        raise GenvlError("--coarse-start and --invert do not go together: both choose where sampling starts")
    if args.strength is not None and args.image is None:
        raise GenvlError("--strength goes with --image (image-to-image)")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise GenvlError(f"--strength must be in [0, 1] (1 = plain text-to-image, 0 = the image), got {args.strength}")
    if args.image is not None and (args.method != "unclip" or args.variations or args.interpolate):
        raise GenvlError("--image (image-to-image) works with a prompt and --method unclip")
    if args.scheduler is not None and args.scheduler not in ("ddpm", "ddim", "dpm++"):
        raise GenvlError(f"unknown scheduler {args.scheduler!r}; choose ddpm, ddim or dpm++")


def _fill_sample_defaults(args, model_defaults: dict) -> None:
    """Options left unset take the model directory's recommended value, else the pipelines' defaults."""
    from genvl.pipelines.base import resolve_settings

    for key, value in resolve_settings(model_defaults, vars(args)).items():
        setattr(args, key, value)


def _write_images(images, args, meta: dict, stem: str) -> list[Path]:
    """PNG files with their settings in text chunks: one per image, or one grid with --grid."""
    from genvl.sampling.io import make_grid, output_path, reserve_path, save_png

    out = Path(args.out)
    if out.suffix.lower() == ".png":  # an existing file is kept: the image takes the next free name (printed)
        img = images[0] if len(images) == 1 else make_grid(images)
        return [save_png(img, output_path(out, args.overwrite), {**meta, "num_images": len(images)})]
    if args.grid and len(images) > 1:
        return [save_png(make_grid(images), reserve_path(out, f"{stem}-grid"), {**meta, "num_images": len(images)})]
    return [save_png(im, reserve_path(out, f"{stem}-{i}" if len(images) > 1 else stem), {**meta, "index": i})
            for i, im in enumerate(images)]


def _load_image_arg(path: str):
    from genvl.data import load_rgb

    if not Path(path).is_file():
        raise GenvlError(f"image not found: {path}")
    try:
        return load_rgb(path)
    except GenvlError as e:
        raise GenvlError(f"{path}: cannot read image ({e})") from None


def cmd_sample(args) -> int:
    if args.method == "interleaved":
        return _sample_interleaved(args)
    if args.prompt_file:
        raise GenvlError("--prompt-file works with --method interleaved")
    _check_sample_args(args)
    if args.method == "ar":
        return _sample_ar(args)
    if args.model is None and not (DEMO_DIR / "genvl.json").is_file():
        print(
            "genvl sample: no text-to-image model yet. The built-in demo model arrives with the "
            "trained text-to-image stages; until then pass --model DIR (a model directory with "
            "clip, prior and decoder, or a diffusers Kandinsky 2.2 / unCLIP directory). Nothing was written.",
            file=sys.stderr,
        )
        return 0
    if args.method != "unclip":
        raise GenvlError(f"--method {args.method} is not available in this version of genvl "
                         "(available: unclip, ar, interleaved)")
    device = _device(args.device)
    model_path = Path(args.model) if args.model else DEMO_DIR

    from genvl.sampling.external import detect_external

    if args.model and detect_external(model_path):
        return _sample_external(args, model_path, device)

    from genvl.pipelines import UnclipPipeline
    from genvl.sampling import unclip
    from genvl.sampling.io import slug

    pipe = UnclipPipeline.from_pretrained(_model_dir(args.model, "sampling"), device=device)
    pipe.name = str(model_path)
    given = {k: getattr(args, k) for k in ("steps", "guidance", "scheduler", "coarse_start")}
    common = dict(seed=args.seed, size=args.size, progress=not args.no_progress, **given)
    if args.variations:
        img = _load_image_arg(args.variations)
        out = pipe.variations(img, num_images=args.num_images, invert=args.invert, **common)
        meta = {**out.settings, "variations_of": args.variations}
        paths = _write_images(out.images, args, meta, f"variation-{slug(Path(args.variations).stem)}")
    elif args.interpolate:
        a, b = (_load_image_arg(x) if Path(x).is_file() else x for x in args.interpolate)
        out = pipe.interpolate(a, b, frames=args.frames, prior_steps=args.prior_steps,
                               prior_guidance=args.prior_guidance, **common)
        meta = {**out.settings, "interpolate": list(args.interpolate)}
        from genvl.sampling.io import make_grid, output_path, reserve_path, save_png

        target = Path(args.out)
        stem = f"interpolate-{slug(args.interpolate[0], 20)}-{slug(args.interpolate[1], 20)}"
        if target.suffix.lower() == ".gif":
            gif = output_path(target, args.overwrite)
        else:
            gif = reserve_path(target, stem, ".gif")
        unclip.save_gif(out.images, gif)
        strip = save_png(make_grid(out.images, ncols=len(out.images)), reserve_path(gif.parent, gif.stem + "-strip"),
                         meta)
        paths = [gif, strip]
    else:
        image = _load_image_arg(args.image) if args.image else None
        out = pipe(args.prompt, num_images=args.num_images, prior_steps=args.prior_steps,
                   prior_guidance=args.prior_guidance, prior_candidates=args.prior_candidates, image=image,
                   strength=args.strength, **common)
        meta = {**out.settings, **({"image": args.image} if args.image else {})}
        paths = _write_images(out.images, args, meta, f"{slug(args.prompt)}-s{args.seed}")
    for p in paths:
        print(p)
    return 0


def _sample_external(args, path: Path, device: str) -> int:
    """A diffusers Kandinsky 2.2 or unCLIP (Karlo) directory, through diffusers."""
    from genvl.sampling.external import ExternalPipeline
    from genvl.sampling.io import slug

    if args.variations or args.interpolate:
        raise GenvlError("--variations and --interpolate need a genvl model directory")
    if args.coarse_start is not None and args.coarse_start < 1.0:
        raise GenvlError("--coarse-start needs a genvl decoder with a coarse layout path, not a diffusers pipeline")
    pipe = ExternalPipeline.from_dir(path, device=device)
    images = pipe.generate(args.prompt, num_images=args.num_images, steps=args.steps, prior_steps=args.prior_steps,
                           guidance=args.guidance, prior_guidance=args.prior_guidance, seed=args.seed,
                           size=args.size, progress=not args.no_progress)
    meta = {"model": str(path), "method": f"external:{pipe.kind}", "prompt": args.prompt, "seed": args.seed,
            "steps": args.steps, "prior_steps": args.prior_steps, "guidance": args.guidance,
            "prior_guidance": args.prior_guidance}
    for p in _write_images(images, args, meta, f"{slug(args.prompt)}-s{args.seed}"):
        print(p)
    return 0


# ------------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from genvl.config import apply_overrides, load_config
    from genvl.training.config import TrainConfig, resolve_recipe
    from genvl.training.tasks import get_task
    from genvl.training.trainer import stage_dir

    out = Path(args.out)
    if args.config:
        cfg = load_config(TrainConfig, resolve_recipe(args.config))
    elif args.resume and (stage_dir(out, args.stage) / "config.yaml").is_file():
        cfg = load_config(TrainConfig, stage_dir(out, args.stage) / "config.yaml")
    else:
        cfg = TrainConfig()
    cfg = apply_overrides(cfg, args.set)
    cfg.validate()
    command = "genvl " + " ".join(shlex.quote(a) for a in args.argv)

    if args.stage == "t2i":
        return _train_t2i(args, command)
    for flag in ("budget", "lora_rank", "size", "superres", "heldout", "clip"):
        if getattr(args, flag) is not None:
            raise GenvlError(f"--{flag.replace('_', '-')} is an option of genvl train t2i; for one stage use --set")
    if args.stage == "tokenizer":
        from genvl.data import open_image_text
        from genvl.tokenizers.text import train_text_tokenizer

        if (out / "tokenizer").exists() and not args.overwrite:
            raise GenvlError(f"{out / 'tokenizer'} already exists; use --overwrite to replace it, or another --out")
        ds = open_image_text(args.data, image_size=cfg.data.image_size, validate=False)
        tok = train_text_tokenizer(getattr(ds, "all_captions", ds.captions), vocab_size=cfg.tokenizer_vocab, model_max_length=cfg.text_len)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out / "tokenizer"))
        print(f"genvl: tokenizer with {len(tok)} tokens trained on {len(ds.captions)} captions -> {out / 'tokenizer'}")
        return 0

    if out.exists() and (out / "genvl.json").is_file() and not args.resume and args.init is None:
        comp = get_task(args.stage, cfg).component
        if (out / comp).exists() and not args.overwrite:
            raise GenvlError(f"{out} already holds a trained {comp}; use --resume latest, --overwrite, or another --out")
    from genvl.training.trainer import train

    task = get_task(args.stage, cfg)
    result = train(task, args.data, out, resume=args.resume, init=args.init, command=command,
                   progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"genvl: trained {args.stage} for {result.step} steps in {result.seconds:.1f} s "
              f"(final loss {result.final_loss:.4f}); model directory: {out}")
    return 0


def _parse_budget(text: str) -> float:
    """'45m', '1h', '1h30m', '90s' or plain seconds -> seconds."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", t)
    if not t or m is None or not any(m.groups()):
        raise GenvlError(f"--budget {text!r}: give a duration such as 45m, 1h, 1h30m or 900s")
    h, mnt, sec = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mnt + sec


def _train_t2i(args, command: str) -> int:
    from genvl.training.t2i import T2IOptions, default_init, run_t2i

    if args.config or args.set or args.resume:
        raise GenvlError("genvl train t2i chooses its own recipes and resumes by itself when run again with the "
                         "same options: drop --config / --set / --resume (they are for single stages)")
    budget = _parse_budget(args.budget or "45m")
    if args.lora_rank is not None and args.lora_rank < 0:
        raise GenvlError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.size is not None and not (8 <= args.size <= 1024 and args.size % 4 == 0):
        raise GenvlError(f"--size must be a multiple of 4 in [8, 1024], got {args.size}")
    if args.superres is not None and not (8 <= args.superres <= 1024 and args.superres % 4 == 0):
        raise GenvlError(f"--superres must be a multiple of 4 in [8, 1024], got {args.superres}")
    if args.heldout and not Path(args.heldout).exists():
        raise GenvlError(f"--heldout folder not found: {args.heldout}")
    init = args.init or default_init(args.size)
    if not args.init:
        print(f"genvl t2i: --init {init} (the default{'' if init == 'demo' else ' for --size ' + str(args.size)})")
    if init == "scratch" and args.clip not in (None, "auto"):
        raise GenvlError("--clip keep|finetune needs a base model (--init demo or --init DIR)")
    opts = T2IOptions(data=args.data, out=args.out, init=init, budget_s=budget, lora_rank=args.lora_rank or 0,
                      size=args.size, superres=args.superres, heldout=args.heldout, clip=args.clip or "auto")
    run_t2i(opts, command=command, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------------------- classify
def _load_images(paths: list[str], size: int):
    import torch

    from genvl.data import load_rgb, resize_center_crop, to_tensor

    tensors = []
    for p in paths:
        if not Path(p).is_file():
            raise GenvlError(f"image not found: {p}")
        try:
            img = load_rgb(p)
        except GenvlError as e:
            raise GenvlError(f"{p}: cannot read image ({e})") from None
        tensors.append(to_tensor(resize_center_crop(img, size)))
    return torch.stack(tensors)


def _check_json(args) -> None:
    """Fail before any work when ``--json FILE`` exists: results are never overwritten without --overwrite."""
    path = getattr(args, "json", None)
    if path and not getattr(args, "overwrite", False) and os.path.lexists(path):
        raise GenvlError(f"--json {path}: the file exists; genvl does not overwrite results (pass --overwrite to "
                         "replace it, or name another file)")


def _write_json(args, result: dict) -> Path:
    """Write ``--json`` whole; a file that appeared meanwhile (another run) is kept, not replaced."""
    from genvl.sampling.io import write_new_file

    data = (json.dumps(result, indent=2) + "\n").encode()
    try:
        return write_new_file(args.json, data, overwrite=getattr(args, "overwrite", False))
    except FileExistsError:
        raise GenvlError(f"--json {args.json}: the file was created by something else while this ran; it is kept "
                         "and these results were not written (pass --overwrite to replace it)") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenvlError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_classes(args) -> list[str]:
    from genvl.limits import MAX_CLASSES

    if args.classes_file:
        p = Path(args.classes_file)
        if not p.is_file():
            raise GenvlError(f"classes file not found: {p}")
        if p.stat().st_size > 64 * 1024 * MAX_CLASSES:
            raise GenvlError(f"{p}: {p.stat().st_size:,} bytes is too large for a list of at most {MAX_CLASSES} "
                             "classes")
        classes = [line.strip() for line in _read_text(p).splitlines() if line.strip()]
    elif args.classes is None:
        raise GenvlError("give the class names with --classes \"a,b,c\" or --classes-file FILE")
    else:
        classes = [c for c in args.classes.split(",")]
    if len(classes) > MAX_CLASSES:
        raise GenvlError(f"{len(classes)} classes is above genvl's limit of {MAX_CLASSES}; give at most {MAX_CLASSES}")
    return classes


def _classify_options(args) -> dict:
    """Scoring settings shared by classify and evaluate zero-shot (checked before any model loads)."""
    from genvl.classify import parse_schedule

    schedule = parse_schedule(args.schedule) if getattr(args, "schedule", None) else None
    return {"samples": args.samples, "schedule": schedule, "seed": args.seed}


def _temperature(args, md, method: str) -> float:
    """--temperature, else the model directory's fitted one (genvl.json "classify"), else the method default."""
    from genvl.classify import DEFAULT_TEMPERATURES
    from genvl.classify.base import check_temperature

    if getattr(args, "temperature", None) is not None:
        return check_temperature(args.temperature)
    fitted = md.meta.get("classify", {}).get("temperature", {})
    return float(fitted.get(method, DEFAULT_TEMPERATURES[method]))


def cmd_classify(args) -> int:
    from genvl.classify import classify, expand_classes, load_classifier

    classes = _read_classes(args)
    expand_classes(classes, args.template)  # check names and template before loading anything
    opts = _classify_options(args)
    md = _model_dir(args.model, "classification")
    device = _device(args.device)
    clf = load_classifier(md, args.method, device=device, **opts)
    images = _load_images(args.images, clf.image_size)
    res = classify(clf, images, classes, template=args.template, temperature=_temperature(args, md, args.method))
    rows = []
    width = max(len(c) for c in res.classes)
    for path, probs in zip(args.images, res.probs.tolist()):
        best = max(range(len(probs)), key=probs.__getitem__)
        print(f"{path}: {res.classes[best]} ({probs[best]:.1%})")
        for c, p in sorted(zip(res.classes, probs), key=lambda t: -t[1]):
            print(f"  {c:<{width}}  {p:6.1%}")
        rows.append({"image": path, "prediction": res.classes[best], "probs": dict(zip(res.classes, probs))})
    print(f"method {args.method}: {res.evals_per_image:g} model evaluations per image, temperature {res.temperature:g}")
    if args.json:
        _write_json(args, {"method": args.method, "evals_per_image": res.evals_per_image,
                           "temperature": res.temperature, "results": rows})
    return 0


# --------------------------------------------------------------------------------------- evaluate
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
    if args.data is None:
        raise GenvlError("evaluate retrieval needs --data PATH (an image-text dataset)")
    from genvl.data import open_image_text
    from genvl.evaluation.embeddings import embed_pairs
    from genvl.evaluation.retrieval import chance_recall, retrieval_metrics

    md = _model_dir(args.model, "retrieval evaluation")
    md.require("clip", purpose="retrieval evaluation")
    device = _device(args.device)
    clip = md.load("clip", device=device)
    ds = open_image_text(args.data, image_size=clip.config.image_size, progress=not args.no_progress)
    if args.limit:
        import torch.utils.data as tud

        ds_eval = tud.Subset(ds, range(min(args.limit, len(ds))))
    else:
        ds_eval = ds
    n = len(ds_eval)
    img, txt = embed_pairs(clip, md.tokenizer(), ds_eval, batch_size=args.batch_size, device=device,
                           progress=not args.no_progress)
    metrics = retrieval_metrics(img, txt)
    print(f"retrieval on {n} pairs from {args.data} ({len(ds.skipped)} bad files skipped)")
    print(f"{'metric':<24} {'value':>8} {'chance':>8}")
    for k, v in metrics.items():
        chance = ""
        if "@" in k:
            chance = f"{chance_recall(n, int(k.split('@')[1])):8.2f}"
        print(f"{k:<24} {v:8.2f} {chance}")
    _save_evaluation(args, md, "retrieval", metrics, n)
    return 0


def _save_evaluation(args, md, kind: str, metrics: dict, n: int) -> None:
    """--json FILE gets the results; the model card gets them unless --no-record."""
    from genvl.checkpoint import record_metrics

    result = {"kind": kind, "model": str(md.path), "data": str(args.data), "n": n, "metrics": metrics}
    if args.json:
        _write_json(args, result)
    if not args.no_record:
        record_metrics(md.path, kind, metrics, {"data": str(args.data), "n": n})


def _evaluate_reconstruction(args) -> int:
    """PSNR, codebook usage and perplexity of the model's VQ-VAE on held-out images."""
    from genvl.data import open_image_text
    from genvl.evaluation.reconstruction import evaluate_reconstruction

    if args.data is None:
        raise GenvlError("evaluate reconstruction needs --data PATH (held-out images)")
    md = _model_dir(args.model, "reconstruction evaluation")
    md.require("vqvae", purpose="reconstruction evaluation")
    device = _device(args.device)
    vq = md.load("vqvae", device=device)
    ds = open_image_text(args.data, image_size=vq.config.image_size, progress=not args.no_progress)
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
    from genvl.classify import cross_fit_temperature, expand_classes, load_classifier, supported_methods, zero_shot_metrics
    from genvl.data.labelled import open_labelled

    if args.data is None:
        raise GenvlError("evaluate zero-shot needs --data DIR (a labelled folder: DIR/CLASS_NAME/*.png)")
    opts = _classify_options(args)
    md = _model_dir(args.model, "zero-shot evaluation")
    if args.methods:
        methods = supported_methods(md) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
        if not methods:
            raise GenvlError(f"{md.path} supports no zero-shot method (it has: {', '.join(md.components) or 'none'})")
    else:
        methods = [args.method]
    device = _device(args.device)
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
        temp = _temperature(args, md, m)
        met = zero_shot_metrics(scores, data.labels, data.classes, temp)
        t_fit, ece_cal = cross_fit_temperature(scores, data.labels)
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
           "settings": {"samples": args.samples, "schedule": args.schedule, "seed": args.seed, "template": args.template}}
    if args.json:
        _write_json(args, out)
    if not args.no_record:
        for m, r in results.items():
            values = {k: r[k] for k in ("accuracy", "ece", "ece_calibrated", "temperature_fitted", "evals_per_image",
                                        "seconds_per_image")}
            record_metrics(md.path, f"zero-shot {m}", values, {"data": str(args.data), "n": n})
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
        prompts = list(dict.fromkeys(line.strip() for line in _read_text(pfile).splitlines() if line.strip()))
        if len(prompts) < 2:
            raise GenvlError(f"{pfile}: need at least two distinct prompts, found {len(prompts)}")
    md = _model_dir(args.model, "generation evaluation")
    device = _device(args.device)
    _fill_sample_defaults(args, md.meta.get("sampling", {}))
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
                  prior_candidates=args.prior_candidates, coarse_start=args.coarse_start)
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
    result = {"kind": "generation", "model": str(md.path), "judge": args.clip or "own", "reference": args.data,
              "prompt_source": "file" if args.prompts else "data", **res, "prompts": prompts, "metrics": metrics,
              "settings": settings}
    if args.json:
        from genvl.sampling.io import output_path

        _write_json(args, result)
        grid = output_path(Path(args.json).with_suffix(".png"), args.overwrite)  # a new name if taken (printed)
        make_grid(to_pil_images(images), ncols=args.num_images).save(grid)
        print(f"samples: {grid}")
    if not args.no_record:
        record_metrics(md.path, "generation", metrics, {"data": args.data or "", "n": len(images),
                                                         "prompts": len(prompts), "judge": args.clip or "own",
                                                         "settings": settings})
    return 0


# ------------------------------------------------------------------------------------------- data
def cmd_data(args) -> int:
    if args.data_cmd == "check":
        from genvl.data.check import check_dataset, format_report

        report = check_dataset(args.path, progress=not args.no_progress)
        print(format_report(report))
        return 0
    if args.data_cmd == "emoji":
        from genvl.data.emoji import build_emoji_dataset

        styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
        res = build_emoji_dataset(args.out, styles=styles, limit=args.limit, progress=not args.no_progress,
                                  skin_tones=not args.no_skin_tones)
        per_style = ", ".join(f"{s} {n} (v{res.versions.get(s, '?')})" for s, n in res.counts.items())
        print(f"genvl: wrote {res.total} captioned emoji images to {res.out_dir} ({per_style}); "
              f"licences in {Path(res.out_dir) / 'LICENSES.md'}")
        if res.missing:
            print(f"genvl: {len(res.missing)} image(s) listed in emoji.json were not in the package")
        return 0
    if args.data_cmd == "tokenize":
        return _data_tokenize(args)
    raise GenvlError(f"data {args.data_cmd} is not available in this version of genvl")


def _data_tokenize(args) -> int:
    """Encode a dataset with the model's VQ-VAE into a tokenized set (codes + captions)."""
    from genvl.data import open_image_text
    from genvl.data.tokenized import SUFFIX, tokenize_dataset, tokenized_sidecar

    out = Path(args.out)
    if out.suffix != SUFFIX:
        raise GenvlError(f"--out {out}: the codes are written as a {SUFFIX} file (e.g. {out.with_suffix(SUFFIX)})")
    taken = [p for p in (out, tokenized_sidecar(out)) if os.path.lexists(p)]
    if taken and not args.overwrite:
        raise GenvlError(f"{taken[0]} already exists; use --overwrite to replace it, or another --out")
    md = _model_dir(args.model, "tokenizing a dataset")
    md.require("vqvae", purpose="genvl data tokenize")
    device = _device(args.device)
    vq = md.load("vqvae", device=device)
    ds = open_image_text(args.path, image_size=vq.config.image_size, progress=not args.no_progress)
    res = tokenize_dataset(vq, ds, out, batch_size=args.batch_size, progress=not args.no_progress,
                           meta={"model": str(md.path), "source": str(args.path)},
                           weights=md.path / "vqvae" / "model.safetensors")
    n, h, w = res.codes.shape
    print(f"genvl: {n} images of {args.path} -> {h}x{w} codes each in {out}, captions in {tokenized_sidecar(out)}"
          + (f" ({len(ds.skipped)} bad files skipped)" if ds.skipped else ""))
    return 0


# ------------------------------------------------------------------------------------ interleaved
def _sample_interleaved(args) -> int:
    """``genvl sample --method interleaved [PROMPT | --prompt-file DOC.jsonl]``: continue a document of
    text and images; each writes a folder with doc.html, doc.jsonl and PNGs, whose doc.html is printed."""
    from genvl.sampling.autoregressive import check_sampling
    from genvl.sampling.interleaved import (
        DEFAULT_IMAGE_GUIDANCE,
        InterleavedParts,
        generate_document,
        read_prompt_file,
        write_document,
    )
    from genvl.sampling.io import slug

    if args.variations or args.interpolate:
        raise GenvlError("--variations and --interpolate work with --method unclip, not interleaved")
    if args.prompt_file and args.prompt:
        raise GenvlError("give a prompt or --prompt-file, not both")
    if args.prompt_file:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt is None or not args.prompt.strip():
        raise GenvlError("empty prompt: give text, e.g. genvl sample --method interleaved \"a red heart\", "
                         "or --prompt-file DOC.jsonl")
    else:
        prompts = [args.prompt]
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_images < 0:
        raise GenvlError(f"--max-images must be >= 0, got {args.max_images}")
    if args.max_images > MAX_DOC_IMAGES:
        raise GenvlError(f"--max-images {args.max_images} is above genvl's limit of {MAX_DOC_IMAGES} images per "
                         f"document; ask for at most {MAX_DOC_IMAGES}")
    if any(g is not None and g < 0 for g in (args.guidance, args.image_guidance)):
        raise GenvlError("guidance scales must be >= 0 (1 = no guidance)")
    device = _device(args.device)
    md = _model_dir(args.model, "--method interleaved")
    md.require("interleaved", "clip", "decoder", purpose="--method interleaved")
    recommended = md.meta.get("sampling", {})
    _fill_sample_defaults(args, recommended)
    if args.image_guidance is None:
        args.image_guidance = float(recommended.get("image_guidance", DEFAULT_IMAGE_GUIDANCE))
    parts = InterleavedParts.from_model_dir(md, device=device)
    for n, prompt in enumerate(prompts):
        out = generate_document(
            parts, prompt, max_new_tokens=args.max_new_tokens, max_images=args.max_images,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, image_guidance=args.image_guidance,
            force_image=args.force_image, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
            seed=args.seed, progress=not args.no_progress,
        )
        source = f"{args.prompt_file}:{n + 1}" if args.prompt_file else args.prompt
        first = next((s["text"] for s in out.segments if "text" in s and s["text"].strip()), "document")
        files = write_document(out, Path(args.out), f"{slug(first, 30)}-s{args.seed}",
                               {"model": str(md.path), "prompt": source})
        print(files.html)
    return 0


def _evaluate_interleaved(args) -> int:
    """Regression error of the interleaved LM on held-out caption -> image pairs (see genvl.evaluation.interleaved)."""
    from genvl.data import open_image_text
    from genvl.evaluation.interleaved import evaluate_interleaved, recorded_holdout
    from genvl.sampling.interleaved import DEFAULT_IMAGE_GUIDANCE
    from genvl.training.tasks.interleaved import heldout

    if args.data is None:
        raise GenvlError("evaluate interleaved needs --data PATH (image-text pairs; the model's held-out ones are used)")
    md = _model_dir(args.model, "interleaved evaluation")
    md.require("interleaved", "clip", purpose="interleaved evaluation")
    device = _device(args.device)
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


# --------------------------------------------------------------------------------------------- ui
def cmd_ui(args) -> int:
    """``genvl ui``: serve genvl/ui/app.py with streamlit on localhost until stopped."""
    import importlib.util
    import signal
    import socket
    import subprocess

    from genvl.ui import APP_PATH, MODEL_ENV

    if importlib.util.find_spec("streamlit") is None:
        raise GenvlError("the UI needs streamlit: pip install \"genvl[ui]\"")
    md = _model_dir(args.model, "the UI")  # a bad directory fails here, in one line
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("localhost", args.port))
        except OSError:
            raise GenvlError(f"port {args.port} on localhost is in use; pick another with --port N") from None
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_PATH), "--server.address", "localhost",
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--client.toolbarMode", "minimal"]
    print(f"genvl ui: serving {md.path} at http://localhost:{args.port} (Ctrl+C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, MODEL_ENV: str(md.path)})
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopping genvl ui stops the server
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code


# --------------------------------------------------------------------------------- autoregressive
def _sample_ar(args) -> int:
    """``genvl sample --method ar PROMPT``: the token LM writes image codes, the VQ-VAE draws them."""
    from genvl.pipelines import ARPipeline
    from genvl.sampling.autoregressive import check_sampling
    from genvl.sampling.io import slug

    if args.variations or args.interpolate:
        raise GenvlError("--variations and --interpolate work with --method unclip, not ar")
    check_sampling(args.temperature, args.top_k, args.top_p)
    pipe = ARPipeline.from_pretrained(_model_dir(args.model, "--method ar"), device=_device(args.device),
                                      purpose="--method ar")
    pipe.name = str(Path(args.model) if args.model else DEMO_DIR)
    out = pipe(args.prompt, num_images=args.num_images, guidance=args.guidance, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, seed=args.seed, size=args.size, fast=args.fast,
               progress=not args.no_progress)
    for p in _write_images(out.images, args, out.settings, f"{slug(args.prompt)}-s{args.seed}"):
        print(p)
    return 0


def cmd_caption(args) -> int:
    """``genvl caption IMAGE...``: one "path<TAB>caption" line per image."""
    from genvl.pipelines import ARPipeline
    from genvl.sampling.autoregressive import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    for p in args.images:
        if not Path(p).is_file():
            raise GenvlError(f"image not found: {p}")
    pipe = ARPipeline.from_pretrained(_model_dir(args.model, "captioning"), device=_device(args.device),
                                      purpose="captioning")
    images = _load_images(args.images, pipe.image_size)  # (B, 3, S, S); unreadable files: one-line errors
    texts = pipe.caption(images, max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")
    return 0


# ------------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    import torch

    if args.dir is None and not (DEMO_DIR / "genvl.json").is_file():
        print(f"genvl {__version__}; torch {torch.__version__}; "
              f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}")
        print("built-in demo model: not in this version (train one with: genvl train clip --data FOLDER --out DIR)")
        return 0
    md = _model_dir(args.dir, "info")
    print(f"model directory: {md.path}  (genvl {md.meta.get('genvl_version', '?')})")
    for name, cls in md.components.items():
        cfg = json.loads((md.path / name / "config.json").read_text())
        size = (md.path / name / "model.safetensors").stat().st_size
        print(f"  {name:<12} {cls}  {size / 2**20:.1f} MiB  ({len(cfg) - 1} config fields)")
    tok = md.path / md.meta.get("tokenizer", "tokenizer")
    print(f"  tokenizer    {'present' if tok.is_dir() else 'missing'}")
    for name, rec in md.meta.get("training", {}).items():
        print(f"training {name}: {rec.get('steps')} steps on {rec.get('data')} ({rec.get('pairs')} pairs), "
              f"{rec.get('time')}, {rec.get('hardware')}")
    for kind, rec in md.meta.get("metrics", {}).items():
        vals = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.get("values", {}).items())
        print(f"metrics {kind}: {vals}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genvl", description="Generative vision-language models: train, sample, classify, evaluate.",
                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"genvl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("sample", help="generate images from a prompt", formatter_class=_Formatter,
                       description="Generate images from a text prompt. Without --model the built-in demo model is used.")
    s.add_argument("prompt", nargs="?", help="the text to draw (--method interleaved: the start of the document)")
    s.add_argument("--model", help="model directory, or a diffusers Kandinsky 2.2 / unCLIP directory "
                   "(default: the built-in demo)")
    s.add_argument("--method", choices=["unclip", "ar", "interleaved"], default="unclip", help="generation method")
    s.add_argument("--out", default="samples", help="output folder, or a .png path (several images: a grid); "
                   "an existing file is never replaced: the new one takes the next free name (a-1.png), printed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out .png / .gif file instead")
    s.add_argument("--num-images", type=_limited(MAX_IMAGES, "images per prompt"), default=4,
                   help="images to generate")
    s.add_argument("--grid", action="store_true", help="write several images as one grid PNG")
    s.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed gives the same image")
    s.add_argument("--steps", type=_limited(MAX_STEPS, "steps"), help="decoder diffusion steps (default: the "
                   "model's recommended setting, else 50)")
    s.add_argument("--prior-steps", type=_limited(MAX_STEPS, "steps"), help="prior diffusion steps (default: "
                   "model's, else 25)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance of the decoder (or AR model), 1 = none "
                   "(default: the model's, else 3)")
    s.add_argument("--prior-guidance", type=float, help="prior classifier-free guidance, 1 = none "
                   "(default: model's, else 4)")
    s.add_argument("--prior-candidates", type=_limited(MAX_PRIOR_CANDIDATES, "candidates per image"),
                   help="embeddings the prior samples per image; the one "
                   "closest to the prompt's CLIP text embedding is drawn (default: model's, else 1)")
    s.add_argument("--temperature", type=float, default=1.0, help="--method ar: sampling temperature (0 = greedy)")
    s.add_argument("--top-k", type=int, default=0, help="--method ar: sample among the k likeliest codes (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="--method ar: nucleus sampling mass (1 = off)")
    s.add_argument("--fast", action="store_true", help="--method ar on CUDA: static KV cache + CUDA graphs "
                   "(compiles on first use)")
    s.add_argument("--scheduler", help="ddpm, ddim or dpm++ (default: model's, else ddim)")
    s.add_argument("--size", type=int, help="output size in pixels (default: the model's)")
    s.add_argument("--prompt-file", metavar="DOC.jsonl", help="--method interleaved: prompt documents of text and "
                   "images (interleaved JSONL, one per line)")
    s.add_argument("--max-new-tokens", type=_limited(MAX_NEW_TOKENS, "tokens"), default=48,
                   help="--method interleaved: most text tokens "
                   "to write")
    s.add_argument("--max-images", type=int, default=1, help="--method interleaved: most images to generate")
    s.add_argument("--image-guidance", type=float, help="--method interleaved: classifier-free guidance of the "
                   "regressed image embedding, 1 = none (default: the model's, else 2)")
    s.add_argument("--force-image", action="store_true", help="--method interleaved: open an image right after "
                   "the prompt (else the model decides)")
    s.add_argument("--image", metavar="IMAGE", help="image-to-image: the decoder starts from this image, noised to "
                   "--strength of its schedule, and draws the prompt")
    s.add_argument("--strength", type=float, help="with --image: how much of the image is redrawn, in [0, 1] "
                   "(1 = plain text-to-image, 0 = the image; default 0.75)")
    s.add_argument("--variations", metavar="IMAGE", help="generate variations of this image instead of a prompt")
    s.add_argument("--invert", action="store_true", help="variations start from the DDIM-inverted noise of the image")
    s.add_argument("--coarse-start", type=float, metavar="F",
                   help="decoders with a coarse layout path: start from their coarse image of the embedding, noised "
                        "to this fraction of the schedule, running that fraction of --steps (1 = from pure noise; "
                        "default: model's, else 1)")
    s.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="interpolate between two prompts or images "
                   "(written as a GIF and a strip)")
    s.add_argument("--frames", type=_limited(MAX_FRAMES, "frames", lo=2), default=8, help="frames for --interpolate")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser("train", help="train one stage", formatter_class=_Formatter,
                       description="Train one stage on an image-text dataset into a model directory.\n\n"
                       "Stages: tokenizer, clip, prior, decoder, sr, vqvae, lm, interleaved (those not in this\n"
                       "version say so). Finetune with --init DIR (or --init demo); LoRA: --set lora_rank=8.\n"
                       "The recipe comes from --config (a YAML file or a built-in name: tiny, demo-decoder, ...)\n"
                       "with --set key=value overrides;\n"
                       "e.g. --set max_steps=500 --set data.image_size=64 --set model.size=small.\n"
                       "Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml -m genvl train ...\n\n"
                       "genvl train t2i --data DIR --out OUT [--init demo|DIR|scratch] [--budget 45m]: the whole\n"
                       "text-to-image model (tokenizer and CLIP when needed, prior, decoder, upsampler with\n"
                       "--superres N), each stage sized to\n"
                       "the data and the budget, one progress bar; the same command again resumes where it stopped.")
    t.add_argument("stage", choices=["t2i", "tokenizer", "clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved"],
                   help="what to train: t2i = the whole text-to-image model in one command; the others one stage")
    t.add_argument("--data", required=True, help="dataset: image folder (metadata.jsonl/csv or .txt captions) or .tar shards "
                   "(interleaved: also .jsonl documents; several sources joined with +)")
    t.add_argument("--out", required=True, help="output model directory (also holds checkpoints and logs)")
    t.add_argument("--config", help="recipe: a YAML file, or the name of a built-in one (tiny, demo-clip, "
                   "demo-decoder, ...: genvl/recipes/) (default: the trainer's defaults, a tiny model)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    t.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    t.add_argument("--init", help="model directory to start from (finetuning); 'demo' is the built-in demo model "
                   "(t2i: also 'scratch'; default demo, the README's measured recommendation)")
    t.add_argument("--overwrite", action="store_true", help="replace a trained component (or the tokenizer) "
                   "already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t2i = t.add_argument_group("t2i (the whole text-to-image model; run it again to resume)")
    t2i.add_argument("--budget", help="wall-clock budget of all stages, e.g. 45m, 1h30m, 900s (default 45m)")
    t2i.add_argument("--lora-rank", type=int, help="LoRA rank of the prior and decoder when the base CLIP is kept "
                     "(default 0: full finetuning)")
    t2i.add_argument("--size", type=int, help="image size of a new decoder (default: the base's, else 32; a size "
                     "other than the demo's 32 px makes --init default to scratch)")
    t2i.add_argument("--superres", type=int, metavar="N", help="also train a super-resolution stage from the "
                     "decoder's size to N px (e.g. 64 on a 32 px decoder; the images should be at least N px)")
    t2i.add_argument("--heldout", help="captioned folder for the final held-out metrics in the model card")
    t2i.add_argument("--clip", choices=["auto", "keep", "finetune"], help="with --init DIR: keep the base's CLIP "
                     "frozen, finetune it, or decide by measuring how well it separates the captions (default auto)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("caption", help="describe images with the token LM", formatter_class=_Formatter,
                       description="Image -> text with the autoregressive token LM (a model directory holding lm,\n"
                       "vqvae and tokenizer/). Prints one 'path<TAB>caption' line per image.")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", help="model directory (default: the built-in demo)")
    c.add_argument("--max-tokens", type=_limited(MAX_NEW_TOKENS, "tokens"), default=32, help="most tokens per caption")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    c.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    c.add_argument("--seed", type=_seed, default=0, help="random seed (used when temperature > 0)")
    c.add_argument("--batch-size", type=_limited(MAX_BATCH_SIZE, "images per batch"), default=32,
                   help="images captioned per batch")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    c.set_defaults(func=cmd_caption)

    k = sub.add_parser("classify", help="zero-shot classify images", formatter_class=_Formatter,
                       description="Zero-shot classification: each image against class names; prints probabilities.")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--model", help="model directory (default: the built-in demo)")
    k.add_argument("--classes", help="comma-separated class names, e.g. \"a cat,a dog\"")
    k.add_argument("--classes-file", help="file with one class name per line")
    k.add_argument("--template", help="prompt template with {} for the class name, e.g. \"a photo of a {}\"")
    k.add_argument("--method", choices=["clip", "diffusion", "prior", "ar"], default="clip", help="scoring method")
    k.add_argument("--samples", type=_limited(MAX_SAMPLES, "samples per class"),
                   help="diffusion / prior: (t, noise) samples per class "
                   "(default 32 / 64)")
    k.add_argument("--schedule", help="diffusion / prior: adaptive elimination, samples:keep per stage, e.g. 8:5,32:1")
    k.add_argument("--seed", type=_seed, default=0, help="seed of the shared (t, noise) samples")
    k.add_argument("--temperature", type=float, help="softmax temperature (default: the model's fitted one, else "
                   "the method's default)")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    k.add_argument("--json", help="also write the results to this JSON file (an existing one is an error)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    k.set_defaults(func=cmd_classify)

    e = sub.add_parser("evaluate", help="measure a model", formatter_class=_Formatter,
                       description="Evaluate a model directory.\n"
                       "  retrieval:  image<->text R@1/5/10 on an image-text set (--data)\n"
                       "  generation: images for the distinct captions of a held-out set --data (at most\n"
                       "              --max-prompts) or for --prompts, scored by CLIP score, prompt-retrieval\n"
                       "              accuracy among the distinct prompts and (with --data) the Frechet distance in\n"
                       "              CLIP space to the real images of --data\n"
                       "  reconstruction: PSNR, codebook usage and code perplexity of the VQ-VAE on held-out\n"
                       "              images (--data)\n"
                       "  zero-shot:  accuracy, per-class accuracy, confusion, ECE, evaluations and time per image of\n"
                       "              --method (or --methods all) on a labelled folder --data DIR/CLASS_NAME/*.png\n"
                       "  interleaved: cosine / l2 between the image embedding the interleaved LM regresses after a\n"
                       "              caption and the real image's, on the pairs of --data its training held out\n"
                       "              (--guidance: guidance of the regressed embedding)\n"
                       "The figures are also stored in the model card unless --no-record.")
    e.add_argument("kind", choices=["retrieval", "generation", "zero-shot", "reconstruction", "interleaved"])
    e.add_argument("--model", help="model directory (default: the built-in demo)")
    e.add_argument("--data", help="image-text dataset (retrieval; generation: the held-out set whose distinct "
                   "captions are the prompts unless --prompts, and whose images are the FD's reference)")
    e.add_argument("--prompts", help="generation: file with one prompt per line (default: the captions of --data)")
    e.add_argument("--max-prompts", type=int, default=64, metavar="N",
                   help="generation from --data: at most N distinct captions (more: a fixed seeded subset)")
    e.add_argument("--clip", help="generation: model directory of the CLIP that scores (default: the model's own)")
    e.add_argument("--num-images", type=_limited(MAX_IMAGES, "images per prompt"), default=4,
                   help="generation: images per prompt")
    e.add_argument("--steps", type=_limited(MAX_STEPS, "steps"), help="generation: decoder steps (default: the "
                   "model's, else 50)")
    e.add_argument("--prior-steps", type=_limited(MAX_STEPS, "steps"), help="generation: prior steps (default: "
                   "model's, else 25)")
    e.add_argument("--guidance", type=float, help="generation: decoder guidance (default: model's, else 3)")
    e.add_argument("--prior-guidance", type=float, help="generation: prior guidance (default: model's, else 4)")
    e.add_argument("--prior-candidates", type=_limited(MAX_PRIOR_CANDIDATES, "candidates per image"),
                   help="generation: prior samples per image, the closest to the prompt kept (default: model's, else 1)")
    e.add_argument("--scheduler", help="generation: ddpm, ddim or dpm++ (default: model's, else ddim)")
    e.add_argument("--coarse-start", type=float, metavar="F",
                   help="generation: start the decoder from its coarse layout image at this noise fraction "
                        "(1 = from pure noise; default: model's, else 1)")
    e.add_argument("--seed", type=_seed, default=0, help="generation: first seed (prompt i uses seed + i)")
    e.add_argument("--json", help="write the results to this JSON file (an existing one is an error)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--method", choices=["clip", "diffusion", "prior", "ar"], default="clip",
                   help="zero-shot: scoring method")
    e.add_argument("--methods", help="zero-shot: comma-separated methods, or 'all' (every method the model supports)")
    e.add_argument("--template", help="zero-shot: prompt template with {} for the class name")
    e.add_argument("--samples", type=_limited(MAX_SAMPLES, "samples per class"),
                   help="zero-shot diffusion / prior: (t, noise) samples per class")
    e.add_argument("--schedule", help="zero-shot diffusion / prior: adaptive elimination, e.g. 8:5,32:1")
    e.add_argument("--temperature", type=float, help="zero-shot: softmax temperature (default: model's / method's)")
    e.add_argument("--limit", type=_positive_int, help="use only the first N pairs")
    e.add_argument("--batch-size", type=_limited(MAX_BATCH_SIZE, "rows per batch"), default=64)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    e.add_argument("--no-record", action="store_true", help="do not write the figures into the model card")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("data", help="inspect or build datasets", formatter_class=_Formatter)
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    dc = dsub.add_parser("check", help="count pairs, sizes, caption lengths and bad files", formatter_class=_Formatter)
    dc.add_argument("path", help="dataset path")
    dc.add_argument("--no-progress", action="store_true")
    de = dsub.add_parser("emoji", help="build a captioned emoji image folder from npm packages", formatter_class=_Formatter,
                         description="Download emoji-datasource-google (Apache-2.0) and emoji-datasource-twitter (CC-BY-4.0)\n"
                         "with `npm pack` and write OUT/metadata.jsonl with one caption per 64x64 PNG.")
    de.add_argument("out", help="output folder")
    de.add_argument("--styles", default="google,twitter", help="comma-separated: google, twitter")
    de.add_argument("--limit", type=_positive_int, help="at most N images per style")
    de.add_argument("--no-skin-tones", action="store_true",
                    help="leave out the skin-tone variations (about half the images; the demo decoder trains without them)")
    de.add_argument("--no-progress", action="store_true")
    dt = dsub.add_parser("tokenize", help="pre-encode a dataset to image codes (with the VQ-VAE)",
                         formatter_class=_Formatter,
                         description="Encode every image of a dataset with the model's VQ-VAE (fast token-LM training).\n"
                         "Writes OUT (.safetensors: codes (N, h, w) int16) and OUT with .jsonl beside it\n"
                         "(file_name, text per row); read back with genvl.data.load_tokenized(OUT).")
    dt.add_argument("path", help="dataset path")
    dt.add_argument("--model", help="model directory holding a vqvae (default: the built-in demo)")
    dt.add_argument("--out", required=True, help="output .safetensors file")
    dt.add_argument("--batch-size", type=_limited(MAX_BATCH_SIZE, "images per batch"), default=64)
    dt.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and its .jsonl)")
    dt.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    dt.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_data)

    u = sub.add_parser("ui", help="start the streamlit app", formatter_class=_Formatter,
                       description="Serve the streamlit app on localhost (tabs: Generate, Variations, Interpolate,\n"
                       "Classify, Model) and print its address; needs pip install \"genvl[ui]\".")
    u.add_argument("--model", help="model directory (default: the built-in demo)")
    u.add_argument("--port", type=_port, default=8501, help="localhost port to serve on")
    u.set_defaults(func=cmd_ui)

    i = sub.add_parser("info", help="what a model directory holds", formatter_class=_Formatter)
    i.add_argument("dir", nargs="?", help="model directory (default: the built-in demo)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        _check_json(args)
        return int(args.func(args) or 0)
    except GenvlError as e:
        print(f"genvl {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genvl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if isinstance(e, OSError) and e.filename is not None:  # a path that cannot be read or written
            print(f"genvl {args.command}: error: {_one_line(f'{e.filename}: {e.strerror or e}')}", file=sys.stderr)
            return 2
        if os.environ.get("GENVL_DEBUG"):
            raise
        msg = _one_line(str(e).splitlines()[0]) if str(e).strip() else ""
        print(f"genvl {args.command}: internal error: {type(e).__name__}: {msg} (set GENVL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
