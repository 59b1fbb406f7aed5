"""Limits on sizes: every size argument of the command line and of the Python API is checked against
:mod:`genvl.limits` (the constants the UI uses) before anything is allocated, with a one-line error
naming the limit; a request that passes the limits but would not fit is refused from an estimate of
the memory it needs, with a hint."""

import contextlib
import io
import time

import pytest
import torch
from PIL import Image

import genvl.limits as L
from genvl.checkpoint import open_model_dir
from genvl.cli import main
from genvl.errors import GenvlError
from rel_helpers import build_tiny_model, image, model_dir  # noqa: F401 (shared fixtures)


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue(), time.perf_counter() - t


BIG = "100000000"
CLI_CASES = [
    (["sample", "a red circle", "--num-images", "100000"], L.MAX_IMAGES),
    (["sample", "--interpolate", "a", "b", "--frames", "100000"], L.MAX_FRAMES),
    (["sample", "a red circle", "--prior-candidates", "10000000"], L.MAX_PRIOR_CANDIDATES),
    (["sample", "a red circle", "--method", "ar", "--num-images", "100000"], L.MAX_IMAGES),
    (["sample", "a red circle", "--steps", BIG], L.MAX_STEPS),
    (["sample", "a red circle", "--prior-steps", BIG], L.MAX_STEPS),
    (["sample", "a red circle", "--method", "interleaved", "--max-new-tokens", BIG], L.MAX_NEW_TOKENS),
    (["sample", "a red circle", "--method", "interleaved", "--max-images", BIG], L.MAX_DOC_IMAGES),
    (["classify", "IMAGE", "--classes", "a,b", "--samples", BIG], L.MAX_SAMPLES),
    (["classify", "IMAGE", "--classes", ",".join(f"c{i}" for i in range(L.MAX_CLASSES + 1))], L.MAX_CLASSES),
    (["classify", "IMAGE", "--classes", "a,b", "--method", "diffusion", "--schedule", "1000:2,1000:1"], L.MAX_SAMPLES),
    (["caption", "IMAGE", "--batch-size", BIG], L.MAX_BATCH_SIZE),
    (["caption", "IMAGE", "--max-tokens", BIG], L.MAX_NEW_TOKENS),
    (["evaluate", "generation", "--prompts", "p.txt", "--num-images", BIG], L.MAX_IMAGES),
    (["evaluate", "generation", "--prompts", "p.txt", "--prior-candidates", BIG], L.MAX_PRIOR_CANDIDATES),
    (["evaluate", "zero-shot", "--data", ".", "--samples", BIG], L.MAX_SAMPLES),
    (["evaluate", "retrieval", "--data", ".", "--batch-size", BIG], L.MAX_BATCH_SIZE),
    (["data", "tokenize", ".", "--out", "x.safetensors", "--batch-size", BIG], L.MAX_BATCH_SIZE),
]


@pytest.mark.parametrize("argv,limit", CLI_CASES, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _ in CLI_CASES])
def test_cli_size_over_the_limit_is_one_line_at_once(model_dir, image, argv, limit):
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    if argv[0] in ("sample", "classify", "caption", "evaluate"):
        argv += ["--model", str(model_dir)]
    code, err, seconds = run(argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and ": error: " in lines[0], err
    assert f"limit of {limit}" in lines[0], lines[0]
    assert seconds < 2  # refused before any model loads


def test_python_api_checks_the_same_limits_before_allocating(model_dir):
    from genvl.classify.diffusion import DiffusionClassifier
    from genvl.classify.montecarlo import check_schedule
    from genvl.sampling import autoregressive, unclip
    from genvl.sampling.interleaved import generate_document

    md = open_model_dir(model_dir)
    comps = unclip.UnclipComponents.from_model_dir(md)
    lm, vq, tok = md.load("lm"), md.load("vqvae"), md.tokenizer()
    cases = [
        (lambda: unclip.text_to_image(comps, "a red circle", num_images=100_000), L.MAX_IMAGES),
        (lambda: unclip.text_to_image(comps, "a red circle", prior_candidates=10_000_000), L.MAX_PRIOR_CANDIDATES),
        (lambda: unclip.interpolate(comps, "a", "b", frames=100_000), L.MAX_FRAMES),
        (lambda: unclip.variations(comps, torch.zeros(3, 16, 16), num_images=100_000), L.MAX_IMAGES),
        (lambda: unclip.mix(comps, [("a", 1.0)], num_images=100_000), L.MAX_IMAGES),
        (lambda: unclip.sample_prior(comps.prior, comps.clip, tok, ["a"], candidates=10**7), L.MAX_PRIOR_CANDIDATES),
        (lambda: autoregressive.text_to_image(lm, vq, tok, None, ["a red circle"], num_images=100_000), L.MAX_IMAGES),
        (lambda: DiffusionClassifier(comps.decoder, lambda p: None, samples=10**8), L.MAX_SAMPLES),
        (lambda: check_schedule([(1000, 2), (1000, 1)]), L.MAX_SAMPLES),
        (lambda: generate_document(None, "a", max_new_tokens=10**9), L.MAX_NEW_TOKENS),
    ]
    for call, limit in cases:
        t = time.perf_counter()
        with pytest.raises(GenvlError, match=f"limit of {limit}\\b") as e:
            call()
        assert time.perf_counter() - t < 1 and "\n" not in str(e.value)


def test_ui_uses_the_same_limits():
    from genvl.ui import actions

    assert (actions.MAX_IMAGES, actions.MAX_FRAMES, actions.MAX_STEPS) == (L.MAX_IMAGES, L.MAX_FRAMES, L.MAX_STEPS)
    assert actions.OPTIONS["num_images"].hi == L.MAX_IMAGES and actions.OPTIONS["frames"].hi == L.MAX_FRAMES
    with pytest.raises(GenvlError, match=f"between 1 and {L.MAX_IMAGES}"):
        actions.check_settings({"num_images": L.MAX_IMAGES + 1}, ["num_images"])


@pytest.mark.parametrize("argv", [
    ["sample", "a red circle", "--num-images", "4"],
    ["sample", "a red circle", "--method", "ar", "--num-images", "4"],
    ["classify", "IMAGE", "--classes", "a,b", "--method", "diffusion", "--samples", "64"],
], ids=["unclip", "ar", "diffusion-classify"])
def test_request_estimated_not_to_fit_is_refused_with_a_hint(model_dir, image, monkeypatch, tmp_path, argv):
    monkeypatch.setenv(L.MEMORY_ENV, "64K")  # as if only 64 KiB were free
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    extra = ["--out", str(tmp_path / "out"), "--no-progress"] if argv[0] == "sample" else []
    code, err, seconds = run([*argv, "--model", str(model_dir), *extra])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "of memory, more than 50% of the 64.0 KiB available" in lines[0]
    assert ("fewer images" in lines[0]) or ("fewer --samples or a smaller --batch-size" in lines[0])
    assert seconds < 5 and not (tmp_path / "out").exists()


def test_memory_estimate_errs_high_and_bad_settings_are_one_line(monkeypatch):
    # a tiny decoder at 64 px, 32 rows: measured about 0.35 to 0.40 GiB of resident memory on CPU
    est = L.unet_bytes([32, 64], 64, 1, 32, 32)
    assert 0.40 * 2**30 < est < 0.8 * 2**30
    monkeypatch.setenv(L.MEMORY_ENV, "lots")
    with pytest.raises(GenvlError, match="expected a size such as 8G"):
        L.check_memory(1, "x", "y")
    monkeypatch.setenv(L.MEMORY_ENV, "1G")
    assert L.available_memory() <= 2**30
    L.check_memory(2**29, "half", "fine")  # exactly the fraction: allowed
    with pytest.raises(GenvlError, match="more than 50% of the 1.0 GiB available; ask for less"):
        L.check_memory(2**29 + 1, "a request", "ask for less")
