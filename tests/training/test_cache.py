"""The per-image cache of frozen encoders' outputs (decoder and prior stages)."""

import pytest
import torch

from genvl.config import apply_overrides
from genvl.data import open_image_text
from genvl.training import TrainConfig, train
from genvl.training.cache import EncodingCache
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.decoder import DecoderTask
from genvl.training.tasks.prior import PriorTask

FAST = ["batch_size=8", "max_steps=4", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


class Encoder:
    """A stand-in frozen encoder that counts the rows it encodes."""

    def __init__(self, data: torch.Tensor):
        self.data, self.rows = data, 0

    def __call__(self, index: torch.Tensor, rows: torch.Tensor):
        self.rows += int(rows.sum())
        x = self.data[index[rows]]
        return x * 2, x.sum(1)


def test_rows_are_encoded_once_and_looked_up_right():
    data = torch.randn(10, 3)
    enc = Encoder(data)
    cache = EncodingCache(10)
    for index in ([0, 1, 2], [2, 3, 0], [9, 3, 3], [0, 1, 2, 3, 9]):
        idx = torch.tensor(index)
        a, b = cache.lookup(idx, lambda rows: enc(idx, rows))
        assert torch.equal(a, data[idx] * 2) and torch.allclose(b, data[idx].sum(1))
    assert enc.rows == 5 == cache.computed  # 0 1 2, then 3, then 9; nothing in the last batch
    assert cache.done.sum() == 5


def test_over_budget_the_cache_keeps_nothing():
    data = torch.randn(1000, 64)
    enc = Encoder(data)
    cache = EncodingCache(1000, budget_bytes=1000 * 64 * 4)  # the first output alone fills it
    idx = torch.tensor([1, 2])
    for _ in range(3):
        a, _ = cache.lookup(idx, lambda rows: enc(idx, rows))
        assert torch.equal(a, data[idx] * 2)
    assert not cache.enabled and cache.store is None and enc.rows == 6  # computed every time


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        EncodingCache(0)


@pytest.fixture
def clip_dir(shapes_dir, tmp_path):
    out = tmp_path / "clip_model"
    train(CLIPTask(cfg("max_steps=2")), shapes_dir, out, progress=False)
    return out


@pytest.mark.parametrize("task_class", [PriorTask, DecoderTask])
def test_stage_losses_are_the_same_with_and_without_the_cache(task_class, shapes_dir, clip_dir):
    """The cached CLIP embeddings (and a pixel decoder's uncached x0) give the loss of fresh encoding."""
    from genvl.checkpoint import open_model_dir

    ds = open_image_text(shapes_dir, image_size=32)
    losses = {}
    for cache in (True, False):
        task = task_class(cfg(f"model.cache_inputs={str(cache).lower()}"))
        torch.manual_seed(0)  # the same fresh weights both times
        model = task.build(ds, open_model_dir(clip_dir))
        task.dataset = ds
        batch = task.collate([ds[i] for i in (0, 3, 5, 3)])
        out = []
        for _ in range(2):  # the second call reads the cache
            torch.manual_seed(0)
            out.append(task.loss(model, batch)[0].item())
        losses[cache] = out
        if cache:
            assert task._cache.computed == 4  # the first call's 4 rows; the second call encodes nothing
        else:
            assert task._cache is None
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
