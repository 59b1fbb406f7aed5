"""Shared pieces of the reliability suite: tiny model directories, tiny training runs, checks that a
checkpoint on disk is whole, pickle payloads, and fast child processes.

Child processes are forked from a multiprocessing forkserver that has imported torch, accelerate,
transformers and genvl once, so a child starts in a fraction of a second instead of re-importing
everything; each is still a real process that SIGKILL ends. The child runs ``worker.py`` (see there).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
import runpy
import time
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, write_shapes_folder  # noqa: F401 (re-exported)

HERE = Path(__file__).parent
WORKER = HERE / "worker.py"

# Tiny CLIP training: 16 pairs, batch 8 (two batches an epoch), a checkpoint every two steps.
TRAIN_SET = ["batch_size=8", "warmup_steps=2", "log_every=1", "tokenizer_vocab=300", "text_len=8", "tracker=none",
             "keep_checkpoints=2", "ema_decay=0.9"]

# Files every complete CLIP checkpoint holds (single process, EMA on).
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "ema.safetensors",
                    "tokenizer", "trainer_state.json"}

PRELOAD = ["torch", "accelerate", "transformers.models.clip.modeling_clip", "matplotlib.pyplot", "genvl.cli",
           "genvl.training.trainer", "genvl.training.tasks.clip", "genvl.sampling.unclip", "genvl.data",
           "genvl.checkpoint"]


def small_shapes(root: Path, n: int = 16) -> Path:
    """An imagefolder of the first ``n`` (colour, shape) pairs of the shared fixture."""
    import json

    write_shapes_folder(root)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    for r in rows[n:]:
        (root / r["file_name"]).unlink()
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return root


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_problems(run_dir: Path) -> list[str]:
    """What is wrong with the checkpoints of ``run_dir/checkpoints`` (empty when every one is whole).

    A folder named ``step-N`` must hold every file, each readable: safetensors files load, the
    optimizer / scheduler / RNG pickles load with ``weights_only=True``, the tokenizer loads and
    ``trainer_state.json`` names step N.
    """
    import json

    from accelerate.utils import load
    from safetensors.torch import load_file

    from genvl.tokenizers.text import load_text_tokenizer

    problems = []
    root = run_dir / "checkpoints"
    for ck in sorted(root.glob("step-*")) if root.is_dir() else []:
        have = {p.name for p in ck.iterdir()}
        if have != CHECKPOINT_FILES:
            problems.append(f"{ck.name}: files {sorted(have)}")
            continue
        try:
            for name in ("model.safetensors", "ema.safetensors"):
                load_file(str(ck / name))
            for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
                load(ck / name)
            load_text_tokenizer(ck / "tokenizer")
            state = json.loads((ck / "trainer_state.json").read_text())
        except Exception as e:  # noqa: BLE001 - any failure is a finding
            problems.append(f"{ck.name}: {type(e).__name__}: {e}")
            continue
        if f"step-{state['step']:08d}" != ck.name:
            problems.append(f"{ck.name}: trainer_state.json says step {state['step']}")
    return problems


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def released_params(model_dir: Path) -> dict[str, torch.Tensor]:
    from genvl.checkpoint import open_model_dir

    return open_model_dir(model_dir).load("clip").state_dict()


# ---------------------------------------------------------------------------------------- pickles
class Payload:
    """Unpickling this object runs code: it writes ``marker``. Never loaded except as the control."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def payload_bytes(marker: Path, kind: str = "torch") -> bytes:
    """A file that runs code when unpickled: ``torch`` (a torch.save zip archive) or ``pickle`` (plain)."""
    if kind == "pickle":
        return pickle.dumps({"state": Payload(marker)})
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- children
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def spawn(job: str, log: Path, **args):
    """Start ``worker.py`` as a child process doing ``job``; its stdout and stderr go to ``log``."""
    p = _context().Process(target=runpy.run_path, args=(str(WORKER),),
                           kwargs={"init_globals": {"JOB": job, "ARGS": {**args, "log": str(log)}},
                                   "run_name": "__main__"})
    p.start()
    return p


def wait(p, timeout: float = 120.0) -> int:
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"child {p.pid} still running after {timeout} s")
    return p.exitcode


def wait_for(predicate, timeout: float = 60.0, poll: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory, built once per test module (import this fixture by name)."""
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small red PNG, once per test module (import this fixture by name)."""
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(p)
    return p
