"""Model cards: the README.md of a model directory, generated from its ``genvl.json``.

A card opens with Hugging Face model-card metadata (``library_name``, ``base_model``, ``tags``,
``license``, ``datasets``), then says what the model is, what it was finetuned from (path and
hash; the base's own training is in the base's card), how each component was trained (data, steps,
time, hardware, command, recipe), what it scored and how to use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genvl.checkpoint import TOKENIZER_DIR, write_file_atomic

__all__ = ["write_card", "base_model"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def base_model(meta: dict) -> dict | None:
    """``{"model": ref, "sha256": ...}`` of the model a finetuned directory started from, or None."""
    if isinstance(meta.get("base"), dict) and meta["base"].get("model"):
        return meta["base"]
    t2i = meta.get("t2i") or {}
    if t2i.get("base"):
        return {"model": t2i["base"], "sha256": t2i.get("base_hash")}
    return None


_TAGS = {"decoder": ["text-to-image", "unclip"], "lm": ["image-to-text", "autoregressive"],
         "interleaved": ["interleaved"], "clip": ["clip", "zero-shot-image-classification"]}


def _front_matter(meta: dict) -> list[str]:
    """The Hugging Face model-card metadata block (YAML between ``---`` lines)."""
    import yaml

    tags = ["genvl"] + [t for name in meta.get("components", {}) for t in _TAGS.get(name, [])]
    data = []
    for rec in list(meta.get("training", {}).values()) + [meta.get("t2i") or {}]:
        if rec.get("data") and rec["data"] not in data:
            data.append(str(rec["data"]))
    front: dict[str, Any] = {"library_name": "genvl"}
    base = base_model(meta)
    if base:
        front["base_model"] = str(base["model"])
    front["tags"] = list(dict.fromkeys(tags))
    if meta.get("license"):
        front["license"] = meta["license"]
    if data:
        front["datasets"] = data
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]


def write_card(path: str | Path, meta: dict, shown_as: str | Path | None = None) -> None:
    """Generate README.md (the model card) from ``genvl.json``.

    ``shown_as``: the directory the card's commands name (default ``path``), for a card written
    in a staging folder before the directory is copied to where it is used.
    """
    path = Path(path)
    lines = [*_front_matter(meta), f"# genvl model: {path.name}", ""]
    if meta.get("description"):
        lines += [meta["description"].rstrip(), ""]
    base = base_model(meta)
    if base:
        lines += [f"Base model: `{base['model']}`" + (f" (sha256 {base['sha256']})" if base.get("sha256") else "")
                  + ". The training records below are this model's own; the base's are in its card.", ""]
    if (path / "samples.png").is_file() and "samples.png" not in meta.get("description", ""):
        lines += ["![samples](samples.png)", ""]
    lines += ["Components:", ""]
    lines += [f"- `{name}/` ({cls})" for name, cls in meta["components"].items()]
    lines += [f"- `{meta.get('tokenizer', TOKENIZER_DIR)}/` (text tokenizer)", ""]
    for name, rec in meta.get("training", {}).items():
        lines += [f"## Training: {name}", ""]
        for key in ("init", "data", "pairs", "streamed_shards", "skipped", "steps", "batch_size", "samples_seen", "time",
                    "hardware", "final_loss", "note"):
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
            extra = {k: v for k, v in rec.items() if k not in ("values", "data", "n")}
            if extra:
                lines += [f"- {k}: {_fmt(v) if not isinstance(v, dict) else json.dumps(v)}" for k, v in extra.items()]
                lines.append("")
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in rec.get("values", {}).items()]
            lines.append("")
    named = Path(shown_as) if shown_as is not None else path
    usage = "genvl classify --method clip --model {p} --classes \"a cat,a dog\" IMAGE.png".format(p=named)
    if "clip" in meta["components"]:
        use = [usage, f"genvl evaluate retrieval --model {named} --data IMAGE_FOLDER"]
        if "decoder" in meta["components"]:
            use.insert(0, f'genvl sample "a red heart" --model {named} --num-images 4 --seed 0')
        if "lm" in meta["components"]:
            use[1:1] = [f'genvl sample --method ar "a red heart" --model {named} --num-images 4',
                        f"genvl caption IMAGE.png --model {named}"]
        if "interleaved" in meta["components"]:
            use.insert(1, f'genvl sample --method interleaved "a red heart" --model {named} --seed 0')
        lines += ["## Use", "", "```", *use, "```", ""]
    write_file_atomic(path / "README.md", "\n".join(lines))
