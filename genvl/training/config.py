"""The training recipe: one dataclass for every stage, loaded from ``genvl/recipes/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The recipes that ship with genvl (``--config NAME``): ``tiny`` and the built-in demo's ``demo-*``.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


#: The trackers ``tracker`` may name: accelerate's (its ``log_with`` values).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class DataConfig:
    image_size: int = 32  # pixels after resize + center crop
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
    num_workers: int = 0  # DataLoader worker processes
    # Batches each worker loads ahead (only with num_workers > 0). Workers are not persistent: they
    # restart every epoch, after the main process has set the dataset's epoch (caption dropout and
    # the per-epoch draws of the tasks live in the workers' copies).
    prefetch_factor: int = 2
    validate: bool = True  # check every image header before training
    # Stream webdataset shards (each process reads only its own share, resumes exactly) instead of
    # indexing every sample up front. URLs (http(s)://, s3://...) always stream. Stages: clip, prior, vqvae, sr.
    streaming: bool = False
    probe_samples: int = 2000  # streaming: samples read ahead for set-up (a new tokenizer, embedding statistics)


@dataclass
class TrainConfig:
    """Everything a ``genvl train`` run needs besides the data path and output directory.

    ``model`` holds ``size`` (a key of the stage's size table) and any overrides of that
    stage's model config, so one recipe file works for every stage.
    """

    model: dict = field(default_factory=lambda: {"size": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 200  # optimizer steps
    # Wall-clock budget of the stage in seconds (0 = none). Once the speed is measured (after a few
    # steps) max_steps shrinks to what fits, so the schedule still decays to its end; the run stops
    # and releases its model at the budget whatever happens. Resumed runs count the time already spent.
    max_seconds: float = 0.0
    save_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0 = off)
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1  # not applied to biases, norms and temperatures
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no | bf16 | fp16
    ema_decay: float = 0.0  # 0 disables EMA; released weights are the EMA ones when enabled
    seed: int = 0
    log_every: int = 10
    save_every: int = 100  # checkpoint period in optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    sample_every: int = 0  # generative stages: sample grid period; 0: only at the end
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    tracker: str = "auto"  # auto (tensorboard if installed) | none | any accelerate tracker (tensorboard, wandb, mlflow, ...)
    tokenizer_vocab: int = 4096  # BPE size when a tokenizer is trained for this run
    text_len: int = 32  # tokens per caption for a newly trained tokenizer
    lora_rank: int = 0  # > 0: finetune the --init component with LoRA adapters of this rank (peft)
    lora_alpha: float = 0.0  # LoRA scale numerator; 0 = lora_rank (scale 1)
    lora_targets: list = field(default_factory=list)  # module-name suffixes; empty = attention + feed-forward
    # Speed and memory (benchmarks/train_speed.py and benchmarks/memory.py measure them):
    compile: bool = False  # torch.compile the model's forward for the loss; checkpoints keep the plain names
    gradient_checkpointing: bool = False  # recompute activations in backward (diffusers / transformers blocks)
    channels_last: bool = False  # NHWC memory format for models with 2-D convolutions (UNets) and image batches
    attention: str = "sdpa"  # sdpa | xformers (memory-efficient attention in diffusers models; needs xformers)

    def validate(self) -> None:
        from genvl.errors import ConfigError

        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_seconds >= 0 and self.save_minutes >= 0, "max_seconds and save_minutes must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.text_len >= 2, "text_len must be >= 2 (the start and end tokens)"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.on_nonfinite in ("stop", "skip"), "on_nonfinite must be stop or skip"),
            (self.tracker in ("auto", "none", *TRACKERS), f"tracker must be auto, none or one of {', '.join(TRACKERS)}"),
            (0 <= self.data.caption_dropout <= 1, "data.caption_dropout must be in [0, 1]"),
            (8 <= self.data.image_size <= 8192, "data.image_size must be in [8, 8192]"),
            (self.save_every >= 0 and self.log_every >= 1, "save_every must be >= 0 and log_every >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.lora_rank >= 0 and self.lora_alpha >= 0, "lora_rank and lora_alpha must be >= 0"),
            (isinstance(self.lora_targets, list) and all(isinstance(t, str) for t in self.lora_targets),
             "lora_targets must be a list of module names"),
            (self.data.prefetch_factor >= 1, "data.prefetch_factor must be >= 1"),
            (self.data.probe_samples >= 1, "data.probe_samples must be >= 1"),
            (all(isinstance(v, bool) for v in (self.compile, self.gradient_checkpointing, self.channels_last)),
             "compile, gradient_checkpointing and channels_last must be true or false"),
            (self.attention in ("sdpa", "xformers"), "attention must be sdpa or xformers"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"bad training config: {msg}")
        if self.attention == "xformers":
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise ConfigError("bad training config: attention=xformers needs the xformers package "
                                  "(pip install xformers); attention=sdpa needs nothing")


def recipe_names() -> list[str]:
    """Names of the built-in recipes (``genvl train STAGE --config NAME``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe file: ``spec`` itself when it is a file, else the built-in recipe of that name
    (``tiny``, ``demo-decoder``; ``configs/tiny.yaml``, the path in a clone of earlier versions, also
    finds ``tiny``)."""
    from genvl.config import did_you_mean
    from genvl.errors import ConfigError

    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    builtin = RECIPES_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    names = recipe_names()
    raise ConfigError(f"--config {spec}: no such file, and no built-in recipe {name!r}{did_you_mean(name, names)}; "
                      f"built-in: {', '.join(names)}")
