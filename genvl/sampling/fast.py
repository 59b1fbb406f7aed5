"""Faster unCLIP sampling with the sampling loops left as they are: compiled model forwards.

:func:`compile_components` replaces the ``forward`` of the prior, decoder and super-res modules of
an :class:`~genvl.sampling.unclip.UnclipComponents` with a ``torch.compile``-d one, in place. The
loops of :mod:`genvl.sampling.unclip` call the modules as before, so every pipeline
(:func:`~genvl.sampling.unclip.text_to_image`, variations, interpolation...) runs compiled, and the
same seed gives the same images as eager sampling up to floating-point reordering::

    comps = UnclipComponents.from_model_dir("demo", device="cuda")
    compile_components(comps, mode="reduce-overhead")   # CUDA graphs of the prior / UNet forwards
    out = text_to_image(comps, "a red heart", seed=0)  # first call compiles (seconds to a minute)
    uncompile_components(comps)                         # back to eager

Modes are ``torch.compile``'s:

- ``"default"``: inductor kernels (fused elementwise ops, fewer launches); CPU and CUDA.
- ``"reduce-overhead"``: the same, replayed as CUDA graphs. At small batch sizes the UNet step is
  bound by kernel-launch overhead, not arithmetic, and a graph replays the whole forward with one
  launch. CUDA only (on a CPU torch skips the graphs).
- ``"max-autotune"`` / ``"max-autotune-no-cudagraphs"``: autotuned matmul / conv kernels (long
  compiles).

Shapes: with ``dynamic=False`` (the default here) each distinct input shape compiles once more --
one per batch size and, for the prior, per padded prompt length; past torch's recompile limit
(8 per function) calls run eager. Under CUDA graphs a forward's output lives in a graph-owned
buffer that the next replay overwrites; the wrapper returns a copy, so schedulers that keep
earlier model outputs (DPM-Solver++ multistep) stay correct.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from genvl.errors import GenvlError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes whose compiled forwards replay CUDA graphs (on CUDA inputs).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The parts of an UnclipComponents that have denoising loops.
LOOP_PARTS = ("prior", "decoder", "sr")

_MARK = "_genvl_compiled_mode"  # instance attribute: the mode a module's forward was compiled with


def _check_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise GenvlError(f"unknown compile mode {mode!r}; choose one of: {', '.join(COMPILE_MODES)}")


def compiled_mode(module: nn.Module) -> str | None:
    """The mode ``module``'s forward was compiled with by :func:`compile_module`, or None (eager)."""
    return module.__dict__.get(_MARK)


def compile_module(
    module: nn.Module, mode: str = "default", *, dynamic: bool | None = False, backend: Any = "inductor",
    fullgraph: bool = False,
) -> nn.Module:
    """Compile ``module``'s forward in place (``module(...)`` then runs the compiled code).

    Hooks, parameters and ``state_dict`` are untouched; :func:`uncompile_module` restores the eager
    forward. Compiling an already compiled module replaces the earlier compilation.

    Args:
        module: any ``nn.Module``.
        mode: one of :data:`COMPILE_MODES`.
        dynamic: ``torch.compile``'s ``dynamic`` (False: one specialised compile per input shape).
        backend: ``torch.compile``'s backend ("inductor"; "aot_eager" traces without code generation).
        fullgraph: raise instead of splitting the graph where tracing breaks.

    Returns:
        ``module`` itself.
    """
    _check_mode(mode)
    if not isinstance(module, nn.Module):
        raise GenvlError(f"can only compile an nn.Module, got {type(module).__name__}")
    uncompile_module(module)
    options: dict[str, Any] = dict(dynamic=dynamic, backend=backend, fullgraph=fullgraph)
    if backend == "inductor":
        options["mode"] = mode
    fn = torch.compile(module.forward, **options)  # the class's bound forward
    if mode in CUDAGRAPH_MODES and backend == "inductor":
        fn = _graph_safe(fn)
    module.forward = fn  # instance attribute: nn.Module.__call__ finds it before the class's forward
    module.__dict__[_MARK] = mode
    return module


def _graph_safe(fn):
    """Wrap a CUDA-graph-compiled forward: start a new graph step, return tensors the caller owns."""

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args, **kwargs)
        return out.clone() if torch.is_tensor(out) else out

    return forward


def uncompile_module(module: nn.Module) -> nn.Module:
    """Restore the eager forward of a module compiled by :func:`compile_module` (a no-op otherwise)."""
    if _MARK in module.__dict__:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_MARK, None)
    return module


def compile_components(
    components, mode: str = "default", *, parts: Sequence[str] = LOOP_PARTS, dynamic: bool | None = False,
    backend: Any = "inductor",
):
    """Compile the denoising models of unCLIP components in place; the sampling code is unchanged.

    Args:
        components: an :class:`~genvl.sampling.unclip.UnclipComponents`.
        mode: one of :data:`COMPILE_MODES` ("reduce-overhead" = CUDA graphs on CUDA).
        parts: which of "prior", "decoder", "sr" to compile (absent ones are skipped); the CLIP
            runs once per call and stays eager.
        dynamic: see :func:`compile_module`.
        backend: see :func:`compile_module`.

    Returns:
        ``components`` itself.
    """
    _check_mode(mode)
    unknown = [p for p in parts if p not in LOOP_PARTS]
    if unknown:
        raise GenvlError(f"cannot compile {', '.join(map(repr, unknown))}; parts: {', '.join(LOOP_PARTS)}")
    for name in parts:
        module = getattr(components, name)
        if module is not None:
            compile_module(module, mode, dynamic=dynamic, backend=backend)
    return components


def uncompile_components(components):
    """Put every part compiled by :func:`compile_components` back to eager. Returns ``components``."""
    for name in LOOP_PARTS:
        module = getattr(components, name)
        if module is not None:
            uncompile_module(module)
    return components


@contextmanager
def compiled(components, mode: str = "default", **kwargs) -> Iterator[Any]:
    """``with compiled(comps, "reduce-overhead"): ...`` -- compiled inside the block, eager after it."""
    compile_components(components, mode, **kwargs)
    try:
        yield components
    finally:
        uncompile_components(components)
