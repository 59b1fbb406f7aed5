"""Bad input at every boundary, property-based: prompts (empty, 10k characters, control characters,
right-to-left, emoji, undecodable bytes), class names, out-of-range numbers, unknown options and junk
arguments for every subcommand, and recipe overrides. Every case ends in a result (exit 0) or in one
line on stderr with exit 2 -- never a traceback, never an "internal error" (exit 1). Prompts longer
than the text tower's context are truncated with a warning."""

import contextlib
import io
import logging
import math
import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from genvl.cli import main
from genvl.sampling.io import read_png_metadata
from genvl.training.config import DataConfig, TrainConfig
from rel_helpers import build_tiny_model, image, model_dir  # noqa: F401 (shared fixtures)

FAST = ["--steps", "1", "--prior-steps", "1", "--num-images", "1", "--no-progress"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)

# Text that has broken command-line tools before.
SPECIAL = [
    "", " ", "\t\n ", "\u3000", "x" * 10_000, "a red circle " * 800,
    "\x00", "\x00\x01\x07\x08\x7f", "\x1b[31mred\x1b[0m circle", "line one\nline two\r\n", "tab\there",
    "مرحبا بالعالم", "שלום עולם", "\u202eelcric der a\u202c", "\u200f\u200e\u200b\ufeff", "a\u0301\u0301\u0301",
    "🐱", "🐱‍👤🎉🏳️‍🌈👩🏽‍🚀", "🇫🇷🇯🇵", "Ǆǅǆ İı ß ﬁ", "𝔞 𝔯𝔢𝔡 𝔠𝔦𝔯𝔠𝔩𝔢", "一只红色的猫", "{}", "%s %d %n", "../../etc/passwd",
    "a\udcff\udc80 cat",  # bytes that were not UTF-8 on the command line (surrogateescape)
]
RTL = st.characters(min_codepoint=0x0590, max_codepoint=0x08FF)
ODD = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "So", "Sk"])
PROMPTS = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=60),
    st.text(alphabet=ODD, max_size=30),
    st.text(alphabet=st.one_of(RTL, st.sampled_from(" abc")), max_size=40),
    st.text(min_size=200, max_size=400),
)


@pytest.fixture(scope="module", autouse=True)
def in_a_scratch_dir(tmp_path_factory):
    """Relative paths a junk argument list might write to land in a scratch folder."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    env = os.environ.pop("GENVL_DEBUG", None)
    yield
    os.chdir(old)
    if env is not None:
        os.environ["GENVL_DEBUG"] = env


def run(argv: list[str]) -> tuple[int, str, str]:
    """``genvl ARGV`` in this process: (exit status, stdout, stderr). Any exception escapes (a failure)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage errors (2) and --help (0)
            code = e.code
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, err: str, argv) -> None:
    """Exit 0, or exit 2 with exactly one line on stderr saying what was wrong."""
    lines = [x for x in err.strip().splitlines() if not x.startswith("genvl: warning:")]
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(lines) == 1 and ": error: " in lines[0], (argv, err)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="out-", dir="."))


# ------------------------------------------------------------------------------------------ prompts
@settings(max_examples=30, **SETTINGS)
@given(prompt=PROMPTS)
def test_any_prompt_gives_images_or_one_line(model_dir, prompt):
    assume(not prompt.startswith("-"))  # those are options: see test_option_like_prompts
    out = scratch()
    argv = ["sample", prompt, "--model", str(model_dir), "--out", str(out), *FAST]
    code, stdout, err = run(argv)
    check_outcome(code, err, argv)
    if code == 0:
        (path,) = stdout.split("\n")[:-1]
        assert Path(path).parent == out and Path(path).is_file()
        assert read_png_metadata(path)["prompt"] == prompt
    else:
        assert not prompt.strip() or "\udcff" in prompt, err


@settings(max_examples=20, **SETTINGS)
@given(prompt=PROMPTS)
def test_any_prompt_with_the_token_lm(model_dir, prompt):
    assume(not prompt.startswith("-"))
    argv = ["sample", prompt, "--method", "ar", "--model", str(model_dir), "--out", str(scratch()), *FAST]
    code, _, err = run(argv)
    check_outcome(code, err, argv)


@settings(max_examples=20, **SETTINGS)
@given(names=st.lists(PROMPTS, max_size=4), template=st.one_of(st.none(), PROMPTS))
def test_any_class_names_and_template(model_dir, image, names, template):
    argv = ["classify", str(image), "--model", str(model_dir), "--classes", ",".join(names)]
    if template is not None:
        argv += ["--template", template]
    code, _, err = run(argv)
    check_outcome(code, err, argv)


@pytest.mark.parametrize("prompt", ["-x", "--bogus", "--steps", "-", "--"])
def test_option_like_prompts(model_dir, prompt):
    argv = ["sample", prompt, "--model", str(model_dir), "--out", str(scratch()), *FAST]
    check_outcome(*run(argv)[::2], argv)


# ------------------------------------------------------------------------------------------ numbers
BIG = st.integers(min_value=1001, max_value=10**40)
INTS = st.one_of(st.integers(max_value=0, min_value=-(10**40)), BIG, st.integers(1, 3))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300]))
JUNK = st.one_of(st.text(max_size=8), st.sampled_from(["", "1e3", "0x10", "1_000", "nan", "inf", "--", "½", "٣"]))

# option -> the values it gets (valid values are kept small: every example runs)
NUMBER_OPTIONS = {
    "--steps": INTS, "--prior-steps": INTS, "--num-images": st.integers(-(10**40), 2), "--seed": INTS,
    "--size": st.integers(-(10**40), 10**40), "--frames": st.integers(-(10**40), 3), "--guidance": FLOATS,
    "--prior-guidance": FLOATS, "--temperature": FLOATS, "--top-k": st.integers(-(10**40), 10**40),
    "--top-p": FLOATS, "--max-images": st.integers(-5, 5),
}


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_out_of_range_numbers(model_dir, data):
    option = data.draw(st.sampled_from(sorted(NUMBER_OPTIONS)))
    value = data.draw(st.one_of(NUMBER_OPTIONS[option].map(str), JUNK))
    method = "ar" if option in ("--temperature", "--top-k", "--top-p") else "unclip"
    extra = ["--interpolate", "a red circle", "a blue square"] if option == "--frames" else ["a red circle"]
    argv = ["sample", *extra, "--method", method, "--model", str(model_dir), "--out", str(scratch()), *FAST,
            f"{option}={value}"]
    code, _, err = run(argv)
    check_outcome(code, err, argv)
    if code == 0 and option in ("--guidance", "--prior-guidance"):
        assert math.isfinite(float(value)) and float(value) >= 0


# ------------------------------------------------------------------------------- junk arguments
TOKENS = st.one_of(
    st.sampled_from(["--bogus", "-z", "--steps", "--model", "--classes", "--set", "--data", "--out", "--method",
                     "--seed", "--", "-", "=", "--json", "--config", "--resume", "--init", "--template", "--help",
                     "--device", "cuda", "mps", "ar", "diffusion", "prior", "clip", "zero-shot", "retrieval",
                     "max_steps=1", "lr=oops", "model.size=huge", "{}", "-1", "0", "1e999", "nan"]),
    st.text(max_size=10),
)
# per subcommand: arguments that keep every run small and inside scratch folders
def tails(model_dir: Path, image: Path, out: Path) -> dict[str, list[str]]:
    return {
        "sample": ["--model", str(model_dir), "--out", str(out), *FAST],
        "train": ["--data", str(out / "no-such-data"), "--out", str(out / "run"), "--no-progress"],
        "classify": [str(image), "--model", str(model_dir)],
        "caption": [str(image), "--model", str(model_dir), "--max-tokens", "4"],
        "evaluate": ["--model", str(model_dir), "--data", str(out / "no-such-data"), "--limit", "2"],
        "info": [],
    }


@settings(max_examples=50, **SETTINGS)
@given(cmd=st.sampled_from(["sample", "train", "classify", "caption", "evaluate", "info"]),
       tokens=st.lists(TOKENS, max_size=5))
def test_junk_arguments_for_every_subcommand(model_dir, image, cmd, tokens):
    assume("--help" not in tokens and "-h" not in tokens)
    out = scratch()
    argv = [cmd, *tokens, *tails(model_dir, image, out)[cmd]]
    code, _, err = run(argv)
    check_outcome(code, err, argv)


@settings(max_examples=30, **SETTINGS)
@given(key=st.sampled_from([f.name for f in fields(TrainConfig)] + [f"data.{f.name}" for f in fields(DataConfig)]
                           + ["model.size", "model.embed_dim", "model.loss", "nope", "data.nope", "", "."]),
       value=st.one_of(INTS.map(str), FLOATS.map(str), JUNK, st.sampled_from(["[1, 2]", "{a: 1}", "null", "true"])))
def test_any_recipe_override(key, value):
    out = scratch()
    argv = ["train", "clip", "--data", str(out / "no-such-data"), "--out", str(out / "run"), "--no-progress",
            "--set", f"{key}={value}"]
    code, _, err = run(argv)
    assert code == 2  # a bad value, or else the missing data set
    check_outcome(code, err, argv)


@pytest.mark.parametrize("argv", [
    ["ui", "--port", "70000"], ["ui", "--port", "0"], ["ui", "--port", "http"],
    ["data", "check", ""], ["data", "check", "\x00"], ["data", "tokenize", ".", "--out", "x.txt"],
    ["sample", "a red circle", "--out", "/proc/no/such/dir"],
    ["classify", "IMAGE", "--classes-file", "LATIN1"], ["evaluate", "generation", "--prompts", "LATIN1"],
    ["classify", "IMAGE", "--classes", "a,b", "--json", "/proc/no/such.json"],
])
def test_more_boundaries(model_dir, image, argv):
    latin1 = Path("latin1.txt")
    latin1.write_bytes("caf\xe9\ncr\xe8me\n".encode("latin-1"))
    argv = [{"IMAGE": str(image), "LATIN1": str(latin1)}.get(a, a) for a in argv]
    extra = {"sample": FAST, "classify": [], "evaluate": []}
    if argv[0] in extra:
        argv = [*argv, "--model", str(model_dir), *extra[argv[0]]]
    code, _, err = run(argv)
    check_outcome(code, err, argv)
    assert code == 2


# --------------------------------------------------------------------------------- long prompts
def test_long_prompt_is_truncated_with_a_warning(model_dir, caplog):
    from genvl.checkpoint import open_model_dir
    from genvl.sampling.unclip import encode_prompts

    md = open_model_dir(model_dir)
    clip, tok = md.load("clip"), md.tokenizer()
    with caplog.at_level(logging.WARNING, logger="genvl"):
        short = encode_prompts(clip, tok, ["a red circle"])
        assert not caplog.records
        long = encode_prompts(clip, tok, ["a red circle " * 50, "x" * 10_000])
    assert long.embeds.shape == (2, short.embeds.shape[1]) and long.token_states.shape[1] == 8
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("longer than the text tower's 8; only the first 8 are used" in m for m in msgs)
    assert re.search(r"is 100\d\d tokens", msgs[1]) and "\n" not in msgs[1]


@pytest.mark.parametrize("method", ["unclip", "ar"])
def test_long_prompt_on_the_command_line_warns_and_samples(model_dir, caplog, method):
    argv = ["sample", "a red circle " * 100, "--method", method, "--model", str(model_dir), "--out", str(scratch()),
            *FAST]
    with caplog.at_level(logging.WARNING, logger="genvl"):
        code, stdout, err = run(argv)
    assert code == 0 and Path(stdout.strip()).is_file(), err
    (msg,) = [r.getMessage() for r in caplog.records if "longer than the text tower" in r.getMessage()]
    assert msg.startswith("genvl: warning: prompt 'a red circle a red circle")
