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
kept in safetensors (:mod:`genvl.training.run_dir`; the wall-clock budget: :mod:`genvl.training.budget`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from genvl.checkpoint import ModelDir, open_model_dir
from genvl.config import save_config, to_dict
from genvl.errors import TrainingError
from genvl.training.budget import BudgetClock
from genvl.training.config import TrainConfig
from genvl.training.phases import Phase, run_phase
from genvl.training.run_dir import (
    CHECKPOINTS,
    check_lora,
    find_checkpoint,
    flat_dict,
    load_resume_state,
    plot_loss,
    release_model_dir,
    release_state_dicts,
    tracker_name,
    restart_log,
    stage_dir,
    write_checkpoint,
)
from genvl.training.speed import apply_speed_options, channels_last_batch, compile_for_training, make_ema

class Task:
    """What a stage trains. Subclasses set ``stage`` and ``component`` and implement the hooks.

    The trainer calls, in order: :meth:`build` (model and tokenizer; from ``init`` when
    finetuning), :meth:`collate` (in DataLoader workers), :meth:`loss` (every micro-batch),
    :meth:`components` (what to save) and, for generative stages, :meth:`sample`. A task may train
    only a part of its model (:meth:`trainable`) and have a first phase fitted before the main loop
    (:meth:`first_phase`).
    """

    stage: str = ""
    component: str = ""

    # whether ``--data`` may be a tokenized set (genvl data tokenize) instead of images
    accepts_tokenized = False
    accepts_embeddings = False  # reads a genvl data embed folder (precomputed CLIP embeddings)
    streams = False  # can train from streamed shards (its batches never refer to samples by index)
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

    def trainable(self, model: nn.Module) -> nn.Module:
        """The module the optimizer steps and accelerate wraps: ``model`` itself, or a part of it whose
        own ``forward`` the task's :meth:`loss` calls (only that part trains; the whole ``model`` is
        saved and sampled)."""
        return model

    def first_phase(self, model: nn.Module) -> "Phase | None":
        """A :class:`Phase` fitted before the main loop of a run that does not resume; None = none."""
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


def _cosine_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


class _Run:
    """One call of :func:`train`: what it sets up, and one method per step of the loop."""

    def __init__(self, task: Task, data_path, out_dir: Path, progress: bool):
        self.task, self.cfg, self.data_path, self.out_dir = task, task.cfg, data_path, out_dir
        self.run_dir = stage_dir(out_dir, task.stage)
        self.progress = progress
        self.history: list[dict] = []
        self.last_loss = float("nan")
        self.stopped_early = False
        self.feed = None  # a StreamFeed when the data is streamed

    # ---------------------------------------------------------------------------------- set-up
    def open_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.log_with = tracker_name(cfg)
        # accelerate keeps one process-wide state; a second run in the same process (a notebook, the
        # tests) with another precision needs it cleared. The process group (PartialState) stays.
        AcceleratorState._reset_state()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=self.log_with,
            project_dir=str(self.run_dir / "tensorboard"),
            step_scheduler_with_optimizer=False,
            # Under torchrun on a machine without GPUs accelerate only goes multi-process when told
            # to use the CPU; otherwise each process would silently train alone.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        )
        self.main = accelerator.is_main_process
        set_seed(cfg.seed)
        dynamo = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
        if dynamo is not None and str(getattr(dynamo, "value", dynamo)).upper() != "NO":
            # accelerate would wrap the model itself and save its weights as "_orig_mod.*".
            raise TrainingError(f"the accelerate config compiles the model (dynamo_backend {dynamo.value}); "
                                "remove that and set compile: true in the recipe instead")

    def find_resume(self, resume: str | None) -> Path | None:
        ckpt = find_checkpoint(self.run_dir, resume) if resume else None
        if resume and ckpt is None and self.main:
            print(f"genvl: no checkpoint in {self.run_dir / CHECKPOINTS}; starting from step 0")
        return ckpt

    def open_data(self) -> None:
        from genvl.data import open_image_text
        from genvl.data.embeddings import EmbeddingSet, is_embedding_set
        from genvl.data.streaming import is_remote

        task, cfg, data_path, show = self.task, self.cfg, self.data_path, self.progress and self.main
        if hasattr(task, "open_dataset"):  # a stage that reads its own data (interleaved documents)
            dataset = task.open_dataset(data_path, progress=show)
        elif cfg.data.streaming or is_remote(str(data_path)):
            return self.open_stream()
        elif is_embedding_set(data_path):  # CLIP embeddings written by genvl data embed
            if not task.accepts_embeddings:
                raise TrainingError(f"{data_path} holds precomputed CLIP embeddings; the {task.stage} stage needs images")
            dataset = EmbeddingSet(data_path, caption_dropout=cfg.data.caption_dropout, seed=cfg.seed)
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
                seed=cfg.seed, validate=cfg.data.validate, progress=show,
            )
        skipped = len(dataset.skipped)
        if self.main:
            msg = f"genvl: {len(dataset)} image-text pairs from {data_path} ({dataset.format})"
            print(msg + (f"; skipped {skipped} bad file(s)" if skipped else ""))
            for path, reason in dataset.skipped[:10]:
                print(f"  skipped {path}: {reason}")
            if skipped > 10:
                print(f"  ... and {skipped - 10} more (genvl data check {data_path} lists all)")
        self.dataset = dataset

    def open_stream(self) -> None:
        from genvl.training.streams import StreamFeed

        task = self.task
        if not task.streams:
            raise TrainingError(f"the {task.stage} stage cannot stream its data (it keeps per-sample state by "
                                "index); the clip, prior, vqvae and sr stages stream; give this one a local set")
        self.feed = StreamFeed(self.data_path, self.cfg, self.accelerator.process_index, self.accelerator.num_processes)
        self.dataset = self.feed.probe  # what build reads: the first samples, the same on every process
        if self.main:
            print(f"genvl: {self.feed.describe()} from {self.data_path}")

    def build(self, init, ckpt: Path | None) -> None:
        """The task's model (with its first phase fitted on a fresh run), LoRA and speed options."""
        task, cfg, main = self.task, self.cfg, self.main
        self.init_dir = open_model_dir(init) if init else None
        resume_tok = None
        if ckpt is not None and (ckpt / "tokenizer").is_dir():  # stages without text (vqvae, sr) save none
            from genvl.tokenizers.text import load_text_tokenizer

            resume_tok = load_text_tokenizer(ckpt / "tokenizer")
        task.resuming = ckpt is not None  # build may skip work the checkpoint's weights replace
        task.show_progress = self.progress and main
        task.is_main = main
        task.run_dir = self.run_dir
        model = task.build(self.dataset, self.init_dir, tokenizer=resume_tok)
        phase = task.first_phase(model) if ckpt is None else None
        if phase is not None:
            run_phase(phase, cfg.seed, progress=task.show_progress)
        if cfg.lora_rank > 0:
            check_lora(task, self.init_dir, self.out_dir)
            from genvl.models.lora import add_lora

            add_lora(model, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets or None)
            if main:
                n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                n_all = sum(p.numel() for p in model.parameters())
                print(f"genvl: LoRA rank {cfg.lora_rank} on the {task.component}: training {n_train:,} of {n_all:,} parameters")
        for note in apply_speed_options(model, cfg, what=task.component):
            if main:
                print(f"genvl: {note}")
        self.model = model

    def prepare(self) -> None:
        """Data loader, optimizer, schedule and EMA over the trained module, wrapped by accelerate."""
        task, cfg, accelerator, dataset = self.task, self.cfg, self.accelerator, self.dataset
        self.world = world = accelerator.num_processes
        if self.feed is None and len(dataset) < cfg.batch_size * world:
            raise TrainingError(
                f"{self.data_path}: {len(dataset)} pairs is fewer than one global batch "
                f"({cfg.batch_size} x {world} processes); lower batch_size"
            )
        if self.feed is not None:  # the stream shards by process itself: accelerate gets no loader
            loader = self.feed.loader(task.collate)
        else:
            self.sampler = EpochShuffleSampler(len(dataset), cfg.seed)
            loader = DataLoader(
                dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=task.collate, drop_last=True,
                num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
            )
        trained = task.trainable(self.model)
        if trained is not self.model:
            self.model.to(accelerator.device)  # the frozen rest: the loss and the samples run it there
        optimizer = torch.optim.AdamW(
            task.param_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            # fused AdamW: one kernel per step on CUDA, and on the CPU 2-4x faster than the for-loop default
            # (benchmarks/train_speed.py, AdamW step alone); elsewhere torch's default
            fused=accelerator.device.type in ("cuda", "cpu") or None,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(cfg))
        if self.feed is not None:
            prepared, self.optimizer, self.scheduler = accelerator.prepare(trained, optimizer, scheduler)
            self.loader = loader
        else:
            prepared, self.optimizer, self.loader, self.scheduler = accelerator.prepare(trained, optimizer, loader, scheduler)
        if trained is self.model:
            self.model = accelerator.unwrap_model(prepared)
        self.prepared = prepared
        self.trained_params = [p for p in accelerator.unwrap_model(prepared).parameters() if p.requires_grad]
        task.to_device(accelerator.device)
        # The loss runs through a compiled view of the prepared module; everything else (clipping,
        # checkpoints, EMA, release, samples) uses the module itself, whose names stay unprefixed.
        self.train_model = compile_for_training(prepared) if cfg.compile else prepared
        self.nhwc = cfg.channels_last and any(p.dim() == 4 for p in prepared.parameters())
        self.ema = make_ema(self.trained_params, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def resume(self, ckpt: Path | None) -> None:
        """The loop state, from ``ckpt`` when resuming (weights, optimizer, RNG, EMA)."""
        cfg, ema = self.cfg, self.ema
        self.state = state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "seconds": 0.0}
        self.last_good = ckpt
        if ckpt is None:
            return
        state.update(load_resume_state(self.accelerator, ckpt))
        if self.feed is not None:
            self.feed.resume(state)
        if state.get("max_steps"):  # the steps a budget fitted before the interruption
            cfg.max_steps = int(state["max_steps"])
        if ema is not None:
            from genvl.models.base import load_safetensors

            shadow = load_safetensors(ckpt / "ema.safetensors")
            for i, p in enumerate(ema.shadow_params):
                p.copy_(shadow[f"p{i}"])
            ema.optimization_step = state["step"]
        if self.main:
            print(f"genvl: resumed from {ckpt} at step {state['step']}")

    def start_log(self) -> None:
        """The recipe, the tokenizer, the tracker and the log (cut back to the resumed step)."""
        task, cfg, run_dir = self.task, self.cfg, self.run_dir
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            if task.tokenizer is not None:
                task.tokenizer.save_pretrained(str(self.out_dir / "tokenizer"))
        if self.log_with:
            self.accelerator.init_trackers(task.stage, config={k: v for k, v in flat_dict(to_dict(cfg)).items()})
        self.log_path = run_dir / "log.jsonl"
        if self.main:
            self.history = restart_log(self.log_path, self.state["step"])

    def save_checkpoint(self) -> Path:
        if self.feed is not None:
            self.state["stream"] = self.feed.checkpoint_state(self.accelerator)
        return write_checkpoint(self.accelerator, self.run_dir, self.state, self.ema, self.task.tokenizer,
                                self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------------------------ loop
    def loop(self, stop_after: int | None, on_step) -> None:
        """Optimizer steps until ``max_steps``, the budget or ``stop_after``."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        self.bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (self.progress and self.main),
                        desc=f"train {self.task.stage}", dynamic_ncols=True)
        self.prepared.train()
        self.model.train()
        self.t_start = time.perf_counter() - state["seconds"]
        self.t_log, self.samples_at_log = time.perf_counter(), state["samples_seen"]
        self.loss_sum, self.loss_n, self.bad_in_row = 0.0, 0, 0
        self.budget = BudgetClock(cfg, state, self.t_start)
        while state["step"] < cfg.max_steps:
            for batch in self._epoch_loader():
                state["batch_in_epoch"] += 1
                extra = self._micro_step(batch)
                if extra is None or not self.accelerator.sync_gradients:
                    continue
                if self._after_optimizer_step(extra, stop_after, on_step):
                    break
            if self.stopped_early or self.budget.out_of_time:
                break
            if self.feed is None and state["step"] < cfg.max_steps and state["batch_in_epoch"] >= len(self.loader):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        self.bar.close()
        state["seconds"] = time.perf_counter() - self.t_start

    def _epoch_loader(self):
        state, dataset = self.state, self.dataset
        if self.feed is not None:  # endless: the loop ends at max_steps
            return self.feed.batches(self.loader, self.accelerator.device)
        self.sampler.use_epoch(state["epoch"])
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state["epoch"])
        skip = state["batch_in_epoch"]
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        if hasattr(loader, "set_epoch"):
            # accelerate passes its own epoch counter on to the dataset (caption dropout): keep it ours.
            loader.set_epoch(state["epoch"])
        return loader

    def _micro_step(self, batch: dict) -> dict | None:
        """Loss, backward and (at the last micro-batch) the optimizer step; None when the batch was
        skipped for a non-finite loss or gradient."""
        cfg, accelerator, optimizer = self.cfg, self.accelerator, self.optimizer
        if self.feed is not None:
            batch = self.feed.consume(batch, self.state)
        if self.nhwc:
            batch = channels_last_batch(batch)
        with accelerator.accumulate(self.prepared):
            loss, extra = self.task.loss(self.train_model, batch)
            nonfinite = (~torch.isfinite(loss.detach())).float()
            if self.world > 1:  # every process skips (or stops) together; accelerate's reduce has max, not min
                nonfinite = accelerator.reduce(nonfinite, "max")
            bad = None
            if nonfinite.item() > 0:
                local = loss.item()
                bad = f"non-finite loss ({local})" if not math.isfinite(local) else "non-finite loss on another process"
            if bad is None:
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The total gradient norm (clipping at inf when clipping is off measures it and
                    # changes nothing). Under fp16 the grad scaler skips overflowing steps itself.
                    norm = accelerator.clip_grad_norm_(self.prepared.parameters(), cfg.max_grad_norm or math.inf)
                    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
                        norm = norm.full_tensor()
                    if norm is not None and accelerator.scaler is None and not math.isfinite(float(norm)):
                        bad = f"non-finite gradient (norm {float(norm)})"
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                self.bad_in_row += 1
                where = f"{bad} at step {self.state['step'] + 1}"
                if cfg.on_nonfinite == "stop" or self.bad_in_row > 10:
                    keep = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint was written yet"
                    raise TrainingError(f"{where}; training stopped, {keep} (lower lr or use --resume latest)")
                if self.main:
                    print(f"genvl: {where}; batch skipped")
                return None
            self.bad_in_row = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.loss_sum += loss.detach().float().item()
        self.loss_n += 1
        self.state["samples_seen"] += self.cfg.batch_size * self.world
        return extra

    def _after_optimizer_step(self, extra: dict, stop_after: int | None, on_step) -> bool:
        """Schedule, EMA, log, checkpoint, samples after an optimizer step; True when the loop ends."""
        cfg, state = self.cfg, self.state
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.trained_params)
        state["step"] += 1
        self.last_loss = self.loss_sum / self.loss_n
        self.bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
            self._log(extra)
        self.loss_sum, self.loss_n = 0.0, 0
        state["seconds"] = time.perf_counter() - self.t_start
        out_of_time = self.budget.tick(self.accelerator, self.bar)
        if state["step"] < cfg.max_steps and not out_of_time and (
                (cfg.save_every and state["step"] % cfg.save_every == 0) or self.budget.save_due):
            self.last_good = self.save_checkpoint()
            self.budget.saved()
        if on_step is not None and self.main:
            on_step(state, cfg)
        if cfg.sample_every and state["step"] % cfg.sample_every == 0 and self.main:
            self.task.sample(self.model, self.run_dir / "samples" / f"step-{state['step']:08d}.png", state["step"])
        if stop_after is not None and state["step"] >= stop_after:
            self.stopped_early = True
            return True
        return state["step"] >= cfg.max_steps or out_of_time

    def _log(self, extra: dict) -> None:
        state, now = self.state, time.perf_counter()
        row = {
            "step": state["step"], "loss": self.last_loss, "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": (state["samples_seen"] - self.samples_at_log) / max(now - self.t_log, 1e-9),
            **{k: float(v) for k, v in extra.items()},
        }
        self.t_log, self.samples_at_log = now, state["samples_seen"]
        if self.feed is not None:
            row["skipped_samples"] = total = self.feed.skipped_over_processes(self.accelerator)
            if total > self.feed.skipped_total and self.main:
                print(f"genvl: {total} bad sample(s) skipped so far over all processes"
                      + (f" (here: {self.feed.skipped[-1][0]}: {self.feed.skipped[-1][1]})" if self.feed.skipped else ""))
            self.feed.skipped_total = total
        if self.main:
            self.history.append(row)
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", sps=f"{row['samples_per_s']:.0f}")
        if self.log_with:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=state["step"])

    # ---------------------------------------------------------------------------------- finish
    def finish(self, command: str | None) -> TrainResult:
        """The last checkpoint, the released model directory, the loss plot and the last samples."""
        task, state, accelerator = self.task, self.state, self.accelerator
        if not self.stopped_early:
            self.save_checkpoint()
            weights = release_state_dicts(task, accelerator, self.prepared, self.model, self.ema)  # collective under FSDP
            if self.main:
                release_model_dir(task, self.model, weights, self.out_dir, self.init_dir, self.cfg, state, self.dataset,
                                  self.data_path, command, self.last_loss)
                plot_loss(self.log_path, self.run_dir / "loss.png", f"genvl train {task.stage}")
                task.sample(self.model, self.run_dir / "samples" / f"step-{state['step']:08d}.png", state["step"])
        accelerator.wait_for_everyone()
        if self.log_with:
            accelerator.end_training()
        return TrainResult(
            out_dir=self.out_dir, step=state["step"], final_loss=self.last_loss, seconds=state["seconds"],
            samples_seen=state["samples_seen"],
            skipped_files=len(self.feed.skipped) if self.feed is not None else len(self.dataset.skipped),
            stopped_early=self.stopped_early, history=self.history, model=self.model,
        )


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
    task.cfg.validate()
    run = _Run(task, data_path, Path(out_dir), progress)
    run.open_accelerator()
    ckpt = run.find_resume(resume)
    run.open_data()
    run.build(init, ckpt)
    run.prepare()
    run.resume(ckpt)
    run.start_log()
    run.loop(stop_after, on_step)
    return run.finish(command)
