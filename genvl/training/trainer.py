"""One accelerate training loop for every stage; a :class:`Task` supplies model, batches and loss.

Run directory (``--out``), which is also the released model directory:

```
OUT/
  genvl.json, clip/, tokenizer/, README.md     the model directory (written at the end)
  train/STAGE/                                 one folder per stage trained into OUT
    config.yaml                                the resolved recipe of this run
    log.jsonl, loss.png                        loss / lr / throughput every log_every steps
    checkpoints/step-00000100/                 resume state (accelerate save_state + trainer_state.json)
    samples/                                   sample grids of generative stages
    tensorboard/                               when tensorboard is installed
```

Stages trained one after another into one directory (clip, then prior, then decoder) keep
their logs and checkpoints apart.

Checkpoints are written to a temporary folder and renamed into place, so a folder named
``step-N`` is always complete. Resume state loads with ``weights_only=True``; the EMA weights are
kept in safetensors.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from genvl.checkpoint import ModelDir, follow_refs, open_model_dir, save_model_dir
from genvl.config import save_config, to_dict
from genvl.errors import TrainingError, describe_load_error
from genvl.training.config import TrainConfig
from genvl.training.speed import apply_speed_options, channels_last_batch, compile_for_training, make_ema

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"


class Task:
    """What a stage trains. Subclasses set ``stage`` and ``component`` and implement the hooks.

    The trainer calls, in order: :meth:`build` (model and tokenizer; from ``init`` when
    finetuning), :meth:`collate` (in DataLoader workers), :meth:`loss` (every micro-batch),
    :meth:`components` (what to save) and, for generative stages, :meth:`sample`.
    """

    stage: str = ""
    component: str = ""

    # whether ``--data`` may be a tokenized set (genvl data tokenize) instead of images
    accepts_tokenized = False
    # set by the trainer before build: resuming from a checkpoint, progress bars on, main process,
    # the stage's folder in the run (recipe, log, checkpoints; where a task may keep work it can reuse)
    resuming = False
    show_progress = False
    is_main = True
    run_dir: Path | None = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer = None

    def build(self, dataset, init: ModelDir | None, tokenizer=None) -> nn.Module:
        """Return the model to train. ``tokenizer`` is given when resuming a run."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss of one micro-batch and extra floats to log."""
        raise NotImplementedError

    def components(self, model: nn.Module) -> dict[str, nn.Module]:
        return {self.component: model}

    def to_device(self, device: torch.device) -> None:
        """Move frozen helpers the task holds (a CLIP core, say) to the training device."""

    def sample(self, model: nn.Module, path: Path, step: int) -> Path | None:
        """Write a sample grid to ``path`` (generative stages); None when the stage has none."""
        return None

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-D tensors (biases, norms, temperatures)."""
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EpochShuffleSampler(Sampler[int]):
    """A permutation per epoch from ``seed + epoch``: identical on every process and on resume.

    The epoch is set with :meth:`use_epoch`, deliberately not ``set_epoch``: accelerate's data
    loader calls ``sampler.set_epoch`` with its own iteration counter, which restarts at 0 on
    resume and would reshuffle a resumed run differently.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    final_loss: float
    seconds: float
    samples_seen: int
    skipped_files: int
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the trained (unwrapped) model, raw weights


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


def _load_resume_state(accelerator, ckpt: Path) -> dict:
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


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, renaming it first: a crash midway leaves a ``.del-`` folder, never a
    half-deleted ``step-N`` that still looks complete."""
    if not path.exists():
        return
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _read_log(path: Path) -> list[dict]:
    """The rows of ``log.jsonl``; a line cut short (a crash or a full disk while writing) is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def _cosine_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def plot_loss(log_path: Path, png_path: Path, title: str) -> None:
    """Draw loss against step from ``train_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_log(log_path)
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


def train(
    task: Task,
    data_path: str | Path,
    out_dir: str | Path,
    resume: str | None = None,
    init: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[dict, TrainConfig], None] | None = None,
) -> TrainResult:
    """Train ``task`` on ``data_path`` into ``out_dir``.

    Args:
        task: the stage (model, batches, loss).
        data_path: an image-text dataset in any format of :mod:`genvl.data`.
        out_dir: run directory and released model directory.
        resume: ``"latest"`` or a checkpoint folder to continue from.
        init: a model directory whose weights, config and tokenizer start this stage (finetuning).
        command: the command line, recorded in the model card.
        progress: show a progress bar on the main process.
        stop_after: end the loop after this many optimizer steps without releasing the model
            (checkpoints stay), as a crash would; for tests of ``resume``.
        on_step: called on the main process after every optimizer step with the loop's state
            (``step``, ``seconds``, ...) and the recipe (whose ``max_steps`` a budget may shrink).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from genvl.data import open_image_text

    cfg = task.cfg
    cfg.validate()
    out_dir = Path(out_dir)
    run_dir = stage_dir(out_dir, task.stage)
    log_with = None
    if cfg.tracker != "none":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            if cfg.tracker == "tensorboard":
                raise TrainingError("tracker 'tensorboard' asked for but tensorboard is not installed") from None
    # accelerate keeps one process-wide state; a second run in the same process (a notebook, the
    # tests) with another precision needs it cleared. The process group (PartialState) stays.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with,
        project_dir=str(run_dir / "tensorboard"),
        step_scheduler_with_optimizer=False,
        # Under torchrun on a machine without GPUs accelerate only goes multi-process when told
        # to use the CPU; otherwise each process would silently train alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    dynamo = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
    if dynamo is not None and str(getattr(dynamo, "value", dynamo)).upper() != "NO":
        # accelerate would wrap the model itself and save its weights as "_orig_mod.*".
        raise TrainingError(f"the accelerate config compiles the model (dynamo_backend {dynamo.value}); "
                            "remove that and set compile: true in the recipe instead")

    ckpt = find_checkpoint(run_dir, resume) if resume else None
    if resume and ckpt is None and main:
        print(f"genvl: no checkpoint in {run_dir / CHECKPOINTS}; starting from step 0")

    if hasattr(task, "open_dataset"):  # a stage that reads its own data (interleaved documents)
        dataset = task.open_dataset(data_path, progress=progress and main)
    elif str(data_path).endswith(".safetensors"):  # codes written by genvl data tokenize
        if not task.accepts_tokenized:
            raise TrainingError(
                f"{data_path} is a tokenized set (VQ-VAE codes); the {task.stage} stage needs images"
            )
        from genvl.data.tokenized import TokenizedDataset

        dataset = TokenizedDataset(data_path, caption_dropout=cfg.data.caption_dropout, seed=cfg.seed)
    else:
        dataset = open_image_text(
            data_path, image_size=cfg.data.image_size, caption_dropout=cfg.data.caption_dropout,
            seed=cfg.seed, validate=cfg.data.validate, progress=progress and main,
        )
    skipped = len(dataset.skipped)
    if main:
        msg = f"genvl: {len(dataset)} image-text pairs from {data_path} ({dataset.format})"
        print(msg + (f"; skipped {skipped} bad file(s)" if skipped else ""))
        for path, reason in dataset.skipped[:10]:
            print(f"  skipped {path}: {reason}")
        if skipped > 10:
            print(f"  ... and {skipped - 10} more (genvl data check {data_path} lists all)")

    init_dir = open_model_dir(init) if init else None
    resume_tok = None
    if ckpt is not None and (ckpt / "tokenizer").is_dir():  # stages without text (vqvae, sr) save none
        from genvl.tokenizers.text import load_text_tokenizer

        resume_tok = load_text_tokenizer(ckpt / "tokenizer")
    task.resuming = ckpt is not None  # build may skip work the checkpoint's weights replace
    task.show_progress = progress and main
    task.is_main = main
    task.run_dir = run_dir
    model = task.build(dataset, init_dir, tokenizer=resume_tok)
    if cfg.lora_rank > 0:
        _check_lora(task, init_dir, out_dir)
        from genvl.models.lora import add_lora

        add_lora(model, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets or None)
        if main:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in model.parameters())
            print(f"genvl: LoRA rank {cfg.lora_rank} on the {task.component}: training {n_train:,} of {n_all:,} parameters")
    for note in apply_speed_options(model, cfg, what=task.component):
        if main:
            print(f"genvl: {note}")

    world = accelerator.num_processes
    if len(dataset) < cfg.batch_size * world:
        raise TrainingError(
            f"{data_path}: {len(dataset)} pairs is fewer than one global batch "
            f"({cfg.batch_size} x {world} processes); lower batch_size"
        )
    sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=task.collate, drop_last=True,
        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
    )
    optimizer = torch.optim.AdamW(
        task.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        # fused AdamW: one kernel per step on CUDA, and on the CPU 2-4x faster than the for-loop default
        # (benchmarks/train_speed.py, AdamW step alone); elsewhere torch's default
        fused=accelerator.device.type in ("cuda", "cpu") or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(cfg))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    task.to_device(accelerator.device)
    # The loss runs through a compiled view of the prepared model; everything else (clipping,
    # checkpoints, EMA, release, samples) uses the model itself, whose names stay unprefixed.
    train_model = compile_for_training(model) if cfg.compile else model
    nhwc = cfg.channels_last and any(p.dim() == 4 for p in model.parameters())

    ema = None
    if cfg.ema_decay > 0:
        ema = make_ema([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad], cfg.ema_decay)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "seconds": 0.0}
    if ckpt is not None:
        state.update(_load_resume_state(accelerator, ckpt))
        if state.get("max_steps"):  # the steps a budget fitted before the interruption
            cfg.max_steps = int(state["max_steps"])
        if ema is not None:
            from genvl.models.base import load_safetensors

            shadow = load_safetensors(ckpt / "ema.safetensors")
            for i, p in enumerate(ema.shadow_params):
                p.copy_(shadow[f"p{i}"])
            ema.optimization_step = state["step"]
        if main:
            print(f"genvl: resumed from {ckpt} at step {state['step']}")

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    if log_with:
        accelerator.init_trackers(task.stage, config={k: v for k, v in _flat(to_dict(cfg)).items()})

    log_path = run_dir / "log.jsonl"
    history: list[dict] = []
    if main and log_path.is_file():
        # Keep log rows up to the resumed step; later ones belong to a run that was cut off.
        rows = _read_log(log_path)
        history = [r for r in rows if r["step"] <= state["step"]]
        tmp_log = log_path.with_name(f".{log_path.name}.tmp")  # renamed into place: a crash keeps the old log
        tmp_log.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp_log, log_path)

    def save_checkpoint() -> Path:
        final = run_dir / CHECKPOINTS / f"step-{state['step']:08d}"
        tmp = run_dir / CHECKPOINTS / f".tmp-step-{state['step']:08d}"
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
            if task.tokenizer is not None:
                task.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            # trainer_state.json is written last: its presence marks the folder complete.
            (tmp / STATE_NAME).write_text(json.dumps(state))
            from genvl.checkpoint import fsync_dir, fsync_tree

            fsync_tree(tmp)  # every file on disk before the rename (power loss; GENVL_FSYNC=0 skips)
            _remove_checkpoint(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / STATE_NAME).is_file())
            for old in done[: -cfg.keep_checkpoints]:
                _remove_checkpoint(old)
            for stale in (run_dir / CHECKPOINTS).glob(".del-step-*"):  # left by a crash while deleting
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    last_good = ckpt
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (progress and main),
               desc=f"train {task.stage}", dynamic_ncols=True)
    model.train()
    t_start = time.perf_counter() - state["seconds"]
    t_log, samples_at_log = time.perf_counter(), state["samples_seen"]
    loss_sum, loss_n, last_loss, bad_in_row = 0.0, 0, float("nan"), 0
    global_batch = cfg.batch_size * world
    stopped_early = False
    unwrapped = accelerator.unwrap_model(model)
    budget = BudgetClock(cfg, state, t_start)

    while state["step"] < cfg.max_steps:
        sampler.use_epoch(state["epoch"])
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state["epoch"])
        skip = state["batch_in_epoch"]
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        if hasattr(epoch_loader, "set_epoch"):
            # accelerate passes its own epoch counter on to the dataset (caption dropout): keep it ours.
            epoch_loader.set_epoch(state["epoch"])
        for batch in epoch_loader:
            state["batch_in_epoch"] += 1
            if nhwc:
                batch = channels_last_batch(batch)
            with accelerator.accumulate(model):
                loss, extra = task.loss(train_model, batch)
                nonfinite = (~torch.isfinite(loss.detach())).float()
                if world > 1:  # every process skips (or stops) together; accelerate's reduce has max, not min
                    nonfinite = accelerator.reduce(nonfinite, "max")
                bad = None
                if nonfinite.item() > 0:
                    local = loss.item()
                    bad = f"non-finite loss ({local})" if not math.isfinite(local) else \
                        "non-finite loss on another process"
                if bad is None:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # The total gradient norm (clipping at inf when clipping is off measures it and
                        # changes nothing). Under fp16 the grad scaler skips overflowing steps itself.
                        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
                            norm = norm.full_tensor()
                        if norm is not None and accelerator.scaler is None and not math.isfinite(float(norm)):
                            bad = f"non-finite gradient (norm {float(norm)})"
                if bad is not None:
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    where = f"{bad} at step {state['step'] + 1}"
                    if cfg.on_nonfinite == "stop" or bad_in_row > 10:
                        keep = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                        raise TrainingError(f"{where}; training stopped, {keep} (lower lr or use --resume latest)")
                    if main:
                        print(f"genvl: {where}; batch skipped")
                    continue
                bad_in_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float().item()
            loss_n += 1
            state["samples_seen"] += global_batch
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.step([p for p in unwrapped.parameters() if p.requires_grad])
            state["step"] += 1
            last_loss = loss_sum / loss_n
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
                now = time.perf_counter()
                row = {
                    "step": state["step"], "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": (state["samples_seen"] - samples_at_log) / max(now - t_log, 1e-9),
                    **{k: float(v) for k, v in extra.items()},
                }
                t_log, samples_at_log = now, state["samples_seen"]
                if main:
                    history.append(row)
                    with log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{row['samples_per_s']:.0f}")
                if log_with:
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=state["step"])
            loss_sum, loss_n = 0.0, 0
            state["seconds"] = time.perf_counter() - t_start
            out_of_time = budget.tick(accelerator, bar)
            if state["step"] < cfg.max_steps and not out_of_time and (
                    (cfg.save_every and state["step"] % cfg.save_every == 0) or budget.save_due):
                last_good = save_checkpoint()
                budget.saved()
            if on_step is not None and main:
                on_step(state, cfg)
            if cfg.sample_every and state["step"] % cfg.sample_every == 0 and main:
                task.sample(unwrapped, run_dir / "samples" / f"step-{state['step']:08d}.png", state["step"])
            if stop_after is not None and state["step"] >= stop_after:
                stopped_early = True
                break
            if state["step"] >= cfg.max_steps or out_of_time:
                break
        if stopped_early or budget.out_of_time:
            break
        if state["step"] < cfg.max_steps and state["batch_in_epoch"] >= len(loader):
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    state["seconds"] = time.perf_counter() - t_start

    if not stopped_early:
        save_checkpoint()
        weights = _release_state_dicts(task, accelerator, model, unwrapped, ema)  # collective under FSDP
        if main:
            _release(task, unwrapped, weights, out_dir, init_dir, cfg, state, dataset, data_path, command, last_loss)
            plot_loss(log_path, run_dir / "loss.png", f"genvl train {task.stage}")
            task.sample(unwrapped, run_dir / "samples" / f"step-{state['step']:08d}.png", state["step"])
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.end_training()
    return TrainResult(
        out_dir=out_dir, step=state["step"], final_loss=last_loss, seconds=state["seconds"],
        samples_seen=state["samples_seen"], skipped_files=skipped, stopped_early=stopped_early, history=history,
        model=unwrapped,
    )


class BudgetClock:
    """The stage's wall-clock budget (``cfg.max_seconds``) and time-based checkpoints (``cfg.save_minutes``).

    After ``FIT_AFTER`` steps of this process it measures the time per step (the first two steps,
    slower, left out) and sets ``cfg.max_steps`` to the steps that fit the rest of the budget (never
    above the recipe's), so that the learning-rate schedule decays to its end. It measures again every
    ``REFIT_SHARE`` of the budget and refits when the speed moved (another process on the machine, a
    slower epoch), until ``REFIT_UNTIL`` of the steps are done. The fitted numbers go into the loop
    state (and so into checkpoints: a resumed run keeps them). Past the budget, :meth:`tick` says
    stop, on every process alike.
    """

    FIT_AFTER = 8  # steps timed before the first fit (the first two are not counted)
    REFIT_SHARE = 0.05  # share of the budget between two measurements,
    REFIT_MIN_SECONDS = 20.0  # and at least this long
    REFIT_UNTIL = 0.9  # no refit in the last 10% of the steps: the schedule ends as planned
    RESERVE = 0.03  # share of the budget kept for the release and the sample grid

    def __init__(self, cfg: TrainConfig, state: dict, t_start: float):
        self.cfg, self.state, self.t_start = cfg, state, t_start
        self.first_step = state["step"]
        self.mark: tuple[float, int] | None = None  # (time, step) where the current speed window began
        self.t_saved = time.perf_counter()
        self.out_of_time = self.save_due = False
        state.setdefault("recipe_max_steps", cfg.max_steps)

    def _fit(self, accelerator, bar, now: float) -> None:
        cfg, state = self.cfg, self.state
        t0, s0 = self.mark
        per_step = (now - t0) / max(1, state["step"] - s0)
        left = cfg.max_seconds * (1 - self.RESERVE) - (now - self.t_start)
        fit = min(int(state["recipe_max_steps"]), state["step"] + max(1, int(left / per_step)))
        if accelerator.num_processes > 1:  # every process keeps the same schedule
            fit = int(accelerator.reduce(torch.tensor([fit], device=accelerator.device), "max").item())
        if abs(fit - cfg.max_steps) > 0.02 * cfg.max_steps or not state.get("max_steps"):
            cfg.max_steps = fit
            bar.total = fit
            bar.refresh()
        state["max_steps"] = cfg.max_steps
        self.mark = (now, state["step"])

    def tick(self, accelerator, bar) -> bool:
        """Call after each optimizer step; True when the budget is spent. Also decides
        :attr:`save_due` (time for a checkpoint), the same on every process."""
        cfg, state = self.cfg, self.state
        self.save_due = False
        if cfg.max_seconds <= 0 and cfg.save_minutes <= 0:
            return False
        now = time.perf_counter()
        done = state["step"] - self.first_step
        if done == 2:
            self.mark = (now, state["step"])
        if cfg.max_seconds > 0 and self.mark is not None:
            first = done == self.FIT_AFTER and not state.get("max_steps")
            window = max(self.REFIT_MIN_SECONDS, self.REFIT_SHARE * cfg.max_seconds)
            refit = (state.get("max_steps") and now - self.mark[0] >= window
                     and state["step"] < self.REFIT_UNTIL * cfg.max_steps)
            if accelerator.num_processes > 1:  # the same decision everywhere
                refit = bool(accelerator.reduce(torch.tensor([float(bool(refit))], device=accelerator.device), "max") > 0)
            if first or refit:
                self._fit(accelerator, bar, now)
        flags = torch.tensor([float(cfg.max_seconds > 0 and now - self.t_start >= cfg.max_seconds),
                              float(cfg.save_minutes > 0 and now - self.t_saved >= 60 * cfg.save_minutes)],
                             device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "max")
        self.out_of_time, self.save_due = bool(flags[0] > 0), bool(flags[1] > 0)
        return self.out_of_time

    def saved(self) -> None:
        self.t_saved = time.perf_counter()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _release_state_dicts(task, accelerator, model, unwrapped, ema) -> dict[str, dict]:
    """Full (gathered) weights of each component, the EMA ones when EMA is on.

    Called on every process: under FSDP gathering the state dict is a collective operation.
    """
    params = [p for p in unwrapped.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        out = {}
        for name, module in task.components(unwrapped).items():
            sd = accelerator.get_state_dict(model) if module is unwrapped else module.state_dict()
            out[name] = {k: v.detach().to("cpu").clone() for k, v in sd.items()} if sd is not None else None
        return out
    finally:
        if ema is not None:
            ema.restore(params)


def _release(task, model, state_dicts, out_dir, init_dir, cfg, state, dataset, data_path, command, last_loss) -> None:
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
        from genvl.checkpoint import read_meta, write_meta

        if not (out_dir / "genvl.json").exists():
            meta = read_meta(init_dir.path)
            meta["components"] = {k: v for k, v in meta["components"].items() if (out_dir / k).exists() or k in refs}
            meta["metrics"] = {}
            write_meta(out_dir, meta)
    record = {
        "data": str(data_path), "pairs": len(dataset), "skipped": len(dataset.skipped), "steps": state["step"],
        "batch_size": f"{cfg.batch_size} x {cfg.grad_accum} accumulation",
        "samples_seen": state["samples_seen"], "time": f"{state['seconds']:.0f} s", "hardware": _hardware(),
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


def _check_lora(task, init_dir, out_dir: Path) -> None:
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
