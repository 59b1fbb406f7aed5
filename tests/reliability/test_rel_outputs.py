"""Outputs are never overwritten. ``--out FILE.png`` / ``FILE.gif`` that exists: the new image takes the
next free name (printed), also when two processes name the same file at once; ``--overwrite`` replaces
it. ``--json FILE`` that exists, a tokenizer or a tokenized set already there: a one-line error before
any work, unless ``--overwrite``."""

import contextlib
import hashlib
import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from genvl.cli import main
from genvl.sampling.io import read_png_metadata, write_new_file
from rel_helpers import build_tiny_model, spawn, wait

FAST = ["--steps", "1", "--prior-steps", "1", "--num-images", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model")


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - t


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(code, err) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def test_out_png_that_exists_gets_a_new_name(model_dir, tmp_path):
    target = tmp_path / "a.png"
    code, out, err, _ = run(["sample", "a red circle", "--model", str(model_dir), "--out", str(target), *FAST])
    assert code == 0 and out.split() == [str(target)], err
    first = digest(target)
    code, out, _, _ = run(["sample", "a red circle", "--model", str(model_dir), "--out", str(target), *FAST,
                           "--seed", "1"])
    assert code == 0 and out.split() == [str(tmp_path / "a-1.png")]  # printed: where the image went
    assert digest(target) == first and read_png_metadata(tmp_path / "a-1.png")["seed"] == 1
    code, out, _, _ = run(["sample", "a red circle", "--model", str(model_dir), "--out", str(target), *FAST,
                           "--seed", "2", "--overwrite"])
    assert code == 0 and out.split() == [str(target)] and read_png_metadata(target)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.png", "a.png"]  # no temporary files left


def test_two_processes_writing_the_same_out_png_keep_both(model_dir, tmp_path):
    target, go = tmp_path / "same.png", tmp_path / "go"
    procs = []
    for steps in (1, 2):
        argv = ["sample", "a red circle", "--model", str(model_dir), "--out", str(target), "--steps", str(steps),
                "--prior-steps", "1", "--num-images", "1", "--no-progress"]
        procs.append(spawn("sample", tmp_path / f"s{steps}.log", argv=argv, go=str(go)))
    go.touch()  # both start at once
    for p, steps in zip(procs, (1, 2)):
        assert wait(p, timeout=60) == 0, (tmp_path / f"s{steps}.log.err").read_text()[-2000:]
    written = {steps: (tmp_path / f"s{steps}.log").read_text().split() for steps in (1, 2)}
    assert sorted(p for paths in written.values() for p in paths) == sorted([str(target), str(tmp_path / "same-1.png")])
    for steps, (path,) in written.items():
        assert read_png_metadata(path)["steps"] == steps  # each file holds its own process's image
        Image.open(path).verify()


def test_gif_that_exists_gets_a_new_name(model_dir, tmp_path):
    target = tmp_path / "anim.gif"
    argv = ["sample", "--interpolate", "a red circle", "a blue square", "--frames", "2", "--model", str(model_dir),
            "--out", str(target), "--steps", "1", "--prior-steps", "1", "--no-progress"]
    code, out, err, _ = run(argv)
    assert code == 0 and out.split() == [str(target), str(tmp_path / "anim-strip.png")], err
    first = digest(target)
    code, out, _, _ = run(argv)
    assert code == 0 and out.split() == [str(tmp_path / "anim-1.gif"), str(tmp_path / "anim-1-strip.png")]
    assert digest(target) == first and Image.open(tmp_path / "anim-1.gif").n_frames == 2


def test_json_that_exists_is_an_error_before_any_work(model_dir, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    js = tmp_path / "r.json"
    js.write_text("precious\n")
    argv = ["classify", str(image), "--model", str(model_dir), "--classes", "a red circle,a blue square", "--json",
            str(js)]
    code, _, err, seconds = run(argv)
    line = one_error(code, err)
    assert "r.json: the file exists" in line and "--overwrite" in line
    assert js.read_text() == "precious\n" and seconds < 2  # refused before the model loads
    for cmd in (["evaluate", "retrieval", "--model", str(model_dir), "--data", str(tmp_path), "--json", str(js)],
                ["evaluate", "generation", "--model", str(model_dir), "--prompts", str(js), "--json", str(js)]):
        assert "the file exists" in one_error(*run(cmd)[:3:2])
    code, _, err, _ = run([*argv, "--overwrite"])
    assert code == 0, err
    assert js.read_text().startswith("{") and '"results"' in js.read_text()


def test_json_written_meanwhile_by_another_run_is_kept(tmp_path):
    js = tmp_path / "r.json"
    results, barrier = [], threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            write_new_file(js, f"writer {i}\n".encode())
            results.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and js.read_text() == f"writer {results[0]}\n"  # one whole file, never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary files left
    write_new_file(js, b"replaced\n", overwrite=True)
    assert js.read_text() == "replaced\n"


def test_tokenizer_and_tokenized_set_are_not_replaced(model_dir, tmp_path, shapes_dir):
    out = tmp_path / "tok"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    code, _, err, seconds = run(["train", "tokenizer", "--data", str(shapes_dir), "--out", str(out), "--no-progress"])
    assert "already exists; use --overwrite" in one_error(code, err) and seconds < 2
    assert (out / "tokenizer" / "tokenizer.json").read_text() == "{}"
    codes = tmp_path / "codes.safetensors"
    codes.write_bytes(b"x")
    code, _, err, _ = run(["data", "tokenize", str(shapes_dir), "--model", str(model_dir), "--out", str(codes),
                           "--no-progress"])
    assert "already exists; use --overwrite" in one_error(code, err) and codes.read_bytes() == b"x"
