"""Text prompts for the diffusion backbones: embeddings computed once with the base repo's text encoder(s), cached on
disk, and one prompt per image for any forward pass (`encode_prompts`, `use_prompts`).

The encoding and its cache live in `models/conditioning/text.py`; this module is the user-facing layer above the
models. See docs/models.md#text-prompts."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from . import hub
from .errors import InputError, InputTypeError
from .models._base import DiffusionBackbone
from .models.conditioning.text import encode_cached

__all__ = ['PromptBatch', 'encode_prompts', 'use_prompts', 'find_diffusion_model', 'empty_prompt_embeds']

@dataclass(frozen=True)
class PromptBatch:
    """Text embeddings of `prompts`, one row each: `prompt_embeds` (N, 77, D) and, for SDXL, `pooled_prompt_embeds`
    (N, P) (PixArt: T5's (N, T, D) and its token mask `prompt_mask` (N, T)); float32 on the CPU as encoded
    (`use_prompts` moves them to the model's device once)."""

    prompts: tuple[str, ...]
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    prompt_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompts)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The model buffers these embeddings fill (`prompt_embeds`, and `pooled_prompt_embeds` for SDXL)."""
        out = {'prompt_embeds': self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            out['pooled_prompt_embeds'] = self.pooled_prompt_embeds
        if self.prompt_mask is not None:
            out['prompt_mask'] = self.prompt_mask
        return out


def find_diffusion_model(module: nn.Module) -> nn.Module:
    """The diffusion backbone (`models.DiffusionBackbone`) in `module`: itself, or inside a wrapper such as timm's
    `FeatureGetterNet` or `diffbackbone.mmseg.DiffusionBackbone`."""
    if isinstance(module, nn.Module):
        for sub in module.modules():  # the module itself first
            if isinstance(sub, DiffusionBackbone):
                return sub
    raise InputTypeError(f'{type(module).__name__} holds no diffbackbone DiffusionUNet: give a model built with '
                    'timm.create_model("cleandift_sd21", ...) (or a wrapper of one).')


def _as_prompts(prompts: Union[str, Sequence[str]]) -> tuple[str, ...]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputTypeError(f'prompts must be a string or a list of strings (one per image), got {type(prompts).__name__} '
                        f'{prompts!r}; use "" for the empty prompt.')
    prompts = tuple(prompts)
    if not prompts:
        raise InputError('No prompts given: give one prompt per image, or one for all images.')
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise InputError(f'Prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}; use "" for the empty prompt.')
    return prompts


def encode_prompts(model_or_base_repo: Union[nn.Module, str], prompts: Union[str, Sequence[str]],
                   sdxl: bool = False) -> PromptBatch:
    """Text embeddings of `prompts` for a model (its `base_repo`'s text encoders) or a base repo.

    Args:
        model_or_base_repo: a diffbackbone model (or any wrapper of one), or a base repo `'org/name[@revision]'` /
            local diffusers folder with `tokenizer/` and `text_encoder/` (SDXL: also `tokenizer_2/`, `text_encoder_2/`).
        prompts: one string per image (a single string is one prompt).
        sdxl: base repo given by name: encode with SDXL's two text encoders (a model knows this itself).

    Each distinct prompt is encoded once, ever: later calls read it from the cache without loading any text encoder
    (also with HF_HUB_OFFLINE=1).
    """
    prompts = _as_prompts(prompts)
    if isinstance(model_or_base_repo, str):
        source = model_or_base_repo
    else:
        net = find_diffusion_model(model_or_base_repo)
        if not net.base_repo:
            raise hub.HubError('The model has no base_repo to take the text encoder from; build it with '
                               "base_repo='org/name' or a local diffusers folder.")
        enc = net.encode_prompts(prompts)
        given = {k: torch.cat([enc[p][k] for p in prompts]) for k in enc[prompts[0]]}
        return PromptBatch(prompts, given['prompt_embeds'], given.get('pooled_prompt_embeds'),
                           given.get('prompt_mask'))
    tensors = encode_cached(source, list(dict.fromkeys(prompts)), sdxl)
    embeds = torch.cat([tensors[p]['prompt_embeds'] for p in prompts])
    pooled = torch.cat([tensors[p]['pooled_prompt_embeds'] for p in prompts]) if sdxl else None
    return PromptBatch(prompts, embeds, pooled)


def empty_prompt_embeds(base_repo: str) -> torch.Tensor:
    """Text embedding of the empty prompt for an SD base repo in diffusers layout: (1, 77, D) float32, cached."""
    return encode_prompts(base_repo, ['']).prompt_embeds


# ---- per-image prompts ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def use_prompts(model: nn.Module, prompts: Union[str, Sequence[str], PromptBatch]) -> Iterator[PromptBatch]:
    """Inside the block, every forward of `model` (or of any wrapper holding it) conditions image i of the batch on
    `prompts[i]`; a single prompt applies to all images. Outside it, the model's own prompt is used again.

    Strings are encoded (and cached) on entry with `encode_prompts`; the embeddings move to the model's device and
    dtype once, so forwards cost nothing more. Noisy models condition all `ensemble` noisy copies of image i on its
    prompt. Blocks nest; the innermost wins.
    """
    net = find_diffusion_model(model)
    batch = prompts if isinstance(prompts, PromptBatch) else encode_prompts(net, prompts)
    # the second conditioning tensor: SDXL's pooled embedding, PixArt's token mask, none for SD 1.x / 2.x
    second = next((n for n in ('pooled_prompt_embeds', 'prompt_mask') if getattr(net, n, None) is not None), None)
    ref = net.prompt_embeds
    given = getattr(batch, second) if second else None
    if batch.prompt_embeds.shape[1:] != ref.shape[1:] or (given is None) != (second is None):
        raise InputError(
            f'Prompt embeddings of shape {tuple(batch.prompt_embeds.shape[1:])}'
            f'{f" without {second}" if second and given is None else ""} do not fit this model '
            f'({tuple(ref.shape[1:])}{f" with {second}" if second else ""}): encode them with '
            'encode_prompts(model, prompts).')
    ctx = batch.prompt_embeds.to(device=ref.device, dtype=ref.dtype)
    if second:
        given = given.to(device=ref.device, dtype=getattr(net, second).dtype)
    saved = net._prompt_override
    net._prompt_override = (ctx, given)
    try:
        yield batch
    finally:
        net._prompt_override = saved
