"""Numerical faults: a NaN / inf loss or a NaN gradient, injected at a chosen micro-batch, stops the
run with a one-line message naming the last good checkpoint (which stays byte-for-byte intact and
resumes), or skips the batch when ``on_nonfinite=skip``."""

import socket

import pytest
import torch
from safetensors.torch import load_file

from genvl.cli import main
from genvl.config import apply_overrides
from genvl.errors import TrainingError
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.trainer import find_checkpoint, stage_dir
from rel_helpers import TRAIN_SET, checkpoint_problems, released_params, small_shapes, spawn, tree_digest, wait

SETS = TRAIN_SET + ["max_steps=6", "save_every=2"]


class _NaNGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Fault(CLIPTask):
    """CLIP training with a fault at the ``at``-th loss call (every call from then on with ``persist``).

    ``kind``: "nan" or "inf" loss, or "grad" (finite loss, NaN gradient). The checkpoints on disk at
    the moment of the fault are recorded in ``digest``.
    """

    def __init__(self, cfg, kind: str, at: int, run_dir=None, persist: bool = False):
        super().__init__(cfg)
        self.kind, self.at, self.run_dir, self.persist = kind, at, run_dir, persist
        self.calls, self.digest = 0, None

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        self.calls += 1
        if self.calls == self.at or (self.persist and self.calls > self.at):
            if self.digest is None and self.run_dir is not None:
                self.digest = tree_digest(self.run_dir / "checkpoints")
            if self.kind == "grad":
                loss = _NaNGrad.apply(loss)
            else:
                loss = loss * float(self.kind)
        return loss, extra


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_shapes(tmp_path_factory.mktemp("d") / "shapes")


def _finite(params):
    return all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())


@pytest.mark.parametrize("kind,what", [("nan", "loss"), ("grad", "gradient")])
def test_stop_keeps_last_good_checkpoint_intact(data, tmp_path, kind, what):
    out = tmp_path / "run"
    run_dir = stage_dir(out, "clip")
    task = Fault(apply_overrides(TrainConfig(), SETS), kind, at=5, run_dir=run_dir)
    with pytest.raises(TrainingError, match=rf"non-finite {what} \(.*\) at step 5; training stopped, last good "
                                            rf"checkpoint: .*step-00000004") as e:
        train(task, data, out, progress=False)
    assert "\n" not in str(e.value)
    assert tree_digest(run_dir / "checkpoints") == task.digest  # not a byte changed after the fault
    assert checkpoint_problems(run_dir) == []
    from safetensors.torch import load_file

    last = find_checkpoint(run_dir, "latest")
    assert last.name == "step-00000004"
    assert all(torch.isfinite(v).all() for v in load_file(str(last / "model.safetensors")).values())
    if kind == "grad":  # and the run resumes from it to the end
        res = train(CLIPTask(apply_overrides(TrainConfig(), SETS)), data, out, resume="latest", progress=False)
        assert res.step == 6 and _finite(released_params(out))


@pytest.mark.parametrize("kind,sets", [("inf", []), ("grad", ["max_grad_norm=0"])])
def test_skip_mode_skips_the_batch_and_finishes(data, tmp_path, capsys, kind, sets):
    cfg = apply_overrides(TrainConfig(), SETS + ["on_nonfinite=skip", *sets])
    res = train(Fault(cfg, kind, at=3), data, tmp_path / "run", progress=False)
    assert res.step == 6 and res.final_loss == res.final_loss
    what = "gradient" if kind == "grad" else "loss"
    assert f"genvl: non-finite {what} (" in capsys.readouterr().out
    assert _finite(released_params(tmp_path / "run"))


def test_skip_mode_gives_up_after_eleven_bad_batches_in_a_row(data, tmp_path):
    cfg = apply_overrides(TrainConfig(), SETS + ["on_nonfinite=skip", "max_steps=20"])
    with pytest.raises(TrainingError, match="non-finite gradient .* training stopped"):
        train(Fault(cfg, "grad", at=3, persist=True), data, tmp_path / "run", progress=False)
    assert checkpoint_problems(stage_dir(tmp_path / "run", "clip")) == []


def test_cli_reports_a_nonfinite_gradient_in_one_line(data, tmp_path, capsys, monkeypatch):
    import genvl.training.tasks as tasks

    monkeypatch.setattr(tasks, "get_task", lambda stage, cfg: Fault(cfg, "grad", at=3))
    code = main(["train", "clip", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress",
                 *[a for s in SETS for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("genvl train: error: non-finite gradient (norm nan) at step 3; training stopped, last good "
                          "checkpoint: ") and len(err.strip().splitlines()) == 1, err


def test_ddp_a_nan_on_one_process_is_skipped_by_all(data, tmp_path):
    """Two CPU processes (gloo); rank 1 alone sees a NaN loss at its third batch. Both skip it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [x for x in SETS if not x.startswith("batch_size")] + ["batch_size=4", "on_nonfinite=skip"]
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(spawn("train", tmp_path / f"rank{rank}.log", data=str(data), out=str(tmp_path / "run"), sets=sets,
                           env=env, nan_at=(1, 3), params=str(tmp_path / "params"), progress=str(tmp_path / "p")))
    for rank, p in enumerate(procs):
        assert wait(p) == 0, (tmp_path / f"rank{rank}.log.err").read_text()[-3000:]
    assert "genvl: non-finite loss on another process at step 3; batch skipped" in (tmp_path / "rank0.log").read_text()
    r0, r1 = (load_file(str(tmp_path / f"params.rank{r}.safetensors")) for r in range(2))
    for k in r0:
        assert torch.isfinite(r0[k]).all() and r0[k].equal(r1[k]), k
