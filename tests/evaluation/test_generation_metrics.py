import numpy as np
import pytest
import torch

from genvl.evaluation.generation import clip_score, frechet_distance, prompt_retrieval_accuracy


def test_clip_score_reference():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    # cosines 1, -1 (clamped to 0), 1/sqrt(2)
    assert clip_score(a, b) == pytest.approx(100 * (1 + 0 + 2**-0.5) / 3)


def test_frechet_distance_matches_closed_form_and_scipy_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # N(0, I) vs N(mu, 4 I): ||mu||^2 + 3 * (1 + 4 - 2 * 2) = ||mu||^2 + 3
    b = 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(5 + 3, rel=0.08)
    # against a direct numpy computation on small random sets (sqrtm via eigendecomposition of C_a C_b)
    x, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(60, 4, generator=g, dtype=torch.float64) * 1.5
    ca, cb = np.cov(x.numpy().T), np.cov(y.numpy().T)
    ev = np.linalg.eigvals(ca @ cb)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum().item() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(ev.clip(min=0)).real.sum()
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_prompt_retrieval_accuracy():
    prompts = torch.eye(3)
    imgs = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9], [0.5, 0.5, 0.0]])
    idx = torch.tensor([0, 2, 1])
    # image 0 -> prompt 0 (right), image 1 -> prompt 2 (right), image 2 ties 0 and 1 (counts as wrong)
    assert prompt_retrieval_accuracy(imgs, prompts, idx) == pytest.approx(200 / 3)
