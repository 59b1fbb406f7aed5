"""The trainer on streamed shards: two processes (torchrun, gloo) see every sample of an epoch
exactly once; after a SIGKILL mid-epoch, the resumed run sees exactly the samples not consumed
before the checkpoint, with two processes or with one; bad samples are summed over processes."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from genvl.errors import TrainingError
from stream_shards import write_shards

WORKER = Path(__file__).with_name("stream_worker.py")
STEPS, SAVE_EVERY, KILL_AT = 10, 3, 4  # stream_worker.py checkpoints every 3 steps


def _launch(args, nproc, expect_ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [str(WORKER), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _consumed(results: Path, up_to: int | None = None) -> list[str]:
    """Sample ids the loss saw, in every rank's log, from steps <= up_to."""
    out = []
    for log in results.glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if up_to is None or row["step"] <= up_to:
                out += row["ids"]
    return out


def _epoch0(ids: list[str]) -> Counter:
    return Counter(i for i in ids if i.startswith("0|"))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Two processes killed at step 4 (last checkpoint: step 3), and the good samples of the set."""
    root = tmp_path_factory.mktemp("stream")
    good = write_shards(root / "shards", n_shards=8, per_shard=5)
    (root / "first").mkdir()
    r = _launch([root / "shards", root / "out", root / "first", STEPS, "--kill-at", KILL_AT], nproc=2, expect_ok=False)
    assert r.returncode != 0, "the main process was to be killed"
    assert (root / "out" / "train" / "clip" / "checkpoints" / f"step-{SAVE_EVERY:08d}").is_dir(), r.stderr[-2000:]
    return root, len(good)


def test_two_processes_resume_a_killed_epoch_exactly(killed_run):
    root, n_good = killed_run
    before = _consumed(root / "first", up_to=SAVE_EVERY)
    assert len(before) == SAVE_EVERY * 2 * 3  # 3 steps x 2 processes x batch 3
    assert max(Counter(before).values()) == 1
    out = root / "out2"
    shutil.copytree(root / "out", out)
    (root / "second").mkdir()
    _launch([root / "shards", out, root / "second", STEPS, "--resume", "--first-step", SAVE_EVERY], nproc=2)
    after = _consumed(root / "second")
    seen = _epoch0(before) + _epoch0(after)
    assert len(seen) == n_good, f"epoch 0 saw {len(seen)} distinct samples of {n_good}"
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1]
    assert not set(_epoch0(before)) & set(_epoch0(after)), "a consumed sample was read again after resume"
    # bad samples: counted per process, summed over processes in the log
    per_rank = sum(json.loads(p.read_text())["skipped"] for p in (root / "second").glob("rank*.json"))
    rows = [json.loads(x) for x in (out / "train" / "clip" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STEPS and rows[-1]["skipped_samples"] == per_rank >= 1
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["training"]["clip"]["streamed_shards"] == 8 and "pairs" not in meta["training"]["clip"]


def test_one_process_resumes_a_two_process_checkpoint_exactly(killed_run):
    """With another number of processes, the shards change owners but the position is kept per
    shard: every sample not consumed before the checkpoint is still seen exactly once."""
    root, n_good = killed_run
    before = _consumed(root / "first", up_to=SAVE_EVERY)
    out = root / "out1"
    shutil.copytree(root / "out", out)
    (root / "single").mkdir()
    _launch([root / "shards", out, root / "single", STEPS, "--resume", "--first-step", SAVE_EVERY], nproc=1)
    seen = _epoch0(before) + _epoch0(_consumed(root / "single"))
    assert len(seen) == n_good and max(seen.values()) == 1


def test_a_stage_that_cannot_stream_says_so(tmp_path):
    from genvl.config import apply_overrides
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.clip import CLIPTask

    class IndexedTask(CLIPTask):
        streams = False
        stage = "indexed"

    write_shards(tmp_path / "s", n_shards=2, per_shard=3, bad=False)
    cfg = apply_overrides(TrainConfig(), ["data.streaming=true", "tracker=none", "max_steps=1"])
    with pytest.raises(TrainingError, match="cannot stream"):
        train(IndexedTask(cfg), str(tmp_path / "s"), tmp_path / "out", progress=False)
