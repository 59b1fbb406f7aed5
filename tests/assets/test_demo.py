"""The built-in demo model (genvl/assets/demo) and the script that packages it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genvl.checkpoint import BUILTIN, open_model_dir, save_model_dir
from genvl.cli import main
from genvl.sampling.io import read_png_metadata

ROOT = Path(__file__).resolve().parents[2]
DEMO = BUILTIN["demo"]
needs_demo = pytest.mark.skipif(not (DEMO / "genvl.json").is_file(), reason="no built-in demo in this checkout")


@needs_demo
def test_demo_is_complete_small_and_documented():
    md = open_model_dir("demo")
    assert md.path == DEMO
    for name in ("clip", "prior", "decoder"):
        assert md.has(name) and md.component_kind(name) == "full"
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"the demo takes {size / 2**20:.1f} MB"
    card = md.card
    for needle in ("genvl train clip", "genvl train prior", "genvl train decoder", "hardware", "## Metrics",
                   "prompt_retrieval_accuracy", "clip_score", "fd_clip"):
        assert needle in card, needle


@needs_demo
def test_default_sample_uses_the_demo(tmp_path, capsys):
    out = tmp_path / "s.png"
    args = ["sample", "a red heart", "--out", str(out), "--num-images", "1", "--steps", "4", "--prior-steps", "4",
            "--seed", "5", "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = read_png_metadata(out)
    assert meta["model"] == str(DEMO) and meta["prompt"] == "a red heart"
    pixels = np.asarray(Image.open(out).convert("RGB"))
    md = open_model_dir(DEMO)
    base = md.load("decoder").config.image_size
    size = md.load("sr").config.image_size if md.has("sr") else base
    assert size >= 64  # the default picture goes through the upsampler
    assert pixels.shape == (size, size, 3) and pixels.std() > 5  # an image, not a flat colour
    small = tmp_path / "base.png"  # the decoder's own size stays available
    assert main(args[:3] + [str(small)] + args[4:] + ["--size", str(base)]) == 0
    assert np.asarray(Image.open(small).convert("RGB")).shape == (base, base, 3)


def _tiny_run(path: Path, names: tuple[str, ...], tok) -> None:
    from genvl.models.clip import CLIP, clip_config
    from genvl.models.decoder import Decoder, decoder_config
    from genvl.models.superres import SuperRes, superres_config
    from genvl.models.prior import DiffusionPrior, prior_config

    make = {
        "clip": lambda: CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8,
                                                       "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})),
        "prior": lambda: DiffusionPrior(prior_config("tiny", embed_dim=32, text_width=32, text_len=8)),
        "decoder": lambda: Decoder(decoder_config("tiny", image_size=16)),
        "sr": lambda: SuperRes(superres_config("tiny", image_size=32, low_res_size=16)),
    }
    save_model_dir(path, {n: make[n]() for n in names}, tokenizer=tok)


def test_package_demo_script(tmp_path):
    from genvl.tokenizers.text import train_text_tokenizer

    torch.manual_seed(0)
    tok = train_text_tokenizer(["a red heart", "a cat face"] * 5, vocab_size=300, model_max_length=8)
    run, extra = tmp_path / "run", tmp_path / "extra"
    _tiny_run(run, ("clip", "prior", "decoder"), tok)
    (run / "train").mkdir()
    (run / "train" / "big.bin").write_bytes(b"0" * 1000)  # training leftovers stay behind
    _tiny_run(extra, ("clip", "sr"), tok)  # shares the tokenizer; its clip is skipped (the run has one)
    dest = tmp_path / "demo"
    script = ROOT / "scripts" / "package_demo.py"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red heart\na cat face\n")
    meta = json.loads((run / "genvl.json").read_text())
    meta["sampling"] = {"steps": 3, "prior_steps": 2}
    (run / "genvl.json").write_text(json.dumps(meta))
    res = subprocess.run([sys.executable, str(script), str(run), str(dest), "--extra", str(extra), "--half",
                          "--grid", str(prompts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not (dest / "train").exists() and (dest / "README.md").is_file()
    md = open_model_dir(dest)
    assert set(md.components) == {"clip", "prior", "decoder", "sr"}
    full, half = open_model_dir(run).load("decoder"), md.load("decoder")
    for k, v in full.state_dict().items():  # float16 storage, float32 again after loading
        assert half.state_dict()[k].dtype == v.dtype
        torch.testing.assert_close(half.state_dict()[k], v, atol=1e-3, rtol=1e-3)
    assert "built-in demo" in md.card and "at 32 px (a 16 px decoder, then a" in md.card
    with Image.open(dest / "samples.png") as im:  # 2 prompts x 4 images at the upsampler's 32 px
        assert im.size[0] >= 4 * 32 and 2 * 32 <= im.size[1] < 3 * 32
    assert "at the default 32 px" in md.card

    other = tmp_path / "other"  # another tokenizer cannot join
    _tiny_run(other, ("clip",), train_text_tokenizer(["x y z"] * 5, vocab_size=280, model_max_length=8))
    res = subprocess.run([sys.executable, str(script), str(run), str(tmp_path / "d2"), "--extra", str(other)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "tokenizer differs" in res.stderr


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_demo_history_follows_init_chains(tmp_path):
    """A decoder trained in three runs (each --init the one before) lists all three parts in order,
    from a chain of run directories and from an already packaged directory alike."""
    from genvl.checkpoint import write_meta

    pkg = _load_script("package_demo")

    def run_dir(name, training):
        write_meta(tmp_path / name, {"format": "genvl-model", "components": {"decoder": "x"}, "training": training})
        return str(tmp_path / name)

    clip_rec = {"steps": 7, "init": str(tmp_path / "a")}  # trained in a's own run, then carried along
    a = run_dir("a", {"clip": clip_rec, "decoder": {"steps": 1}})
    b = run_dir("b", {"clip": clip_rec, "decoder": {"steps": 2, "init": a}})
    last = {"steps": 3, "init": b}
    hist = pkg._with_history("decoder", last)
    assert list(hist) == ["decoder, first part", "decoder, second part", "decoder"]
    assert [r["steps"] for r in hist.values()] == [1, 2, 3]
    # the clip was carried along unchanged: one record, no parts
    assert list(pkg._with_history("clip", dict(clip_rec))) == ["clip"]
    # a packaged directory lists its earlier parts itself
    packaged = run_dir("pkg", {"decoder, first part": {"steps": 1}, "decoder": {"steps": 2, "init": a}})
    hist = pkg._with_history("decoder", {"steps": 3, "init": packaged})
    assert [r["steps"] for r in hist.values()] == [1, 2, 3]
    # fresh: built new, the init's decoder is not its history
    assert list(pkg._with_history("decoder", {"steps": 3, "init": b, "fresh": True})) == ["decoder"]


def test_package_demo_keeps_measurements_of_carried_components(tmp_path):
    """A component the run holds with the extra's very weights keeps the extra's measurement; changed
    weights lose it."""
    import shutil

    from genvl.checkpoint import read_meta, write_meta
    from genvl.tokenizers.text import train_text_tokenizer

    tok = train_text_tokenizer(["a red heart", "a cat face"] * 5, vocab_size=300, model_max_length=8)
    run, extra = tmp_path / "run", tmp_path / "extra"
    torch.manual_seed(0)
    _tiny_run(run, ("clip", "prior", "decoder"), tok)
    shutil.copytree(run, extra)
    for d in (run, extra):  # a "vqvae" stand-in, carried along unchanged into the run
        meta = read_meta(d)
        meta["components"]["vqvae"] = meta["components"]["clip"]
        if d == extra:
            meta["metrics"] = {"reconstruction": {"values": {"psnr": 30.0}}}
        write_meta(d, meta)
        shutil.copytree(run / "clip", d / "vqvae", dirs_exist_ok=True)
    script = ROOT / "scripts" / "package_demo.py"

    def package(dest):
        res = subprocess.run([sys.executable, str(script), str(run), str(dest), "--extra", str(extra)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return read_meta(dest).get("metrics", {})

    assert package(tmp_path / "d1")["reconstruction"]["values"]["psnr"] == 30.0
    _tiny_run(tmp_path / "other", ("clip",), tok)  # other weights for the run's vqvae
    shutil.copytree(tmp_path / "other" / "clip", run / "vqvae", dirs_exist_ok=True)
    assert "reconstruction" not in package(tmp_path / "d2")
