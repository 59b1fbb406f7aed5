"""The interleaved stage: documents from pairs and JSONL, held-out split, training, sampling and evaluating by CLI."""

import json

import pytest
import torch

from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.cli import main
from genvl.config import apply_overrides
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.sampling.io import read_png_metadata
from genvl.tokenizers.text import train_text_tokenizer
from genvl.training import TrainConfig
from genvl.training.tasks import get_task
from genvl.training.tasks.interleaved import (
    DocumentSources,
    InterleavedTask,
    caption_first,
    context_dropped,
    group_size,
    heldout,
)

FAST = ["batch_size=8", "max_steps=3", "warmup_steps=1", "log_every=1", "save_every=0", "tracker=none",
        "data.image_size=32"]
Q = ["--no-progress"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """What `genvl train interleaved --init` needs: a clip with its tokenizer, and a decoder to draw with."""
    torch.manual_seed(0)
    from conftest import COLORS, SHAPES

    tok = train_text_tokenizer([f"a {c} {s}" for c in COLORS for s in SHAPES] + ["the same, but"], vocab_size=300,
                               model_max_length=16)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 16, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    d = tmp_path_factory.mktemp("init") / "clip"
    save_model_dir(d, {"clip": clip, "decoder": Decoder(decoder_config("tiny", image_size=16))}, tokenizer=tok)
    return d


@pytest.fixture
def docs_file(shapes_dir):
    """Two interleaved documents over the shapes' images."""
    path = shapes_dir / "docs.jsonl"
    rows = [[{"image": "red_circle_0.png"}, {"text": "the same, but a square"}, {"image": "red_square_0.png"}],
            [{"text": "a blue cross"}, {"image": "blue_cross_0.png"}]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_and_decisions():
    assert isinstance(get_task("interleaved", cfg()), InterleavedTask)
    orders = [caption_first(0.5, 0, 1, i) for i in range(64)]
    assert orders == [caption_first(0.5, 0, 1, i) for i in range(64)] and 0 < sum(orders) < 64
    sizes = [group_size(0.5, 3, 0, 1, i) for i in range(200)]
    assert set(sizes) == {1, 2, 3} and group_size(0.0, 3, 0, 1, 5) == 1
    assert 0.05 < sum(context_dropped(0.1, 0, 0, i) is not None for i in range(2000)) / 2000 < 0.15
    # the split follows the file name (not its folder), the same in every run
    assert heldout("google/1f600.png", 0.5) == heldout("/x/twitter/1f600.png", 0.5)
    share = sum(heldout(f"img{i}.png", 0.2) for i in range(2000)) / 2000
    assert 0.15 < share < 0.25 and not heldout("img1.png", 0.0)
    from genvl.errors import ConfigError

    with pytest.raises(ConfigError, match="cond_drop"):
        InterleavedTask(cfg("model.cond_drop=2"))


def test_documents_from_pairs_and_jsonl(shapes_dir, docs_file, init_dir):
    task = InterleavedTask(cfg("model.concat=0.5", "model.cond_drop=0.0"))
    ds = task.open_dataset(f"{shapes_dir}+{docs_file}")
    assert len(ds) == 34 and ds.format == "metadata.jsonl+documents"
    task.build(ds, open_model_dir(init_dir))
    items = [ds[i] for i in range(32, 34)] + [ds[i] for i in range(24)]  # both documents, then 24 pairs
    batch = task.collate(items)
    docs, px = batch["docs"], batch["pixel_values"]
    assert px.shape == (2 + 1 + 24, 3, 32, 32)
    kinds = [["img" if isinstance(e, int) else "txt" for e in d] for d in docs]
    assert kinds[0] == ["img", "txt", "img"] and kinds[1] == ["txt", "img"]  # the JSONL documents as written
    pair_docs = kinds[2:]
    assert sum(k.count("img") for k in pair_docs) == 24 and batch["pairs"] == 24
    assert any(len(k) > 2 for k in pair_docs) and batch["groups"] > 0  # several pairs in one document
    assert any(k[0] == "txt" for k in pair_docs) and any(k[0] == "img" for k in pair_docs)  # both orders
    tok = task.tokenizer
    first_text = next(e for e in docs[1] if isinstance(e, list))
    assert tok.decode(first_text).strip() == "a blue cross"
    # context dropping: every document with context before an image starts at one of its images
    drop = InterleavedTask(cfg("model.concat=0.5", "model.cond_drop=1.0"))
    drop.build(ds, open_model_dir(init_dir))
    for doc in drop.collate(items)["docs"]:
        assert isinstance(doc[0], int) or not any(isinstance(e, int) for e in doc[1:]), doc
    # held out: the pairs (and documents) whose image names hash below the fraction
    held = DocumentSources(f"{shapes_dir}+{docs_file}", holdout=0.3)
    names = [p.name for p in shapes_dir.glob("*.png")]
    assert held.heldout == sum(heldout(n, 0.3) for n in names) + sum(
        any(heldout(n, 0.3) for n in pair) for pair in (["red_circle_0.png", "red_square_0.png"], ["blue_cross_0.png"]))
    assert len(held) == 34 - held.heldout and 0 < held.heldout < 34


def test_related_pairs_make_in_context_documents(tmp_path):
    """Same file name in two folders (two styles of one picture): "image_a the same in <style b> image_b"."""
    from conftest import draw_shape

    rows = []
    for style, shape in (("one", "circle"), ("two", "square")):
        (tmp_path / style).mkdir()
        for color in ("red", "blue"):
            draw_shape(color, shape).save(tmp_path / style / f"{color}.png")
            rows.append({"file_name": f"{style}/{color}.png", "text": [f"a {color} heart, {style} style", "x"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = DocumentSources(tmp_path, related=1.0)
    assert len(ds) == 8 and ds.related == 4
    docs = [ds[i] for i in range(4, 8)]
    assert all(d["kind"] == "doc" and len(d["segments"]) == 3 for d in docs)
    assert sorted(d["segments"][1]["text"] for d in docs) == ["the same in one style"] * 2 + ["the same in two style"] * 2
    a, b = docs[0]["segments"][0]["image"], docs[0]["segments"][2]["image"]
    assert not torch.equal(a, b)
    assert DocumentSources(tmp_path, related=0.5).related == 2 and DocumentSources(tmp_path).related == 0


def test_train_sample_evaluate_by_cli(shapes_dir, docs_file, init_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["--set", "batch_size=8", "--set", "max_steps=3", "--set", "warmup_steps=1", "--set", "log_every=1",
            "--set", "save_every=0", "--set", "tracker=none", "--set", "model.holdout=0.25"]
    assert main(["train", "interleaved", "--data", f"{shapes_dir}+{docs_file}", "--init", str(init_dir), "--out",
                 str(out), *sets, *Q]) == 0
    capsys.readouterr()
    for f in ("interleaved/config.json", "interleaved/model.safetensors", "clip/model.safetensors",
              "decoder/model.safetensors", "tokenizer/tokenizer.json", "README.md", "train/interleaved/log.jsonl",
              "train/interleaved/samples/step-00000003.png", "train/interleaved/samples/step-00000003.txt"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"]["interleaved"] == "genvl.models.interleaved.InterleavedLM"
    assert set(meta["components"]) == {"clip", "decoder", "interleaved"}  # the decoder came along from --init
    row = json.loads((out / "train/interleaved/log.jsonl").read_text().splitlines()[-1])
    assert {"text_loss", "regression_loss", "cosine", "docs"} <= set(row)
    assert "--method interleaved" in (out / "README.md").read_text()

    # a plain prompt: a folder with doc.html, doc.jsonl and the image, its doc.html printed
    target = tmp_path / "s"
    assert main(["sample", "--method", "interleaved", "a red circle", "--model", str(out), "--out", str(target),
                 "--force-image", "--steps", "2", "--seed", "3", "--max-new-tokens", "4", *Q]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and printed[0].endswith("doc.html")
    folder = target / "a-red-circle-s3"
    assert printed[0] == str(folder / "doc.html") and (folder / "doc.jsonl").is_file()
    meta = read_png_metadata(folder / "image-1.png")
    assert meta["method"] == "interleaved" and meta["prompt"] == "a red circle" and meta["seed"] == 3
    # a prompt file of two documents with images: one folder each
    assert main(["sample", "--method", "interleaved", "--prompt-file", str(docs_file), "--model", str(out), "--out",
                 str(target), "--steps", "2", "--max-new-tokens", "3", "--max-images", "1", *Q]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all((target / p).exists() for p in printed)
    # bad input: one line, exit 2
    for argv, needle in [
        (["sample", "--method", "interleaved", "--model", str(out), *Q], "empty prompt"),
        (["sample", "--method", "interleaved", "x", "--prompt-file", str(docs_file), "--model", str(out), *Q], "not both"),
        (["sample", "--method", "interleaved", "x", "--model", str(init_dir), *Q], "no interleaved component"),
        (["sample", "a red circle", "--prompt-file", str(docs_file), "--model", str(out), *Q], "--method interleaved"),
        (["train", "interleaved", "--data", str(shapes_dir), "--out", str(tmp_path / "o"), *Q], "needs --init"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err

    # evaluation on the pairs the training held out; the figures go to JSON and the model card
    res_path = tmp_path / "il.json"
    assert main(["evaluate", "interleaved", "--model", str(out), "--data", str(shapes_dir), "--json", str(res_path),
                 "--guidance", "1.5", "--record", *Q]) == 0
    text = capsys.readouterr().out
    assert "held-out pairs (model.holdout 0.25)" in text and "cosine" in text
    res = json.loads(res_path.read_text())
    names = [p.name for p in shapes_dir.glob("*.png")]
    assert res["n"] == sum(heldout(n, 0.25) for n in names)
    m = res["metrics"]
    assert -1 <= m["cosine"] <= 1 and 0 <= m["l2"] <= 2 and 0 <= m["top1"] <= 100 and 0 <= m["img_prob"] <= 100
    assert m["image_guidance"] == 1.5 and m["holdout"] == 0.25
    assert "### interleaved" in (out / "README.md").read_text()
