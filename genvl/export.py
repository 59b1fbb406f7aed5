"""Hand a genvl model directory to diffusers, transformers and peft users, in their formats.

genvl's components are built on those libraries' own classes, so most export without conversion
of the weights, only of the keys::

    component   --to          written as                                 loads with
    clip        transformers  CLIPModel + the tokenizer + CLIPImageProcessor  CLIPModel / CLIPProcessor.from_pretrained
    lm          transformers  LlamaForCausalLM (text ids, then image codes)  LlamaForCausalLM.from_pretrained
    prior       diffusers     PriorTransformer                            PriorTransformer.from_pretrained
    decoder     diffusers     UNet2DConditionModel                        UNet2DConditionModel.from_pretrained
    sr          diffusers     UNet2DModel                                 UNet2DModel.from_pretrained
    vqvae       diffusers     VQModel                                     VQModel.from_pretrained
    (LoRA)      peft          adapter_config.json + adapter_model.safetensors  PeftModel.from_pretrained(exported base, dir)

What each exported model computes equals what it computes inside genvl (tests compare the
outputs). genvl's conditioning glue around a diffusers core is not part of that core: the prior's
text-state projection and embedding normalisation, the decoder's image-embedding tokens. A user
of the exported core feeds it those inputs; ``export.json`` in the output folder says what each
component is and what it expects. The VQ-VAE's cosine code lookup becomes diffusers' Euclidean
one over unit-length codes, which picks the same code. Components with no counterpart in those
libraries (the interleaved model, a CLIP with an external text encoder) are refused with a
message, never written in a form another library would load wrongly.

Beside each exported model, ``genvl_component.json`` (genvl's class and config) and
``genvl_extra.safetensors`` (the weights the library model does not hold: the glue above) let
:func:`import_model` rebuild a genvl model directory from the exported folders, also after another
library finetuned their weights (``genvl import EXPORT... --out DIR``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genvl.errors import ModelDirError

if TYPE_CHECKING:
    import torch

__all__ = ["EXPORT_FORMATS", "export_model", "export_component", "import_component", "import_model"]

#: Beside each exported library model: genvl's class and config, and the weights the library lacks.
GENVL_SIDE = "genvl_component.json"
GENVL_EXTRA = "genvl_extra.safetensors"

#: ``--to`` values and the components each takes.
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {
    "transformers": ("clip", "lm"),
    "diffusers": ("prior", "decoder", "sr", "vqvae"),
    "peft": ("clip", "lm", "prior", "decoder", "sr"),
}

# Where each component's library model sits inside the genvl module (peft key prefixes).
_CORE = {"lm": "model.", "prior": "transformer.", "decoder": "unet.", "sr": "unet."}


def _clip(model, out: Path, tokenizer) -> dict[str, Any]:
    from transformers import CLIPConfig, CLIPModel

    if model.config.text_encoder is not None:
        raise ModelDirError("clip: its text tower is an external encoder, which a transformers CLIPModel cannot hold")
    hf = CLIPModel(CLIPConfig.from_dict(model.library_config())).eval()
    state = model.file_keys(model.state_dict())
    state.pop("logit_bias")  # genvl's own (the sigmoid loss); CLIPModel has none
    hf.load_state_dict(state)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from transformers.utils import logging as hf_logging

    size = model.config.image_size
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # without torchvision it notes its PIL fallback, which saves the same file
    try:
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=list(model.PIXEL_MEAN), image_std=list(model.PIXEL_STD)).save_pretrained(out)
    finally:
        hf_logging.set_verbosity(level)
    return {"class": "transformers.CLIPModel",
            "inputs": "pixel_values normalised by the saved CLIPImageProcessor; input_ids from the saved tokenizer",
            "note": "genvl's embeddings are get_image_features / get_text_features scaled to unit length"}


def _lm(model, out: Path, tokenizer) -> dict[str, Any]:
    model.model.save_pretrained(out)
    tokenizer.save_pretrained(out / "text_tokenizer")
    return {"class": "transformers.LlamaForCausalLM",
            "inputs": "one vocabulary: text token ids (text_tokenizer/) first, then image codes, then <boi>, <eoi>",
            "layout": dataclasses.asdict(model.layout)}


def _prior(model, out: Path, tokenizer) -> dict[str, Any]:
    model.transformer.save_pretrained(out)
    return {"class": "diffusers.PriorTransformer",
            "inputs": ("hidden_states: the noisy image embedding normalised by clip_mean / clip_std; "
                       "proj_embedding: the CLIP text embedding; encoder_hidden_states: the CLIP text states "
                       "through genvl's text_proj (not exported); output: the clean normalised embedding")}


def _decoder(model, out: Path, tokenizer) -> dict[str, Any]:
    model.unet.save_pretrained(out)
    c = model.config
    return {"class": "diffusers.UNet2DConditionModel", "parameterization": c.parameterization,
            "inputs": ("encoder_hidden_states: genvl's image-embedding tokens (image_proj, not exported); "
                       "class_labels: the CLIP image embedding times sqrt(embed_dim)"
                       + ("; the coarse layout channels are concatenated to the sample" if c.coarse_size else ""))}


def _sr(model, out: Path, tokenizer) -> dict[str, Any]:
    model.unet.save_pretrained(out)
    return {"class": "diffusers.UNet2DModel", "parameterization": model.config.parameterization,
            "inputs": "the noisy image concatenated with the bicubic-upsampled low-resolution image; class_labels: the augmentation level"}


def _vqvae(model, out: Path, tokenizer) -> dict[str, Any]:
    import torch
    from diffusers import VQModel

    c = model.config
    n = len(c.channels)
    vq = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.channels),
        layers_per_block=c.layers_per_block, latent_channels=c.code_dim, sample_size=c.image_size,
        num_vq_embeddings=c.codebook_size, norm_num_groups=c.norm_num_groups, vq_embed_dim=c.code_dim,
        scaling_factor=1.0, mid_block_add_attention=c.mid_attention,
    ).eval()
    vq.encoder.load_state_dict(model.encoder.state_dict())
    vq.decoder.load_state_dict(model.decoder.state_dict())
    eye = torch.eye(c.code_dim).view(c.code_dim, c.code_dim, 1, 1)
    with torch.no_grad():
        for conv in (vq.quant_conv, vq.post_quant_conv):  # genvl has no 1x1 convs around the codes
            conv.weight.copy_(eye)
            conv.bias.zero_()
        # Unit-length codes: the Euclidean nearest code is the cosine nearest genvl looks up.
        vq.quantize.embedding.weight.copy_(model.quantizer.codebook())
    vq.save_pretrained(out)
    return {"class": "diffusers.VQModel", "inputs": "images in [-1, 1]; decode output is not clamped"}


_WRITERS = {"clip": _clip, "lm": _lm, "prior": _prior, "decoder": _decoder, "sr": _sr, "vqvae": _vqvae}


def _adapter_prefixes(name: str) -> dict[str, str]:
    """genvl module-path prefix -> the exported library model's, for adapter weight names."""
    if name == "clip":
        from genvl.models.clip import CLIP

        return dict(CLIP.FILE_NAMES)
    return {_CORE[name]: ""}


def _peft(model_dir, name: str, out: Path) -> dict[str, Any]:
    """A LoRA component's adapter as a peft adapter folder over the exported library model."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from genvl.models.base import load_safetensors
    from genvl.models.lora import LORA_WEIGHTS, read_adapter_config

    folder = model_dir.path / name
    if model_dir.component_kind(name) != "lora":
        raise ModelDirError(f"{name}: not a LoRA adapter component (it is stored {model_dir.component_kind(name)})")
    meta = read_adapter_config(folder)
    weights = load_safetensors(folder / LORA_WEIGHTS)
    renames = _adapter_prefixes(name)
    state = {}
    for key, value in weights.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            raise ModelDirError(f"{name}: adapter weight {key} lies outside the exported model; it has no peft form")
        state["base_model.model." + renames[prefix] + key[len(prefix):]] = value
    targets = list(meta["targets"])
    cfg = LoraConfig(r=int(meta["rank"]), lora_alpha=float(meta.get("alpha") or meta["rank"]),
                     target_modules=targets, bias="none", base_model_name_or_path=str(meta["base"]))
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"class": "peft LoRA adapter", "base": meta["base"],
            "inputs": f"load over the {name} component exported with --to "
                      f"{'transformers' if name in EXPORT_FORMATS['transformers'] else 'diffusers'}"}


def export_component(model_dir, name: str, to: str, out: str | Path) -> dict[str, Any]:
    """Write component ``name`` of ``model_dir`` (a :class:`~genvl.checkpoint.ModelDir`) in format
    ``to`` into the folder ``out``; returns its ``export.json`` entry."""
    if to not in EXPORT_FORMATS:
        raise ModelDirError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if name not in EXPORT_FORMATS[to]:
        takes = ", ".join(EXPORT_FORMATS[to])
        where = [f for f, names in EXPORT_FORMATS.items() if name in names and f != "peft"]
        hint = f"; export it --to {where[0]}" if where else "; it has no counterpart in diffusers or transformers"
        raise ModelDirError(f"{name}: not exported --to {to} (that format takes {takes}){hint}")
    model_dir.require(name, purpose=f"export --to {to}")
    out = Path(out)
    if to == "peft":
        return _peft(model_dir, name, out)
    model = model_dir.load(name, device="cpu").float()
    tokenizer = model_dir.tokenizer() if name in ("clip", "lm") else None
    out.mkdir(parents=True, exist_ok=True)
    entry = _WRITERS[name](model, out, tokenizer)
    _write_genvl_side(model, name, out)
    return entry


# ------------------------------------------------------------------------------------------ import
# genvl's module key -> the library model's key (None: genvl's own, kept in genvl_extra.safetensors).
def _library_key(name: str, key: str, model=None) -> str | None:
    if name == "clip":
        if key == "logit_bias":
            return None
        return next(iter(model.file_keys({key: None})))
    if name == "vqvae":
        return key if key.startswith(("encoder.", "decoder.")) else None
    prefix = _CORE[name]
    return key[len(prefix):] if key.startswith(prefix) else None


def _write_genvl_side(model, name: str, out: Path) -> None:
    """What turns the exported library model back into the genvl component: its class and config
    (``genvl_component.json``) and the weights the library model does not hold (``genvl_extra.safetensors``)."""
    import torch
    from safetensors.torch import save_file

    from genvl.config import to_dict
    from genvl.models.base import class_path

    extra = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if _library_key(name, k, model) is None}
    (out / GENVL_SIDE).write_text(json.dumps({"component": name, "_class": class_path(model),
                                              "config": to_dict(model.config)}, indent=2) + "\n")
    save_file(extra or {"_none": torch.zeros(0)}, str(out / GENVL_EXTRA), metadata={"format": "pt"})


def import_component(folder: str | Path):
    """A genvl component rebuilt from a folder ``genvl export`` wrote (the library's weights, as
    another library may have changed them, plus genvl's side files), in eval mode."""
    from safetensors.torch import load_file

    from genvl.checkpoint import import_component_classes
    from genvl.config import from_dict
    from genvl.models.base import COMPONENT_CLASSES

    folder = Path(folder)
    side = folder / GENVL_SIDE
    if not side.is_file():
        raise ModelDirError(f"{folder}: not written by genvl export (no {GENVL_SIDE}); only genvl's own exports "
                            "import back (a transformers CLIP folder: genvl train clip --set model.from_hf=DIR)")
    meta = json.loads(side.read_text())
    import_component_classes()
    cls = COMPONENT_CLASSES.get(meta.get("_class"))
    if cls is None:
        raise ModelDirError(f"{side}: unknown component class {meta.get('_class')!r}")
    model = cls(from_dict(cls.config_class, meta["config"], where=str(side)))
    library: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != GENVL_EXTRA:
            library.update(load_file(str(f)))
    extra = load_file(str(folder / GENVL_EXTRA))
    state = {}
    for key in model.state_dict():
        lib = _library_key(meta["component"], key, model)
        source = extra if lib is None else library
        lookup = key if lib is None else lib
        if lookup not in source:
            raise ModelDirError(f"{folder}: no weight {lookup} (the folder is incomplete or another model's)")
        state[key] = source[lookup]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _write_lora_from_peft(folder: Path, name: str, base_folder: Path, cls: str, out: Path) -> None:
    """A peft adapter folder (over the exported ``name``) as a genvl LoRA component folder ``out``."""
    from safetensors.torch import load_file, save_file

    from genvl.checkpoint import component_ref
    from genvl.models.lora import LORA_CONFIG, LORA_WEIGHTS

    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{folder}: not a peft LoRA adapter folder ({e})") from None
    back = {lib: ours for ours, lib in _adapter_prefixes(name).items()}
    state = {}
    for key, value in weights.items():
        key = key.removeprefix("base_model.model.")
        prefix = max((p for p in back if key.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ModelDirError(f"{folder}: adapter weight {key} is not on the {name} model")
        state[back[prefix] + key[len(prefix):]] = value
    targets = cfg.get("target_modules") or []
    out.mkdir(parents=True, exist_ok=True)
    meta = {"_class": cls, "base": component_ref(base_folder), "rank": int(cfg["r"]),
            "alpha": float(cfg.get("lora_alpha") or cfg["r"]), "targets": sorted(targets) if isinstance(targets, (list, set)) else targets}
    (out / LORA_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(state, str(out / LORA_WEIGHTS), metadata={"format": "pt"})


def _is_transformers_clip(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "clip" or "CLIPModel" in (cfg.get("architectures") or [])


def import_model(folders: list[str | Path], out: str | Path, base: str | Path | None = None):
    """A genvl model directory at ``out`` from ``genvl export`` outputs: diffusers and transformers
    folders give components as the folder holds them now (the tokenizer from the exported clip or
    lm); a transformers ``CLIPModel`` folder from anywhere gives the clip component (and its
    tokenizer, when the folder holds one); peft adapter folders give LoRA components over the same components of ``base`` (a model
    directory), whose other components are referred to."""
    from genvl.checkpoint import follow_refs, open_model_dir, read_meta, save_model_dir, write_meta
    from genvl.tokenizers.text import load_text_tokenizer

    comps, adapters, tokenizer = {}, {}, None
    for root in map(Path, folders):
        record = root / "export.json"
        if not record.is_file():
            if _is_transformers_clip(root):  # a CLIPModel folder from elsewhere (openai/clip-vit-*, open_clip's HF ports)
                from genvl.models.clip import CLIP

                comps["clip"] = CLIP.from_hf_clip(root)
                if tokenizer is None and ((root / "tokenizer.json").is_file() or (root / "vocab.json").is_file()):
                    tokenizer = load_text_tokenizer(root)
                continue
            raise ModelDirError(f"{root}: neither a genvl export folder (no export.json) nor a transformers "
                                "CLIPModel folder; diffusers and peft folders import when genvl export wrote them")
        fmt = json.loads(record.read_text())
        for name in fmt.get("components", {}):
            if fmt.get("format") == "peft":
                adapters[name] = root / name
                continue
            comps[name] = import_component(root / name)
            tok_dir = root / name / ("text_tokenizer" if name == "lm" else "")
            if tokenizer is None and name in ("clip", "lm") and (tok_dir / "tokenizer.json").is_file():
                tokenizer = load_text_tokenizer(tok_dir)
    if not comps and not adapters:
        raise ModelDirError("nothing to import: the export folders hold no components")
    refs, base_md = {}, None
    if adapters:
        if base is None:
            raise ModelDirError("peft adapters import over a base model: give it (--base DIR)")
        base_md = open_model_dir(base)
        base_md.require(*adapters, purpose="the adapters' base")
        refs = {n: (c, base_md.path / n) for n, c in base_md.components.items() if n not in comps and n not in adapters}
        tokenizer = tokenizer or base_md.tokenizer()
    md = save_model_dir(out, comps, tokenizer=tokenizer, refs=refs)
    if adapters:
        meta = read_meta(md.path)
        for name, folder in adapters.items():
            cls = base_md.components[name]
            _write_lora_from_peft(folder, name, follow_refs(base_md.path / name), cls, md.path / name)
            meta["components"][name] = cls
        write_meta(md.path, meta)
        md = open_model_dir(md.path)
    return md


def export_model(model_dir, to: str, out: str | Path, components: list[str] | None = None) -> dict[str, Any]:
    """Export the components of ``model_dir`` that format ``to`` takes (or those named) into
    ``out/<component>/``, with ``out/export.json`` describing them.

    Raises:
        ModelDirError: ``out`` exists and is not empty, an unknown format, a component the format
            cannot hold, or none to export.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelDirError(f"{out}: exists and is not an empty folder; choose a new one")
    if to not in EXPORT_FORMATS:
        raise ModelDirError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if components is None:
        components = [n for n in EXPORT_FORMATS[to] if model_dir.has(n)
                      and (to != "peft" or model_dir.component_kind(n) == "lora")]
        if not components:
            raise ModelDirError(f"{model_dir.path}: holds no component that --to {to} takes "
                                f"({', '.join(EXPORT_FORMATS[to])}{'; LoRA adapters only' if to == 'peft' else ''})")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "writing shards" bar per tiny file says nothing
    try:
        entries = {name: export_component(model_dir, name, to, out / name) for name in components}
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    record = {"format": to, "source": str(model_dir.path), "components": entries}
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
