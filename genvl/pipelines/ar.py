"""The autoregressive (Parti / Chameleon style) pipeline: text <-> VQ-VAE image codes with one token LM.

    pipe = ARPipeline.from_pretrained("demo")
    out = pipe("a red apple", num_images=4, seed=0)   # text -> image codes -> pixels
    pipe.caption([image])                              # image -> text

Settings a call leaves out take the model directory's recommended ones (``genvl.json`` "sampling":
``ar_guidance``), else the defaults below, as ``genvl sample --method ar`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from genvl.errors import GenvlError
from genvl.pipelines.base import Pipeline, PipelineOutput, move, open_model
from genvl.sampling import autoregressive as ar
from genvl.sampling.io import to_pil_images

AR_GUIDANCE = 3.0  # classifier-free guidance of the image codes when the model recommends none


class ARPipeline(Pipeline):
    """A model directory's token LM, VQ-VAE and tokenizer.

    Args:
        lm, vq, tokenizer: the parts (checked to fit together).
        recommended, name: as for :class:`~genvl.pipelines.base.Pipeline`.
    """

    def __init__(self, lm, vq, tokenizer, recommended: dict[str, Any] | None = None, name: str = ""):
        super().__init__(recommended, name)
        ar.check_parts(lm, vq, tokenizer, None)
        self.lm, self.vq, self.tokenizer = lm, vq, tokenizer

    @classmethod
    def from_pretrained(cls, model: str | Path | Any = "demo", *, device: str | torch.device = "cpu",
                        purpose: str = "autoregressive generation") -> "ARPipeline":
        """Load the ``lm``, ``vqvae`` and tokenizer of a model directory (a path, ``"demo"`` or a
        :class:`~genvl.checkpoint.ModelDir`)."""
        md, name = open_model(model)
        md.require("lm", "vqvae", purpose=purpose)
        return cls(md.load("lm", device=device).eval(), md.load("vqvae", device=device).eval(), md.tokenizer(),
                   md.meta.get("sampling", {}), name)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ARPipeline":
        move((self.lm, self.vq), device, dtype)
        return self

    @property
    def image_size(self) -> int:
        return self.vq.config.image_size

    @property
    def guidance(self) -> float:
        """The classifier-free guidance a call without one uses (the model's ``ar_guidance``, else 3)."""
        return float(self.recommended.get("ar_guidance", AR_GUIDANCE))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        size: int | None = None,
        fast: bool = False,
        callback: Callable[[str, int, int], None] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Text -> ``num_images`` images per prompt (the LM writes image codes, the VQ-VAE draws them)."""
        ar.check_sampling(temperature, top_k, top_p)
        if size is not None and size != self.image_size:
            raise GenvlError(f"size {size}: this model generates {self.image_size} px")
        guidance = self.guidance if guidance is None else float(guidance)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = ar.text_to_image(self.lm, self.vq, self.tokenizer, None, prompts, num_images=num_images,
                               guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               generator=generator, fast=fast, progress=callback or progress)
        rec = {"model": self.name, "method": "ar", **({"prompt": prompt} if isinstance(prompt, str) else
                                                      {"prompts": prompts}),
               "seed": out.seed if seed is None else seed, "guidance": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        return PipelineOutput(to_pil_images(out.images), out.images, rec)

    @torch.no_grad()
    def caption(self, images, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, batch_size: int = 16) -> list[str]:
        """Image(s) -> text: PIL images or a (B, 3, H, W) tensor in [-1, 1] (resized to the VQ-VAE's size)."""
        ar.check_sampling(temperature, top_k, top_p)
        if hasattr(images, "convert"):  # one PIL image
            images = [images]
        texts: list[str] = []
        for start in range(0, len(images), batch_size):
            out = ar.caption(self.lm, self.vq, self.tokenizer, None, images[start:start + batch_size],
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
            texts += out.captions
        return texts
