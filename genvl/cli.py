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

DEMO_DIR = Path(__file__).parent / "assets" / "demo"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
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
def cmd_sample(args) -> int:
    if not args.prompt.strip():
        raise GenvlError("empty prompt: give a text description, e.g. genvl sample \"a red heart\"")
    if args.model is None and not (DEMO_DIR / "genvl.json").is_file():
        print(
            "genvl sample: no text-to-image model yet. The built-in demo model arrives with the "
            "text-to-image stages (prior and decoder); until then `genvl train clip` trains the CLIP "
            "core that they build on. Nothing was written.",
            file=sys.stderr,
        )
        return 0
    md = _model_dir(args.model, "sampling")
    needed = {"unclip": ("prior", "decoder"), "ar": ("vqvae", "lm"), "interleaved": ("interleaved", "decoder")}[args.method]
    md.require(*needed, purpose=f"--method {args.method}")
    raise GenvlError(f"--method {args.method} sampling is not available in this version of genvl")


# ------------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from genvl.config import apply_overrides, load_config
    from genvl.training.config import TrainConfig
    from genvl.training.tasks import get_task
    from genvl.training.trainer import stage_dir

    out = Path(args.out)
    if args.config:
        cfg = load_config(TrainConfig, args.config)
    elif args.resume and (stage_dir(out, args.stage) / "config.yaml").is_file():
        cfg = load_config(TrainConfig, stage_dir(out, args.stage) / "config.yaml")
    else:
        cfg = TrainConfig()
    cfg = apply_overrides(cfg, args.set)
    cfg.validate()
    command = "genvl " + " ".join(shlex.quote(a) for a in args.argv)

    if args.stage == "tokenizer":
        from genvl.data import open_image_text
        from genvl.tokenizers.text import train_text_tokenizer

        ds = open_image_text(args.data, image_size=cfg.data.image_size, validate=False)
        tok = train_text_tokenizer(ds.captions, vocab_size=cfg.tokenizer_vocab, model_max_length=cfg.text_len)
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


def _read_classes(args) -> list[str]:
    if args.classes_file:
        p = Path(args.classes_file)
        if not p.is_file():
            raise GenvlError(f"classes file not found: {p}")
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if args.classes is None:
        raise GenvlError("give the class names with --classes \"a,b,c\" or --classes-file FILE")
    return [c for c in args.classes.split(",")]


def cmd_classify(args) -> int:
    from genvl.classify import CLIPClassifier, classify, expand_classes

    classes = _read_classes(args)
    expand_classes(classes, args.template)  # check names and template before loading anything
    md = _model_dir(args.model, "classification")
    if args.method != "clip":
        raise GenvlError(f"--method {args.method} is not available in this version of genvl (available: clip)")
    md.require("clip", purpose="--method clip")
    device = _device(args.device)
    clip = md.load("clip", device=device)
    clf = CLIPClassifier(clip, md.tokenizer(), device=device)
    images = _load_images(args.images, clip.config.image_size)
    res = classify(clf, images, classes, template=args.template)
    rows = []
    width = max(len(c) for c in res.classes)
    for path, probs in zip(args.images, res.probs.tolist()):
        best = max(range(len(probs)), key=probs.__getitem__)
        print(f"{path}: {res.classes[best]} ({probs[best]:.1%})")
        for c, p in sorted(zip(res.classes, probs), key=lambda t: -t[1]):
            print(f"  {c:<{width}}  {p:6.1%}")
        rows.append({"image": path, "prediction": res.classes[best], "probs": dict(zip(res.classes, probs))})
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "evals_per_image": res.evals_per_image,
                                               "results": rows}, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    if args.kind != "retrieval":
        raise GenvlError(f"evaluate {args.kind} is not available in this version of genvl (available: retrieval)")
    from genvl.checkpoint import record_metrics
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
    result = {"kind": "retrieval", "model": str(md.path), "data": str(args.data), "n": n, "metrics": metrics}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_record:
        record_metrics(md.path, "retrieval", metrics, {"data": str(args.data), "n": n})
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
        res = build_emoji_dataset(args.out, styles=styles, limit=args.limit, progress=not args.no_progress)
        per_style = ", ".join(f"{s} {n} (v{res.versions.get(s, '?')})" for s, n in res.counts.items())
        print(f"genvl: wrote {res.total} captioned emoji images to {res.out_dir} ({per_style}); "
              f"licences in {Path(res.out_dir) / 'LICENSES.md'}")
        if res.missing:
            print(f"genvl: {len(res.missing)} image(s) listed in emoji.json were not in the package")
        return 0
    raise GenvlError(f"data {args.data_cmd} is not available in this version of genvl")


# --------------------------------------------------------------------------------------------- ui
def cmd_ui(args) -> int:
    raise GenvlError("the streamlit UI is not available in this version of genvl")


def cmd_caption(args) -> int:
    raise GenvlError("captioning needs the autoregressive model, not available in this version of genvl")


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
    s.add_argument("prompt", help="the text to draw")
    s.add_argument("--model", help="model directory (default: the built-in demo)")
    s.add_argument("--method", choices=["unclip", "ar", "interleaved"], default="unclip", help="generation method")
    s.add_argument("--out", default="samples", help="output folder or PNG path")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same image")
    s.add_argument("--steps", type=_positive_int, default=50, help="decoder diffusion steps")
    s.add_argument("--num-images", type=_positive_int, default=1, help="images to generate")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser("train", help="train one stage", formatter_class=_Formatter,
                       description="Train one stage on an image-text dataset into a model directory.\n\n"
                       "Stages: tokenizer, clip (prior, decoder, sr, vqvae, lm, interleaved arrive later).\n"
                       "The recipe comes from --config (YAML, see configs/) with --set key=value overrides;\n"
                       "e.g. --set max_steps=500 --set data.image_size=64 --set model.size=small.\n"
                       "Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml -m genvl train ...")
    t.add_argument("stage", choices=["tokenizer", "clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved"],
                   help="what to train")
    t.add_argument("--data", required=True, help="dataset: image folder (metadata.jsonl/csv or .txt captions) or .tar shards")
    t.add_argument("--out", required=True, help="output model directory (also holds checkpoints and logs)")
    t.add_argument("--config", help="recipe YAML (default: the built-in tiny recipe)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    t.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    t.add_argument("--init", help="model directory to start from (finetuning)")
    t.add_argument("--overwrite", action="store_true", help="replace a trained component already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("caption", help="describe images with the token LM", formatter_class=_Formatter)
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", help="model directory (default: the built-in demo)")
    c.set_defaults(func=cmd_caption)

    k = sub.add_parser("classify", help="zero-shot classify images", formatter_class=_Formatter,
                       description="Zero-shot classification: each image against class names; prints probabilities.")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--model", help="model directory (default: the built-in demo)")
    k.add_argument("--classes", help="comma-separated class names, e.g. \"a cat,a dog\"")
    k.add_argument("--classes-file", help="file with one class name per line")
    k.add_argument("--template", help="prompt template with {} for the class name, e.g. \"a photo of a {}\"")
    k.add_argument("--method", choices=["clip", "diffusion", "prior", "ar"], default="clip", help="scoring method")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    k.add_argument("--json", help="also write the results to this JSON file")
    k.set_defaults(func=cmd_classify)

    e = sub.add_parser("evaluate", help="measure a model", formatter_class=_Formatter,
                       description="Evaluate a model directory. retrieval: image<->text R@1/5/10 on an image-text set;\n"
                       "the figures are also stored in the model card unless --no-record.")
    e.add_argument("kind", choices=["retrieval", "generation", "zero-shot", "reconstruction"])
    e.add_argument("--model", help="model directory (default: the built-in demo)")
    e.add_argument("--data", required=True, help="image-text dataset")
    e.add_argument("--json", help="write the results to this JSON file")
    e.add_argument("--limit", type=_positive_int, help="use only the first N pairs")
    e.add_argument("--batch-size", type=_positive_int, default=64)
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
    de.add_argument("--no-progress", action="store_true")
    dt = dsub.add_parser("tokenize", help="pre-encode a dataset to image codes (with the VQ-VAE)")
    dt.add_argument("path")
    d.set_defaults(func=cmd_data)

    u = sub.add_parser("ui", help="start the streamlit app", formatter_class=_Formatter)
    u.add_argument("--model", help="model directory (default: the built-in demo)")
    u.add_argument("--port", type=_positive_int, default=8501)
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
        return int(args.func(args) or 0)
    except GenvlError as e:
        print(f"genvl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genvl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if os.environ.get("GENVL_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"genvl {args.command}: internal error: {type(e).__name__}: {msg} (set GENVL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
