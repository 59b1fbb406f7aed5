"""Speed and memory options of the trainer: compile, gradient checkpointing, channels-last, attention."""

import importlib.util
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.config import apply_overrides
from genvl.errors import ConfigError
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.lm import TokenLM, lm_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.training import TrainConfig, train
from genvl.training.speed import apply_speed_options, enable_gradient_checkpointing
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.decoder import DecoderTask

FAST = ["batch_size=8", "max_steps=3", "warmup_steps=1", "log_every=1", "save_every=2", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]
slow = pytest.mark.skipif(os.environ.get("GENVL_SLOW") != "1", reason="minutes-long; set GENVL_SLOW=1")


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def test_options_are_validated():
    for key, bad in (("attention", "flash"), ("compile", "1"), ("gradient_checkpointing", "maybe"),
                     ("prefetch_factor", "0")):
        with pytest.raises(ConfigError, match=key):
            cfg(f"{'data.' if key == 'prefetch_factor' else ''}{key}={bad}").validate()
    c = cfg()
    c.channels_last = "yes"  # a config built in Python is checked too
    with pytest.raises(ConfigError, match="channels_last must be true or false"):
        c.validate()
    cfg("compile=true", "gradient_checkpointing=true", "channels_last=true", "data.prefetch_factor=4").validate()


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_is_a_one_line_error(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"attention=xformers needs the xformers package") as e:
        train(CLIPTask(cfg("attention=xformers")), shapes_dir, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_models():
    """(name, model, loss function) of a diffusers UNet, two transformers towers and a Llama."""
    g = torch.Generator().manual_seed(0)
    dec = Decoder(decoder_config("tiny", image_size=16))
    x, t, z = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 32, generator=g)
    clip = CLIP(clip_config("tiny"))
    px, ids = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randint(4, 100, (2, 8), generator=g)
    lm = TokenLM(lm_config("tiny", text_vocab_size=64, codebook_size=16, image_tokens=4, text_len=4))
    seq = torch.randint(0, 80, (2, 10), generator=g)
    return [
        ("decoder", dec, lambda m: m(x, t, z).pow(2).mean()),
        ("clip", clip, lambda m: (m.encode_image(px) @ m.encode_text(ids, torch.ones_like(ids)).embeds.T).sum()),
        ("lm", lm, lambda m: m(seq).logits.float().logsumexp(-1).mean()),
    ]


def test_gradient_checkpointing_keeps_loss_and_gradients():
    for name, model, loss_fn in _tiny_models():
        model.train()
        loss, grads = _loss_and_grads(model, loss_fn)
        done = enable_gradient_checkpointing(model)
        assert done, name
        flags = [m.is_gradient_checkpointing for m in model.modules() if hasattr(m, "is_gradient_checkpointing")]
        assert flags and all(flags), name
        loss_ck, grads_ck = _loss_and_grads(model, loss_fn)
        assert torch.allclose(loss, loss_ck, rtol=1e-5, atol=1e-6), name
        assert grads.keys() == grads_ck.keys(), name
        for k in grads:
            assert torch.allclose(grads[k], grads_ck[k], rtol=1e-4, atol=1e-6), f"{name}: {k}"


def test_options_with_nothing_to_act_on_say_so():
    prior = DiffusionPrior(prior_config("tiny"))  # diffusers' PriorTransformer has no checkpointing
    lm = TokenLM(lm_config("tiny", text_vocab_size=64, codebook_size=16, image_tokens=4, text_len=4))
    notes = apply_speed_options(prior, cfg("gradient_checkpointing=true"), what="prior")
    assert notes == ["gradient_checkpointing: nothing in the prior supports it; training without"]
    notes = apply_speed_options(lm, cfg("channels_last=true"), what="lm")
    assert notes == ["channels_last: the lm has no 2-D convolutions; memory format left as is"]


def test_gradient_checkpointing_through_the_trainer(shapes_dir, tmp_path):
    plain = train(CLIPTask(cfg()), shapes_dir, tmp_path / "plain", progress=False)
    ck = train(CLIPTask(cfg("gradient_checkpointing=true")), shapes_dir, tmp_path / "ck", progress=False)
    assert ck.model.vision.is_gradient_checkpointing and ck.model.text.is_gradient_checkpointing
    assert [r["loss"] for r in ck.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    a, b = (open_model_dir(tmp_path / d).load("clip").state_dict() for d in ("plain", "ck"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _untrained_clip_dir(shapes_dir, path):
    from genvl.data import open_image_text
    from genvl.tokenizers.text import train_text_tokenizer

    tok = train_text_tokenizer(open_image_text(shapes_dir, image_size=32).captions, vocab_size=300, model_max_length=8)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8}))
    save_model_dir(path, {"clip": clip}, tokenizer=tok)
    return path


def test_channels_last_decoder_trains(shapes_dir, tmp_path):
    init = _untrained_clip_dir(shapes_dir, tmp_path / "clip")
    res = train(DecoderTask(cfg("channels_last=true", "max_steps=2")), shapes_dir, tmp_path / "run", init=init,
                progress=False)
    assert res.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    conv = res.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    dec = open_model_dir(tmp_path / "run").load("decoder")  # released weights load as usual
    assert torch.equal(dec.unet.conv_in.weight, conv.detach().contiguous())


def _check_compiled_run(shapes_dir, tmp_path):
    """A compiled run trains as the eager one and saves plain parameter names everywhere."""
    extra = ["ema_decay=0.9"]
    eager = train(CLIPTask(cfg(*extra)), shapes_dir, tmp_path / "eager", progress=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    comp = train(CLIPTask(cfg("compile=true", *extra)), shapes_dir, tmp_path / "comp", progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the loss really ran compiled
    assert [r["loss"] for r in comp.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-4)
    ckpt = load_file(str(tmp_path / "comp/train/clip/checkpoints/step-00000003/model.safetensors"))
    released = load_file(str(tmp_path / "comp/clip/model.safetensors"))
    plain = load_file(str(tmp_path / "eager/clip/model.safetensors")).keys()
    assert not [k for k in plain if "_orig_mod" in k]
    assert set(released.keys()) == set(plain)
    own = comp.model.state_dict().keys()  # the module's names; the release uses the file's (CLIPModel's)
    assert set(ckpt.keys()) == set(own) and set(comp.model.file_keys(dict.fromkeys(own))) == set(plain)
    clip = open_model_dir(tmp_path / "comp").load("clip")  # strict load of the released (EMA) weights
    ref = open_model_dir(tmp_path / "eager").load("clip").state_dict()
    for k, v in clip.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-4), k
    torch._dynamo.reset()


def test_compile_trains_and_saves_plain_names(shapes_dir, tmp_path, monkeypatch):
    # The trainer's compile path with dynamo + AOTAutograd but without inductor's C++ code generation,
    # which takes minutes on a small CPU (test_compile_with_inductor runs it).
    calls = []
    real = torch.compile

    def compile_(model, **kw):
        calls.append(model)
        return real(model, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    _check_compiled_run(shapes_dir, tmp_path)
    assert len(calls) == 1


def _inductor_usable() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@slow
@pytest.mark.slow
@pytest.mark.skipif(not _inductor_usable(), reason="inductor needs a C++ compiler on CPU")
def test_compile_with_inductor(shapes_dir, tmp_path):
    _check_compiled_run(shapes_dir, tmp_path)


class _Stop(Exception):
    pass


def test_prefetch_factor_reaches_the_loader(shapes_dir, tmp_path, monkeypatch):
    seen = {}

    def init(self, *a, **kw):  # record the arguments; stop before any worker starts
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", init)
    with pytest.raises(_Stop):
        train(CLIPTask(cfg("data.num_workers=2", "data.prefetch_factor=3")), shapes_dir, tmp_path / "run",
              progress=False)
    assert seen["prefetch_factor"] == 3 and seen["num_workers"] == 2


def test_lerp_ema_matches_diffusers_ema_step_for_step():
    from diffusers.training_utils import EMAModel

    from genvl.training.speed import make_ema

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    ref = EMAModel([p.detach().clone() for p in params], decay=0.99, foreach=True)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ema = make_ema(params, 0.99)
    for _ in range(6):  # the parameters move; both averages follow with the same (warm-up) decay
        with torch.no_grad():
            for p, q in zip(params, ref_params):
                step = torch.randn_like(p)
                p.add_(step)
                q.add_(step)
        ema.step(params)
        ref.step(ref_params)
        assert ema.cur_decay_value == ref.cur_decay_value
    for s, r, p in zip(ema.shadow_params, ref.shadow_params, params):
        torch.testing.assert_close(s, r)
        assert not torch.allclose(s, p)  # an average, not a copy
    assert ema.optimization_step == 6


def test_lerp_ema_falls_back_for_a_frozen_parameter():
    from genvl.training.speed import make_ema

    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    ema = make_ema(params, 0.5)
    with torch.no_grad():
        params[0].fill_(1.0)
        params[1].fill_(3.0)
    ema.step(params)  # diffusers' first step has decay 0: a copy
    with torch.no_grad():
        params[0].fill_(2.0)
        params[1].fill_(5.0)
    ema.step(params)
    assert torch.equal(ema.shadow_params[1], params[1])  # EMAModel copies frozen parameters
    assert 1.0 < float(ema.shadow_params[0][0]) < 2.0
