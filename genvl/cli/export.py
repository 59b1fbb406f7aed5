"""``genvl export DIR --to diffusers|transformers|peft OUT``: a model's components in the formats
of the libraries they are built on; ``genvl import EXPORT... --out DIR``: back (see :mod:`genvl.export`)."""

from __future__ import annotations

from genvl.cli.common import Formatter
from genvl.runtime import open_model


def cmd_export(args) -> int:
    from genvl.export import export_model

    md = open_model(args.model, "export")
    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    record = export_model(md, args.to, args.out, components=comps)
    for name, entry in record["components"].items():
        print(f"genvl: {name} -> {args.out}/{name} ({entry['class']})")
    print(f"genvl: what each expects is in {args.out}/export.json")
    return 0


def cmd_import(args) -> int:
    from genvl.export import import_model

    md = import_model(args.folders, args.out, base=args.base)
    print(f"genvl: {', '.join(md.components)} from {', '.join(args.folders)} -> {args.out}")
    return 0


def add_parsers(sub) -> None:
    from genvl.export import EXPORT_FORMATS

    takes = "\n".join(f"  --to {k:<13} {', '.join(v)}" for k, v in EXPORT_FORMATS.items())
    e = sub.add_parser("export", help="write components in diffusers / transformers / peft formats",
                       formatter_class=Formatter,
                       description="Write a model's components as the libraries they are built on save them, loadable\n"
                       "with those libraries' own from_pretrained and computing the same outputs:\n" + takes + "\n"
                       "(peft: the LoRA adapter components, over the base exported with the other formats).\n"
                       "OUT/export.json says what each component expects as inputs.")
    e.add_argument("model", help="model directory, or demo for the built-in one")
    e.add_argument("--to", required=True, choices=sorted(EXPORT_FORMATS), help="target format")
    e.add_argument("out", help="output folder (new or empty)")
    e.add_argument("--components", help="comma-separated components (default: every one the format takes)")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("import", help="a genvl model directory from genvl export folders", formatter_class=Formatter,
                       description="Rebuild a genvl model directory from folders genvl export wrote (diffusers and / or\n"
                       "transformers), taking each component's weights as the folder holds them now, e.g. after\n"
                       "finetuning them with those libraries; peft adapter folders become LoRA components over\n"
                       "--base.")
    i.add_argument("folders", nargs="+", help="genvl export output folders")
    i.add_argument("--out", required=True, help="the new model directory")
    i.add_argument("--base", help="peft adapter exports: the model directory they adapt (its other components "
                   "are referred to, not copied)")
    i.set_defaults(func=cmd_import)
