"""A tiny random model directory for the UI tests: every component, so every tab and method has work.

clip + prior + decoder (unCLIP, variations, interpolation, clip / prior / diffusion classifiers) and
vqvae + lm (autoregressive generation and classifier) sharing one tokenizer; a model card with
training records and metrics; recommended sampling settings of two steps, so generation is instant.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from conftest import draw_shape
from genvl.checkpoint import record_metrics, save_model_dir
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.lm import TokenLM, lm_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.tokenizers.text import train_text_tokenizer
from genvl.tokenizers.vqvae import VQVAE, vqvae_config

DEMO_DIR = Path(__file__).resolve().parents[2] / "genvl" / "assets" / "demo"
# What the tests' genvl.json recommends: ``genvl sample`` and the UI both start from these.
SAMPLING = {"steps": 2, "prior_steps": 2, "guidance": 2.0, "prior_guidance": 2.0, "scheduler": "ddim",
            "ar_guidance": 2.0}


def build_tiny_model(path: Path) -> Path:
    """Write the tiny model directory at ``path`` (about a second on a CPU) and return it."""
    import json

    torch.manual_seed(0)
    tok = train_text_tokenizer(["a red circle", "a blue square", "a green cross"] * 5, vocab_size=300,
                               model_max_length=8)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    prior = DiffusionPrior(prior_config("tiny", text_len=8))
    decoder = Decoder(decoder_config("tiny", image_size=16, block_out_channels=[16, 32], attention_head_dim=16,
                                     cross_attention_dim=16, norm_num_groups=4))
    vq = VQVAE(vqvae_config("tiny"))
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=64, image_tokens=16, text_len=8))
    training = {"clip": {"data": "data/shapes", "pairs": 32, "steps": 10, "time": "1 s", "hardware": "CPU",
                         "recipe": "max_steps: 10\nlr: 0.001"}}
    save_model_dir(path, {"clip": clip, "prior": prior, "decoder": decoder, "vqvae": vq, "lm": lm}, tokenizer=tok,
                   training=training)
    meta = json.loads((path / "genvl.json").read_text())
    meta["sampling"] = SAMPLING
    (path / "genvl.json").write_text(json.dumps(meta, indent=2))
    record_metrics(path, "retrieval", {"image_to_text_R@1": 12.5, "text_to_image_R@1": 25.0},
                   {"data": "data/shapes", "n": 32})
    return path


def png(color: str = "red", shape: str = "circle", size: int = 32) -> bytes:
    """A coloured shape on white, as PNG bytes (what a browser uploads)."""
    buf = io.BytesIO()
    draw_shape(color, shape, size).save(buf, format="PNG")
    return buf.getvalue()
