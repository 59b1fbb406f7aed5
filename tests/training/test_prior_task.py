"""The prior stage: trains on a frozen CLIP from --init, writes the prior beside clip/ and tokenizer/."""

import json

import pytest
import torch

from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.config import apply_overrides
from genvl.data import open_image_text
from genvl.errors import ConfigError, ModelDirError
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.training import TrainConfig, train
from genvl.training.tasks import get_task
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.prior import PriorTask, clip_image_stats

FAST = ["batch_size=8", "max_steps=4", "warmup_steps=1", "log_every=2", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


@pytest.fixture
def clip_dir(shapes_dir, tmp_path):
    """A (barely) trained tiny CLIP model directory: clip/ + tokenizer/."""
    out = tmp_path / "clip_model"
    train(CLIPTask(cfg("max_steps=2")), shapes_dir, out, progress=False)
    return out


def test_stage_registry_knows_prior():
    assert isinstance(get_task("prior", cfg()), PriorTask)


def test_prior_trains_end_to_end(shapes_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    c = cfg("batch_size=16", "max_steps=40", "lr=3e-3", "log_every=5", "data.caption_dropout=0.2")
    res = train(PriorTask(c), shapes_dir, out, init=clip_dir, progress=False)
    assert res.step == 40
    for f in ("prior/config.json", "prior/model.safetensors", "clip/config.json", "clip/model.safetensors",
              "tokenizer/tokenizer.json", "genvl.json", "README.md", "train/prior/log.jsonl"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"] == {"clip": "genvl.models.clip.CLIP", "prior": "genvl.models.prior.DiffusionPrior"}
    assert meta["training"]["prior"]["steps"] == 40 and meta["training"]["prior"]["init"] == str(clip_dir)
    rows = res.history
    assert all("cos_z_image" in r and -1 <= r["cos_z_image"] <= 1 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]

    md = open_model_dir(out)
    prior, clip = md.load("prior"), md.load("clip")
    # the CLIP is frozen: copied unchanged from --init
    init_clip = open_model_dir(clip_dir).load("clip")
    for k, v in init_clip.state_dict().items():
        assert torch.equal(v, clip.state_dict()[k]), k
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (clip_dir / "tokenizer" / "tokenizer.json").read_text()
    # dimensions from the CLIP, stats from its image embeddings over the data
    pc = prior.config
    assert (pc.embed_dim, pc.text_width, pc.text_len) == (clip.config.embed_dim, clip.config.text_width, 8)
    mean, std = clip_image_stats(clip, open_image_text(shapes_dir, image_size=32))
    assert torch.allclose(prior.embed_mean, mean, atol=1e-6) and torch.allclose(prior.embed_std, std, atol=1e-6)
    assert bool((prior.embed_std > 0).all())


def test_finetuning_starts_from_the_init_prior(shapes_dir, clip_dir, tmp_path):
    first = tmp_path / "first"
    train(PriorTask(cfg()), shapes_dir, first, init=clip_dir, progress=False)
    saved = open_model_dir(first).load("prior").state_dict()
    task = PriorTask(cfg())
    model = task.build(open_image_text(shapes_dir, image_size=32), open_model_dir(first))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    train(PriorTask(cfg("lr=1e-2")), shapes_dir, tmp_path / "ft", init=first, progress=False)
    after = open_model_dir(tmp_path / "ft").load("prior").state_dict()
    assert torch.equal(after["embed_mean"], saved["embed_mean"])  # statistics kept
    assert any(not torch.equal(after[k], saved[k]) for k in saved if k.startswith("transformer.transformer_blocks"))


def test_dropped_captions_use_the_unconditional_convention(shapes_dir, clip_dir):
    task = PriorTask(cfg())
    ds = open_image_text(shapes_dir, image_size=32)
    model = task.build(ds, open_model_dir(clip_dir))
    items = [ds[i] for i in range(4)]
    items[1]["text"] = items[3]["text"] = ""
    batch = task.collate(items)
    assert batch["uncond"].tolist() == [False, True, False, True]
    # every caption dropped: the token ids no longer matter, only the images and the noise
    all_dropped = task.collate([{**it, "text": ""} for it in items])
    other = {**all_dropped, "input_ids": torch.randint(4, 50, all_dropped["input_ids"].shape)}
    torch.manual_seed(0)
    a, _ = task.loss(model, all_dropped)
    torch.manual_seed(0)
    b, _ = task.loss(model, other)
    torch.manual_seed(0)
    c, _ = task.loss(model, task.collate(items))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_init_is_a_one_line_error(shapes_dir, tmp_path):
    with pytest.raises(ModelDirError, match="needs --init") as e:
        train(PriorTask(cfg()), shapes_dir, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)


def test_init_without_clip_is_a_one_line_error(shapes_dir, clip_dir, tmp_path):
    noclip = tmp_path / "noclip"
    tok = open_model_dir(clip_dir).tokenizer()
    save_model_dir(noclip, {"prior": DiffusionPrior(prior_config("tiny"))}, tokenizer=tok)
    with pytest.raises(ModelDirError, match="has no clip component") as e:
        train(PriorTask(cfg()), shapes_dir, tmp_path / "run", init=noclip, progress=False)
    assert "\n" not in str(e.value)


def test_bad_model_overrides(shapes_dir, clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="embed_dim is fixed by the CLIP core"):
        train(PriorTask(cfg("model.embed_dim=64")), shapes_dir, tmp_path / "a", init=clip_dir, progress=False)
    with pytest.raises(ConfigError, match="bad prior model config"):
        train(PriorTask(cfg("model.depth=3")), shapes_dir, tmp_path / "b", init=clip_dir, progress=False)


def test_prior_from_precomputed_embeddings_follows_the_image_run(shapes_dir, clip_dir, tmp_path):
    """Same seed, same data, caption dropout on: the prior trained from genvl data embed's output logs the
    loss curve of the one trained from the images (to 1e-3 relative: the stored text states are
    float16), and refuses embeddings of another CLIP."""
    from genvl.data.embeddings import embed_image_text
    from genvl.errors import TrainingError

    emb = tmp_path / "emb"
    embed_image_text(clip_dir, shapes_dir, emb, batch_size=7, shard_size=10, device="cpu", progress=False)
    c = ["batch_size=8", "max_steps=12", "log_every=1", "lr=3e-3", "data.caption_dropout=0.3"]
    a = train(PriorTask(cfg(*c)), shapes_dir, tmp_path / "from_images", init=clip_dir, progress=False)
    b = train(PriorTask(cfg(*c)), emb, tmp_path / "from_embeddings", init=clip_dir, progress=False)
    assert [r["step"] for r in a.history] == [r["step"] for r in b.history] and len(a.history) == 12
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], rel=1e-3)
    # another CLIP: refused before training
    other = tmp_path / "other_clip"
    train(CLIPTask(cfg("max_steps=1", "seed=5")), shapes_dir, other, progress=False)
    with pytest.raises(ModelDirError, match="not the one the embeddings"):
        train(PriorTask(cfg(*c)), emb, tmp_path / "x", init=other, progress=False)
    with pytest.raises(TrainingError, match="precomputed CLIP embeddings; the clip stage needs images"):
        train(CLIPTask(cfg()), emb, tmp_path / "y", progress=False)

    # the trainer's loader fetches whole batches (EmbeddingSet.__getitems__): the same batch as row by row
    from genvl.data.embeddings import EmbeddingSet

    es = EmbeddingSet(emb, caption_dropout=0.5, seed=3)
    task = PriorTask(cfg())
    task.text_len = 8
    idx = [5, 0, 17, 2, 9]
    batched, rows = task.collate(es.__getitems__(idx)), task.collate([es[i] for i in idx])
    assert batched.keys() == rows.keys() and bool(batched["uncond"].any()) and not bool(batched["uncond"].all())
    for k in rows:
        torch.testing.assert_close(batched[k], rows[k], rtol=0, atol=0)
    loader = torch.utils.data.DataLoader(es, batch_size=4, collate_fn=task.collate)
    torch.testing.assert_close(next(iter(loader))["text_embeds"], es.tensors["text_embeds"][:4].float())
