"""Sampling: explicit loops over injected components, one module per method.

- :mod:`genvl.sampling.common`: the steps every sampler shares: argument checks, classifier-free
  guidance, scheduler set-up, generators and seeds, progress, input pixels, token-LM decoding helpers.
- :mod:`genvl.sampling.prior`: text -> CLIP image embedding with the diffusion prior.
- :mod:`genvl.sampling.decoder`: CLIP image embedding -> pixels with the decoder (and
  super-resolution, DDIM inversion).
- :mod:`genvl.sampling.unclip`: DALL-E 2 style text-to-image (prior -> decoder [-> super-res]),
  image variations (optionally from DDIM-inverted noise), interpolation and mixing in CLIP space.
- :mod:`genvl.sampling.autoregressive`: text <-> VQ-VAE image codes with one token LM.
- :mod:`genvl.sampling.interleaved`: documents of text and images with the interleaved LM.
- :mod:`genvl.sampling.fast`: compiled unCLIP components; :mod:`genvl.sampling.external`: public
  diffusers checkpoints.
- :mod:`genvl.sampling.io`: writing PNGs with their settings, grids, GIFs, file names.

Submodules are imported on use (``from genvl.sampling.unclip import text_to_image``), so importing
this package stays cheap.
"""
