"""The decoder and super-resolution stages: frozen CLIP from --init, model directories, sample grids,
and a tiny decoder that really reconstructs images from their CLIP embeddings."""

import functools
import json

import pytest
import torch
from PIL import Image

from conftest import draw_shape, write_shapes_folder
from genvl.checkpoint import open_model_dir
from genvl.config import apply_overrides
from genvl.data import open_image_text
from genvl.errors import ConfigError, ModelDirError
from genvl.training import TrainConfig, train
from genvl.training.tasks import get_task
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.conditioning import PRIOR_SAMPLES_FILE, cond_dropped, mix_prior_samples
from genvl.training.tasks.decoder import DecoderTask
from genvl.training.tasks.diffusion import diffusion_loss
from genvl.training.tasks.superres import SuperResTask

FAST = ["batch_size=8", "max_steps=2", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


@pytest.fixture
def clip_dir(shapes_dir, tmp_path):
    """A (barely) trained tiny CLIP model directory: clip/ + tokenizer/."""
    out = tmp_path / "clip_model"
    train(CLIPTask(cfg()), shapes_dir, out, progress=False)
    return out


def _sample_pngs(out):
    return sorted(out.rglob("samples/*.png"))


def test_stage_registry_knows_decoder_and_sr():
    assert isinstance(get_task("decoder", cfg()), DecoderTask)
    assert isinstance(get_task("sr", cfg()), SuperResTask)


def test_decoder_needs_a_clip(shapes_dir, tmp_path):
    with pytest.raises(ModelDirError, match="--init"):
        train(DecoderTask(cfg()), shapes_dir, tmp_path / "run", progress=False)


def test_decoder_trains_into_model_directory(shapes_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    res = train(DecoderTask(cfg("max_steps=3")), shapes_dir, out, init=clip_dir, progress=False)
    assert res.step == 3 and all("cond_frac" in r for r in res.history)
    for f in ("decoder/config.json", "decoder/model.safetensors", "clip/config.json", "clip/model.safetensors",
              "tokenizer/tokenizer.json", "genvl.json", "README.md"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"] == {"clip": "genvl.models.clip.CLIP", "decoder": "genvl.models.decoder.Decoder"}
    md = open_model_dir(out)
    dec, clip = md.load("decoder"), md.load("clip")
    assert dec.config.embed_dim == clip.config.embed_dim and dec.config.image_size == 32 and dec.config.text_width == 0
    for k, v in open_model_dir(clip_dir).load("clip").state_dict().items():  # the CLIP stayed frozen
        assert torch.equal(v, clip.state_dict()[k]), k
    # sample grid: 8 training images over their 8 reconstructions
    (png,) = _sample_pngs(out)
    with Image.open(png) as im:
        assert im.size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2)

    # finetuning continues from the decoder of --init; a conflicting override is a one-line error
    res2 = train(DecoderTask(cfg("max_steps=1")), shapes_dir, tmp_path / "ft", init=out, progress=False)
    assert res2.step == 1 and (tmp_path / "ft" / "decoder" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="text_conditioning"):
        train(DecoderTask(cfg("model.text_conditioning=true")), shapes_dir, tmp_path / "bad", init=out, progress=False)
    with pytest.raises(ConfigError, match="embed_dim"):
        train(DecoderTask(cfg("model.embed_dim=7")), shapes_dir, tmp_path / "bad2", init=clip_dir, progress=False)


def test_text_conditioned_decoder_trains(shapes_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    c = cfg("model.text_conditioning=true", "model.cond_drop=0.5", "data.caption_dropout=0.3")
    train(DecoderTask(c), shapes_dir, out, init=clip_dir, progress=False)
    md = open_model_dir(out)
    assert md.load("decoder").config.text_width == md.load("clip").config.text_width
    assert len(_sample_pngs(out)) == 1  # reconstructions use the captions too


def test_cond_drop_is_deterministic_and_fresh_each_epoch(shapes_dir, clip_dir):
    assert abs(sum(cond_dropped(0.1, 0, 0, i) for i in range(5000)) / 5000 - 0.1) < 0.02
    assert [cond_dropped(0.3, 0, 0, i) for i in range(64)] == [cond_dropped(0.3, 0, 0, i) for i in range(64)]
    assert [cond_dropped(0.3, 0, 0, i) for i in range(64)] != [cond_dropped(0.3, 0, 1, i) for i in range(64)]
    assert not cond_dropped(0.0, 0, 0, 1) and cond_dropped(1.0, 0, 0, 1)
    task = DecoderTask(cfg("model.cond_drop=1.0", "model.text_conditioning=true"))
    ds = open_image_text(shapes_dir, image_size=32)
    task.build(ds, open_model_dir(clip_dir))
    batch = task.collate([ds[i] for i in range(4)])
    assert batch["drop"].all() and batch["text_drop"].all() and batch["input_ids"].shape[0] == 4
    loss, extra = task.loss(task.build(ds, open_model_dir(clip_dir)), batch)
    assert torch.isfinite(loss) and extra["cond_frac"] == 0.0


def test_min_snr_weighting():
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    pred, noise, x0 = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    t = torch.tensor([0, 999])
    assert diffusion_loss(pred, x0, noise, t, ac, "epsilon", "min-snr", 0.0).item() == pytest.approx(1.0)
    # nearly clean step down-weighted by gamma / SNR, the noisiest one kept at 1
    assert diffusion_loss(pred, x0, noise, t, ac, "epsilon", "min-snr", 5.0).item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("weighting,w", [("min-snr", lambda snr: snr.clamp(max=5.0)),
                                         ("truncated-snr", lambda snr: snr.clamp(min=1.0))])
def test_loss_weightings_are_weights_on_the_x0_error(weighting, w):
    """Whatever the UNet predicts (v or epsilon), the loss is mean(w(SNR) |x0_pred - x0|^2)."""
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 150, 480, 700, 900, 990])
    a = ac[t].view(-1, 1, 1, 1).double()
    snr = (a / (1 - a)).flatten()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_pred = x0 + 0.3 * torch.randn(x0.shape, generator=g)  # some prediction of the clean image
    expected = (w(snr) * (x0_pred - x0).double().pow(2).flatten(1).mean(1)).mean()
    eps_pred = (x_t - a.sqrt() * x0_pred) / (1 - a).sqrt()
    v_pred = a.sqrt() * eps_pred - (1 - a).sqrt() * x0_pred
    for out, param in ((eps_pred, "epsilon"), (v_pred, "v")):
        got = diffusion_loss(out.float(), x0, noise, t, ac, param, weighting)
        assert got.item() == pytest.approx(expected.item(), rel=1e-3), param
    # the two weightings differ where it matters: truncated SNR counts the noisy steps' x0 error fully
    if weighting == "truncated-snr":
        other = diffusion_loss(v_pred.float(), x0, noise, t, ac, "v", "min-snr")
        assert got.item() > 1.5 * other.item()


def test_loss_weighting_recipe_errors(shapes_dir, clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="loss_weighting"):
        DecoderTask(cfg("max_steps=1", "model.loss_weighting=snr")).build(None, open_model_dir(clip_dir))


def test_superres_trains_and_keeps_other_components(shapes_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    res = train(SuperResTask(cfg("max_steps=2")), shapes_dir, out, init=clip_dir, progress=False)
    assert res.step == 2
    md = open_model_dir(out)
    sr = md.load("sr")
    assert (sr.config.image_size, sr.config.low_res_size) == (32, 16)
    assert set(md.components) == {"clip", "sr"} and (out / "tokenizer" / "tokenizer.json").is_file()
    (png,) = _sample_pngs(out)
    with Image.open(png) as im:  # low-res / super-resolved / original rows
        assert im.size == (8 * 32 + 9 * 2, 3 * 32 + 4 * 2)
    # without --init, 64 px from 32 px (tiny's 2x)
    c = cfg("max_steps=1", "data.image_size=64", "batch_size=4")
    train(SuperResTask(c), shapes_dir, tmp_path / "alone", progress=False)
    sr = open_model_dir(tmp_path / "alone").load("sr")
    assert (sr.config.image_size, sr.config.low_res_size) == (64, 32)


def test_superres_trains_on_aligned_crops(shapes_dir, tmp_path):
    task = SuperResTask(cfg("max_steps=2", "model.train_crop=16"))
    sr = task.build(open_image_text(shapes_dir, image_size=32), None)
    assert task.train_crop == 16
    px = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    crops = task.crop(px, 16, 2)
    assert crops.shape == (2, 3, 16, 16)
    for c, full in zip(crops, px):  # each crop is a window of its own image, its corner on even pixels
        y, x = divmod(int(c[0, 0, 0].item()) % (32 * 32), 32)
        assert y % 2 == 0 and x % 2 == 0 and torch.equal(c, full[:, y:y + 16, x:x + 16])
    loss, _ = task.loss(sr, {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1})
    assert torch.isfinite(loss)
    res = train(SuperResTask(cfg("max_steps=2", "model.train_crop=16")), shapes_dir, tmp_path / "c", progress=False)
    assert res.step == 2 and open_model_dir(tmp_path / "c").load("sr").config.image_size == 32  # samples whole
    with pytest.raises(ConfigError, match="train_crop"):
        SuperResTask(cfg("max_steps=1", "model.train_crop=15")).build(open_image_text(shapes_dir, image_size=32), None)


def test_tiny_decoder_reconstructs_images_from_clip_embeddings(tmp_path):
    """Overfit on 4 images: DDIM samples from their CLIP embeddings must match the right image."""
    root = tmp_path / "four"
    root.mkdir()
    rows = []
    for color, shape in [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "cross")]:
        for j in range(2):  # two copies: one batch of 8 holds every image twice
            draw_shape(color, shape, 32).save(root / f"{color}_{shape}_{j}.png")
            rows.append({"file_name": f"{color}_{shape}_{j}.png", "text": f"a {color} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["data.image_size=16", "save_every=0", "warmup_steps=20", "lr=3e-3"]
    # a CLIP trained briefly on them, so that their embeddings differ clearly
    train(CLIPTask(cfg(*common, "max_steps=30")), root, tmp_path / "m", progress=False)
    task = DecoderTask(cfg(*common, "max_steps=400", "log_every=50", "model.cond_drop=0.0"))
    res = train(task, root, tmp_path / "m", init=tmp_path / "m", progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]

    dec = open_model_dir(tmp_path / "m").load("decoder")
    ds = open_image_text(root, image_size=16)
    px = torch.stack([ds[i]["pixel_values"] for i in range(0, 8, 2)])  # (4, 3, 16, 16)
    recon = task.reconstruct(dec, px, seed=0)  # 25 DDIM steps from z_image = clip.encode_image(px)
    err = (recon[:, None] - px[None]).pow(2).mean(dim=(2, 3, 4))  # (4, 4) recon i vs original j
    between = (px[:, None] - px[None]).pow(2).mean(dim=(2, 3, 4))[~torch.eye(4, dtype=torch.bool)].mean()
    assert torch.equal(err.argmin(1), torch.arange(4)), err  # each sample is nearest to its own image
    assert err.diag().mean() < 0.4 * between, (err.diag(), between)


@pytest.mark.parametrize("task_cls", [DecoderTask, SuperResTask])
def test_truncated_snr_weighting_trains(task_cls, shapes_dir, clip_dir, tmp_path):
    res = train(task_cls(cfg("max_steps=2", "model.loss_weighting=truncated-snr")), shapes_dir, tmp_path / "run",
                init=clip_dir, progress=False)
    assert res.step == 2 and res.final_loss > 0 and torch.isfinite(torch.tensor(res.final_loss))
    recipe = (tmp_path / "run" / "train" / task_cls.stage / "config.yaml").read_text()
    assert "truncated-snr" in recipe


def test_raw_output_is_what_the_epsilon_is_made_of():
    """forward(target="unet") gives the UNet's v; converted, it is exactly forward()'s epsilon."""
    from genvl.models.decoder import Decoder, decoder_config
    from genvl.models.diffusion import to_epsilon

    torch.manual_seed(0)
    dec = Decoder(decoder_config("tiny", image_size=16, embed_dim=8)).eval()
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.randn(2, 8)
    with torch.no_grad():
        v, eps = dec(x, t, z, target="unet"), dec(x, t, z)
    assert not torch.allclose(v, eps, atol=1e-3)
    torch.testing.assert_close(to_epsilon(v, x, t, dec.alphas_cumprod, "v"), eps)


def test_coarse_layout_path_is_fitted_then_trained(shapes_dir, clip_dir, tmp_path):
    first = tmp_path / "first"
    train(DecoderTask(cfg("max_steps=1")), shapes_dir, first, init=clip_dir, progress=False)
    task = DecoderTask(cfg("max_steps=2", "model.coarse_size=4", "model.coarse_hidden=32", "model.coarse_fit_steps=200"))
    res = train(task, shapes_dir, tmp_path / "grown", init=first, progress=False)
    assert task.coarse_fit["mse"] < task.coarse_fit["mean_image_mse"]  # better than the mean image
    assert all("coarse_mse" in r for r in res.history)
    assert open_model_dir(tmp_path / "grown").load("decoder").config.coarse_size == 4
    with pytest.raises(ConfigError, match="coarse layout path"):
        DecoderTask(cfg("model.coarse_size=2")).build(None, open_model_dir(tmp_path / "grown"))


def test_coarse_only_trains_the_layout_path_and_keeps_the_decoder(shapes_dir, clip_dir, tmp_path):
    """model.coarse_only grows and trains the layout path alone: the UNet's weights and its output on
    the original input stay exactly as trained, while the path's error falls."""
    first = tmp_path / "first"
    train(DecoderTask(cfg("max_steps=1")), shapes_dir, first, init=clip_dir, progress=False)
    task = DecoderTask(cfg("max_steps=30", "lr=3e-3", "warmup_steps=0", "ema_decay=0", "model.coarse_size=4",
                           "model.coarse_hidden=32", "model.coarse_fit_steps=0", "model.coarse_only=true",
                           "model.cond_drop=0"))
    res = train(task, shapes_dir, tmp_path / "layout", init=first, progress=False)
    losses = [r["coarse_mse"] for r in res.history]
    assert losses[-1] < 0.7 * losses[0], losses
    before = open_model_dir(first).load("decoder").eval()
    after = open_model_dir(tmp_path / "layout").load("decoder").eval()
    assert after.config.coarse_size == 4
    old, new = before.state_dict(), after.state_dict()
    for k, v in old.items():
        if k == "unet.conv_in.weight":
            assert torch.equal(new[k][:, :v.shape[1]], v) and not new[k][:, v.shape[1]:].any()
        else:
            assert torch.equal(new[k], v), k
    S, D = after.config.image_size, after.config.embed_dim
    x, t, z = torch.randn(2, 3, S, S), torch.tensor([5, 700]), torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(after(x, t, z), before(x, t, z))
    with pytest.raises(ConfigError, match="coarse_only needs a coarse layout path"):
        DecoderTask(cfg("model.coarse_only=true")).build(None, open_model_dir(first))


def _with_prior_and_layout(shapes_dir, clip_dir, tmp_path):
    """clip + decoder with a 4x4 layout path (UNet never trained on it) + a (barely) trained prior."""
    from genvl.training.tasks.prior import PriorTask

    first = tmp_path / "first"
    train(DecoderTask(cfg("max_steps=1", "model.coarse_size=4", "model.coarse_hidden=64", "model.coarse_fit_steps=0",
                          "model.coarse_only=true")), shapes_dir, first, init=clip_dir, progress=False)
    both = tmp_path / "both"
    train(PriorTask(cfg("batch_size=16", "max_steps=40", "lr=3e-3")), shapes_dir, both, init=first, progress=False)
    return both


def test_prior_samples_fit_the_layout_path_on_the_priors_draws(shapes_dir, tmp_path):
    """model.coarse_refit + prior_samples: a new layout path is fitted on the images' embeddings and on
    embeddings the prior draws from their captions; it predicts the images from those draws better than a path
    fitted on the image embeddings alone, and the UNet is untouched."""
    from genvl.sampling.unclip import sample_prior

    clip_dir = tmp_path / "clip_model_20"
    train(CLIPTask(cfg("max_steps=20", "lr=3e-3")), shapes_dir, clip_dir, progress=False)
    base = _with_prior_and_layout(shapes_dir, clip_dir, tmp_path)
    common = ("max_steps=2", "ema_decay=0", "model.coarse_refit=true", "model.coarse_fit_steps=1000",
              "model.coarse_only=true", "model.cond_drop=0")
    plain = DecoderTask(cfg(*common))
    train(plain, shapes_dir, tmp_path / "plain", init=base, progress=False)
    task = DecoderTask(cfg(*common, "model.prior_samples=2"))
    train(task, shapes_dir, tmp_path / "mixed", init=base, progress=False)
    n = len(open_image_text(shapes_dir))
    assert task.coarse_fit["images"] == n and task.coarse_fit["prior_samples"] == 2 * n
    assert plain.coarse_fit["prior_samples"] == 0
    assert (tmp_path / "mixed" / "train" / "decoder" / PRIOR_SAMPLES_FILE).is_file()  # kept for a resume
    assert not (tmp_path / "plain" / "train" / "decoder" / PRIOR_SAMPLES_FILE).exists()

    table, has = task.prior_table
    assert has.all() and table.shape[:2] == (n, 2)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(n, 2))  # unit CLIP image embeddings
    md = open_model_dir(base)
    clip, prior = md.load("clip").eval(), md.load("prior").eval()
    # Shapes have one caption each: both draws of an image come from it, as genvl sample would draw them
    # (the default prior settings where the model recommends none), from a generator seeded with the seed.
    data = open_image_text(shapes_dir, image_size=32)
    texts = [data.variants(i)[0] for i in range(n) for _ in range(2)]
    gen = torch.Generator().manual_seed(task.cfg.seed)
    draws = sample_prior(prior, clip, md.tokenizer(), texts, steps=25, guidance=4.0, generator=gen)
    torch.testing.assert_close(table.reshape(-1, table.shape[-1]), draws)
    with torch.no_grad():
        px = torch.stack([data[i]["pixel_values"] for i in range(n)])
        z = clip.encode_image(px)
    assert (torch.nn.functional.cosine_similarity(table[:, 0], z, dim=-1) < 0.999).all()  # draws, not the images

    target = torch.nn.functional.adaptive_avg_pool2d(px, 4).repeat_interleave(2, dim=0)
    drawn = table.reshape(-1, table.shape[-1])
    errors = {}
    for name in ("plain", "mixed"):
        dec = open_model_dir(tmp_path / name).load("decoder").eval()
        with torch.no_grad():
            errors[name] = torch.nn.functional.mse_loss(dec.coarse_image(drawn), target).item()
        old, new = md.load("decoder").state_dict(), dec.state_dict()
        assert all(torch.equal(new[k], v) for k, v in old.items() if not k.startswith("coarse.")), name
        assert not torch.equal(new["coarse.0.weight"], old["coarse.0.weight"])  # refitted from scratch
    assert errors["mixed"] < 0.8 * errors["plain"], errors


def test_prior_samples_are_mixed_into_coarse_only_batches():
    K, D = 3, 4
    table, has = torch.randn(10, K, D), torch.zeros(10, dtype=torch.bool)
    has[:5] = True
    torch.manual_seed(0)
    index = torch.arange(10).repeat(200)
    keep = torch.ones(len(index), dtype=torch.bool)
    keep[::7] = False  # dropped (unconditional) rows keep their zeros
    z = torch.zeros(len(index), D)
    out = mix_prior_samples(table, has, z, index, keep)
    swapped = out.abs().sum(-1) > 0
    assert not swapped[index >= 5].any() and not swapped[~keep].any()
    frac = swapped[(index < 5) & keep].float().mean().item()
    assert abs(frac - K / (K + 1)) < 0.05, frac
    rows = swapped.nonzero().squeeze(1)
    assert all(any(torch.equal(out[r], table[index[r], k]) for k in range(K)) for r in rows[:50].tolist())
    assert not z.any()  # the input is not modified


def test_prior_samples_and_refit_errors(shapes_dir, clip_dir, tmp_path):
    first = tmp_path / "first"
    train(DecoderTask(cfg("max_steps=1")), shapes_dir, first, init=clip_dir, progress=False)
    md = open_model_dir(first)
    with pytest.raises(ModelDirError, match="prior"):
        DecoderTask(cfg("model.coarse_size=4", "model.prior_samples=2")).build(None, md)
    with pytest.raises(ConfigError, match="prior_samples must be >= 0"):
        DecoderTask(cfg("model.prior_samples=-1")).build(None, md)
    with pytest.raises(ConfigError, match="has no coarse layout path"):
        DecoderTask(cfg("model.coarse_refit=true")).build(None, md)


def test_prior_samples_condition_the_full_decoder_loss(shapes_dir, clip_dir, tmp_path, monkeypatch):
    """Without coarse_only the UNet's conditioning is also mixed: about K/(K+1) of the conditioned rows
    get one of their image's prior draws, the rest their own embedding, and dropped rows stay zero."""
    base = _with_prior_and_layout(shapes_dir, clip_dir, tmp_path)
    task = DecoderTask(cfg("model.prior_samples=2", "model.cond_drop=0.25"))
    data = open_image_text(shapes_dir, image_size=32)
    model = task.build(data, open_model_dir(base))
    seen = {}
    forward = type(model).forward

    def spy(self, x, t, z, *args, **kwargs):
        seen["z"] = z.detach().clone()
        return forward(self, x, t, z, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    batch = task.collate([data[i] for i in range(len(data))] * 4)
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    table, _ = task.prior_table
    with torch.no_grad():
        own = task.clip.encode_image(batch["pixel_values"]).float()
    z, idx, drop = seen["z"], batch["index"], batch["drop"]
    assert not z[drop].any()
    is_own = torch.isclose(z, own, atol=1e-5).all(-1)
    is_draw = torch.stack([torch.isclose(z, table[idx, k], atol=1e-5).all(-1) for k in range(2)]).any(0)
    assert (is_own | is_draw)[~drop].all()
    frac = is_draw[~drop].float().mean().item()
    assert 0.45 < frac < 0.85, frac


def test_prior_samples_are_kept_in_the_run_folder_and_read_back(shapes_dir, clip_dir, tmp_path, monkeypatch):
    """The draws are written to the stage's run folder; a second build there with the same prior, settings
    and captions reads them (the prior is not run again), and another seed draws anew."""
    import genvl.sampling.unclip as unclip
    base = open_model_dir(_with_prior_and_layout(shapes_dir, clip_dir, tmp_path))
    data = open_image_text(shapes_dir, image_size=32)
    run = tmp_path / "run" / "train" / "decoder"

    def build(*extra):
        task = DecoderTask(cfg("model.prior_samples=2", *extra))
        task.run_dir = run
        task.build(data, base)
        return task

    first = build()
    assert (run / PRIOR_SAMPLES_FILE).is_file()
    drawn = []
    real = unclip.sample_prior

    @functools.wraps(real)  # the task reads the prior's default settings from its signature
    def counting(*args, **kwargs):
        drawn.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(unclip, "sample_prior", counting)
    again = build()
    assert drawn == []  # read back, not drawn
    for a, b in zip(first.prior_table, again.prior_table):
        assert torch.equal(a, b)
    other = build("seed=1")  # another seed: other captions and noise, so drawn again and the file replaced
    assert sum(drawn) == 2 * len(data)
    assert not torch.equal(other.prior_table[0], first.prior_table[0])
    (run / PRIOR_SAMPLES_FILE).write_bytes(b"not a safetensors file")  # a damaged file is drawn over
    drawn.clear()
    build("seed=1")
    assert sum(drawn) == 2 * len(data)


def test_coarse_refit_with_heads_fits_a_mixture_layout_path(shapes_dir, clip_dir, tmp_path):
    """model.coarse_heads with model.coarse_refit replaces the layout path by a K-layout mixture,
    fitted and trained alone (coarse_only); the UNet is untouched and the picked layout's error falls."""
    first = tmp_path / "first"
    train(DecoderTask(cfg("max_steps=1", "model.coarse_size=4", "model.coarse_hidden=32", "model.coarse_fit_steps=0")),
          shapes_dir, first, init=clip_dir, progress=False)
    task = DecoderTask(cfg("max_steps=20", "lr=3e-3", "warmup_steps=0", "ema_decay=0", "model.coarse_refit=true",
                           "model.coarse_heads=3", "model.coarse_fit_steps=400", "model.coarse_only=true",
                           "model.cond_drop=0"))
    res = train(task, shapes_dir, tmp_path / "mix", init=first, progress=False)
    assert task.coarse_fit["mse"] < task.coarse_fit["mean_image_mse"]
    assert all("coarse_mse" in r for r in res.history)
    before = open_model_dir(first).load("decoder")
    after = open_model_dir(tmp_path / "mix").load("decoder")
    assert after.config.coarse_heads == 3 and before.config.coarse_heads == 1
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(new[k], v) for k, v in old.items() if not k.startswith("coarse.")), "UNet changed"
    assert new["coarse.4.weight"].shape[0] == 3 * 3 * 4 * 4 + 3  # 3 layouts + their scores
    # the unconditional input (zero embedding) is given the mean image as its layout
    data = open_image_text(shapes_dir, image_size=after.config.image_size)
    mean = torch.nn.functional.adaptive_avg_pool2d(
        torch.stack([data[i]["pixel_values"] for i in range(len(data))]), 4).mean(0)
    with torch.no_grad():
        uncond = after.coarse_image(torch.zeros(1, after.config.embed_dim))[0]
    assert (uncond - mean).pow(2).mean() < 0.25 * task.coarse_fit["mean_image_mse"]
    with pytest.raises(ConfigError, match="coarse_heads is 2 .* has 3"):
        DecoderTask(cfg("model.coarse_heads=2")).build(None, open_model_dir(tmp_path / "mix"))
    with pytest.raises(ConfigError, match="coarse_heads must be >= 1"):
        DecoderTask(cfg("model.coarse_refit=true", "model.coarse_heads=0")).build(None, open_model_dir(first))


def test_decoder_reads_cached_image_embeddings_beside_the_images(shapes_dir, clip_dir, tmp_path):
    """model.image_embeds: the CLIP image embeddings come from genvl data embed's folder; same seed
    and data, the loss curve is the encoding run's (the CLIP's image size is the data's here, so the
    embeddings are the same numbers); embeddings of another set are refused."""
    from genvl.data.embeddings import embed_image_text
    from genvl.errors import DataError

    emb = tmp_path / "emb"
    embed_image_text(clip_dir, shapes_dir, emb, batch_size=8, device="cpu", progress=False)
    c = ["max_steps=4", "log_every=1", "model.coarse_size=4", "model.coarse_fit_steps=3"]
    a = train(DecoderTask(cfg(*c)), shapes_dir, tmp_path / "encoded", init=clip_dir, progress=False)
    task = DecoderTask(cfg(*c, f"model.image_embeds={emb}"))
    b = train(task, shapes_dir, tmp_path / "read", init=clip_dir, progress=False)
    assert task.z_table is not None and task.z_table.shape[0] == len(open_image_text(shapes_dir))
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], rel=1e-4)
    # a set of other images: refused, naming the embeddings' own data
    sub = write_shapes_folder(tmp_path / "more", n_per_pair=2)
    with pytest.raises(DataError, match="embeddings of another set"):
        train(DecoderTask(cfg(*c, f"model.image_embeds={emb}")), sub, tmp_path / "x", init=clip_dir, progress=False)
