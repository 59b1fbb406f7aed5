"""Durability against power loss: before a model-directory component, ``genvl.json``, the model card or
a resume checkpoint is renamed into place, every file in it and every folder of it is flushed to disk
(``fsync``), and the parent folder is flushed after the rename. A power cut can only be simulated, so
these tests record the order of the system calls; ``GENVL_FSYNC=0`` turns the flushing off."""

import os
import sys
from pathlib import Path

import pytest

from genvl.checkpoint import open_model_dir, record_metrics, save_model_dir
from genvl.config import apply_overrides
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from rel_helpers import TRAIN_SET, build_tiny_model, small_shapes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


@pytest.fixture
def calls(monkeypatch):
    """Every fsync (with the path of its file descriptor) and every rename, in order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        log.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def check_durable(log, final: Path) -> None:
    """The rename that put ``final`` in place came after an fsync of each of its files and folders (under
    their temporary name), and the parent folder was flushed after it."""
    final = final.resolve()
    at = max(i for i, e in enumerate(log) if e[0] == "rename" and e[2] == str(final))
    src = Path(log[at][1])
    before = {e[1] for e in log[:at] if e[0] == "fsync"}
    paths = [final, *final.rglob("*")] if final.is_dir() else [final]
    for p in paths:
        assert str(src / p.relative_to(final)) in before or p == final and str(src) in before, \
            f"{p} was not flushed before its rename"
    assert ("fsync", str(final.parent)) in log[at + 1:], f"{final.parent} not flushed after the rename"


def test_model_directory_writes_are_flushed_before_their_rename(tmp_path, calls):
    src = open_model_dir(build_tiny_model(tmp_path / "src"))
    calls.clear()
    out = tmp_path / "out"
    save_model_dir(out, {"clip": src.load("clip"), "prior": src.load("prior")}, tokenizer=src.tokenizer())
    for name in ("clip", "prior", "tokenizer", "genvl.json", "README.md"):
        check_durable(calls, out / name)
    calls.clear()
    record_metrics(out, "retrieval", {"r@1": 1.0})
    check_durable(calls, out / "genvl.json")
    check_durable(calls, out / "README.md")


def test_checkpoint_is_flushed_before_its_rename(tmp_path, calls):
    data = small_shapes(tmp_path / "data")
    cfg = apply_overrides(TrainConfig(), [*TRAIN_SET, "max_steps=3", "save_every=2"])
    train(CLIPTask(cfg), str(data), tmp_path / "run", progress=False)
    (ck,) = (tmp_path / "run").rglob("step-00000002")
    check_durable(calls, ck)
    assert {p.name for p in ck.iterdir()} >= {"model.safetensors", "optimizer.bin", "trainer_state.json"}


def test_fsync_can_be_turned_off(tmp_path, calls, monkeypatch):
    src = open_model_dir(build_tiny_model(tmp_path / "src"))
    monkeypatch.setenv("GENVL_FSYNC", "0")
    calls.clear()
    save_model_dir(tmp_path / "out", {"clip": src.load("clip")}, tokenizer=src.tokenizer())
    assert not [e for e in calls if e[0] == "fsync"]
    assert open_model_dir(tmp_path / "out").load("clip") is not None  # still written whole (renamed into place)
