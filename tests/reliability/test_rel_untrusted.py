"""Untrusted files: a pickle that runs code when loaded, planted wherever genvl reads weights or resume
state, is refused with a one-line error and never runs. The payload is live: loading it the unsafe
way (the control) does run it."""

import io
import pickle
import shutil

import pytest
import torch

from genvl.cli import main
from genvl.config import apply_overrides
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.trainer import stage_dir
from rel_helpers import TRAIN_SET, build_tiny_model, payload_bytes, small_shapes

SAMPLE = ["--steps", "1", "--prior-steps", "1", "--num-images", "1", "--no-progress"]


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_control_the_payload_runs_when_loaded_unsafely(tmp_path, marker, kind):
    data = payload_bytes(marker, kind)
    if kind == "torch":
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.read_text() == "payload ran"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model")


# where the payload goes in a copy of the model directory -> what the error names
MODEL_PLANTS = {
    "as clip/model.safetensors": (["clip/model.safetensors"], "clip/model.safetensors"),
    "as prior/pytorch_model.bin, safetensors removed": (["prior/pytorch_model.bin", "-prior/model.safetensors"],
                                                         "prior"),
    "as decoder/diffusion_pytorch_model.bin beside the safetensors": (["decoder/diffusion_pytorch_model.bin"], None),
}


@pytest.mark.parametrize("case", list(MODEL_PLANTS))
@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_payload_in_a_model_directory_never_runs(model_dir, tmp_path, marker, capsys, case, kind):
    plants, names = MODEL_PLANTS[case]
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    for p in plants:
        if p.startswith("-"):
            (d / p[1:]).unlink()
        else:
            (d / p).write_bytes(payload_bytes(marker, kind))
    code = main(["sample", "a red circle", "--model", str(d), "--out", str(tmp_path / "o"), *SAMPLE])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    if names is None:  # ignored: weights are read from model.safetensors only
        assert code == 0, err
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(d / names) in err, err


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r")
    data = small_shapes(root / "shapes")
    cfg = apply_overrides(TrainConfig(), TRAIN_SET + ["max_steps=4", "save_every=2"])
    train(CLIPTask(cfg), data, root / "run", progress=False, stop_after=2)
    return data, root / "run"


CHECKPOINT_PLANTS = {
    "optimizer.bin": ["optimizer.bin"],
    "scheduler.bin": ["scheduler.bin"],
    "random_states_0.pkl": ["random_states_0.pkl"],
    "pytorch_model.bin, safetensors removed": ["pytorch_model.bin", "-model.safetensors"],
    "custom_checkpoint_0.pkl": ["custom_checkpoint_0.pkl"],
    "ema.safetensors": ["ema.safetensors"],
}


@pytest.mark.parametrize("case", list(CHECKPOINT_PLANTS))
def test_payload_in_resume_state_never_runs(stopped_run, tmp_path, marker, capsys, case):
    data, run = stopped_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ck = stage_dir(out, "clip") / "checkpoints" / "step-00000002"
    for p in CHECKPOINT_PLANTS[case]:
        if p.startswith("-"):
            (ck / p[1:]).unlink()
        else:
            (ck / p).write_bytes(payload_bytes(marker, "torch"))
    code = main(["train", "clip", "--data", str(data), "--out", str(out), "--resume", "latest", "--no-progress"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(ck) in err, err
    assert "\x1b" not in err


def test_payload_as_huggingface_weights_never_runs(tmp_path, marker, capsys):
    """``model.from_hf=DIR`` (a transformers CLIP directory) holding pickled weights."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    hf = tmp_path / "hf"
    CLIPModel(HFConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=300, max_position_embeddings=16),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       projection_dim=16)).save_pretrained(hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(payload_bytes(marker, "torch"))
    data = small_shapes(tmp_path / "shapes")
    capsys.readouterr()
    code = main(["train", "clip", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", f"model.from_hf={hf}", "--set", "max_steps=1", "--set", "batch_size=8"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(hf) in err, err


def test_payload_as_diffusers_weights_never_runs(tmp_path, marker):
    """A component of a diffusers directory (``genvl sample --model KANDINSKY_DIR``) holding pickled weights."""
    from diffusers import PriorTransformer

    from genvl.errors import ModelDirError
    from genvl.sampling.external import _load_component

    comp = tmp_path / "pipe" / "prior"
    PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                     num_embeddings=4, additional_embeddings=4).save_pretrained(comp)
    for f in comp.glob("*.safetensors"):
        f.unlink()
    (comp / "diffusion_pytorch_model.bin").write_bytes(payload_bytes(marker, "torch"))
    with pytest.raises(ModelDirError, match="cannot load PriorTransformer") as e:
        _load_component(comp.parent, "prior", ["diffusers", "PriorTransformer"], None)
    assert not marker.exists(), "the planted pickle ran"
    assert str(comp) in str(e.value) and "\n" not in str(e.value)
