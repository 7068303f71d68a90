"""Feature taps of a diffusers UNet: where each one sits, its channels, its stride and its names.

A tap is one activation the backbone can return. Each has a *location* in the forward pass (see
`DiffusionUNet._iter_unet`), a canonical name and optional aliases. The canonical names of the decoder taps
follow CleanDIFT (`mid`, `us1`, `us2`, ...), counted over the up path: per up block, the output of every layer but
the last, then the block's output (after its upsampler when it has one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch.nn as nn

__all__ = ['Tap', 'build_taps', 'resolve_taps', 'TapError', 'PRESETS']

Location = tuple  # ('mid',) | ('up', block, layer) | ('up', block, 'upsampler')
TapSelector = Union[int, str]

# Named selections usable as `out_indices`; each maps to tap names.
PRESETS: dict[str, tuple[str, ...]] = {
    # One map per stride 8/16/32/64, the decoder's output at each level (DIFT up_ft_index 2, 1, 0 and the mid block).
    'pyramid': ('us9', 'us6', 'us3', 'mid'),
    # Every tap of CleanDIFT's training (their feature_dims).
    'cleandift': ('us10', 'us9', 'us8', 'us7', 'us6', 'us5', 'us4', 'us3', 'us2', 'us1', 'mid'),
}


class TapError(ValueError):
    """An unknown or unavailable tap was asked for."""


@dataclass(frozen=True)
class Tap:
    """One selectable activation.

    Attributes:
        name: canonical name (CleanDIFT's for decoder block outputs).
        location: position in the forward pass.
        num_chs: channels of the map.
        reduction: stride of the map relative to the input image.
        module: dotted path of the module whose output this is.
        order: execution order; a larger value is computed later.
        aliases: other accepted names.
    """
    name: str
    location: Location
    num_chs: int
    reduction: int
    module: str
    order: int
    aliases: tuple[str, ...] = field(default=())

    def info(self) -> dict:
        """Entry for timm's `feature_info`."""
        return dict(num_chs=self.num_chs, reduction=self.reduction, module=self.module, name=self.name)


def build_taps(unet: nn.Module, latent_reduction: int, prefix: str = 'unet') -> list[Tap]:
    """List the taps of a diffusers `UNet2DConditionModel`, fine to coarse (timm needs non-decreasing strides).

    Args:
        unet: the UNet (its blocks are inspected, not run).
        latent_reduction: stride of the latent relative to the image (8 for the SD VAE).
        prefix: attribute path of the UNet inside the backbone.
    """
    reduction = latent_reduction
    for block in unet.down_blocks:
        if getattr(block, 'downsamplers', None):
            reduction *= 2
    taps: list[Tap] = []
    order = 0
    mid_chs = unet.mid_block.resnets[-1].out_channels
    taps.append(Tap('mid', ('mid',), mid_chs, reduction, f'{prefix}.mid_block', order, ('mid-out',)))
    count = 0
    for i, block in enumerate(unet.up_blocks):
        n_layers = len(block.resnets)
        has_up = bool(getattr(block, 'upsamplers', None))
        has_attn = hasattr(block, 'attentions') and block.attentions is not None
        for j in range(n_layers):
            order += 1
            last = j == n_layers - 1
            module = f'{prefix}.up_blocks.{i}.' + (f'attentions.{j}' if has_attn else f'resnets.{j}')
            gdf = f'up-level{i}-repeat{j}-' + ('vit-out' if has_attn else 'res-out')
            chs = block.resnets[j].out_channels
            if last and has_up:
                # The last layer's own output is not a CleanDIFT tap; the upsampled one is.
                taps.append(Tap(gdf, ('up', i, j), chs, reduction, module, order))
                order += 1
                reduction //= 2
                count += 1
                taps.append(Tap(
                    f'us{count}', ('up', i, 'upsampler'), chs, reduction, f'{prefix}.up_blocks.{i}.upsamplers.0', order,
                    (f'up-level{i}-upsampler-out',)))
            else:
                count += 1
                taps.append(Tap(f'us{count}', ('up', i, j), chs, reduction, module, order, (gdf,)))
    # Fine to coarse; among equal strides the later-computed first, so `mid` is last.
    return sorted(taps, key=lambda t: (t.reduction, -t.order))


def resolve_taps(
        taps: Sequence[Tap],
        indices: Union[None, TapSelector, Sequence[TapSelector]],
        default: Sequence[str] = PRESETS['pyramid'],
) -> list[int]:
    """Turn `out_indices` (ints, tap names, aliases or a preset name) into positions in `taps`.

    An int alone means the last n taps, as in timm; a preset name expands to its taps.
    """
    by_name: dict[str, int] = {}
    for i, tap in enumerate(taps):
        by_name[tap.name] = i
        for alias in tap.aliases:
            by_name.setdefault(alias, i)
    if indices is None:
        indices = tuple(default)
    if isinstance(indices, int):
        if not 0 < indices <= len(taps):
            raise TapError(f'out_indices={indices} asks for the last {indices} taps, but the model has {len(taps)}.')
        return list(range(len(taps) - indices, len(taps)))
    if isinstance(indices, str):
        indices = PRESETS.get(indices, (indices,))
    out: list[int] = []
    for sel in indices:
        if isinstance(sel, str) and sel in PRESETS:
            out.extend(resolve_taps(taps, PRESETS[sel]))
            continue
        if isinstance(sel, str):
            if sel not in by_name:
                raise TapError(
                    f'Unknown tap {sel!r}. Known taps: {", ".join(t.name for t in taps)}; '
                    f'presets: {", ".join(PRESETS)}. List every name with `diffbackbone taps MODEL`.')
            out.append(by_name[sel])
        else:
            idx = int(sel)
            idx = idx + len(taps) if idx < 0 else idx
            if not 0 <= idx < len(taps):
                raise TapError(f'Tap index {sel} is out of range: the model has {len(taps)} taps (0 to {len(taps) - 1}).')
            out.append(idx)
    if len(set(out)) != len(out):
        raise TapError(f'A tap is asked for twice in out_indices={indices!r}.')
    return out
