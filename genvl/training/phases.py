"""A phase: a short fit of one module on tensors held in memory, before a stage's main loop (for
example the decoder's coarse layout path, fitted to its targets before the denoiser trains)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Phase:
    """A short fit of one module before the main loop: ``module``'s parameters alone, by AdamW
    (``lr``, no weight decay) on a cosine schedule over ``steps``, on batches of ``batch_size`` rows
    drawn at random (seeded) from ``data``, tensors with one row per example. Every process runs it
    alike (same seed, same rows), so no gradient is exchanged and it is not checkpointed: a resumed
    run starts from the weights the phase left in its checkpoint.

    Attributes:
        name: shown on the progress bar.
        loss: ``loss(module, *rows) -> scalar``.
        done: called after the last step (the task measures and reports what the phase achieved).
    """

    name: str
    module: nn.Module
    data: tuple[torch.Tensor, ...]
    loss: Callable[..., torch.Tensor]
    steps: int
    lr: float = 1e-3
    batch_size: int = 256
    done: Callable[[], None] | None = None


@torch.enable_grad()
def run_phase(phase: Phase, seed: int, progress: bool = False) -> None:
    """Fit ``phase.module`` as :class:`Phase` says."""
    from tqdm.auto import tqdm

    params = [p for p in phase.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / phase.steps)))
    gen = torch.Generator().manual_seed(seed)
    n = len(phase.data[0])
    for _ in tqdm(range(phase.steps), desc=phase.name, disable=not progress, leave=False):
        rows = torch.randint(0, n, (min(phase.batch_size, n),), generator=gen)
        loss = phase.loss(phase.module, *(t[rows] for t in phase.data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if phase.done is not None:
        phase.done()
