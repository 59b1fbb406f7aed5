"""Adaptive class elimination: the confidence-bound racing rule on synthetic row errors (clear gaps,
ties, noise), its parsing and validation, replay of an error table, and a toy decoder end to end."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from genvl.classify import ClassConditions, DiffusionClassifier
from genvl.classify.montecarlo import (
    CONFIDENCE_STAGES,
    Confidence,
    adaptive_scores,
    check_elimination,
    confidence_survivors,
    full_table,
    parse_adaptive,
    table_row_error,
)
from genvl.errors import GenvlError
from genvl.models.diffusion import alphas_cumprod_of, build_scheduler

S = 8


def fixed(E):
    return lambda prompts: ClassConditions(image_embeds=E[: len(prompts)])


class PointMassDecoder(nn.Module):
    """The exact epsilon of a point mass per class (class c's images are ``templates[c]``, z = e_c),
    with the decoder interface the classifier uses and no UNet: eps_theta(x_t, t, z) =
    (x_t - sqrt(a_t) mu(z)) / sqrt(1 - a_t), mu(z) = z @ templates. Records every forward's rows."""

    def __init__(self, templates):
        super().__init__()
        self.register_buffer("templates", templates)  # (C, 3, S, S)
        self.register_buffer("alphas_cumprod", alphas_cumprod_of(1000, "linear"))
        self.anchor = nn.Parameter(torch.zeros(()))  # the classifier finds the device through a parameter
        self.config = SimpleNamespace(image_size=S, num_train_timesteps=1000, block_out_channels=[16],
                                      layers_per_block=1, attention_head_dim=8)
        self.rows = []

    def make_scheduler(self, kind="ddpm"):
        return build_scheduler(kind, 1000, "linear")

    def forward(self, noisy, t, z, text_states=None, text_mask=None):
        self.rows.append(noisy.shape[0])
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        mu = torch.einsum("bc,cxyz->bxyz", z[:, : self.templates.shape[0]], self.templates)
        return (noisy - a.sqrt() * mu) / (1 - a).sqrt()


def toy_case(C: int):
    """C point-mass classes: images (C, 3, S, S) with image i of class i, their prompts, the toy
    decoder, and the timestep weighting that flattens its class gap (SNR_t ||x - mu_c||^2)."""
    templates = torch.randn(C, 3, S, S).clamp(-1, 1)
    x = templates + 0.05 * torch.randn(C, 3, S, S)
    toy = PointMassDecoder(templates)
    a = toy.alphas_cumprod.double()
    return x, [f"class {i}" for i in range(C)], toy, lambda t: (1 - a[t]) / a[t]


class Counted:
    """A synthetic row error from an (N, C, K) table, counting the rows asked for per image."""

    def __init__(self, table):
        self.table = table
        self.rows = torch.zeros(table.shape[0], dtype=torch.long)
        self.seen = set()

    def __call__(self, n, c, k):
        self.rows += torch.bincount(n, minlength=self.table.shape[0])
        for row in zip(n.tolist(), c.tolist(), k.tolist()):
            assert row not in self.seen  # no (image, class, pair) is evaluated twice
            self.seen.add(row)
        return self.table[n, c, k]


def synthetic(N, C, K, gaps, noise, seed=0):
    """errors = a shared per-pair level (what shared noise cancels) + a class gap + per-row noise."""
    g = torch.Generator().manual_seed(seed)
    level = 100 * torch.rand(N, 1, K, generator=g, dtype=torch.float64)
    return level + torch.as_tensor(gaps, dtype=torch.float64).view(1, C, 1) + noise * torch.randn(
        N, C, K, generator=g, dtype=torch.float64)


def racing(stages, C):
    return [(n, C) for n in stages]


def test_confidence_keeps_the_clear_winner_with_fewer_counted_evals():
    N, C = 20, 8
    table = synthetic(N, C, 16, gaps=[0.0] + [5.0 * (i + 1) for i in range(C - 1)], noise=1.0)
    w = torch.ones(16, dtype=torch.float64)
    full = Counted(table)
    s_full, e_full = adaptive_scores(N, C, [(16, C)], w, full, 64)
    fast = Counted(table)
    s_fast, e_fast = adaptive_scores(N, C, racing([2, 2, 4, 8], C), w, fast, 64, Confidence(z=3.0))
    assert torch.equal(s_full.argmax(1), torch.zeros(N, dtype=torch.long))
    assert torch.equal(s_fast.argmax(1), s_full.argmax(1))
    # most images drop every wrong class after the first round of 2 pairs, and then stop
    assert torch.equal(fast.rows, e_fast) and int((e_fast == 2 * C).sum()) >= N // 2
    assert int(e_fast.sum()) * 4 <= int(e_full.sum()) == N * C * 16
    # eliminated classes rank below the survivor
    assert bool((s_fast[:, 1:] < s_fast[:, :1]).all())


def test_confidence_never_eliminates_the_best_class_when_the_gap_is_clear():
    # the best class is 3 noise sd ahead of the runner-up per pair: with z = 2 it must never leave
    N, C, K = 200, 5, 16
    table = synthetic(N, C, K, gaps=[3.0, 0.0, 3.0, 6.0, 9.0], noise=1.0 / math.sqrt(2), seed=1)
    s, evals = adaptive_scores(N, C, racing(list(CONFIDENCE_STAGES), C), torch.ones(K, dtype=torch.float64),
                               table_row_error(table), 4096, Confidence(z=2.0))
    naive, _ = adaptive_scores(N, C, [(K, C)], torch.ones(K, dtype=torch.float64), table_row_error(table), 4096)
    assert bool((naive.argmax(1) == 1).all())
    assert bool((s.argmax(1) == 1).all())
    assert float(evals.double().mean()) < 0.6 * C * K


def test_ties_are_never_eliminated_and_min_pairs_is_respected():
    N, C, K = 4, 3, 8
    base = synthetic(N, 1, K, gaps=[0.0], noise=1.0).expand(N, C, K).clone()
    base[:, 2] += 50.0  # class 2 clearly worse; classes 0 and 1 tie exactly on every pair
    alive = torch.ones(N, C, dtype=torch.bool)
    out = confidence_survivors(base[:, :, :2], alive, torch.ones(2, dtype=torch.float64), Confidence(z=2.0))
    assert out[:, :2].all() and not out[:, 2].any()
    # before min_pairs nothing leaves, however large the gap
    assert torch.equal(confidence_survivors(base[:, :, :2], alive, torch.ones(2, dtype=torch.float64),
                                            Confidence(z=2.0, min_pairs=3)), alive)
    counted = Counted(base)
    s, evals = adaptive_scores(N, C, racing([2, 2, 4], C), torch.ones(K, dtype=torch.float64), counted, 64,
                               Confidence(z=2.0))
    # the tied pair races to the end: 2 pairs x 3 classes, then 6 more pairs x 2 classes
    assert evals.tolist() == [2 * 3 + 6 * 2] * N
    torch.testing.assert_close(s[:, 0], s[:, 1])
    assert bool((s[:, 2] < s[:, 0]).all())


def test_keep_caps_the_survivors_of_a_confidence_race():
    N, C, K = 3, 6, 8
    table = synthetic(N, C, K, gaps=[0.0] * C, noise=1.0, seed=2)  # no class is significantly worse
    _, evals = adaptive_scores(N, C, [(2, 4), (2, 2), (4, 2)], torch.ones(K, dtype=torch.float64),
                               table_row_error(table), 64, Confidence(z=50.0))
    assert evals.tolist() == [2 * 6 + 2 * 4 + 4 * 2] * N


def test_parse_and_validate_elimination():
    assert parse_adaptive("8:5,32:1") == ([(8, 5), (32, 1)], "top-k")
    sched, rule = parse_adaptive("confidence")
    assert [n for n, _ in sched] == list(CONFIDENCE_STAGES) and rule == Confidence(z=2.0)
    sched, rule = parse_adaptive("confidence:3.5:1,3")
    assert [n for n, _ in sched] == [1, 3] and rule.z == 3.5 and all(k >= 1000 for _, k in sched)
    assert check_elimination(None) == "top-k" and check_elimination("confidence") == Confidence()
    for bad in ("confidence:x", "confidence:2:a", "confidence:0", "confidence:-1", "confidence:nan",
                "confidence:2:0,4", "4", "8:0"):
        with pytest.raises(GenvlError):
            parse_adaptive(bad)
    with pytest.raises(GenvlError, match="min_pairs"):
        Confidence(z=1.0, min_pairs=1)
    with pytest.raises(GenvlError, match="elimination"):
        check_elimination("racing")


def test_toy_decoder_confidence_agrees_with_full_budget_and_table_replay_is_exact():
    torch.manual_seed(3)
    C = 6
    x, prompts, toy, x0_weight = toy_case(C)
    naive = DiffusionClassifier(toy, fixed(torch.eye(8)), samples=16, batch_size=1000, weighting=x0_weight)
    race = DiffusionClassifier(toy, fixed(torch.eye(8)), schedule=racing([2, 2, 4, 8], C),
                               elimination="confidence", batch_size=1000, weighting=x0_weight)
    sn = naive.scores(x, prompts)
    naive_rows = sum(toy.rows)
    toy.rows.clear()
    sr = race.scores(x, prompts)
    assert torch.equal(sn.argmax(1), torch.arange(C)) and torch.equal(sr.argmax(1), torch.arange(C))
    rows = sum(toy.rows)
    assert naive_rows == 16 * C * C and rows == int(race.last_evals.sum()) < naive_rows / 4
    assert race.evals_per_image(C) == pytest.approx(rows / C)
    assert race.evals_per_image(C) < naive.evals_per_image(C) == 16 * C
    # replaying the racing rule on the error table gives the scores of the model run
    cond = ClassConditions(image_embeds=torch.eye(8)[:C])
    table = race.error_table(x, cond, 16)
    assert table.shape == (C, C, 16)
    row_error, weights, _ = race.row_error(x, cond, 16)
    torch.testing.assert_close(table, full_table(C, C, 16, row_error, 7))
    replay, evals = adaptive_scores(C, C, race.stages(C), weights, table_row_error(table), 64, race.elimination)
    torch.testing.assert_close(replay, sr)
    assert torch.equal(evals, race.last_evals)
