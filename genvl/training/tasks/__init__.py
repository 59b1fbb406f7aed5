"""The stages ``genvl train STAGE`` knows, by name."""

from __future__ import annotations

import importlib

from genvl.errors import GenvlError

# Stages of the design, in training order.
STAGES = ("tokenizer", "clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved")

# stage -> "module:Class"; stages missing here arrive with later parts of genvl.
TASKS = {
    "clip": "genvl.training.tasks.clip:CLIPTask",
    "prior": "genvl.training.tasks.prior:PriorTask",
    "decoder": "genvl.training.tasks.decoder:DecoderTask",
    "sr": "genvl.training.tasks.superres:SuperResTask",
    "vqvae": "genvl.training.tasks.vqvae:VQVAETask",
    "lm": "genvl.training.tasks.lm:LMTask",
    "interleaved": "genvl.training.tasks.interleaved:InterleavedTask",
}


def available_stages() -> list[str]:
    out = ["tokenizer"]
    for stage, target in TASKS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(stage)
    return out


def task_class(stage: str):
    """The Task class of ``stage``."""
    if stage not in STAGES:
        raise GenvlError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    target = TASKS.get(stage)
    if target is None or stage not in available_stages():
        raise GenvlError(
            f"stage {stage!r} is not available in this version of genvl (available: {', '.join(available_stages())})"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def check_recipe(stage: str, cfg) -> None:
    """Check the ``model`` section of ``stage``'s recipe (a TrainConfig); a misspelled key fails here."""
    from genvl.training.recipes import check_model_section

    cfg.model = check_model_section(stage, task_class(stage), cfg.model)


def get_task(stage: str, cfg):
    """The Task of ``stage`` for recipe ``cfg`` (its ``model`` section checked first)."""
    check_recipe(stage, cfg)
    return task_class(stage)(cfg)
