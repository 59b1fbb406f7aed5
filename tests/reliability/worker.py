"""The child side of the reliability suite, run with ``runpy.run_path`` in a forked process.

``JOB`` and ``ARGS`` arrive as globals (see ``rel_helpers.spawn``). Jobs:

- ``train``: a tiny CLIP run (``genvl.training.train``), writing one byte to ``ARGS["progress"]``
  per micro-batch so the parent can kill it at a chosen point. ``ARGS["env"]`` is added to the
  environment first (RANK, WORLD_SIZE, ... for one process of a DDP run); ``ARGS["nan_at"]``
  ``(rank, call)`` makes that rank's loss NaN at that call; ``ARGS["params"]`` receives the trained
  weights (``PARAMS.rankN.safetensors``). ``ARGS["hook"]`` makes the child SIGKILL itself at one
  moment of a checkpoint write:
    ``torn_write``    optimizer.bin half written inside the temporary checkpoint folder
    ``before_state``  accelerate's files written, before ema / tokenizer / trainer_state.json
    ``in_remove``     while an old checkpoint is being deleted (one file already gone)
    ``after_rename``  the new checkpoint renamed into place, old ones not yet deleted
- ``sample``: ``genvl.cli.main(ARGS["argv"])`` once the file ``ARGS["go"]`` exists; exits with its status.
- ``reserve``: ``reserve_path`` ``ARGS["n"]`` times for one stem, writing ``ARGS["tag"]`` into each file.

stdout goes to ``ARGS["log"]``, stderr to the same path with ``.err`` appended.
"""

import os
import signal
import sys
import time
from pathlib import Path

JOB = globals().get("JOB")
ARGS = globals().get("ARGS", {})


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_hook(hook: str) -> None:
    import shutil

    import torch
    from accelerate import Accelerator

    if hook == "torn_write":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and ".tmp-step-" in str(f) and Path(f).name == "optimizer.bin":
                import io

                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
                _die()
            return real_save(obj, f, *a, **k)

        torch.save = save
    elif hook == "before_state":
        real_state = Accelerator.save_state

        def save_state(self, *a, **k):
            real_state(self, *a, **k)
            _die()

        Accelerator.save_state = save_state
    elif hook == "in_remove":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            p = Path(path)
            if "step-" in p.name and not p.name.startswith(".tmp-") and (p / "model.safetensors").is_file():
                (p / "model.safetensors").unlink()
                _die()
            return real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    elif hook == "after_rename":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if Path(src).name.startswith(".tmp-step-"):
                _die()

        os.replace = replace
    elif hook:
        raise ValueError(f"unknown hook {hook!r}")


def train_job(a: dict) -> None:
    from genvl.config import apply_overrides
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.clip import CLIPTask

    os.environ.update(a.get("env", {}))
    rank = int(os.environ.get("RANK", "0"))
    fd = os.open(a["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    nan_rank, nan_call = a.get("nan_at") or (-1, -1)
    calls = []

    class Reporting(CLIPTask):
        def loss(self, model, batch):
            loss, extra = super().loss(model, batch)
            calls.append(1)
            os.write(fd, b".")
            if rank == nan_rank and len(calls) == nan_call:
                loss = loss * float("nan")
            return loss, extra

    _install_hook(a.get("hook"))
    cfg = apply_overrides(TrainConfig(), a["sets"])
    res = train(Reporting(cfg), a["data"], a["out"], resume="latest" if a.get("resume") else None, progress=False)
    if a.get("params"):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()},
                  f"{a['params']}.rank{rank}.safetensors")


def sample_job(a: dict) -> int:
    from genvl.cli import main

    go = Path(a["go"])
    while not go.exists():
        time.sleep(0.002)
    return main(list(a["argv"]))


def reserve_job(a: dict) -> None:
    from genvl.sampling.io import reserve_path

    for _ in range(a["n"]):
        p = reserve_path(Path(a["dir"]), a["stem"])
        with open(p, "a") as f:
            f.write(a["tag"] + "\n")
        print(p)


if __name__ == "__main__" and JOB:
    out = open(ARGS["log"], "w")
    err = open(ARGS["log"] + ".err", "w")
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every child: bit-exact comparisons
    code = {"train": train_job, "sample": sample_job, "reserve": reserve_job}[JOB](ARGS)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code or 0)
