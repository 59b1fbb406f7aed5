"""The cascade classifier (prior shortlist, then the pixel race on the shortlist): counted evaluations
on synthetic errors and a toy decoder, the shortlist as a hard limit on the prediction, and the
command line (``--method cascade``, ``--shortlist``) end to end with its one-line errors."""

import json

import pytest
import torch

from conftest import build_tiny_model, draw_shape
from genvl.classify import CascadeClassifier, ClassConditions, DiffusionClassifier, cascade_scores
from genvl.classify.cascade import check_shortlist, shortlist_classes
from genvl.classify.montecarlo import CONFIDENCE_STAGES, Confidence, adaptive_scores
from genvl.cli import main
from genvl.errors import GenvlError

from test_adaptive import Counted, S, synthetic, toy_case

RACE = [(n, 1000) for n in CONFIDENCE_STAGES]  # the CLI's confidence schedule: 16 pairs at most


class TablePrior:
    """A prior classifier's interface over given (N, C) scores: what the cascade needs of it (scores,
    the evaluations of the last call, an image size); each call costs ``samples`` rows per class."""

    def __init__(self, scores, samples=1, image_size=S):
        self.table, self.samples, self.image_size = scores, samples, image_size
        self.calls = 0
        self.last_evals = None

    def scores(self, images, prompts):
        self.calls += 1
        n = images.shape[0]
        self.last_evals = torch.full((n,), self.samples * len(prompts), dtype=torch.long)
        return self.table[:n, : len(prompts)]

    def evals_per_image(self, num_classes):
        return float(self.samples * num_classes)


def test_cascade_keeps_the_full_budget_winner_with_fewer_counted_evals():
    N, C, K = 30, 8, 16
    pixel = synthetic(N, C, K, gaps=[0.0] + [6.0 * (i + 1) for i in range(C - 1)], noise=1.0)
    w = torch.ones(K, dtype=torch.float64)
    full = Counted(pixel)
    s_full, e_full = adaptive_scores(N, C, [(K, C)], w, full, 64)
    # a noisy prior: the true class (0) is always in its top 3, but first for only some images
    g = torch.Generator().manual_seed(5)
    prior = -torch.rand(N, C, generator=g) - 1.0
    prior[:, 0] = -0.5 - 0.6 * torch.rand(N, generator=g)  # in [-1.1, -0.5]: beaten by at most 2 classes
    prior[:, 1] = -0.45
    top = shortlist_classes(prior, 3)
    assert bool((top == 0).any(1).all()) and not bool((top[:, 0] == 0).all())
    fast = Counted(pixel)
    s, evals, got = cascade_scores(prior, 3, RACE, w, fast, 64, Confidence(z=2.0))
    assert torch.equal(got, top)
    assert torch.equal(s_full.argmax(1), torch.zeros(N, dtype=torch.long))
    assert torch.equal(s.argmax(1), s_full.argmax(1))
    assert torch.equal(fast.rows, evals)  # every pixel row asked for is counted, per image
    assert int(evals.sum()) * 8 <= int(e_full.sum()) == N * C * K
    # only shortlisted (image, class) pairs ever reach the pixel model
    assert all(c in top[n].tolist() for n, c, _ in fast.seen)


def test_a_class_outside_the_shortlist_is_never_returned():
    N, C, K = 12, 6, 16
    # class 5 is by far the pixel model's favourite, but the prior ranks it last on every image
    pixel = synthetic(N, C, K, gaps=[5.0, 6.0, 7.0, 8.0, 9.0, 0.0], noise=0.5, seed=1)
    prior = torch.tensor([[-1.0, -1.5, -2.0, -2.5, -3.0, -9.0]]).expand(N, C)
    counted = Counted(pixel)
    s, evals, top = cascade_scores(prior, 4, [(K, 4)], torch.ones(K, dtype=torch.float64), counted, 64)
    assert bool((s.argmax(1) == 0).all())  # the best pixel score among the shortlisted classes 0..3
    assert not any(c == 4 or c == 5 for _, c, _ in counted.seen)
    assert evals.tolist() == [K * 4] * N
    # cut classes rank below every shortlisted one, in prior order among themselves
    assert bool((s[:, 4:].max(1).values < s[:, :4].min(1).values).all()) and bool((s[:, 4] > s[:, 5]).all())


def test_cascade_classifier_on_a_toy_decoder_counts_pixel_and_prior_apart():
    torch.manual_seed(3)
    C = 6
    x, prompts, toy, x0_weight = toy_case(C)  # image i is class i
    conds = lambda p: ClassConditions(image_embeds=torch.eye(8)[: len(p)])  # noqa: E731
    naive = DiffusionClassifier(toy, conds, samples=16, batch_size=1000, weighting=x0_weight)
    assert torch.equal(naive.scores(x, prompts).argmax(1), torch.arange(C))
    naive_rows = sum(toy.rows)
    toy.rows.clear()
    # prior: the true class second best for every image (the next class first), so the pixel stage decides
    prior_scores = torch.full((C, C), -5.0)
    prior_scores[torch.arange(C), torch.arange(C)] = -2.0
    prior_scores[torch.arange(C), (torch.arange(C) + 1) % C] = -1.0
    prior = TablePrior(prior_scores, samples=2)
    pixel = DiffusionClassifier(toy, conds, schedule=[(n, 1000) for n in (2, 2, 4, 8)], elimination="confidence",
                                batch_size=1000, weighting=x0_weight)
    clf = CascadeClassifier(prior, pixel, shortlist=3, prior_cost=0.1)
    before = clf.evals_breakdown(C)
    assert before["pixel"] == 16 * 3 and before["prior"] == 2 * C  # the bounds before any image
    s = clf.scores(x, prompts)
    assert torch.equal(s.argmax(1), torch.arange(C))
    rows = sum(toy.rows)
    assert rows == int(clf.last_pixel_evals.sum()) < naive_rows / 4
    e = clf.evals_breakdown(C)
    assert e["pixel"] == pytest.approx(rows / C) and e["prior"] == 2 * C
    assert e["total"] == pytest.approx(e["pixel"] + 2 * C) == clf.evals_per_image(C)
    assert e["cost_weighted"] == pytest.approx(e["pixel"] + 0.1 * 2 * C)
    assert clf.last_shortlist.shape == (C, 3)


def test_shortlist_checks():
    assert check_shortlist(2) == 2
    for bad in (1, 0, -3, 2.5, True):
        with pytest.raises(GenvlError, match="shortlist"):
            check_shortlist(bad)
    assert shortlist_classes(torch.tensor([[0.0, 3.0, 1.0]]), 5).tolist() == [[1, 2, 0]]  # k capped at C


def test_cli_cascade_end_to_end_and_one_line_errors(tmp_path, capsys, monkeypatch):
    from genvl.classify.diffusion import PriorConditioner

    # the decoder's class conditions come from prior sampling (100 prior steps per class): fixed unit
    # embeddings instead keep the test fast; the cascade's own prior stage is the real prior
    monkeypatch.setattr(PriorConditioner, "__call__", lambda self, prompts: ClassConditions(
        image_embeds=torch.nn.functional.normalize(torch.randn(len(prompts), self.prior.config.embed_dim,
                                                               generator=torch.Generator().manual_seed(0)), dim=-1)))
    model = build_tiny_model(tmp_path / "m", ("clip", "prior", "decoder"))
    img = tmp_path / "x.png"
    draw_shape("red", "circle", 32).save(img)
    out = tmp_path / "r.json"
    assert main(["classify", str(img), "--model", str(model), "--method", "cascade", "--classes",
                 "red circle,blue square,green cross", "--shortlist", "2", "--shortlist-samples", "3",
                 "--samples", "2", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pixel-decoder" in text and "prior evaluations per image" in text
    rep = json.loads(out.read_text())
    # the prior: 3 pairs x 3 classes; the pixel stage: 2 naive pairs x the 2 shortlisted classes
    assert rep["evals"]["prior"] == 9 and rep["evals"]["pixel"] == 4 and rep["evals_per_image"] == 13
    assert rep["evals"]["cost_weighted"] == pytest.approx(4 + 9 * rep["evals"]["prior_cost"])
    assert set(rep["results"][0]["probs"]) == {"red circle", "blue square", "green cross"}
    for argv, needle in [
        (["--method", "diffusion", "--shortlist", "2"], "apply to --method cascade"),
        (["--method", "cascade", "--schedule", "confidence:x"], "bad adaptive schedule"),
    ]:
        assert main(["classify", str(img), "--model", str(model), "--classes", "a,b,c", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
    for argv, needle in [(["--shortlist", "1"], "integer >= 2"), (["--shortlist", "x"], "positive integer"),
                         (["--shortlist-samples", "0"], "positive integer")]:
        with pytest.raises(SystemExit) as e:
            main(["classify", str(img), "--classes", "a,b,c", "--method", "cascade", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["evaluate", "zero-shot", "--method", "cascade", "--shortlist", "0"])
    err = capsys.readouterr().err.strip()
    assert "integer >= 2" in err and "\n" not in err
