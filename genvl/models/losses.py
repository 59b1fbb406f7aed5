"""Contrastive losses for image-text models: InfoNCE (CLIP), sigmoid (SigLIP) and soft targets.

Losses live outside the models, as in open_clip's ``ClipLoss``: they take already projected and
L2-normalised features plus the temperature parameters, so one model can be trained with any of
them (``contrastive_loss(kind, ...)``).

Multi-process training. With ``gather=True`` and ``torch.distributed`` initialised with more than
one process, each process gathers the features of all processes *with gradients* and computes the
loss of its LOCAL rows against ALL gathered columns (open_clip's ``local_loss=True,
gather_with_grad=True``). Every loss here is normalised so that

* the mean of the per-process losses equals the single-process loss on the global batch, and
* the gradient that reaches process p's local features equals ``world_size`` times the matching
  rows of the global-batch gradient (the all-gather backward sums the column gradients from every
  process), so DDP's averaging of parameter gradients gives exactly the global-batch gradient.

Every process must hold the same local batch size (use ``drop_last=True``); the labels are offset
by ``rank * local_batch``.

Gradient accumulation is a different matter: accumulating the loss over micro-batches shrinks
the pool of negatives to one micro-batch (STYLE.md item 6). Accumulate features, not losses, if
the negatives must span the whole accumulated batch.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CONTRASTIVE_LOSSES",
    "MAX_LOGIT_SCALE",
    "contrastive_loss",
    "gather_with_grad",
    "infonce_loss",
    "rank_and_world",
    "siglip_loss",
    "soft_target_loss",
    "soft_targets",
]

# CLIP caps the temperature multiplier at 100 "to prevent scaling the logits by more than 100,
# which we found necessary to prevent training instability" (Radford et al. 2021, arXiv:2103.00020,
# sec. 2.5). Applied to the softmax losses; clamping also stops the gradient of logit_scale there.
MAX_LOGIT_SCALE = 100.0


def rank_and_world() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 from every process, keeping the autograd graph.

    Args:
        x: (B, ...) local tensor; every process must pass the same shape.

    Returns:
        (world_size * B, ...) the tensors of ranks 0, 1, ... concatenated in rank order, or ``x``
        itself when torch.distributed is not initialised or has a single process. The backward
        sums, over processes, the gradients that reach each process's chunk.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    # torch.distributed.nn.functional.all_gather is differentiable (backward: all-to-all + sum,
    # which works on gloo as well as NCCL) but warns that it is deprecated on every first call
    # site; silence just that warning.
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        chunks = all_gather(x)  # world_size tensors of (B, ...)
    return torch.cat(chunks, dim=0)


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must be 2-D (batch, dim) with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("contrastive losses need a non-empty batch")


def _as_scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """A 0-d tensor on ``like``'s device and dtype; keeps the graph of a tensor input."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar temperature/bias, got shape {tuple(value.shape)}")
        return value.reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), device=like.device, dtype=like.dtype)  # no float32 detour


def _gathered(image_features: Tensor, text_features: Tensor, gather: bool) -> tuple[Tensor, Tensor, int]:
    """Return all images (N, D), all texts (N, D) and the global index of local row 0."""
    if not gather:
        return image_features, text_features, 0
    rank, world = rank_and_world()
    if world == 1:
        return image_features, text_features, 0
    offset = rank * image_features.shape[0]
    return gather_with_grad(image_features), gather_with_grad(text_features), offset


def infonce_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    gather: bool = True,
) -> Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, arXiv:2103.00020, fig. 3).

    ``loss = (CE(scale * I @ T.T, arange) + CE(scale * T @ I.T, arange)) / 2``, both cross-entropies
    averaged over the batch. Image i and text i are the positive pair; every other text (image)
    in the (global) batch is a negative.

    Args:
        image_features: (B, D) L2-normalised image embeddings; normalising is the caller's job.
        text_features: (B, D) L2-normalised text embeddings, row i paired with image row i.
        logit_scale: scalar log of the temperature multiplier (CLIP's learnable ``logit_scale``,
            initialised to log(1/0.07)); the multiplier ``exp(logit_scale)`` is clamped at 100.
        gather: in multi-process mode, contrast local rows with the features of all processes
            (see the module docstring); with False, or in a single process, use the local batch.

    Returns:
        0-d loss tensor.
    """
    _check_pair(image_features, text_features)
    scale = _as_scalar(logit_scale, image_features).exp().clamp(max=MAX_LOGIT_SCALE)
    all_image, all_text, offset = _gathered(image_features, text_features, gather)
    b = image_features.shape[0]
    labels = torch.arange(offset, offset + b, device=image_features.device)  # (B,) global column
    logits_per_image = scale * image_features @ all_text.T  # (B, D) x (D, N) -> (B, N)
    logits_per_text = scale * text_features @ all_image.T  # (B, D) x (D, N) -> (B, N)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    gather: bool = True,
) -> Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, arXiv:2303.15343, algorithm 1).

    ``logits = exp(logit_scale) * I @ T.T + logit_bias``; labels are +1 on the diagonal and -1
    elsewhere; ``loss = -sum(logsigmoid(labels * logits)) / B`` (a sum over all B*B pairs divided by
    the batch size, as in the paper). Unlike the softmax losses, the multiplier is not clamped: the
    paper caps nothing, and the bias (initialised to -10 with ``logit_scale = log 10``) offsets the
    imbalance of one positive against B-1 negatives.

    Args:
        image_features: (B, D) L2-normalised image embeddings; normalising is the caller's job.
        text_features: (B, D) L2-normalised text embeddings, row i paired with image row i.
        logit_scale: scalar log of the temperature multiplier ``t`` (the paper's ``t'``).
        logit_bias: scalar bias ``b`` added to every logit.
        gather: in multi-process mode, local image rows meet the texts of all processes, and the
            sum is divided by the local batch size, so the mean over processes is the global loss.

    Returns:
        0-d loss tensor.
    """
    _check_pair(image_features, text_features)
    scale = _as_scalar(logit_scale, image_features).exp()
    bias = _as_scalar(logit_bias, image_features)
    _, all_text, offset = _gathered(image_features, text_features, gather)
    b, n = image_features.shape[0], all_text.shape[0]
    logits = scale * image_features @ all_text.T + bias  # (B, D) x (D, N) -> (B, N)
    labels = -torch.ones(b, n, device=logits.device, dtype=logits.dtype)  # (B, N)
    labels[torch.arange(b, device=logits.device), torch.arange(offset, offset + b, device=logits.device)] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b


def soft_targets(
    image_features: Tensor,
    text_features: Tensor,
    target_scale: Tensor | float,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
) -> Tensor:
    """Soft targets of :func:`soft_target_loss`: ``softmax(target_scale * (I @ I.T + T @ T.T) / 2)``.

    Args:
        image_features: (B, D) L2-normalised image embeddings (the rows).
        text_features: (B, D) L2-normalised text embeddings, row i paired with image row i.
        target_scale: plain multiplier of the similarities (not a log).
        all_image_features: (N, D) the columns; default ``image_features`` (N = B).
        all_text_features: (N, D) the columns; default ``text_features``.

    Returns:
        (B, N) targets without gradient; each row sums to 1.
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    with torch.no_grad():  # targets carry no gradient
        scale = _as_scalar(target_scale, image_features)
        sim = (image_features @ all_image.T + text_features @ all_text.T) / 2  # (B, D) x (D, N) -> (B, N)
        return torch.softmax(scale * sim, dim=-1)  # (B, N)


def soft_target_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    target_scale: Tensor | float | None = None,
    gather: bool = True,
) -> Tensor:
    """Contrastive cross-entropy against soft targets built from in-modality similarities.

    The targets of the widely copied CLIP tutorials (github.com/moein-shariatnia/OpenAI-CLIP;
    keras.io/examples/vision/nl_image_search): pairs whose images look alike or whose captions read
    alike are not pushed apart as hard negatives. With
    ``S = (I @ I.T + T @ T.T) / 2`` (cosine similarities, (B, N)),
    ``targets = softmax(target_scale * S, dim=-1)`` (rows sum to 1, no gradient) and
    ``loss = (CE(scale * I @ T.T, targets) + CE(scale * T @ I.T, targets)) / 2``. ``S`` is
    symmetric, so the same targets serve both directions. As ``target_scale`` grows the targets
    tend to the identity and the loss to :func:`infonce_loss`.

    Args:
        image_features: (B, D) L2-normalised image embeddings; normalising is the caller's job.
        text_features: (B, D) L2-normalised text embeddings, row i paired with image row i.
        logit_scale: scalar log of the logit multiplier, clamped at 100 after ``exp``.
        target_scale: the multiplier of ``S`` in the targets (a plain multiplier, NOT a log).
            Default: the logits' own multiplier, ``exp(logit_scale)`` clamped, detached.
        gather: in multi-process mode, local rows against the features of all processes.

    Returns:
        0-d loss tensor.
    """
    _check_pair(image_features, text_features)
    scale = _as_scalar(logit_scale, image_features).exp().clamp(max=MAX_LOGIT_SCALE)
    t_scale = scale.detach() if target_scale is None else _as_scalar(target_scale, image_features).detach()
    all_image, all_text, _ = _gathered(image_features, text_features, gather)
    logits_per_image = scale * image_features @ all_text.T  # (B, D) x (D, N) -> (B, N)
    logits_per_text = scale * text_features @ all_image.T  # (B, N)
    targets = soft_targets(image_features, text_features, t_scale, all_image, all_text)  # (B, N)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def _siglip_entry(image_features, text_features, logit_scale, logit_bias=None, gather=True):
    if logit_bias is None:
        raise ValueError("the 'siglip' loss needs logit_bias (SigLIP initialises it to -10)")
    return siglip_loss(image_features, text_features, logit_scale, logit_bias, gather=gather)


def _no_bias(fn: Callable[..., Tensor], kind: str) -> Callable[..., Tensor]:
    def entry(image_features, text_features, logit_scale, logit_bias=None, gather=True):
        if logit_bias is not None:
            raise ValueError(f"the {kind!r} loss takes no logit_bias")
        return fn(image_features, text_features, logit_scale, gather=gather)

    entry.__name__ = fn.__name__
    entry.__doc__ = fn.__doc__
    return entry


# Every entry takes (image_features, text_features, logit_scale, logit_bias=None, gather=True).
CONTRASTIVE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "infonce": _no_bias(infonce_loss, "infonce"),
    "siglip": _siglip_entry,
    "soft": _no_bias(soft_target_loss, "soft"),
}


def contrastive_loss(
    kind: str,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    gather: bool = True,
) -> Tensor:
    """Dispatch to one of :data:`CONTRASTIVE_LOSSES` by name.

    Args:
        kind: "infonce", "siglip" or "soft".
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings.
        logit_scale: scalar log temperature multiplier.
        logit_bias: scalar bias, required by "siglip" and refused by the others.
        gather: gather features across processes (see the module docstring).

    Returns:
        0-d loss tensor.
    """
    try:
        fn = CONTRASTIVE_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown contrastive loss {kind!r}; known kinds: {sorted(CONTRASTIVE_LOSSES)}") from None
    return fn(image_features, text_features, logit_scale, logit_bias=logit_bias, gather=gather)
