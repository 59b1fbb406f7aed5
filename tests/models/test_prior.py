"""The diffusion prior: sizes, shapes, masking, save/load, schedulers, learning and sampling."""

import json

import pytest
import torch
import torch.nn.functional as F

from genvl.models.prior import (
    PRIOR_SIZES,
    SCHEDULER_KINDS,
    DiffusionPrior,
    PriorConfig,
    prior_config,
    unconditional_text,
)

D, W, T = 32, 24, 8  # W != D exercises the prior's own text projection


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return DiffusionPrior(prior_config("tiny", embed_dim=D, text_width=W, text_len=T, **over)).eval()


def _batch(B=3, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    emb = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    states = torch.randn(B, L, W, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0  # one caption shorter than the batch
    return x, t, emb, states, mask


def test_size_table_builds():
    assert {"tiny", "small", "base"} <= set(PRIOR_SIZES)
    assert PRIOR_SIZES["base"] == PriorConfig()
    tiny = DiffusionPrior(prior_config("tiny"))
    assert tiny.num_parameters < 100_000
    small = DiffusionPrior(prior_config("small"))
    assert 2_000_000 <= small.num_parameters <= 5_000_000
    with pytest.raises(ValueError, match="unknown prior size 'huge'; known: tiny, small, base"):
        prior_config("huge")
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        prior_config("tiny", num_layers=0)


def test_forward_shapes_and_padding_to_text_len():
    m = _model()
    x, t, emb, states, mask = _batch()
    with torch.no_grad():
        y = m(x, t, emb, states, mask)
        assert y.shape == (3, D) and torch.isfinite(y).all()
        # explicit padding to text_len gives the same result as the implicit one
        pad_states = F.pad(states, (0, 0, 0, T - states.shape[1]))
        pad_mask = F.pad(mask, (0, T - mask.shape[1]))
        assert torch.allclose(y, m(x, t, emb, pad_states, pad_mask), atol=1e-6)
        # values at masked positions do not matter
        noisy_pad = states.clone()
        noisy_pad[0, 3:] = 100.0
        assert torch.allclose(y, m(x, t, emb, noisy_pad, mask), atol=1e-5)
        # but real tokens, z_text, x_t and t do
        other = states.clone()
        other[0, 1] += 1.0
        assert not torch.allclose(y[0], m(x, t, emb, other, mask)[0], atol=1e-4)
        assert not torch.allclose(y, m(x, t, emb.flip(0), states, mask), atol=1e-4)
        assert not torch.allclose(y, m(x, (t + 300) % 1000, emb, states, mask), atol=1e-4)
    with pytest.raises(ValueError, match="more than the prior's text_len 8"):
        m(x, t, emb, torch.randn(3, T + 1, W), torch.ones(3, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="text_states of shape"):
        m(x, t, emb, torch.randn(3, 5, D), mask)


def test_unconditional_text_convention():
    u = unconditional_text(2, 5, W, D, device="cpu")
    assert u.embeds.shape == (2, D) and u.token_states.shape == (2, 5, W) and u.attention_mask.shape == (2, 5)
    assert not u.embeds.any() and not u.token_states.any()
    assert u.attention_mask.tolist() == [[1, 0, 0, 0, 0]] * 2
    m = _model()
    x, t, _, _, _ = _batch(B=2)
    with torch.no_grad():
        y = m(x, t, u.embeds, u.token_states, u.attention_mask)
    assert torch.isfinite(y).all()


def test_embedding_stats_and_save_load_identical(tmp_path):
    m = _model(seed=3)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(D, generator=g) * 0.1, torch.rand(D, generator=g) + 0.5
    m.set_embedding_stats(mean, std)
    z = torch.randn(4, D, generator=g)
    assert torch.allclose(m.normalize(z), (z - mean) / std)
    assert torch.allclose(m.denormalize(m.normalize(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        m.set_embedding_stats(mean[:-1], std)
    with pytest.raises(ValueError, match="> 0"):
        m.set_embedding_stats(mean, torch.zeros(D))

    m.save_pretrained(tmp_path / "prior")
    assert json.loads((tmp_path / "prior" / "config.json").read_text())["_class"] == "genvl.models.prior.DiffusionPrior"
    m2 = DiffusionPrior.from_pretrained(tmp_path / "prior")
    assert torch.equal(m2.embed_mean, mean) and torch.equal(m2.embed_std, std)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(m(*batch), m2(*batch))
    assert torch.equal(m.normalize(z), m2.normalize(z))


def test_deterministic_under_seed():
    a, b = _model(seed=7), _model(seed=7)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(a(*batch), b(*batch))
    assert not torch.equal(a(*batch), _model(seed=8)(*batch))


def test_only_trained_parameters_require_grad():
    m = _model()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"transformer.clip_mean", "transformer.clip_std"}
    m.train()
    m(*_batch()).pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_scheduler_kinds():
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    m = _model(num_train_timesteps=100, beta_schedule="linear")
    types = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
    assert set(SCHEDULER_KINDS) == set(types)
    for kind, cls in types.items():
        s = m.make_scheduler(kind)
        assert isinstance(s, cls)
        assert s.config.num_train_timesteps == 100 and s.config.beta_schedule == "linear"
        assert s.config.prediction_type == "sample"
    assert m.make_scheduler("ddpm").config.clip_sample is False
    assert m.make_scheduler("ddim").config.clip_sample is False
    assert m.make_scheduler("dpm++").config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="unknown scheduler kind 'euler'; kinds: ddpm, ddim, dpm\\+\\+"):
        m.make_scheduler("euler")


def _pairs(n=8, L=4, seed=0):
    """n (text, image) pairs: random text conditioning, random unit image embeddings."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    states = torch.randn(n, L, W, generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    z = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    return emb, states, mask, z


def _x0_loss(m, sched, emb, states, mask, x0, t, noise):
    return F.mse_loss(m(sched.add_noise(x0, noise, t), t, emb, states, mask), x0)


def test_x0_loss_decreases_on_a_fixed_batch():
    m = _model(seed=0).train()
    sched = m.make_scheduler("ddpm")
    emb, states, mask, z = _pairs()
    x0 = m.normalize(z)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(8, D, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    with torch.no_grad():
        before = _x0_loss(m, sched, emb, states, mask, x0, t, noise).item()
    for _ in range(30):
        loss = _x0_loss(m, sched, emb, states, mask, x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _x0_loss(m, sched, emb, states, mask, x0, t, noise).item()
    assert after < 0.5 * before, (before, after)


def test_overfit_prior_samples_the_right_image_embedding():
    """A tiny prior memorises 8 pairs; a DDIM loop from noise lands near the right z_image."""
    m = _model(seed=0, num_train_timesteps=1000).train()
    emb, states, mask, z = _pairs(n=8)
    m.set_embedding_stats(z.mean(0), z.std(0, correction=0).clamp_min(1e-3))
    x0 = m.normalize(z)
    sched = m.make_scheduler("ddpm")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(400):
        reps = 4  # 32 samples per step: each pair at 4 timesteps
        t = torch.randint(0, 1000, (8 * reps,))
        x0r = x0.repeat(reps, 1)
        loss = F.mse_loss(m(sched.add_noise(x0r, torch.randn_like(x0r), t), t, emb.repeat(reps, 1),
                            states.repeat(reps, 1, 1), mask.repeat(reps, 1)), x0r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    ddim = m.make_scheduler("ddim")
    ddim.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, D, generator=g)
    with torch.no_grad():
        for t in ddim.timesteps:
            x0_hat = m(x, t.repeat(8), emb, states, mask)
            x = ddim.step(x0_hat, t, x).prev_sample
    cos = F.normalize(m.denormalize(x), dim=-1) @ z.T  # (8 samples, 8 true embeddings)
    right = cos.diagonal()
    wrong = cos.masked_fill(torch.eye(8, dtype=torch.bool), -2).max(dim=1).values
    assert bool((right > wrong + 0.2).all()), (right, wrong)
    assert float(right.mean()) > 0.8, right
