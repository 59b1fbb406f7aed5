"""The streamlit page driven by streamlit's AppTest on a tiny random model: every tab, uploads, the
progress bar, the gallery with settings and download buttons, and every bad-input message."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit.testing.v1", reason="the UI tests need streamlit>=1.56: pip install -e '.[dev]'")
from streamlit.testing.v1 import AppTest  # noqa: E402

from genvl.ui import APP_PATH, MODEL_ENV  # noqa: E402
from ui_models import DEMO_DIR, SAMPLING, build_tiny_model, png  # noqa: E402

# AppTest's default of 3 s per run is shorter than the first import of torch and the model load.
TIMEOUT = 180
GENERATE, VARIATIONS, INTERPOLATE, CLASSIFY, MODEL = range(5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("ui") / "model")


def _start(model, monkeypatch) -> AppTest:
    monkeypatch.setenv(MODEL_ENV, str(model))
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    assert [t.label for t in at.tabs] == ["Generate", "Variations", "Interpolate", "Classify", "Model"]
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]  # messages, never tracebacks
    return [e.value for e in at.error]


def _captions(tab) -> list[str]:
    return [c for im in tab.image for c in im.captions]


def _progress(tab):
    bars = tab.get("progress")
    assert len(bars) == 1
    return bars[0]


def test_generate_unclip_gallery_settings_and_downloads(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    tab = at.tabs[GENERATE]
    # the model directory's recommended settings are the starting values, as for genvl sample
    assert at.number_input(key="gen_unclip_steps").value == SAMPLING["steps"]
    assert at.number_input(key="gen_unclip_guidance").value == SAMPLING["guidance"]
    assert at.selectbox(key="gen_unclip_scheduler").value == "ddim"
    at.text_input(key="gen_prompt").set_value("a red circle")
    at.number_input(key="gen_unclip_num_images").set_value(3)
    at.number_input(key="gen_unclip_seed").set_value(7)
    at.button(key="gen_go").click().run()
    _ok(at)
    tab = at.tabs[GENERATE]
    caps = _captions(tab)
    assert len(tab.image) == 3 and len(caps) == 3
    for i, cap in enumerate(caps):
        assert "a red circle" in cap and "seed 7" in cap and "steps 2" in cap and "method unclip" in cap
        assert "scheduler ddim" in cap and f"#{i + 1}" in cap
    assert [b.label for b in tab.download_button] == ["Download PNG"] * 3
    bar = _progress(tab)
    assert bar.value == 100 and bar.proto.text.startswith("Finished: 3 images")
    # the gallery stays while other widgets change
    at.number_input(key="gen_unclip_num_images").set_value(1).run()
    assert len(at.tabs[GENERATE].image) == 3


def test_generate_autoregressive_and_random_seed(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    assert at.radio(key="gen_method").options == ["unCLIP (prior + decoder)", "Autoregressive (token LM + VQ-VAE)"]
    at.radio(key="gen_method").set_value("ar").run()
    assert at.number_input(key="gen_ar_guidance").value == SAMPLING["ar_guidance"]
    seeds = set()
    for _ in range(3):
        at.button(key="gen_ar_seed_random").click().run()
        seeds.add(at.number_input(key="gen_ar_seed").value)
    assert len(seeds) > 1
    at.text_input(key="gen_prompt").set_value("a blue square")
    at.number_input(key="gen_ar_num_images").set_value(2)
    at.button(key="gen_go").click().run()
    _ok(at)
    tab = at.tabs[GENERATE]
    assert len(tab.image) == 2
    assert all("method ar" in c and "a blue square" in c and "temperature 1" in c for c in _captions(tab))
    assert _progress(tab).value == 100


def test_a_registered_method_is_offered_and_its_document_shown(model_dir, monkeypatch):
    """The hook for new methods (interleaved generation): register it, and the page offers it where the model
    directory has its components, with its settings, progress, and a document of text and images."""
    from PIL import Image

    from genvl.ui import actions as A

    def run(parts, md, prompt, s, tracker):
        for i in range(3):
            tracker("document", i + 1, 3)
        meta = {"model": str(md.path), "method": "document", "prompt": prompt, "seed": s["seed"], "steps": s["steps"],
                "index": 0}
        return A.Generation([Image.new("RGB", (16, 16), "red")], [meta], 0.1,
                            segments=[("text", f"{prompt}, then"), ("image", 0), ("text", "the end.")])

    monkeypatch.setitem(A.METHODS, "document", A.GenerationMethod(
        "document", "Document (text and images)", ("clip", "decoder"), ("steps",), lambda md, dev: None, run))
    at = _start(model_dir, monkeypatch)
    assert at.radio(key="gen_method").options[-1] == "Document (text and images)"
    at.radio(key="gen_method").set_value("document").run()
    assert at.number_input(key="gen_document_steps").value == SAMPLING["steps"]
    at.text_input(key="gen_prompt").set_value("a red circle")
    at.button(key="gen_go").click().run()
    _ok(at)
    tab = at.tabs[GENERATE]
    texts = [m.value for m in tab.markdown]
    assert "a red circle, then" in texts and "the end\\." in texts
    assert _captions(tab) == ["\u201ca red circle\u201d \u00b7 method document \u00b7 seed 0 \u00b7 steps 2 \u00b7 #1"]
    assert _progress(tab).proto.text == "Finished: 1 image in 0.1 s" and len(tab.download_button) == 1


@pytest.mark.parametrize(("key", "value", "message"), [
    ("gen_unclip_steps", 0, "Steps must be between 1 and 1000, got 0"),
    ("gen_unclip_steps", 5000, "Steps must be between 1 and 1000, got 5000"),
    ("gen_unclip_prior_steps", -3, "Prior steps must be between 1 and 1000, got -3"),
    ("gen_unclip_num_images", 99, "Images must be between 1 and 16, got 99"),
    ("gen_unclip_guidance", -1.0, "Guidance must be >= 0, got -1"),
])
def test_generate_bad_settings_are_messages_and_the_app_keeps_working(model_dir, monkeypatch, key, value, message):
    at = _start(model_dir, monkeypatch)
    at.button(key="gen_go").click().run()  # empty prompt
    assert _errors(at) == ['empty prompt: type a text description, e.g. "a red heart"']
    at.text_input(key="gen_prompt").set_value("a red circle")
    at.number_input(key=key).set_value(value)
    at.button(key="gen_go").click().run()
    assert _errors(at) == [message]
    assert not at.tabs[GENERATE].image
    at.number_input(key=key).set_value(2)
    at.number_input(key="gen_unclip_num_images").set_value(2)
    at.button(key="gen_go").click().run()
    _ok(at)
    assert len(at.tabs[GENERATE].image) == 2


def test_variations_upload(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    at.button(key="var_go").click().run()
    assert _errors(at) == ["no image: upload the image to make variations of"]
    at.file_uploader(key="var_upload").set_value(("notes.txt", b"hello", "text/plain")).run()
    assert _errors(at) == ["notes.txt: unsupported file type .txt; upload an image (png, jpg, jpeg, webp, bmp, gif)"]
    at.file_uploader(key="var_upload").set_value(("broken.png", b"\x89PNG not really", "image/png")).run()
    [err] = _errors(at)
    assert err.startswith("broken.png: cannot read image (")
    at.button(key="var_go").click().run()
    assert _errors(at)[-1] == "no image: upload the image to make variations of (the uploaded file cannot be used)"
    at.file_uploader(key="var_upload").set_value(("heart.png", png(), "image/png")).run()
    _ok(at)
    tab = at.tabs[VARIATIONS]
    assert _captions(tab) == ["heart.png"]  # the uploaded image, shown
    at.number_input(key="var_num_images").set_value(2)
    at.number_input(key="var_steps").set_value(0)
    at.button(key="var_go").click().run()
    assert _errors(at) == ["Steps must be between 1 and 1000, got 0"]
    at.number_input(key="var_steps").set_value(2)
    at.checkbox(key="var_invert").check()
    at.button(key="var_go").click().run()
    _ok(at)
    tab = at.tabs[VARIATIONS]
    caps = _captions(tab)[1:]
    assert len(caps) == 2 and all("variations of heart.png" in c and "inversion on" in c for c in caps)
    assert len(tab.download_button) == 2 and _progress(tab).value == 100


def test_interpolate_prompts_and_images(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    at.button(key="int_go").click().run()
    assert _errors(at) == ['empty prompt A: type a text description, e.g. "a red heart"']
    at.text_input(key="int_a_prompt").set_value("a red circle")
    at.text_input(key="int_b_prompt").set_value("a blue square")
    at.number_input(key="int_frames").set_value(1)
    at.button(key="int_go").click().run()
    assert _errors(at) == ["Frames must be between 2 and 64, got 1"]
    at.number_input(key="int_frames").set_value(3)
    at.button(key="int_go").click().run()
    _ok(at)
    tab = at.tabs[INTERPOLATE]
    caps = _captions(tab)
    assert len(caps) == 4  # the animation, then its 3 frames
    assert caps[0].startswith("animation: ") and "between a red circle \u2192 a blue square" in caps[0]
    assert [b.label for b in tab.download_button][0] == "Download GIF"
    assert _progress(tab).proto.text.startswith("Finished: 3 frames")
    # B as an uploaded image
    at.radio(key="int_b_kind").set_value("Image").run()
    at.button(key="int_go").click().run()
    assert _errors(at) == ["no image for B: upload one, or switch B to a prompt"]
    at.file_uploader(key="int_b_upload").set_value(("square.png", png("blue", "square"), "image/png")).run()
    at.button(key="int_go").click().run()
    _ok(at)
    caps = _captions(at.tabs[INTERPOLATE])
    assert "between a red circle \u2192 square.png" in caps[-1] and len(caps) == 5  # + the uploaded image


def test_classify_uploads_bar_charts_per_image_and_method(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    assert at.multiselect(key="cls_methods").options == ["clip", "diffusion", "prior", "ar"]
    assert at.multiselect(key="cls_methods").value == ["clip"]
    at.button(key="cls_go").click().run()
    assert _errors(at) == ["no images: upload at least one image to classify"]
    at.file_uploader(key="cls_upload").set_value([("a.png", png(), "image/png"),
                                                  ("b.png", png("blue", "square"), "image/png")])
    at.button(key="cls_go").click().run()
    assert _errors(at) == ['no class names: enter at least two, separated by commas (e.g. "a cat, a dog")']
    at.text_input(key="cls_classes").set_value("red circle")
    at.button(key="cls_go").click().run()
    assert _errors(at) == ["need at least two classes, got 1"]
    at.text_input(key="cls_classes").set_value("red circle, blue square")
    at.text_input(key="cls_template").set_value("a photo")
    at.button(key="cls_go").click().run()
    assert _errors(at) == ["--template must contain {} where the class name goes, got 'a photo'"]
    at.text_input(key="cls_template").set_value("a {}")
    at.multiselect(key="cls_methods").set_value(["clip", "diffusion", "prior", "ar"])
    at.number_input(key="cls_samples").set_value(2)
    at.button(key="cls_go").click().run()
    _ok(at)
    tab = at.tabs[CLASSIFY]
    assert len(tab.get("vega_lite_chart")) == 2 * 4  # a bar chart per image and method
    heads = [m.value for m in tab.markdown if m.value.startswith("**")]
    assert len(heads) == 8 and all(h.split("**")[1] in ("clip", "diffusion", "prior", "ar") for h in heads)
    assert all(("red circle (" in h or "blue square (" in h) for h in heads)
    assert _captions(tab) == ["a.png", "b.png"]
    # a file that is no image: a message, and classification waits until it is removed
    at.file_uploader(key="cls_upload").set_value([("a.png", png(), "image/png"), ("c.txt", b"x", "text/plain")])
    at.run()
    assert _errors(at) == ["c.txt: unsupported file type .txt; upload an image (png, jpg, jpeg, webp, bmp, gif)"]


def test_model_tab_shows_the_card(model_dir, monkeypatch):
    at = _start(model_dir, monkeypatch)
    text = "\n".join(m.value for m in at.tabs[MODEL].markdown)
    assert f"# genvl model: {model_dir.name}" in text
    assert "## Training: clip" in text and "max_steps: 10" in text  # data and recipe
    assert "## Metrics" in text and "| image_to_text_R@1 | 12.5 |" in text
    assert "clip, prior, decoder, vqvae, lm" in text and "steps 2" in text


def test_bad_model_directory_is_a_message_and_another_can_be_opened(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    at.run()
    assert f"model directory not found: {tmp_path / 'nowhere'}" in _errors(at)
    assert not at.tabs
    at.sidebar.text_input(key="model_path").set_value(str(model_dir)).run()
    _ok(at)
    assert len(at.tabs) == 5


@pytest.mark.skipif(not (DEMO_DIR / "genvl.json").is_file(), reason="this checkout has no built-in demo model")
def test_every_tab_with_the_builtin_demo(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)  # no --model: the built-in demo
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    from genvl.checkpoint import open_model_dir
    from genvl.ui import actions

    demo = open_model_dir("demo")
    # the demo ships all three generation methods and all four zero-shot classifiers
    assert at.radio(key="gen_method").options == [
        "unCLIP (prior + decoder)", "Autoregressive (token LM + VQ-VAE)", "Interleaved (text and images)"
    ] == [m.label for m in actions.generation_methods(demo)]
    fast = {"steps": 3, "prior_steps": 3}
    at.text_input(key="gen_prompt").set_value("a red heart")
    at.number_input(key="gen_unclip_num_images").set_value(2)
    for k, v in fast.items():
        at.number_input(key=f"gen_unclip_{k}").set_value(v)
    at.button(key="gen_go").click().run()
    _ok(at)
    assert len(at.tabs[GENERATE].image) == 2 and all("a red heart" in c for c in _captions(at.tabs[GENERATE]))

    at.file_uploader(key="var_upload").set_value(("heart.png", png(), "image/png"))
    at.number_input(key="var_num_images").set_value(2)
    at.number_input(key="var_steps").set_value(3)
    at.button(key="var_go").click().run()
    _ok(at)
    assert len(at.tabs[VARIATIONS].image) == 1 + 2

    at.text_input(key="int_a_prompt").set_value("a red heart")
    at.text_input(key="int_b_prompt").set_value("a cat face")
    at.number_input(key="int_frames").set_value(2)
    for k, v in fast.items():
        at.number_input(key=f"int_{k}").set_value(v)
    at.button(key="int_go").click().run()
    _ok(at)
    assert len(at.tabs[INTERPOLATE].image) == 1 + 2

    assert at.multiselect(key="cls_methods").options == ["clip", "diffusion", "prior", "ar"]
    at.file_uploader(key="cls_upload").set_value(("heart.png", png(), "image/png"))
    at.text_input(key="cls_classes").set_value("a red heart, a cat face, a slice of pizza")
    at.multiselect(key="cls_methods").set_value(["clip", "prior", "diffusion"])
    at.number_input(key="cls_samples").set_value(2)
    at.button(key="cls_go").click().run()
    _ok(at)
    assert len(at.tabs[CLASSIFY].get("vega_lite_chart")) == 3

    text = "\n".join(m.value for m in at.tabs[MODEL].markdown)
    assert "# genvl model: demo" in text and "## Metrics" in text and "Recipe:" in text
    assert len(at.tabs[MODEL].image) == 1  # the card's samples.png, shown from the model directory
