"""`genvl sample --method ar` and `genvl caption` on a tiny random token-LM model directory."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genvl.checkpoint import save_model_dir
from genvl.cli import main
from genvl.models.clip import CLIP, clip_config
from genvl.models.lm import TokenLM, lm_config
from genvl.sampling.io import read_png_metadata
from stub_vq import StubVQ, StubVQConfig, tiny_tokenizer

Q = ["--no-progress"]


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    vq = StubVQ(StubVQConfig(image_size=16, latent_size=4, codebook_size=27))
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=27, image_tokens=16, text_len=12))
    d = tmp_path_factory.mktemp("ar") / "model"
    save_model_dir(d, {"vqvae": vq, "lm": lm}, tokenizer=tok)
    return d


def _pixels(p):
    return np.asarray(Image.open(p).convert("RGB"))


def _run(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_ar_writes_pngs_with_settings_and_seeds(ar_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sample", "--method", "ar", "a red circle", "--model", str(ar_dir), "--out", str(out), "--num-images", "2",
            "--seed", "7", "--temperature", "0.9", "--top-k", "10", "--top-p", "0.95", *Q]
    code, stdout, _ = _run(args, capsys)
    paths = stdout.split()
    assert code == 0 and len(paths) == 2 and all(p.endswith(".png") for p in paths)
    assert Image.open(paths[0]).size == (16, 16)
    meta = read_png_metadata(paths[0])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 7 and meta["method"] == "ar"
    assert meta["temperature"] == 0.9 and meta["top_k"] == 10 and meta["top_p"] == 0.95
    assert meta["guidance"] == 3.0 and meta["model"] == str(ar_dir)
    with Image.open(paths[0]) as im:
        assert im.text["prompt"] == "a red circle"  # also a plain text chunk per key
    code, again, _ = _run(args, capsys)
    again = again.split()
    assert code == 0 and set(again).isdisjoint(paths)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(paths, again))  # same seed, same images
    code, other, _ = _run([*args[:-9], "--seed", "8", *args[-7:]], capsys)
    assert code == 0 and not np.array_equal(_pixels(paths[0]), _pixels(other.split()[0]))


def test_sample_ar_grid_and_png_path(ar_dir, tmp_path, capsys):
    target = tmp_path / "g.png"
    code, stdout, _ = _run(["sample", "--method", "ar", "a blue square", "--model", str(ar_dir), "--out", str(target),
                            "--num-images", "3", *Q], capsys)
    assert code == 0 and stdout.strip() == str(target)
    assert Image.open(target).size == (3 * 16 + 4 * 2, 16 + 4)
    code, stdout, _ = _run(["sample", "--method", "ar", "a blue square", "--model", str(ar_dir), "--out",
                            str(tmp_path / "grid"), "--num-images", "2", "--grid", *Q], capsys)
    assert code == 0 and len(stdout.split()) == 1 and "grid" in stdout


def test_caption_prints_path_tab_caption(ar_dir, tmp_path, capsys):
    paths = []
    for i, color in enumerate([(220, 30, 30), (30, 60, 220)]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (24, 24), color).save(p)
        paths.append(str(p))
    code, stdout, _ = _run(["caption", *paths, "--model", str(ar_dir), "--max-tokens", "6"], capsys)
    lines = stdout.rstrip("\n").split("\n")
    assert code == 0 and len(lines) == 2
    assert [ln.split("\t")[0] for ln in lines] == paths and all(ln.count("\t") == 1 for ln in lines)
    code, again, _ = _run(["caption", *paths, "--model", str(ar_dir), "--max-tokens", "6"], capsys)
    assert again == stdout  # greedy by default
    code, s1, _ = _run(["caption", *paths, "--model", str(ar_dir), "--temperature", "1", "--seed", "3",
                        "--batch-size", "1"], capsys)
    code, s2, _ = _run(["caption", *paths, "--model", str(ar_dir), "--temperature", "1", "--seed", "3",
                        "--batch-size", "1"], capsys)
    assert code == 0 and s1 == s2


@pytest.mark.parametrize("extra,needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "-1"], "top-k"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--guidance", "-1"], "guidance"),
    (["--size", "32"], "this model generates 16 px"),
    (["--variations", "x.png"], "--method unclip"),
])
def test_bad_ar_sampling_input_one_line(ar_dir, tmp_path, capsys, extra, needle):
    code, _, err = _run(["sample", "--method", "ar", "a red circle", "--model", str(ar_dir), "--out", str(tmp_path),
                         *Q, *extra], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_empty_prompt_and_model_without_lm(ar_dir, tmp_path, capsys):
    code, _, err = _run(["sample", "--method", "ar", "  ", "--model", str(ar_dir), *Q], capsys)
    assert code == 2 and "prompt" in err and len(err.strip().splitlines()) == 1
    tok = tiny_tokenizer()
    clip_only = tmp_path / "clip_only"
    save_model_dir(clip_only, {"clip": CLIP(clip_config("tiny", text={"vocab_size": len(tok)}))}, tokenizer=tok)
    code, _, err = _run(["sample", "--method", "ar", "a red circle", "--model", str(clip_only), *Q], capsys)
    assert code == 2 and "has no lm, vqvae component, needed for --method ar" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(["caption", str(tmp_path / "x.png"), "--model", str(clip_only)], capsys)
    assert code == 2 and "image not found" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code, _, err = _run(["caption", str(tmp_path / "x.png"), "--model", str(clip_only)], capsys)
    assert code == 2 and "needed for captioning" in err and len(err.strip().splitlines()) == 1


def test_caption_bad_input_one_line(ar_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    code, _, err = _run(["caption", str(bad), "--model", str(ar_dir)], capsys)
    assert code == 2 and "cannot read image" in err and len(err.strip().splitlines()) == 1
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    for extra, needle in ((["--temperature", "-0.5"], "temperature"), (["--top-k", "-2"], "top-k"),
                          (["--top-p", "2"], "top-p"), (["--max-tokens", "0"], "positive integer")):
        code, _, err = _run(["caption", str(good), "--model", str(ar_dir), *extra], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_incomplete_ar_directory(ar_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ar_dir, broken)
    (broken / "lm" / "model.safetensors").unlink()
    code, _, err = _run(["sample", "--method", "ar", "a red circle", "--model", str(broken), *Q], capsys)
    assert code == 2 and "lm" in err and len(err.strip().splitlines()) == 1
    meta = json.loads((ar_dir / "genvl.json").read_text())
    assert set(meta["components"]) == {"vqvae", "lm"}
