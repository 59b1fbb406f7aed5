"""Copy a trained text-to-image model directory into genvl/assets/demo, the built-in demo model.

    python scripts/package_demo.py runs/demo genvl/assets/demo [--extra runs/demo-ar]
        [--generation runs/demo-generation.json] [--half] [--grid configs/demo-prompts.txt]

Only what sampling needs travels (components, tokenizer, genvl.json, the model card, and the
evaluation sample grid); training logs and checkpoints stay in the run directory. ``--extra``
adds the components of another run directory that shares the tokenizer (the VQ-VAE and token LM),
with their measurements; a component the run already holds with the same weights (carried along by
``--init``) keeps the extra's measurement of it.
``--half`` stores floating-point weights as float16 (loading casts them back to float32), which
halves the size. The card gets a description of how the model was built. ``--grid PROMPTS`` renders
its sample grid anew at the model's default size (through the upsampler when there is one); the
packaged demo itself can be the run, to add a component (``--extra``) to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from genvl.checkpoint import TOKENIZER_DIR, open_model_dir, read_meta, write_meta, write_model_card

LIMIT_MB = 40
#: The evaluation an added component brings along into the card.
METRIC_OF = {"vqvae": "reconstruction", "interleaved": "interleaved"}


def _to_half(root: Path) -> None:
    """Rewrite every component's model.safetensors with float32 tensors as float16."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in root.glob("*/model.safetensors"):
        state = load_file(str(f))
        half = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in state.items()}
        save_file(half, str(f), metadata={"format": "pt", "stored_as": "float16"})


PART_NAMES = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def _parts(name: str, rec: dict, depth: int = 0) -> list[dict]:
    """The training records of component ``name``, oldest first, ending with ``rec``: the runs it
    continued through ``--init``, followed back. A packaged directory (this script's output) lists its
    earlier parts itself as ``NAME, first part``, ...; a run directory only its last, whose own
    ``init`` leads further back."""
    init = Path(rec.get("init", ""))
    if not rec.get("init") or rec.get("fresh") or depth > 16 or not (init / "genvl.json").is_file():
        return [rec]
    records = read_meta(init).get("training", {})
    if name not in records or records[name] == rec:
        return [rec]
    packaged = [v for k, v in records.items() if k.startswith(f"{name}, ")]
    earlier = packaged + [records[name]] if packaged else _parts(name, records[name], depth + 1)
    return earlier + [rec]


def _with_history(name: str, rec: dict) -> dict:
    """``{"NAME, first part": ..., "NAME, second part": ..., "NAME": rec}``: a component's training
    records in order; the last one, under the bare name, made the weights that ship."""
    parts = _parts(name, rec)
    out = {}
    for i, part in enumerate(parts[:-1]):
        out[f"{name}, {PART_NAMES[i]} part" if i < len(PART_NAMES) else f"{name}, part {i + 1}"] = part
    out[name] = rec
    return out


def _seconds(rec: dict) -> float:
    """A training record's time ("4879 s") in seconds; 0 when absent or unreadable."""
    try:
        return float(str(rec.get("time", "0")).split()[0])
    except ValueError:
        return 0.0


def _decoder_summary(meta: dict, root: Path) -> str:
    """One sentence on how the decoder was trained, from its training records: size, parts, steps, time."""
    from genvl.models.decoder import Decoder
    from genvl.checkpoint import load_component

    parts = [rec for k, rec in meta.get("training", {}).items() if k == "decoder" or k.startswith("decoder, ")]
    if not parts:
        return ""
    params = load_component(root / "decoder", Decoder).num_parameters
    steps = [int(rec.get("steps", 0)) for rec in parts]
    hours = sum(_seconds(rec) for rec in parts) / 3600
    hardware = sorted({rec.get("hardware", "?") for rec in parts})
    return (f"Its {params / 1e6:.1f}M-parameter decoder trained {sum(steps):,} steps in {len(parts)} parts "
            f"({' + '.join(f'{n:,}' for n in steps)}), {hours:.1f} hours on {' and '.join(hardware)}.")


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two component folders hold byte-identical config and weights."""
    files = ("config.json", "model.safetensors")
    return all((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _vocabulary(path: Path) -> dict:
    """A tokenizer.json without its runtime padding / truncation state (saved as last used)."""
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("padding", "truncation")}


def _render_grid(root: Path, meta: dict, prompts: list[str], path: Path) -> int:
    """4 images per prompt (one row each, seed 0) with the model's recommended settings; returns their size."""
    from genvl.sampling.io import make_grid, to_pil_images
    from genvl.sampling.unclip import UnclipComponents, text_to_image

    write_meta(root, meta)
    comps = UnclipComponents.from_model_dir(open_model_dir(root))
    images = []
    for prompt in prompts:
        images += to_pil_images(text_to_image(comps, [prompt], num_images=4, seed=0, progress=False,
                                              **meta.get("sampling", {})).images)
    make_grid(images, ncols=4).save(path)
    return images[0].size[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained model directory (clip + prior + decoder)")
    ap.add_argument("dest", help="where the demo goes (replaced)")
    ap.add_argument("--generation", help="JSON written by genvl evaluate generation --json (its PNG grid is copied)")
    ap.add_argument("--extra", action="append", default=[], help="another run directory whose components to add")
    ap.add_argument("--half", action="store_true", help="store float weights as float16")
    ap.add_argument("--summary", help="what the model draws (looked at), for the card's description")
    ap.add_argument("--grid", metavar="PROMPTS", help="render the card's samples.png anew: the prompts of this file, "
                    "4 images each, seed 0, the model's recommended settings and default size")
    args = ap.parse_args(argv)
    src, dest = Path(args.run), Path(args.dest)
    md = open_model_dir(src)
    md.require("clip", "prior", "decoder", purpose="the demo")
    # Built in a temporary folder outside the package (genvl's writers refuse paths inside it) and
    # named like the destination, whose name titles the card; then copied into place.
    work = Path(tempfile.mkdtemp(prefix="genvl-demo-"))
    tmp = work / dest.name
    tmp.mkdir()
    for name in md.components:
        if md.component_kind(name) != "full":
            sys.exit(f"{src / name}: the demo needs full components, not {md.component_kind(name)} folders")
        shutil.copytree(src / name, tmp / name)
    shutil.copytree(src / md.meta.get("tokenizer", TOKENIZER_DIR), tmp / TOKENIZER_DIR)
    meta = read_meta(src)
    history = {}
    for name, rec in meta.get("training", {}).items():
        history.update(_with_history(name, rec))
    for name, rec in meta.get("training", {}).items():
        if rec.get("fresh"):  # built new, replacing the init's component: its earlier records are not its own
            history = {k: v for k, v in history.items() if not k.startswith(f"{name}, ")}
    meta["training"] = history
    for extra_dir in args.extra:
        em = open_model_dir(extra_dir)
        if _vocabulary(em.path / TOKENIZER_DIR / "tokenizer.json") != _vocabulary(tmp / TOKENIZER_DIR / "tokenizer.json"):
            sys.exit(f"{extra_dir}: its tokenizer differs from {src}'s; its components cannot join this model")
        emeta = read_meta(extra_dir)
        for name in em.components:
            kind = METRIC_OF.get(name)
            if name in meta["components"]:
                # the run already holds it; if with the very same weights, the extra's measurement holds too
                if kind and kind in emeta.get("metrics", {}) and kind not in meta.get("metrics", {}) \
                        and _same_weights(src / name, em.path / name):
                    meta.setdefault("metrics", {})[kind] = emeta["metrics"][kind]
                continue
            shutil.copytree(em.path / name, tmp / name)
            meta["components"][name] = emeta["components"][name]
            if name in emeta.get("training", {}):
                meta.setdefault("training", {}).update(_with_history(name, emeta["training"][name]))
            if kind and kind in emeta.get("metrics", {}):
                meta.setdefault("metrics", {})[kind] = emeta["metrics"][kind]
    if args.half:
        _to_half(tmp)
    extra = ""
    if not args.generation and (src / "samples.png").is_file():  # repackaging a packaged demo keeps its grid
        shutil.copy(src / "samples.png", tmp / "samples.png")
        extra = meta.get("description", "").partition("\n\n")[2]
        extra = "\n\n" + extra if extra else ""
    if args.generation:
        grid = Path(args.generation).with_suffix(".png")
        if grid.is_file():
            shutil.copy(grid, tmp / "samples.png")
            extra = ("\n\n![evaluation prompts, 4 samples each](samples.png)\n\n"
                     "`samples.png`: the evaluation prompts (configs/demo-prompts.txt), one row each, seed 0.")
    from genvl.checkpoint import load_component
    from genvl.models.decoder import Decoder
    from genvl.models.superres import SuperRes

    dec_size = load_component(tmp / "decoder", Decoder).config.image_size
    size = f"{dec_size} px"
    if "sr" in meta["components"]:
        sr = load_component(tmp / "sr", SuperRes)
        size = (f"{sr.config.image_size} px (a {dec_size} px decoder, then a {sr.num_parameters / 1e6:.1f}M-parameter "
                f"{dec_size} -> {sr.config.image_size} px super-resolution UNet; `--size {dec_size}` skips it)")
    meta["description"] = (
        f"The built-in demo of genvl: DALL-E 2 style text-to-image at {size}, trained from scratch on the "
        "7,572 captioned emoji of `scripts/emoji_set.py` (Noto: Apache-2.0, Twemoji: CC-BY-4.0) with the recipes "
        "`genvl/recipes/demo-*.yaml`. " + (args.summary.strip() + " " if args.summary else "")
        + _decoder_summary(meta, tmp) + " Prompts outside that domain give the nearest emoji it knows. "
        "Rebuild it with `bash scripts/build_demo.sh` (the commands below, one stage after another). "
        "Recommended sampling settings are in `genvl.json` (`sampling`); the prior draws "
        f"{meta.get('sampling', {}).get('prior_candidates', 1)} candidate embedding(s) per image and keeps "
        "the one closest to the prompt. Also inside: a Parti-style VQ-VAE (8x8 codes of 512) + token LM "
        "(`genvl sample --method ar`, `genvl caption`) and an Emu-style interleaved LM (`genvl sample "
        "--method interleaved`) trained on the same emoji." + extra
    )
    if args.grid:
        prompts = [ln.strip() for ln in Path(args.grid).read_text().splitlines() if ln.strip()]
        out_px = _render_grid(tmp, meta, prompts, tmp / "samples.png")
        extra = (f"\n\n![evaluation prompts, 4 samples each](samples.png)\n\n`samples.png`: the evaluation prompts "
                 f"({args.grid}), one row each, seed 0, at the default {out_px} px.")
    meta["description"] = meta["description"].partition("\n\n")[0] + extra
    write_meta(tmp, meta)
    write_model_card(tmp, meta, shown_as=dest)
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
    if size > LIMIT_MB:
        shutil.rmtree(work)
        sys.exit(f"the demo would take {size:.1f} MB, over the {LIMIT_MB} MB limit")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tmp, dest)
    shutil.rmtree(work)
    print(f"demo model: {dest} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
