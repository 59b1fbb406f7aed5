"""The ``model`` section of a stage's recipe, typed and checked before anything loads.

A recipe's ``model`` mapping holds two kinds of keys: fields of the stage's model config (e.g.
:class:`~genvl.models.decoder.DecoderConfig` ``block_out_channels``) and training options the
stage's task reads (e.g. the decoder's ``cond_drop``), declared on each task class next to
``model_config`` (the config dataclass) as ``options`` (a dataclass of the options and their
defaults, read with :func:`take_options`) or ``recipe_keys`` (name -> type). A misspelled key
used to fail late (a ``TypeError`` deep in a model constructor) or, when finetuning, not at all;
:func:`check_model_section` makes it a one-line error that names the closest valid key, raised when
the recipe and ``--set`` values are read.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from genvl.config import coerce_value
from genvl.config import did_you_mean as closest
from genvl.errors import ConfigError


def _nested_keys(stage: str, key: str) -> set[str] | None:
    """Valid sub-keys of a nested mapping (the CLIP towers' transformers configs), None = free-form."""
    if stage == "clip" and key in ("vision", "text"):
        from transformers import CLIPTextConfig, CLIPVisionConfig

        cls = CLIPVisionConfig if key == "vision" else CLIPTextConfig
        return set(cls().to_dict())
    return None


def model_keys(task_cls) -> dict[str, Any]:
    """Every key the ``model`` section of ``task_cls``'s recipe takes, with its type."""
    keys: dict[str, Any] = {}
    cfg_cls = getattr(task_cls, "model_config", None)
    if cfg_cls is not None:
        hints = typing.get_type_hints(cfg_cls)
        keys.update({f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)})
    options = getattr(task_cls, "options", None)
    if options is not None:
        hints = typing.get_type_hints(options)
        keys.update({f.name: hints[f.name] for f in dataclasses.fields(options)})
    keys.update(getattr(task_cls, "recipe_keys", {}))
    return keys


def take_options(options_cls, overrides: dict):
    """A stage's training options (an instance of its ``options`` dataclass), taken out of its
    ``model`` overrides; what stays are the model config's fields."""
    names = {f.name for f in dataclasses.fields(options_cls)}
    return options_cls(**{k: overrides.pop(k) for k in list(overrides) if k in names})


def check_model_section(stage: str, task_cls, model: dict) -> dict:
    """Raise :class:`ConfigError` for an unknown or mistyped key of ``model``; return it with
    numbers coerced (``1`` for a float field becomes ``1.0``)."""
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping of the {stage} stage's settings, got {model!r}")
    keys = model_keys(task_cls)
    out = {}
    for key, value in model.items():
        if key not in keys:
            hint = closest(key, keys) or f"; its settings: {', '.join(sorted(keys))}"
            raise ConfigError(f"model.{key}: not a setting of the {stage} stage{hint}")
        where = f"model.{key}"
        sub = _nested_keys(stage, key)
        if sub is not None and isinstance(value, dict):
            for k in value:
                if k not in sub:
                    raise ConfigError(f"{where}.{k}: not a setting of the CLIP {key} tower{closest(k, sub)}")
        out[key] = coerce_value(keys[key], value, where)
    return out
