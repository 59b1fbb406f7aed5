"""Autoregressive sampling: vocabulary masks, guidance, KV-cache equivalence, seeds, bad input."""

import pytest
import torch

from genvl.errors import GenvlError
from genvl.models.lm import TokenLM, encode_captions, lm_config
from genvl.sampling.autoregressive import (
    IncrementalDecoder,
    caption,
    filter_logits,
    generate_caption_ids,
    generate_image_codes,
    guide,
    sample_tokens,
    text_to_image,
)
from stub_vq import StubVQ, StubVQConfig, tiny_tokenizer

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    vq = StubVQ(StubVQConfig(image_size=16, latent_size=4, codebook_size=27)).eval()
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=27, image_tokens=16, text_len=12))
    with torch.no_grad():  # larger weights than the init: peaked, prompt-dependent logits
        for p in lm.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return lm.eval(), vq, tok


def _text_preferring_lm(lm):
    """A copy whose output head puts every text id far above every image id and special."""
    bad = TokenLM(lm.config)
    bad.load_state_dict(lm.state_dict())
    T = lm.layout.text_vocab_size
    with torch.no_grad():
        w = bad.model.lm_head.weight  # (V, hidden)
        w[:T] = torch.randn_like(w[:T]) * 20
        w[T:] = 0
    return bad.eval()


def test_no_text_token_inside_an_image_span(parts):
    lm, vq, tok = parts
    bad = _text_preferring_lm(lm)
    lay = bad.layout
    ids = [lay.t2i_prompt(t) for t in encode_captions(tok, PROMPTS, 12)]
    pad = max(map(len, ids))
    x = torch.tensor([[0] * (pad - len(r)) + r for r in ids])
    raw = bad(x, attention_mask=(torch.arange(pad)[None] >= torch.tensor([pad - len(r) for r in ids])[:, None]).long())
    assert (raw.logits[:, -1].argmax(-1) < lay.text_vocab_size).all()  # unmasked, the model wants text
    for kw in (dict(temperature=1.0), dict(temperature=0.0), dict(temperature=2.0, top_k=5), dict(top_p=0.5)):
        out = text_to_image(bad, vq, tok, None, PROMPTS, num_images=2, seed=0, **kw)
        assert out.codes.shape == (4, 4, 4) and out.codes.min() >= 0 and out.codes.max() < 27
        assert out.images.shape == (4, 3, 16, 16)
    # and in the raw id space: every generated id is an image-code id
    codes = generate_image_codes(bad, lay, [[5, 6]], guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert lay.is_image(lay.codes_to_ids(codes)).all()


def test_captions_use_text_ids_only(parts):
    lm, vq, tok = parts
    lay = lm.layout
    img_lm = TokenLM(lm.config)
    img_lm.load_state_dict(lm.state_dict())
    with torch.no_grad():  # now the head prefers image codes and specials
        w = img_lm.model.lm_head.weight
        w[lay.text_vocab_size:] = torch.randn_like(w[lay.text_vocab_size:]) * 20
        w[: lay.text_vocab_size] = 0
    img_lm.eval()
    codes = torch.randint(0, 27, (3, 4, 4))
    for t in (0.0, 1.0):
        rows = generate_caption_ids(img_lm, lay, codes, max_new_tokens=6, temperature=t,
                                    generator=torch.Generator().manual_seed(1))
        allowed = set(lay.allowed_ids("text").nonzero().flatten().tolist())
        assert all(i in allowed and i != lay.eos_id for r in rows for i in r)


def test_filters_keep_the_allowed_top_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    allowed = torch.tensor([False, True, True, True, True, True])
    out = filter_logits(logits, allowed, temperature=1.0, top_k=2)
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False, False, False]
    out = filter_logits(logits, allowed, top_p=1e-6)  # nucleus of one: the most likely allowed id
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False, False, False]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(logits.repeat(64, 1), allowed, 1.0, 0, 1.0, g) for _ in range(20)])
    assert set(draws.unique().tolist()) <= {1, 2, 3, 4, 5} and len(draws.unique()) > 2
    assert sample_tokens(logits, allowed, 0.0, 0, 1.0, None).item() == 1


def test_guidance_combines_uncond_and_cond_rows():
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    both = torch.cat([cond, uncond])
    assert torch.allclose(guide(both, 2, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.allclose(guide(both, 2, 1.0), cond)
    assert torch.allclose(guide(both, 2, 0.0), uncond)


def test_cfg_scale_one_equals_conditional_sampling(parts):
    lm, _, tok = parts
    ids = encode_captions(tok, PROMPTS + ["a green triangle"], 12)
    for t in (0.0, 1.0):
        plain = generate_image_codes(lm, lm.layout, ids, guidance=1.0, temperature=t, cfg=False,
                                     generator=torch.Generator().manual_seed(3))
        batched = generate_image_codes(lm, lm.layout, ids, guidance=1.0, temperature=t, cfg=True,
                                       generator=torch.Generator().manual_seed(3))
        assert torch.equal(plain, batched)
    guided = generate_image_codes(lm, lm.layout, ids, guidance=4.0, temperature=0.0)
    assert not torch.equal(guided, plain)  # guidance does change the codes


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_kv_cache_equals_no_cache_greedy(parts, mode):
    lm, _, tok = parts
    ids = encode_captions(tok, PROMPTS + ["a yellow cross in a black circle"], 12)  # different lengths: left padding
    ref = generate_image_codes(lm, lm.layout, ids, guidance=3.0, temperature=0.0, decode="none")
    got = generate_image_codes(lm, lm.layout, ids, guidance=3.0, temperature=0.0, decode=mode)
    assert torch.equal(ref, got)
    assert len(ref.unique()) > 3  # a non-trivial sequence
    codes = torch.randint(0, 27, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = generate_caption_ids(lm, lm.layout, codes, max_new_tokens=8, decode="none")
    assert generate_caption_ids(lm, lm.layout, codes, max_new_tokens=8, decode=mode) == ref
    # sampled (not greedy) decoding from one seed also matches
    a = generate_image_codes(lm, lm.layout, ids, generator=torch.Generator().manual_seed(5), decode="none")
    b = generate_image_codes(lm, lm.layout, ids, generator=torch.Generator().manual_seed(5), decode=mode)
    assert torch.equal(a, b)


def test_static_decoder_reuses_its_cache(parts):
    lm, _, tok = parts
    ids = encode_captions(tok, PROMPTS, 12)
    first = generate_image_codes(lm, lm.layout, ids, temperature=0.0, decode="static")
    again = generate_image_codes(lm, lm.layout, ids, temperature=0.0, decode="static")  # cache reset, not stale
    assert torch.equal(first, again)
    with pytest.raises(GenvlError, match="CUDA"):
        IncrementalDecoder(lm, "static", max_len=8, compile=True)


def test_same_seed_same_output_different_seeds_differ(parts):
    lm, vq, tok = parts
    a = text_to_image(lm, vq, tok, None, PROMPTS, num_images=2, seed=11)
    b = text_to_image(lm, vq, tok, None, PROMPTS, num_images=2, seed=11)
    c = text_to_image(lm, vq, tok, None, PROMPTS, num_images=2, seed=12)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images)
    assert not torch.equal(a.codes, c.codes)
    assert not torch.equal(a.codes[0], a.codes[1])  # two images of one prompt differ
    assert a.seed == 11 and a.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and a.settings["method"] == "ar"
    g = text_to_image(lm, vq, tok, None, PROMPTS, generator=torch.Generator().manual_seed(11))
    assert g.seed is None
    c1 = caption(lm, vq, tok, None, a.images, temperature=1.0, seed=4)
    c2 = caption(lm, vq, tok, None, a.images, temperature=1.0, seed=4)
    c3 = caption(lm, vq, tok, None, a.images, temperature=1.0, seed=5)
    assert c1.token_ids == c2.token_ids and c1.token_ids != c3.token_ids
    assert len(c1.captions) == 4 and all(isinstance(t, str) for t in c1.captions)


def test_bad_inputs_are_one_line_errors(parts):
    lm, vq, tok = parts
    cases = [
        (dict(prompts=["   "]), "empty prompt"),
        (dict(prompts=[]), "no prompt"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-3), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(guidance=-2.0), "guidance"),
        (dict(num_images=0), "num_images"),
    ]
    for kw, needle in cases:
        args = dict(prompts=PROMPTS, **{k: v for k, v in kw.items() if k != "prompts"})
        if "prompts" in kw:
            args["prompts"] = kw["prompts"]
        with pytest.raises(GenvlError, match=needle) as e:
            text_to_image(lm, vq, tok, None, args.pop("prompts"), **args)
        assert "\n" not in str(e.value)
    other = StubVQ(StubVQConfig(image_size=16, latent_size=2, codebook_size=27))
    with pytest.raises(GenvlError, match="size mismatch"):
        text_to_image(lm, other, tok, None, PROMPTS)
    with pytest.raises(GenvlError, match="size mismatch"):
        caption(lm, vq, tiny_tokenizer(["other words entirely"] * 3), None, torch.zeros(1, 3, 16, 16))
    with pytest.raises(GenvlError, match="pixels must be in"):
        caption(lm, vq, tok, None, torch.full((1, 3, 16, 16), 3.0))
    with pytest.raises(GenvlError, match="max_new_tokens"):
        caption(lm, vq, tok, None, torch.zeros(1, 3, 16, 16), max_new_tokens=0)
    with pytest.raises(GenvlError, match="decode mode"):
        generate_image_codes(lm, lm.layout, [[5]], decode="paged")


def test_fast_path_falls_back_on_cpu(parts):
    lm, vq, tok = parts
    fast = text_to_image(lm, vq, tok, None, PROMPTS, seed=2, fast=True)
    plain = text_to_image(lm, vq, tok, None, PROMPTS, seed=2)
    ref = text_to_image(lm, vq, tok, None, PROMPTS, seed=2, use_cache=False)
    assert fast.settings["decode"] == "dynamic" and ref.settings["decode"] == "none"
    assert torch.equal(fast.codes, plain.codes) and torch.equal(plain.codes, ref.codes)
