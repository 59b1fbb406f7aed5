"""Shared pieces of the training benchmarks (``train_speed.py``, ``memory.py``, ``scaling.py``).

Every benchmark trains what ``genvl train STAGE`` trains: the stage's :class:`~genvl.training.Task`
builds the model from the project's size tables (``clip_config``, ``prior_config``,
``decoder_config``, ``lm_config``) on a synthetic image-text folder, with the frozen models it
needs (a CLIP for the prior and the decoder, a VQ-VAE and a tokenized set for the token LM) saved
as model directories first. Nothing is downloaded.

Results JSON (shared by the benchmarks of this folder)::

    {"benchmark": "train_speed", "device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "config": {args},
     "goals": [{"name", "measured", "unit", "goal", "status": "met" | "missed" | "not measured here",
                "note"}],
     "rows": [...details...]}
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("decoder", "lm", "prior", "clip")

# Per size: the size key of every model involved and the image sizes it trains at.
SIZES = {
    # seconds per step on one CPU core; for quick checks of the scripts
    "tiny": {"clip": "tiny", "clip_px": 32, "decoder_px": 32, "vqvae": "tiny", "lm_px": 16, "text_len": 32},
    # the demo scale: tens of seconds per configuration on one CPU core
    "small": {"clip": "small", "clip_px": 64, "decoder_px": 32, "vqvae": "small", "lm_px": 32, "text_len": 32},
    # GPU scale: CLIP ViT-B/16-like at 224 px, 64 px decoder, 256-code token LM
    "base": {"clip": "base", "clip_px": 224, "decoder_px": 64, "vqvae": "base", "lm_px": 64, "text_len": 77},
}

# Micro-batch per process when --batch is not given.
BATCH = {
    "cpu": {"decoder": 8, "lm": 16, "prior": 32, "clip": 16},
    "cuda": {"decoder": 64, "lm": 64, "prior": 256, "clip": 256},
}

# MFU goals on an H100 (the performance issue's targets), per stage.
MFU_GOALS = {"decoder": 35.0, "lm": 40.0, "prior": 35.0, "clip": 30.0}


# ----------------------------------------------------------------------------------------- device
def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(device: torch.device, threads: int | None) -> None:
    """One intra-op thread on the CPU unless told otherwise: with one thread a step's CPU time is its cost
    on an idle core, whatever else runs on the machine."""
    if device.type == "cpu" or threads:
        torch.set_num_threads(threads or 1)


def dense_rate(device: torch.device, dtype: torch.dtype, clock: str = "wall", n: int | None = None) -> dict[str, Any]:
    """The measured dense compute rate of ``dtype`` (FLOP/s), the denominator of MFU.

    CUDA: a bf16 / fp32 8192^3 matmul (TF32 off). CPU: an fp32 / bf16 2048^3 matmul and a 3x3
    convolution of the same order (8 x 512 x 16 x 16, 512 filters), and the faster of the two: on AMD
    CPUs MKL's matmul runs AVX2 code at about half of what oneDNN's AVX-512 convolutions reach, so
    the matmul alone would let conv-heavy models exceed "100%". Rates by ``clock`` ("wall" or "cpu",
    this process's CPU time). ``n`` replaces the matmul's side and leaves the convolution out: a
    quick check of the scripts, whose small matmul reaches less than the dense rate, so MFU figures
    against it come out too high.
    """
    g = torch.Generator(device=device).manual_seed(0)
    out: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "clock": clock}
    with_conv = device.type == "cpu" and not n
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    with torch.no_grad():
        t = time_steps(lambda: a @ b, device, warmup=2, steps=20 if device.type == "cuda" else 5, clock=clock)
    out[f"matmul_{n}"] = 2 * n**3 / t["step_s"]
    del a, b
    if with_conv:
        x = torch.randn(8, 512, 16, 16, dtype=dtype, generator=g)
        w = torch.randn(512, 512, 3, 3, dtype=dtype, generator=g)
        with torch.no_grad():
            t = time_steps(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, warmup=2, steps=5, clock=clock)
        out["conv3x3_8x512x16x16"] = 2 * 8 * 512 * 512 * 9 * 16 * 16 / t["step_s"]
    out["flop_per_s"] = max(v for k, v in out.items() if k.startswith(("matmul", "conv")))
    return out


def load_average() -> list[float] | None:
    """The 1-minute load average and the core count: how busy the machine was (CPU numbers depend on it)."""
    try:
        return [round(os.getloadavg()[0], 2), os.cpu_count()]
    except OSError:
        return None


def is_h100(device: torch.device) -> bool:
    return device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)


# ---------------------------------------------------------------------------------------- results
def goal(name: str, measured: float | None, unit: str, target: str, status: str, note: str = "") -> dict:
    assert status in ("met", "missed", "not measured here"), status
    return {"name": name, "measured": measured, "unit": unit, "goal": target, "status": status, "note": note}


def at_least(value: float | None, threshold: float) -> str:
    return "not measured here" if value is None else ("met" if value >= threshold else "missed")


def write_result(path: str | None, benchmark: str, device: torch.device, args, goals: list[dict], rows: list[dict],
                 **extra) -> dict:
    result = {
        "benchmark": benchmark, "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "config": {k: v for k, v in vars(args).items()}, "goals": goals,
        "rows": rows, **extra,
    }
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


def print_goals(goals: list[dict]) -> None:
    head = f"{'goal':<44} {'measured':>10} {'unit':<12} {'target':<30} status"
    print(head)
    print("-" * len(head))
    for g in goals:
        m = "-" if g["measured"] is None else f"{g['measured']:.3g}"
        print(f"{g['name']:<44} {m:>10} {g['unit']:<12} {g['goal']:<30} {g['status']}")
        if g["note"]:
            print(f"    {g['note']}")


# ------------------------------------------------------------------------------------------- data
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey", "brown", "cyan"]
_THINGS = ["cat", "dog", "house", "tree", "car", "boat", "flower", "bird", "mountain", "lamp", "chair", "cup",
           "star", "heart", "moon", "apple", "fish", "hat", "kite", "clock"]
_WORDS = ["small", "large", "bright", "dark", "old", "new", "shiny", "soft", "round", "tall", "tiny", "striped"]
_PLACES = ["on a table", "in a field", "under the sky", "next to a wall", "by the sea", "in a room", "at night"]


def make_image_folder(root: Path, n: int, px: int, seed: int = 0) -> Path:
    """``n`` JPEG images of random shapes on gradients (side ``px``) and ``metadata.jsonl`` captions."""
    from PIL import Image, ImageDraw

    root = Path(root)
    if (root / "metadata.jsonl").is_file() and len((root / "metadata.jsonl").read_text().splitlines()) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c0 = [rng.randrange(256) for _ in range(3)]
        c1 = [rng.randrange(256) for _ in range(3)]
        ramp = Image.linear_gradient("L").resize((px, px))
        img = Image.composite(Image.new("RGB", (px, px), tuple(c0)), Image.new("RGB", (px, px), tuple(c1)), ramp)
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(px), rng.randrange(px)
            x1, y1 = x0 + rng.randint(px // 8, px // 2), y0 + rng.randint(px // 8, px // 2)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        name = f"{i:06d}.jpg"
        img.save(root / name, quality=90)
        words = [rng.choice(_WORDS), rng.choice(_COLORS), rng.choice(_THINGS)]
        text = f"a {' '.join(words)} {rng.choice(_PLACES)}"
        if rng.random() < 0.5:
            text += f" with a {rng.choice(_COLORS)} {rng.choice(_THINGS)}"
        rows.append({"file_name": name, "text": text})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ----------------------------------------------------------------------------------------- stages
@dataclass
class StageSetup:
    """What ``genvl train STAGE --data DATA [--init INIT]`` with recipe ``cfg`` needs."""

    stage: str
    size: str
    cfg: Any  # TrainConfig
    data: Path  # an image folder, or the tokenized set (.safetensors) of the token LM
    init: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.cfg.batch_size


def recipe(stage: str, size: str, batch: int, image_size: int | None = None, **fields):
    """The TrainConfig of a benchmark run: the stage's model at ``size`` (at ``image_size`` pixels
    instead of the size's own), no checkpoints or sample grids."""
    from genvl.training import DataConfig, TrainConfig

    s = SIZES[size]
    px = image_size or {"clip": s["clip_px"], "prior": s["clip_px"], "decoder": s["decoder_px"], "lm": s["lm_px"]}[stage]
    cfg = TrainConfig(
        model={"size": size}, data=DataConfig(image_size=px, num_workers=0, validate=False), batch_size=batch,
        max_steps=1000, warmup_steps=10, tracker="none", save_every=0, log_every=10, text_len=s["text_len"],
        tokenizer_vocab=4096,
    )
    return replace(cfg, **fields)


def prepare_stage(stage: str, size: str, work: Path, batch: int, n_images: int, image_size: int | None = None,
                  **fields) -> StageSetup:
    """Write the stage's data (and frozen model directory) under ``work``; return its setup.

    The CLIP of the prior and decoder stages and the VQ-VAE of the token LM are freshly initialised
    (untrained): speed and memory do not depend on the weights.
    """
    from genvl.checkpoint import open_model_dir, save_model_dir
    from genvl.data import open_image_text

    s = SIZES[size]
    cfg = recipe(stage, size, batch, image_size, **fields)
    work = Path(work)
    px = cfg.data.image_size
    data = make_image_folder(work / f"images-{px}px-{n_images}", n_images, px=max(px * 5 // 4, 40))
    if stage == "clip":
        return StageSetup(stage, size, cfg, data)
    if stage in ("prior", "decoder"):
        init = work / f"clip-{s['clip']}"
        if not (init / "genvl.json").is_file():
            from genvl.training.tasks.clip import CLIPTask

            ccfg = recipe("clip", size, batch)
            ccfg.model = {"size": s["clip"]}
            task = CLIPTask(ccfg)
            ds = open_image_text(data, image_size=s["clip_px"], validate=False)
            clip = task.build(ds, None)
            save_model_dir(init, {"clip": clip}, tokenizer=task.tokenizer)
        return StageSetup(stage, size, cfg, data, init)
    if stage == "lm":
        from genvl.data.tokenized import tokenize_dataset
        from genvl.tokenizers.vqvae import VQVAE, vqvae_config

        init = work / f"vqvae-{s['vqvae']}-{px}px"
        if not (init / "genvl.json").is_file():
            save_model_dir(init, {"vqvae": VQVAE(vqvae_config(s["vqvae"], image_size=px))})
        codes = work / f"codes-{s['vqvae']}-{px}px-{n_images}.safetensors"
        if not codes.is_file():
            vq = open_model_dir(init).load("vqvae").eval()
            with torch.no_grad():
                tokenize_dataset(vq, open_image_text(data, image_size=px, validate=False), codes,
                                 meta={"model": str(init)}, weights=init / "vqvae" / "model.safetensors")
        return StageSetup(stage, size, cfg, codes, init)
    raise ValueError(f"unknown stage {stage!r}")


def open_dataset(setup: StageSetup):
    """The stage's dataset, opened as the trainer opens it."""
    from genvl.data import open_image_text
    from genvl.data.tokenized import TokenizedDataset

    cfg = setup.cfg
    if str(setup.data).endswith(".safetensors"):
        return TokenizedDataset(setup.data, caption_dropout=cfg.data.caption_dropout, seed=cfg.seed)
    return open_image_text(setup.data, image_size=cfg.data.image_size, caption_dropout=cfg.data.caption_dropout,
                           seed=cfg.seed, validate=False)


def build_task(setup: StageSetup, cfg=None, dataset=None):
    """(task, model, dataset): the stage's task and freshly built model, as :func:`genvl.training.train` builds them."""
    from genvl.checkpoint import open_model_dir
    from genvl.training.tasks import get_task

    cfg = cfg or setup.cfg
    dataset = dataset if dataset is not None else open_dataset(setup)
    task = get_task(setup.stage, cfg)
    model = task.build(dataset, open_model_dir(setup.init) if setup.init else None)
    return task, model, dataset


def make_loader(task, dataset, cfg, device: torch.device):
    """The DataLoader of the trainer (same sampler, collate, workers, pinning)."""
    from torch.utils.data import DataLoader

    from genvl.training.trainer import EpochShuffleSampler

    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=EpochShuffleSampler(len(dataset), cfg.seed),
        collate_fn=task.collate, drop_last=True, num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
    )


# -------------------------------------------------------------------------------------- bare step
@dataclass
class Variant:
    """One way of running the training step."""

    name: str
    mixed_precision: str = "no"  # no | bf16
    compile: bool = False
    channels_last: bool = False
    gradient_checkpointing: bool = False
    adamw: str = "trainer"  # trainer (what genvl's trainer picks: fused on CUDA and CPU) | foreach | fused | for-loop
    attention: str = "sdpa"  # sdpa | xformers (diffusers models)


class BareStep:
    """The trainer's step without its loop: ``task.loss`` -> ``accelerator.backward`` -> AdamW step.

    Built as :func:`genvl.training.train` builds it (the task's model, the trainer's speed options,
    accelerate's mixed precision, the trainer's compiled view): :meth:`step` on one fixed batch
    already on the device, :meth:`timed` on a given batch. No data loading, gradient clipping, EMA, LR schedule or logging.
    """

    def __init__(self, setup: StageSetup, variant: Variant, device: torch.device, dataset=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from genvl.training.speed import apply_speed_options, compile_for_training

        cfg = replace(setup.cfg, mixed_precision=variant.mixed_precision, compile=variant.compile,
                      channels_last=variant.channels_last, gradient_checkpointing=variant.gradient_checkpointing,
                      attention=variant.attention)
        self.cfg, self.device, self.variant = cfg, device, variant
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")
        torch.manual_seed(cfg.seed)
        self.task, model, self.dataset = build_task(setup, cfg, dataset)
        self.notes = apply_speed_options(model, cfg, what=setup.stage)
        kw: dict[str, Any] = {}
        if variant.adamw == "trainer":
            kw["fused"] = device.type in ("cuda", "cpu") or None
        elif variant.adamw == "foreach":
            kw["foreach"] = True
        elif variant.adamw == "fused":
            kw["fused"] = True
        else:
            kw["foreach"] = False
        trained = self.task.trainable(model)  # the model, or the part of it the stage trains
        if trained is not model:
            model.to(self.accelerator.device)
        opt = torch.optim.AdamW(self.task.param_groups(trained, cfg.weight_decay), lr=1e-4,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), **kw)
        self.model, self.optimizer = self.accelerator.prepare(trained, opt)
        self.task.to_device(self.accelerator.device)
        self.train_model = compile_for_training(self.model) if cfg.compile else self.model
        # one fixed batch: the first batch_size items
        self.batch = self._on_device(self.task.collate([self.dataset[i] for i in range(cfg.batch_size)]))
        self.model.train()

    def _on_device(self, batch: dict) -> dict:
        from accelerate.utils import send_to_device

        from genvl.training.speed import channels_last_batch

        batch = send_to_device(batch, self.accelerator.device)
        return channels_last_batch(batch) if self.cfg.channels_last else batch

    def _train(self, batch: dict) -> torch.Tensor:
        loss, _ = self.task.loss(self.train_model, batch)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def step(self) -> torch.Tensor:
        """One step on the fixed batch."""
        return self._train(self.batch)

    def timed(self, batch: dict) -> tuple[float, float]:
        """One step on ``batch`` (a batch of the loop): its (wall, CPU) seconds."""
        batch = self._on_device(batch)
        sync(self.device)
        t, c = time.perf_counter(), time.process_time()
        self._train(batch)
        sync(self.device)
        return time.perf_counter() - t, time.process_time() - c

    def count_flops(self) -> int:
        """FLOPs of one forward + backward of the task's loss (matmuls, convolutions, attention)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            loss, _ = self.task.loss(self.model, self.batch)
            self.accelerator.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def close(self) -> None:
        from accelerate.state import AcceleratorState

        self.model = self.train_model = self.optimizer = self.task = self.batch = None
        if self.variant.compile:
            torch.compiler.reset()
        AcceleratorState._reset_state()


def pick_clock(name: str, device: torch.device) -> str:
    """auto: the process's CPU clock on the CPU (one thread: the cost on an idle core, whatever else
    runs on the machine), the wall clock on CUDA."""
    if name == "auto":
        return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    return name


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int, clock: str = "wall") -> dict:
    """Seconds of the first call, and the mean of ``steps`` calls after ``warmup`` calls (throughput).

    Both clocks are kept: ``step_wall_s`` and, on the CPU, ``step_cpu_s`` (this process's CPU
    seconds); ``step_s`` is the one ``clock`` names; ``step_median_s`` and ``step_all_s`` beside it.
    """
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        step()
    sync(device)
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out = {"first_step_s": first, "step_wall_s": statistics.mean(times)}
    if device.type == "cpu":
        out["step_cpu_s"] = statistics.mean(cpu)
    chosen = cpu if clock == "cpu" else times
    out.update(step_s=statistics.mean(chosen), step_median_s=statistics.median(chosen), step_all_s=chosen)
    return out


class StepClock:
    """Wraps a task's ``loss`` to stamp both clocks at every call: the time between two calls is one
    whole iteration of the training loop (data, loss, backward, clipping, optimizer, EMA, logging).

    ``pair``: a callable run on every batch at the start of each iteration, outside the timed
    interval (the loop's iteration is timed from its return to the next call); it returns its own
    ``(wall, cpu)`` seconds, kept from the ``keep_from``-th call on (:meth:`paired`). With the bare
    step as ``pair``, loop and bare step are timed step by step, alternately, on the same batches
    (batches differ in cost: padded text lengths, inputs not yet cached), and a machine whose speed
    drifts over a run (a shared VM) slows both alike.
    """

    def __init__(self, task, keep_from: int | None = None,
                 pair: Callable[[dict], tuple[float, float]] | None = None):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.resume_wall: list[float] = []
        self.resume_cpu: list[float] = []
        self.pair_times: list[tuple[float, float]] = []
        inner = task.loss

        def loss(model, batch):
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if pair is not None:
                t = pair(dict(batch))
                if keep_from is None or len(self.wall) > keep_from:
                    self.pair_times.append(t)
            self.resume_wall.append(time.perf_counter())
            self.resume_cpu.append(time.process_time())
            return inner(model, batch)

        task.loss = loss

    def durations(self, skip: int, clock: str) -> list[float]:
        """Seconds of each iteration after the first ``skip`` (``clock``: wall or cpu): from the
        return of one call's ``pair`` (its start when there is none) to the next call."""
        ends = (self.cpu if clock == "cpu" else self.wall)[skip + 1:]
        starts = (self.resume_cpu if clock == "cpu" else self.resume_wall)[skip:]
        return [b - a for a, b in zip(starts, ends)]

    def per_step(self, skip: int) -> dict[str, float]:
        """Mean seconds per iteration after the first ``skip`` iterations (both clocks)."""
        return {c: statistics.mean(self.durations(skip, c)) for c in ("wall", "cpu")}

    def paired(self, clock: str) -> list[float]:
        """Seconds of ``pair`` on the batches of the iterations :meth:`durations` times (same order)."""
        return [t[0] if clock == "wall" else t[1] for t in self.pair_times[:-1]]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
