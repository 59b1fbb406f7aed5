"""Reconstruction metrics: PSNR on [-1, 1] images, codebook usage and perplexity of a VQ-VAE."""

import math

import pytest
import torch

from genvl.data import open_image_text
from genvl.evaluation.reconstruction import MAX_PSNR, evaluate_reconstruction, psnr
from genvl.tokenizers.vqvae import VQVAE, vqvae_config


def test_psnr_values():
    a = torch.zeros(2, 3, 8, 8)
    assert psnr(a, a).item() == MAX_PSNR
    # 0.2 apart in [-1, 1] = 0.1 in [0, 1]: mse 0.01 -> 20 dB
    assert psnr(a, a + 0.2).item() == pytest.approx(20.0, abs=1e-4)
    b = a.clone()
    b[1] += 0.02  # second image: mse 1e-4 -> 40 dB
    per = psnr(a, b, reduction="none")
    assert per.shape == (2,) and per[0] == MAX_PSNR and per[1].item() == pytest.approx(40.0, abs=1e-3)
    assert psnr(a, b).item() == pytest.approx((MAX_PSNR + 40.0) / 2, abs=1e-3)  # mean of per-image values
    assert psnr(a[0], a[0] + 0.2).item() == pytest.approx(20.0, abs=1e-4)  # one (3, H, W) image
    # black vs white: the whole range -> 0 dB; values beyond [-1, 1] are clamped
    assert psnr(-torch.ones(1, 3, 4, 4), 3 * torch.ones(1, 3, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        psnr(a, a, reduction="sum")


def test_evaluate_reconstruction_matches_a_direct_computation(shapes_dir):
    torch.manual_seed(0)
    vq = VQVAE(vqvae_config("tiny"))  # random weights; left in training mode to check it is restored
    ds = open_image_text(shapes_dir, image_size=16)
    m = evaluate_reconstruction(vq, ds, batch_size=5, limit=12)
    assert set(m) == {"psnr", "codebook_usage", "perplexity"}
    assert vq.training and vq.quantizer.train_steps.item() == 0  # evaluation changes no state
    vq.eval()
    px = torch.stack([ds[i]["pixel_values"] for i in range(12)])
    codes = vq.encode(px)
    assert m["psnr"] == pytest.approx(psnr(vq.decode_codes(codes), px).item(), abs=1e-4)
    assert m["codebook_usage"] == pytest.approx(codes.unique().numel() / 64)
    counts = torch.bincount(codes.flatten(), minlength=64).float()
    p = counts[counts > 0] / counts.sum()
    assert m["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
    assert 1 <= m["perplexity"] <= codes.unique().numel() + 1e-4
    # the whole set, and a dataset at the wrong size is a clear error
    assert evaluate_reconstruction(vq, ds)["codebook_usage"] >= m["codebook_usage"]
    with pytest.raises(ValueError, match="works at"):
        evaluate_reconstruction(vq, open_image_text(shapes_dir, image_size=32), limit=2)
