"""Speed levers for a built backbone: frozen weights, SDPA attention, channels_last memory layout, torch.compile.

`optimize(model)` applies them in place to a `DiffusionUNet` or to timm's `features_only` wrapper around one and returns
the model; run the result under `torch.inference_mode()`. What each lever does and when it pays:
docs/speed.md#optimize-what-each-lever-does.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..errors import InputError, InputTypeError
from .diffusion_unet import DiffusionUNet

__all__ = ['optimize', 'compile_model', 'backbone_of', 'use_sdpa', 'COMPILE_MODES']

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def backbone_of(model: nn.Module) -> DiffusionUNet:
    """The `DiffusionUNet` inside `model` (itself, or the one wrapped by timm's `features_only` getter)."""
    if isinstance(model, DiffusionUNet):
        return model
    inner = getattr(model, 'model', None)
    if isinstance(inner, DiffusionUNet):
        return inner
    raise InputTypeError(f'Expected a DiffusionUNet or a timm features_only model built on one, got {type(model).__name__}.')


def use_sdpa(module: nn.Module) -> int:
    """Give every diffusers `Attention` in `module` the SDPA processor; return how many had another one."""
    changed = 0
    for m in module.modules():
        if isinstance(m, Attention) and not isinstance(m.processor, AttnProcessor2_0):
            m.set_processor(AttnProcessor2_0())
            changed += 1
    return changed


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _compile_mode(compile: Union[bool, str, None]) -> Optional[str]:
    """The torch.compile mode for `compile` (None: do not compile), or a clear error for an unknown one."""
    if compile is True:
        return 'default'
    if compile in (False, None) or compile in COMPILE_MODES:
        return compile or None
    raise InputError(f'compile must be False, True or one of {COMPILE_MODES}, got {compile!r}.')


def compile_model(model: nn.Module, mode: Union[bool, str, None] = True) -> nn.Module:
    """torch.compile `model` in place (it keeps its class, feature_info and methods); fixed shapes compile once each."""
    mode = _compile_mode(mode)
    if mode is not None:
        model.compile(mode=mode, dynamic=False)
    return model


def optimize(
        model: nn.Module,
        channels_last: bool = True,
        compile: Union[bool, str] = False,
        freeze: bool = True,
        sdpa: bool = True,
) -> nn.Module:
    """Apply the speed levers to `model` in place and return it.

    Args:
        model: a `DiffusionUNet` or a timm `features_only` model built on one, already on its device and dtype.
        channels_last: NHWC weights and input.
        compile: False, True (torch.compile default mode) or one of `COMPILE_MODES`.
        freeze: eval mode and no parameter gradients.
        sdpa: make sure every attention uses PyTorch SDPA.
    """
    backbone = backbone_of(model)
    mode = _compile_mode(compile)  # checked before the model is touched
    if freeze:
        model.eval().requires_grad_(False)
    if sdpa:
        use_sdpa(backbone)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        backbone.vae.register_forward_pre_hook(_to_channels_last)
    return compile_model(model, mode)
