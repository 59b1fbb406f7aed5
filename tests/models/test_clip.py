import json

import pytest
import torch

from genvl.errors import ModelDirError
from genvl.models.clip import CLIP, CLIP_SIZES, clip_config


def _batch(vocab=4096):
    g = torch.Generator().manual_seed(0)
    px = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 3, 0, 0, 0], [2, 13, 14, 15, 16, 3]])
    return px, ids, (ids != 0).long()


def test_size_table_has_tiny_and_builds():
    assert {"tiny", "small", "base"} <= set(CLIP_SIZES)
    m = CLIP(clip_config("tiny"))
    assert m.num_parameters < 500_000
    out = m(*_batch())
    assert out.image_embeds.shape == (3, 32) and out.text_embeds.shape == (3, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_text_pooling_uses_eos_position():
    torch.manual_seed(0)
    m = CLIP(clip_config("tiny")).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    a = m.encode_text(ids, (ids != 0).long()).embeds
    ids2 = ids.clone()
    ids2[0, 4:] = 7  # change tokens after <eos>: causal tower + eos pooling -> unchanged
    b = m.encode_text(ids2, torch.ones_like(ids2)).embeds
    assert torch.allclose(a, b, atol=1e-5)
    ids3 = ids.clone()
    ids3[0, 1] = 20  # change a token before <eos> -> changed
    assert not torch.allclose(a, m.encode_text(ids3, (ids3 != 0).long()).embeds, atol=1e-4)


def test_save_load_identical(tmp_path):
    torch.manual_seed(0)
    m = CLIP(clip_config("tiny", loss="siglip")).eval()
    m.save_pretrained(tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert cfg["_class"] == "genvl.models.clip.CLIP" and cfg["loss"] == "siglip"
    m2 = CLIP.from_pretrained(tmp_path / "clip")
    a, b = m(*_batch()), m2(*_batch())
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    assert torch.equal(m.logit_bias, m2.logit_bias)


def test_config_weight_mismatch_is_one_line_error(tmp_path):
    CLIP(clip_config("tiny")).save_pretrained(tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    cfg["embed_dim"] = 16
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="do not match config.json"):
        CLIP.from_pretrained(tmp_path / "clip")


def test_truncated_weights_is_one_line_error(tmp_path):
    CLIP(clip_config("tiny")).save_pretrained(tmp_path / "clip")
    w = tmp_path / "clip" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelDirError, match="corrupt or truncated"):
        CLIP.from_pretrained(tmp_path / "clip")


def test_imports_huggingface_clip_directory(tmp_path):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    hf_cfg = HFConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16, eos_token_id=98),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    hf = CLIPModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    m = CLIP.from_hf_clip(tmp_path / "hf")
    assert m.config.embed_dim == 24
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.tensor([[5, 6, 98, 0], [7, 98, 0, 0]])
    mask = (ids != 0).long()
    ref_img = torch.nn.functional.normalize(hf.get_image_features(pixel_values=m._normalize_pixels(px)).pooler_output
                                            if hasattr(hf.get_image_features(pixel_values=m._normalize_pixels(px)), "pooler_output")
                                            else hf.get_image_features(pixel_values=m._normalize_pixels(px)), dim=-1)
    assert torch.allclose(m.encode_image(px), ref_img, atol=1e-5)
    out = hf.get_text_features(input_ids=ids, attention_mask=mask)
    ref_txt = out.pooler_output if hasattr(out, "pooler_output") else out
    assert torch.allclose(m.encode_text(ids, mask).embeds, torch.nn.functional.normalize(ref_txt, dim=-1), atol=1e-5)


def test_external_frozen_text_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    from genvl.models.clip import external_text_encoder_config, load_external_text_encoder_weights

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50, max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
    cfg = clip_config("tiny", text_encoder=external_text_encoder_config(tmp_path / "bert"))
    m = CLIP(cfg)
    load_external_text_encoder_weights(m, tmp_path / "bert")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "text.proj.weight" in trainable and not any(n.startswith("text.encoder") for n in trainable)
    ids = torch.tensor([[1, 5, 6, 2]])
    z = m.encode_text(ids, torch.ones_like(ids)).embeds
    assert z.shape == (1, 32)
    m.save_pretrained(tmp_path / "lit")
    m2 = CLIP.from_pretrained(tmp_path / "lit")
    assert torch.allclose(m2.encode_text(ids, torch.ones_like(ids)).embeds, z.detach(), atol=1e-6)
