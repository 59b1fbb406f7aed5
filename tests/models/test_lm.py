"""The token LM: vocabulary layout, training sequences, sizes, save / load."""

import pytest
import torch

from genvl.errors import ModelDirError
from genvl.models.lm import (
    LM_SIZES,
    TokenLayout,
    TokenLM,
    decode_caption,
    encode_captions,
    lm_config,
)

T, K, N = 300, 8, 4


@pytest.fixture
def layout():
    return TokenLayout(text_vocab_size=T, codebook_size=K, image_tokens=N)


def test_one_vocabulary_text_then_codes_then_specials(layout):
    assert (layout.image_offset, layout.boi_id, layout.eoi_id, layout.vocab_size) == (T, T + K, T + K + 1, T + K + 2)
    codes = torch.tensor([[0, 7], [3, 5]])
    ids = layout.codes_to_ids(codes)
    assert ids.tolist() == [[T, T + 7], [T + 3, T + 5]]
    assert torch.equal(layout.ids_to_codes(ids), codes)
    kinds = layout.is_image(torch.tensor([T - 1, T, T + K - 1, T + K, T + K + 1]))
    assert kinds.tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="image codes must be in"):
        layout.codes_to_ids(torch.tensor([K]))
    with pytest.raises(ValueError, match="not all ids are image codes"):
        layout.ids_to_codes(torch.tensor([T - 1]))
    with pytest.raises(ValueError, match="not a text id"):
        TokenLayout(text_vocab_size=3, codebook_size=K, image_tokens=N)  # eos 3 would not be a text id


def test_allowed_ids_masks(layout):
    V = layout.vocab_size + 6  # a model vocabulary rounded up: the extra rows are never allowed
    img = layout.allowed_ids("image", V)
    assert img.shape == (V,) and img.nonzero().flatten().tolist() == list(range(T, T + K))
    txt = layout.allowed_ids("text", V)
    allowed = set(txt.nonzero().flatten().tolist())
    assert allowed == ({layout.eos_id} | set(range(4, T)))  # no <pad> 0, <unk> 1, <bos> 2, codes or specials
    with pytest.raises(ValueError, match="unknown id kind"):
        layout.allowed_ids("audio")
    with pytest.raises(ValueError, match="smaller"):
        layout.allowed_ids("image", layout.vocab_size - 1)


def test_training_sequences_and_targets(layout):
    codes = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4], [1, 1, 1, 1]]).view(3, 2, 2)  # (B, h, w)
    texts = [[10, 11], [12, 13, 14], []]
    b = layout.build_batch(texts, codes, t2i=[True, False, True])
    bos, eos, boi, eoi = 2, 3, layout.boi_id, layout.eoi_id
    c = lambda *xs: [T + x for x in xs]  # noqa: E731
    rows = [
        [bos, 10, 11, boi, *c(0, 1, 2, 3), eoi, 0, 0],  # text -> image, right-padded with <pad> 0
        [bos, boi, *c(7, 6, 5, 4), eoi, 12, 13, 14, eos],  # image -> text
        [bos, boi, *c(1, 1, 1, 1), eoi, 0, 0, 0, 0],  # unconditional text -> image (empty caption)
    ]
    assert b.input_ids.tolist() == rows
    assert b.attention_mask.tolist() == [[int(i < n) for i in range(11)] for n in (9, 11, 7)]
    # targets: codes + <eoi> of t2i rows, caption + <eos> of i2t rows; never the prompt or padding
    assert b.image_targets[0].nonzero().flatten().tolist() == list(range(4, 9))
    assert b.image_targets[2].nonzero().flatten().tolist() == list(range(2, 7))
    assert not b.image_targets[1].any() and not b.text_targets[0].any() and not b.text_targets[2].any()
    assert b.text_targets[1].nonzero().flatten().tolist() == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="expected 4 codes"):
        layout.build_batch([[1]], torch.zeros(1, 5, dtype=torch.long), [True])


def test_prompts(layout):
    assert layout.t2i_prompt([9, 8]) == [2, 9, 8, layout.boi_id]
    assert layout.t2i_prompt([]) == [2, layout.boi_id]
    p = layout.i2t_prompt(torch.tensor([[1, 2, 3, 4]]))
    assert p.tolist() == [[2, layout.boi_id, T + 1, T + 2, T + 3, T + 4, layout.eoi_id]]


def test_layout_from_tokenizer_and_caption_text():
    from genvl.tokenizers.text import train_text_tokenizer

    tok = train_text_tokenizer(["a red circle", "a blue square"] * 5, vocab_size=280, model_max_length=8)
    lay = TokenLayout.from_tokenizer(tok, codebook_size=16, image_tokens=4)
    assert (lay.text_vocab_size, lay.pad_id, lay.unk_id, lay.bos_id, lay.eos_id) == (len(tok), 0, 1, 2, 3)
    ids = encode_captions(tok, ["a red circle", "  ", "a blue square a blue square a blue square"], max_tokens=5)
    assert ids[1] == [] and len(ids[2]) == 5 and all(4 <= i < len(tok) for i in ids[0])
    assert decode_caption(tok, lay, ids[0] + [lay.eos_id, 7, 8]) == "a red circle"


def test_sizes_and_config_checks():
    small = TokenLM(lm_config("small", text_vocab_size=1024, codebook_size=512, image_tokens=64))
    assert small.num_parameters < 3_000_000  # "a few M" for the 32 px emoji demo
    assert small.model.config._attn_implementation == "sdpa"
    assert set(LM_SIZES) >= {"tiny", "small"}
    cfg = lm_config("tiny", text_vocab_size=300, codebook_size=8, image_tokens=4, vocab_multiple=64)
    assert cfg.vocab_size == 320 and cfg.max_len == 4 + 32 + 4
    with pytest.raises(ValueError, match="unknown lm size"):
        lm_config("huge")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        lm_config("tiny", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        lm_config("tiny", codebook_size=0)


def test_save_load_same_logits_and_strict(tmp_path):
    torch.manual_seed(0)
    lm = TokenLM(lm_config("tiny", text_vocab_size=T, codebook_size=K, image_tokens=N)).eval()
    x = torch.randint(0, lm.config.vocab_size, (2, 9))
    lm.save_pretrained(tmp_path / "lm")
    again = TokenLM.from_pretrained(tmp_path / "lm")
    assert again.config == lm.config and again.layout == lm.layout
    assert torch.equal(lm(x).logits, again(x).logits)
    other = TokenLM(lm_config("tiny", text_vocab_size=T, codebook_size=K + 1, image_tokens=N))
    with pytest.raises(ModelDirError, match="shape mismatch"):
        other.load_weights(tmp_path / "lm" / "model.safetensors")


def test_left_padding_and_last_only():
    torch.manual_seed(0)
    lm = TokenLM(lm_config("tiny", text_vocab_size=T, codebook_size=K, image_tokens=N)).eval()
    x = torch.randint(4, T, (1, 6))
    ref = lm(x).logits  # (1, 6, V)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = (padded != 0).long()
    mask[:, 3:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(padded, attention_mask=mask, position_ids=pos, last_only=True).logits  # (1, 1, V)
    assert out.shape == (1, 1, lm.config.vocab_size)
    assert torch.allclose(out[:, -1], ref[:, -1], atol=1e-5)
