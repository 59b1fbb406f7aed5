"""`genvl sample` end to end on a tiny random model directory: files, metadata, seeds, modes, errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genvl.checkpoint import save_model_dir
from genvl.cli import main
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.superres import SuperRes, superres_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.sampling.io import read_png_metadata
from genvl.tokenizers.text import train_text_tokenizer

FAST = ["--steps", "3", "--prior-steps", "3", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_text_tokenizer(["a red heart", "a cat face", "a slice of pizza"] * 5, vocab_size=300, model_max_length=8)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    prior = DiffusionPrior(prior_config("tiny", embed_dim=32, text_width=32, text_len=8))
    decoder = Decoder(decoder_config("tiny", image_size=16))
    sr = SuperRes(superres_config("tiny"))
    d = tmp_path_factory.mktemp("m") / "model"
    save_model_dir(d, {"clip": clip, "prior": prior, "decoder": decoder, "sr": sr}, tokenizer=tok)
    return d


def _pixels(p):
    return np.asarray(Image.open(p).convert("RGB"))


def test_prompt_to_pngs_with_metadata_and_seeds(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "a red heart", "--model", str(model_dir), "--out", str(out), "--num-images", "2",
                 "--seed", "7", *FAST]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    im = Image.open(paths[0])
    assert im.size == (32, 32)  # decoder 16 px -> super-resolution 32 px
    meta = read_png_metadata(paths[0])
    assert meta["prompt"] == "a red heart" and meta["seed"] == 7 and meta["steps"] == 3
    assert meta["scheduler"] == "ddim" and meta["guidance"] == 3.0 and meta["model"] == str(model_dir)
    # same seed -> same image, written beside the first ones without overwriting them
    assert main(["sample", "a red heart", "--model", str(model_dir), "--out", str(out), "--num-images", "2",
                 "--seed", "7", *FAST]) == 0
    again = capsys.readouterr().out.split()
    assert set(again).isdisjoint(paths) and len(list(out.glob("*.png"))) == 4
    assert np.array_equal(_pixels(paths[0]), _pixels(again[0]))
    assert main(["sample", "a red heart", "--model", str(model_dir), "--out", str(out), "--num-images", "1",
                 "--seed", "8", *FAST]) == 0
    other = capsys.readouterr().out.split()
    assert not np.array_equal(_pixels(paths[0]), _pixels(other[0]))


def test_model_directory_recommends_sampling_settings(model_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    meta = json.loads((d / "genvl.json").read_text())
    meta["sampling"] = {"steps": 2, "prior_steps": 2, "guidance": 1.5, "scheduler": "dpm++"}
    (d / "genvl.json").write_text(json.dumps(meta))
    assert main(["sample", "a red heart", "--model", str(d), "--out", str(tmp_path / "a.png"), "--num-images", "1",
                 "--no-progress"]) == 0
    got = read_png_metadata(tmp_path / "a.png")
    assert (got["steps"], got["prior_steps"], got["guidance"], got["scheduler"]) == (2, 2, 1.5, "dpm++")
    assert got["prior_guidance"] == 4.0  # not recommended by the model: the global default
    assert main(["sample", "a red heart", "--model", str(d), "--out", str(tmp_path / "b.png"), "--num-images", "1",
                 "--steps", "3", "--scheduler", "ddim", "--no-progress"]) == 0  # the command line wins
    got = read_png_metadata(tmp_path / "b.png")
    assert (got["steps"], got["scheduler"], got["guidance"]) == (3, "ddim", 1.5)
    capsys.readouterr()


def test_sr_steps_from_the_model_and_the_command_line(model_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    meta = json.loads((d / "genvl.json").read_text())
    meta["sampling"] = {"sr_steps": 2}
    (d / "genvl.json").write_text(json.dumps(meta))
    base = ["sample", "a red heart", "--model", str(d), "--num-images", "1", "--seed", "3", *FAST]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert read_png_metadata(tmp_path / "a.png")["sr_steps"] == 2
    assert main([*base, "--out", str(tmp_path / "b.png"), "--sr-steps", "4"]) == 0  # the command line wins
    assert read_png_metadata(tmp_path / "b.png")["sr_steps"] == 4
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert main([*base, "--out", str(tmp_path / "c.png"), "--sr-steps", "4", "--size", "16"]) == 0
    assert "sr_steps" not in read_png_metadata(tmp_path / "c.png")  # no super-resolution ran
    with pytest.raises(SystemExit) as bad:
        main([*base, "--out", str(tmp_path / "d.png"), "--sr-steps", "0"])
    assert bad.value.code == 2 and "--sr-steps: expected a positive integer" in capsys.readouterr().err


def test_the_command_lets_idle_openmp_threads_sleep_when_others_run(tmp_path):
    from genvl.cli import others_running, passive_omp_waits

    env: dict[str, str] = {}
    assert passive_omp_waits(env, {}, busy=lambda: True) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert not passive_omp_waits(env, {}, busy=lambda: False) and env == {}  # an idle machine: libgomp's default
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not passive_omp_waits(env, {}, busy=lambda: True) and env == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's
    env = {}
    assert not passive_omp_waits(env, {"torch": object()}, busy=lambda: True) and env == {}  # too late for libgomp
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.10 2.50 1.90 3/250 4242\n")  # this process and two others runnable
    assert others_running(str(loadavg), interval_s=0)
    loadavg.write_text("3.10 2.50 1.90 1/250 4242\n")  # only this process: a busy minute that has passed
    assert not others_running(str(loadavg), interval_s=0)
    assert not others_running(str(tmp_path / "absent"), interval_s=0)
    # the command's module loads none of the heavy libraries, so main() runs before torch does
    import subprocess
    import sys

    probe = ("import sys, contextlib, io, genvl.cli; heavy = ('torch', 'diffusers', 'transformers')\n"
             "print([m for m in heavy if m in sys.modules])\n"
             "for cmd in ('sample', 'classify', 'evaluate', 'train', 'data', 'export', 'info', 'ui'):\n"
             "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "        genvl.cli.main([cmd, '--help'])\n"
             "print([m for m in heavy if m in sys.modules])")  # help (the parser) loads no model library, nor torch
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env, cwd=root)
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["[]", "[]"], (done.stdout, done.stderr)


def test_grid_size_and_png_path(model_dir, tmp_path, capsys):
    target = tmp_path / "g.png"
    assert main(["sample", "a cat face", "--model", str(model_dir), "--out", str(target), "--num-images", "3",
                 "--size", "16", *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    w, h = Image.open(target).size
    assert h == 16 + 4 and w == 3 * 16 + 4 * 2  # one row of three 16-px images, 2-px padding (no super-res)
    assert read_png_metadata(target)["num_images"] == 3


def test_variations_and_interpolation(model_dir, tmp_path, capsys):
    src = tmp_path / "src.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(src)
    assert main(["sample", "--variations", str(src), "--model", str(model_dir), "--out", str(tmp_path / "v"),
                 "--num-images", "2", *FAST]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    assert main(["sample", "--interpolate", "a red heart", str(src), "--frames", "3", "--model", str(model_dir),
                 "--out", str(tmp_path / "i"), *FAST]) == 0
    gif, strip = capsys.readouterr().out.split()
    with Image.open(gif) as g:
        assert g.n_frames == 3
    assert Image.open(strip).size[0] > Image.open(strip).size[1]


@pytest.mark.parametrize("extra,needle", [
    (["--size", "20"], "multiple of 8"),
    (["--size", "64"], "this model generates 16 px or 32 px"),
    (["--scheduler", "euler"], "unknown scheduler"),
    (["--guidance", "-1"], "guidance"),
    (["--prior-guidance", "-0.5"], "guidance"),
    (["--steps", "0"], "steps"),
    (["--prior-steps", "-2"], "steps"),
])
def test_bad_sampling_input_one_line(model_dir, tmp_path, capsys, extra, needle):
    try:  # argparse-level errors exit through SystemExit, checked values return 2
        code = main(["sample", "a cat face", "--model", str(model_dir), "--out", str(tmp_path), *FAST, *extra])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_empty_prompt_and_missing_model_one_line(model_dir, tmp_path, capsys):
    assert main(["sample", "   ", "--model", str(model_dir), "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "prompt" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "a cat face", "--model", str(tmp_path / "nope"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_incomplete_model_directory(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "decoder" / "model.safetensors").unlink()
    assert main(["sample", "a cat face", "--model", str(broken), *FAST]) == 2
    assert "decoder" in capsys.readouterr().err
    meta = json.loads((broken / "genvl.json").read_text())
    del meta["components"]["prior"]
    (broken / "genvl.json").write_text(json.dumps(meta))
    (broken / "decoder" / "model.safetensors").write_bytes((model_dir / "decoder" / "model.safetensors").read_bytes())
    assert main(["sample", "a cat face", "--model", str(broken), "--out", str(tmp_path), *FAST]) == 2
    assert "prior" in capsys.readouterr().err


def test_evaluate_generation_reports_and_records(model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import write_shapes_folder

    import genvl.sampling.unclip as unclip_mod

    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    meta = json.loads((m / "genvl.json").read_text())
    meta["sampling"] = {"sr_steps": 2}  # evaluated as genvl sample draws: the model's super-resolution steps
    (m / "genvl.json").write_text(json.dumps(meta))
    drawn = []
    real = unclip_mod.text_to_image
    monkeypatch.setattr(unclip_mod, "text_to_image", lambda *a, **kw: drawn.append(kw.get("sr_steps")) or real(*a, **kw))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red heart\na cat face\n\na red heart\na slice of pizza\n")
    ref = write_shapes_folder(tmp_path / "ref", size=16)
    js = tmp_path / "gen.json"
    assert main(["evaluate", "generation", "--model", str(m), "--prompts", str(prompts), "--data", str(ref),
                 "--num-images", "2", "--steps", "2", "--prior-steps", "2", "--json", str(js), "--record",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "clip_score" in out and "fd_clip" in out and "prompt_retrieval_accuracy" in out
    res = json.loads(js.read_text())
    assert res["prompts"] == ["a red heart", "a cat face", "a slice of pizza"] and res["num_images"] == 6
    assert 0 <= res["metrics"]["clip_score"] <= 100 and res["metrics"]["fd_clip"] >= 0
    assert js.with_suffix(".png").is_file()
    assert "generation" in json.loads((m / "genvl.json").read_text())["metrics"]
    assert drawn == [2, 2, 2] and res["settings"]["sr_steps"] == 2
    assert main(["evaluate", "generation", "--model", str(m), "--prompts", str(prompts), "--num-images", "1",
                 "--steps", "2", "--prior-steps", "2", "--sr-steps", "1", "--no-progress"]) == 0
    assert drawn[3:] == [1, 1, 1]  # the command line wins
    capsys.readouterr()
    one = tmp_path / "one.txt"
    one.write_text("a cat\n")
    assert main(["evaluate", "generation", "--model", str(m), "--prompts", str(one)]) == 2
    assert "at least two distinct prompts" in capsys.readouterr().err


def _heldout_folder(root, captions):
    root.mkdir(parents=True)
    for i, _ in enumerate(captions):
        Image.new("RGB", (20, 20), (50 * i, 200 - 30 * i, 90)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                 for i, c in enumerate(captions)))
    return root


def test_evaluate_generation_on_a_heldout_folder_groups_its_captions(model_dir, tmp_path, capsys):
    caps = ["a red heart", "a cat face", "a red heart", "a slice of pizza", "a cat face", "a red heart"]
    held = _heldout_folder(tmp_path / "held", caps)
    js = tmp_path / "held.json"
    assert main(["evaluate", "generation", "--model", str(model_dir), "--data", str(held), "--num-images", "1",
                 "--steps", "2", "--prior-steps", "2", "--json", str(js), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.rsplit(None, 1) for line in out.splitlines()[2:] if line and not line.startswith("samples"))
    assert rows["chance_prompt_retrieval"] == "33.33" and rows["prompts"] == "3" and rows["reference_images"] == "6"
    assert "fd_clip" in rows and "3 prompts (the distinct captions of" in out
    res = json.loads(js.read_text())
    assert res["prompts"] == ["a red heart", "a cat face", "a slice of pizza"] and res["num_images"] == 3
    assert res["image_prompt_index"] == [0, 1, 2] and res["prompt_source"] == "data"
    assert not (model_dir / "genvl.json").read_text().count('"generation"')  # no --record
    # bad input: one line, exit 2, before any sampling
    single = _heldout_folder(tmp_path / "single", ["a cat face"] * 3)
    for argv, needle in [([], "--data HELDOUT"), (["--data", str(held), "--max-prompts", "1"], "at least 2"),
                         (["--data", str(single)], "two distinct captions")]:
        assert main(["evaluate", "generation", "--model", str(model_dir), *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def coarse_dir(model_dir, tmp_path_factory):
    """The model directory with a decoder that has a coarse layout path, recommending coarse_start 0.5."""
    from genvl.checkpoint import open_model_dir

    md = open_model_dir(model_dir)
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("c") / "model"
    save_model_dir(d, {"clip": md.load("clip"), "prior": md.load("prior"),
                       "decoder": md.load("decoder").add_coarse(4, hidden=16)}, tokenizer=md.tokenizer())
    meta = json.loads((d / "genvl.json").read_text())
    meta["sampling"] = {"coarse_start": 0.5}
    (d / "genvl.json").write_text(json.dumps(meta))
    return d


def test_coarse_start_from_the_model_and_the_command_line(coarse_dir, tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    assert main(["sample", "a red heart", "--model", str(coarse_dir), "--out", str(a), "--num-images", "1", *FAST]) == 0
    assert read_png_metadata(a)["coarse_start"] == 0.5  # the model's recommendation
    assert main(["sample", "a red heart", "--model", str(coarse_dir), "--out", str(b), "--num-images", "1",
                 "--coarse-start", "1", *FAST]) == 0
    assert "coarse_start" not in read_png_metadata(b)  # from pure noise
    assert not np.array_equal(_pixels(a), _pixels(b))
    src = tmp_path / "src.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(src)
    # inverted noise sets the start itself: the recommendation does not apply, an explicit value is an error
    assert main(["sample", "--variations", str(src), "--invert", "--model", str(coarse_dir), "--out", str(c),
                 "--num-images", "1", *FAST]) == 0
    assert "coarse_start" not in read_png_metadata(c)
    capsys.readouterr()
    assert main(["sample", "--variations", str(src), "--invert", "--coarse-start", "0.5", "--model", str(coarse_dir),
                 "--out", str(tmp_path), *FAST]) == 2
    assert "do not go together" in capsys.readouterr().err


@pytest.mark.parametrize("value,needle", [("0", "must be in (0, 1]"), ("1.5", "must be in (0, 1]"),
                                          ("0.5", "no coarse layout path")])
def test_bad_coarse_start_one_line(model_dir, tmp_path, capsys, value, needle):
    assert main(["sample", "a cat face", "--model", str(model_dir), "--out", str(tmp_path), "--coarse-start", value,
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))
