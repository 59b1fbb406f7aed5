"""The stages ``genvl train STAGE`` knows, by name."""

from __future__ import annotations

from genvl.errors import GenvlError

# Stages of the design; those not listed in TASKS arrive with later parts of genvl.
STAGES = ("tokenizer", "clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved")


def get_task(stage: str, cfg):
    from genvl.training.tasks.clip import CLIPTask

    tasks = {"clip": CLIPTask}
    if stage not in STAGES:
        raise GenvlError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if stage not in tasks:
        raise GenvlError(f"stage {stage!r} is not available in this version of genvl (available: clip, tokenizer)")
    return tasks[stage](cfg)
