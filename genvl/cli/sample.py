"""``genvl sample`` and ``genvl caption``: flags parsed into pipeline calls, images written as PNGs.

unCLIP, autoregressive and interleaved generation go through :mod:`genvl.pipelines`; diffusers
directories through
:mod:`genvl.sampling.external`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from genvl import runtime
from genvl.cli.common import (
    Formatter,
    limited,
    load_images,
    seed_arg,
)
from genvl.errors import GenvlError
from genvl.limits import (
    MAX_BATCH_SIZE,
    MAX_DOC_IMAGES,
    MAX_FRAMES,
    MAX_IMAGES,
    MAX_NEW_TOKENS,
    MAX_PRIOR_CANDIDATES,
    MAX_STEPS,
)
from genvl.runtime import SAMPLE_OPTION_DEFAULTS as DEFAULTS
from genvl.runtime import choose_device, open_model


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
    if args.model is None and not runtime.has_demo():
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
    device = choose_device(args.device)
    model_path = Path(args.model) if args.model else runtime.DEMO_DIR

    from genvl.sampling.external import detect_external

    if args.model and detect_external(model_path):
        return _sample_external(args, model_path, device)

    from genvl.pipelines import UnclipPipeline
    from genvl.sampling import unclip
    from genvl.sampling.io import slug

    pipe = UnclipPipeline.from_pretrained(open_model(args.model, "sampling"), device=device)
    pipe.name = str(model_path)
    given = {k: getattr(args, k) for k in ("steps", "guidance", "scheduler", "coarse_start", "sr_steps")}
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
                           size=args.size, sr_steps=args.sr_steps, progress=not args.no_progress)
    meta = {"model": str(path), "method": f"external:{pipe.kind}", "prompt": args.prompt, "seed": args.seed,
            "steps": args.steps, "prior_steps": args.prior_steps, "guidance": args.guidance,
            "prior_guidance": args.prior_guidance}
    for p in _write_images(images, args, meta, f"{slug(args.prompt)}-s{args.seed}"):
        print(p)
    return 0


# ------------------------------------------------------------------------------------ interleaved
def _sample_interleaved(args) -> int:
    """``genvl sample --method interleaved [PROMPT | --prompt-file DOC.jsonl]``: continue a document of
    text and images; each writes a folder with doc.html, doc.jsonl and PNGs, whose doc.html is printed."""
    from genvl.pipelines import InterleavedPipeline
    from genvl.sampling.autoregressive import check_sampling
    from genvl.sampling.interleaved import read_prompt_file, write_document
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
    md = open_model(args.model, "--method interleaved")
    md.require("interleaved", "clip", "decoder", purpose="--method interleaved")
    pipe = InterleavedPipeline.from_pretrained(md, device=choose_device(args.device))
    for n, prompt in enumerate(prompts):
        out = pipe(prompt, max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   image_guidance=args.image_guidance, force_image=args.force_image, steps=args.steps,
                   guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                   progress=not args.no_progress).document
        source = f"{args.prompt_file}:{n + 1}" if args.prompt_file else args.prompt
        first = next((s["text"] for s in out.segments if "text" in s and s["text"].strip()), "document")
        files = write_document(out, Path(args.out), f"{slug(first, 30)}-s{args.seed}",
                               {"model": str(md.path), "prompt": source})
        print(files.html)
    return 0


# --------------------------------------------------------------------------------- autoregressive
def _sample_ar(args) -> int:
    """``genvl sample --method ar PROMPT``: the token LM writes image codes, the VQ-VAE draws them."""
    from genvl.pipelines import ARPipeline
    from genvl.sampling.autoregressive import check_sampling
    from genvl.sampling.io import slug

    if args.variations or args.interpolate:
        raise GenvlError("--variations and --interpolate work with --method unclip, not ar")
    check_sampling(args.temperature, args.top_k, args.top_p)
    pipe = ARPipeline.from_pretrained(open_model(args.model, "--method ar"), device=choose_device(args.device),
                                      purpose="--method ar")
    pipe.name = str(Path(args.model) if args.model else runtime.DEMO_DIR)
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
    pipe = ARPipeline.from_pretrained(open_model(args.model, "captioning"), device=choose_device(args.device),
                                      purpose="captioning")
    images = load_images(args.images, pipe.image_size)  # (B, 3, S, S); unreadable files: one-line errors
    texts = pipe.caption(images, max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def add_sample_parser(sub) -> None:
    """Add ``sample`` to the subcommands ``sub``."""
    s = sub.add_parser("sample", help="generate images from a prompt", formatter_class=Formatter,
                       description="Generate images from a text prompt. Without --model the built-in demo model is used.")
    s.add_argument("prompt", nargs="?", help="the text to draw (--method interleaved: the start of the document)")
    s.add_argument("--model", help="model directory, or a diffusers Kandinsky 2.2 / unCLIP directory "
                   "(default: the built-in demo)")
    s.add_argument("--method", choices=["unclip", "ar", "interleaved"], default="unclip", help="generation method")
    s.add_argument("--out", default="samples", help="output folder, or a .png path (several images: a grid); "
                   "an existing file is never replaced: the new one takes the next free name (a-1.png), printed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out .png / .gif file instead")
    s.add_argument("--num-images", type=limited(MAX_IMAGES, "images per prompt"), default=DEFAULTS["num_images"],
                   help="images to generate")
    s.add_argument("--grid", action="store_true", help="write several images as one grid PNG")
    s.add_argument("--seed", type=seed_arg, default=DEFAULTS["seed"],
                   help="random seed; the same seed gives the same image")
    s.add_argument("--steps", type=limited(MAX_STEPS, "steps"), help="decoder diffusion steps (default: the "
                   "model's recommended setting, else 50)")
    s.add_argument("--prior-steps", type=limited(MAX_STEPS, "steps"), help="prior diffusion steps (default: "
                   "model's, else 25)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance of the decoder (or AR model), 1 = none "
                   "(default: the model's, else 3)")
    s.add_argument("--prior-guidance", type=float, help="prior classifier-free guidance, 1 = none "
                   "(default: model's, else 4)")
    s.add_argument("--prior-candidates", type=limited(MAX_PRIOR_CANDIDATES, "candidates per image"),
                   help="embeddings the prior samples per image; the one "
                   "closest to the prompt's CLIP text embedding is drawn (default: model's, else 1)")
    s.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help="--method ar: sampling temperature (0 = greedy)")
    s.add_argument("--top-k", type=int, default=DEFAULTS["top_k"],
                   help="--method ar: sample among the k likeliest codes (0 = all)")
    s.add_argument("--top-p", type=float, default=DEFAULTS["top_p"],
                   help="--method ar: nucleus sampling mass (1 = off)")
    s.add_argument("--fast", action="store_true", help="--method ar on CUDA: static KV cache + CUDA graphs "
                   "(compiles on first use)")
    s.add_argument("--scheduler", help="ddpm, ddim or dpm++ (default: model's, else ddim)")
    s.add_argument("--sr-steps", type=limited(MAX_STEPS, "steps"), help="super-resolution diffusion steps, with "
                   "the decoder's scheduler (default: the model's, else 25; models without the stage ignore it)")
    s.add_argument("--size", type=int, help="output size in pixels (default: the model's)")
    s.add_argument("--prompt-file", metavar="DOC.jsonl", help="--method interleaved: prompt documents of text and "
                   "images (interleaved JSONL, one per line)")
    s.add_argument("--max-new-tokens", type=limited(MAX_NEW_TOKENS, "tokens"),
                   help="--method interleaved: most text tokens to write (default 48)")
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
    s.add_argument("--frames", type=limited(MAX_FRAMES, "frames", lo=2), default=DEFAULTS["frames"],
                   help="frames for --interpolate")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)


def add_caption_parser(sub) -> None:
    """Add ``caption`` to the subcommands ``sub``."""
    c = sub.add_parser("caption", help="describe images with the token LM", formatter_class=Formatter,
                       description="Image -> text with the autoregressive token LM (a model directory holding lm,\n"
                       "vqvae and tokenizer/). Prints one 'path<TAB>caption' line per image.")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", help="model directory (default: the built-in demo)")
    c.add_argument("--max-tokens", type=limited(MAX_NEW_TOKENS, "tokens"), default=32, help="most tokens per caption")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    c.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    c.add_argument("--seed", type=seed_arg, default=0, help="random seed (used when temperature > 0)")
    c.add_argument("--batch-size", type=limited(MAX_BATCH_SIZE, "images per batch"), default=32,
                   help="images captioned per batch")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    c.set_defaults(func=cmd_caption)
