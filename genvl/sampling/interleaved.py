"""Interleaved image-text generation (Emu style): explicit loops over injected parts.

Continue a document of text and images (:func:`generate_document`)::

    prompt ─► tokenizer / CLIP image tower ─► "<bos> text <img> v_1..v_k </img> text ..."
           ─► LM prefill (KV cache) ─► loop until <eos>, max_new_tokens or the model's max_len:
                text:   logits ─► mask (text ids, <eos>, <img>) ─► sample ─► feed back
                <img>:  for j in 1..k:
                            s_j = u_j + g * (c_j - u_j)        c: the document's row,  u: the row "<bos> <img>"
                            feed <v_j> + W_in s_j to both rows
                        feed </img>;   ẑ = normalize(s / sqrt(D))
           ─► every generated ẑ ─► sample_decoder (the unCLIP decoder, with its own guidance) ─► image

The model decides when to open an image (it samples ``<img>`` like any token); ``force_image``
opens one right after the prompt. ``image_guidance`` g is classifier-free guidance on the regressed
slots: the unconditional row sees no context before the image (the training drops it for a
fraction of the images), so g > 1 follows the context more closely.

Prompts mix text and images: a plain string, or a list of segments ``{"text": str}`` /
``{"image": path | PIL image | (3, H, W) tensor in [-1, 1]}`` / ``{"embedding": (D,) tensor}``, the
segments of one line of an interleaved JSONL file (:func:`read_prompt_file`). An image prompt is
encoded by the CLIP image tower and enters the LM as its k slots, so "[image] the same, in the
other style" conditions the new image on the given one.

Randomness: one generator (from ``seed``) seeds the token sampling noise and, after the loop, one
decoder generator per generated image; the same seed gives the same document.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genvl import limits
from genvl.errors import GenvlError
from genvl.limits import MAX_DOC_IMAGES, MAX_NEW_TOKENS
from genvl.models.interleaved import InterleavedLayout
from genvl.sampling.autoregressive import check_sampling, sample_tokens
from genvl.sampling.common import (
    Progress,
    apply_guidance,
    check_count,
    check_diffusion,
    check_guidance,
    derive_seed,
    device_generator,
    dynamic_cache,
    left_pad,
    module_device,
    positions,
    progress_steps,
    resolve_generator,
)
from genvl.sampling.decoder import sample_decoder
from genvl.tokenizers.text import clip_text

DEFAULT_IMAGE_GUIDANCE = 2.0  # classifier-free guidance of the regressed embeddings, when the model names none
DEFAULT_NEW_TOKENS = 48  # text tokens a document continuation writes at most, when the call names no limit


# ------------------------------------------------------------------------------------------ parts
@dataclass
class InterleavedParts:
    """The injected parts: the interleaved LM, the CLIP core (image prompts), its tokenizer, and the
    unCLIP decoder that draws the generated embeddings (None: embeddings only)."""

    model: nn.Module
    clip: nn.Module
    tokenizer: Any
    decoder: nn.Module | None = None

    @classmethod
    def from_model_dir(cls, model_dir, device: str | torch.device = "cpu", decoder: bool = True) -> "InterleavedParts":
        """Load interleaved, clip, tokenizer (and decoder when the directory has one and ``decoder``)."""
        from genvl.checkpoint import ModelDir, open_model_dir

        md = model_dir if isinstance(model_dir, ModelDir) else open_model_dir(model_dir)
        md.require("interleaved", "clip", purpose="interleaved generation")
        parts = cls(
            model=md.load("interleaved", device=device).eval(),
            clip=md.load("clip", device=device).eval(),
            tokenizer=md.tokenizer(),
            decoder=md.load("decoder", device=device).eval() if decoder and md.has("decoder") else None,
        )
        parts.check()
        return parts

    @property
    def layout(self) -> InterleavedLayout:
        return self.model.config.layout

    def check(self) -> None:
        """Raise a one-line :class:`GenvlError` when the parts do not fit together."""
        c = self.model.config
        D = self.clip.config.embed_dim
        if c.embed_dim != D:
            raise GenvlError(f"size mismatch: the interleaved LM regresses {c.embed_dim}-d CLIP embeddings, the clip "
                             f"has {D}")
        if self.tokenizer is not None and len(self.tokenizer) != c.text_vocab_size:
            raise GenvlError(f"size mismatch: the interleaved LM was trained with a {c.text_vocab_size}-token text "
                             f"vocabulary, the tokenizer has {len(self.tokenizer)}")
        if self.decoder is not None and self.decoder.config.embed_dim != D:
            raise GenvlError(f"size mismatch: the decoder expects CLIP embed_dim {self.decoder.config.embed_dim}, "
                             f"the clip has {D}")


@dataclass
class DocumentOutput:
    """What :func:`generate_document` returns.

    Attributes:
        segments: the prompt's segments, then the generated ones, in document order:
            ``{"text": str, "generated": bool}`` or ``{"image": (3, S, S) tensor in [-1, 1] or None
            (not decoded), "embedding": (D,) unit tensor, "generated": bool}``.
        stop: why generation ended: "eos", "max_new_tokens", "max_len".
        seed: the seed used, or None when the caller passed a generator.
        settings: the sampling settings (for PNG metadata and reproduction).
    """

    segments: list[dict]
    stop: str = "eos"
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_embeds(self) -> torch.Tensor:
        """(n, D) the embeddings of the generated images (n may be 0)."""
        embs = [s["embedding"] for s in self.segments if "embedding" in s and s["generated"]]
        return torch.stack(embs) if embs else torch.zeros(0)

    @property
    def generated_text(self) -> str:
        return " ".join(s["text"] for s in self.segments if "text" in s and s["generated"]).strip()


# -------------------------------------------------------------------------------------- decoding
class IncrementalDecoder:
    """Runs the interleaved LM over left-padded prompts, then one position per row per step
    (a transformers ``DynamicCache`` of keys and values)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = dynamic_cache(model)
        self.seen = 0

    def _forward(self, ids, visual, mask, pos):
        kwargs = {}
        if self.model.takes_cache_position:
            kwargs["cache_position"] = torch.arange(self.seen, self.seen + ids.shape[1], device=ids.device)
        out = self.model(ids, visual, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, last_only=True, **kwargs)
        self.seen += ids.shape[1]
        return out.logits[:, -1].float(), out.regression[:, -1].float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor | None = None):
        """Run the prompts.

        Args:
            ids: (R, P) left-padded prompt ids.
            mask: (R, P) 1 on real positions.
            visual: (Nv, C) slot values of the prompts' slot positions (row-major), or None.

        Returns:
            (logits (R, V), regression (R, C)) of the next element.
        """
        self.mask = mask
        self.pos = positions(mask)[:, -1:]  # (R, 1)
        return self._forward(ids, visual, mask, positions(mask))

    def step(self, ids: torch.Tensor, visual: torch.Tensor | None = None):
        """Feed one id per row (with its slot value (R, C) when the ids are slot placeholders)."""
        tok = ids[:, None]  # (R, 1)
        self.pos = self.pos + 1
        self.mask = torch.cat([self.mask, torch.ones_like(tok)], dim=1)  # (R, seen + 1)
        return self._forward(tok, visual, self.mask, self.pos)


def _regress_image(model: nn.Module, cond: IncrementalDecoder, reg_c: torch.Tensor, uncond: IncrementalDecoder | None,
                   reg_u: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The k slots of an image whose ``<img>`` both decoders have just read.

    Args:
        model: the interleaved LM.
        cond: the document's decoder; ``reg_c`` (B, C) its regression at ``<img>``.
        uncond: the unconditional rows' decoder ("<bos> <img>") and ``reg_u``, or None without guidance.
        guidance: scale g: s = u + g (c - u).

    Returns:
        (B, k, C) slots; each was fed to both decoders (the last one too: the caller feeds </img> next).
    """
    lay = model.config.layout
    slots = []
    for j in range(lay.visual_tokens):
        s = reg_c if uncond is None else apply_guidance(reg_u, reg_c, guidance)  # (B, C)
        slots.append(s)
        ids = torch.full((s.shape[0],), lay.slot_id(j), dtype=torch.long, device=s.device)
        _, reg_c = cond.step(ids, s)
        if uncond is not None and j + 1 < lay.visual_tokens:
            _, reg_u = uncond.step(ids, s)
    return torch.stack(slots, dim=1)


def _unconditional(model: nn.Module, rows: int) -> tuple[IncrementalDecoder, torch.Tensor]:
    """A decoder over ``rows`` unconditional image prompts "<bos> <img>" and its regression (rows, C)."""
    lay = model.config.layout
    ids = torch.tensor([[lay.bos_id, lay.boi_id]] * rows, dtype=torch.long, device=model.device)
    dec = IncrementalDecoder(model)
    _, reg = dec.prefill(ids, torch.ones_like(ids))
    return dec, reg


@torch.no_grad()
def generate_image_embeds(model: nn.Module, prompts: list[list[int]], guidance: float = 1.0) -> torch.Tensor:
    """The image embedding the LM regresses after each caption: "<bos> caption <img>" then k slots.

    Args:
        model: the interleaved LM (eval mode).
        prompts: B captions as text ids without specials (an empty list: unconditional).
        guidance: classifier-free guidance scale of the slots (1 = none).

    Returns:
        (B, D) unit embeddings (on the model's device).
    """
    check_guidance("image_guidance", guidance)
    if not prompts:
        raise GenvlError("no prompt given")
    lay = model.config.layout
    rows = [[lay.bos_id, *p, lay.boi_id] for p in prompts]
    ids, mask = left_pad(rows, lay.pad_id, model.device)  # (B, P)
    cond = IncrementalDecoder(model)
    _, reg_c = cond.prefill(ids, mask)  # (B, C)
    uncond = reg_u = None
    if guidance != 1.0:
        uncond, reg_u = _unconditional(model, len(rows))
    slots = _regress_image(model, cond, reg_c, uncond, reg_u, float(guidance))  # (B, k, C)
    return model.slots_to_embeds(slots)


# ---------------------------------------------------------------------------------------- prompts
def _image_pixels(image, size: int) -> torch.Tensor:
    """A path, PIL image or (3, H, W) / (1, 3, H, W) tensor in [-1, 1] -> (3, size, size)."""
    from genvl.data.images import BadImageError, load_rgb, resize_center_crop, to_tensor

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise GenvlError(f"image not found: {image}")
        try:
            image = load_rgb(str(image))
        except BadImageError as e:
            raise GenvlError(f"{image}: cannot read image ({e.reason})") from None
    if hasattr(image, "convert"):
        return to_tensor(resize_center_crop(image.convert("RGB"), size))
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3 or x.shape[0] != 3:
            raise GenvlError(f"an image prompt must have shape (3, H, W), got {tuple(image.shape)}")
        if float(x.min()) < -1.01 or float(x.max()) > 1.01:
            raise GenvlError("image prompt pixels must be in [-1, 1]")
        if tuple(x.shape[1:]) != (size, size):
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False,
                                                antialias=True)[0].clamp(-1, 1)
        return x
    raise GenvlError(f"an image prompt is a path, a PIL image or a tensor, got {type(image).__name__}")


def normalize_prompt(prompt) -> list[dict]:
    """A string or a list of segments -> a checked list of ``{"text"}`` / ``{"image"}`` / ``{"embedding"}``."""
    if isinstance(prompt, str):
        prompt = [{"text": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise GenvlError("empty prompt: give text, or a list of {\"text\": ...} / {\"image\": ...} segments")
    out = []
    for seg in prompt:
        keys = [k for k in ("text", "image", "embedding") if isinstance(seg, dict) and k in seg]
        if len(keys) != 1:
            raise GenvlError(f"a prompt segment needs exactly one of 'text', 'image' or 'embedding', got {seg!r}")
        if keys[0] == "text" and not isinstance(seg["text"], str):
            raise GenvlError(f"a text segment holds a string, got {type(seg['text']).__name__}")
        out.append({keys[0]: seg[keys[0]]})
    if all("text" in s and not s["text"].strip() for s in out):
        raise GenvlError("empty prompt: give text, or a list of {\"text\": ...} / {\"image\": ...} segments")
    return out


def read_prompt_file(path: str | Path) -> list[list[dict]]:
    """Prompts from an interleaved JSONL file (each line a list of ``{"text"}`` / ``{"image": path}``,
    paths relative to the file); a malformed line is an error naming it."""
    from genvl.data.datasets import parse_interleaved

    docs, _, skipped = parse_interleaved(path)
    if skipped:
        where, reason = skipped[0]
        raise GenvlError(f"{where}: {reason}")
    return docs


# ------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_document(
    parts: InterleavedParts, prompt, max_new_tokens: int = DEFAULT_NEW_TOKENS, max_images: int = 1,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
    force_image: bool = False, steps: int = 50, guidance: float = 3.0, scheduler: str = "ddim",
    decode_images: bool = True, *, seed: int | None = None, generator: torch.Generator | None = None,
    progress: Progress = None,
) -> DocumentOutput:
    """Continue a document of text and images.

    Args:
        parts: model, CLIP, tokenizer and (for pixels) decoder.
        prompt: a string, or a list of ``{"text"}`` / ``{"image"}`` / ``{"embedding"}`` segments.
        max_new_tokens: most text tokens to generate.
        max_images: most images to generate (0: text only).
        temperature: text sampling temperature (0 = greedy).
        top_k, top_p: text candidate filters (0 / 1 = off).
        image_guidance: classifier-free guidance of the regressed slots (1 = none).
        force_image: open an image right after the prompt instead of letting the model decide.
        steps, guidance, scheduler: the decoder's diffusion settings.
        decode_images: draw the generated embeddings with the decoder (needs one).
        seed: seed of all sampling noise (random when neither seed nor generator is given).
        generator: a torch.Generator instead of ``seed``.
        progress: None, True (tqdm) or a callable(stage, step, total).

    Returns:
        DocumentOutput with the prompt's and the generated segments.
    """
    check_count("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS, "tokens")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
        raise GenvlError(f"max_images must be an integer >= 0, got {max_images!r}")
    limits.check_count("max_images", max_images, MAX_DOC_IMAGES, lo=0, what="images per document")
    if force_image and max_images < 1:
        raise GenvlError("force_image needs max_images >= 1")
    check_sampling(temperature, top_k, top_p)
    check_guidance("image_guidance", image_guidance)
    if decode_images:
        check_diffusion(steps, guidance, scheduler)
        if parts.decoder is None:
            raise GenvlError("drawing the generated images needs a decoder component; this model has none")
    parts.check()
    model, clip, tok = parts.model, parts.clip, parts.tokenizer
    lay, cfg = model.config.layout, model.config
    device = model.device
    segments = normalize_prompt(prompt)

    # -- the prompt: text ids and CLIP embeddings of the images
    out_segments, elements, embeds = [], [], []
    S = clip.config.image_size
    for seg in segments:
        if "text" in seg:
            text = clip_text(seg["text"])  # the prompt must fit the context anyway (checked below)
            ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"] if text.strip() else []
            if ids:
                elements.append(list(ids))
            out_segments.append({"text": seg["text"], "generated": False})
            continue
        if "embedding" in seg:
            z = torch.as_tensor(seg["embedding"]).float().reshape(-1)
            if z.numel() != cfg.embed_dim:
                raise GenvlError(f"an embedding prompt must have {cfg.embed_dim} values, got {z.numel()}")
            z = torch.nn.functional.normalize(z, dim=0)
            pixels = None
        else:
            pixels = _image_pixels(seg["image"], S)  # (3, S, S)
            z = clip.encode_image(pixels[None].to(module_device(clip))).float()[0].cpu()  # (D,) unit
        elements.append(len(embeds))
        embeds.append(z)
        out_segments.append({"image": pixels, "embedding": z, "generated": False})
    enc = lay.encode(elements, eos=False)
    if len(enc.ids) + (lay.visual_tokens + 2 if force_image else 1) > cfg.max_len:
        raise GenvlError(f"the prompt takes {len(enc.ids)} positions; the model reads at most {cfg.max_len}")
    ids = torch.tensor([enc.ids], dtype=torch.long, device=device)  # (1, P)
    visual = None
    if embeds:
        slots = model.image_slots(torch.stack(embeds).to(device))  # (M, k, C)
        is_slot = lay.is_visual(ids[0])
        j = ids[0][is_slot] - lay.slot_id(0)  # (Nv,) slot of each slot position
        visual = slots[torch.tensor(enc.slot_images, dtype=torch.long, device=device), j]  # (Nv, C)

    gen, seed = resolve_generator(seed, generator)
    token_gen = device_generator(gen, device)
    guided = image_guidance != 1.0
    dec = IncrementalDecoder(model)
    logits, reg = dec.prefill(ids, torch.ones_like(ids), visual)  # (1, V), (1, C)
    length, n_text, n_images, stop = ids.shape[1], 0, 0, "max_new_tokens"
    text_ids: list[int] = []
    new_embeds: list[torch.Tensor] = []
    V = logits.shape[-1]

    def flush_text():
        if text_ids:
            text = tok.decode(text_ids, skip_special_tokens=True)
            text = "".join(c for c in text if c.isprintable() or c in "\n\t").strip()  # no control bytes
            out_segments.append({"text": text, "generated": True})
            text_ids.clear()

    bar = progress_steps(range(max_new_tokens + max_images), "interleaved", progress)
    for _ in bar:
        room_image = n_images < max_images and length + lay.visual_tokens + 2 <= cfg.max_len
        if force_image and n_images == 0 and n_text == 0:
            tok_id = lay.boi_id
        else:
            if n_text >= max_new_tokens and not room_image:
                stop = "max_new_tokens"
                break
            allowed = lay.allowed_ids(V, images=room_image, device=device)
            if n_text >= max_new_tokens:  # only an image (or the end) may follow
                allowed = allowed & ~lay.allowed_ids(V, images=False, device=device)
                allowed[lay.eos_id] = True
            tok_id = int(sample_tokens(logits, allowed, temperature, top_k, top_p, token_gen)[0])
        if tok_id == lay.eos_id:
            stop = "eos"
            break
        if tok_id == lay.boi_id:
            flush_text()
            _, reg_c = dec.step(torch.tensor([lay.boi_id], device=device))
            uncond = reg_u = None
            if guided:
                uncond, reg_u = _unconditional(model, 1)
            slots = _regress_image(model, dec, reg_c, uncond, reg_u, float(image_guidance))  # (1, k, C)
            logits, reg = dec.step(torch.tensor([lay.eoi_id], device=device))  # </img> always follows
            z = model.slots_to_embeds(slots)[0].cpu()  # (D,) unit
            new_embeds.append(z)
            out_segments.append({"image": None, "embedding": z, "generated": True})
            n_images += 1
            length += lay.visual_tokens + 2
        else:
            text_ids.append(tok_id)
            n_text += 1
            logits, reg = dec.step(torch.tensor([tok_id], device=device))
            length += 1
        if length + 1 > cfg.max_len:
            stop = "max_len"
            break
    else:
        stop = "max_new_tokens"
    bar.close()  # ends the progress bar of a loop left early
    flush_text()

    if decode_images and new_embeds:
        gens = [torch.Generator().manual_seed(derive_seed(gen)) for _ in new_embeds]  # one per image
        images = sample_decoder(parts.decoder, torch.stack(new_embeds).to(module_device(parts.decoder)), steps=steps,
                                guidance=guidance, scheduler=scheduler, generator=gens, progress=progress).cpu()
        it = iter(images)
        for s in out_segments:
            if s.get("generated") and "embedding" in s:
                s["image"] = next(it)
    settings = dict(method="interleaved", max_new_tokens=max_new_tokens, max_images=max_images,
                    temperature=temperature, top_k=top_k, top_p=top_p, image_guidance=image_guidance,
                    force_image=force_image, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed)
    return DocumentOutput(segments=out_segments, stop=stop, seed=seed, settings=settings)


# ---------------------------------------------------------------------------------------- writing
@dataclass
class DocumentFiles:
    """Where :func:`write_document` put a document."""

    folder: Path
    html: Path
    jsonl: Path
    images: list[Path]


def _reserve_dir(parent: Path, stem: str) -> Path:
    """Create and return a new folder ``parent/stem[-N]`` (never an existing one)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(100_000):
        path = parent / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free folder name for {stem} in {parent}")


_CSS = """body { font-family: sans-serif; max-width: 46em; margin: 2em auto; line-height: 1.6; }
.doc span.generated { background: #eef6ff; }
.doc img { width: 128px; height: 128px; image-rendering: pixelated; vertical-align: middle; margin: 4px;
           border: 2px solid #ccc; }
.doc img.generated { border-color: #3a7bd5; }
.settings { color: #666; font-size: 0.85em; margin-top: 2em; }"""


def write_document(out: DocumentOutput, directory: str | Path, stem: str, meta: dict | None = None) -> DocumentFiles:
    """Write a generated document into a new folder ``directory/stem[-N]``.

    The folder holds ``doc.html`` (generated parts highlighted), ``doc.jsonl`` (one line in the
    interleaved JSONL format, image paths relative to it, ``"generated"`` flags; it reads back as a
    prompt file or a training document) and one PNG per image, with the settings in its text chunks.

    Args:
        out: the document.
        directory: the parent folder.
        stem: the folder's name (made unique).
        meta: extra metadata for the PNGs (model, prompt file, ...).

    Returns:
        DocumentFiles(folder, html, jsonl, images).
    """
    from genvl.sampling.io import save_png, to_pil_images

    folder = _reserve_dir(Path(directory), stem)
    meta = {**out.settings, **(meta or {})}
    rows, parts, images = [], [], []
    n = 0
    for i, seg in enumerate(out.segments):
        gen = bool(seg.get("generated"))
        cls = ' class="generated"' if gen else ""
        if "text" in seg:
            rows.append({"text": seg["text"], "generated": gen})
            parts.append(f"<span{cls}>{html.escape(seg['text'])}</span>")
            continue
        n += 1
        if seg.get("image") is None:  # an embedding without pixels
            rows.append({"image": None, "generated": gen})
            parts.append(f"<span{cls}>[image {n}: not drawn]</span>")
            continue
        name = f"{'image' if gen else 'prompt'}-{n}.png"
        path = save_png(to_pil_images(seg["image"][None])[0], folder / name,
                        {**meta, "segment": i, "generated": gen})
        images.append(path)
        rows.append({"image": name, "generated": gen})
        parts.append(f'<img{cls} src="{html.escape(name)}" alt="{"generated" if gen else "prompt"} image {n}">')
    jsonl = folder / "doc.jsonl"
    jsonl.write_text(json.dumps([r for r in rows if r.get("image", "") is not None]) + "\n")
    settings = html.escape(", ".join(f"{k}={v}" for k, v in meta.items()))
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>genvl document</title>\n<style>{_CSS}</style>"
            f"</head>\n<body>\n<div class=\"doc\">\n" + "\n".join(parts) + "\n</div>\n"
            f"<p class=\"settings\">generated parts highlighted; stop: {html.escape(out.stop)}; {settings}</p>\n"
            "</body></html>\n")
    page_path = folder / "doc.html"
    page_path.write_text(page)
    return DocumentFiles(folder=folder, html=page_path, jsonl=jsonl, images=images)
