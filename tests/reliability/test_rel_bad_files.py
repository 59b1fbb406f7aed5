"""Bad files. In a dataset: corrupt, truncated, zero-byte, decompression-bomb, wrong-extension,
unreadable, missing and directory "images" are skipped and counted and the run finishes. As a model
or a resume checkpoint: a corrupt or truncated safetensors file, a missing component or file, a
config that does not match the weights is a one-line error naming the file."""

import io
import json
import logging
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import genvl.data.images as images_module
from genvl.cli import main
from genvl.config import apply_overrides
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.trainer import stage_dir
from rel_helpers import TRAIN_SET, build_tiny_model, small_shapes

SETS = TRAIN_SET + ["max_steps=3", "save_every=0"]
SAMPLE = ["--out", "OUT", "--steps", "1", "--prior-steps", "1", "--num-images", "1", "--no-progress"]


def png_header(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(fmt: str, size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


# name -> (content, reason it is skipped for; None: a good image that must be kept)
def bad_files() -> dict[str, tuple[bytes | None, str | None]]:
    png, jpeg = encoded("PNG"), encoded("JPEG")
    return {
        "corrupt.png": (os.urandom(400), "not an image"),
        "truncated.png": (png[: len(png) // 2], ""),
        "zero.png": (b"", "empty file"),
        "bomb.png": (png_header(30_000, 30_000), "decompression bomb"),
        "bomb_below_pil_limit.png": (png_header(9_000, 8_000), "decompression bomb"),
        "text_named.jpg": (b"this is a caption, not a picture\n", "not an image"),
        "html_named.webp": (b"<html><body>hi</body></html>", "not an image"),
        "locked.png": (png, "permission denied"),
        "folder.png": (None, "is a directory"),
        "missing.png": (None, "file not found"),
        "png_named.jpg": (png, None),  # the wrong extension on a good image: read by content, kept
        "jpeg_named.png": (jpeg, None),
    }


def salted_folder(root: Path) -> tuple[Path, dict]:
    small_shapes(root)
    files = bad_files()
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    for name, (data, _) in files.items():
        if name == "folder.png":
            (root / name).mkdir()
        elif data is not None:
            (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": f"file {name}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, files


@pytest.fixture
def deny_locked(monkeypatch):
    """``locked.png`` cannot be opened (as chmod 000 does for anyone but root)."""
    real_open = open

    def guarded(path, *a, **k):
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(images_module, "open", guarded, raising=False)


def test_training_skips_and_counts_every_bad_image(tmp_path, deny_locked, capsys):
    root, files = salted_folder(tmp_path / "salted")
    bad = {n: r for n, (_, r) in files.items() if r is not None}
    res = train(CLIPTask(apply_overrides(TrainConfig(), SETS)), root, tmp_path / "run", progress=False)
    assert res.step == 3 and res.skipped_files == len(bad)
    out = capsys.readouterr().out
    assert f"skipped {len(bad)} bad file(s)" in out
    for name, reason in bad.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(f"skipped {root / name}:"))
        assert reason in line, line
    record = json.loads((tmp_path / "run" / "genvl.json").read_text())["training"]["clip"]
    assert record["skipped"] == len(bad) and record["pairs"] == 16 + len(files) - len(bad)


def test_without_validation_bad_images_fail_at_decode_and_the_run_finishes(tmp_path, deny_locked, caplog):
    root, files = salted_folder(tmp_path / "salted")
    cfg = apply_overrides(TrainConfig(), SETS + ["data.validate=false", "max_steps=4"])
    with caplog.at_level(logging.WARNING, logger="genvl.data.datasets"):
        res = train(CLIPTask(cfg), root, tmp_path / "run", progress=False)
    assert res.step == 4
    warned = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert warned and all("\n" not in w for w in warned)
    assert len(warned) == len(set(warned))  # each bad file once


def test_tar_shard_with_bad_members_trains(tmp_path):
    src = small_shapes(tmp_path / "shapes")
    rows = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    members = {}
    for i, r in enumerate(rows):
        members[f"{i:04d}.png"] = (src / r["file_name"]).read_bytes()
        members[f"{i:04d}.txt"] = r["text"].encode()
    for j, (name, (data, reason)) in enumerate(bad_files().items()):
        if data is not None and reason not in (None, "permission denied"):
            members[f"bad{j}.{name.rsplit('.', 1)[1]}"] = data
            members[f"bad{j}.txt"] = b"bad member"
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = train(CLIPTask(apply_overrides(TrainConfig(), SETS)), shard, tmp_path / "run", progress=False)
    assert res.step == 3 and res.skipped_files == 7


# ----------------------------------------------------------------------------- model directories
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model")


def _truncate(p: Path, keep: float = 0.5):
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


def _edit_json(p: Path, **changes):
    data = json.loads(p.read_text())
    data.update(changes)
    p.write_text(json.dumps(data))


# case -> (damage to a copy of the model directory, the path the message must name)
MODEL_FAULTS = {
    "random bytes as weights": (lambda d: (d / "clip/model.safetensors").write_bytes(os.urandom(2000)),
                                "clip/model.safetensors"),
    "weights cut in half": (lambda d: _truncate(d / "prior/model.safetensors"), "prior/model.safetensors"),
    "weights missing their last bytes": (lambda d: _truncate(d / "decoder/model.safetensors", 0.999),
                                         "decoder/model.safetensors"),
    "zero-byte weights": (lambda d: (d / "clip/model.safetensors").write_bytes(b""), "clip/model.safetensors"),
    "no weights file": (lambda d: (d / "prior/model.safetensors").unlink(), "prior"),
    "component folder missing": (lambda d: shutil.rmtree(d / "decoder"), "decoder"),
    "config.json missing": (lambda d: (d / "clip/config.json").unlink(), "clip"),
    "config.json not JSON": (lambda d: (d / "prior/config.json").write_text("{ not json"), "prior/config.json"),
    "config wider than the weights": (lambda d: _edit_json(d / "prior/config.json", head_dim=2 * json.loads(
        (d / "prior/config.json").read_text())["head_dim"]), "prior/model.safetensors"),
    "another component's weights": (lambda d: shutil.copy(d / "prior/model.safetensors", d / "decoder"),
                                    "decoder/model.safetensors"),
    "tokenizer missing": (lambda d: shutil.rmtree(d / "tokenizer"), "."),  # "DIR: missing tokenizer/ folder"
    "genvl.json truncated": (lambda d: _truncate(d / "genvl.json"), "genvl.json"),
    "unknown component class": (lambda d: _edit_json(d / "genvl.json", components={
        **json.loads((d / "genvl.json").read_text())["components"], "clip": "os.system"}), "genvl.json"),
}


@pytest.mark.parametrize("case", list(MODEL_FAULTS))
def test_damaged_model_directory_is_one_line_naming_the_file(model_dir, tmp_path, capsys, case):
    damage, names = MODEL_FAULTS[case]
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    damage(d)
    argv = ["sample", "a red circle", "--model", str(d)] + [str(tmp_path / "o") if a == "OUT" else a for a in SAMPLE]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("genvl sample: error: "), err
    assert str(d / names) in err, err


# ------------------------------------------------------------------------------- resume state
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A CLIP run stopped after step 2, with its checkpoint."""
    root = tmp_path_factory.mktemp("r")
    data = small_shapes(root / "shapes")
    cfg = apply_overrides(TrainConfig(), TRAIN_SET + ["max_steps=4", "save_every=2"])
    train(CLIPTask(cfg), data, root / "run", progress=False, stop_after=2)
    return data, root / "run"


CHECKPOINT_FAULTS = {
    "optimizer state cut in half": lambda c: _truncate(c / "optimizer.bin"),
    "zero-byte scheduler state": lambda c: (c / "scheduler.bin").write_bytes(b""),
    "RNG state missing": lambda c: (c / "random_states_0.pkl").unlink(),
    "RNG state truncated": lambda c: _truncate(c / "random_states_0.pkl"),
    "model weights truncated": lambda c: _truncate(c / "model.safetensors"),
    "EMA weights truncated": lambda c: _truncate(c / "ema.safetensors"),
    "trainer_state.json truncated": lambda c: _truncate(c / "trainer_state.json"),
    "model changed since the checkpoint": None,  # --set model.embed_dim=16 on resume
}


@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_damaged_checkpoint_is_one_line_naming_it(stopped_run, tmp_path, capsys, case):
    data, run = stopped_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ck = stage_dir(out, "clip") / "checkpoints" / "step-00000002"
    extra = []
    if CHECKPOINT_FAULTS[case] is None:
        extra = ["--set", "model.embed_dim=16"]
    else:
        CHECKPOINT_FAULTS[case](ck)
    code = main(["train", "clip", "--data", str(data), "--out", str(out), "--resume", "latest", "--no-progress",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("genvl train: error: ") and str(ck) in err, err
