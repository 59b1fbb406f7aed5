"""Concurrency: several ``genvl sample`` processes writing into one folder never overwrite each
other's files; two UI sessions generating at once (two threads sharing the loaded models, as the
streamlit server runs them) each get their own images."""

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genvl.sampling.io import read_png_metadata, reserve_path, save_png, to_pil_images
from rel_helpers import build_tiny_model, spawn, wait

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model")


def test_sample_processes_writing_one_folder_never_overwrite(model_dir, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    # Same prompt and seed, so every process wants the same file names; --steps tells them apart.
    steps = [1, 2, 3, 4]
    procs = []
    for s in steps:
        argv = ["sample", PROMPT, "--model", str(model_dir), "--out", str(out), "--num-images", "2", "--seed", "0",
                "--steps", str(s), "--prior-steps", "1", "--no-progress"]
        procs.append(spawn("sample", tmp_path / f"s{s}.log", argv=argv, go=str(go)))
    # and one more, whose prompt is longer than the text tower's context
    argv = ["sample", "a blue square " * 40, "--model", str(model_dir), "--out", str(out), "--num-images", "1",
            "--steps", "1", "--prior-steps", "1", "--no-progress"]
    procs.append(spawn("sample", tmp_path / "long.log", argv=argv, go=str(go)))
    go.touch()  # all start at once
    for p, name in zip(procs, [*(f"s{s}" for s in steps), "long"]):
        assert wait(p) == 0, (tmp_path / f"{name}.log.err").read_text()[-2000:]

    claimed = {}
    for s in steps:
        paths = (tmp_path / f"s{s}.log").read_text().split()
        assert len(paths) == 2
        for path in paths:
            assert path not in claimed, f"{path} written by steps={claimed[path]} and steps={s}"
            claimed[path] = s
            assert read_png_metadata(path)["steps"] == s  # the file holds this process's image
            Image.open(path).verify()
    (long_path,) = (tmp_path / "long.log").read_text().split()
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in [*claimed, long_path])  # no temp files
    (warning,) = (tmp_path / "long.log.err").read_text().splitlines()  # the user sees why the prompt was cut
    assert warning.startswith("genvl: warning: prompt 'a blue square a blue square") and "only the first 8" in warning


def test_reserve_path_race_between_processes(tmp_path):
    out, n = tmp_path / "out", 25
    procs = [spawn("reserve", tmp_path / f"r{i}.log", dir=str(out), stem="same", n=n, tag=f"writer-{i}")
             for i in range(4)]
    for p in procs:
        assert wait(p) == 0
    seen = {}
    for i in range(4):
        paths = (tmp_path / f"r{i}.log").read_text().split()
        assert len(paths) == n
        for path in paths:
            assert path not in seen
            seen[path] = i
    for path, i in seen.items():
        assert Path(path).read_text() == f"writer-{i}\n"  # written by its one owner only
    assert len(list(out.iterdir())) == 4 * n


def _pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _in_threads(fns):
    """Run the callables at the same moment in threads; return their results in order."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def body(i):
        try:
            barrier.wait()
            results[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_two_ui_sessions_generating_at_once_get_their_own_images(model_dir):
    A = pytest.importorskip("genvl.ui.actions")
    md = A.open_model(str(model_dir))
    method = A.METHODS["unclip"]
    parts = method.load(md, "cpu")  # the server loads them once and shares them between sessions
    settings = {**A.sample_defaults(md, "unclip"), "num_images": 2, "steps": 3, "prior_steps": 2}
    requests = [("a red circle", 1), ("a blue square", 2)]

    def session(prompt, seed, reports):
        tracker = A.StepTracker(lambda frac, text: reports.append(text))
        return A.generate(method, parts, md, prompt, {**settings, "seed": seed}, tracker)

    alone = [session(p, s, []) for p, s in requests]
    reports = [[], []]
    both = _in_threads([lambda i=i: session(*requests[i], reports[i]) for i in range(2)])
    for i, (prompt, seed) in enumerate(requests):
        assert [m["prompt"] for m in both[i].metas] == [prompt] * 2 and both[i].metas[0]["seed"] == seed
        assert np.abs(_pixels(both[i].images) - _pixels(alone[i].images)).max() <= 1  # its own images
        assert len(reports[i]) == 2 + 3  # its own progress: prior steps, then decoder steps
    assert np.abs(_pixels(both[0].images) - _pixels(both[1].images)).mean() > 1


def test_pipeline_and_save_from_two_threads(model_dir, tmp_path):
    """The CLI's path (pipeline, then reserve_path + save_png) from two threads into one folder."""
    from genvl.checkpoint import open_model_dir
    from genvl.sampling import unclip

    comps = unclip.UnclipComponents.from_model_dir(open_model_dir(model_dir), device="cpu")

    def job(seed):
        out = unclip.text_to_image(comps, [PROMPT], num_images=2, steps=2, prior_steps=2, seed=seed)
        images = to_pil_images(out.images)
        paths = [save_png(im, reserve_path(tmp_path / "out", "same-name"), {"seed": seed, "index": i})
                 for i, im in enumerate(images)]
        return images, paths

    results = _in_threads([lambda: job(1), lambda: job(2)])
    paths = [p for _, ps in results for p in ps]
    assert len(set(paths)) == 4 and len(list((tmp_path / "out").iterdir())) == 4
    for seed, (images, ps) in zip((1, 2), results):
        for i, (im, p) in enumerate(zip(images, ps)):
            assert read_png_metadata(p) == {"seed": seed, "index": i}
            assert np.array_equal(np.asarray(Image.open(p)), np.asarray(im))
