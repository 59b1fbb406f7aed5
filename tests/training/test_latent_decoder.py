"""The latent decoder: a UNet over the code vectors of a frozen VQ-VAE held inside the decoder
(``model.latent: true``), trained, saved, sampled, inverted and used by the diffusion classifier."""

import math

import pytest
import torch

from genvl.checkpoint import open_model_dir, read_meta, save_component, write_meta
from genvl.classify.diffusion import DiffusionClassifier
from genvl.config import apply_overrides, to_dict
from genvl.data import open_image_text
from genvl.errors import ConfigError
from genvl.models.decoder import Decoder, decoder_config
from genvl.sampling.unclip import ddim_invert, sample_decoder
from genvl.tokenizers.vqvae import VQVAE, vqvae_config
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.decoder import DecoderTask

FAST = ["batch_size=8", "max_steps=2", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def tiny_latent_decoder(seed: int = 0) -> tuple[Decoder, VQVAE]:
    torch.manual_seed(seed)
    vq = VQVAE(vqvae_config("tiny", image_size=32)).eval()
    dcfg = decoder_config("tiny", image_size=32, vae=to_dict(vq.config), latent_scale=math.sqrt(vq.config.code_dim))
    dec = Decoder(dcfg)
    dec.vae.load_state_dict(vq.state_dict())
    return dec.eval(), vq


@pytest.fixture
def clip_vq_dir(shapes_dir, tmp_path):
    """A tiny CLIP model directory with a (random) vqvae component added."""
    out = tmp_path / "clip_vq"
    train(CLIPTask(cfg()), shapes_dir, out, progress=False)
    torch.manual_seed(1)
    save_component(VQVAE(vqvae_config("tiny", image_size=32)), out / "vqvae")
    meta = read_meta(out)
    meta["components"]["vqvae"] = "genvl.tokenizers.vqvae.VQVAE"
    write_meta(out, meta)
    return out


def test_latent_decoder_shapes_encode_decode_and_save(tmp_path):
    dec, vq = tiny_latent_decoder()
    h = vq.config.latent_size
    assert dec.sample_shape == (vq.config.code_dim, h, h) and dec.clip_range == pytest.approx(math.sqrt(8))
    px = torch.rand(3, 3, 32, 32) * 2 - 1
    x0 = dec.encode(px)
    assert x0.shape == (3, *dec.sample_shape)
    assert x0.pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)  # unit code vectors * sqrt(code_dim)
    assert x0.abs().max().item() <= dec.clip_range + 1e-5  # inside the schedulers' clipping range
    assert torch.allclose(dec.decode(x0), vq.reconstruct(px), atol=1e-5)  # decode snaps to the same codes
    assert torch.allclose(dec.decode(x0 * 0.3 + 0.01 * torch.randn_like(x0)), vq.reconstruct(px), atol=1e-5)
    # trainable parameters exclude the frozen VQ-VAE, which stays in eval mode under .train()
    dec.train()
    assert not dec.vae.training and not any(p.requires_grad for p in dec.vae.parameters())
    # the VQ-VAE is saved inside the decoder and comes back
    dec.save_pretrained(tmp_path / "d")
    back = Decoder.from_pretrained(tmp_path / "d")
    assert back.config.vae == dec.config.vae and back.sample_shape == dec.sample_shape
    assert torch.equal(back.encode(px), x0)
    with pytest.raises(ValueError, match="image_size"):
        decoder_config("tiny", image_size=64, vae=to_dict(vq.config))
    with pytest.raises(ValueError, match="noisy samples"):
        dec(torch.zeros(1, 3, 32, 32), torch.tensor([1]), torch.zeros(1, dec.config.embed_dim))


def test_latent_sampling_inversion_and_classifier():
    dec, vq = tiny_latent_decoder()
    z = torch.nn.functional.normalize(torch.randn(2, dec.config.embed_dim), dim=-1)
    kw = dict(steps=4, guidance=2.0, scheduler="ddim")
    a = sample_decoder(dec, z, generator=torch.Generator().manual_seed(0), **kw)
    b = sample_decoder(dec, z, generator=torch.Generator().manual_seed(0), **kw)
    c = sample_decoder(dec, z, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every output is a VQ-VAE decoding of some codes: re-encoding and decoding it changes little
    # compared with the outputs' own spread (the decoder's images lie on the VQ-VAE's output set)
    for sched in ("ddpm", "dpm++"):
        out = sample_decoder(dec, z, steps=3, guidance=1.0, scheduler=sched, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    # DDIM inversion works in latent space: x_T has the latent shape and samples back to the image's codes
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    xT = ddim_invert(dec, px, z[:1], steps=20, refine=2)
    assert xT.shape == (1, *dec.sample_shape)
    back = sample_decoder(dec, z[:1], steps=20, guidance=1.0, scheduler="ddim", init_noise=xT)
    assert (back - vq.reconstruct(px)).abs().mean() < 0.5 * (back - a[:1]).abs().mean() + 1e-3
    with pytest.raises(Exception, match="init_noise"):
        sample_decoder(dec, z[:1], steps=2, init_noise=torch.zeros(1, 3, 32, 32))
    # the diffusion classifier noises latents: its shared pairs have the latent shape
    from genvl.classify.diffusion import ClassConditions

    clf = DiffusionClassifier(dec, lambda prompts: ClassConditions(z, None, None), samples=2, seed=0)
    t, eps = clf.noise_pairs(2)
    assert eps.shape == (2, *dec.sample_shape)
    scores = clf.scores(px.repeat(3, 1, 1, 1), ["a", "b"])
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()


def test_latent_decoder_trains_from_a_vqvae_and_caches_inputs(shapes_dir, clip_vq_dir, tmp_path):
    out = tmp_path / "run"
    task = DecoderTask(cfg("max_steps=3", "model.latent=true"))
    res = train(task, shapes_dir, out, init=clip_vq_dir, progress=False)
    assert res.step == 3 and res.history[-1]["loss"] > 0
    md = open_model_dir(out)
    dec, vq = md.load("decoder"), md.load("vqvae")
    assert dec.config.vae == to_dict(vq.config) and dec.config.latent_scale == pytest.approx(math.sqrt(vq.config.code_dim))
    for k, v in vq.state_dict().items():  # the VQ-VAE inside the decoder is the init's, unchanged
        assert torch.equal(dec.vae.state_dict()[k], v), k
    # the cache holds exactly what the frozen models give for the images seen
    ds = open_image_text(shapes_dir, image_size=32)
    cache = task._cache
    seen = cache.done.nonzero().flatten()
    assert len(seen) > 0 and cache.computed == len(seen)  # each image encoded once
    px = torch.stack([ds[int(i)]["pixel_values"] for i in seen])
    z, x0 = cache.store
    assert torch.allclose(z[seen], task.clip.encode_image(px).float(), atol=1e-5)
    assert torch.allclose(x0[seen], dec.encode(px), atol=1e-5)
    # a pixel decoder is not continued as a latent one; fresh: true replaces it
    with pytest.raises(ConfigError, match="pixel space"):
        train(DecoderTask(cfg("max_steps=1", "model.latent=true")), shapes_dir, tmp_path / "bad",
              init=_with_pixel_decoder(shapes_dir, clip_vq_dir, tmp_path), progress=False)
    res2 = train(DecoderTask(cfg("max_steps=1", "model.latent=true", "model.fresh=true")), shapes_dir, tmp_path / "fresh",
                 init=_with_pixel_decoder(shapes_dir, clip_vq_dir, tmp_path), progress=False)
    assert res2.step == 1 and open_model_dir(tmp_path / "fresh").load("decoder").config.vae is not None
    assert read_meta(tmp_path / "fresh")["training"]["decoder"]["fresh"] is True  # the card does not chain it


def _with_pixel_decoder(shapes_dir, clip_vq_dir, tmp_path):
    out = tmp_path / "pixel"
    if not (out / "decoder").is_dir():
        train(DecoderTask(cfg("max_steps=1")), shapes_dir, out, init=clip_vq_dir, progress=False)
    return out


def test_latent_needs_a_vqvae(shapes_dir, tmp_path):
    clip_dir = tmp_path / "clip"
    train(CLIPTask(cfg()), shapes_dir, clip_dir, progress=False)
    with pytest.raises(Exception, match="vqvae"):
        train(DecoderTask(cfg("model.latent=true")), shapes_dir, tmp_path / "run", init=clip_dir, progress=False)


def test_lora_leaves_the_frozen_vqvae_alone(tmp_path):
    from genvl.models.lora import add_lora, has_lora

    dec, vq = tiny_latent_decoder()
    add_lora(dec, rank=2)
    names = [n for n, p in dec.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and not n.startswith("vae.") for n in names)
    assert not any("lora_" in n for n, _ in dec.vae.named_parameters())
    assert has_lora(dec)
