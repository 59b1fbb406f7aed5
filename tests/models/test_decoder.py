"""The pixel decoder and the super-resolution UNet: sizes, shapes, conditioning, save/load, schedulers."""

import json

import pytest
import torch
import torch.nn.functional as F

from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.models.decoder import (
    DECODER_SIZES,
    SCHEDULER_KINDS,
    Decoder,
    DecoderConfig,
    coarse_loss,
    decoder_config,
)
from genvl.models.superres import SUPERRES_SIZES, SuperRes, SuperResConfig, superres_config

D, W = 32, 24  # W != D exercises the text projection


def _decoder(seed=0, **over):
    torch.manual_seed(seed)
    return Decoder(decoder_config("tiny", embed_dim=D, **over)).eval()


def _batch(B=2, S=32, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, S, S, generator=g)
    t = torch.tensor([10, 700][:B])
    z = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    states = torch.randn(B, L, W, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0  # one caption shorter than the batch
    return x, t, z, states, mask


def test_size_tables_build():
    assert {"tiny", "small", "base"} <= set(DECODER_SIZES) and {"tiny", "small", "base"} <= set(SUPERRES_SIZES)
    assert DecoderConfig().block_out_channels == [128, 256, 384, 512] and DecoderConfig().beta_schedule == "squaredcos_cap_v2"
    sr = SuperResConfig()
    assert (sr.image_size, sr.low_res_size, sr.beta_schedule, sr.max_aug_level) == (256, 64, "linear", 250)
    tiny = Decoder(decoder_config("tiny"))
    assert tiny.config.image_size == 32 and tiny.num_parameters < 2_000_000
    assert SuperRes(superres_config("tiny")).num_parameters < 1_000_000
    # a one-level UNet is all cross-attention; deeper ones keep plain ResNet blocks at the top
    assert decoder_config("tiny").down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert decoder_config("tiny").up_block_types == ["CrossAttnUpBlock2D", "UpBlock2D"]
    base = DECODER_SIZES["base"]
    assert base.down_block_types == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3 and base.image_size == 64
    assert decoder_config("tiny", block_out_channels=[32]).down_block_types == ["CrossAttnDownBlock2D"]


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="unknown decoder size"):
        decoder_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        decoder_config("tiny", image_size=33)
    with pytest.raises(ValueError, match="attention_head_dim"):
        decoder_config("tiny", attention_head_dim=24)
    with pytest.raises(ValueError, match="low_res_size"):
        superres_config("tiny", low_res_size=32)
    with pytest.raises(ValueError, match="max_aug_level"):
        superres_config("tiny", max_aug_level=2000)


def test_decoder_shapes_with_and_without_text():
    x, t, z, states, mask = _batch()
    assert _decoder()(x, t, z).shape == (2, 3, 32, 32)
    m = _decoder(text_width=W)
    assert m(x, t, z, states, mask).shape == (2, 3, 32, 32)
    assert m(x, 500, z).shape == (2, 3, 32, 32)  # scalar timestep, no text
    with pytest.raises(ValueError, match="image_embeds"):
        m(x, t, z[:, :16])
    with pytest.raises(ValueError, match="text_width 0"):
        _decoder()(x, t, z, states, mask)


def test_conditioning_paths_are_real():
    x, t, z, states, mask = _batch()
    m = _decoder(text_width=W)
    with torch.no_grad():
        cond = m(x, t, z, states, mask)
        uncond = m(x, t, torch.zeros_like(z), states, torch.zeros_like(mask))
        other_z = m(x, t, z.flip(0), states, mask)
        other_text = m(x, t, z, states * 2, mask)
        # masked text positions are ignored; all-masked text is the same as no text
        ignored = states.clone()
        ignored[0, 3:] = 7.0
        same = m(x, t, z, ignored, mask)
        no_text = m(x, t, torch.zeros_like(z))
    assert not torch.allclose(cond, uncond, atol=1e-4)
    assert not torch.allclose(cond, other_z, atol=1e-4)
    assert not torch.allclose(cond, other_text, atol=1e-4)
    assert torch.allclose(cond, same, atol=1e-5)
    assert torch.allclose(uncond, no_text, atol=1e-5)
    # z_image reaches the UNet through both the context tokens and the time embedding
    assert m.unet.config.class_embed_type == "projection" and m.unet.config.projection_class_embeddings_input_dim == D
    assert m.unet.config.cross_attention_dim == m.config.cross_attention_dim


def test_decoder_save_load_identical_and_deterministic(tmp_path):
    x, t, z, states, mask = _batch()
    m = _decoder(seed=3, text_width=W)
    m.save_pretrained(tmp_path / "decoder")
    cfg = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert cfg["_class"] == "genvl.models.decoder.Decoder" and cfg["text_width"] == W
    m2 = Decoder.from_pretrained(tmp_path / "decoder")
    with torch.no_grad():
        a, b = m(x, t, z, states, mask), m2(x, t, z, states, mask)
        c = _decoder(seed=3, text_width=W)(x, t, z, states, mask)  # same seed, same model
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    # through a model directory (the component registry)
    save_model_dir(tmp_path / "md", {"decoder": m})
    m3 = open_model_dir(tmp_path / "md").load("decoder")
    with torch.no_grad():
        assert torch.equal(a, m3(x, t, z, states, mask))


@pytest.mark.parametrize("cls,cfg", [(Decoder, decoder_config("tiny")), (SuperRes, superres_config("tiny"))])
def test_scheduler_kinds(cls, cfg):
    m = cls(cfg)
    names = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}
    assert set(SCHEDULER_KINDS) == set(names)
    for kind, name in names.items():
        s = m.make_scheduler(kind)
        assert type(s).__name__ == name
        assert s.config.prediction_type == "epsilon"
        assert s.config.num_train_timesteps == cfg.num_train_timesteps and s.config.beta_schedule == cfg.beta_schedule
    assert m.make_scheduler("dpm++").config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="ddpm, ddim, dpm\\+\\+"):
        m.make_scheduler("euler")


def test_ddim_loop_runs_and_is_seeded():
    m = _decoder()
    z = F.normalize(torch.randn(2, D), dim=-1)

    def run(seed):
        s = m.make_scheduler("ddim")
        s.set_timesteps(3)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for t in s.timesteps:
                x = s.step(m(x, t.long().expand(2), z), t, x).prev_sample
        return x

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_superres_shapes_conditioning_and_save_load(tmp_path):
    torch.manual_seed(0)
    m = SuperRes(superres_config("tiny")).eval()
    assert m.unet.config.in_channels == 6 and m.unet.config.class_embed_type == "timestep"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    lo = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    t, aug = torch.tensor([5, 900]), torch.tensor([0, 100])
    with torch.no_grad():
        out = m(x, t, lo, aug)
        assert out.shape == (2, 3, 32, 32)
        assert not torch.allclose(out, m(x, t, lo, torch.tensor([200, 200])), atol=1e-5)  # aug level conditions
        assert not torch.allclose(out, m(x, t, -lo, aug), atol=1e-5)  # the low-res image conditions
    assert m.upsample(lo).shape == (2, 3, 32, 32)
    m.save_pretrained(tmp_path / "sr")
    m2 = SuperRes.from_pretrained(tmp_path / "sr")
    with torch.no_grad():
        assert torch.equal(out, m2(x, t, lo, aug))
    with pytest.raises(ValueError, match="noisy images"):
        m(torch.randn(2, 3, 16, 16), t, lo, aug)


def test_coarse_layout_path_conditions_and_grows_without_changing_the_function():
    x, t, z, _, _ = _batch()
    base = _decoder(seed=1)
    grown = base.add_coarse(8, hidden=16).eval()
    assert grown.config.coarse_size == 8 and grown.unet.config.in_channels == 6
    with torch.no_grad():
        assert torch.allclose(base(x, t, z), grown(x, t, z), atol=1e-6)  # zero weights on the new channels
        grown.unet.conv_in.weight[:, 3:].normal_()
        out, coarse = grown(x, t, z), grown.coarse(z)
        assert coarse.layouts.shape == (2, 1, 3, 8, 8) and coarse.scores is None
        assert torch.equal(coarse.picked(), grown.coarse_image(z))
        assert not torch.allclose(out, grown(x, t, z.flip(0)), atol=1e-5)
    with pytest.raises(ValueError, match="already has"):
        grown.add_coarse(8)
    with pytest.raises(ValueError, match="coarse_size"):
        decoder_config("tiny", coarse_size=64)
    with pytest.raises(ValueError, match="no coarse"):
        base.coarse_image(z)
    with pytest.raises(ValueError, match="target must be one of"):
        base(x, t, z, target="v")


def test_mixture_layout_path_hands_on_its_best_scored_layout(tmp_path):
    x, t, z, _, _ = _batch()
    dec = _decoder(seed=2, coarse_size=4, coarse_hidden=16, coarse_heads=3)
    with torch.no_grad():
        pred = dec.coarse_layouts(z)
        assert pred.layouts.shape == (2, 3, 3, 4, 4) and pred.scores.shape == (2, 3)
        best = pred.scores.argmax(1)
        assert torch.equal(dec.coarse_image(z), pred.layouts[torch.arange(2), best])
        out, coarse = dec(x, t, z), dec.coarse(z)
        assert torch.equal(coarse.picked(), dec.coarse_image(z))
        # the UNet reads the picked layout: forcing another head's score changes the output
        dec.coarse[-1].bias[-3:] += torch.tensor([0.0, 0.0, 1e4]) if best[0] != 2 else torch.tensor([1e4, 0.0, 0.0])
        assert not torch.allclose(out, dec(x, t, z), atol=1e-5)
    dec.save_pretrained(tmp_path / "dec")
    again = Decoder.from_pretrained(tmp_path / "dec").eval()
    assert again.config.coarse_heads == 3
    with torch.no_grad():
        assert torch.equal(again.coarse_image(z), dec.coarse_image(z))
    dec.reset_coarse(heads=1)
    assert dec.config.coarse_heads == 1 and dec.coarse_layouts(z).scores is None
    with pytest.raises(ValueError, match="coarse_heads"):
        decoder_config("tiny", coarse_size=4, coarse_heads=0)


def test_mixture_layout_path_keeps_both_modes_where_a_regression_blurs_them():
    """One embedding, two equally likely targets (the same emoji in two styles): a plain regression
    learns their mean; two heads fitted winner-takes-all learn one target each, and the picked layout
    is one of them, far from the blur."""
    torch.manual_seed(0)
    a, b = torch.ones(3, 4, 4) * 0.8, -torch.ones(3, 4, 4) * 0.8
    a[:, :2] = -0.8  # a different layout, not only a different colour
    z = F.normalize(torch.randn(1, D), dim=-1).expand(64, D)
    target = torch.stack([a, b]).repeat(32, 1, 1, 1)  # (64, 3, 4, 4), half a, half b
    picked = {}
    for heads in (1, 2):
        dec = _decoder(seed=3, coarse_size=4, coarse_hidden=32, coarse_heads=heads).train()
        opt = torch.optim.Adam(dec.coarse.parameters(), lr=3e-3)
        for _ in range(300):
            loss, mse = coarse_loss(dec.coarse_layouts(z), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            picked[heads] = dec.coarse_image(z[:1])[0]
            if heads == 2:
                layouts = dec.coarse_layouts(z[:1]).layouts[0]  # (2, 3, 4, 4)
                to_a, to_b = (layouts - a).pow(2).mean((1, 2, 3)), (layouts - b).pow(2).mean((1, 2, 3))
                assert min(to_a[0] + to_b[1], to_a[1] + to_b[0]) < 0.02  # one head per mode
    mean = (a + b) / 2
    assert (picked[1] - mean).pow(2).mean() < 0.01  # the regression blurs
    nearest = min((picked[2] - a).pow(2).mean(), (picked[2] - b).pow(2).mean())
    assert nearest < 0.01 and (picked[2] - mean).pow(2).mean() > 0.2


def test_convolutional_superres_takes_crops_at_the_same_scale():
    """A crop of the input gives (away from the crop's borders) what the whole image gives there."""
    torch.manual_seed(0)
    m = SuperRes(superres_config("tiny")).eval()  # 16 -> 32 px, no attention
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=g)
    lo = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    t, aug = torch.tensor([300]), torch.tensor([0])
    with torch.no_grad():
        whole = m(x, t, lo, aug)
        crop = m(x[..., :16, :16], t, lo[..., :8, :8], aug)
    assert crop.shape == (1, 3, 16, 16)
    assert torch.isfinite(crop).all()
    # the crop's top-left quarter is far from the cut (the UNet's receptive field reaches past it at the
    # bottom / right edge, so only the inner part is compared, loosely)
    inner = (crop - whole[..., :16, :16])[..., :4, :4].abs().mean()
    assert inner < 0.5 * (crop - whole[..., 16:, 16:]).abs().mean()
    with pytest.raises(ValueError, match="low_res of shape"):
        m(x[..., :16, :16], t, lo, aug)  # a whole low-res image for a crop
    attn = SuperRes(superres_config("tiny", attention_levels=1)).eval()
    with pytest.raises(ValueError, match="noisy images of shape"):
        attn(x[..., :16, :16], t, lo[..., :8, :8], aug)  # attention layers need the whole image
