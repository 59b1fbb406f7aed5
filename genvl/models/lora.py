"""LoRA finetuning of genvl components through peft (Hu et al. 2021, arXiv:2106.09685).

``add_lora`` injects low-rank adapters into a component's linear (or conv) layers and freezes the
rest; only the adapter weights train. A finetuned component is then saved as an *adapter folder*:

```
decoder/
  lora.json           {"base": "<base component folder or builtin:demo/decoder>", "rank": 8, "alpha": 8,
                       "targets": [...], "_class": "genvl.models.decoder.Decoder"}
  lora.safetensors    the lora_A / lora_B weights (a few hundred KB instead of the whole UNet)
```

Loading rebuilds the base component, injects the same adapters, loads their weights and merges
them into the base weights, so sampling runs at the speed of the plain model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from genvl.errors import ConfigError, ModelDirError

LORA_CONFIG = "lora.json"
LORA_WEIGHTS = "lora.safetensors"
ADAPTER = "default"

# Attention projections and feed-forward layers of the diffusers transformer blocks that the
# prior and the decoder are made of (module-name suffixes, as peft matches them).
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _lora_config(rank: int, alpha: float | None, targets: list[str] | None, dropout: float = 0.0,
                 exclude: str | None = None):
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"bad LoRA config: rank must be >= 1, got {rank}")
    extra = {"exclude_modules": exclude} if exclude else {}
    return LoraConfig(
        r=rank, lora_alpha=float(alpha if alpha else rank), lora_dropout=dropout,
        target_modules=list(targets or DEFAULT_TARGETS), bias="none", **extra,
    )


def _frozen_parts(module: nn.Module) -> str | None:
    """A regex of the submodules that never get adapters: a latent decoder's frozen VQ-VAE."""
    return r"vae\..*" if getattr(module, "vae", None) is not None else None


def add_lora(module: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None,
             dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place and freeze every other parameter.

    Args:
        module: the component (a :class:`~genvl.models.base.ConfigModule`).
        rank: adapter rank r.
        alpha: scale numerator (the update is ``alpha / r * B @ A``); default ``rank``.
        targets: module-name suffixes to adapt; default :data:`DEFAULT_TARGETS`.
        dropout: dropout on the adapter input.

    Returns:
        ``module`` itself, now holding ``lora_A`` / ``lora_B`` layers (the only trainable ones).
    """
    from peft import inject_adapter_in_model

    cfg = _lora_config(rank, alpha, targets, dropout, exclude=_frozen_parts(module))
    try:
        inject_adapter_in_model(cfg, module, adapter_name=ADAPTER)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ConfigError(
            f"bad LoRA config: {str(e).splitlines()[0]} (layer names in {type(module).__name__}: {', '.join(names)})"
        ) from None
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def lora_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights of ``module`` (or of ``state_dict``, e.g. its EMA weights), keyed without the adapter name."""
    sd = state_dict if state_dict is not None else module.state_dict()
    out = {}
    for key, value in sd.items():
        if "lora_" in key:
            out[key.replace(f".{ADAPTER}.", ".")] = value.detach().to("cpu").contiguous().clone()
    if not out:
        raise ModelDirError(f"{type(module).__name__} holds no LoRA weights")
    return out


def save_adapter(directory: str | Path, module: nn.Module, base: str, rank: int, alpha: float | None,
                 targets: list[str] | None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``lora.json`` + ``lora.safetensors`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    from genvl.models.base import class_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"_class": class_path(module), "base": base, "rank": rank, "alpha": float(alpha if alpha else rank),
            "targets": list(targets or DEFAULT_TARGETS)}
    (directory / LORA_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(lora_state_dict(module, state_dict), str(directory / LORA_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / LORA_CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing (incomplete LoRA component)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    for key in ("base", "rank", "targets"):
        if key not in meta:
            raise ModelDirError(f"{path}: no {key!r} field")
    return meta


def apply_adapter(base: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``base``, load its weights and merge them.

    Returns:
        ``base`` with merged weights and plain layers again (no peft wrappers left).
    """
    from peft.tuners.lora import LoraModel

    from genvl.models.base import load_safetensors

    directory = Path(directory)
    meta = read_adapter_config(directory)
    weights = load_safetensors(directory / LORA_WEIGHTS)
    base.train(False)
    tuner = LoraModel(base, _lora_config(int(meta["rank"]), meta.get("alpha"), meta["targets"],
                                         exclude=_frozen_parts(base)), ADAPTER)
    own = {k.replace(f".{ADAPTER}.", "."): k for k in base.state_dict() if "lora_" in k}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelDirError(f"{directory / LORA_WEIGHTS}: adapter does not match its base ({what})")
    state = {own[k]: v for k, v in weights.items()}
    for k, v in state.items():
        if base.state_dict()[k].shape != v.shape:
            raise ModelDirError(f"{directory / LORA_WEIGHTS}: shape mismatch for {k}")
    base.load_state_dict(state, strict=False)
    merged = tuner.merge_and_unload()
    return merged
