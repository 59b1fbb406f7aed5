"""Crash and resume: a training process killed with SIGKILL, at random points and at every moment of
a checkpoint write, resumes from its last complete checkpoint and ends bit-identical to a run that
was never interrupted; no checkpoint on disk is ever half-written."""

import json
import random
import signal
import time

from safetensors.torch import load_file

from genvl.training.trainer import find_checkpoint, stage_dir
from rel_helpers import (
    TRAIN_SET,
    checkpoint_problems,
    file_size,
    released_params,
    small_shapes,
    spawn,
    wait,
    wait_for,
)

STEPS = 20
SETS = TRAIN_SET + [f"max_steps={STEPS}", "save_every=2"]
# (hook, random kill point) per interrupted run: None = SIGKILL from outside after a seeded random
# number of micro-batches plus a random delay (which may fall inside a checkpoint write).
TRIALS = [None, "torn_write", None, "before_state", None, "in_remove", None, "after_rename"]
SEED = 9


def _log_rows(out):
    rows = [json.loads(x) for x in (stage_dir(out, "clip") / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def test_sigkill_at_random_points_and_during_checkpoint_writes(tmp_path):
    data = small_shapes(tmp_path / "shapes")
    rng = random.Random(SEED)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = spawn("train", tmp_path / "ref.log", data=str(data), out=str(ref), sets=SETS,
              progress=str(tmp_path / "ref.progress"))
    assert wait(p) == 0, (tmp_path / "ref.log.err").read_text()[-3000:]

    run_dir = stage_dir(cut, "clip")
    latest = None
    for i, hook in enumerate(TRIALS):
        progress, log = tmp_path / f"cut{i}.progress", tmp_path / f"cut{i}.log"
        p = spawn("train", log, data=str(data), out=str(cut), sets=SETS, resume=i > 0, hook=hook,
                  progress=str(progress))
        if hook is None:
            k = rng.randint(1, 3)  # micro-batches this process trains before the kill
            assert wait_for(lambda: file_size(progress) >= k or p.exitcode is not None), f"trial {i} made no progress"
            time.sleep(rng.uniform(0.0, 0.08))  # a random moment after it
            p.kill()
        code = wait(p)
        text, err = log.read_text(), (tmp_path / f"cut{i}.log.err").read_text()
        assert code == -signal.SIGKILL, f"trial {i} ({hook}): exit {code}\n{text[-2000:]}\n{err[-3000:]}"
        # it started from the newest complete checkpoint there was
        if latest is None:
            assert i == 0 or "starting from step 0" in text, text
        else:
            assert f"resumed from {latest} " in text, (i, hook, latest, text)
        # every checkpoint left on disk is whole, and none that was complete has been lost
        assert checkpoint_problems(run_dir) == [], (i, hook)
        now = find_checkpoint(run_dir, "latest")
        assert latest is None or (now is not None and now.name >= latest.name), (i, hook, latest, now)
        latest = now
    assert latest is not None and not (cut / "genvl.json").exists()

    # a log row cut short by the crash is dropped on resume
    with (run_dir / "log.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')
    p = spawn("train", tmp_path / "final.log", data=str(data), out=str(cut), sets=SETS, resume=True,
              progress=str(tmp_path / "final.progress"))
    assert wait(p) == 0, (tmp_path / "final.log.err").read_text()[-3000:]
    assert f"resumed from {latest} " in (tmp_path / "final.log").read_text()
    assert checkpoint_problems(run_dir) == []

    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
    last = f"checkpoints/step-{STEPS:08d}/model.safetensors"
    raw_a, raw_b = load_file(str(stage_dir(ref, "clip") / last)), load_file(str(run_dir / last))
    assert all(raw_a[k].equal(raw_b[k]) for k in raw_a)
    a, b = released_params(ref), released_params(cut)  # the EMA weights
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"{k}: resumed run differs from the uninterrupted one"
    assert _log_rows(cut) == _log_rows(ref)
