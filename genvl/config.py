"""Dataclass configs <-> YAML / JSON, with ``key=value`` overrides.

Every config in genvl is a (possibly nested) dataclass. ``to_dict`` / ``from_dict`` convert
them to plain containers, ``load_config`` / ``save_config`` read and write YAML or JSON, and
``apply_overrides`` applies command-line ``--set a.b=value`` strings, parsing each value as
YAML so that ``--set lr=3e-4``, ``--set ema=true`` and ``--set model.size=tiny`` all work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from genvl.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Convert a dataclass (recursively) into plain dicts / lists / scalars."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def coerce_value(tp: Any, value: Any, where: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return type(value)(coerce_value(inner, v, f"{where}[{i}]") for i, v in enumerate(value)) if origin is list else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from a dict; unknown keys are an error naming the key."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(names))}")
    kwargs = {k: coerce_value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML (or JSON) file into dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, data, where=str(path))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (or JSON for a ``.json`` path), via a temporary file renamed into place.

    A run killed while writing leaves the old file or the new one, never an empty one (which
    ``load_config`` would read as "all defaults" when the run is resumed).
    """
    path = Path(path)
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def apply_overrides(cfg: T, overrides: list[str] | None) -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied.

    Values are parsed as YAML (``3e-4`` -> float, ``true`` -> bool, ``[1, 2]`` -> list). Keys
    that name a ``dict`` field may introduce new sub-keys (``model.hidden=64``); keys of a
    dataclass must exist.
    """
    data = to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 3e-4 as a string; accept it as a float.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") and value.strip() else value
            except ValueError:
                pass
        node = data
        parts = key.split(".")
        cls = type(cfg)
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {key}: unknown key {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])!r} is not a section")
        leaf = parts[-1]
        # Only dict-valued fields may grow new keys; dataclass fields must exist.
        parent_cls = cls
        for part in parts[:-1]:
            hint = _unwrap_optional(_field_types(parent_cls)[part]) if dataclasses.is_dataclass(parent_cls) else None
            parent_cls = hint if dataclasses.is_dataclass(hint) else None
            if parent_cls is None:
                break
        if parent_cls is not None and leaf not in node:
            known = ", ".join(sorted(node))
            raise ConfigError(f"--set {key}: unknown key {leaf!r}{did_you_mean(leaf, node)}; known: {known}")
        if parent_cls is not None and _unwrap_optional(_field_types(parent_cls)[leaf]) is str:
            value = raw.strip()  # keep text as typed: YAML would turn "no" into False
        node[leaf] = value
    return from_dict(type(cfg), data, where="config")
