"""Model directories: the release format of a trained genvl system.

```
MODEL_DIR/
  genvl.json          {"format": "genvl-model", "components": {"clip": "genvl.models.clip.CLIP"}, ...}
  clip/               config.json + model.safetensors (one folder per component)
  tokenizer/          HuggingFace tokenizer files
  README.md           the model card, generated from genvl.json
```

Weights are safetensors only; component classes come from a fixed registry, never from an
import path found in a file. Training state for ``--resume`` lives apart, in
``checkpoints/step-N/`` (see :mod:`genvl.training.trainer`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genvl import __version__
from genvl.errors import ModelDirError
from genvl.models.base import COMPONENT_CLASSES, CONFIG_NAME, WEIGHTS_NAME, ConfigModule, class_path

META_NAME = "genvl.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "genvl-model"


def _import_components() -> None:
    # Registers the component classes a directory may name (modules that are not there yet are skipped).
    import importlib

    for module in ("genvl.models.clip", "genvl.models.prior", "genvl.models.decoder"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder to ``final``, replacing any old one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_component(module: ConfigModule, directory: str | Path, state_dict=None) -> None:
    """Write one component folder atomically (a temp folder renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        module.save_pretrained(tmp, state_dict=state_dict)
        _atomic_replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        _atomic_replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelDirError(f"not a directory: {path}")
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise ModelDirError(f"{path}: not a genvl model directory (no {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("components"), dict):
        raise ModelDirError(f"{meta_path}: not a genvl model description (format {FORMAT!r} with components)")
    return meta


def write_meta(path: str | Path, meta: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{META_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path / META_NAME)


@dataclass
class ModelDir:
    """A model directory on disk; components load on demand.

    Attributes:
        path: the directory.
        meta: the parsed ``genvl.json``.
    """

    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def components(self) -> dict[str, str]:
        return dict(self.meta["components"])

    def has(self, name: str) -> bool:
        return name in self.meta["components"]

    def require(self, *names: str, purpose: str = "this command") -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            have = ", ".join(self.components) or "none"
            raise ModelDirError(f"{self.path}: has no {', '.join(missing)} component, needed for {purpose} (it has: {have})")

    def load(self, name: str, device: str | None = None) -> ConfigModule:
        """Load component ``name`` in eval mode."""
        _import_components()
        self.require(name)
        cls_name = self.meta["components"][name]
        cls = COMPONENT_CLASSES.get(cls_name)
        if cls is None:
            raise ModelDirError(f"{self.path / META_NAME}: unknown component class {cls_name!r} for {name!r}")
        folder = self.path / name
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / f).is_file():
                raise ModelDirError(f"{folder}: missing {f} (incomplete model directory)")
        return cls.from_pretrained(folder, device=device)

    def tokenizer(self):
        from genvl.tokenizers.text import load_text_tokenizer

        tok_dir = self.path / self.meta.get("tokenizer", TOKENIZER_DIR)
        if not tok_dir.is_dir():
            raise ModelDirError(f"{self.path}: missing tokenizer/ folder (incomplete model directory)")
        return load_text_tokenizer(tok_dir)

    @property
    def card(self) -> str:
        p = self.path / "README.md"
        return p.read_text() if p.is_file() else ""


def open_model_dir(path: str | Path) -> ModelDir:
    """Open and validate a model directory (files present; weights are read on ``load``)."""
    path = Path(path)
    meta = read_meta(path)
    for name in meta["components"]:
        folder = path / name
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / f).is_file():
                raise ModelDirError(f"{folder}: missing {f} (incomplete model directory)")
    return ModelDir(path=path, meta=meta)


def save_model_dir(
    path: str | Path,
    components: dict[str, ConfigModule],
    tokenizer=None,
    state_dicts: dict[str, dict] | None = None,
    training: dict[str, Any] | None = None,
) -> ModelDir:
    """Write (or update) a model directory.

    Components already in the directory and not named here are kept, so stages trained one
    after another (CLIP, then prior, then decoder) accumulate into one directory.

    Args:
        path: the model directory.
        components: name -> module to save (its ``config`` + weights).
        tokenizer: a HuggingFace tokenizer saved under ``tokenizer/`` when given.
        state_dicts: optional name -> state dict to save instead of the module's own (EMA weights).
        training: name -> the record of how that component was trained (for the model card).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = read_meta(path) if (path / META_NAME).is_file() else {
        "format": FORMAT, "genvl_version": __version__, "components": {}, "tokenizer": TOKENIZER_DIR,
        "training": {}, "metrics": {},
    }
    for name, module in components.items():
        sd = (state_dicts or {}).get(name)
        save_component(module, path / name, state_dict=sd)
        meta["components"][name] = class_path(module)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path / TOKENIZER_DIR)
    for name, record in (training or {}).items():
        meta.setdefault("training", {})[name] = record
    meta["genvl_version"] = __version__
    write_meta(path, meta)
    write_model_card(path, meta)
    return ModelDir(path=path, meta=meta)


def record_metrics(path: str | Path, kind: str, metrics: dict[str, Any], details: dict[str, Any] | None = None) -> None:
    """Store evaluation results in ``genvl.json`` and regenerate the model card."""
    path = Path(path)
    meta = read_meta(path)
    meta.setdefault("metrics", {})[kind] = {"values": metrics, **(details or {})}
    write_meta(path, meta)
    write_model_card(path, meta)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_model_card(path: str | Path, meta: dict) -> None:
    """Generate README.md (the model card) from ``genvl.json``."""
    path = Path(path)
    lines = [f"# genvl model: {path.name}", ""]
    lines += ["Components:", ""]
    lines += [f"- `{name}/` ({cls})" for name, cls in meta["components"].items()]
    lines += [f"- `{meta.get('tokenizer', TOKENIZER_DIR)}/` (text tokenizer)", ""]
    for name, rec in meta.get("training", {}).items():
        lines += [f"## Training: {name}", ""]
        for key in ("data", "pairs", "skipped", "steps", "batch_size", "samples_seen", "time", "hardware", "final_loss"):
            if key in rec:
                lines.append(f"- {key.replace('_', ' ')}: {_fmt(rec[key])}")
        if rec.get("command"):
            lines += ["", "Reproduce:", "", "```", rec["command"], "```"]
        if rec.get("recipe"):
            lines += ["", "Recipe:", "", "```yaml", rec["recipe"].rstrip(), "```"]
        lines.append("")
    metrics = meta.get("metrics", {})
    if metrics:
        lines += ["## Metrics", ""]
        for kind, rec in metrics.items():
            lines += [f"### {kind}", ""]
            if rec.get("data"):
                lines += [f"Data: `{rec['data']}`" + (f" ({rec['n']} pairs)" if "n" in rec else ""), ""]
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in rec.get("values", {}).items()]
            lines.append("")
    usage = "genvl classify --method clip --model {p} --classes \"a cat,a dog\" IMAGE.png".format(p=path)
    if "clip" in meta["components"]:
        lines += ["## Use", "", "```", usage, f"genvl evaluate retrieval --model {path} --data IMAGE_FOLDER", "```", ""]
    tmp = path / f".README.md.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path / "README.md")
