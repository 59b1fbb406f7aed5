"""LoRA finetuning (peft) of the prior and decoder: only adapters train, the released directory holds
the adapter weights and references to the rest, and loading merges them into the same function."""

import json

import pytest
import torch

from genvl.checkpoint import open_model_dir
from genvl.config import apply_overrides
from genvl.errors import ConfigError, ModelDirError, TrainingError
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.lora import add_lora, apply_adapter, save_adapter
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.tasks.decoder import DecoderTask
from genvl.training.tasks.prior import PriorTask

FAST = ["batch_size=8", "max_steps=2", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def base_dir(shapes_dir, tmp_path):
    """clip + prior + decoder trained a couple of steps: the model a user would finetune."""
    out = tmp_path / "base"
    train(CLIPTask(cfg()), shapes_dir, out, progress=False)
    train(PriorTask(cfg()), shapes_dir, out, init=out, progress=False)
    train(DecoderTask(cfg("model.size=small", "data.image_size=16")), shapes_dir, out, init=out, progress=False)
    return out


def test_adapter_roundtrip_merges_to_the_same_function(tmp_path):
    torch.manual_seed(0)
    dec = Decoder(decoder_config("tiny", image_size=16, embed_dim=8)).eval()
    dec.save_pretrained(tmp_path / "base")
    add_lora(dec, rank=4)
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # lora_B starts at zero; make the adapter do something
        for n, p in dec.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8)
    with torch.no_grad():
        want = dec(x, t, z)
    save_adapter(tmp_path / "ft", dec, str(tmp_path / "base"), rank=4, alpha=None, targets=None)
    merged = apply_adapter(Decoder.from_pretrained(tmp_path / "base"), tmp_path / "ft")
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # plain layers after merging
    with torch.no_grad():
        got = merged(x, t, z)
        plain = Decoder.from_pretrained(tmp_path / "base")(x, t, z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapter changed the function


def test_bad_targets_name_the_layers():
    dec = Decoder(decoder_config("tiny", image_size=16, embed_dim=8))
    with pytest.raises(ConfigError, match="to_q"):
        add_lora(dec, rank=4, targets=["no_such_layer"])


def test_lora_decoder_finetune_is_small_and_loads(shapes_dir, base_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    base = open_model_dir(base_dir)
    before = base.load("decoder").state_dict()
    res = train(DecoderTask(cfg("data.image_size=16", "lora_rank=4", "lr=1e-2", "max_steps=3")), shapes_dir, out,
                init=base_dir, progress=False)
    assert res.step == 3
    # the decoder is an adapter; the untouched components are references, not copies
    assert sorted(p.name for p in (out / "decoder").iterdir()) == ["lora.json", "lora.safetensors"]
    for name in ("clip", "prior"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["ref.json"]
    assert _size(out) < 0.5 * _size(base_dir)
    meta = json.loads((out / "genvl.json").read_text())
    assert set(meta["components"]) == {"clip", "prior", "decoder"}
    assert "lora" in meta["training"]["decoder"]
    # its own card: the base by path and hash, only its own training, Hugging Face front matter
    assert meta["base"]["model"] == str(base_dir.resolve()) and len(meta["base"]["sha256"]) == 16
    assert set(meta["training"]) == {"decoder"}
    card = (out / "README.md").read_text()
    assert card.startswith(f"---\nlibrary_name: genvl\nbase_model: {base_dir.resolve()}\n")
    assert "## Training: decoder" in card and "## Training: clip" not in card
    from genvl.cli import main

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"finetuned from: {base_dir.resolve()}" in shown
    assert "LoRA adapter" in shown and str((base_dir / "decoder").resolve()) in shown

    md = open_model_dir(out)
    assert md.component_kind("decoder") == "lora" and md.component_kind("clip") == "ref"
    dec = md.load("decoder")
    changed = [k for k, v in dec.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(("to_" in k or "ff." in k) and k.endswith("weight") for k in changed), changed[:5]
    for k, v in md.load("clip").state_dict().items():
        assert torch.equal(v, base.load("clip").state_dict()[k])

    # the unCLIP pipeline samples from it like from any model directory
    from genvl.sampling.unclip import UnclipComponents, text_to_image

    result = text_to_image(UnclipComponents.from_model_dir(out), "a red circle", steps=2, prior_steps=2, seed=0)
    assert result.images.shape == (1, 3, 16, 16)

    # the prior (a reference to the base) gets its adapter in the same directory
    train(PriorTask(cfg("lora_rank=2")), shapes_dir, out, init=out, progress=False)
    assert sorted(p.name for p in (out / "prior").iterdir()) == ["lora.json", "lora.safetensors"]
    assert json.loads((out / "prior" / "lora.json").read_text())["base"] == str((base_dir / "prior").resolve())
    assert open_model_dir(out).load("prior") is not None
    # an adapter on top of an adapter stacks (in another directory); refs point at the real folders
    out2 = tmp_path / "ft2"
    train(DecoderTask(cfg("data.image_size=16", "lora_rank=2")), shapes_dir, out2, init=out, progress=False)
    assert json.loads((out2 / "decoder" / "lora.json").read_text())["base"] == str((out / "decoder").resolve())
    assert json.loads((out2 / "clip" / "ref.json").read_text())["base"] == str((base_dir / "clip").resolve())
    assert open_model_dir(out2).load("decoder") is not None
    # the base moving away is a one-line error
    base_dir.rename(tmp_path / "moved")
    with pytest.raises(ModelDirError, match="moved or was deleted"):
        open_model_dir(out)


def test_lora_needs_an_init_component(shapes_dir, base_dir, tmp_path):
    with pytest.raises(TrainingError, match="--init"):
        train(CLIPTask(cfg("lora_rank=4")), shapes_dir, tmp_path / "x", progress=False)
    with pytest.raises(TrainingError, match="another --out"):  # its base is the folder it would overwrite
        train(PriorTask(cfg("lora_rank=4")), shapes_dir, base_dir, init=base_dir, progress=False)
