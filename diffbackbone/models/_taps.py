"""Feature taps of a diffusers UNet: every activation the backbone can return, with channels, stride and names.

Names follow Meng et al., "Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features"
(NeurIPS 2024); the CleanDIFT names (`mid`, `us1`, ...) are the base taps. The naming scheme, presets and stage order:
docs/models.md#unet-taps-sd15-and-sd21-share-the-layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch.nn as nn

from ..errors import DiffbackboneError

__all__ = [
    'Tap', 'build_taps', 'resolve_taps', 'TapError', 'PRESETS', 'SDXL_PRESETS', 'IF_PRESETS', 'presets_for',
    'unet_stages',
    'point_name', 'list_taps',
]

Stage = tuple  # ('conv_in', 0, 0) | ('down'|'up', block, layer|'sampler') | ('mid', 0, layer) | ('out', 0, 0)
TapSelector = Union[int, str]

# Named selections usable as `out_indices`; each maps to tap names. SD 1.x / 2.x layout (4 UNet levels).
PRESETS: dict[str, tuple[str, ...]] = {
    # One map per stride 8/16/32/64, the decoder's output at each level (DIFT up_ft_index 2, 1, 0 and the mid block).
    'pyramid': ('us9', 'us6', 'us3', 'mid'),
    # Every tap of CleanDIFT's training (their feature_dims).
    'cleandift': ('us10', 'us9', 'us8', 'us7', 'us6', 'us5', 'us4', 'us3', 'us2', 'us1', 'mid'),
    # Meng et al.'s recommended SD1.5 selection (their config_15_practical), strides 8/16/32 (and 32).
    'gdf_practical': ('up-level3-repeat0-vit-block0-self-k', 'up-level2-repeat1-vit-block0-cross-q',
                      'up-level1-repeat2-res-out', 'up-level1-repeat1-vit-block0-cross-q'),
    # The block outputs they compare against (their config_15_legacy).
    'gdf_legacy': ('up-level3-repeat2-vit-out', 'up-level2-upsampler-out', 'up-level1-upsampler-out',
                   'up-level0-upsampler-out'),
}
# SDXL layout (3 UNet levels: strides 8/16/32; the mid block is at 32).
SDXL_PRESETS: dict[str, tuple[str, ...]] = {
    # The decoder's output at each level: up_blocks[1] (stride 8), up_blocks[0] (16) after their upsamplers, mid (32).
    'pyramid': ('us6', 'us3', 'mid'),
    'cleandift': ('us9', 'us8', 'us7', 'us6', 'us5', 'us4', 'us3', 'us2', 'us1', 'mid'),
    # Meng et al.'s recommended SDXL selection (config_xl_practical): strides 16 and 32.
    'gdf_practical': ('up-level1-repeat0-vit-block0-cross-q', 'up-level1-repeat0-vit-block0-out',
                      'up-level0-repeat0-vit-block7-out', 'up-level0-repeat0-vit-block5-out'),
    # The block outputs they compare against (config_xl_legacy).
    'gdf_legacy': ('up-level2-repeat2-res-out', 'up-level1-upsampler-out', 'up-level0-upsampler-out'),
}


# DeepFloyd IF stage I (pixel space, 4 levels: strides 1/2/4/8 at 3 layers per level; the mid block at 8).
IF_PRESETS: dict[str, tuple[str, ...]] = {
    # The decoder's output at each level (after its upsampler) and the mid block, as the SD 'pyramid'.
    'pyramid': ('up-level2-upsampler-out', 'up-level1-upsampler-out', 'up-level0-upsampler-out', 'mid'),
    # The block outputs Meng et al.'s legacy configs compare against, in IF's layout.
    'gdf_legacy': ('up-level3-repeat3-res-out', 'up-level2-upsampler-out', 'up-level1-upsampler-out',
                   'up-level0-upsampler-out'),
}


def presets_for(unet: nn.Module) -> dict[str, tuple[str, ...]]:
    """Presets of a UNet's layout: SDXL's for `addition_embed_type='text_time'` UNets, IF's for `'text'` (T5 pooled
    into the time embedding), else SD 1.x / 2.x's."""
    kind = getattr(unet.config, 'addition_embed_type', None)
    return SDXL_PRESETS if kind == 'text_time' else IF_PRESETS if kind == 'text' else PRESETS


class TapError(DiffbackboneError, ValueError):
    """An unknown or unavailable tap was asked for."""


@dataclass(frozen=True)
class Tap:
    """One selectable activation.

    Attributes:
        name: canonical name (CleanDIFT's for decoder block outputs, else the point name).
        location: point name in Meng et al.'s scheme (what `DiffusionUNet._iter_unet` yields).
        num_chs: channels of the map.
        reduction: stride of the map relative to the input image.
        module: dotted path of the module producing it (for q/k/v: the projection; for maps: the attention).
        order: stage of the forward pass computing it; a pass stops after the deepest selected stage.
        aliases: other accepted names.
        hook: how it is recorded inside a layer ('' when the forward pass yields it itself): 'conv' (an NCHW
            module output), 'tokens' (a (B, HW, C) module output; 'tokens@i': item i of a tuple output), 'input' (a
            module's (B, HW, C) input), 'q', 'k', 'v', or a map: 'self-map', 'cross-map', and FLUX's 'joint-self-map',
            'joint-cross-map' (the parts of one softmax over prompt and image keys).
        base: one of the model's default taps (CleanDIFT's decoder taps), listed in `feature_info` from the start.
        seq: execution order among all taps.
    """
    name: str
    location: str
    num_chs: int
    reduction: int
    module: str
    order: int
    aliases: tuple[str, ...] = field(default=())
    hook: str = ''
    base: bool = False
    seq: int = 0

    def info(self) -> dict:
        """Entry for timm's `feature_info`."""
        return dict(num_chs=self.num_chs, reduction=self.reduction, module=self.module, name=self.name)


def sort_key(tap: Tap) -> tuple[int, int]:
    """Fine to coarse (timm needs non-decreasing strides); among equal strides the later-computed first."""
    return tap.reduction, -tap.seq


def unet_stages(unet: nn.Module) -> Iterator[Stage]:
    """Stages of a diffusers UNet2DConditionModel forward in execution order (present modules only)."""
    yield 'conv_in', 0, 0
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            yield 'down', i, j
        if getattr(block, 'downsamplers', None):
            yield 'down', i, 'sampler'
    if unet.mid_block is None:
        return
    for j in range(len(unet.mid_block.resnets)):
        yield 'mid', 0, j  # layer 0: resnet 0; layer j: attention j-1, then resnet j
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            yield 'up', i, j
        if getattr(block, 'upsamplers', None):
            yield 'up', i, 'sampler'
    if getattr(unet, 'conv_out', None) is not None:
        yield 'out', 0, 0  # the output head: the last stage


def point_name(path: str, i: int, j: Union[int, str]) -> str:
    """Prefix of the point names of a stage: `up-level1-repeat0`, `mid-repeat1`, `down-level0-downsampler`."""
    if path == 'mid':
        return f'mid-repeat{j}'
    if path == 'out':
        return 'unet-out'
    if j == 'sampler':
        return f'{path}-level{i}-{path}sampler'
    return f'{path}-level{i}-repeat{j}'


def _mid_vit_name(j: int) -> str:
    return 'mid-vit' if j == 1 else f'mid-vit{j - 1}'


def _ffn_inner_chs(ff: nn.Module) -> int:
    return next(m.in_features for m in list(ff.net)[1:] if isinstance(m, nn.Linear))


class _TableBuilder:
    def __init__(self, prefix: str, tokens: int):
        self.prefix, self.tokens = prefix, tokens
        self.taps: list[Tap] = []
        self.stage = 0

    def add(self, location: str, chs: int, reduction: int, module: str, hook: str = '', name: Optional[str] = None,
            aliases: tuple[str, ...] = (), base: bool = False) -> None:
        module = '.'.join(m for m in (self.prefix, module) if m)
        if name is not None and name != location:
            aliases = (location, *aliases)
        self.taps.append(Tap(name or location, location, chs, reduction, module, self.stage, aliases, hook, base,
                             len(self.taps)))

    def resnet(self, point: str, resnet: nn.Module, module: str, reduction: int) -> None:
        self.add(f'{point}-res-increment', resnet.out_channels, reduction, f'{module}.conv2', 'conv')

    def transformer(self, point: str, attn: nn.Module, module: str, reduction: int, stage_per_block: bool = False,
                    ) -> None:
        """Taps inside a Transformer2DModel, in execution order (its output is added by the caller).

        With `stage_per_block` every transformer block is a stage of its own (a DiT: the forward can stop after it).
        A plain `Attention` (DeepFloyd IF's SimpleCrossAttn blocks: one attention over the image's own keys and the
        prompt's, no transformer block) gives `{point}-block0-cross-q/k/v`: its query, key and value projections of
        the image positions (the prompt's keys and values come from `add_k_proj` / `add_v_proj` and have no map).
        """
        if not hasattr(attn, 'transformer_blocks'):
            for p in ('q', 'k', 'v'):
                self.add(f'{point}-block0-cross-{p}', getattr(attn, f'to_{p}').out_features, reduction,
                         f'{module}.to_{p}', p)
            return
        first = self.stage
        for k, tb in enumerate(attn.transformer_blocks):
            if stage_per_block:
                self.stage = first + k
            b, bm = f'{point}-block{k}', f'{module}.transformer_blocks.{k}'
            for name in ('attn1', 'attn2'):
                a = getattr(tb, name, None)
                if a is None:
                    continue
                am = f'{bm}.{name}'
                if a.is_cross_attention:
                    self.add(f'{b}-cross-q', a.to_q.out_features, reduction, f'{am}.to_q', 'q')
                    self.add(f'{b}-cross-map', self.tokens, reduction, am, 'cross-map')
                else:
                    for p in ('q', 'k', 'v'):
                        self.add(f'{b}-self-{p}', getattr(a, f'to_{p}').out_features, reduction, f'{am}.to_{p}', p)
                    self.add(f'{b}-self-map', a.heads, reduction, am, 'self-map')
            if getattr(tb, 'ff', None) is not None:
                self.add(f'{b}-ffn-inner', _ffn_inner_chs(tb.ff), reduction, f'{bm}.ff.net.0', 'tokens')
            self.add(f'{b}-out', tb.norm1.normalized_shape[0], reduction, bm, 'tokens')


def build_taps(unet: nn.Module, latent_reduction: int, prefix: str = 'unet', tokens: int = 77) -> list[Tap]:
    """Every tap of a diffusers `UNet2DConditionModel`, fine to coarse (base taps: `[t for t in taps if t.base]`).

    Args:
        unet: the UNet (its blocks are inspected, not run).
        latent_reduction: stride of the latent relative to the image (8 for the SD VAE).
        prefix: attribute path of the UNet inside the backbone.
        tokens: length of the prompt embedding (channels of cross-attention maps).
    """
    tb = _TableBuilder(prefix, tokens)
    reduction = latent_reduction
    n_up = {i: len(b.resnets) for i, b in enumerate(unet.up_blocks)}
    count = 0  # CleanDIFT's us counter
    for path, i, j in unet_stages(unet):
        point = point_name(path, i, j)
        if path == 'conv_in':
            tb.add('unet-in', unet.config.in_channels, reduction, 'conv_in')
            tb.add('unet-after-conv-in', unet.conv_in.out_channels, reduction, 'conv_in')
        elif path == 'out':
            tb.add('unet-out', unet.conv_out.out_channels, reduction, 'conv_out')
        elif path == 'mid':
            mid = unet.mid_block
            if j > 0:
                vit = _mid_vit_name(j)
                tb.transformer(vit, mid.attentions[j - 1], f'mid_block.attentions.{j - 1}', reduction)
                tb.add(f'{vit}-out', mid.resnets[j - 1].out_channels, reduction, f'mid_block.attentions.{j - 1}')
            tb.resnet(point, mid.resnets[j], f'mid_block.resnets.{j}', reduction)
            if j == len(mid.resnets) - 1:
                tb.add(f'{point}-res-out', mid.resnets[j].out_channels, reduction, 'mid_block', name='mid',
                       aliases=('mid-out',), base=True)
            else:
                tb.add(f'{point}-res-out', mid.resnets[j].out_channels, reduction, f'mid_block.resnets.{j}')
        else:
            block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
            bm = f'{path}_blocks.{i}'
            if j == 'sampler':
                reduction = reduction * 2 if path == 'down' else reduction // 2
                us = None
                if path == 'up':
                    count += 1
                    us = f'us{count}'
                chs = block.resnets[-1].out_channels
                sampler = getattr(block, f'{path}samplers')[0]
                if hasattr(sampler, 'conv2'):  # IF's ResnetDownsample / ResnetUpsample: a resnet that resamples
                    tb.add(f'{point}-increment', chs, reduction, f'{bm}.{path}samplers.0.conv2', 'conv')
                tb.add(f'{point}-out', chs, reduction, f'{bm}.{path}samplers.0', name=us, base=path == 'up')
                tb.stage += 1
                continue
            chs = block.resnets[j].out_channels
            tb.resnet(point, block.resnets[j], f'{bm}.resnets.{j}', reduction)
            has_attn = getattr(block, 'attentions', None) is not None
            us = None
            if path == 'up':
                last_with_up = j == n_up[i] - 1 and bool(getattr(block, 'upsamplers', None))
                if not last_with_up:
                    count += 1
                    us = f'us{count}'
            if has_attn:
                tb.add(f'{point}-res-out', chs, reduction, f'{bm}.resnets.{j}')
                tb.transformer(f'{point}-vit', block.attentions[j], f'{bm}.attentions.{j}', reduction)
                tb.add(f'{point}-vit-out', chs, reduction, f'{bm}.attentions.{j}', name=us, base=path == 'up')
            else:
                tb.add(f'{point}-res-out', chs, reduction, f'{bm}.resnets.{j}', name=us, base=path == 'up')
        tb.stage += 1
    return sorted(tb.taps, key=sort_key)


def resolve_taps(
        taps: Sequence[Tap],
        indices: Union[None, TapSelector, Sequence[TapSelector]],
        presets: Optional[dict[str, Sequence[str]]] = None,
        all_taps: Optional[Sequence[Tap]] = None,
) -> list[Tap]:
    """Turn `out_indices` / `indices` (ints, tap names, aliases or a preset name) into taps, with timm's meaning.

    None means every tap of `taps` (the model's `feature_info`); an int alone means the last n of them; ints in a
    sequence index `taps` (negative from the end). Names and aliases are looked up in `all_taps` (default `taps`); a
    preset name expands to its taps.
    """
    presets = PRESETS if presets is None else presets
    by_name: dict[str, Tap] = {}
    for tap in (all_taps if all_taps is not None else taps):
        by_name[tap.name] = tap
    for tap in (all_taps if all_taps is not None else taps):
        for alias in tap.aliases:
            by_name.setdefault(alias, tap)
    if indices is None:
        return list(taps)
    if isinstance(indices, bool) or not isinstance(indices, (int, str, list, tuple)):
        raise TapError(f'out_indices/indices must be None, an int (the last n taps), a tap name, a preset or a '
                       f'sequence of names and ints, got {indices!r}.')
    if isinstance(indices, int):
        if not 0 < indices <= len(taps):
            raise TapError(f'out_indices={indices} asks for the last {indices} taps, but the model has {len(taps)}.')
        return list(taps[len(taps) - indices:])
    if isinstance(indices, str):
        indices = presets.get(indices, (indices,))
    if len(indices) == 0:
        raise TapError('out_indices/indices is empty: select at least one tap (a name such as "us6", an index, or a '
                       f'preset: {", ".join(presets)}).')
    out: list[Tap] = []
    for sel in indices:
        if isinstance(sel, str) and sel.strip().lstrip('-').isdigit() and sel not in by_name:
            sel = int(sel)  # an index given as text (`--taps 7`), as `diffbackbone taps MODEL` lists them
        if isinstance(sel, str) and sel in presets:
            out.extend(resolve_taps(taps, presets[sel], presets=presets, all_taps=all_taps))
        elif isinstance(sel, str):
            if sel not in by_name:
                raise TapError(
                    f'Unknown tap {sel!r}. Default taps: {", ".join(t.name for t in taps)}; presets: '
                    f'{", ".join(presets)}. List every name with `diffbackbone taps MODEL` or `model.tap_names(all=True)`.')
            out.append(by_name[sel])
        else:
            if isinstance(sel, bool) or not isinstance(sel, int):
                raise TapError(f'out_indices/indices entries must be tap names or ints, got {sel!r} in {indices!r}.')
            idx = sel
            idx = idx + len(taps) if idx < 0 else idx
            if not 0 <= idx < len(taps):
                raise TapError(f'Tap index {sel} is out of range: the model has {len(taps)} taps (0 to {len(taps) - 1}).')
            out.append(taps[idx])
    if len({t.name for t in out}) != len(out):
        raise TapError(f'A tap is asked for twice in out_indices={indices!r}.')
    return out


def list_taps(model_name: str, **kwargs) -> list[Tap]:
    """Every tap of a registered model, in execution order (built on the meta device: no weights, no download).

    For the CLI (`diffbackbone taps MODEL`): each Tap has name, aliases, num_chs, reduction and module. The models
    are registered already: importing this module first imports `diffbackbone`, which registers them.
    """
    import timm
    import torch

    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    return sorted(model.all_taps, key=lambda t: t.seq)
