"""The command line as a user meets it: help, one-line errors, train -> evaluate -> classify."""

import json
import subprocess
import sys

import pytest

from genvl.cli import build_parser, main

SUBCOMMANDS = ["sample", "train", "caption", "classify", "evaluate", "data", "export", "import", "ui", "info"]
TRAIN = ["--set", "max_steps=40", "--set", "batch_size=16", "--set", "tokenizer_vocab=300", "--set", "text_len=8",
         "--set", "tracker=none", "--set", "lr=3e-3", "--no-progress"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: genvl {cmd}") and "--" in out or cmd == "data"


@pytest.mark.parametrize("argv,needle", [
    (["sample", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["sample", "x", "--steps", "0"], "positive integer"),
    (["sample", "x", "--seed", "abc"], "invalid int value"),
    (["train", "clip", "--data", "d"], "--out"),
    (["train", "nope", "--data", "d", "--out", "o"], "invalid choice"),
    (["classify", "img.png", "--method", "magic"], "invalid choice"),
    (["evaluate", "bogus", "--data", "d"], "invalid choice"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_values_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["sample", "  "], "empty prompt"),
        (["train", "clip", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"],
         "not found"),
        (["train", "clip", "--data", ".", "--out", str(tmp_path / "o"), "--set", "lr"], "key=value"),
        (["train", "interleaved", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"],
         "not found"),
        (["evaluate", "retrieval", "--model", str(tmp_path), "--data", "."], "not a genvl model directory"),
        (["classify", "x.png", "--model", str(tmp_path), "--classes", "a"], "at least two classes"),
        (["info", str(tmp_path / "nothing")], "not found"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err


def test_sample_without_model_says_so(capsys, tmp_path, monkeypatch):
    import genvl.runtime

    monkeypatch.setattr(genvl.runtime, "DEMO_DIR", tmp_path / "no-demo")  # an install without the demo
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "a corgi in a sushi house"]) == 0
    assert "no text-to-image model yet" in capsys.readouterr().err
    assert not (tmp_path / "samples").exists()  # nothing written


def test_train_evaluate_classify_info(shapes_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["train", "clip", "--data", str(shapes_dir), "--out", str(out), *TRAIN]) == 0
    assert "model directory" in capsys.readouterr().out
    # a second train into the same directory must not silently overwrite it
    assert main(["train", "clip", "--data", str(shapes_dir), "--out", str(out), *TRAIN]) == 2
    assert "already holds" in capsys.readouterr().err

    js = tmp_path / "r.json"
    assert main(["evaluate", "retrieval", "--model", str(out), "--data", str(shapes_dir), "--json", str(js),
                 "--no-progress"]) == 0
    assert "retrieval" not in json.loads((out / "genvl.json").read_text())["metrics"]  # only with --record
    assert main(["evaluate", "retrieval", "--model", str(out), "--data", str(shapes_dir), "--json", str(js),
                 "--overwrite", "--record", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "image_to_text_R@1" in table
    res = json.loads(js.read_text())
    assert res["n"] == 32 and 0 <= res["metrics"]["image_to_text_R@1"] <= 100
    assert "retrieval" in json.loads((out / "genvl.json").read_text())["metrics"]
    assert "image_to_text_R@1" in (out / "README.md").read_text()

    img = shapes_dir / "red_circle_0.png"
    cj = tmp_path / "c.json"
    assert main(["classify", str(img), str(shapes_dir / "blue_square_0.png"), "--model", str(out),
                 "--classes", "red circle,blue square,green cross", "--template", "a {}", "--json", str(cj)]) == 0
    text = capsys.readouterr().out
    assert "red_circle_0.png" in text and "%" in text
    rows = json.loads(cj.read_text())["results"]
    assert len(rows) == 2 and abs(sum(rows[0]["probs"].values()) - 1) < 1e-5

    assert main(["classify", str(tmp_path / "nope.png"), "--model", str(out), "--classes", "a,b"]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["classify", str(img), "--model", str(out), "--classes", "a,a"]) == 2
    assert "duplicate" in capsys.readouterr().err
    assert main(["classify", str(img), "--model", str(out), "--classes", "a,b", "--method", "diffusion"]) == 2

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "clip" in info and "40 steps" in info


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "genvl", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("genvl ")


def test_entry_points_and_old_names():
    r = subprocess.run([sys.executable, "-m", "genvl.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("genvl ")
    import genvl.cli

    assert callable(genvl.cli.main_entry)  # pyproject.toml: genvl = "genvl.cli:main_entry"
    assert genvl.cli.parse_budget("1h30m") == genvl.cli.parse_budget("90m") == 5400.0


def test_data_has_no_emoji_builder(capsys):
    """The demo's emoji set is built by scripts/emoji_set.py, not by the package."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["data", "emoji", "out"])
    assert e.value.code == 2 and "invalid choice: 'emoji'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "scripts/emoji_set.py" in capsys.readouterr().out

