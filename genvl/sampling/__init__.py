"""Sampling pipelines: explicit loops over injected components.

- :mod:`genvl.sampling.unclip`: DALL-E 2 style text-to-image (prior -> decoder [-> super-res]),
  image variations (optionally from DDIM-inverted noise), interpolation and mixing in CLIP space.
- :mod:`genvl.sampling.io`: writing PNGs with their settings, grids, file names.

Submodules are imported on use (``from genvl.sampling.unclip import text_to_image``), so importing
this package stays cheap.
"""
