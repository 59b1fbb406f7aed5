"""The shared base of genvl's own components: a dataclass config, safetensors weights.

A component saves to a folder holding ``config.json`` (the config dataclass plus ``_class``)
and ``model.safetensors``. Loading is strict: a config that does not match the weights is an
error naming the file, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from genvl.config import from_dict, to_dict
from genvl.errors import ModelDirError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Component classes that a model directory may name. Only these are ever instantiated from a
# config file, so a directory cannot make genvl import arbitrary code.
COMPONENT_CLASSES: dict[str, type["ConfigModule"]] = {}


def register_component(cls: type["ConfigModule"]) -> type["ConfigModule"]:
    COMPONENT_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class ConfigModule(nn.Module):
    """An ``nn.Module`` built from one config dataclass, saved as config.json + safetensors."""

    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {**self.library_config(), "_class": class_path(self), **to_dict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        sd = state_dict if state_dict is not None else self.state_dict()
        # safetensors refuses shared storage; tied weights are saved once each as copies.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.file_keys(sd).items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "genvl_class": class_path(self)})

    @classmethod
    def load_config(cls, directory: str | Path) -> Any:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ModelDirError(f"{path}: missing config.json")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{path}: not valid JSON ({e})") from None
        data.pop("_class", None)
        return from_dict(cls.config_class, cls.strip_library_config(data), where=str(path))

    # A component whose folder is also another library's format (the CLIP component is a
    # transformers CLIPModel folder too) overrides these three hooks; by default the file holds
    # the module's own keys and config.

    def library_config(self) -> dict[str, Any]:
        """Keys another library reads from ``config.json``, written beside genvl's own."""
        return {}

    @classmethod
    def strip_library_config(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``config.json`` without the keys :meth:`library_config` added."""
        return data

    def file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's state dict -> the weights file's keys (the inverse of :meth:`module_keys`)."""
        return state

    def module_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A weights file's keys -> the module's (files of earlier layouts included)."""
        return state

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> "ConfigModule":
        directory = Path(directory)
        model = cls(cls.load_config(directory))
        model.load_weights(directory / WEIGHTS_NAME)
        if device is not None:
            model.to(device)
        return model.eval()

    def load_weights(self, path: str | Path) -> None:
        """Strictly load safetensors weights; errors name the file and the mismatch."""
        state = self.module_keys(load_safetensors(path))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or shape:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[0]}")
            if shape:
                k = shape[0]
                parts.append(f"shape mismatch for {k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}")
            raise ModelDirError(f"{path}: weights do not match config.json ({'; '.join(parts)})")
        self.load_state_dict(state, strict=True)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, corrupt or truncated file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: missing weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelDirError(f"{path}: corrupt or truncated safetensors file ({msg})") from None


def config_replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
