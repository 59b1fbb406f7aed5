"""genvl's streamlit page: generate, make variations, interpolate, classify, read the model card.

Started by ``genvl ui [--model DIR] [--port N]`` (``streamlit run`` of this file). Each button calls
a function of :mod:`genvl.ui.actions`, which calls the pipeline the command line calls. Models load
once per server process (``st.cache_resource``); results live in the session, so they stay on the
page while other widgets change. Bad input is shown as a one-line message in the page.
"""

from __future__ import annotations

import os
import random
import sys
import traceback
from contextlib import contextmanager

import streamlit as st

from genvl.errors import GenvlError
from genvl.ui import MODEL_ENV
from genvl.ui import actions as A

TABS = ("Generate", "Variations", "Interpolate", "Classify", "Model")
GALLERY_COLUMNS = 4


# ------------------------------------------------------------------------------- loading (cached)
@st.cache_resource(show_spinner="Opening the model directory ...")
def _open(path: str):
    return A.open_model(path or None)


@st.cache_resource(show_spinner="Loading the model ...")
def _parts(method: str, path: str, device: str):
    return A.METHODS[method].load(_open(path), device)


@st.cache_resource(show_spinner="Loading the classifier ...")
def _classifier(path: str, method: str, device: str, samples: int | None, seed: int):
    return A.load_classifier(_open(path), method, device, samples=samples, seed=seed)


@st.cache_resource
def _device() -> str:
    return A.device()


# ------------------------------------------------------------------------------------- helpers
@contextmanager
def _errors_shown():
    """Show bad input as a message in the page; never a traceback (unless GENVL_DEBUG is set)."""
    try:
        yield
    except GenvlError as e:
        st.error(str(e))
    except Exception as e:  # a bug: one line in the page, the traceback on the server's console
        traceback.print_exc(file=sys.stderr)
        if os.environ.get("GENVL_DEBUG"):
            st.exception(e)
        else:
            msg = str(e).splitlines()[0] if str(e) else ""
            st.error(f"internal error: {type(e).__name__}: {msg} (start genvl ui with GENVL_DEBUG=1 for the traceback)")


@contextmanager
def _pressed(result_key: str):
    """The work of a pressed button: its last result is cleared first; bad input is shown as a message."""
    with _errors_shown():
        st.session_state[result_key] = None
        yield


def _random_seed(key: str) -> None:
    st.session_state[key] = random.randint(0, A.MAX_SEED)


def _option_widget(name: str, key: str, default) -> object:
    """The widget of one sampling setting (see actions.OPTIONS); its range is checked on use."""
    opt = A.OPTIONS[name]
    if opt.kind == "choice":
        index = opt.choices.index(default) if default in opt.choices else 0
        return st.selectbox(opt.label, opt.choices, index=index, key=key, help=opt.help)
    if opt.kind == "bool":
        return st.checkbox(opt.label, value=bool(default), key=key, help=opt.help)
    if opt.kind == "int":
        return st.number_input(opt.label, value=int(default), step=int(opt.step), key=key, help=opt.help)
    return st.number_input(opt.label, value=float(default), step=float(opt.step), format="%g", key=key,
                           help=opt.help)


def _seed_widget(key: str) -> int:
    """The seed box; its "random" button writes the session state, so the box takes no value argument
    (its starting value is the widget's own 0, genvl sample's default seed)."""
    return st.number_input(A.OPTIONS["seed"].label, step=1, key=key, help=A.OPTIONS["seed"].help)


def _settings_row(options, defaults: dict, prefix: str) -> dict:
    """One row: a box per setting, then the seed with its "random" button; check boxes below the row."""
    boxes = [n for n in options if A.OPTIONS[n].kind != "bool"]
    cols = st.columns(len(boxes) + 2, vertical_alignment="bottom")
    settings = {}
    for col, name in zip(cols, boxes):
        with col:
            settings[name] = _option_widget(name, f"{prefix}{name}", defaults.get(name))
    with cols[-2]:
        settings["seed"] = _seed_widget(f"{prefix}seed")
    with cols[-1]:
        st.button("Random", key=f"{prefix}seed_random", on_click=_random_seed, args=(f"{prefix}seed",),
                  help="draw a new random seed")
    for name in options:
        if A.OPTIONS[name].kind == "bool":
            settings[name] = _option_widget(name, f"{prefix}{name}", defaults.get(name))
    return settings


def _progress_reporter(bar):
    def report(fraction: float, text: str) -> None:
        bar.progress(fraction, text=text)

    return report


def _run(result_key: str, bar, action) -> None:
    """Run ``action(tracker)`` under a progress bar; keep its result in the session (None after an error)."""
    st.session_state[result_key] = None
    bar.progress(0.0, text="Starting ...")
    result = action(A.StepTracker(_progress_reporter(bar)))
    st.session_state[result_key] = result


def _gallery(result: A.Generation, prefix: str) -> None:
    """The images, each with its settings underneath and a download button (PNG with its metadata)."""
    for start in range(0, len(result.images), GALLERY_COLUMNS):
        cols = st.columns(GALLERY_COLUMNS)
        for i, col in zip(range(start, min(start + GALLERY_COLUMNS, len(result.images))), cols):
            image, meta = result.images[i], result.metas[i]
            with col:
                st.image(A.for_display(image), caption=A.settings_caption(meta))
                st.download_button("Download PNG", data=A.png_bytes(image, meta), file_name=A.download_name(meta),
                                   mime="image/png", key=f"{prefix}_download_{i}")


def _escape_markdown(text: str) -> str:
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>~" else c for c in text)


def _document(result: A.Generation, prefix: str) -> None:
    """A generated document: its text and images in order (each image with settings and download)."""
    for kind, value in result.segments:
        if kind == "text":
            st.markdown(_escape_markdown(value))
            continue
        image, meta = result.images[value], result.metas[value]
        col = st.columns(GALLERY_COLUMNS)[0]
        with col:
            st.image(A.for_display(image), caption=A.settings_caption(meta))
            st.download_button("Download PNG", data=A.png_bytes(image, meta), file_name=A.download_name(meta),
                               mime="image/png", key=f"{prefix}_download_{value}")


def _uploaded_image(upload):
    """(file name, RGB image) of an upload, or None when nothing is uploaded; GenvlError for a bad file."""
    if upload is None:
        return None
    return upload.name, A.read_image(upload.name, upload.getvalue())


# ---------------------------------------------------------------------------------------- tabs
def generate_tab(md, path: str, device: str) -> None:
    methods = A.generation_methods(md)
    if not methods:
        st.info(f"This model directory cannot generate images from text (it has: {', '.join(md.components)}). "
                "unCLIP needs clip, prior and decoder; the autoregressive method needs lm and vqvae.")
        return
    labels = {m.name: m.label for m in methods}
    name = st.radio("Method", list(labels), format_func=labels.get, horizontal=True, key="gen_method")
    method = A.METHODS[name]
    prompt = st.text_input("Prompt", key="gen_prompt", placeholder="a red heart")
    parts = _parts(name, path, device)  # the method's pipeline: its settings are the boxes' starting values
    settings = _settings_row(method.options, A.sample_defaults(md, name, parts), f"gen_{name}_")
    go = st.button("Generate", type="primary", key="gen_go")
    bar = st.empty()
    if go:
        with _pressed("gen_result"):
            A.check_generation_input(method, prompt, settings)
            _run("gen_result", bar,
                 lambda tracker: A.generate(method, parts, md, prompt, settings, tracker))
    result = st.session_state.get("gen_result")
    if result is not None:
        bar.progress(1.0, text=result.summary)
        (_gallery if result.segments is None else _document)(result, "gen")


def _unclip_pipeline(md, path: str, device: str, needs: str):
    """The unCLIP pipeline, or None with a note (``needs``, then what the directory has) without clip and decoder."""
    if md.has("clip") and md.has("decoder"):
        return _parts("unclip", path, device)
    st.info(f"{needs}; this model directory has {', '.join(md.components)}.")
    return None


def variations_tab(md, path: str, device: str) -> None:
    pipe = _unclip_pipeline(md, path, device, "Variations need a clip and a decoder component")
    if pipe is None:
        return
    left, right = st.columns([1, 3])
    with left:
        upload = st.file_uploader("Image", key="var_upload", help="PNG, JPEG, WebP, BMP or GIF")
        image = None
        with _errors_shown():
            image = _uploaded_image(upload)
            if image is not None:
                st.image(A.for_display(image[1], 128), caption=image[0])
    with right:
        settings = _settings_row(A.VARIATION_OPTIONS, A.sample_defaults(md, "unclip", pipe), "var_")
        go = st.button("Make variations", type="primary", key="var_go")
    bar = st.empty()
    if go:
        with _pressed("var_result"):
            if image is None:
                raise GenvlError("no image: upload the image to make variations of"
                                 + (" (the uploaded file cannot be used)" if upload is not None else ""))
            A.check_settings(settings, ("seed", *A.VARIATION_OPTIONS))
            _run("var_result", bar, lambda tracker: A.variations(pipe, md, image[0], image[1], settings, tracker))
    result = st.session_state.get("var_result")
    if result is not None:
        bar.progress(1.0, text=result.summary)
        _gallery(result, "var")


def _endpoint(label: str, key: str):
    """A prompt, or (file name, image) of an upload; ("missing", None) when no image is uploaded yet."""
    kind = st.radio(label, ("Prompt", "Image"), horizontal=True, key=f"{key}_kind")
    if kind == "Prompt":
        return st.text_input(f"{label}: prompt", key=f"{key}_prompt", placeholder="a red heart")
    upload = st.file_uploader(f"{label}: image", key=f"{key}_upload")
    endpoint = _uploaded_image(upload)
    if endpoint is not None:
        st.image(A.for_display(endpoint[1], 96), caption=endpoint[0])
    return endpoint if endpoint is not None else ("missing", None)


def interpolate_tab(md, path: str, device: str) -> None:
    pipe = _unclip_pipeline(md, path, device,
                            "Interpolation needs a clip and a decoder component (and a prior for prompts)")
    if pipe is None:
        return
    ends = []
    for col, (label, key) in zip(st.columns(2), (("A", "int_a"), ("B", "int_b"))):
        with col, _errors_shown():
            ends.append(_endpoint(label, key))
    settings = _settings_row(A.INTERPOLATION_OPTIONS, A.sample_defaults(md, "unclip", pipe), "int_")
    go = st.button("Interpolate", type="primary", key="int_go")
    bar = st.empty()
    if go:
        with _pressed("int_result"):
            if len(ends) < 2:
                raise GenvlError("an endpoint cannot be used; see the message above it")
            for label, e in zip("AB", ends):
                if isinstance(e, tuple) and e[1] is None:
                    raise GenvlError(f"no image for {label}: upload one, or switch {label} to a prompt")
            a, b = ends
            for label, e in zip("AB", ends):
                if not isinstance(e, tuple):
                    A.check_prompt(e, f"prompt {label}")
            A.check_settings(settings, ("seed", *A.INTERPOLATION_OPTIONS))
            _run("int_result", bar, lambda tracker: A.interpolation(pipe, md, a, b, settings, tracker))
            result = st.session_state["int_result"]
            st.session_state["int_animation"] = A.gif_bytes([A.for_display(f, 256) for f in result.images])
    result = st.session_state.get("int_result")
    if result is not None:
        bar.progress(1.0, text=result.summary)
        shared = {k: v for k, v in result.metas[0].items() if k != "index"}  # the settings of every frame
        st.image(st.session_state["int_animation"], width=256, caption="animation: " + A.settings_caption(shared))
        st.download_button("Download GIF", data=result.gif, file_name="interpolation.gif", mime="image/gif",
                           key="int_download_gif")
        _gallery(result, "int")


def classify_tab(md, path: str, device: str) -> None:
    methods = A.classify_methods(md)
    if not methods:
        st.info(f"This model directory supports no zero-shot method (it has: {', '.join(md.components)}).")
        return
    defaults = A.classify_defaults()
    uploads = st.file_uploader("Images", accept_multiple_files=True, key="cls_upload")
    images = []
    bad = None
    for up in uploads or []:
        try:
            images.append(_uploaded_image(up))
        except GenvlError as e:
            bad = e
            st.error(str(e))
    c1, c2 = st.columns([2, 1])
    with c1:
        classes = st.text_input("Class names (comma-separated)", key="cls_classes",
                                placeholder="a red heart, a cat face, a slice of pizza")
    with c2:
        template = st.text_input("Prompt template (optional)", key="cls_template", placeholder="a photo of a {}",
                                 help="{} is replaced by each class name")
    c1, c2, c3 = st.columns([2, 1, 1])
    with c1:
        chosen = st.multiselect("Methods", methods, key="cls_methods",
                                default=[defaults["method"]] if defaults["method"] in methods else methods[:1],
                                help="clip: CLIP similarity; diffusion / prior: denoising error; ar: token-LM "
                                "likelihood")
    with c2:
        samples = st.number_input("Samples per class", value=int(defaults["samples"] or 0), step=1,
                                  key="cls_samples",
                                  help="diffusion / prior: (t, noise) samples per class; 0 = the method's default")
    with c3:
        seed = st.number_input("Seed", value=int(defaults["seed"]), step=1, min_value=0, max_value=A.MAX_SEED,
                               key="cls_seed")
    go = st.button("Classify", type="primary", key="cls_go")
    if go:
        with _pressed("cls_result"):
            if bad is not None:
                raise GenvlError(f"remove the file that cannot be used first ({bad})")
            names = A.check_classify_input(images, classes, template, chosen, int(samples) if samples else None)
            with st.spinner("Scoring ..."):
                clfs = {}
                for m in chosen:  # samples and seed matter to the Monte Carlo methods only
                    mc = m in ("diffusion", "prior")
                    clfs[m] = _classifier(path, m, device, int(samples) if mc and samples else None,
                                          int(seed) if mc else 0)
                st.session_state["cls_result"] = (A.classify_images(md, clfs, images, names, template or None),
                                                  [im for _, im in images])
    stored = st.session_state.get("cls_result")
    if stored is not None:
        _classification(*stored)


def _classification(res: A.Classification, images) -> None:
    import pandas as pd

    st.caption(" \u00b7 ".join(
        [f"Finished: {len(res.names)} image(s), {len(res.classes)} classes in {res.seconds:.1f} s"]
        + [f"{m}: temperature {res.temperatures[m]:g}, {res.evals_per_image[m]:g} evaluations per image"
           for m in res.probs]))
    for i, (name, image) in enumerate(zip(res.names, images)):
        cols = st.columns([1] + [2] * len(res.probs))
        with cols[0]:
            st.image(A.for_display(image, 128), caption=name)
        for col, (method, probs) in zip(cols[1:], res.probs.items()):
            row = probs[i]
            best = max(range(len(row)), key=row.__getitem__)
            with col:
                st.markdown(f"**{method}**: {res.classes[best]} ({row[best]:.1%})")
                df = pd.DataFrame({"class": res.classes, "probability": row})
                st.bar_chart(df, x="class", y="probability", horizontal=True, x_label="", y_label="probability",
                             height=max(120, 32 * len(res.classes) + 60))


def model_tab(md) -> None:
    st.markdown(f"**Model directory**: `{md.path}`")
    gen = ", ".join(m.label for m in A.generation_methods(md)) or "none"
    st.markdown(f"**Components**: {', '.join(md.components)} &nbsp; **Generation**: {gen} &nbsp; "
                f"**Zero-shot methods**: {', '.join(A.classify_methods(md)) or 'none'}")
    if md.meta.get("sampling"):
        st.markdown("**Recommended sampling settings** (genvl.json): "
                    + ", ".join(f"{k} {v}" for k, v in md.meta["sampling"].items()))
    st.divider()
    for kind, value in A.card_blocks(md):
        if kind == "image":
            st.image(value)
        else:
            st.markdown(value)


# ---------------------------------------------------------------------------------------- page
def main() -> None:
    st.set_page_config(page_title="genvl", layout="wide")
    st.sidebar.title("genvl")
    path = st.sidebar.text_input("Model directory", value=os.environ.get(MODEL_ENV, ""), key="model_path",
                                 help="a genvl model directory; empty: the built-in demo").strip()
    md = None
    with st.sidebar, _errors_shown():
        md = _open(path)
        device = _device()
        st.caption(f"{md.path.name}: {', '.join(md.components)} \u00b7 device {device}")
    if md is None:
        st.info("Open a model directory (left) to start.")
        return
    tabs = st.tabs(list(TABS))
    with tabs[0], _errors_shown():
        generate_tab(md, path, device)
    with tabs[1], _errors_shown():
        variations_tab(md, path, device)
    with tabs[2], _errors_shown():
        interpolate_tab(md, path, device)
    with tabs[3], _errors_shown():
        classify_tab(md, path, device)
    with tabs[4], _errors_shown():
        model_tab(md)


main()
