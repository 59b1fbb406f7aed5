"""Image-text datasets, interleaved documents, image transforms and checks.

Formats (see ``DESIGN.md``, "Data formats for custom image-text sets"): an image folder with
``metadata.jsonl`` / ``metadata.csv``, an image folder with same-named ``.txt`` captions,
webdataset ``.tar`` shards, and interleaved documents in JSONL.
"""

from genvl.data.check import DataReport, Spread, check_dataset, format_report
from genvl.data.datasets import (
    ImageTextDataset,
    InterleavedDataset,
    caption_dropped,
    collate_image_text,
    expand_braces,
    open_image_text,
)
from genvl.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    BadImageError,
    load_rgb,
    resize_center_crop,
    to_pil,
    to_tensor,
    verify_image,
)
from genvl.data.tokenized import TokenizedSet, load_tokenized, read_tokenized, save_tokenized

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "load_rgb",
    "verify_image",
    "resize_center_crop",
    "to_tensor",
    "to_pil",
    "ImageTextDataset",
    "InterleavedDataset",
    "open_image_text",
    "collate_image_text",
    "caption_dropped",
    "expand_braces",
    "DataReport",
    "Spread",
    "check_dataset",
    "format_report",
    "TokenizedSet",
    "load_tokenized",
    "read_tokenized",
    "save_tokenized",
]
