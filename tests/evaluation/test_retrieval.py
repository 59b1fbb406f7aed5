"""Retrieval recall on hand-made embeddings with known ranks, and near chance on random ones."""

import math

import pytest
import torch

from genvl.evaluation import chance_recall, retrieval_metrics

# Unit rows; with one-hot texts, sim[i, j] = V[i, j] exactly.
V = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],  # image 0: true 1.0, best          -> rank 0
        [0.8, 0.6, 0.0, 0.0],  # image 1: true 0.6 < 0.8          -> rank 1
        [0.0, 0.6, 0.0, 0.8],  # image 2: true 0.0, one tie at 0  -> rank 3
        [0.0, 0.0, 0.6, 0.8],  # image 3: true 0.8, best          -> rank 0
    ],
    dtype=torch.float64,
)
# Texts (columns of V): text 0 true 1.0 best -> 0; text 1 true 0.6 ties image 2 -> 1;
# text 2 true 0.0, one greater and two ties -> 3; text 3 true 0.8 ties image 2 -> 1.


def test_hand_made_ranks_exact():
    m = retrieval_metrics(V, torch.eye(4, dtype=torch.float64), ks=(1, 2, 3, 4))
    assert m == {
        "image_to_text_R@1": 50.0,  # ranks [0, 1, 3, 0]
        "image_to_text_R@2": 75.0,
        "image_to_text_R@3": 75.0,
        "image_to_text_R@4": 100.0,
        "text_to_image_R@1": 25.0,  # ranks [0, 1, 3, 1]
        "text_to_image_R@2": 75.0,
        "text_to_image_R@3": 75.0,
        "text_to_image_R@4": 100.0,
        "mean_recall": (50 + 75 + 75 + 100 + 25 + 75 + 75 + 100) / 8,
    }


def test_embeddings_are_normalised_inside():
    # powers of two rescale exactly, so the deliberate ties of V stay exact ties
    scales = torch.tensor([[4.0], [0.5], [8.0], [2.0]], dtype=torch.float64)
    a = retrieval_metrics(V, torch.eye(4, dtype=torch.float64), ks=(1, 2))
    b = retrieval_metrics(V * scales, 5.0 * torch.eye(4, dtype=torch.float64), ks=(1, 2))
    assert a == b


def test_swapped_pairs_and_ties_count_against_the_model():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    m = retrieval_metrics(img, txt, ks=(1, 3, 4))
    # queries 2, 3: true score 0, one candidate at 1 and two tied at 0 -> rank 3
    assert m["image_to_text_R@1"] == m["text_to_image_R@1"] == 50.0
    assert m["image_to_text_R@3"] == m["text_to_image_R@3"] == 50.0
    assert m["image_to_text_R@4"] == m["text_to_image_R@4"] == 100.0


def test_collapsed_embeddings_score_zero_not_hundred():
    same = torch.ones(5, 3)
    m = retrieval_metrics(same, same, ks=(1, 4, 5))
    assert m["image_to_text_R@1"] == m["text_to_image_R@4"] == 0.0  # all tied: rank 4
    assert m["image_to_text_R@5"] == 100.0


def test_perfect_alignment():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    m = retrieval_metrics(x, x)
    assert set(m) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} | {"mean_recall"}
    assert all(v == 100.0 for v in m.values())


def test_random_embeddings_near_chance():
    n = 100
    g = torch.Generator().manual_seed(0)
    m = retrieval_metrics(torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g))
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            p = chance_recall(n, k) / 100
            sd = 100 * math.sqrt(p * (1 - p) / n)  # binomial spread of a recall over n queries
            assert abs(m[f"{direction}_R@{k}"] - 100 * p) < 4 * sd
    assert abs(m["mean_recall"] - (1 + 5 + 10) / 3) < 4


def test_chance_recall():
    assert chance_recall(100, 1) == 1.0
    assert chance_recall(100, 5) == 5.0
    assert chance_recall(8, 2) == 25.0
    assert chance_recall(4, 10) == 100.0  # K >= N retrieves everything
    with pytest.raises(ValueError):
        chance_recall(0, 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(torch.randn(4, 3), torch.randn(4, 3), ks=(0,))


def test_duplicate_captions_are_one_group():
    """Images 0 and 1 share a caption (so their caption embeddings are equal): a perfect embedding
    scores R@1 = 100 with captions=, and is charged for the tie without them."""
    captions = ["a red heart", "a red heart", "a cat face", "a star"]
    txt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    img = txt.clone()
    grouped = retrieval_metrics(img, txt, ks=(1,), captions=captions)
    assert grouped["image_to_text_R@1"] == 100.0 and grouped["text_to_image_R@1"] == 100.0
    plain = retrieval_metrics(img, txt, ks=(1,))
    assert plain["image_to_text_R@1"] == 50.0  # rows 0 and 1 tie with each other's caption
    # a group does not excuse a wrong caption: image 2 closest to the heart caption is a miss
    img[2] = torch.tensor([1.0, 0.1, 0])
    assert retrieval_metrics(img, txt, ks=(1,), captions=captions)["image_to_text_R@1"] == 75.0
    with pytest.raises(ValueError, match="one entry per pair"):
        retrieval_metrics(img, txt, captions=captions[:3])


def test_recall_matches_torchmetrics_hit_rate_without_ties():
    """genvl's R@K is torchmetrics' RetrievalHitRate where no scores tie (continuous random
    embeddings), with repeated captions as several relevant targets; genvl keeps its own code for
    the pessimistic tie rule that torchmetrics does not have (its sort breaks ties arbitrarily)."""
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(3)
    n = 24
    img, txt = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    txt[:12] += 2 * img[:12]  # some signal, so the recalls are not all near chance
    captions = [f"c{i % 18}" for i in range(n)]  # rows 18..23 repeat the captions of rows 0..5
    ours = retrieval_metrics(img, txt, ks=(1, 5), captions=captions)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    for k in (1, 5):
        for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
            metric = RetrievalHitRate(top_k=k)
            theirs = metric(s.flatten(), same.flatten(), indexes=torch.arange(n).repeat_interleave(n))
            assert ours[f"{name}_R@{k}"] == pytest.approx(100 * float(theirs), abs=1e-4), (name, k)
    del torchmetrics
