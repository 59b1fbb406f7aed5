"""``genvl train STAGE`` (one stage into a model directory) and ``genvl train t2i`` (the whole
text-to-image model in one command): flags parsed into :mod:`genvl.training` calls."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from genvl.cli.common import Formatter
from genvl.errors import GenvlError


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


def parse_budget(text: str) -> float:
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
    budget = parse_budget(args.budget or "45m")
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


# ----------------------------------------------------------------------------------------- parser
DESCRIPTION = """\
Train one stage on an image-text dataset into a model directory.

Stages: tokenizer, clip, prior, decoder, sr, vqvae, lm, interleaved (those not in this
version say so). Finetune with --init DIR (or --init demo); LoRA: --set lora_rank=8.
The recipe comes from --config (a YAML file or a built-in name: tiny, demo-decoder, ...)
with --set key=value overrides;
e.g. --set max_steps=500 --set data.image_size=64 --set model.size=small.
Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml -m genvl train ...

genvl train t2i --data DIR --out OUT [--init demo|DIR|scratch] [--budget 45m]: the whole
text-to-image model (tokenizer and CLIP when needed, prior, decoder, upsampler with
--superres N), each stage sized to the data and the budget, one progress bar; the same
command again resumes where it stopped."""


def add_parsers(sub) -> None:
    """Add ``train`` to the subcommands ``sub``."""
    t = sub.add_parser("train", help="train one stage", formatter_class=Formatter,
                       description=DESCRIPTION)
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
