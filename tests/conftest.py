"""Shared fixtures: small synthetic image-caption sets written to disk, and tiny random model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (235, 210, 30),
    "purple": (140, 40, 180), "orange": (245, 130, 20), "black": (20, 20, 20), "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(color: str, shape: str, size: int = 32, jitter: int = 0, seed: int = 0) -> Image.Image:
    """A coloured shape on white; ``jitter`` moves it a few pixels (seeded)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    dx, dy = (rng.integers(-jitter, jitter + 1, 2) if jitter else (0, 0))
    m = size // 5
    box = (m + dx, m + dy, size - m + dx, size - m + dy)
    c = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=c)
    else:
        w = (box[2] - box[0]) // 3
        d.rectangle((box[0] + w, box[1], box[2] - w, box[3]), fill=c)
        d.rectangle((box[0], box[1] + w, box[2], box[3] - w), fill=c)
    return img


def write_shapes_folder(root: Path, n_per_pair: int = 1, size: int = 32, jitter: int = 0) -> Path:
    """An imagefolder with metadata.jsonl: every colour x shape, captioned "a red circle"."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for color in COLORS:
        for shape in SHAPES:
            for j in range(n_per_pair):
                name = f"{color}_{shape}_{j}.png"
                draw_shape(color, shape, size, jitter, seed=k).save(root / name)
                rows.append({"file_name": name, "text": f"a {color} {shape}"})
                k += 1
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    """32 unique (colour, shape) pairs at 32 px."""
    return write_shapes_folder(tmp_path / "shapes")


TINY_PARTS = ("clip", "prior", "decoder", "vqvae", "lm")


def save_tiny_hf_clip(path: Path):
    """A randomly initialised tiny transformers ``CLIPModel`` folder at ``path`` with a small trained
    tokenizer beside it, as a CLIP folder from elsewhere would be. Returns (model, tokenizer)."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    from genvl.tokenizers.text import train_text_tokenizer

    tok = train_text_tokenizer([f"a {c} shape" for c in "red green blue".split()], vocab_size=300, model_max_length=16)
    hf = CLIPModel(HFConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=16, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    hf.save_pretrained(path)
    tok.save_pretrained(str(path))
    return hf, tok


def build_tiny_model(path: Path, parts: tuple[str, ...] = TINY_PARTS, *, sr: bool = False,
                     sampling: dict | None = None, training: dict | None = None) -> Path:
    """A random model directory (about a second on a CPU): an 8-token text tower, a 16 px decoder
    (``sr``: and a 16 -> 32 px super-resolution stage), a VQ-VAE and token LM, one tokenizer;
    ``sampling``: the recommended settings written into its genvl.json."""
    import torch

    from genvl.checkpoint import save_model_dir
    from genvl.models.clip import CLIP, clip_config
    from genvl.models.decoder import Decoder, decoder_config
    from genvl.models.superres import SuperRes, superres_config
    from genvl.models.lm import TokenLM, lm_config
    from genvl.models.prior import DiffusionPrior, prior_config
    from genvl.tokenizers.text import train_text_tokenizer
    from genvl.tokenizers.vqvae import VQVAE, vqvae_config

    torch.manual_seed(0)
    tok = train_text_tokenizer(["a red circle", "a blue square", "a green cross"] * 5, vocab_size=300,
                               model_max_length=8)
    make = {
        "clip": lambda: CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8,
                                                       "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})),
        "prior": lambda: DiffusionPrior(prior_config("tiny", text_len=8)),
        "decoder": lambda: Decoder(decoder_config("tiny", image_size=16, block_out_channels=[16, 32],
                                                  attention_head_dim=16, cross_attention_dim=16, norm_num_groups=4)),
        "vqvae": lambda: VQVAE(vqvae_config("tiny")),
        "lm": lambda: TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=64, image_tokens=16,
                                        text_len=8)),
    }
    comps = {name: make[name]() for name in parts}
    if sr:
        comps["sr"] = SuperRes(superres_config("tiny", image_size=32, low_res_size=16))
    save_model_dir(path, comps, tokenizer=tok, training=training)
    if sampling is not None:
        meta = json.loads((path / "genvl.json").read_text())
        meta["sampling"] = sampling
        (path / "genvl.json").write_text(json.dumps(meta, indent=2))
    return path
