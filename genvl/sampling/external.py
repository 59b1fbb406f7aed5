"""Public diffusers-format text-to-image checkpoints, run offline: Kandinsky 2.2 and unCLIP (Karlo).

These checkpoints are whole diffusers pipelines whose components (PriorTransformer, UNets, MoVQ,
CLIP towers, schedulers) are diffusers' and transformers' own classes, so each component is loaded
with its class's ``from_pretrained(..., local_files_only=True)`` (a local directory, never the
network), the diffusers pipeline is built from them, and it is driven with genvl's sampling options.
Recognised directories (by ``model_index.json`` ``_class_name``)::

    DIR/model_index.json  "UnCLIPPipeline"                -> "unclip"    (kakaobrain/karlo-v1-alpha)
    DIR/model_index.json  "KandinskyV22CombinedPipeline"  -> "kandinsky22"
    DIR/prior/model_index.json   "KandinskyV22PriorPipeline"
    DIR/decoder/model_index.json "KandinskyV22Pipeline"   -> "kandinsky22" (a prior + decoder pair)
    DIR/model_index.json  "KandinskyV22PriorPipeline"     -> "kandinsky22-prior"   (half a pair)
    DIR/model_index.json  "KandinskyV22Pipeline"          -> "kandinsky22-decoder" (half a pair)

Kandinsky 2.2 text-to-image is two pipelines composed (as genvl's own unCLIP)::

    prompt ─► prior pipeline (CLIP text tower ─► PriorTransformer)  ─► image_embeds, negative_image_embeds (N, D)
           ─► decoder pipeline (UNet on MoVQ latents ─► MoVQ decode) ─► N images (H, W)

unCLIP (Karlo) is one pipeline: prior ─► 64 px decoder ─► super-resolution (fixed output size).
Randomness comes only from one CPU ``torch.Generator`` seeded with ``seed``, shared by the stages
in order, so the same seed gives the same images.

Usage::

    pipe = ExternalPipeline.from_dir("models/kandinsky-2-2")    # holds prior/ and decoder/
    images = pipe.generate("a red cat", num_images=2, steps=50, seed=0, size=512)
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from genvl.errors import GenvlError, ModelDirError, describe_load_error

INDEX_NAME = "model_index.json"

# model_index.json _class_name -> the kind detect_external reports
PIPELINE_KINDS: dict[str, str] = {
    "UnCLIPPipeline": "unclip",
    "KandinskyV22PriorPipeline": "kandinsky22-prior",
    "KandinskyV22Pipeline": "kandinsky22-decoder",
    "KandinskyV22CombinedPipeline": "kandinsky22",
}
# a Kandinsky 2.2 pair given as one directory: sub-directory -> the pipeline class it must hold
PAIR_PARTS: dict[str, str] = {"prior": "KandinskyV22PriorPipeline", "decoder": "KandinskyV22Pipeline"}

# Components are checked for the files their from_pretrained reads before diffusers is asked, so a
# missing part is named in one line instead of a traceback.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _text_proj_class() -> type:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel


# Component classes that are not importable by name from diffusers / transformers. Karlo's index
# names ["unclip", "UnCLIPTextProjModel"] (a module diffusers 0.42 no longer resolves), and diffusers'
# own save_pretrained writes ["diffusers", "UnCLIPTextProjModel"], which its loader cannot find either.
SPECIAL_CLASSES: dict[str, Any] = {"UnCLIPTextProjModel": _text_proj_class}
# the libraries component classes are taken from (by name, from the module's top level); nothing else is imported
LIBRARIES = ("diffusers", "transformers")

# model_index.json _class_name -> role -> (pipeline class genvl builds, prefix of its components in the index)
PIPELINE_ROLES: dict[str, dict[str, tuple[str, str]]] = {
    "UnCLIPPipeline": {"unclip": ("UnCLIPPipeline", "")},
    "KandinskyV22PriorPipeline": {"prior": ("KandinskyV22PriorPipeline", "")},
    "KandinskyV22Pipeline": {"decoder": ("KandinskyV22Pipeline", "")},
    "KandinskyV22CombinedPipeline": {
        "prior": ("KandinskyV22PriorPipeline", "prior_"),
        "decoder": ("KandinskyV22Pipeline", ""),
    },
}


@dataclass
class SamplingDefaults:
    """The steps and guidance used when ``generate`` is not told (the model authors' published defaults)."""

    steps: int              # decoder denoising steps
    prior_steps: int
    guidance: float         # decoder classifier-free guidance scale (<= 1: no guidance)
    prior_guidance: float
    sr_steps: int = 0       # unCLIP super-resolution steps (0: no such stage)


DEFAULTS: dict[str, SamplingDefaults] = {
    # diffusers UnCLIPPipeline.__call__ defaults (Karlo)
    "unclip": SamplingDefaults(steps=25, prior_steps=25, guidance=8.0, prior_guidance=4.0, sr_steps=7),
    # Kandinsky 2.2 model card: prior 25 steps, decoder 50 steps, guidance 4 for both
    "kandinsky22": SamplingDefaults(steps=50, prior_steps=25, guidance=4.0, prior_guidance=4.0),
}


def _read_index(path: Path) -> dict[str, Any] | None:
    """``path/model_index.json`` as a dict, or None when it is absent or not a JSON object."""
    index_file = path / INDEX_NAME
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None


def _class_name(path: Path) -> str | None:
    index = _read_index(path)
    name = None if index is None else index.get("_class_name")
    return name if isinstance(name, str) else None


def detect_external(path: str | Path) -> str | None:
    """Which public diffusers pipeline directory ``path`` is, or None when it is none of them.

    Returns:
        "unclip", "kandinsky22" (a combined pipeline, or a directory holding ``prior/`` and
        ``decoder/``; reported as soon as one of the two is recognised, so that loading can name
        the missing half), "kandinsky22-prior", "kandinsky22-decoder", or None.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    name = _class_name(path)
    if name is not None:
        return PIPELINE_KINDS.get(name)
    for part, expected in PAIR_PARTS.items():
        if _class_name(path / part) == expected:
            return "kandinsky22"
    return None


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers warnings and progress bars while loading (UnCLIPPipeline's
    deprecation notice, the CLIPImageProcessor fallback without torchvision): the CLI's stderr is
    for genvl's messages."""
    import diffusers
    import transformers

    libs = (diffusers.utils.logging, transformers.utils.logging)
    old = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()  # transformers' "Loading weights" bars
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libs, old):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _check_component(pipe_dir: Path, name: str, class_name: str) -> None:
    """Raise ModelDirError naming ``pipe_dir/name`` when the files its ``class_name`` loads from are absent."""
    comp = pipe_dir / name
    if not comp.is_dir():
        raise ModelDirError(f"{pipe_dir}: missing component '{name}/' ({class_name})")
    if "Tokenizer" in class_name:
        if not any(comp.iterdir()):
            raise ModelDirError(f"{comp}: the tokenizer directory is empty ({class_name})")
        return
    if "Scheduler" in class_name:
        required = "scheduler_config.json"
    elif "Processor" in class_name or "FeatureExtractor" in class_name:
        required = "preprocessor_config.json"
    else:
        required = "config.json"
    if not (comp / required).is_file():
        raise ModelDirError(f"{comp}: missing {required} ({class_name})")
    if required == "config.json" and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in comp.iterdir()):
        raise ModelDirError(f"{comp}: missing the weights (model.safetensors or diffusion_pytorch_model.safetensors)")


def _component_class(pipe_dir: Path, name: str, spec: list) -> type:
    library, class_name = str(spec[0]), str(spec[1])
    if class_name in SPECIAL_CLASSES:
        return SPECIAL_CLASSES[class_name]()
    if library in LIBRARIES:
        cls = getattr(importlib.import_module(library), class_name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    raise ModelDirError(f"{pipe_dir}: component '{name}' is {library}.{class_name}, which genvl cannot load")


def _load_component(pipe_dir: Path, name: str, spec: list, dtype: torch.dtype | None) -> Any:
    cls = _component_class(pipe_dir, name, spec)
    try:
        obj = cls.from_pretrained(str(pipe_dir / name), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:  # unreadable / mismatched
        # weights or configs, or pickled weights refused (loaded with weights_only=True)
        raise ModelDirError(f"{pipe_dir / name}: cannot load {cls.__name__}: {describe_load_error(err)}") from err
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        if dtype is not None:
            obj.to(dtype)
    return obj


def _load_pipelines(pipe_dir: Path, class_name: str, device: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """Build the diffusers pipeline(s) a ``class_name`` directory holds, component by component.

    Every component is checked for its files, then loaded with its own ``from_pretrained``
    (local files only) from a class named in the index and found in diffusers / transformers; the
    pipelines are then constructed from them. (DiffusionPipeline.from_pretrained is not used: it
    cannot resolve unCLIP's text_proj class in diffusers 0.42, whichever library the index names.)

    Returns:
        role -> pipeline: {"unclip": UnCLIPPipeline}, {"prior": ...}, {"decoder": ...}, or both for a combined pipeline.

    Raises:
        ModelDirError: the directory holds another pipeline, or a component or file is missing or unreadable.
    """
    import diffusers

    found = _class_name(pipe_dir)
    if found is None:
        raise ModelDirError(f"{pipe_dir}: missing {INDEX_NAME} (expected a diffusers {class_name} directory)")
    if found != class_name:
        raise ModelDirError(f"{pipe_dir}: {INDEX_NAME} names {found}, expected {class_name}")
    index = _read_index(pipe_dir) or {}
    pipelines: dict[str, Any] = {}
    with _quiet_libraries():
        for role, (pipe_class_name, prefix) in PIPELINE_ROLES[class_name].items():
            pipe_cls = getattr(diffusers, pipe_class_name)
            params = inspect.signature(pipe_cls.__init__).parameters
            names, _optional = pipe_cls._get_signature_keys(pipe_cls)
            specs: dict[str, list] = {}
            for name in sorted(names):  # check every file before loading anything
                spec = index.get(prefix + name)
                if not (isinstance(spec, list) and len(spec) == 2 and spec[1]):
                    raise ModelDirError(
                        f"{pipe_dir}: {INDEX_NAME} has no component '{prefix + name}' ({pipe_class_name})"
                    )
                _check_component(pipe_dir, prefix + name, str(spec[1]))
                specs[name] = spec
            components = {name: _load_component(pipe_dir, prefix + name, spec, dtype) for name, spec in specs.items()}
            for name, obj in components.items():
                want = params[name].annotation
                if isinstance(obj, torch.nn.Module) and isinstance(want, type) and not isinstance(obj, want):
                    raise ModelDirError(
                        f"{pipe_dir / (prefix + name)}: is {type(obj).__name__}, "
                        f"{pipe_class_name} needs {want.__name__}"
                    )
            pipe = pipe_cls(**components)
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            pipelines[role] = pipe
    return pipelines


def _as_hw(size: int | tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) <= 0 or int(w) <= 0:
        raise GenvlError(f"size must be positive, got {h}x{w}")
    return int(h), int(w)


def _count_parameters(module: Any) -> int | None:
    if isinstance(module, torch.nn.Module):
        return sum(p.numel() for p in module.parameters())
    return None


class ExternalPipeline:
    """A public diffusers text-to-image checkpoint behind genvl's sampling options.

    Build with :meth:`from_dir`; draw with :meth:`generate`; :meth:`describe` says what was loaded.

    Attributes:
        kind: "unclip" or "kandinsky22".
        path: the directory given.
        pipelines: role -> the loaded diffusers pipeline ("unclip"; or "prior" and "decoder").
        defaults: the steps and guidance used when generate is not told.
    """

    def __init__(self, kind: str, path: Path, pipelines: dict[str, Any], sources: dict[str, Path], device: str):
        self.kind = kind
        self.path = path
        self.pipelines = pipelines
        self.sources = sources
        self.device = device
        self.defaults = DEFAULTS[kind]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype | None = None,
        decoder: str | Path | None = None,
    ) -> ExternalPipeline:
        """Load a diffusers UnCLIPPipeline or Kandinsky 2.2 directory, from local files only.

        Args:
            path: a directory :func:`detect_external` recognises. A lone Kandinsky 2.2 prior
                directory works when ``decoder`` names its decoder directory.
            device: where the pipelines run.
            dtype: weights dtype (default: as saved, float32 for diffusers).
            decoder: a KandinskyV22Pipeline directory to pair with a lone prior directory ``path``.

        Raises:
            ModelDirError: not one of these formats, or a component missing (one line naming the path and the part).
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelDirError(f"{path}: no such model directory")
        kind = detect_external(path)
        device = str(device)
        if kind is None:
            name = _class_name(path)
            if name is not None:
                supported = ", ".join(PIPELINE_KINDS)
                raise ModelDirError(f"{path}: {INDEX_NAME} names {name}; supported diffusers pipelines: {supported}")
            raise ModelDirError(
                f"{path}: missing {INDEX_NAME} (expected a diffusers UnCLIPPipeline or Kandinsky 2.2 directory, "
                "or one holding prior/ and decoder/)"
            )
        if decoder is not None and kind != "kandinsky22-prior":
            raise ModelDirError(f"{path}: decoder= pairs a lone KandinskyV22PriorPipeline directory; this is {kind}")

        if kind == "unclip":
            pipes = _load_pipelines(path, "UnCLIPPipeline", device, dtype)
            return cls("unclip", path, pipes, {"unclip": path}, device)
        if kind == "kandinsky22-prior" and decoder is None:
            raise ModelDirError(
                f"{path}: a Kandinsky 2.2 prior alone draws no images; missing the decoder "
                "(give a directory holding prior/ and decoder/)"
            )
        if kind == "kandinsky22-decoder":
            raise ModelDirError(
                f"{path}: a Kandinsky 2.2 decoder alone has no text prior; missing the prior "
                "(give a directory holding prior/ and decoder/)"
            )
        if kind == "kandinsky22" and _class_name(path) == "KandinskyV22CombinedPipeline":
            pipes = _load_pipelines(path, "KandinskyV22CombinedPipeline", device, dtype)
            return cls("kandinsky22", path, pipes, {"prior": path, "decoder": path}, device)

        if kind == "kandinsky22-prior":
            sources = {"prior": path, "decoder": Path(decoder)}
        else:
            sources = {part: path / part for part in PAIR_PARTS}
        for part, source in sources.items():
            if not source.is_dir():
                raise ModelDirError(
                    f"{path}: missing the Kandinsky 2.2 {part} ({source}/, a {PAIR_PARTS[part]} directory)"
                )
        pipes = {}
        for part, source in sources.items():
            pipes[part] = _load_pipelines(source, PAIR_PARTS[part], device, dtype)[part]
        return cls("kandinsky22", path, pipes, sources, device)

    # ------------------------------------------------------------------ facts
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (Kandinsky: MoVQ factor squared, 64 for the real one)."""
        if self.kind == "unclip":
            return 1
        decoder = self.pipelines["decoder"]
        return decoder.movq_scale_factor**2

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) drawn when ``size`` is None: the model's native resolution."""
        if self.kind == "unclip":
            s = int(self.pipelines["unclip"].super_res_first.config.sample_size)
            return s, s
        decoder = self.pipelines["decoder"]
        sample = decoder.unet.config.sample_size
        s = int(sample if isinstance(sample, int) else sample[0]) * decoder.movq_scale_factor if sample else 512
        return s, s

    @property
    def embed_dim(self) -> int:
        prior = self.pipelines["unclip" if self.kind == "unclip" else "prior"].prior
        return int(prior.config.embedding_dim)

    def describe(self) -> dict[str, Any]:
        """What was loaded, as plain JSON-able values (for ``genvl info``)."""
        pipelines: dict[str, Any] = {}
        total = 0
        for role, pipe in self.pipelines.items():
            components: dict[str, Any] = {}
            names, _ = pipe._get_signature_keys(pipe)
            for name in sorted(names):
                module = getattr(pipe, name, None)
                entry: dict[str, Any] = {"class": type(module).__name__}
                n = _count_parameters(module)
                if n is not None:
                    entry["parameters"] = n
                    total += n
                components[name] = entry
            pipelines[role] = {"class": type(pipe).__name__, "path": str(self.sources[role]), "components": components}
        h, w = self.default_size
        return {
            "format": "diffusers",
            "kind": self.kind,
            "path": str(self.path),
            "device": self.device,
            "pipelines": pipelines,
            "parameters": total,
            "embed_dim": self.embed_dim,
            "image_size": [h, w],
            "size_multiple": self.size_multiple,
            "size_fixed": self.kind == "unclip",
            "defaults": asdict(self.defaults),
        }

    # ------------------------------------------------------------------ sampling
    def _least_steps(self, label: str) -> int:
        """Fewest steps the stage's scheduler takes: UnCLIPScheduler spaces its steps by (T - 1) / (n - 1)."""
        from diffusers import UnCLIPScheduler

        if self.kind == "unclip":
            stage = {"steps": "decoder", "prior_steps": "prior", "sr_steps": "super_res"}[label]
            name = f"{stage}_scheduler"
            scheduler = getattr(self.pipelines["unclip"], name)
        else:
            scheduler = self.pipelines["prior" if label == "prior_steps" else "decoder"].scheduler
        return 2 if isinstance(scheduler, UnCLIPScheduler) else 1

    def generate(
        self,
        prompt: str,
        num_images: int = 1,
        steps: int | None = None,
        prior_steps: int | None = None,
        guidance: float | None = None,
        prior_guidance: float | None = None,
        seed: int = 0,
        size: int | tuple[int, int] | None = None,
        sr_steps: int | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Draw ``num_images`` images for one prompt.

        Args:
            prompt: the text.
            num_images: images to draw (one batch).
            steps: decoder denoising steps; prior_steps: prior steps; sr_steps: unCLIP super-res steps.
            guidance / prior_guidance: classifier-free guidance scales of the decoder / prior (<= 1: none).
            seed: seeds the one generator all stages draw from; same seed, same images.
            size: output side, or (height, width). Kandinsky 2.2: multiples of :attr:`size_multiple`.
                unCLIP draws at its super-res size only (None or that size).
            progress: show diffusers' progress bars.

        Returns:
            ``num_images`` RGB PIL images.
        """
        if not isinstance(prompt, str):
            raise GenvlError(f"prompt must be a string, got {type(prompt).__name__}")
        d = self.defaults
        steps = d.steps if steps is None else steps
        prior_steps = d.prior_steps if prior_steps is None else prior_steps
        sr_steps = d.sr_steps if sr_steps is None else sr_steps
        guidance = d.guidance if guidance is None else float(guidance)
        prior_guidance = d.prior_guidance if prior_guidance is None else float(prior_guidance)
        if int(num_images) < 1:
            raise GenvlError(f"num_images must be at least 1, got {num_images}")
        stage_steps = {"steps": steps, "prior_steps": prior_steps}
        if self.kind == "unclip":
            stage_steps["sr_steps"] = sr_steps
        for label, value in stage_steps.items():
            least = self._least_steps(label)
            if int(value) < least:
                raise GenvlError(f"{label} must be at least {least} for {self.path}, got {value}")
        height, width = _as_hw(size, self.default_size)
        for pipe in self.pipelines.values():
            pipe.set_progress_bar_config(disable=not progress)
        # CPU generator: the same seed gives the same noise on any device.
        generator = torch.Generator("cpu").manual_seed(int(seed))

        if self.kind == "unclip":
            if (height, width) != self.default_size:
                h0, w0 = self.default_size
                raise GenvlError(f"unCLIP ({self.path}) draws {h0}x{w0} images only; got size {height}x{width}")
            out = self.pipelines["unclip"](
                prompt=prompt,
                num_images_per_prompt=int(num_images),
                prior_num_inference_steps=int(prior_steps),
                decoder_num_inference_steps=int(steps),
                super_res_num_inference_steps=int(sr_steps),
                prior_guidance_scale=prior_guidance,
                decoder_guidance_scale=guidance,
                generator=generator,
                output_type="pil",
            )
            return list(out.images)

        m = self.size_multiple
        if height % m or width % m:
            raise GenvlError(
                f"Kandinsky 2.2 ({self.path}) needs height and width that are multiples of {m}; got {height}x{width}"
            )
        embeds = self.pipelines["prior"](
            prompt=prompt,
            num_images_per_prompt=int(num_images),
            num_inference_steps=int(prior_steps),
            guidance_scale=prior_guidance,
            generator=generator,
            output_type="pt",
        )
        # image_embeds, negative_image_embeds: (N, D); the negative is the prior's zero-image embedding
        out = self.pipelines["decoder"](
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            height=height,
            width=width,
            num_inference_steps=int(steps),
            guidance_scale=guidance,
            generator=generator,
            output_type="pil",
        )
        return list(out.images)
