"""The vqvae stage: model directories, logs and sample grids, finetuning with --init, the optional
PatchGAN, and a tiny VQ-VAE that overfits four images through the trainer."""

import json

import pytest
import torch
from PIL import Image

from conftest import draw_shape
from genvl.checkpoint import open_model_dir
from genvl.config import apply_overrides
from genvl.data import open_image_text
from genvl.errors import ConfigError
from genvl.evaluation.reconstruction import psnr
from genvl.models.base import load_safetensors
from genvl.tokenizers.vqvae import VQVAE, AdversarialVQVAE
from genvl.training import TrainConfig, train
from genvl.training.tasks import available_stages, get_task
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.vqvae import VQVAETask

FAST = ["batch_size=8", "max_steps=2", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none", "data.image_size=16"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def test_stage_registry_knows_vqvae():
    assert "vqvae" in available_stages()
    assert isinstance(get_task("vqvae", cfg()), VQVAETask)


def test_vqvae_trains_into_model_directory(shapes_dir, tmp_path):
    out = tmp_path / "run"
    res = train(VQVAETask(cfg("max_steps=3")), shapes_dir, out, progress=False)
    assert res.step == 3
    for key in ("rec", "commit", "codebook", "psnr", "perplexity", "usage", "restarts"):
        assert all(key in r for r in res.history), key
    assert all("g_loss" not in r for r in res.history)
    for f in ("vqvae/config.json", "vqvae/model.safetensors", "genvl.json", "README.md"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"] == {"vqvae": "genvl.tokenizers.vqvae.VQVAE"}
    vq = open_model_dir(out).load("vqvae")
    assert isinstance(vq, VQVAE) and vq.config.image_size == 16 and vq.quantizer.train_steps.item() == 3
    for k, v in res.model.state_dict().items():  # the released weights are the trained ones
        assert torch.equal(v, vq.state_dict()[k]), k
    (png,) = sorted(out.rglob("samples/*.png"))  # 8 training images over their reconstructions
    with Image.open(png) as im:
        assert im.size == (8 * 16 + 9 * 2, 2 * 16 + 3 * 2)


def test_init_finetunes_and_carries_other_components(shapes_dir, tmp_path):
    base = tmp_path / "base"
    train(CLIPTask(cfg("max_steps=1", "data.image_size=32")), shapes_dir, base, progress=False)
    # a new vqvae beside the clip of --init: the clip and the tokenizer are carried along
    first = tmp_path / "first"
    train(VQVAETask(cfg("model.codebook_size=32")), shapes_dir, first, init=base, progress=False)
    md = open_model_dir(first)
    assert set(md.components) == {"clip", "vqvae"} and (first / "tokenizer" / "tokenizer.json").is_file()
    assert md.load("vqvae").config.codebook_size == 32
    # finetuning continues from its vqvae; behaviour fields may change, the architecture may not
    res = train(VQVAETask(cfg("max_steps=1", "model.dead_code_steps=5", "model.codebook_size=32")), shapes_dir,
                tmp_path / "ft", init=first, progress=False)
    vq = open_model_dir(tmp_path / "ft").load("vqvae")
    assert vq.config.dead_code_steps == 5 and vq.quantizer.train_steps.item() == 2 + 1 and res.step == 1
    with pytest.raises(ConfigError, match="codebook_size"):
        train(VQVAETask(cfg("model.codebook_size=64")), shapes_dir, tmp_path / "bad", init=first, progress=False)
    with pytest.raises(ConfigError, match="works at 16 px"):
        train(VQVAETask(cfg("data.image_size=32")), shapes_dir, tmp_path / "bad2", init=first, progress=False)


@pytest.mark.parametrize("bad,needle", [
    ("model.recon_loss=l3", "recon_loss"),
    ("model.quantizer=kmeans", "quantizer"),
    ("model.image_size=32", "data.image_size"),
    ("model.bogus=1", "bogus"),
    ("model.gan_weight=-1", "gan_weight"),
])
def test_bad_model_config_is_one_config_error(shapes_dir, bad, needle):
    ds = open_image_text(shapes_dir, image_size=16)
    with pytest.raises(ConfigError, match=needle):
        VQVAETask(cfg(bad)).build(ds, None)


def test_gan_starts_after_warmup_and_is_not_released(shapes_dir, tmp_path):
    out = tmp_path / "gan"
    c = cfg("max_steps=3", "save_every=1", "model.gan_weight=0.5", "model.gan_start=1", "model.disc_channels=16",
            "model.disc_layers=1")
    res = train(VQVAETask(c), shapes_dir, out, progress=False)
    assert isinstance(res.model, AdversarialVQVAE)
    assert "g_loss" not in res.history[0]  # step 1: before gan_start
    assert all(k in res.history[-1] for k in ("g_loss", "d_loss", "gan_lambda"))
    assert res.history[-1]["gan_lambda"] > 0
    released = load_safetensors(out / "vqvae" / "model.safetensors")
    assert not any("discriminator" in k for k in released)
    vq = open_model_dir(out).load("vqvae")  # strict load of the VQ-VAE alone
    for k, v in res.model.vq.state_dict().items():
        assert torch.equal(v, vq.state_dict()[k]), k
    # the resume checkpoint keeps the discriminator; resuming continues the GAN run
    ckpt = sorted((out / "train" / "vqvae" / "checkpoints").glob("step-*"))[-1]
    state = load_safetensors(ckpt / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in state)
    res2 = train(VQVAETask(apply_overrides(c, ["max_steps=4"])), shapes_dir, out, resume="latest", progress=False)
    assert res2.step == 4 and "d_loss" in res2.history[-1]


def test_fixed_gan_weight(shapes_dir, tmp_path):
    c = cfg("max_steps=1", "model.gan_weight=0.1", "model.gan_adaptive=false", "model.disc_channels=8",
            "model.disc_layers=1", "model.recon_loss=mse")
    res = train(VQVAETask(c), shapes_dir, tmp_path / "fixed", progress=False)
    assert res.history[-1]["gan_lambda"] == 1.0


def test_tiny_vqvae_overfits_four_images(tmp_path):
    """Trained with the trainer on 4 shapes at 16 px, encode -> decode gives them back (PSNR)."""
    root = tmp_path / "four"
    root.mkdir()
    rows = []
    for color, shape in [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "cross")]:
        draw_shape(color, shape, 16).save(root / f"{color}_{shape}.png")
        rows.append({"file_name": f"{color}_{shape}.png", "text": f"a {color} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg("batch_size=4", "max_steps=250", "warmup_steps=10", "log_every=50", "lr=3e-3", "weight_decay=0")
    res = train(VQVAETask(c), root, tmp_path / "m", progress=False)
    assert res.history[-1]["rec"] < 0.5 * res.history[0]["rec"]
    vq = open_model_dir(tmp_path / "m").load("vqvae")
    ds = open_image_text(root, image_size=16)
    px = torch.stack([ds[i]["pixel_values"] for i in range(4)])  # (4, 3, 16, 16)
    recon = vq.decode_codes(vq.encode(px))
    p = psnr(recon, px, reduction="none")
    assert (p > 20).all() and p.mean() > 23, p  # measured 22.6-37 dB per image over seeds 0-2
    err = (recon[:, None] - px[None]).pow(2).mean(dim=(2, 3, 4))  # (4, 4) recon i vs original j
    assert torch.equal(err.argmin(1), torch.arange(4))
