"""``genvl data check | tokenize | shard | embed``: inspect a dataset, pre-encode it to image codes
(VQ-VAE) or CLIP embeddings, or rewrite it as webdataset shards for streaming."""

from __future__ import annotations

import os
from pathlib import Path

from genvl.cli.common import Formatter, Parser, limited
from genvl.errors import GenvlError
from genvl.limits import MAX_BATCH_SIZE
from genvl.runtime import choose_device, open_model


def cmd_data(args) -> int:
    if args.data_cmd == "check":
        from genvl.data.check import check_dataset, format_report

        report = check_dataset(args.path, progress=not args.no_progress)
        print(format_report(report))
        return 0
    if args.data_cmd == "tokenize":
        return _data_tokenize(args)
    if args.data_cmd == "shard":
        from genvl.data.shards import write_shards

        res = write_shards(args.path, args.out, samples_per_shard=args.samples_per_shard, max_size=args.max_size,
                           progress=not args.no_progress)
        print(f"genvl: {res.samples} pairs of {args.path} -> {len(res.shards)} shard(s) in {args.out}"
              + (f" ({res.skipped} bad files skipped)" if res.skipped else ""))
        return 0
    if args.data_cmd == "embed":
        from genvl.data.embeddings import embed_image_text

        meta = embed_image_text(open_model(args.model, "embedding a dataset").path, args.path, args.out,
                                batch_size=args.batch_size, shard_size=args.shard_size,
                                device=choose_device(args.device), progress=not args.no_progress)
        print(f"genvl: CLIP embeddings of {meta['count']} pairs of {args.path} in {args.out} "
              f"({len(meta['shards'])} shard(s))")
        return 0
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
    md = open_model(args.model, "tokenizing a dataset")
    md.require("vqvae", purpose="genvl data tokenize")
    device = choose_device(args.device)
    vq = md.load("vqvae", device=device)
    ds = open_image_text(args.path, image_size=vq.config.image_size, progress=not args.no_progress)
    res = tokenize_dataset(vq, ds, out, batch_size=args.batch_size, progress=not args.no_progress,
                           meta={"model": str(md.path), "source": str(args.path)},
                           weights=md.path / "vqvae" / "model.safetensors")
    n, h, w = res.codes.shape
    print(f"genvl: {n} images of {args.path} -> {h}x{w} codes each in {out}, captions in {tokenized_sidecar(out)}"
          + (f" ({len(ds.skipped)} bad files skipped)" if ds.skipped else ""))
    return 0


# ----------------------------------------------------------------------------------------- parser
# The actions that run a model component over every image: component, --out, help, description.
_ENCODER_ACTIONS = {
    "tokenize": ("vqvae", "output .safetensors file", "pre-encode a dataset to image codes (with the VQ-VAE)",
                 "Encode every image of a dataset with the model's VQ-VAE (fast token-LM training).\n"
                 "Writes OUT (.safetensors: codes (N, h, w) int16) and OUT with .jsonl beside it\n"
                 "(file_name, text per row); read back with genvl.data.load_tokenized(OUT)."),
    "embed": ("clip", "output folder", "precompute CLIP embeddings of a dataset",
              "Write the model CLIP's image and text embeddings and text token states of every\n"
              "pair of PATH into OUT (safetensors shards + embeddings.json, read by\n"
              "genvl.data.embeddings.EmbeddingSet); an interrupted run resumes at its first missing shard."),
}


def _encoder_args(p, component: str, out_help: str):
    """``p`` with the arguments of an action that runs a model's ``component`` over every image of a
    dataset."""
    p.add_argument("path", help="dataset path")
    p.add_argument("--model", help=f"model directory holding a {component} (default: the built-in demo)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--batch-size", type=limited(MAX_BATCH_SIZE, "images per batch"), default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_parsers(sub) -> None:
    """Add ``data`` and its actions to the subcommands ``sub``."""
    d = sub.add_parser("data", help="inspect, pre-encode or shard datasets", formatter_class=Formatter,
                       description="Inspect a dataset (check), pre-encode its images to VQ-VAE codes (tokenize) or\n"
                       "CLIP embeddings (embed), or rewrite it as webdataset shards (shard).\n"
                       "The demo's emoji image-caption set is built by scripts/emoji_set.py of the source tree.")
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION", parser_class=Parser)
    dsub.required = True

    def action(name: str, help: str, description: str | None = None):
        return dsub.add_parser(name, help=help, description=description, formatter_class=Formatter)

    dc = action("check", "count pairs, sizes, caption lengths and bad files")
    dc.add_argument("path", help="dataset path")
    dc.add_argument("--no-progress", action="store_true")
    enc = {name: _encoder_args(action(name, help, description), component, out_help)
           for name, (component, out_help, help, description) in _ENCODER_ACTIONS.items()}
    dt, de = enc["tokenize"], enc["embed"]
    dt.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and its .jsonl)")
    ds = action("shard", "rewrite a dataset as webdataset .tar shards (img2dataset's layout)",
                "Write every pair of PATH (any format genvl reads) into OUT/00000.tar, 00001.tar, ...\n"
                "as KEY.jpg|png + KEY.txt + KEY.json, with 00000_stats.json beside each shard: the layout\n"
                "img2dataset writes, which genvl.data.streaming streams.")
    ds.add_argument("path", help="dataset path")
    ds.add_argument("out", help="output folder (must not hold shards yet)")
    ds.add_argument("--samples-per-shard", type=int, default=10_000, help="most pairs in one shard")
    ds.add_argument("--max-size", type=int, default=1 << 30, help="most bytes in one shard")
    ds.add_argument("--no-progress", action="store_true")
    de.add_argument("--shard-size", type=int, default=4096, help="rows per shard")
    d.set_defaults(func=cmd_data)
