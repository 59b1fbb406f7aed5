"""The interleaved LM: sequence layout, the two kinds of loss, overfitting, mixed prompts, documents on disk."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import draw_shape
from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.errors import GenvlError
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.interleaved import InterleavedLM, interleaved_config
from genvl.sampling.interleaved import (
    InterleavedParts,
    generate_document,
    generate_image_embeds,
    read_prompt_file,
    write_document,
)
from genvl.sampling.io import read_png_metadata
from genvl.training.tasks.interleaved import interleaved_loss
from stub_vq import tiny_tokenizer

D, K = 32, 4  # CLIP embedding size of the tiny CLIP, slots per image


def tiny_model(tok, **kw):
    return InterleavedLM(interleaved_config("tiny", text_vocab_size=len(tok), embed_dim=D, visual_tokens=K, **kw))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_layout_targets_and_truncation():
    tok = tiny_tokenizer()
    lay = tiny_model(tok).layout
    T = lay.text_vocab_size
    b = lay.build_batch([[[10, 11], 0, [12]], [1, [13]]])
    row0 = [lay.bos_id, 10, 11, T, T + 2, T + 3, T + 4, T + 5, T + 1, 12, lay.eos_id]
    assert b.input_ids[0].tolist() == row0
    # text targets: the text ids, <img> and <eos>; never <bos>, a slot, </img> or padding
    assert b.text_targets[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert b.visual_targets[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert b.text_targets[1].tolist()[-2:] == [0, 0] and b.attention_mask[1].tolist()[-2:] == [0, 0]  # padding
    assert b.image_index.tolist() == [0] * K + [1] * K and b.slot_index.tolist() == list(range(K)) * 2
    # a document longer than max_len is cut in its text, and never inside an image block
    enc = lay.encode([[5] * 3, 0, [6] * 4], max_len=7)
    assert enc.ids == [lay.bos_id, 5, 5, 5] and enc.truncated and enc.slot_images == []
    enc = lay.encode([[5] * 3, 0, [6] * 4], max_len=12)
    assert len(enc.ids) == 12 and enc.ids[-3:] == [T + 1, 6, 6] and enc.slot_images == [0] * K
    with pytest.raises(ValueError, match="multiple of visual_tokens"):
        interleaved_config("tiny", embed_dim=30, visual_tokens=4)


def test_loss_is_cross_entropy_at_text_and_regression_at_slots_only():
    """Perturbing one kind of target moves only its loss; outputs at non-target positions never matter."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    lay = model.layout
    docs = [[ids(tok, "a red circle"), 0, ids(tok, "a blue square")], [1, ids(tok, "a green triangle")], [[7], 2, 0]]
    b = lay.build_batch(docs)
    z = F.normalize(torch.randn(3, D), dim=-1)
    vis = b.slot_values(model.image_slots(z))  # (Nv, C): inputs and targets
    out = model(b.input_ids, vis, attention_mask=b.attention_mask)
    base = interleaved_loss(out.logits, out.regression, b, vis, K, regression_weight=1.0, cosine_weight=0.5)
    # by hand: cross-entropy over the text targets, mean squared error over the slot targets
    txt, sl = b.text_targets[:, 1:], b.visual_targets[:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1][txt], b.input_ids[:, 1:][txt])
    assert torch.allclose(base.text_loss, ce)
    assert torch.allclose(base.regression_loss, (out.regression[:, :-1][sl] - vis).pow(2).mean())
    assert torch.allclose(base.loss, base.text_loss + base.regression_loss + 0.5 * (1 - base.cosine))

    # another text target (same model outputs): the text loss moves, the regression does not
    other = b.input_ids.clone()
    pos = b.text_targets.nonzero()[3]
    other[pos[0], pos[1]] = (other[pos[0], pos[1]] + 5) % lay.text_vocab_size
    moved = interleaved_loss(out.logits, out.regression, type(b)(**{**vars(b), "input_ids": other}), vis, K)
    assert not torch.isclose(moved.text_loss, base.text_loss)
    assert torch.equal(moved.regression_loss, base.regression_loss) and torch.equal(moved.cosine, base.cosine)

    # other image targets: the regression moves, the text loss does not
    moved = interleaved_loss(out.logits, out.regression, b, vis + 0.3 * torch.randn_like(vis), K)
    assert not torch.isclose(moved.regression_loss, base.regression_loss)
    assert torch.equal(moved.text_loss, base.text_loss)

    # logits where no text target follows and regressions where no slot follows are ignored
    logits, reg = out.logits.clone(), out.regression.clone()
    logits[:, :-1][~txt] += 10 * torch.randn_like(logits[:, :-1][~txt])
    reg[:, :-1][~sl] -= 3.0
    logits[:, -1] += 1.0
    reg[:, -1] += 1.0
    same = interleaved_loss(logits, reg, b, vis, K, cosine_weight=0.5)
    assert torch.allclose(same.loss, interleaved_loss(out.logits, out.regression, b, vis, K, cosine_weight=0.5).loss)


DOCS = [  # (text | image index) elements
    ["a red circle", 0, "a blue square", 1],
    ["a green triangle", 2],
    [3, "a yellow cross"],
    ["a black circle", 4, "a red circle"],
]


@pytest.fixture(scope="module")
def overfit():
    """A tiny LM trained on four documents whose images are fixed random unit embeddings."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    z = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    model = tiny_model(tok, hidden_size=64, intermediate_size=128)
    docs = [[ids(tok, el) if isinstance(el, str) else el for el in doc] for doc in DOCS]
    b = model.layout.build_batch(docs)
    vis = b.slot_values(model.image_slots(z))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        out = model(b.input_ids, vis, attention_mask=b.attention_mask)
        res = interleaved_loss(out.logits, out.regression, b, vis, K)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    parts = InterleavedParts(model=model.eval(), clip=CLIP(clip_config("tiny")).eval(), tokenizer=tok)
    return parts, z, res


def test_overfit_regenerates_text_and_images(overfit):
    """Prompted with each document's first element, the LM writes the rest: the same text, an <img>
    where the document had an image, embeddings close to the originals, then <eos>."""
    parts, z, res = overfit
    # the text loss keeps the ambiguity of the documents' openings ("<bos> a ..." starts three of them)
    assert res.text_loss.item() < 0.25 and res.regression_loss.item() < 0.02, res
    for doc in DOCS:
        first = {"text": doc[0]} if isinstance(doc[0], str) else {"embedding": z[doc[0]]}
        out = generate_document(parts, [first], max_new_tokens=20, max_images=3, temperature=0.0, image_guidance=1.0,
                                decode_images=False, seed=0)
        assert out.stop == "eos"
        got = out.segments[1:]
        assert len(got) == len(doc) - 1, (doc, got)
        for want, seg in zip(doc[1:], got):
            assert seg["generated"]
            if isinstance(want, str):
                assert seg.get("text") == want
            else:
                assert "embedding" in seg, (doc, got)
                cos = F.cosine_similarity(seg["embedding"], z, dim=-1)  # (5,)
                assert cos[want] > 0.95 and int(cos.argmax()) == want, cos
    # the batched caption -> image path regresses the same embeddings
    tok = parts.tokenizer
    zh = generate_image_embeds(parts.model, [ids(tok, "a red circle"), ids(tok, "a green triangle")])
    assert (F.cosine_similarity(zh, z[[0, 2]], dim=-1) > 0.95).all()


def test_guidance_and_sampling_settings(overfit):
    parts, z, _ = overfit
    a = generate_document(parts, "a green triangle", max_new_tokens=5, temperature=0.0, image_guidance=1.0,
                          decode_images=False, seed=0).generated_embeds
    b = generate_document(parts, "a green triangle", max_new_tokens=5, temperature=0.0, image_guidance=3.0,
                          decode_images=False, seed=0).generated_embeds
    assert a.shape == b.shape == (1, D) and not torch.allclose(a, b)  # guidance acts on the regressed slots
    text_only = generate_document(parts, "a green triangle", max_images=0, max_new_tokens=5, temperature=0.0,
                                  decode_images=False)
    assert text_only.generated_embeds.numel() == 0
    s1 = generate_document(parts, "a red", max_new_tokens=6, temperature=1.5, decode_images=False, seed=4)
    s2 = generate_document(parts, "a red", max_new_tokens=6, temperature=1.5, decode_images=False, seed=4)
    assert [x.get("text") for x in s1.segments] == [x.get("text") for x in s2.segments]  # same seed, same document
    for bad in (dict(max_new_tokens=0), dict(max_images=-1), dict(temperature=-1.0), dict(image_guidance=-2.0),
                dict(force_image=True, max_images=0)):
        with pytest.raises(GenvlError):
            generate_document(parts, "a red circle", decode_images=False, **bad)
    with pytest.raises(GenvlError, match="empty prompt"):
        generate_document(parts, "   ", decode_images=False)
    with pytest.raises(GenvlError, match="decoder"):
        generate_document(parts, "a red circle")  # no decoder to draw with


@pytest.fixture(scope="module")
def random_parts(tmp_path_factory):
    """A random tiny model directory: clip, decoder, interleaved, tokenizer."""
    torch.manual_seed(1)
    tok = tiny_tokenizer()
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 16, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    d = tmp_path_factory.mktemp("il") / "model"
    save_model_dir(d, {"clip": clip, "decoder": Decoder(decoder_config("tiny", image_size=16)),
                       "interleaved": tiny_model(tok)}, tokenizer=tok)
    return InterleavedParts.from_model_dir(open_model_dir(d))


def test_mixed_prompts_run_and_the_image_prompt_is_used(random_parts, tmp_path):
    parts = random_parts
    red, blue = draw_shape("red", "circle"), draw_shape("blue", "square")
    common = dict(max_new_tokens=3, max_images=1, force_image=True, steps=2, seed=0, temperature=0.0)
    prompt = [{"image": red}, {"text": "the same, but a square"}]
    a = generate_document(parts, prompt, **common)
    again = generate_document(parts, prompt, **common)
    other = generate_document(parts, [{"image": blue}, {"text": "the same, but a square"}], **common)
    assert [("text" in s, s["generated"]) for s in a.segments[:3]] == [(False, False), (True, False), (False, True)]
    img = a.segments[2]["image"]
    assert img.shape == (3, 16, 16) and float(img.min()) >= -1 and float(img.max()) <= 1
    za, zb = a.generated_embeds[0], other.generated_embeds[0]
    assert torch.allclose(za, again.generated_embeds[0]) and torch.equal(img, again.segments[2]["image"])
    # another prompt image, everything else equal: another embedding and another picture
    assert F.cosine_similarity(za, zb, dim=0) < 0.9999
    assert not torch.equal(img, other.segments[2]["image"])
    # an image prompt enters as its CLIP embedding: giving that embedding is the same prompt
    z_red = a.segments[0]["embedding"]
    same = generate_document(parts, [{"embedding": z_red}, {"text": "the same, but a square"}], **common)
    assert torch.allclose(same.generated_embeds[0], za, atol=1e-5)
    # text after images, several images, image paths
    red.save(tmp_path / "red.png")
    mixed = [{"text": "a red circle"}, {"image": str(tmp_path / "red.png")}, {"text": "and"}, {"image": blue}]
    out = generate_document(parts, mixed, max_new_tokens=4, max_images=2, steps=2, seed=1, temperature=1.0)
    assert sum(not s["generated"] for s in out.segments) == 4
    with pytest.raises(GenvlError, match="image not found"):
        generate_document(parts, [{"image": str(tmp_path / "missing.png")}], steps=2)


def test_write_document_html_jsonl_pngs(random_parts, tmp_path):
    red = draw_shape("red", "circle")
    red.save(tmp_path / "red.png")
    (tmp_path / "prompt.jsonl").write_text(json.dumps([{"image": "red.png"}, {"text": "a red <circle> & more"}]) + "\n")
    prompts = read_prompt_file(tmp_path / "prompt.jsonl")
    assert prompts[0][0]["image"] == str(tmp_path / "red.png")
    out = generate_document(random_parts, prompts[0], max_new_tokens=3, force_image=True, steps=2, seed=2)
    files = write_document(out, tmp_path / "out", "doc", {"model": "m"})
    again = write_document(out, tmp_path / "out", "doc", {"model": "m"})
    assert files.folder != again.folder  # never overwrites
    page = files.html.read_text()
    assert "a red &lt;circle&gt; &amp; more" in page and 'src="prompt-1.png"' in page and 'src="image-2.png"' in page
    rows = json.loads(files.jsonl.read_text())
    assert rows[0] == {"image": "prompt-1.png", "generated": False} and rows[-1]["generated"]
    meta = read_png_metadata(files.folder / "image-2.png")
    assert meta["generated"] is True and meta["seed"] == 2 and meta["model"] == "m" and meta["steps"] == 2
    # the written document reads back as a prompt file
    assert len(read_prompt_file(files.jsonl)[0]) == len(rows)
