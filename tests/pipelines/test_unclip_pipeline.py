"""genvl.pipelines.UnclipPipeline: the model's recommended settings, the CLI's and the UI's images, img2img."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_model, draw_shape
from genvl.checkpoint import BUILTIN, open_model_dir
from genvl.cli import main
from genvl.errors import GenvlError
from genvl.pipelines import SAMPLE_DEFAULTS, UnclipPipeline

ROOT = Path(__file__).resolve().parents[2]
DEMO = BUILTIN["demo"]
needs_demo = pytest.mark.skipif(not (DEMO / "genvl.json").is_file(), reason="no built-in demo in this checkout")
RECOMMENDED = {"steps": 3, "prior_steps": 2, "guidance": 2.0, "prior_guidance": 1.5, "scheduler": "ddim"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("pipe") / "model", ("clip", "prior", "decoder"), sr=True,
                            sampling=RECOMMENDED)


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_settings_come_from_the_call_then_the_model_then_the_defaults(tiny):
    pipe = UnclipPipeline.from_pretrained(tiny)
    s = pipe.settings()
    assert {k: s[k] for k in RECOMMENDED} == RECOMMENDED
    assert s["prior_candidates"] == SAMPLE_DEFAULTS["prior_candidates"] and s["coarse_start"] == 1.0
    assert pipe.settings(steps=7)["steps"] == 7
    with pytest.raises(GenvlError, match="unknown sampling setting.*stepz"):
        pipe.settings(stepz=3)
    out = pipe("a red circle", num_images=2, seed=3)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)  # through the super-resolution stage
    assert out.tensors.shape == (2, 3, 32, 32) and out.image_embeds.shape[0] == 2
    assert out.settings["guidance"] == 2.0 and out.settings["steps"] == 3 and out.seed == 3
    assert out.settings["model"] == str(tiny) and out.settings["prompt"] == "a red circle"
    small = pipe("a red circle", num_images=2, seed=3, size=16)
    assert small.images[0].size == (16, 16)
    with pytest.raises(GenvlError, match="size 24: this model generates 16 px or 32 px"):
        pipe("a red circle", size=24)
    with pytest.raises(GenvlError, match="no coarse layout path"):
        pipe("a red circle", coarse_start=0.5)


def test_same_seed_same_images_and_a_list_of_prompts_is_prompt_major(tiny):
    pipe = UnclipPipeline.from_pretrained(tiny)
    a = pipe("a red circle", num_images=2, seed=5, size=16)
    b = pipe("a red circle", num_images=2, seed=5, size=16)
    assert torch.equal(a.tensors, b.tensors)
    both = pipe(["a red circle", "a blue square"], num_images=2, seed=5, size=16)
    assert len(both.images) == 4 and both.settings["prompts"] == ["a red circle", "a blue square"]
    g = torch.Generator().manual_seed(5)
    assert torch.equal(pipe("a red circle", num_images=2, generator=g, size=16).tensors, a.tensors)


def test_sr_steps_come_from_the_call_then_the_model_and_only_count_with_the_stage(tiny):
    pipe = UnclipPipeline.from_pretrained(tiny)
    assert pipe.settings()["sr_steps"] == SAMPLE_DEFAULTS["sr_steps"]  # the tiny model recommends none
    pipe.recommended["sr_steps"] = 3
    runs: list[tuple[str, int, int]] = []

    def steps_of(stage: str) -> int:
        return max((i for s, i, _ in runs if s == stage), default=0)

    out = pipe("a red circle", num_images=1, seed=2, callback=lambda *a: runs.append(a))
    assert steps_of("super-res") == 3 and out.settings["sr_steps"] == 3
    runs.clear()
    out = pipe("a red circle", num_images=1, seed=2, sr_steps=2, callback=lambda *a: runs.append(a))
    assert steps_of("super-res") == 2 and out.settings["sr_steps"] == 2 and out.images[0].size == (32, 32)
    runs.clear()
    out = pipe("a red circle", num_images=1, seed=2, sr_steps=2, size=16, callback=lambda *a: runs.append(a))
    assert steps_of("super-res") == 0 and "sr_steps" not in out.settings  # no stage ran: nothing to record
    photo = draw_shape("blue", "square", 32)
    runs.clear()
    v = pipe.variations(photo, seed=0, sr_steps=2, callback=lambda *a: runs.append(a))
    assert steps_of("super-res") == 2 and v.settings["sr_steps"] == 2
    runs.clear()
    f = pipe.interpolate("a red circle", photo, frames=2, seed=0, callback=lambda *a: runs.append(a))
    assert steps_of("super-res") == 3 and f.settings["sr_steps"] == 3
    with pytest.raises(GenvlError, match="sr_steps must be a positive integer"):
        pipe("a red circle", sr_steps=0)


def test_image_to_image_strength_ends(tiny):
    pipe = UnclipPipeline.from_pretrained(tiny)
    photo = draw_shape("blue", "square", 16)
    plain = pipe("a red circle", num_images=2, seed=1, size=16)
    full = pipe("a red circle", num_images=2, seed=1, size=16, image=photo, strength=1.0)
    assert torch.equal(full.tensors, plain.tensors)  # strength 1 is text-to-image, noise and all
    kept = pipe("a red circle", num_images=2, seed=1, size=16, image=photo, strength=0.0)
    src = torch.from_numpy(_pixels(photo).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (kept.tensors - src).abs().max() < 2 / 255  # the input (a pixel decoder has nothing to decode)
    half = pipe("a red circle", num_images=2, seed=1, size=16, image=photo, strength=0.5)
    d_src, d_plain = (half.tensors - src).abs().mean(), (plain.tensors - src).abs().mean()
    assert d_src < d_plain  # halfway: still nearer the input than a fresh image is
    assert half.settings["strength"] == 0.5
    with pytest.raises(GenvlError, match="strength applies to image-to-image"):
        pipe("a red circle", strength=0.5)
    with pytest.raises(GenvlError, match="strength must be in"):
        pipe("a red circle", image=photo, strength=1.5)


def test_variations_and_interpolation(tiny):
    pipe = UnclipPipeline.from_pretrained(tiny)
    photo = draw_shape("blue", "square", 32)
    v = pipe.variations(photo, num_images=3, seed=0)
    assert len(v.images) == 3 and v.settings["invert"] is False
    frames = pipe.interpolate("a red circle", photo, frames=3, seed=0, size=16)
    assert len(frames.images) == 3 and frames.images[0].size == (16, 16) and frames.settings["frames"] == 3


def test_cli_and_ui_give_the_pipelines_images(tiny, tmp_path):
    from genvl.ui import actions

    pipe = UnclipPipeline.from_pretrained(tiny)
    out = pipe("a blue square", num_images=1, seed=11)
    png = tmp_path / "cli.png"
    assert main(["sample", "a blue square", "--model", str(tiny), "--seed", "11", "--num-images", "1",
                 "--out", str(png), "--no-progress"]) == 0
    assert np.array_equal(_pixels(Image.open(png)), _pixels(out.images[0]))
    md = open_model_dir(tiny)
    s = actions.sample_defaults(md)
    s.update(num_images=1, seed=11)
    m = actions.METHODS["unclip"]
    gen = actions.generate(m, m.load(md, "cpu"), md, "a blue square", s, actions.StepTracker(lambda f, t: None))
    assert np.array_equal(_pixels(gen.images[0]), _pixels(out.images[0]))
    # image-to-image from the command line
    src = tmp_path / "src.png"
    draw_shape("red", "circle", 16).save(src)
    png2 = tmp_path / "i2i.png"
    assert main(["sample", "a blue square", "--model", str(tiny), "--seed", "11", "--image", str(src),
                 "--strength", "0.5", "--size", "16", "--num-images", "1", "--out", str(png2), "--no-progress"]) == 0
    want = pipe("a blue square", seed=11, image=Image.open(src), strength=0.5, size=16).images[0]
    assert np.array_equal(_pixels(Image.open(png2)), _pixels(want))
    assert main(["sample", "a blue square", "--model", str(tiny), "--strength", "0.5"]) == 2


@needs_demo
def test_demo_pipeline_matches_genvl_sample(tmp_path):
    pipe = UnclipPipeline.from_pretrained("demo")
    assert pipe.settings()["guidance"] == open_model_dir(DEMO).meta["sampling"]["guidance"]
    out = pipe("a red heart", seed=4, steps=6, prior_steps=5)
    png = tmp_path / "demo.png"
    assert main(["sample", "a red heart", "--seed", "4", "--steps", "6", "--prior-steps", "5", "--num-images", "1",
                 "--out", str(png), "--no-progress"]) == 0
    assert np.array_equal(_pixels(Image.open(png)), _pixels(out.images[0]))


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@needs_demo
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _readme_python_blocks()
    assert blocks, "the README's Python API section has no python example"
    monkeypatch.chdir(tmp_path)
    draw_shape("red", "circle", 64).save(tmp_path / "photo.png")  # the examples' input image
    scope: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own examples)
    written = sorted(p.name for p in tmp_path.glob("*.png") if p.name != "photo.png")
    assert written, "the examples wrote no image"
    for name in written:
        with Image.open(tmp_path / name) as im:
            assert im.size[0] >= 32 and np.asarray(im).std() > 5, name


def test_pipelines_package_loads_each_method_on_first_use():
    import os
    import subprocess
    import sys

    import genvl.pipelines as pipelines

    assert {n: getattr(pipelines, n).__name__ for n in ("ARPipeline", "InterleavedPipeline", "UnclipPipeline")} == {
        "ARPipeline": "ARPipeline", "InterleavedPipeline": "InterleavedPipeline", "UnclipPipeline": "UnclipPipeline"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pipelines.Nope  # noqa: B018
    # genvl sample's unCLIP path leaves the token-LM modules of the other methods unloaded
    probe = ("import sys; from genvl.pipelines import UnclipPipeline\n"
             "print([m for m in ('genvl.pipelines.ar', 'genvl.pipelines.interleaved', 'genvl.models.interleaved', "
             "'genvl.models.lm') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
