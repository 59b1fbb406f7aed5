"""The VQ-VAE on the command line: train vqvae -> data tokenize (read back with load_tokenized) ->
evaluate reconstruction (printed and recorded in the model card); one-line errors."""

import json

import pytest
import torch
from safetensors import safe_open

from genvl.checkpoint import open_model_dir
from genvl.cli import main
from genvl.data import load_tokenized, open_image_text, read_tokenized
from genvl.errors import DataError

TRAIN = ["--set", "max_steps=3", "--set", "batch_size=8", "--set", "data.image_size=16", "--set", "tracker=none",
         "--set", "save_every=0", "--no-progress"]


@pytest.fixture
def vq_dir(shapes_dir, tmp_path):
    out = tmp_path / "vq"
    assert main(["train", "vqvae", "--data", str(shapes_dir), "--out", str(out), *TRAIN]) == 0
    return out


def test_tokenize_round_trip_equals_encode(vq_dir, shapes_dir, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "codes" / "shapes.safetensors"
    assert main(["data", "tokenize", str(shapes_dir), "--model", str(vq_dir), "--out", str(out), "--batch-size", "7",
                 "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "32 images" in msg and "4x4 codes" in msg
    assert (tmp_path / "codes" / "shapes.jsonl").is_file()
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("codes").dtype == torch.int16  # 64 codes fit int16
        assert f.metadata()["codebook_size"] == "64" and len(f.metadata()["vqvae_sha256"]) == 64

    codes, captions = load_tokenized(out)
    vq = open_model_dir(vq_dir).load("vqvae")
    ds = open_image_text(shapes_dir, image_size=16)
    px = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    assert codes.dtype == torch.long and torch.equal(codes, vq.encode(px))
    assert captions == ds.captions
    ts = read_tokenized(out)
    assert ts.file_names == [ds.image_name(i) for i in range(len(ds))]
    assert ts.meta["model"] == str(vq_dir) and ts.meta["latent_size"] == "4"

    # the two files must agree
    side = tmp_path / "codes" / "shapes.jsonl"
    side.write_text("".join(side.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(DataError, match="31 captions"):
        load_tokenized(out)
    side.unlink()
    with pytest.raises(DataError, match="missing"):
        load_tokenized(out)


def test_evaluate_reconstruction_prints_and_records(vq_dir, shapes_dir, tmp_path, capsys):
    capsys.readouterr()
    js = tmp_path / "r.json"
    assert main(["evaluate", "reconstruction", "--model", str(vq_dir), "--data", str(shapes_dir), "--limit", "8",
                 "--json", str(js), "--record", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "reconstruction on 8 images" in table
    for key in ("psnr", "codebook_usage", "perplexity"):
        assert key in table
    res = json.loads(js.read_text())
    assert res["n"] == 8 and 0 < res["metrics"]["psnr"] < 100
    recorded = json.loads((vq_dir / "genvl.json").read_text())["metrics"]["reconstruction"]
    assert recorded["values"] == res["metrics"] and recorded["n"] == 8
    assert "### reconstruction" in (vq_dir / "README.md").read_text()


def test_vqvae_commands_fail_with_one_line(vq_dir, shapes_dir, tmp_path, capsys):
    no_vq = tmp_path / "no_vq"
    no_vq.mkdir()
    (no_vq / "genvl.json").write_text(json.dumps({"format": "genvl-model", "components": {}}))
    cases = [
        (["data", "tokenize", str(shapes_dir), "--model", str(vq_dir), "--out", str(tmp_path / "c.bin")],
         ".safetensors"),
        (["data", "tokenize", str(shapes_dir), "--model", str(no_vq), "--out", str(tmp_path / "c.safetensors")],
         "has no vqvae"),
        (["data", "tokenize", str(tmp_path / "missing"), "--model", str(vq_dir),
          "--out", str(tmp_path / "c.safetensors")], "not found"),
        (["evaluate", "reconstruction", "--model", str(vq_dir)], "needs --data"),
        (["evaluate", "reconstruction", "--model", str(no_vq), "--data", str(shapes_dir)], "has no vqvae"),
        (["train", "vqvae", "--data", str(shapes_dir), "--out", str(tmp_path / "o"), "--set", "model.codebook_size=1",
          "--no-progress"], "codebook_size"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv + ["--no-progress"] if argv[0] != "train" else argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
