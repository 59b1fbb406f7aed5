"""What the UI's buttons do, as plain functions (no streamlit here, so tests call them directly).

Every action calls the pipeline that ``genvl sample`` / ``genvl classify`` calls, starting from the
settings the command line uses when no option is given (the pipeline's resolution of the model
directory's recommended settings, and :mod:`genvl.runtime`'s starting values), and returns images
together with the metadata their PNGs carry -- the same keys ``genvl sample`` writes.

Bad input raises :class:`~genvl.errors.GenvlError` with a one-line message, which the page shows.

Generation methods are a registry (:data:`METHODS`): a method names the components it needs, the
settings it takes, how to load its parts and how to run. The page offers the methods whose
components the model directory has. Adding one (e.g. interleaved generation) is one
:func:`register_method` call; see the note above :data:`METHODS`.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from genvl import runtime
from genvl.errors import GenvlError
from genvl.limits import MAX_FRAMES, MAX_IMAGES, MAX_SEED, MAX_STEPS  # noqa: F401 - shared with the CLI
from genvl.ui.options import OPTIONS, Option, check_prompt, check_settings  # noqa: F401 - the page's settings

DISPLAY_PX = 192  # small images are shown enlarged (nearest neighbour) to at least this size

# An interpolation endpoint: a prompt, or (file name, image).
Endpoint = Union[str, tuple[str, Image.Image]]


# ------------------------------------------------------------------------------------- settings
def sample_defaults(md, method: str = "unclip", parts=None) -> dict[str, Any]:
    """The settings ``genvl sample --method METHOD --model DIR`` uses when given no options.

    The front ends' starting values (:data:`genvl.runtime.SAMPLE_OPTION_DEFAULTS`: images, seed, ...)
    with the settings the method's pipeline resolves from the model directory's recommended ones.

    Args:
        md: the model directory.
        method: a key of :data:`METHODS`.
        parts: the method's loaded parts (``METHODS[method].load``); None loads them on the CPU.
    """
    m = METHODS[method]
    if parts is None:
        parts = m.load(md, "cpu")
    return {**runtime.SAMPLE_OPTION_DEFAULTS, **m.defaults(parts, md)}


# ------------------------------------------------------------------------------------- progress
class StepTracker:
    """Turns the pipelines' per-step ``progress(stage, step, total)`` calls into one overall fraction.

    Args:
        report: called with (fraction in [0, 1], text) after every step.
        expected: the steps the whole run takes (0 = unknown: each stage then fills the bar anew).
    """

    def __init__(self, report: Callable[[float, str], None], expected: int = 0):
        self.report = report
        self.expected = expected
        self.done = 0

    def __call__(self, stage: str, step: int, total: int) -> None:
        frac = (self.done + step) / max(self.expected, self.done + total, 1)
        if step >= total:
            self.done += total
        self.report(min(frac, 1.0), f"{stage}: step {step} of {total}")


def _sr_steps(pipe) -> int:
    """Super-resolution steps of a run with the pipeline's settings (0 without a super-res stage)."""
    return int(pipe.settings().get("sr_steps", 25)) if pipe.components.sr is not None else 0


# ------------------------------------------------------------------------------------- results
@dataclass
class Generation:
    """The images of one run, each with the metadata its PNG carries.

    Attributes:
        images: RGB PIL images at the model's resolution.
        metas: one metadata dict per image (the keys ``genvl sample`` writes, plus ``index``).
        seconds: wall time of the run.
        gif: an animated GIF of the images (interpolation), else None.
        segments: for a document of text and images (interleaved generation), its parts in order:
            ("text", str) or ("image", index into ``images``); None for a plain set of images.
    """

    images: list[Image.Image]
    metas: list[dict[str, Any]]
    seconds: float
    gif: bytes | None = None
    segments: list[tuple[str, Any]] | None = None

    @classmethod
    def of(cls, images: list[Image.Image], meta: dict[str, Any], t0: float, **extra) -> Generation:
        """The images of a run started at ``time.perf_counter()`` ``t0``, each with ``meta`` and its index."""
        return cls(images, [{**meta, "index": i} for i in range(len(images))], time.perf_counter() - t0, **extra)

    @property
    def summary(self) -> str:
        n = len(self.images)
        what = "frames" if self.gif is not None else ("image" if n == 1 else "images")
        return f"Finished: {n} {what} in {self.seconds:.1f} s"


def png_bytes(image: Image.Image, meta: dict[str, Any]) -> bytes:
    """The image as PNG bytes carrying ``meta`` in its text chunks (as ``genvl sample`` writes files)."""
    from genvl.sampling.io import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(meta))
    return buf.getvalue()


def gif_bytes(frames: list[Image.Image]) -> bytes:
    """An animated GIF of ``frames``, written by the same function as ``genvl sample --interpolate``."""
    from genvl.sampling.unclip import save_gif

    with tempfile.TemporaryDirectory() as tmp:
        path = save_gif(frames, Path(tmp) / "frames.gif")
        return path.read_bytes()


def for_display(image: Image.Image, min_px: int = DISPLAY_PX) -> Image.Image:
    """Enlarge a small image by a whole factor (nearest neighbour, so pixels stay crisp)."""
    k = max(1, math.ceil(min_px / max(image.size)))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def download_name(meta: dict[str, Any]) -> str:
    """A file name like ``genvl sample`` picks: prompt slug, seed and index."""
    from genvl.sampling.io import slug

    if "prompt" in meta:
        stem = f"{slug(meta['prompt'])}-s{meta.get('seed')}"
    elif "variations_of" in meta:
        stem = f"variation-{slug(Path(str(meta['variations_of'])).stem)}-s{meta.get('seed')}"
    elif "interpolate" in meta:
        a, b = (slug(Path(str(x)).stem if "." in str(x) else str(x), 20) for x in meta["interpolate"])
        stem = f"interpolate-{a}-{b}-s{meta.get('seed')}"
    else:
        stem = "sample"
    return f"{stem}-{meta.get('index', 0)}.png"


_CAPTION_KEYS = (
    ("prompt", "prompt"), ("variations_of", "variations of"), ("interpolate", "between"), ("method", "method"),
    ("seed", "seed"), ("steps", "steps"), ("prior_steps", "prior steps"), ("guidance", "guidance"),
    ("prior_guidance", "prior guidance"), ("scheduler", "scheduler"), ("temperature", "temperature"),
    ("top_k", "top-k"), ("top_p", "top-p"), ("invert", "inversion"), ("frames", "frames"),
)


def settings_caption(meta: dict[str, Any]) -> str:
    """The generation settings of an image in one line (shown under it)."""
    parts = []
    for key, label in _CAPTION_KEYS:
        if key not in meta or meta[key] is None:
            continue
        v = meta[key]
        if key == "prompt":
            parts.append(f"\u201c{v}\u201d")
            continue
        if isinstance(v, bool):
            v = "on" if v else "off"
        elif isinstance(v, list):
            v = " \u2192 ".join(str(x) for x in v)
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{label} {v}")
    if "index" in meta:
        parts.append(f"#{meta['index'] + 1}")
    return " \u00b7 ".join(parts)


# ---------------------------------------------------------------------------------- model dirs
def open_model(path: str | None):
    """The model directory at ``path`` (None: the built-in demo), as every ``genvl`` command opens it."""
    return runtime.open_model(path or None, "the UI")


def device() -> str:
    """Where models run: CUDA when there is one, else the CPU (``--device auto``)."""
    return runtime.choose_device("auto")


def card_blocks(md) -> list[tuple[str, str]]:
    """The model card split into ("markdown", text) and ("image", file path) blocks.

    Images the card links by a relative path (``![..](samples.png)``) are files in the model
    directory; the page shows them itself, since a browser cannot reach them by that path.
    """
    text = md.card or f"# {md.path.name}\n\n(This model directory has no README.md model card.)"
    blocks: list[tuple[str, str]] = []
    pos = 0
    for m in re.finditer(r"!\[[^\]]*\]\(([^)\s]+)\)", text):
        target = m.group(1)
        local = (md.path / target).resolve()
        if "://" in target or not local.is_file() or md.path.resolve() not in local.parents:
            continue
        blocks.append(("markdown", text[pos:m.start()]))
        blocks.append(("image", str(local)))
        pos = m.end()
    blocks.append(("markdown", text[pos:]))
    return [(k, v) for k, v in blocks if k == "image" or v.strip()]


# ------------------------------------------------------------------------------------- uploads
def read_image(name: str, data: bytes) -> Image.Image:
    """An uploaded file as an RGB image; a one-line error for other files or unreadable images."""
    from genvl.data.images import IMAGE_EXTENSIONS, load_rgb

    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise GenvlError(f"{name}: unsupported file type {suffix or '(none)'}; upload an image ({kinds})")
    try:
        return load_rgb(bytes(data))
    except GenvlError as e:
        raise GenvlError(f"{name}: cannot read image ({e})") from None


# ---------------------------------------------------------------------------- text-to-image methods
@dataclass(frozen=True)
class GenerationMethod:
    """A way to turn a prompt into images.

    Attributes:
        name: the ``genvl sample --method`` value.
        label: what the page calls it.
        requires: the model-directory components it needs.
        options: the settings it takes (keys of :data:`OPTIONS`), in the order the page shows them.
        load: (model dir, device) -> its parts; the page keeps the result for the process's lifetime.
        run: (parts, model dir, prompt, settings, tracker) -> :class:`Generation`.
        defaults: (parts, model dir) -> the sampling settings a run without options uses (the
            pipeline's); by default the model directory's recommended ones as the pipelines resolve them.
    """

    name: str
    label: str
    requires: tuple[str, ...]
    options: tuple[str, ...]
    load: Callable[[Any, str], Any]
    run: Callable[[Any, Any, str, dict, StepTracker], Generation]
    defaults: Callable[[Any, Any], dict] = lambda parts, md: recommended_settings(md)


def recommended_settings(md) -> dict[str, Any]:
    """The model directory's recommended sampling settings, completed as the pipelines complete them."""
    from genvl.pipelines.base import resolve_settings

    return resolve_settings(md.meta.get("sampling", {}), {})


def load_unclip(md, dev: str):
    """The unCLIP pipeline (clip, tokenizer, prior, decoder, super-res) of a model directory."""
    from genvl.pipelines import UnclipPipeline

    return UnclipPipeline.from_pretrained(md, device=dev)


def _coarse(s: dict, invert: bool = False) -> float:
    """The coarse start genvl sample uses with these settings (inverted noise sets its own start)."""
    return 1.0 if invert else float(s.get("coarse_start", 1.0))


def _run_unclip(pipe, md, prompt: str, s: dict, tracker: StepTracker) -> Generation:
    from genvl.sampling import unclip

    t0 = time.perf_counter()
    # settings the page has no box for (prior candidates, coarse start) are the model's, as in genvl sample
    tracker.expected = s["prior_steps"] + unclip.decoder_steps(s["steps"], _coarse(s)) + _sr_steps(pipe)
    out = pipe(prompt, num_images=s["num_images"], steps=s["steps"], prior_steps=s["prior_steps"],
               guidance=s["guidance"], prior_guidance=s["prior_guidance"], scheduler=s["scheduler"], seed=s["seed"],
               callback=tracker)
    return Generation.of(out.images, out.settings, t0)


def _load_ar(md, dev: str):
    from genvl.pipelines import ARPipeline

    return ARPipeline.from_pretrained(md, device=dev)


def _run_ar(pipe, md, prompt: str, s: dict, tracker: StepTracker) -> Generation:
    t0 = time.perf_counter()
    tracker.expected = pipe.vq.tokens_per_image
    out = pipe(prompt, num_images=s["num_images"], guidance=s["guidance"], temperature=s["temperature"],
               top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"], callback=tracker)
    return Generation.of(out.images, out.settings, t0)


# The generation methods, in the order the page lists them. A method is a ``load`` and a ``run`` like
# _load_ar / _run_ar above (``run`` passes the tracker as the pipeline's progress callback and returns the
# images with the metadata ``genvl sample`` writes, plus ``segments`` for a document of text and images)
# and, when its parts are a pipeline, ``defaults`` read from that pipeline; register_method adds it. The
# page offers it for every model directory holding its components (settings OPTIONS lacks go there first).
METHODS: dict[str, GenerationMethod] = {}


def register_method(method: GenerationMethod) -> None:
    """Add (or replace) a generation method offered by the page."""
    unknown = [o for o in method.options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"method {method.name!r}: unknown options {unknown} (known: {', '.join(OPTIONS)})")
    METHODS[method.name] = method


register_method(GenerationMethod(
    "unclip", "unCLIP (prior + decoder)", ("clip", "prior", "decoder"),
    ("num_images", "steps", "prior_steps", "guidance", "prior_guidance", "scheduler"), load_unclip, _run_unclip,
    lambda pipe, md: pipe.settings()))
register_method(GenerationMethod(
    "ar", "Autoregressive (token LM + VQ-VAE)", ("lm", "vqvae"),
    ("num_images", "guidance", "temperature", "top_k", "top_p"), _load_ar, _run_ar,
    lambda pipe, md: {"guidance": pipe.guidance}))


def _load_interleaved(md, dev: str):
    from genvl.pipelines import InterleavedPipeline

    return InterleavedPipeline.from_pretrained(md, device=dev)


def _run_interleaved(pipe, md, prompt: str, s: dict, tracker: StepTracker) -> Generation:
    """Continue the prompt as a document (the model decides whether to draw); one image at most."""
    from genvl.sampling.io import to_pil_images

    t0 = time.perf_counter()
    tracker.expected = s["steps"]
    out = pipe(prompt, max_images=1, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
               steps=s["steps"], guidance=s["guidance"], scheduler=s["scheduler"], seed=s["seed"], callback=tracker)
    meta = {"model": str(md.path), "method": "interleaved", "prompt": prompt, "seed": s["seed"],
            **{k: s[k] for k in ("steps", "guidance", "scheduler", "temperature", "top_k", "top_p")},
            "image_guidance": out.settings["image_guidance"]}
    images, segments = [], []
    for seg in out.segments:
        if "text" in seg:
            segments.append(("text", seg["text"]))
        elif seg.get("image") is not None:
            images += to_pil_images(seg["image"][None])
            segments.append(("image", len(images) - 1))
    return Generation.of(images, meta, t0, segments=segments)


register_method(GenerationMethod(
    "interleaved", "Interleaved (text and images)", ("interleaved", "clip", "decoder"),
    ("steps", "guidance", "scheduler", "temperature", "top_k", "top_p"), _load_interleaved, _run_interleaved,
    lambda pipe, md: pipe.settings()))


def generation_methods(md) -> list[GenerationMethod]:
    """The registered methods whose components the model directory has."""
    return [m for m in METHODS.values() if all(md.has(c) for c in m.requires)]


def generate(method: GenerationMethod, parts, md, prompt: str | None, settings: dict,
             tracker: StepTracker) -> Generation:
    """Check the prompt and settings, then run ``method`` (the page loads ``parts`` once per process)."""
    prompt = check_prompt(prompt)
    check_settings(settings, ("seed", *method.options))
    return method.run(parts, md, prompt, settings, tracker)


def check_generation_input(method: GenerationMethod, prompt: str | None, settings: dict) -> None:
    """The checks of :func:`generate` alone (so the page fails fast, before loading any model)."""
    check_prompt(prompt)
    check_settings(settings, ("seed", *method.options))


# ------------------------------------------------------------------------- variations, interpolation
VARIATION_OPTIONS = ("num_images", "steps", "guidance", "scheduler", "invert")
INTERPOLATION_OPTIONS = ("frames", "steps", "prior_steps", "guidance", "prior_guidance", "scheduler")


def variations(pipe, md, name: str, image: Image.Image, s: dict, tracker: StepTracker) -> Generation:
    """Variations of an uploaded image (``genvl sample --variations IMAGE``)."""
    from genvl.sampling import unclip

    check_settings(s, ("seed", *VARIATION_OPTIONS))
    t0 = time.perf_counter()
    coarse = _coarse(s, invert=bool(s["invert"]))
    tracker.expected = unclip.decoder_steps(s["steps"], coarse) + (50 if s["invert"] else 0) + _sr_steps(pipe)
    out = pipe.variations(image, num_images=s["num_images"], steps=s["steps"], guidance=s["guidance"],
                          scheduler=s["scheduler"], seed=s["seed"], invert=bool(s["invert"]), callback=tracker)
    meta = {**out.settings, "variations_of": name}
    return Generation.of(out.images, meta, t0)


def _endpoint_label(e: Endpoint) -> str:
    return e if isinstance(e, str) else e[0]


def interpolation(pipe, md, a: Endpoint, b: Endpoint, s: dict, tracker: StepTracker) -> Generation:
    """Frames between two prompts or images in CLIP space (``genvl sample --interpolate A B``).

    Args:
        a, b: a prompt, or (file name, image).
    """
    from genvl.sampling import unclip

    a = check_prompt(a, "prompt A") if isinstance(a, str) or a is None else a
    b = check_prompt(b, "prompt B") if isinstance(b, str) or b is None else b
    check_settings(s, ("seed", *INTERPOLATION_OPTIONS))
    t0 = time.perf_counter()
    prompts = sum(isinstance(e, str) for e in (a, b))
    tracker.expected = prompts * s["prior_steps"] + unclip.decoder_steps(s["steps"], _coarse(s)) + _sr_steps(pipe)
    out = pipe.interpolate(a if isinstance(a, str) else a[1], b if isinstance(b, str) else b[1], frames=s["frames"],
                           steps=s["steps"], guidance=s["guidance"], prior_steps=s["prior_steps"],
                           prior_guidance=s["prior_guidance"], scheduler=s["scheduler"], seed=s["seed"],
                           callback=tracker)
    meta = {**out.settings, "interpolate": [_endpoint_label(a), _endpoint_label(b)]}
    return Generation.of(out.images, meta, t0, gif=gif_bytes(out.images))


# -------------------------------------------------------------------------------- classification
def classify_methods(md) -> list[str]:
    """The zero-shot methods the model directory supports (``genvl classify --method``)."""
    from genvl.classify import supported_methods

    return supported_methods(md)


def classify_defaults() -> dict[str, Any]:
    """``genvl classify``'s defaults: method, samples, seed, template."""
    return dict(runtime.CLASSIFY_DEFAULTS)


def parse_classes(text: str | None) -> list[str]:
    """Class names from comma- or line-separated text (checked by :func:`genvl.classify.expand_classes`)."""
    from genvl.classify import expand_classes

    if text is None or not text.strip():
        raise GenvlError("no class names: enter at least two, separated by commas (e.g. \"a cat, a dog\")")
    names = [c.strip() for c in re.split(r"[,\n]", text) if c.strip()]
    expand_classes(names)
    return names


def load_classifier(md, method: str, dev: str, samples: int | None = None, seed: int = 0):
    """A scorer for ``method``, built as ``genvl classify --method METHOD`` builds it."""
    from genvl.classify import load_classifier as _load

    return _load(md, method, device=dev, samples=samples, seed=seed)


@dataclass
class Classification:
    """Probabilities of every image under every method.

    Attributes:
        names: the image file names.
        classes: the class names, in column order.
        probs: method -> (N, C) nested list of probabilities.
        temperatures: method -> the softmax temperature used.
        evals_per_image: method -> model evaluations spent per image.
        seconds: wall time.
    """

    names: list[str]
    classes: list[str]
    probs: dict[str, list[list[float]]] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)
    evals_per_image: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def check_classify_input(images: Sequence[tuple[str, Image.Image]], classes_text: str | None,
                         template: str | None, methods: Sequence[str], samples: int | None) -> list[str]:
    """The class names, or a one-line error for missing images, classes, methods or a bad template."""
    from genvl.classify import expand_classes

    if not images:
        raise GenvlError("no images: upload at least one image to classify")
    if not methods:
        raise GenvlError("no method chosen: pick at least one scoring method")
    if samples is not None and (not isinstance(samples, int) or not 1 <= samples <= 4096):
        raise GenvlError(f"Samples must be between 1 and 4096, got {samples}")
    classes = parse_classes(classes_text)
    expand_classes(classes, template or None)
    return classes


def classify_images(md, classifiers: dict[str, Any], images: Sequence[tuple[str, Image.Image]], classes: list[str],
                    template: str | None = None) -> Classification:
    """Score uploaded images against class names with every classifier (as ``genvl classify`` does).

    Args:
        md: the model directory (its fitted temperatures).
        classifiers: method -> scorer from :func:`load_classifier`.
        images: (file name, RGB image) pairs.
        classes: class names.
        template: prompt template with ``{}``, or None.
    """
    import torch

    from genvl.classify import classify
    from genvl.data import resize_center_crop, to_tensor

    t0 = time.perf_counter()
    res = Classification(names=[n for n, _ in images], classes=list(classes))
    for method, clf in classifiers.items():
        pixels = torch.stack([to_tensor(resize_center_crop(im, clf.image_size)) for _, im in images])
        out = classify(clf, pixels, classes, template=template or None,
                       temperature=runtime.classify_temperature(md, method))
        res.classes = out.classes
        res.probs[method] = out.probs.tolist()
        res.temperatures[method] = out.temperature
        res.evals_per_image[method] = out.evals_per_image
    res.seconds = time.perf_counter() - t0
    return res
