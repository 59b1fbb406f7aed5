"""A stage's run folder (``OUT/train/STAGE``, see :mod:`genvl.training.trainer`): resume checkpoints,
the loss log and its plot, and the released model directory written at the end of a run."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from genvl.checkpoint import follow_refs, save_model_dir
from genvl.config import to_dict
from genvl.errors import TrainingError, describe_load_error

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"


def stage_dir(out_dir: str | Path, stage: str) -> Path:
    """Where a stage keeps its recipe, log, checkpoints and samples inside ``out_dir``."""
    return Path(out_dir) / "train" / stage


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``latest`` -> newest complete ``run_dir/checkpoints/step-N``; otherwise a path."""
    if resume != "latest":
        p = Path(resume)
        if not (p / STATE_NAME).is_file():
            raise TrainingError(f"not a complete checkpoint: {p} (no {STATE_NAME})")
        return p
    root = run_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_resume_state(accelerator, ckpt: Path) -> dict:
    """``accelerator.load_state`` with every pickle read as ``weights_only=True``; returns the trainer state.

    Any failure (a refused pickle, a truncated file, shapes that do not fit the model) is one
    :class:`TrainingError` naming the checkpoint folder.

    accelerate reads the model from safetensors and the optimizer, scheduler and RNG states with
    ``torch.load(weights_only=True)``, which refuses to build anything but tensors and plain
    containers. Two gaps are closed here: a folder without ``model.safetensors`` would make it read
    pickled ``pytorch_model.bin`` weights instead, and an RNG state that fails to load is only
    logged by accelerate, so the resumed run would silently draw different random numbers.
    """
    from accelerate.utils import DistributedType, load

    try:
        if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            if not (ckpt / "model.safetensors").is_file():
                raise TrainingError(f"{ckpt}: no model.safetensors (genvl never loads pickled weights)")
        load(ckpt / f"random_states_{accelerator.process_index}.pkl")  # weights_only=True
        accelerator.load_state(str(ckpt), load_kwargs={"weights_only": True})
        return json.loads((ckpt / STATE_NAME).read_text())
    except TrainingError:
        raise
    except Exception as e:  # noqa: BLE001 - refused pickles, truncated files, mismatched shapes
        why = f"{type(e).__name__}: {describe_load_error(e)}"
        raise TrainingError(f"{ckpt}: cannot load the resume state ({why})") from e


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, renaming it first: a crash midway leaves a ``.del-`` folder, never a
    half-deleted ``step-N`` that still looks complete."""
    if not path.exists():
        return
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_log(path: Path) -> list[dict]:
    """The rows of ``log.jsonl``; a line cut short (a crash or a full disk while writing) is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def hardware_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def plot_loss(log_path: Path, png_path: Path, title: str) -> None:
    """Draw loss against step from ``train_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def release_state_dicts(task, accelerator, prepared, model, ema) -> dict[str, dict]:
    """Full (gathered) weights of each component of ``model``, the EMA ones when EMA is on.

    ``prepared`` is what accelerate wraps: ``model`` or the part of it that trains
    (:meth:`~genvl.training.trainer.Task.trainable`); the EMA follows that part's trained parameters.
    Called on every process: under FSDP gathering the state dict is a collective operation.
    """
    trained = accelerator.unwrap_model(prepared)
    params = [p for p in trained.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        out = {}
        for name, module in task.components(model).items():
            sd = accelerator.get_state_dict(prepared) if module is trained else module.state_dict()
            out[name] = {k: v.detach().to("cpu").clone() for k, v in sd.items()} if sd is not None else None
        return out
    finally:
        if ema is not None:
            ema.restore(params)


def write_checkpoint(accelerator, run_dir: Path, state: dict, ema, tokenizer, keep: int) -> Path:
    """Write the resume state of ``state["step"]`` to ``run_dir/checkpoints/step-N`` (every process).

    Written into a temporary folder and renamed into place, ``trainer_state.json`` last, so a folder
    named ``step-N`` is always complete; only the newest ``keep`` checkpoints stay.
    """
    main = accelerator.is_main_process
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"step-{state['step']:08d}", root / f".tmp-step-{state['step']:08d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its part before the rename
    if main:
        if ema is not None:
            from safetensors.torch import save_file

            save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                      str(tmp / "ema.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # trainer_state.json is written last: its presence marks the folder complete.
        (tmp / STATE_NAME).write_text(json.dumps(state))
        from genvl.checkpoint import fsync_dir, fsync_tree

        fsync_tree(tmp)  # every file on disk before the rename (power loss; GENVL_FSYNC=0 skips)
        remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())
        for old in done[:-keep]:
            remove_checkpoint(old)
        for stale in root.glob(".del-step-*"):  # left by a crash while deleting
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def restart_log(log_path: Path, step: int) -> list[dict]:
    """Keep the rows of ``log.jsonl`` up to ``step`` (later ones belong to a run that was cut off);
    returns them."""
    if not log_path.is_file():
        return []
    history = [r for r in read_log(log_path) if r["step"] <= step]
    tmp = log_path.with_name(f".{log_path.name}.tmp")  # renamed into place: a crash keeps the old log
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, log_path)
    return history


def release_model_dir(task, model, state_dicts, out_dir, init_dir, cfg, state, dataset, data_path, command, last_loss) -> None:
    """Write the model directory: components, tokenizer, card."""
    import yaml

    comps = task.components(model)
    lora = cfg.lora_rank > 0
    refs = {}
    # Finetuning keeps the other components of the model it started from: copies, or with LoRA
    # references, so that the finetuned directory holds little besides the adapter weights.
    if init_dir is not None:
        for name in init_dir.components:
            if name in comps or (out_dir / name).exists():
                continue
            if lora:
                refs[name] = (init_dir.components[name], init_dir.path / name)
            else:
                shutil.copytree(init_dir.path / name, out_dir / name)
        from genvl.checkpoint import model_dir_hash, model_ref, write_meta

        if not (out_dir / "genvl.json").exists():
            # A new directory describes itself: the components it carries, the base it started from
            # (path and hash; the base's own training and metrics stay in the base's card) and the
            # base's recommended sampling settings, which its components were tuned with.
            base = init_dir.meta
            meta = {"format": base["format"], "genvl_version": base.get("genvl_version"),
                    "components": {k: v for k, v in base["components"].items() if (out_dir / k).exists() or k in refs},
                    "tokenizer": base.get("tokenizer", "tokenizer"), "training": {}, "metrics": {},
                    "base": {"model": model_ref(init_dir.path), "sha256": model_dir_hash(init_dir.path)}}
            if base.get("sampling"):
                meta["sampling"] = dict(base["sampling"])
            write_meta(out_dir, meta)
    record = {
        "data": str(data_path), "steps": state["step"],
        **({"pairs": len(dataset), "skipped": len(dataset.skipped)} if getattr(dataset, "format", "") != "stream"
           else {"streamed_shards": dataset.num_shards}),
        "batch_size": f"{cfg.batch_size} x {cfg.grad_accum} accumulation",
        "samples_seen": state["samples_seen"], "time": f"{state['seconds']:.0f} s", "hardware": hardware_name(),
        "final_loss": last_loss, "command": command or "", "recipe": yaml.safe_dump(to_dict(cfg), sort_keys=False),
    }
    if init_dir is not None:
        record["init"] = str(init_dir.path)
        if getattr(task, "fresh", False) and init_dir.has(task.component):
            record["fresh"] = True  # built new, replacing the init directory's component
    adapters = None
    if lora:
        record["lora"] = f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}"
        adapters = {name: {"base": follow_refs(init_dir.path / name), "rank": cfg.lora_rank, "alpha": cfg.lora_alpha or None,
                           "targets": cfg.lora_targets or None} for name in comps}
    save_model_dir(out_dir, comps, tokenizer=task.tokenizer, state_dicts=state_dicts, training={task.component: record},
                   adapters=adapters, refs=refs)


def check_lora(task, init_dir, out_dir: Path) -> None:
    """LoRA finetunes a component of ``--init`` into a new directory that refers to it."""
    if init_dir is None or not init_dir.has(task.component):
        raise TrainingError(
            f"lora_rank > 0 finetunes an existing {task.component} with LoRA: give --init DIR holding one "
            "(e.g. --init demo)"
        )
    base = follow_refs(init_dir.path / task.component).resolve()
    if base.is_relative_to(out_dir.resolve()):
        raise TrainingError(
            f"the LoRA adapter would refer to {base}, which this run overwrites: choose another --out"
        )


def tracker_name(cfg) -> str | None:
    """The accelerate tracker to log to (``cfg.tracker``): ``auto`` is tensorboard when installed, else
    none; a named one must be installed (a one-line error says which package)."""
    import importlib.util

    if cfg.tracker == "none":
        return None
    name = "tensorboard" if cfg.tracker == "auto" else cfg.tracker
    if importlib.util.find_spec(name) is None:
        if cfg.tracker == "auto":
            return None
        raise TrainingError(f"tracker {name!r} asked for but the {name} package is not installed (pip install {name}; "
                            "or tracker=none)")
    return name
