"""genvl.pipelines.InterleavedPipeline: the direct sampler's document, settings precedence, the CLI's images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_shape
from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.cli import main
from genvl.errors import GenvlError
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.interleaved import InterleavedLM, interleaved_config
from genvl.pipelines import InterleavedPipeline, PipelineOutput
from genvl.sampling.interleaved import DEFAULT_IMAGE_GUIDANCE, InterleavedParts, generate_document
from stub_vq import tiny_tokenizer

RECOMMENDED = {"steps": 2, "guidance": 2.0, "scheduler": "ddim", "image_guidance": 1.5}


def _tiny(path: Path, sampling: dict | None) -> Path:
    """A random model directory: tiny CLIP, 16 px decoder, interleaved LM (4 slots), tokenizer."""
    torch.manual_seed(1)
    tok = tiny_tokenizer()
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 16, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    lm = InterleavedLM(interleaved_config("tiny", text_vocab_size=len(tok), embed_dim=32, visual_tokens=4))
    save_model_dir(path, {"clip": clip, "decoder": Decoder(decoder_config("tiny", image_size=16)), "interleaved": lm},
                   tokenizer=tok)
    if sampling is not None:
        meta = json.loads((path / "genvl.json").read_text())
        meta["sampling"] = sampling
        (path / "genvl.json").write_text(json.dumps(meta, indent=2))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("ilpipe") / "model", RECOMMENDED)


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_the_pipeline_gives_the_samplers_document(tiny):
    pipe = InterleavedPipeline.from_pretrained(tiny)
    parts = InterleavedParts.from_model_dir(open_model_dir(tiny))
    prompt = [{"image": draw_shape("red", "circle")}, {"text": "a red circle"}]
    out = pipe(prompt, seed=3, max_new_tokens=4, force_image=True)
    want = generate_document(parts, prompt, max_new_tokens=4, force_image=True, seed=3, **RECOMMENDED)
    assert isinstance(out, PipelineOutput) and len(out.images) == 1 and out.images[0].size == (16, 16)
    drawn = [s["image"] for s in want.segments if s["generated"] and s.get("image") is not None]
    assert len(drawn) == 1 and torch.equal(out.tensors, torch.stack(drawn))
    assert torch.equal(out.image_embeds, want.generated_embeds)
    assert out.text == want.generated_text and out.document.stop == want.stop
    assert [("text" in s, s["generated"]) for s in out.segments] == [("text" in s, s["generated"])
                                                                     for s in want.segments]
    assert out.seed == 3 and out.settings["model"] == str(tiny) and out.settings["prompt"] == "<document>"
    g = torch.Generator().manual_seed(3)  # a generator instead of a seed: the same document
    assert torch.equal(pipe(prompt, generator=g, max_new_tokens=4, force_image=True).tensors, out.tensors)
    other = pipe(prompt, seed=4, max_new_tokens=4, force_image=True)
    assert not torch.equal(other.tensors, out.tensors)
    text_only = pipe("a red circle", seed=0, max_images=0, max_new_tokens=3)
    assert text_only.images == [] and text_only.tensors.shape == (0, 3, 16, 16) and text_only.image_embeds is None


def test_settings_come_from_the_call_then_the_model_then_the_defaults(tiny, tmp_path):
    pipe = InterleavedPipeline.from_pretrained(tiny)
    assert pipe.settings() == RECOMMENDED
    assert pipe.settings(steps=3, image_guidance=1.0) == {**RECOMMENDED, "steps": 3, "image_guidance": 1.0}
    with pytest.raises(GenvlError, match="unknown sampling setting.*prior_steps"):
        pipe.settings(prior_steps=3)
    out = pipe("a red circle", seed=1, max_new_tokens=2, force_image=True, guidance=1.0)
    assert out.settings["guidance"] == 1.0 and out.settings["steps"] == 2 and out.settings["image_guidance"] == 1.5
    assert out.settings["max_new_tokens"] == 2 and out.settings["prompt"] == "a red circle"
    # a model that recommends nothing: the pipelines' defaults
    bare = InterleavedPipeline.from_pretrained(_tiny(tmp_path / "bare", None))
    assert bare.settings() == {"steps": 50, "guidance": 3.0, "scheduler": "ddim",
                               "image_guidance": DEFAULT_IMAGE_GUIDANCE}
    with pytest.raises(GenvlError, match="temperature"):
        pipe("a red circle", temperature=-1.0)


def test_cli_gives_the_pipelines_images(tiny, tmp_path):
    pipe = InterleavedPipeline.from_pretrained(tiny)
    out = pipe("a red circle", seed=5, force_image=True)  # the command line's defaults otherwise
    assert main(["sample", "a red circle", "--method", "interleaved", "--model", str(tiny), "--seed", "5",
                 "--force-image", "--out", str(tmp_path), "--no-progress"]) == 0
    pngs = sorted(tmp_path.glob("*/image-*.png"))
    assert len(pngs) == len(out.images) == 1
    assert np.array_equal(_pixels(Image.open(pngs[0])), _pixels(out.images[0]))


def test_to_moves_and_casts_every_part(tiny):
    pipe = InterleavedPipeline.from_pretrained(tiny, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for m in (pipe.parts.model, pipe.parts.clip, pipe.parts.decoder)
               for p in m.parameters())
    assert pipe.to("cpu", torch.float32) is pipe and pipe.device == torch.device("cpu")
    assert next(pipe.parts.decoder.parameters()).dtype == torch.float32
