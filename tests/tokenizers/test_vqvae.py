"""The VQ-VAE image tokenizer: shapes, the two quantizers, usage tracking and dead-code restarts,
save/load, the GAN wrapper's gradient isolation, and a tiny model that overfits four images."""

import pytest
import torch
import torch.nn.functional as F

from conftest import draw_shape
from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.data import to_tensor
from genvl.errors import ModelDirError
from genvl.evaluation.reconstruction import psnr
from genvl.tokenizers.vqvae import (
    VQVAE,
    VQVAE_SIZES,
    AdversarialVQVAE,
    PatchDiscriminator,
    VQOutput,
    VQVAEConfig,
    vqvae_config,
)
from genvl.training.tasks.vqvae import adaptive_gan_weight, generator_loss, hinge_d_loss

FOUR = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "cross")]


def _vq(seed=0, **over) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(vqvae_config("tiny", **over))


def _shapes(size=16) -> torch.Tensor:
    """(4, 3, size, size) four coloured shapes in [-1, 1]."""
    return torch.stack([to_tensor(draw_shape(c, s, size)) for c, s in FOUR])


def test_size_table_and_shapes():
    assert {"tiny", "small"} <= set(VQVAE_SIZES)
    small = vqvae_config("small")
    assert (small.image_size, small.downsample, small.latent_size) == (32, 4, 8)
    assert small.codebook_size in (512, 1024)
    assert VQVAE(small).num_parameters < 5_000_000

    vq = _vq().eval()
    c = vq.config
    assert (c.image_size, c.downsample, c.codebook_size) == (16, 4, 64)
    assert (vq.latent_size, vq.tokens_per_image) == (4, 16)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    img = vq.decode_codes(codes)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    out = vq(x)
    assert isinstance(out, VQOutput) and out.recon.shape == (3, 3, 16, 16)
    assert torch.equal(out.codes, codes)  # forward and encode pick the same codes
    assert out.commit_loss.ndim == 0 and out.codebook_loss.ndim == 0
    assert 1 <= out.perplexity.item() <= 64 and 0 < out.usage <= 1
    # all 64 codes decode
    all_codes = torch.arange(64).view(4, 4, 4)
    assert vq.decode_codes(all_codes).shape == (4, 3, 16, 16)


def test_bad_configs_and_inputs():
    for over, needle in [
        (dict(image_size=18), "not divisible"),
        (dict(quantizer="kmeans"), "quantizer"),
        (dict(channels=[12, 32, 32]), "norm_num_groups"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(ema_decay=1.0), "ema_decay"),
    ]:
        with pytest.raises(ValueError, match=needle):
            vqvae_config("tiny", **over)
    with pytest.raises(ValueError, match="unknown vqvae size"):
        vqvae_config("huge")
    vq = _vq().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        vq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        vq.decode_codes(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        vq.decode_codes(torch.zeros(1, 16, dtype=torch.long))


@pytest.mark.parametrize("quantizer", ["l2", "ema"])
def test_losses_and_straight_through_gradients(quantizer):
    vq = _vq(quantizer=quantizer).train()
    out = vq(torch.rand(2, 3, 16, 16) * 2 - 1)
    out.recon.pow(2).mean().backward(retain_graph=True)  # the decoder's gradient reaches the encoder
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    vq.zero_grad()
    out.commit_loss.backward(retain_graph=True)  # commitment: encoder only
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0 and vq.decoder.conv_out.weight.grad is None
    if quantizer == "l2":
        assert vq.quantizer.embedding.grad is None
        vq.zero_grad()
        out.codebook_loss.backward()  # codebook loss: codebook only
        assert vq.quantizer.embedding.grad.abs().sum() > 0 and vq.encoder.conv_in.weight.grad is None
    else:
        assert out.codebook_loss.item() == 0.0
        assert "quantizer.embedding" not in dict(vq.named_parameters())  # a buffer, moved by EMA
        assert "quantizer.embedding" in vq.state_dict()


def test_usage_is_tracked_only_in_training():
    vq = _vq(usage_window=3)
    q = vq.quantizer
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vq.eval()
    vq(x)
    vq.encode(x)
    assert q.train_steps.item() == 0 and q.usage_counts.sum() == 0
    vq.train()
    for step in range(5):
        out = vq(x)
        assert q.usage_counts.sum(1)[step % 3] == 2 * 16  # this batch's 32 codes in the ring
        assert (q.last_used[out.codes.unique()] == step).all()
    assert q.train_steps.item() == 5
    assert q.usage_counts.sum() == 3 * 32  # the window holds the last 3 batches only
    used = torch.unique(out.codes).numel()
    assert q.usage() >= used / 64 and q.window_perplexity() >= 1


@pytest.mark.parametrize("quantizer,batch", [("l2", 4), ("ema", 4), ("l2", 2)])
def test_dead_codes_restart_from_batch_outputs_and_are_used(quantizer, batch):
    """All codes start equal: the vectors pick (nearly) one code, the others die, restart from this
    batch's encoder outputs and are used at once."""
    def run(seed):
        vq = _vq(quantizer=quantizer, dead_code_steps=2, seed=seed, ema_decay=0.999).train()
        q = vq.quantizer
        with torch.no_grad():
            q.embedding[:] = q.embedding[0]
            if quantizer == "ema":
                q.ema_embed_sum[:] = q.embedding
        x = _shapes()[:batch]
        for _ in range(2):
            out = vq(x)
            assert torch.unique(out.codes).numel() <= 2 and out.restarts == 0
        dead = q.dead_codes()
        assert dead.numel() >= 62
        before = q.codebook().clone()
        with torch.no_grad():
            z = F.normalize(vq.encoder(x), dim=1).permute(0, 2, 3, 1).reshape(-1, 8)  # (N, 8) this batch's outputs
        out = vq(x)  # restarts, then quantizes with the new codes
        return vq, q, out, before, z, dead

    vq, q, out, before, z, dead = run(seed=0)
    assert out.restarts == dead.numel() == q.restarts_total.item()
    assert not set(q.dead_codes().tolist()) & set(dead.tolist())  # restarted codes get dead_code_steps to be used
    after = q.codebook()
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    assert ((after[live] * before[live]).sum(1) > 0.99).all()  # live codes are kept (EMA moves them a little)
    cos = after[dead] @ z.t()  # (n_dead, N): each restarted code is one of this batch's encoder outputs
    tol = 1e-5 if quantizer == "l2" else 1e-2  # (the EMA update right after the restart moves it slightly)
    assert torch.allclose(cos.max(1).values, torch.ones(dead.numel()), atol=tol)
    assert torch.unique(out.codes).numel() > 5 and out.usage > 5 / 64  # and they are used at once
    # same seed, same restarts; another seed, other picks
    assert torch.equal(run(seed=0)[1].codebook(), after)
    assert not torch.equal(run(seed=1)[1].codebook(), after)


def test_ema_codebook_moves_towards_assigned_outputs():
    vq = _vq(quantizer="ema", ema_decay=0.5, dead_code_steps=0).train()
    q = vq.quantizer
    x = _shapes()
    before = q.codebook().clone()
    with torch.no_grad():
        z = F.normalize(vq.encoder(x), dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    codes = vq(x).codes.flatten()
    after = q.codebook()
    for k in codes.unique()[:5]:
        mean = F.normalize(z[codes == k].mean(0), dim=0)
        assert (after[k] @ mean) > (before[k] @ mean)  # closer to the mean of its assigned vectors
    unused = torch.ones(64, dtype=torch.bool)
    unused[codes.unique()] = False
    assert torch.allclose(after[unused], before[unused], atol=1e-5)  # unassigned codes keep their direction


@pytest.mark.parametrize("quantizer", ["l2", "ema"])
def test_tiny_vqvae_overfits_four_images(quantizer):
    x = _shapes()  # (4, 3, 16, 16)
    vq = _vq(quantizer=quantizer, dead_code_steps=10).train()
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    for _ in range(150):
        out = vq(x)
        loss = (out.recon - x).abs().mean() + out.commit_loss + out.codebook_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    p = psnr(vq.reconstruct(x), x, reduction="none")
    assert p.mean() > 20, p  # 22-24 dB over seeds 0-2; untrained ~6 dB


@pytest.mark.parametrize("quantizer", ["l2", "ema"])
def test_save_load_round_trip_is_identical_and_strict(tmp_path, quantizer):
    vq = _vq(quantizer=quantizer).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for _ in range(3):
        vq(x)  # move the tracking buffers (and the EMA codebook) away from their initial values
    vq.eval()
    save_model_dir(tmp_path / "m", {"vqvae": vq})
    loaded = open_model_dir(tmp_path / "m").load("vqvae")
    assert isinstance(loaded, VQVAE) and loaded.config == vq.config
    sd, sd2 = vq.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(loaded.encode(x), vq.encode(x))
    assert torch.equal(loaded.decode_codes(vq.encode(x)), vq.decode_codes(vq.encode(x)))
    other = VQVAE(vqvae_config("tiny", quantizer=quantizer, codebook_size=32))
    with pytest.raises(ModelDirError, match="shape mismatch"):
        other.load_weights(tmp_path / "m" / "vqvae" / "model.safetensors")
    if quantizer == "ema":  # the l2 model has no EMA statistics: strict loading says so
        with pytest.raises(ModelDirError, match="unexpected"):
            VQVAE(VQVAEConfig(**{**vars(vq.config), "quantizer": "l2"})).load_weights(
                tmp_path / "m" / "vqvae" / "model.safetensors")


def test_gan_terms_are_isolated():
    torch.manual_seed(0)
    model = AdversarialVQVAE(_vq(), PatchDiscriminator(channels=16, layers=2)).train()
    x = _shapes()
    out = model(x, adversarial=True)
    assert out.fake_logits_g.shape == out.real_logits.shape == out.fake_logits_d.shape == (4, 1, 2, 2)
    disc = list(model.discriminator.parameters())
    gen = list(model.vq.parameters())

    def grads(params):
        return sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in params)

    generator_loss(out.fake_logits_g).backward(retain_graph=True)
    assert grads(disc) == 0.0 and grads(gen) > 0  # the generator term trains the VQ-VAE only
    model.zero_grad()
    hinge_d_loss(out.real_logits, out.fake_logits_d).backward(retain_graph=True)
    assert grads(gen) == 0.0 and grads(disc) > 0  # the discriminator term trains the discriminator only
    model.zero_grad()
    lam = adaptive_gan_weight((out.vq.recon - x).abs().mean(), generator_loss(out.fake_logits_g), model.vq.last_layer)
    assert lam.ndim == 0 and torch.isfinite(lam) and lam > 0 and not lam.requires_grad
    # GAN off: no logits, but a zero anchor that touches every discriminator parameter
    off = model(x, adversarial=False)
    assert off.fake_logits_g is None and off.disc_anchor.item() == 0.0
    off.disc_anchor.backward()
    assert all(p.grad is not None for p in disc)
    # hinge values: confident and right -> 0; wrong -> 2 (per side 1 + 1 over 2... averaged)
    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.full((2,), -1.0), torch.full((2,), 1.0)).item() == pytest.approx(2.0)
