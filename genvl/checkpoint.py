"""Model directories: the release format of a trained genvl system.

```
MODEL_DIR/
  genvl.json          {"format": "genvl-model", "components": {"clip": "genvl.models.clip.CLIP"}, ...}
  clip/               config.json + model.safetensors (one folder per component)
  tokenizer/          HuggingFace tokenizer files
  README.md           the model card, generated from genvl.json
```

A component folder is one of three kinds:

- full: ``config.json`` + ``model.safetensors``;
- LoRA adapter: ``lora.json`` (naming its base component folder) + ``lora.safetensors``, merged into
  the base on load (see :mod:`genvl.models.lora`);
- reference: ``ref.json`` naming another directory's component folder, used as it is (a LoRA
  finetune refers to the components it did not change instead of copying them).

A base is named by absolute path, or as ``builtin:demo/NAME`` for the model shipped in
``genvl/assets/demo`` (so finetunes of the demo survive reinstalling genvl elsewhere).

Weights are safetensors only; component classes come from a fixed registry, never from an
import path found in a file. Every write is atomic (a temporary file or folder renamed into place)
and durable: files and their folder are flushed to disk (``fsync``) before the rename, and the
parent folder after it, so a power cut leaves the old version or the new one, not a torn one
(``GENVL_FSYNC=0`` turns the flushing off; see docs/reliability.md). Training state for ``--resume``
lives apart, in ``checkpoints/step-N/`` (see :mod:`genvl.training.trainer`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genvl import __version__
from genvl.errors import ModelDirError
from genvl.models.base import COMPONENT_CLASSES, CONFIG_NAME, WEIGHTS_NAME, ConfigModule, class_path

META_NAME = "genvl.json"
REF_NAME = "ref.json"
MAX_REF_DEPTH = 8
# Model directories shipped inside the package, by the name that --model / --init accept.
BUILTIN = {"demo": Path(__file__).parent / "assets" / "demo"}
TOKENIZER_DIR = "tokenizer"
FORMAT = "genvl-model"


def import_component_classes() -> None:
    """Register every component class a model directory may name (importing their modules)."""
    import importlib

    for module in ("genvl.models.clip", "genvl.models.prior", "genvl.models.decoder", "genvl.models.superres",
                   "genvl.tokenizers.vqvae",
                   "genvl.models.lm", "genvl.models.interleaved"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def resolve_model_path(path: str | Path) -> Path:
    """A model's folder: a local path; ``demo`` (when no such local folder exists) or ``builtin:demo``,
    the shipped demo model; or a Hugging Face Hub id ``owner/name`` with no such local folder, its
    snapshot in the local Hugging Face cache."""
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):].strip("/")
        if name not in BUILTIN:
            raise ModelDirError(f"unknown built-in model {name!r} (built-in: {', '.join(BUILTIN)})")
        return BUILTIN[name]
    p = Path(path)
    if not p.exists() and text in BUILTIN:
        return BUILTIN[text]
    if not p.exists() and _HUB_ID.fullmatch(text):
        return _from_hub_cache(text)
    return p


# owner/name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def _from_hub_cache(repo_id: str) -> Path:
    """The local snapshot of Hub model ``repo_id`` (its cache folder; offline mode honoured).

    Nothing is downloaded: genvl reads what ``hf download`` (or another library) has put into the
    Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelDirError(
            f"{repo_id}: no such folder, and no Hugging Face model of that id in the local cache; "
            f"download it first with `hf download {repo_id}` (genvl itself never downloads)"
        ) from None


def component_ref(folder: str | Path) -> str:
    """How a model directory names another directory's component folder (see the module doc)."""
    folder = Path(folder).resolve()
    for name, root in BUILTIN.items():
        try:
            return f"builtin:{name}/{folder.relative_to(root.resolve()).as_posix()}"
        except ValueError:
            pass
    return str(folder)


def model_ref(path: str | Path) -> str:
    """How a card names a model directory: ``builtin:demo`` for the shipped one, else its absolute path."""
    resolved = Path(path).resolve()
    for name, root in BUILTIN.items():
        if resolved == root.resolve():
            return f"builtin:{name}"
    return str(resolved)


def _resolve_ref(ref: str, where: Path) -> Path:
    if ref.startswith("builtin:"):
        name, _, rest = ref[len("builtin:"):].partition("/")
        if name not in BUILTIN:
            raise ModelDirError(f"{where}: refers to unknown built-in model {name!r}")
        return BUILTIN[name] / rest
    return Path(ref)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("base"), str):
        raise ModelDirError(f"{path}: no 'base' field naming the component it refers to")
    return data


def _base_of(folder: Path) -> tuple[str, Path | None]:
    """(kind, base folder) of a component folder: full | lora | ref; base is None for full."""
    if (folder / REF_NAME).is_file():
        kind, meta_path = "ref", folder / REF_NAME
    elif (folder / "lora.json").is_file():
        kind, meta_path = "lora", folder / "lora.json"
    else:
        return "full", None
    ref = _read_json(meta_path)["base"]
    base = _resolve_ref(ref, meta_path)
    if not base.is_dir():
        raise ModelDirError(
            f"{folder}: its base component {ref} is not there (the model it was finetuned from moved or was deleted)"
        )
    return kind, base


def check_component(folder: str | Path, depth: int = 0) -> None:
    """Raise ModelDirError unless ``folder`` (and any base it names) holds every file it needs."""
    folder = Path(folder)
    if depth > MAX_REF_DEPTH:
        raise ModelDirError(f"{folder}: too many nested references (a cycle?)")
    kind, base = _base_of(folder)
    if kind == "full":
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / f).is_file():
                raise ModelDirError(f"{folder}: missing {f} (incomplete model directory)")
        return
    if kind == "lora" and not (folder / "lora.safetensors").is_file():
        raise ModelDirError(f"{folder}: missing lora.safetensors (incomplete model directory)")
    check_component(base, depth + 1)


def load_component(folder: str | Path, cls: type[ConfigModule], device: str | None = None, depth: int = 0) -> ConfigModule:
    """Load a component folder of any kind (full, LoRA adapter, reference) in eval mode."""
    folder = Path(folder)
    if depth > MAX_REF_DEPTH:
        raise ModelDirError(f"{folder}: too many nested references (a cycle?)")
    kind, base = _base_of(folder)
    if kind == "full":
        return cls.from_pretrained(folder, device=device)
    model = load_component(base, cls, depth=depth + 1)
    if kind == "lora":
        from genvl.models.lora import apply_adapter

        model = apply_adapter(model, folder)
    if device is not None:
        model.to(device)
    return model.eval()


def follow_refs(folder: str | Path) -> Path:
    """The folder a chain of references ends at (``folder`` itself when it is not a reference)."""
    folder = Path(folder)
    for _ in range(MAX_REF_DEPTH + 1):
        kind, base = _base_of(folder)
        if kind != "ref":
            return folder
        folder = base
    raise ModelDirError(f"{folder}: too many nested references (a cycle?)")


def write_ref(folder: str | Path, base_folder: str | Path) -> None:
    """Make ``folder`` a reference to ``base_folder`` (another directory's component)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ref = component_ref(follow_refs(base_folder))
    (folder / REF_NAME).write_text(json.dumps({"base": ref}, indent=2) + "\n")


FSYNC_ENV = "GENVL_FSYNC"  # "0": skip the fsync calls (atomic against a killed process only)


def fsync_enabled() -> bool:
    return os.environ.get(FSYNC_ENV, "1").strip() not in ("0", "false", "no", "off")


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    if not fsync_enabled():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened: nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data and size to disk."""
    if not fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first (before renaming it into place)."""
    if not fsync_enabled():
        return
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


#: The installed genvl package; nothing genvl runs writes below it (the built-in demo included).
PACKAGE_ROOT = Path(__file__).resolve().parent


def check_not_in_package(path: str | Path) -> Path:
    """``path``, or a :class:`ModelDirError` when it lies inside the installed genvl package.

    Every writer of this module calls it, so evaluating, training into or recording metrics of the
    built-in demo cannot change the installation; results go to ``--json`` or a folder the user owns.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved == PACKAGE_ROOT or PACKAGE_ROOT in resolved.parents:
        raise ModelDirError(f"{path}: inside the installed genvl package, which genvl never writes to; "
                            "copy the model to a folder of yours first (e.g. genvl export or cp -r)")
    return path


def write_file_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, flushed to disk, renamed into place; then the
    folder is flushed so that the rename itself survives a power cut."""
    path = check_not_in_package(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique per thread too
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync_enabled():
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder to ``final``, replacing any old one.

    The folder's files are flushed to disk before the rename and the parent folder after it, so
    that after a power cut ``final`` is the old folder or the new one, each complete.
    """
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_write_dir(directory: Path, write) -> None:
    """Call ``write(tmp)`` on a temp folder beside ``directory``, then rename it into place."""
    directory = check_not_in_package(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        _atomic_replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_component(module: ConfigModule, directory: str | Path, state_dict=None) -> None:
    """Write one component folder atomically (a temp folder renamed into place)."""
    _atomic_write_dir(Path(directory), lambda tmp: module.save_pretrained(tmp, state_dict=state_dict))


def save_adapter_component(module, directory: str | Path, base: str | Path, rank: int, alpha: float | None = None,
                           targets: list[str] | None = None, state_dict=None) -> None:
    """Write a LoRA adapter folder (only the adapter weights) referring to the ``base`` component folder."""
    from genvl.models.lora import save_adapter

    _atomic_write_dir(Path(directory), lambda tmp: save_adapter(
        tmp, module, component_ref(base), rank, alpha, targets, state_dict=state_dict))


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    directory = check_not_in_package(directory)
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
    path = check_not_in_package(path)
    path.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path / META_NAME, json.dumps(meta, indent=2, sort_keys=False) + "\n")


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
        import_component_classes()
        self.require(name)
        cls_name = self.meta["components"][name]
        cls = COMPONENT_CLASSES.get(cls_name)
        if cls is None:
            raise ModelDirError(f"{self.path / META_NAME}: unknown component class {cls_name!r} for {name!r}")
        folder = self.path / name
        check_component(folder)
        return load_component(folder, cls, device=device)

    def component_kind(self, name: str) -> str:
        """full | lora | ref: how component ``name`` is stored."""
        return _base_of(self.path / name)[0]

    def lineage(self, name: str) -> list[tuple[str, Path]]:
        """Where component ``name``'s weights come from: ``(kind, folder)`` from this directory's
        folder through the bases it names (LoRA adapters merged over them, references followed)
        to the full weights, last."""
        chain, folder = [], self.path / name
        for _ in range(MAX_REF_DEPTH + 1):
            kind, base = _base_of(folder)
            chain.append((kind, folder))
            if base is None:
                return chain
            folder = base
        raise ModelDirError(f"{self.path / name}: too many nested references (a cycle?)")

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
    """Open and validate a model directory (files present; weights are read on ``load``).

    ``path`` may also be ``demo`` / ``builtin:demo``: the model shipped with genvl.
    """
    path = resolve_model_path(path)
    meta = read_meta(path)
    for name in meta["components"]:
        check_component(path / name)
    return ModelDir(path=path, meta=meta)


def save_model_dir(
    path: str | Path,
    components: dict[str, ConfigModule],
    tokenizer=None,
    state_dicts: dict[str, dict] | None = None,
    training: dict[str, Any] | None = None,
    adapters: dict[str, dict] | None = None,
    refs: dict[str, tuple[str, Path]] | None = None,
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
        adapters: name -> LoRA settings (``base`` folder, ``rank``, ``alpha``, ``targets``): save that
            component as an adapter folder holding only its LoRA weights.
        refs: name -> (class path, base component folder): write reference folders.
    """
    path = check_not_in_package(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_dir(path.parent)  # the new directory's own name
    meta = read_meta(path) if (path / META_NAME).is_file() else {
        "format": FORMAT, "genvl_version": __version__, "components": {}, "tokenizer": TOKENIZER_DIR,
        "training": {}, "metrics": {},
    }
    for name, module in components.items():
        sd = (state_dicts or {}).get(name)
        if adapters and name in adapters:
            save_adapter_component(module, path / name, state_dict=sd, **adapters[name])
        else:
            save_component(module, path / name, state_dict=sd)
        meta["components"][name] = class_path(module)
    for name, (cls_name, base_folder) in (refs or {}).items():
        _atomic_write_dir(path / name, lambda tmp, b=base_folder: write_ref(tmp, b))
        meta["components"][name] = cls_name
    if tokenizer is not None:
        save_tokenizer(tokenizer, path / TOKENIZER_DIR)
    for name, record in (training or {}).items():
        meta.setdefault("training", {})[name] = record
    meta["genvl_version"] = __version__
    write_meta(path, meta)
    write_model_card(path, meta)
    return ModelDir(path=path, meta=meta)


def record_metrics(path: str | Path, kind: str, metrics: dict[str, Any], details: dict[str, Any] | None = None,
                   temperatures: dict[str, float] | None = None) -> None:
    """Store evaluation results in ``genvl.json`` and regenerate the model card; ``temperatures``:
    zero-shot softmax temperatures fitted on labelled data, which the classifiers then apply
    (``genvl.json`` "classify")."""
    path = Path(path)
    meta = read_meta(path)
    meta.setdefault("metrics", {})[kind] = {"values": metrics, **(details or {})}
    if temperatures:
        meta.setdefault("classify", {}).setdefault("temperature", {}).update(temperatures)
    write_meta(path, meta)
    write_model_card(path, meta)


def model_dir_hash(path: str | Path) -> str:
    """sha256 over a model directory's ``genvl.json`` and weight files (names and bytes), first 16
    hex digits: names the exact base a finetune started from."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or p.name == META_NAME))
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def write_model_card(path: str | Path, meta: dict, shown_as: str | Path | None = None) -> None:
    """Generate README.md (the model card) from ``genvl.json`` (see :mod:`genvl.card`); its commands
    name ``shown_as`` (default ``path``)."""
    from genvl.card import write_card

    write_card(path, meta, shown_as=shown_as)
