"""The interleaved (Emu style) pipeline: continue a document of text and images.

    pipe = InterleavedPipeline.from_pretrained("demo")
    out = pipe("a red heart", seed=0)                    # the model decides whether to draw
    out = pipe([{"image": photo}, {"text": "the same, in blue"}], force_image=True, seed=0)
    out.images                                            # the generated images (PIL)
    out.text, out.segments                                # the generated text; the whole document
    write_document(out.document, "docs", "heart")         # doc.html, doc.jsonl and PNGs

Settings a call leaves out take the model directory's recommended ones (``genvl.json``
"sampling": ``steps``, ``guidance``, ``scheduler`` of the decoder, ``image_guidance`` of the
regressed embeddings), else the defaults, and the other arguments default as ``genvl sample
--method interleaved`` does, so the same seed gives the command line's document. The loop itself
is :func:`genvl.sampling.interleaved.generate_document`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genvl.errors import GenvlError
from genvl.pipelines.base import Pipeline, PipelineOutput, move, open_model, resolve_settings
from genvl.sampling import interleaved
from genvl.sampling.io import to_pil_images

SETTINGS = ("steps", "guidance", "scheduler", "image_guidance")  # the settings a model directory may recommend


@dataclass
class InterleavedOutput(PipelineOutput):
    """A pipeline output (the generated images) with the document they stand in.

    Attributes:
        document: the prompt's and the generated segments, why generation stopped, the seed
            (:class:`~genvl.sampling.interleaved.DocumentOutput`; ``write_document`` writes it).
    """

    document: interleaved.DocumentOutput | None = None

    @property
    def segments(self) -> list[dict]:
        return self.document.segments

    @property
    def text(self) -> str:
        """The generated text (the segments the model wrote, joined)."""
        return self.document.generated_text


class InterleavedPipeline(Pipeline):
    """A model directory's interleaved LM, CLIP, tokenizer and decoder with its settings.

    Args:
        parts: the loaded parts (:class:`~genvl.sampling.interleaved.InterleavedParts`), checked to fit.
        recommended, name: as for :class:`~genvl.pipelines.base.Pipeline`.
    """

    def __init__(self, parts: interleaved.InterleavedParts, recommended: dict[str, Any] | None = None,
                 name: str = ""):
        super().__init__(recommended, name)
        parts.check()
        self.parts = parts

    @classmethod
    def from_pretrained(cls, model: str | Path | Any = "demo", *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "InterleavedPipeline":
        """Load the ``interleaved``, ``clip``, ``decoder`` and tokenizer of a model directory (a
        path, ``"demo"`` or an opened :class:`~genvl.checkpoint.ModelDir`) with its settings."""
        md, name = open_model(model)
        md.require("interleaved", "clip", "decoder", purpose="interleaved generation")
        parts = interleaved.InterleavedParts.from_model_dir(md, device=device)
        pipe = cls(parts, md.meta.get("sampling", {}), name)
        return pipe.to(dtype=dtype) if dtype is not None else pipe

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "InterleavedPipeline":
        """Move (and / or cast) every part; returns the pipeline."""
        move((self.parts.model, self.parts.clip, self.parts.decoder), device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.parts.model.device

    def settings(self, **given) -> dict[str, Any]:
        """The sampling settings a call with these arguments uses (given > recommended > default):
        the decoder's ``steps``, ``guidance``, ``scheduler`` and the slots' ``image_guidance``."""
        unknown = set(given) - set(SETTINGS)
        if unknown:
            raise GenvlError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
        s = resolve_settings(self.recommended, given)
        image_guidance = given.get("image_guidance")
        if image_guidance is None:
            image_guidance = float(self.recommended.get("image_guidance", interleaved.DEFAULT_IMAGE_GUIDANCE))
        return {"steps": s["steps"], "guidance": s["guidance"], "scheduler": s["scheduler"],
                "image_guidance": image_guidance}

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_new_tokens: int | None = None,
        max_images: int = 1,
        force_image: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        image_guidance: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        scheduler: str | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        progress: bool = False,
    ) -> InterleavedOutput:
        """Continue ``prompt``: a string, or a list of ``{"text"}`` / ``{"image"}`` / ``{"embedding"}``
        segments (images: a path, a PIL image or a (3, H, W) tensor in [-1, 1]).

        Args:
            prompt: the start of the document.
            seed / generator: the source of randomness (a random seed, reported back, when neither).
            max_new_tokens: most text tokens to write (None: 48, ``DEFAULT_NEW_TOKENS``).
            max_images: most images to draw (0: text only).
            force_image: open an image right after the prompt instead of letting the model decide.
            temperature, top_k, top_p: text sampling (temperature 0 = greedy; 0 / 1 = filter off).
            image_guidance: classifier-free guidance of the regressed embeddings (None: the model's).
            steps, guidance, scheduler: the decoder's settings (None: the model's recommended ones).
            callback: called as ``callback(stage, step, total)`` after every step.
            progress: tqdm bars (when no callback).

        Returns:
            InterleavedOutput: ``images`` / ``tensors`` / ``image_embeds`` of the generated images,
            ``settings``, and the ``document`` (``segments``, ``text``).
        """
        s = self.settings(steps=steps, guidance=guidance, scheduler=scheduler, image_guidance=image_guidance)
        doc = interleaved.generate_document(
            self.parts, prompt, max_images=max_images, temperature=temperature,
            max_new_tokens=interleaved.DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
            top_k=top_k, top_p=top_p, image_guidance=s["image_guidance"], force_image=force_image,
            steps=s["steps"], guidance=s["guidance"], scheduler=s["scheduler"], seed=seed, generator=generator,
            progress=callback or progress,
        )
        drawn = [seg["image"] for seg in doc.segments if seg.get("generated") and seg.get("image") is not None]
        size = self.parts.decoder.config.image_size
        tensors = torch.stack(drawn) if drawn else torch.zeros(0, 3, size, size)
        rec = {"model": self.name, **doc.settings,
               **({"prompt": prompt} if isinstance(prompt, str) else {"prompt": "<document>"})}
        return InterleavedOutput(to_pil_images(tensors), tensors, rec, doc.generated_embeds if drawn else None,
                                 document=doc)
