"""Speed and memory options of the trainer: gradient checkpointing, channels-last, attention kernel, compile.

Every option works on whatever model a stage builds, by the kind of its submodules: diffusers
models (``ModelMixin``: the decoder and super-resolution UNets, the prior transformer) and
transformers models (``PreTrainedModel``: the CLIP towers, the Llama of the token LMs) bring their
own gradient checkpointing and attention switches; channels-last applies to any model with 2-D
convolutions. ``benchmarks/train_speed.py`` and ``benchmarks/memory.py`` measure what each buys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genvl.errors import ConfigError


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _library_models(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "diffusers" | "transformers") of the outermost library models inside ``model``."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _, _ in found):
            continue  # inside a library model already found (LlamaModel inside LlamaForCausalLM)
        if isinstance(module, ModelMixin):
            found.append((name, module, "diffusers"))
        elif isinstance(module, PreTrainedModel):
            found.append((name, module, "transformers"))
    return found


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Turn on activation checkpointing in every trainable library model inside ``model``.

    diffusers models get ``enable_gradient_checkpointing()``, transformers models
    ``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before transformers
    5), both non-reentrant, where the class supports it. Frozen parts are left alone.

    Returns:
        the names of the submodules that now checkpoint ("" for ``model`` itself); empty when
        nothing in the model supports it.
    """
    done = []
    for name, module, kind in _library_models(model):
        if not _trainable(module):
            continue
        if kind == "diffusers" and getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing()
        elif kind == "transformers" and getattr(module, "supports_gradient_checkpointing", False):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            continue
        done.append(name)
    return done


def use_channels_last(model: nn.Module) -> bool:
    """Store the 4-D weights of a model with 2-D convolutions as NHWC; False when it has none."""
    if not any(isinstance(m, nn.Conv2d) and _trainable(m) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def channels_last_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its 4-D floating-point tensors (images, (B, C, H, W)) in channels-last format."""
    return {
        k: v.contiguous(memory_format=torch.channels_last)
        if torch.is_tensor(v) and v.ndim == 4 and v.is_floating_point() else v
        for k, v in batch.items()
    }


def use_xformers(model: nn.Module) -> list[str]:
    """Memory-efficient attention (xformers) in every diffusers model inside ``model``; their names."""
    done = []
    for name, module, kind in _library_models(model):
        if kind == "diffusers":
            try:
                module.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as e:
                raise ConfigError(f"attention=xformers: {str(e).splitlines()[0]}") from None
            done.append(name)
    return done


def apply_speed_options(model: nn.Module, cfg, what: str = "model") -> list[str]:
    """Apply ``cfg.gradient_checkpointing``, ``cfg.channels_last`` and ``cfg.attention`` to ``model`` in place.

    Called before the model is wrapped for distributed training (``compile`` is applied after,
    by the trainer). ``what`` names the model in the messages.

    Returns:
        one line per option that had nothing to act on, for the user.
    """
    notes = []
    if cfg.gradient_checkpointing and not enable_gradient_checkpointing(model):
        notes.append(f"gradient_checkpointing: nothing in the {what} supports it; training without")
    if cfg.channels_last and not use_channels_last(model):
        notes.append(f"channels_last: the {what} has no 2-D convolutions; memory format left as is")
    if cfg.attention == "xformers" and not use_xformers(model):
        notes.append(f"attention=xformers: the {what} has no diffusers attention; its own (sdpa) is used")
    return notes


def compile_for_training(model: nn.Module) -> nn.Module:
    """A compiled view of ``model`` (``torch.compile``) for the task's loss.

    It shares ``model``'s parameters; ``model`` itself stays uncompiled, so its state dict (and
    every checkpoint, EMA copy and released model) keeps the plain parameter names, without the
    ``_orig_mod.`` prefix of a compiled wrapper. Attribute lookups (``.config``, ``.module``)
    pass through to ``model``.
    """
    return torch.compile(model)


def make_ema(parameters: list[nn.Parameter], decay: float):
    """diffusers' ``EMAModel`` over ``parameters`` whose update is one in-place ``torch._foreach_lerp_``.

    ``shadow += (1 - decay) * (param - shadow)`` is what ``EMAModel(foreach=True).step`` computes,
    but there as a foreach subtraction into a new list of tensors and a second in-place pass; the
    lerp reads each tensor once and allocates nothing (about a third of the time on a 1M-parameter
    model on the CPU). Decay warm-up, saving and ``copy_to`` / ``store`` / ``restore`` are
    ``EMAModel``'s. Shadows that differ from their parameter in device or dtype, frozen parameters
    and DeepSpeed ZeRO-3 take ``EMAModel``'s own update (checked at the first step: the trainer
    passes the same parameters every step).
    """
    from diffusers.training_utils import EMAModel

    class LerpEMA(EMAModel):
        _lerp: bool | None = None  # whether the lerp path applies, decided at the first step

        @torch.no_grad()
        def step(self, parameters):
            parameters = list(parameters)
            if self._lerp is None:
                self._lerp = self._lerp_ok(parameters)
            if not self._lerp:
                return super().step(parameters)
            self.optimization_step += 1
            decay = self.get_decay(self.optimization_step)
            self.cur_decay_value = decay
            torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - decay)

        def _lerp_ok(self, parameters) -> bool:
            if len(parameters) != len(self.shadow_params) or not self.foreach:
                return False
            if any(not p.requires_grad or p.device != s.device or p.dtype != s.dtype
                   for p, s in zip(parameters, self.shadow_params)):
                return False
            try:
                from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
            except ImportError:
                return True
            return not is_deepspeed_zero3_enabled()

    return LerpEMA(parameters, decay=decay, foreach=True)
