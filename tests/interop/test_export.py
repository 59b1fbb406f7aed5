"""genvl export: each exported component loads with its library's own from_pretrained and computes
what it computes inside genvl; LoRA adapters load with peft over the exported base."""

import json
import shutil

import pytest
import torch

from genvl.checkpoint import open_model_dir, save_adapter_component
from genvl.errors import ModelDirError
from genvl.export import export_model
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("export") / "model", sr=True)


def test_transformers_clip_and_lm_match(tiny, tmp_path):
    from transformers import CLIPModel, CLIPProcessor, LlamaForCausalLM

    rec = export_model(open_model_dir(tiny), "transformers", tmp_path / "hf")
    assert set(rec["components"]) == {"clip", "lm"}
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["format"] == "transformers"
    md = open_model_dir(tiny)
    clip, tok = md.load("clip"), md.tokenizer()
    hf = CLIPModel.from_pretrained(tmp_path / "hf" / "clip").eval()
    proc = CLIPProcessor.from_pretrained(tmp_path / "hf" / "clip")
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    batch = tok(["a red circle", "a blue square"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ours_img = clip.encode_image(pixels)
        ours_txt = clip.encode_text(batch["input_ids"], batch["attention_mask"]).embeds
        # the saved image processor normalises as genvl does ([-1, 1] -> [0, 1] -> CLIP mean/std)
        normed = proc.image_processor(images=list(((pixels + 1) / 2).clamp(0, 1)), do_rescale=False,
                                      do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
        theirs_img = hf.get_image_features(pixel_values=normed)
        theirs_txt = hf.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    theirs_img = getattr(theirs_img, "pooler_output", theirs_img)
    theirs_txt = getattr(theirs_txt, "pooler_output", theirs_txt)
    torch.testing.assert_close(torch.nn.functional.normalize(theirs_img, dim=-1), ours_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.nn.functional.normalize(theirs_txt, dim=-1), ours_txt, atol=1e-5, rtol=1e-4)
    assert torch.allclose(hf.logit_scale, clip.logit_scale)

    lm = md.load("lm")
    hf_lm = LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "lm").eval()
    ids = torch.randint(0, lm.config.vocab_size if hasattr(lm.config, "vocab_size") else 300, (2, 12), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf_lm(input_ids=ids).logits, lm(ids).logits, atol=1e-5, rtol=1e-4)
    layout = json.loads((tmp_path / "hf" / "export.json").read_text())["components"]["lm"]["layout"]
    assert layout["codebook_size"] == lm.layout.codebook_size


def test_diffusers_components_match(tiny, tmp_path):
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, VQModel

    md = open_model_dir(tiny)
    rec = export_model(md, "diffusers", tmp_path / "d")
    assert set(rec["components"]) == {"prior", "decoder", "sr", "vqvae"}
    g = torch.Generator().manual_seed(1)
    prior = md.load("prior")
    theirs = PriorTransformer.from_pretrained(tmp_path / "d" / "prior").eval()
    D, L = prior.config.embed_dim, 8
    x, z = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    states = torch.randn(2, L, prior.config.width, generator=g)
    mask = torch.ones(2, L, dtype=torch.bool)
    with torch.no_grad():
        a = prior.transformer(x, 5, proj_embedding=z, encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
        b = theirs(x, 5, proj_embedding=z, encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
    torch.testing.assert_close(a, b)

    dec = md.load("decoder")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "d" / "decoder").eval()
    c = dec.config
    sample = torch.randn(2, *dec.sample_shape, generator=g)
    tokens = torch.randn(2, c.num_image_tokens, c.cross_attention_dim, generator=g)
    labels = torch.randn(2, c.embed_dim, generator=g)
    with torch.no_grad():
        a = dec.unet(sample, 7, encoder_hidden_states=tokens, class_labels=labels).sample
        b = unet(sample, 7, encoder_hidden_states=tokens, class_labels=labels).sample
    torch.testing.assert_close(a, b)

    sr = md.load("sr")
    theirs_sr = UNet2DModel.from_pretrained(tmp_path / "d" / "sr").eval()
    xs = torch.randn(1, 6, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sr.unet(xs, 3, class_labels=torch.tensor([10])).sample,
                                   theirs_sr(xs, 3, class_labels=torch.tensor([10])).sample)

    vq = md.load("vqvae")
    theirs_vq = VQModel.from_pretrained(tmp_path / "d" / "vqvae").eval()
    pixels = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ours = vq.reconstruct(pixels)
        h = theirs_vq.encode(pixels).latents
        _, _, (_, _, idx) = theirs_vq.quantize(h)
        out = theirs_vq.decode(h).sample.clamp(-1, 1)
    assert torch.equal(idx.view(3, -1), vq.encode(pixels).view(3, -1))  # the same codes
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-4)


def test_peft_adapter_loads_over_the_exported_decoder(tiny, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from genvl.models.decoder import Decoder
    from genvl.models.lora import add_lora

    ft = tmp_path / "ft"
    shutil.copytree(tiny, ft)
    shutil.rmtree(ft / "decoder")
    dec = Decoder.from_pretrained(tiny / "decoder")
    add_lora(dec, rank=4)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for n, p in dec.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter_component(dec, ft / "decoder", base=tiny / "decoder", rank=4)
    md = open_model_dir(ft)
    assert md.component_kind("decoder") == "lora"
    merged = md.load("decoder")
    export_model(open_model_dir(tiny), "diffusers", tmp_path / "base", components=["decoder"])
    rec = export_model(md, "peft", tmp_path / "peft")
    assert set(rec["components"]) == {"decoder"}
    assert (tmp_path / "peft" / "decoder" / "adapter_config.json").is_file()
    base = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "decoder").eval()
    g = torch.Generator().manual_seed(2)
    c = merged.config
    sample = torch.randn(2, *merged.sample_shape, generator=g)
    tokens = torch.randn(2, c.num_image_tokens, c.cross_attention_dim, generator=g)
    labels = torch.randn(2, c.embed_dim, generator=g)
    with torch.no_grad():
        plain = base(sample, 7, encoder_hidden_states=tokens, class_labels=labels).sample
        adapted = PeftModel.from_pretrained(base, tmp_path / "peft" / "decoder").eval()
        theirs = adapted(sample, 7, encoder_hidden_states=tokens, class_labels=labels).sample
        ours = merged.unet(sample, 7, encoder_hidden_states=tokens, class_labels=labels).sample
    assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    # and back: the peft folder becomes a LoRA component over the base again
    from genvl.export import import_model

    back = import_model([tmp_path / "peft"], tmp_path / "back", base=tiny)
    assert back.component_kind("decoder") == "lora" and back.component_kind("clip") == "ref"
    for k, v in back.load("decoder").state_dict().items():
        torch.testing.assert_close(v, merged.state_dict()[k], atol=1e-6, rtol=1e-5)
    with pytest.raises(ModelDirError, match="--base"):
        import_model([tmp_path / "peft"], tmp_path / "back2")


def test_export_refuses_what_it_cannot_write(tiny, tmp_path):
    md = open_model_dir(tiny)
    with pytest.raises(ModelDirError, match="not exported --to diffusers.*--to transformers"):
        export_model(md, "diffusers", tmp_path / "a", components=["clip"])
    with pytest.raises(ModelDirError, match="unknown export format 'onnx'"):
        export_model(md, "onnx", tmp_path / "b")
    with pytest.raises(ModelDirError, match="LoRA adapters only"):
        export_model(md, "peft", tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ModelDirError, match="not an empty folder"):
        export_model(md, "transformers", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_genvl_folders_load_right_or_fail_in_other_libraries(tiny, tmp_path):
    """A genvl clip folder is also a transformers CLIPModel folder (same embeddings); the folders
    whose layout another library does not share fail there instead of loading random weights."""
    from diffusers import PriorTransformer, UNet2DConditionModel
    from transformers import CLIPModel, LlamaForCausalLM

    from genvl.models.clip import CLIP

    md = open_model_dir(tiny)
    clip = md.load("clip")
    hf = CLIPModel.from_pretrained(tiny / "clip").eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=clip._normalize_pixels(pixels))
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(torch.nn.functional.normalize(theirs, dim=-1), clip.encode_image(pixels))
    # a folder written with genvl's module names (before the CLIPModel layout) still loads in genvl
    old = tmp_path / "old"
    old.mkdir()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(old / "model.safetensors"))
    cfg = json.loads((tiny / "clip" / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: cfg[k] for k in ("_class", "embed_dim", "vision", "text", "loss")}))
    torch.testing.assert_close(CLIP.from_pretrained(old).encode_image(pixels), clip.encode_image(pixels))
    for cls, name in ((UNet2DConditionModel, "decoder"), (PriorTransformer, "prior"), (LlamaForCausalLM, "lm")):
        with pytest.raises((OSError, RuntimeError, ValueError)):
            cls.from_pretrained(tiny / name)


def test_exports_import_back_to_the_same_model_also_after_library_finetuning(tiny, tmp_path):
    """genvl import rebuilds every exported component bit for bit; a weight changed in the library's
    folder (as a diffusers finetune would) comes back changed."""
    from diffusers import UNet2DConditionModel

    from genvl.cli import main

    md = open_model_dir(tiny)
    export_model(md, "diffusers", tmp_path / "d")
    export_model(md, "transformers", tmp_path / "t")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "d" / "decoder")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "d" / "decoder")
    assert main(["import", str(tmp_path / "d"), str(tmp_path / "t"), "--out", str(tmp_path / "back")]) == 0
    back = open_model_dir(tmp_path / "back")
    assert set(back.components) == {"clip", "lm", "prior", "decoder", "sr", "vqvae"}
    for name in back.components:
        ours, theirs = md.load(name).state_dict(), back.load(name).state_dict()
        assert ours.keys() == theirs.keys(), name
        changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert changed == (["unet.conv_out.bias"] if name == "decoder" else []), (name, changed[:3])
    assert back.tokenizer()("a red circle")["input_ids"] == md.tokenizer()("a red circle")["input_ids"]
    with pytest.raises(ModelDirError, match="not written by genvl export"):
        from genvl.export import import_component

        import_component(tmp_path)


def test_a_transformers_clip_folder_from_elsewhere_imports_as_the_clip_component(tmp_path):
    """genvl import of a plain CLIPModel folder (no genvl side files): the clip component computes
    what transformers computes, and the folder's tokenizer comes along; other foreign folders are
    refused with what is supported."""
    from genvl.cli import main
    from tests.conftest import save_tiny_hf_clip

    torch.manual_seed(0)
    hf, tok = save_tiny_hf_clip(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "g")]) == 0
    md = open_model_dir(tmp_path / "g")
    clip = md.load("clip")
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = hf.get_image_features(pixel_values=clip._normalize_pixels(px))
    feats = getattr(feats, "pooler_output", feats)
    assert torch.allclose(clip.encode_image(px), torch.nn.functional.normalize(feats, dim=-1), atol=1e-5)
    assert md.tokenizer()("a red shape")["input_ids"] == tok("a red shape")["input_ids"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert main(["import", str(tmp_path / "other"), "--out", str(tmp_path / "g2")]) == 2
