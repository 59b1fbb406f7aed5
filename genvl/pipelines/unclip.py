"""The unCLIP (DALL-E 2 style) pipeline: text -> prior -> decoder [-> super-resolution].

    pipe = UnclipPipeline.from_pretrained("demo")
    out = pipe("a cat face", num_images=4, seed=1)              # the model's recommended settings
    out = pipe("a cat face", image=photo, strength=0.6)          # image-to-image
    out = pipe.variations(photo, num_images=4)                   # image -> embedding -> images
    out = pipe.interpolate("a cat face", "a dog face", frames=8)  # frames between two prompts / images

Settings a call leaves out (None) take the model directory's recommended ones (``genvl.json``
"sampling"), else :data:`~genvl.pipelines.base.SAMPLE_DEFAULTS`, exactly as ``genvl sample`` does.
The loops themselves are :mod:`genvl.sampling.unclip`'s (prior and decoder sampling underneath).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from genvl.errors import GenvlError
from genvl.pipelines.base import SAMPLE_DEFAULTS, Pipeline, PipelineOutput, move, open_model, resolve_settings
from genvl.sampling import unclip
from genvl.sampling.io import to_pil_images

#: img2img strength when an image is given without one (the share of the schedule that is redrawn).
DEFAULT_STRENGTH = 0.75

Callback = Callable[[str, int, int], None]  # (stage, step, total) after every denoising step


class UnclipPipeline(Pipeline):
    """A text-to-image model directory (clip, tokenizer, prior, decoder [, sr]) with its settings.

    Args:
        components: the loaded parts (:class:`~genvl.sampling.unclip.UnclipComponents`).
        recommended, name: as for :class:`~genvl.pipelines.base.Pipeline`.
    """

    def __init__(self, components: unclip.UnclipComponents, recommended: dict[str, Any] | None = None,
                 name: str = ""):
        super().__init__(recommended, name)
        self.components = components

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | Path | Any = "demo", *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "UnclipPipeline":
        """Load a model directory (a path, ``"demo"`` for the built-in model, or an opened
        :class:`~genvl.checkpoint.ModelDir`) with its recommended sampling settings."""
        md, name = open_model(model)
        comps = unclip.UnclipComponents.from_model_dir(md, device=device)
        pipe = cls(comps, md.meta.get("sampling", {}), name)
        return pipe.to(dtype=dtype) if dtype is not None else pipe

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "UnclipPipeline":
        """Move (and / or cast) every part; returns the pipeline."""
        c = self.components
        move((c.clip, c.prior, c.decoder, c.sr), device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def sizes(self) -> tuple[int, int | None]:
        """(the decoder's image size, the super-resolution stage's or None)."""
        sr = self.components.sr
        return self.components.decoder.config.image_size, (sr.config.image_size if sr is not None else None)

    def settings(self, **given) -> dict[str, Any]:
        """The sampling settings a call with these arguments uses (given > recommended > default)."""
        unknown = set(given) - set(SAMPLE_DEFAULTS)
        if unknown:
            raise GenvlError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(SAMPLE_DEFAULTS)}")
        return resolve_settings(self.recommended, given)

    # ---------------------------------------------------------------------------------- checks
    def _superres(self, size: int | None) -> bool:
        """Whether to run the super-resolution stage for an output ``size`` (None: the largest)."""
        dec, sr = self.sizes
        if size is None:
            return sr is not None
        if size == dec:
            return False
        if size != sr:
            sizes = f"{dec} px" + (f" or {sr} px with super-resolution" if sr else "")
            raise GenvlError(f"size {size}: this model generates {sizes}")
        return True

    def _coarse(self, s: dict, given: float | None, start_set: bool) -> float:
        """The coarse start to use: the caller's, else the recommended one unless something else
        sets where sampling starts (an image, inverted noise)."""
        if given is not None and given < 1.0:
            if start_set:
                raise GenvlError(f"coarse_start {given} does not go with an input image or inverted noise: "
                                 "each sets where sampling starts")
            if getattr(self.components.decoder, "coarse", None) is None:
                raise GenvlError(f"coarse_start {given}: the decoder of {self.name or 'this model'} has no coarse "
                                 "layout path (trained with model.coarse_size > 0); leave it out")
            return float(given)
        return 1.0 if start_set or given is not None else s["coarse_start"]

    def _record(self, method: str, s: dict, seed: int | None, coarse: float, superres: bool = False,
                **extra) -> dict[str, Any]:
        rec = {"model": self.name, "method": method, "seed": seed, "steps": s["steps"], "guidance": s["guidance"],
               "scheduler": s["scheduler"]}
        if coarse < 1.0:
            rec["coarse_start"] = coarse
        if superres:
            rec["sr_steps"] = s["sr_steps"]
        rec.update(extra)
        return rec

    # ---------------------------------------------------------------------------------- calls
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        prior_steps: int | None = None,
        prior_guidance: float | None = None,
        prior_candidates: int | None = None,
        scheduler: str | None = None,
        coarse_start: float | None = None,
        sr_steps: int | None = None,
        size: int | None = None,
        image=None,
        strength: float | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Text -> images: ``num_images`` per prompt.

        Args:
            prompt: one prompt or a list.
            num_images: images per prompt.
            seed / generator: the source of randomness (a random seed, reported back, when neither).
            steps, guidance, prior_steps, prior_guidance, prior_candidates, scheduler, coarse_start, sr_steps:
                sampling settings (None: the model's recommended ones; ``sr_steps``: the
                super-resolution stage's steps, when it runs).
            size: output size: the decoder's, or the super-resolution stage's (None: the largest).
            image: image-to-image: a PIL image or a tensor in [-1, 1] (one, or one per prompt); the
                decoder starts from it noised to ``strength`` of its schedule.
            strength: in [0, 1] with ``image`` (default 0.75): 1 = plain text-to-image, 0 = the image.
            callback: called as ``callback(stage, step, total)`` after every denoising step.
            progress: tqdm bars (when no callback).
        """
        s = self.settings(steps=steps, guidance=guidance, prior_steps=prior_steps, prior_guidance=prior_guidance,
                          prior_candidates=prior_candidates, scheduler=scheduler, sr_steps=sr_steps)
        coarse = self._coarse(s, coarse_start, image is not None)
        superres = self._superres(size)
        extra = {}
        if image is not None:
            extra = {"image": image, "strength": DEFAULT_STRENGTH if strength is None else strength}
        elif strength is not None:
            raise GenvlError("strength applies to image-to-image: give an image too")
        out = unclip.text_to_image(
            self.components, prompt, num_images=num_images, steps=s["steps"], prior_steps=s["prior_steps"],
            guidance=s["guidance"], prior_guidance=s["prior_guidance"], scheduler=s["scheduler"],
            prior_candidates=s["prior_candidates"], superres=superres, sr_steps=s["sr_steps"], seed=seed,
            generator=generator, progress=callback or progress, coarse_start=coarse, **extra)
        prompts = {"prompt": prompt} if isinstance(prompt, str) else {"prompts": list(prompt)}
        rec = self._record("unclip", s, out.seed, coarse, superres, **prompts, prior_steps=s["prior_steps"],
                           prior_guidance=s["prior_guidance"], prior_candidates=s["prior_candidates"])
        if image is not None:
            rec["strength"] = extra["strength"]
        return PipelineOutput(to_pil_images(out.images), out.images, rec, out.image_embeds)

    @torch.no_grad()
    def variations(
        self,
        image,
        num_images: int = 1,
        *,
        invert: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        scheduler: str | None = None,
        coarse_start: float | None = None,
        sr_steps: int | None = None,
        size: int | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Image -> its CLIP embedding -> ``num_images`` new images per input (DALL-E 2 variations).

        ``invert``: start from the image's DDIM-inverted noise, which keeps its layout too.
        """
        s = self.settings(steps=steps, guidance=guidance, scheduler=scheduler, sr_steps=sr_steps)
        coarse = self._coarse(s, coarse_start, invert)
        superres = self._superres(size)
        out = unclip.variations(self.components, image, num_images=num_images, steps=s["steps"],
                                guidance=s["guidance"], scheduler=s["scheduler"], invert=invert, seed=seed,
                                generator=generator, superres=superres, sr_steps=s["sr_steps"],
                                progress=callback or progress, coarse_start=coarse)
        rec = self._record("unclip", s, out.seed, coarse, superres, invert=invert)
        return PipelineOutput(to_pil_images(out.images), out.images, rec, out.image_embeds)

    @torch.no_grad()
    def interpolate(
        self,
        a,
        b,
        frames: int = 8,
        *,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        prior_steps: int | None = None,
        prior_guidance: float | None = None,
        scheduler: str | None = None,
        coarse_start: float | None = None,
        sr_steps: int | None = None,
        size: int | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """``frames`` images along the great circle between two prompts or images (PIL or tensors)
        in CLIP image space, all from the same decoder noise."""
        s = self.settings(steps=steps, guidance=guidance, prior_steps=prior_steps, prior_guidance=prior_guidance,
                          scheduler=scheduler, sr_steps=sr_steps)
        coarse = self._coarse(s, coarse_start, False)
        superres = self._superres(size)
        out = unclip.interpolate(self.components, a, b, frames=frames, steps=s["steps"], guidance=s["guidance"],
                                 prior_steps=s["prior_steps"], prior_guidance=s["prior_guidance"],
                                 scheduler=s["scheduler"], seed=seed, superres=superres, sr_steps=s["sr_steps"],
                                 progress=callback or progress, coarse_start=coarse)
        rec = self._record("unclip", s, out.seed, coarse, superres, frames=frames, prior_steps=s["prior_steps"],
                           prior_guidance=s["prior_guidance"])
        return PipelineOutput(to_pil_images(out.images), out.images, rec, out.image_embeds)
