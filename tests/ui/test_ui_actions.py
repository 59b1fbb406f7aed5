"""The UI's actions without a browser: the same images and metadata as `genvl sample`, downloads,
uploads, setting checks, progress, the model card, the method registry, and `genvl ui` errors."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
from PIL import Image

from genvl.checkpoint import open_model_dir
from genvl.cli import main
from genvl.errors import GenvlError
from genvl.sampling.io import read_png_metadata
from genvl.ui import actions as A
from ui_models import DEMO_DIR, SAMPLING, build_tiny_model, png


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    return open_model_dir(build_tiny_model(tmp_path_factory.mktemp("ui-actions") / "model"))


def _pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def _silent():
    return A.StepTracker(lambda fraction, text: None)


@pytest.mark.parametrize("method", ["unclip", "ar"])
def test_generate_matches_genvl_sample(md, tmp_path, capsys, method):
    settings = {**A.sample_defaults(md, method), "num_images": 2, "seed": 5}
    m = A.METHODS[method]
    out = A.generate(m, m.load(md, "cpu"), md, "a red circle", settings, _silent())
    assert main(["sample", "a red circle", "--method", method, "--model", str(md.path), "--num-images", "2",
                 "--seed", "5", "--out", str(tmp_path), "--no-progress"]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == len(out.images) == 2
    for i, (path, image, meta) in enumerate(zip(paths, out.images, out.metas)):
        assert np.array_equal(_pixels(Image.open(path)), _pixels(image))  # same pipeline, same settings
        assert read_png_metadata(path) == meta  # ... and the same metadata, key for key
        saved = tmp_path / f"ui-{i}.png"
        saved.write_bytes(A.png_bytes(image, meta))  # the download button's bytes
        assert read_png_metadata(saved) == meta and np.array_equal(_pixels(Image.open(saved)), _pixels(image))
    assert out.metas[0]["steps" if method == "unclip" else "guidance"] == (
        SAMPLING["steps"] if method == "unclip" else SAMPLING["ar_guidance"])


def test_starting_settings_come_from_the_pipeline_objects(md):
    """The boxes start from what the loaded pipeline resolves, not from a copy of the command line's parser."""
    from genvl.cli import build_parser

    pipe = A.METHODS["unclip"].load(md, "cpu")
    pipe.recommended["steps"] = 7  # a pipeline that recommends something else than its model directory
    s = A.sample_defaults(md, "unclip", pipe)
    assert s["steps"] == 7 and s["prior_steps"] == SAMPLING["prior_steps"] and s["scheduler"] == "ddim"
    ar = A.METHODS["ar"].load(md, "cpu")
    ar.recommended["ar_guidance"] = 5.5
    assert A.sample_defaults(md, "ar", ar)["guidance"] == 5.5
    assert A.sample_defaults(md, "ar")["guidance"] == SAMPLING["ar_guidance"]  # loads the pipeline itself
    # the values that are not the model's (images, seed, sampler) are genvl sample's, as are classify's
    cli = vars(build_parser().parse_args(["sample", "x"]))
    assert {k: s[k] for k in ("num_images", "seed", "temperature", "top_k", "top_p", "frames", "invert")} == \
        {k: cli[k] for k in ("num_images", "seed", "temperature", "top_k", "top_p", "frames", "invert")}
    cli = vars(build_parser().parse_args(["classify", "x"]))
    assert A.classify_defaults() == {k: cli[k] for k in ("method", "samples", "seed", "template")}


def test_the_ui_does_not_import_the_command_line():
    import subprocess
    import sys

    code = "import sys, genvl.ui.actions; print('genvl.cli' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_progress_reaches_one_over_all_stages(md):
    seen = []
    tracker = A.StepTracker(lambda fraction, text: seen.append((fraction, text)))
    m = A.METHODS["unclip"]
    settings = {**A.sample_defaults(md), "num_images": 1, "steps": 3, "prior_steps": 2}
    A.generate(m, m.load(md, "cpu"), md, "a red circle", settings, tracker)
    fractions = [f for f, _ in seen]
    assert len(seen) == 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[0][1] == "prior: step 1 of 2" and seen[-1][1] == "decoder: step 3 of 3"


def test_variations_and_interpolation(md):
    comps = A.load_unclip(md, "cpu")
    s = {**A.sample_defaults(md), "num_images": 2}
    out = A.variations(comps, md, "x.png", A.read_image("x.png", png()), s, _silent())
    assert len(out.images) == 2 and out.metas[1]["variations_of"] == "x.png" and out.metas[1]["index"] == 1
    s = {**A.sample_defaults(md), "frames": 3}
    out = A.interpolation(comps, md, "a red circle", ("b.png", A.read_image("b.png", png("blue", "square"))), s,
                          _silent())
    assert len(out.images) == 3 and out.metas[0]["interpolate"] == ["a red circle", "b.png"]
    gif = Image.open(io.BytesIO(out.gif))
    assert gif.format == "GIF" and gif.n_frames == 3
    assert out.summary == f"Finished: 3 frames in {out.seconds:.1f} s"


def test_classify_every_method(md):
    images = [("a.png", A.read_image("a.png", png())), ("b.png", A.read_image("b.png", png("blue", "square")))]
    classes = A.check_classify_input(images, "red circle, blue square\ngreen cross", "a {}", ["clip"], None)
    assert classes == ["red circle", "blue square", "green cross"]
    clfs = {m: A.load_classifier(md, m, "cpu", samples=2) for m in A.classify_methods(md)}
    res = A.classify_images(md, clfs, images, classes, "a {}")
    assert list(res.probs) == ["clip", "diffusion", "prior", "ar"]
    for probs in res.probs.values():
        assert np.allclose(np.sum(probs, axis=1), 1.0, atol=1e-4) and np.shape(probs) == (2, 3)


@pytest.mark.parametrize(("name", "data", "message"), [
    ("notes.txt", b"hello", "notes.txt: unsupported file type .txt; upload an image"),
    ("noext", b"hello", "noext: unsupported file type (none)"),
    ("empty.png", b"", "empty.png: cannot read image ("),
    ("bad.jpg", b"\xff\xd8 not a jpeg", "bad.jpg: cannot read image ("),
])
def test_uploads_that_are_not_images(name, data, message):
    with pytest.raises(GenvlError) as e:
        A.read_image(name, data)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_uploads_of_other_formats_become_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(buf, format="WEBP")
    im = A.read_image("clear.WEBP", buf.getvalue())
    assert im.mode == "RGB" and im.size == (20, 10)


@pytest.mark.parametrize(("settings", "names", "message"), [
    ({"steps": 0}, ["steps"], "Steps must be between 1 and 1000, got 0"),
    ({"steps": 2.5}, ["steps"], "Steps must be a whole number, got 2.5"),
    ({"guidance": float("nan")}, ["guidance"], "Guidance must be a number, got nan"),
    ({"top_p": 0.0}, ["top_p"], "Top-p must be in (0, 1], got 0"),
    ({"top_k": -1}, ["top_k"], "Top-k must be >= 0, got -1"),
    ({"scheduler": "euler"}, ["scheduler"], "Scheduler: choose one of ddim, ddpm, dpm++, got 'euler'"),
    ({"seed": -1}, ["seed"], "Seed must be between 0 and 2147483647, got -1"),
])
def test_settings_out_of_range(settings, names, message):
    with pytest.raises(GenvlError, match=None) as e:
        A.check_settings(settings, names)
    assert str(e.value) == message


def test_empty_prompts_and_classes():
    for text in (None, "", "   "):
        with pytest.raises(GenvlError, match="empty prompt"):
            A.check_prompt(text)
    with pytest.raises(GenvlError, match="duplicate class name"):
        A.parse_classes("cat, dog, cat")
    with pytest.raises(GenvlError, match="no method chosen"):
        A.check_classify_input([("a.png", None)], "a, b", None, [], None)


def test_captions_and_download_names():
    meta = {"model": "m", "method": "unclip", "seed": 3, "steps": 2, "guidance": 1.5, "scheduler": "ddim",
            "prompt": "a red heart", "prior_steps": 2, "prior_guidance": 2.0, "index": 1}
    assert A.settings_caption(meta) == ("\u201ca red heart\u201d \u00b7 method unclip \u00b7 seed 3 \u00b7 steps 2 "
                                        "\u00b7 prior steps 2 \u00b7 guidance 1.5 \u00b7 prior guidance 2 \u00b7 "
                                        "scheduler ddim \u00b7 #2")
    assert A.download_name(meta) == "a-red-heart-s3-1.png"
    assert A.download_name({"interpolate": ["a red heart", "cat.png"], "seed": 0, "index": 2}) == \
        "interpolate-a-red-heart-cat-s0-2.png"
    assert A.download_name({"variations_of": "my cat.jpg", "seed": 1, "index": 0}) == "variation-my-cat-s1-0.png"
    assert A.for_display(Image.new("RGB", (16, 16))).size == (192, 192)
    assert A.for_display(Image.new("RGB", (256, 256))).size == (256, 256)


def test_model_card_blocks_show_local_images(md, tmp_path):
    kinds = [k for k, _ in A.card_blocks(md)]
    assert kinds == ["markdown"]
    if (DEMO_DIR / "genvl.json").is_file():
        blocks = A.card_blocks(open_model_dir("demo"))
        assert ("image", str((DEMO_DIR / "samples.png").resolve())) in blocks
        assert all("](samples.png)" not in v for k, v in blocks if k == "markdown")


def test_methods_come_from_the_components_and_the_registry(md, tmp_path):
    assert [m.name for m in A.generation_methods(md)] == ["unclip", "ar"]
    meta = json.loads((md.path / "genvl.json").read_text())
    only_clip = open_model_dir(md.path)
    only_clip.meta = {**meta, "components": {"clip": meta["components"]["clip"]}}
    assert A.generation_methods(only_clip) == [] and A.classify_methods(only_clip) == ["clip"]
    # a new method (e.g. interleaved) is one registration; the page offers it where its parts exist
    extra = A.GenerationMethod("extra", "Extra", ("clip", "decoder"), ("num_images", "steps"), lambda md, dev: None,
                               lambda *a: None)
    try:
        A.register_method(extra)
        assert [m.name for m in A.generation_methods(md)] == ["unclip", "ar", "extra"]
    finally:
        A.METHODS.pop("extra")
    with pytest.raises(ValueError, match="unknown options"):
        A.register_method(A.GenerationMethod("bad", "Bad", (), ("colour",), None, None))


# ----------------------------------------------------------------------------------------- genvl ui
def test_genvl_ui_bad_model_directory_is_one_line(tmp_path, capsys):
    assert main(["ui", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"genvl ui: error: model directory not found: {tmp_path / 'nowhere'}\n"


def test_genvl_ui_port_in_use_is_one_line(md, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--model", str(md.path), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"genvl ui: error: port {port} on localhost is in use; pick another with "
                                       "--port N\n")


def test_genvl_ui_without_streamlit_says_how_to_install(md, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "streamlit" else real(name, *a))
    assert main(["ui", "--model", str(md.path)]) == 2
    assert capsys.readouterr().err == 'genvl ui: error: the UI needs streamlit: pip install "genvl[ui]"\n'


def test_genvl_ui_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ui", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--model" in out and "Generate, Variations, Interpolate" in out


def test_interleaved_method_returns_a_document(tmp_path):
    """A directory with an interleaved LM offers the method; its result is the document in order, and the
    image is the one the pipeline draws for that seed."""
    import torch

    from genvl.checkpoint import save_model_dir
    from genvl.models.clip import CLIP, clip_config
    from genvl.models.decoder import Decoder, decoder_config
    from genvl.models.interleaved import InterleavedLM, interleaved_config
    from genvl.sampling.interleaved import InterleavedParts, generate_document
    from genvl.sampling.io import to_pil_images
    from stub_vq import tiny_tokenizer

    torch.manual_seed(1)
    tok = tiny_tokenizer()
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 16, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    lm = InterleavedLM(interleaved_config("tiny", text_vocab_size=len(tok), embed_dim=32, visual_tokens=4))
    save_model_dir(tmp_path / "m", {"clip": clip, "decoder": Decoder(decoder_config("tiny", image_size=16)),
                                    "interleaved": lm}, tokenizer=tok)
    md = open_model_dir(tmp_path / "m")
    assert [m.name for m in A.generation_methods(md)] == ["interleaved"]  # no prior: no unCLIP
    method = A.METHODS["interleaved"]
    s = {**A.sample_defaults(md, "interleaved"), "steps": 2, "seed": 3}
    parts = method.load(md, "cpu")
    out = A.generate(method, parts, md, "a red circle", s, _silent())
    assert out.segments[0] == ("text", "a red circle")
    assert all(kind in ("text", "image") for kind, _ in out.segments)
    assert len(out.images) == sum(kind == "image" for kind, _ in out.segments) == len(out.metas)
    ref = generate_document(InterleavedParts.from_model_dir(md), "a red circle", max_images=1, steps=2,  # as genvl sample
                            guidance=s["guidance"], scheduler=s["scheduler"], seed=3,
                            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"])
    ref_images = [seg["image"] for seg in ref.segments if seg.get("image") is not None]
    assert len(ref_images) == len(out.images)
    for a, b in zip(out.images, ref_images):
        assert np.array_equal(_pixels(a), _pixels(to_pil_images(b[None])[0]))
    assert all(m["method"] == "interleaved" and m["seed"] == 3 for m in out.metas)
    with pytest.raises(GenvlError, match="prompt"):
        A.generate(method, parts, md, "  ", s, _silent())
