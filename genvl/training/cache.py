"""Per-image cache of what frozen encoders make of the training images.

Stages whose inputs pass through frozen models (the decoder: the CLIP image embedding and, for a
latent decoder, the VQ-VAE latents; the prior: the CLIP image embedding) compute them for every
batch of every epoch although they never change: the images are not augmented. An
:class:`EncodingCache` keeps them by dataset index, on the device, after the first epoch has
computed them once; what varies per epoch (caption variants, dropout, noise) is never cached.

A cache that would outgrow its memory budget is not built: the stage then encodes every batch,
as without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Default budget of one cache, in bytes, over all its tensors.
DEFAULT_BUDGET = 2 * 2**30


class EncodingCache:
    """Tensors per dataset index, computed once by a frozen encoder and then looked up.

    Args:
        size: number of dataset items (indices are 0 .. size - 1).
        budget_bytes: the most memory the cache may take; past it :meth:`lookup` computes every
            time and keeps nothing (``enabled`` becomes False at the first call).
    """

    def __init__(self, size: int, budget_bytes: int = DEFAULT_BUDGET):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self.budget_bytes = budget_bytes
        self.enabled = True
        self.store: list[torch.Tensor] | None = None  # one (size, *shape) tensor per output
        self.done: torch.Tensor | None = None  # (size,) bool: computed
        self.computed = 0  # rows computed so far (cache misses)

    def lookup(self, index: torch.Tensor, compute: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """The cached outputs of the rows ``index`` (B,), computing the rows not seen before.

        Args:
            index: (B,) long dataset indices of the batch rows.
            compute: ``compute(rows)`` with ``rows`` a (B,) bool mask of the batch rows to encode;
                returns a sequence of tensors, each (rows.sum(), ...), the same every call.

        Returns:
            one (B, ...) tensor per output of ``compute``.
        """
        if self.store is None or not self.enabled:
            every = torch.ones(index.shape[0], dtype=torch.bool, device=index.device)
            outs = tuple(compute(every))
            if self.enabled and self._allocate(outs):
                self._write(index, every, outs)
            return outs
        idx = index.to(self.done.device)
        new = ~self.done[idx]  # (B,) rows not seen before
        if bool(new.any()):
            self._write(idx, new, compute(new.to(index.device)))
        return tuple(s[idx] for s in self.store)

    def _allocate(self, outs: Sequence[torch.Tensor]) -> bool:
        """Make the store for outputs shaped like ``outs``; False (and disabled) past the budget."""
        per_item = sum(o[0].numel() * o.element_size() for o in outs)
        if per_item * self.size > self.budget_bytes:
            self.enabled = False
            return False
        device = outs[0].device
        self.store = [torch.zeros(self.size, *o.shape[1:], dtype=o.dtype, device=device) for o in outs]
        self.done = torch.zeros(self.size, dtype=torch.bool, device=device)
        return True

    def _write(self, index: torch.Tensor, rows: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        """Store ``outs`` (each (rows.sum(), ...)) at the dataset indices ``index[rows]``."""
        idx = index.to(self.done.device)[rows.to(self.done.device)]
        for s, o in zip(self.store, outs):
            s[idx] = o.to(s.dtype)
        self.done[idx] = True
        self.computed += idx.shape[0]
