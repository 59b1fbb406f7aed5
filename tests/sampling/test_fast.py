"""Compiled unCLIP sampling (genvl.sampling.fast): same images as eager, restorable, checked input."""

from __future__ import annotations

import os

import pytest
import torch

from genvl.errors import GenvlError
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.sampling.fast import (
    compile_components,
    compile_module,
    compiled,
    compiled_mode,
    uncompile_components,
)
from genvl.sampling.unclip import UnclipComponents, text_to_image
from genvl.tokenizers.text import train_text_tokenizer

slow = pytest.mark.skipif(os.environ.get("GENVL_SLOW") != "1", reason="minutes-long; set GENVL_SLOW=1")

D = W = 32  # the tiny CLIP's embedding and text widths
TEXT_LEN = 8
CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def components():
    tok = train_text_tokenizer(CAPTIONS, vocab_size=300, model_max_length=TEXT_LEN)
    torch.manual_seed(0)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": TEXT_LEN,
                                           "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})).eval()
    prior = DiffusionPrior(prior_config("tiny", embed_dim=D, text_width=W, text_len=TEXT_LEN)).eval()
    decoder = Decoder(decoder_config("tiny", image_size=8, embed_dim=D, block_out_channels=[16, 32],
                                     attention_head_dim=16, cross_attention_dim=32, norm_num_groups=8)).eval()
    return UnclipComponents(clip, tok, prior, decoder)


def _sample(comps, scheduler):
    kw = dict(num_images=2, steps=3, prior_steps=2, guidance=3.0, prior_guidance=2.0, scheduler=scheduler, seed=0)
    return text_to_image(comps, ["a red circle", "a blue square"], **kw)


# aot_eager traces the forwards as torch.compile does (graph capture, guards, the in-place swap) in
# seconds; inductor also generates and builds C++ kernels: minutes on a cold cache, so it is slow.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=slow)])
def test_compiled_sampling_matches_eager(components, backend):
    torch.compiler.reset()
    eager = {k: _sample(components, k) for k in ("ddim", "dpm++")}
    with compiled(components, "default", backend=backend) as comps:
        assert comps is components
        assert compiled_mode(components.decoder) == "default" and compiled_mode(components.prior) == "default"
        assert compiled_mode(components.clip) is None  # the text tower runs once per call: left eager
        fast = {k: _sample(comps, k) for k in ("ddim", "dpm++")}
    for k in eager:
        assert fast[k].images.shape == eager[k].images.shape == (4, 3, 8, 8)
        torch.testing.assert_close(fast[k].image_embeds, eager[k].image_embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast[k].images, eager[k].images, atol=1e-4, rtol=1e-4)
    # back to eager: the class's forward, the same images as before
    assert compiled_mode(components.decoder) is None and "forward" not in vars(components.decoder)
    assert torch.equal(_sample(components, "ddim").images, eager["ddim"].images)
    torch.compiler.reset()


def test_compile_is_in_place_and_restorable(components):
    dec = components.decoder
    state = {k: v.clone() for k, v in dec.state_dict().items()}
    compile_components(components, "reduce-overhead", parts=("decoder",), backend="eager")
    assert compiled_mode(dec) == "reduce-overhead" and compiled_mode(components.prior) is None
    compile_module(dec, "default", backend="eager")  # recompiling replaces the earlier wrapper
    assert compiled_mode(dec) == "default"
    assert dec.state_dict().keys() == state.keys()
    uncompile_components(components)
    assert compiled_mode(dec) is None and "forward" not in vars(dec)
    uncompile_components(components)  # idempotent


def test_bad_input(components):
    with pytest.raises(GenvlError, match="unknown compile mode"):
        compile_components(components, "fastest")
    with pytest.raises(GenvlError, match="cannot compile 'clip'"):
        compile_components(components, parts=("clip",))
    with pytest.raises(GenvlError, match="nn.Module"):
        compile_module(lambda x: x)
    assert compiled_mode(components.decoder) is None
