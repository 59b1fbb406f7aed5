"""Precomputed CLIP embeddings: rows equal what the CLIP computes on the fly; an interrupted run
resumes at its first missing shard; caption dropout swaps in the empty caption's encoding."""

import pytest
import torch

from genvl.checkpoint import open_model_dir
from genvl.data import open_image_text
from genvl.data.embeddings import EmbeddingSet, embed_image_text
from genvl.errors import DataError
from genvl.tokenizers.text import encode_texts
from tests.conftest import build_tiny_model


def test_embeddings_match_the_clip_and_resume(shapes_dir, tmp_path):
    model = build_tiny_model(tmp_path / "m", parts=("clip",))
    out = tmp_path / "emb"
    meta = embed_image_text(model, shapes_dir, out, batch_size=5, shard_size=12, device="cpu", progress=False)
    assert meta["count"] == 32 and meta["shards"] == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    es = EmbeddingSet(out)
    md = open_model_dir(model)
    clip, tok = md.load("clip"), md.tokenizer()
    ds = open_image_text(shapes_dir, image_size=clip.config.image_size)
    assert len(es) == len(ds)
    with torch.no_grad():
        for i in (0, 13, 31):
            row = es[i]
            torch.testing.assert_close(row["image_embeds"], clip.encode_image(ds[i]["pixel_values"][None])[0])
            enc = encode_texts(tok, [ds.captions[i]], max_length=clip.config.max_text_len)
            text = clip.encode_text(enc["input_ids"], enc["attention_mask"])
            torch.testing.assert_close(row["text_embeds"], text.embeds[0])
            n = int(enc["attention_mask"].sum())
            assert int(row["text_mask"].sum()) == n and row["text"] == ds.captions[i]
            torch.testing.assert_close(row["text_states"][:n].float(), text.token_states[0, :n], atol=2e-3, rtol=2e-3)
    # an interrupted run: shard 1 missing; a rerun writes only it
    before = (out / "00000.safetensors").stat().st_mtime_ns
    (out / "00001.safetensors").unlink()
    with pytest.raises(DataError, match="incomplete embeddings"):
        EmbeddingSet(out)
    embed_image_text(model, shapes_dir, out, batch_size=5, shard_size=12, device="cpu", progress=False)
    assert (out / "00000.safetensors").stat().st_mtime_ns == before
    torch.testing.assert_close(EmbeddingSet(out)[13]["image_embeds"], es[13]["image_embeds"])
    with pytest.raises(DataError, match="another model, data or shard size"):
        embed_image_text(model, shapes_dir, out, shard_size=7, device="cpu", progress=False)
    dropped = EmbeddingSet(out, caption_dropout=1.0)[3]
    assert dropped["text"] == "" and torch.equal(dropped["image_embeds"], es[3]["image_embeds"])
