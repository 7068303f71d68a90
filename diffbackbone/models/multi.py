""" Multi-model backbones: several diffusion models run on one image, their taps resized to one grid and concatenated.

Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features - https://arxiv.org/abs/2410.03558
(Meng et al., NeurIPS 2024), code https://github.com/Darkbblue/generic-diffusion-feature (read for the recipe, written
here from scratch). `ours_xl_t` is their Ours-XL-t row: docs/models.md#the-models; departures:
docs/fidelity.md#multi-model-backbones-ours-xl-t.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._builder import build_composite
from ._head import ClassifierHeadMixin
from ._options import HeadConfig, Options
from ._taps import TapError

__all__ = ['MultiBackbone', 'MemberConfig', 'MULTI_TAP', 'MEMBERS_PRESET', 'GDF_PROMPT', 'is_multi_model']

MULTI_TAP = 'multi'
MEMBERS_PRESET = 'members'  # selection: every member tap, unconcatenated (what a feature store keeps)
UP_CROSS_STRIDES = (16, 8)  # their attention store keeps latent sides 32..64 at 512 px; listed in their order (up path)
# Their fixed prompt of `AggregationNetwork` (the 18 SPair-71k categories).
GDF_PROMPT = ('a highly realistic photo that may contain an aeroplane, a bicycle, a bird, a boat, a bottle, a bus, a '
              'car, a cat, a chair, a cow, a dog, a horse, a motorbike, a person, a plant within a pot, a sheep, a '
              'train, or a tv monitor.')


def is_multi_model(name: str) -> bool:
    """Whether a timm model name (optionally `.tag`) is one of the multi-model backbones registered here."""
    from timm.models import is_model, model_entrypoint

    arch = name.partition('.')[0]
    return is_model(arch) and model_entrypoint(arch).__module__ == __name__


@dataclasses.dataclass(frozen=True)
class MemberConfig(Options):
    """One model of a multi-model backbone.

    Args:
        model: a model of this package (`sdxl`, `sd15`, `pgv2`, a fused model, ...).
        taps: its taps (names or a preset such as `gdf_practical`).
        size: square size its input is resized to (None: the multi model's input as it comes).
        up_cross: add the up path's cross-attention maps averaged per map size (their `attention: ["up_cross"]`).
        name: prefix of its tap names (default: the model name; `#2`, `#3` for repeats).
        kwargs: its own model arguments (timestep, prompt, ...), over the multi model's shared ones.
    """
    model: str
    taps: Union[str, Sequence[str]]
    size: Optional[int] = None
    up_cross: bool = False
    name: Optional[str] = None
    kwargs: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InputError(f'A member needs model=<name>, got {self.model!r}.')
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8):
            raise InputError(f'A member size must be a whole number of pixels >= 8, got {self.size!r}.')


def _member(spec: Union[MemberConfig, Mapping[str, Any]]) -> MemberConfig:
    if isinstance(spec, MemberConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise InputError(f'members must be MemberConfig objects or dicts (model=, taps=, ...), got {spec!r}.')
    unknown = sorted(set(spec) - set(MemberConfig.field_names()))
    if unknown:
        raise InputError(f'Unknown member field(s) {unknown}; fields: {list(MemberConfig.field_names())}.')
    return MemberConfig(**spec)


def _scaled(size: Sequence[int], x: torch.Tensor, img_size: int) -> tuple[int, int]:
    """(h, w) of a size given for an `img_size` input, scaled to the input `x` side by side (unchanged at img_size)."""
    h, w = x.shape[-2:]
    return max(1, round(size[0] * h / img_size)), max(1, round(size[1] * w / img_size))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Their resize of every tap: `F.interpolate(f, size, mode='bilinear')` (align_corners False)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode='bilinear')


class MultiBackbone(ClassifierHeadMixin, nn.Module):
    """Several backbones of this package run on one image; their taps bilinearly resized to `grid` and concatenated.

    Each member runs once per batch (on the input resized to its `size`), and only when a selected tap needs it.
    `size` and `grid` are for an `img_size` input and scale with the input's sides. Taps (`feature_info`, fine to
    coarse; all of them by default with `features_only`): `multi` and every member tap. The classifier head (timm's,
    with `num_classes`) reads the `multi` map.
    """

    def __init__(
            self,
            members: Sequence[Union[MemberConfig, Mapping[str, Any]]],
            grid: Sequence[int] = (128, 128),
            img_size: int = 512,
            member_kwargs: Optional[Mapping[str, Any]] = None,
            load_weights: bool = False,
            head_cfg: HeadConfig = HeadConfig(),
            in_chans: int = 3,
    ):
        """
        Args:
            members: the models (`MemberConfig` or dicts of its fields), in the order their maps are concatenated.
            grid: (h, w) of the concatenated map for an `img_size` input (theirs: 128 x 128 at 1024 px).
            img_size: input size that members' `size`, `grid` and the `feature_info` strides refer to (the default
                cfg's input size); other inputs scale them.
            member_kwargs: model arguments given to every member (prompt, timestep, ...) under its own `kwargs`.
            load_weights: download and load every member's pretrained weights (set by `pretrained=True`).
            head_cfg: the timm classifier head on the `multi` map (0 classes: none).
        """
        super().__init__()
        import timm

        if in_chans != 3:
            raise InputError(f'Multi-model backbones take RGB images (in_chans=3), got in_chans={in_chans}.')
        self.members = [_member(m) for m in members]
        if not self.members:
            raise InputError('A multi-model backbone needs at least one member.')
        try:
            self.grid = (int(grid[0]), int(grid[1])) if not isinstance(grid, int) else (int(grid), int(grid))
        except (TypeError, ValueError, IndexError):
            raise InputError(f'grid must be (h, w), got {grid!r}.') from None
        if min(self.grid) < 1:
            raise InputError(f'grid must be positive, got {grid!r}.')
        self.in_chans, self.img_size = in_chans, int(img_size)
        self.models = nn.ModuleList()
        self.prefixes: list[str] = []
        self.member_taps: list[list[str]] = []  # per member: its own tap names, in order
        self.up_cross: list[dict[int, list[str]]] = []  # per member: {stride: cross-map taps averaged}
        infos: list[dict] = []
        from .. import hub

        kwargs_of = [{**(member_kwargs or {}), **(m.kwargs or {})} for m in self.members]
        # one memory check before any member is read: each member's check counts the members read after it
        held = [_member_nbytes(m, kw) for m, kw in zip(self.members, kwargs_of)] if load_weights else []
        for i, (m, kwargs) in enumerate(zip(self.members, kwargs_of)):
            # only the blocks up to the member's deepest tap are built from the weights (`_builder`: `prune_to`)
            with hub.weights_to_come('the other members', sum(held[i + 1:])):
                model = timm.create_model(m.model, pretrained=load_weights,
                                          prune_to=functools.partial(_member_needs, m), **kwargs)
            if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'tap_names'):
                raise InputError(f'member {m.model!r} is not a backbone of diffbackbone.')
            prefix = m.name or m.model
            n = 2
            while prefix in self.prefixes:
                prefix, n = f'{m.name or m.model}#{n}', n + 1
            scale = (m.size or self.img_size) / self.img_size
            taps = self._member_infos(model, m.taps)
            cross: dict[int, list[str]] = {}
            if m.up_cross:
                all_taps = getattr(model, 'all_taps', [])
                for stride in UP_CROSS_STRIDES:
                    group = [t.name for t in all_taps if t.name.startswith('up-') and t.name.endswith('-cross-map')
                             and t.reduction == stride]
                    if group:
                        cross[stride] = group
                        chans = next(t.num_chs for t in all_taps if t.name == group[0])
                        taps.append(dict(num_chs=chans, reduction=stride, name=f'up-cross-s{stride}'))
                if not cross:
                    raise TapError(f'member {m.model!r} has no up-path cross-attention maps at strides 8 or 16.')
            self.models.append(model)
            self.prefixes.append(prefix)
            self.member_taps.append([t['name'] for t in taps if not t['name'].startswith('up-cross-s')])
            self.up_cross.append(cross)
            for t in taps:
                infos.append(dict(num_chs=t['num_chs'], reduction=max(1, round(t['reduction'] / scale)),
                                  module=f'models.{len(self.models) - 1}', name=f'{prefix}:{t["name"]}'))
        self.concat_names = [i['name'] for i in infos]
        chans = sum(i['num_chs'] for i in infos)
        stride = max(1, round(self.img_size / max(self.grid)))
        self.feature_info = sorted([dict(num_chs=chans, reduction=stride, module='', name=MULTI_TAP), *infos],
                                   key=lambda i: i['reduction'])
        self._init_head(chans, head_cfg)
        if head_cfg.num_classes:
            # A classifier reads the `multi` map only: each member drops the stages after the deepest of its taps, and
            # what still runs in that stage after the tap is kept as buffers, so that every parameter gets a gradient.
            self.prune_intermediate_layers([MULTI_TAP], prune_head=False)
            self._freeze_unreached()

    def _freeze_unreached(self, probe: int = 128) -> None:
        """Member parameters the `multi` map does not depend on become buffers (same state-dict keys): the rest of a
        stage after a member's deepest tap (a transformer's values, feed-forward, output projection), which pruning by
        stage keeps. Found on the autograd graph of one small pass (`probe` px, no backward)."""
        params = dict(self.models.named_parameters())
        if not params or any(p.is_meta for p in params.values()):
            return
        first = next(iter(params.values()))
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            x = torch.zeros(1, 3, min(probe, self.img_size), min(probe, self.img_size), device=first.device)
            out = self.forward_features(x.to(first.dtype))
        reached, seen, todo = set(), set(), [out.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, 'variable'):
                reached.add(id(fn.variable))
            todo += [f for f, _ in fn.next_functions]
        for name, p in params.items():
            if id(p) not in reached and p.requires_grad:
                module_name, _, attr = name.rpartition('.')
                module = self.models.get_submodule(module_name)
                delattr(module, attr)
                module.register_buffer(attr, p.detach())

    @staticmethod
    def _member_infos(model: nn.Module, taps: Union[str, Sequence[str]]) -> list[dict]:
        """`feature_info` entries of a member's selection (names or a preset), in the order of the selection."""
        sel = [taps] if isinstance(taps, str) else list(taps)
        if hasattr(model, '_resolve'):  # a diffusion backbone: names, aliases and presets
            return [t.info() for t in model._resolve(sel)]
        names = model.tap_names()
        infos = {i['name']: i for i in model.feature_info}
        unknown = [t for t in sel if t not in infos]
        if unknown:
            raise TapError(f'Unknown taps {unknown} of {type(model).__name__}: choose among {names}.')
        return [dict(infos[t]) for t in sel]

    # ---- taps ----------------------------------------------------------------------------------------------------
    def tap_names(self, all: bool = False) -> list[str]:
        return [i['name'] for i in self.feature_info]

    def _names(self, indices) -> list[str]:
        """Tap names of a selection: None = every tap, an int n = the last n, names or `feature_info` indices, or
        `members` (every member tap)."""
        names = self.tap_names()
        if indices is None:
            return names
        if isinstance(indices, int) and not isinstance(indices, bool):
            return names[len(names) - indices:]
        out = []
        for i in ([indices] if isinstance(indices, str) else indices):
            if i == MEMBERS_PRESET:
                out += [n for n in names if n in self.concat_names]
            elif isinstance(i, str) and i in names:
                out.append(i)
            elif isinstance(i, int) and not isinstance(i, bool) and -len(names) <= i < len(names):
                out.append(names[i])
            else:
                raise TapError(f'Unknown tap {i!r} of a multi-model backbone: choose among {names} (or indices).')
        return out

    def _needed(self, names: Sequence[str]) -> list[list[str]]:
        """Per member, its own taps that the selected names need (cross-attention groups expanded)."""
        wanted = set(self.concat_names) if MULTI_TAP in names else set(names)
        need: list[list[str]] = []
        for prefix, own, cross in zip(self.prefixes, self.member_taps, self.up_cross):
            taps = [t for t in own if f'{prefix}:{t}' in wanted]
            for stride, group in cross.items():
                if f'{prefix}:up-cross-s{stride}' in wanted:
                    taps += [t for t in group if t not in taps]
            need.append(taps)
        return need

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Each member drops what comes after the deepest of its taps needed (a member not needed is kept whole)."""
        names = self._names(indices)
        for model, taps in zip(self.models, self._needed(names)):
            if taps:
                model.prune_intermediate_layers(taps)
        if prune_head:
            self.reset_classifier(0, '')
        return [self.tap_names().index(n) for n in names]

    # ---- forward -------------------------------------------------------------------------------------------------
    def member_maps(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Maps of member taps by their `<member>:<tap>` names: one batched pass of each member that is needed."""
        out: dict[str, torch.Tensor] = {}
        for m, model, prefix, taps, cross in zip(self.members, self.models, self.prefixes, self._needed(names),
                                                  self.up_cross):
            if not taps:
                continue
            xi, size = x, None if m.size is None else _scaled((m.size, m.size), x, self.img_size)
            if size is not None and tuple(x.shape[-2:]) != size:  # bicubic: nearest to their Pillow resize of the file
                xi = F.interpolate(x.float(), size=size, mode='bicubic', align_corners=False,
                                   antialias=True).to(x.dtype)
            maps = dict(zip(taps, model.forward_intermediates(xi, indices=taps, intermediates_only=True)))
            for t in taps:
                out[f'{prefix}:{t}'] = maps[t]
            for stride, group in cross.items():
                if all(t in maps for t in group):  # that size's average is selected
                    out[f'{prefix}:up-cross-s{stride}'] = torch.stack([maps[t] for t in group]).mean(0)
        return out

    def concat(self, maps: Mapping[str, torch.Tensor], grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The `multi` map: every member tap resized bilinearly to `grid` (default: the model's), concatenated in
        member order."""
        first = maps[self.concat_names[0]]
        grid = self.grid if grid is None else grid
        return torch.cat([_resize(maps[n], grid).to(first.dtype) for n in self.concat_names], 1)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = True,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """Maps of the selected taps (names or `feature_info` indices) in the order asked for; with
        `intermediates_only=False` also the `multi` map (what `forward_features` returns)."""
        if output_fmt != 'NCHW':
            raise InputError(f"Only output_fmt='NCHW' is supported, got {output_fmt!r}.")
        names = self._names(indices)
        raw = self.member_maps(x, names if intermediates_only else [*names, MULTI_TAP])
        multi = self.concat(raw, _scaled(self.grid, x, self.img_size)) if MULTI_TAP in names or not \
            intermediates_only else None
        maps = [multi if n == MULTI_TAP else raw[n] for n in names]
        return maps if intermediates_only else (multi, maps)

    # ---- timm model API ------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for model in self.models:
            model.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, [MULTI_TAP], intermediates_only=True)[0]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MultiBackbone) -> dict[str, torch.Tensor]:
    """Keys only: a multi model's own state dict is already native (each member loads its weights itself)."""
    return state_dict


def _create_multi(variant: str, pretrained: bool = False, **kwargs) -> MultiBackbone:
    """Every member loads its own weights through diffbackbone's loader; `members` and the shared member arguments
    (prompt, timestep, ...) are the model's, anything the multi model does not know goes to every member."""
    return build_composite(MultiBackbone, variant, pretrained, 'member_kwargs', checkpoint_filter_fn,
                           overlay_to_parts=False, **kwargs)


def _member_needs(member: MemberConfig, model: nn.Module) -> list[str]:
    """The taps a member is ever asked for: its own selection and, with `up_cross`, its up path's cross-attention maps
    at the averaged strides."""
    taps = [i['name'] for i in MultiBackbone._member_infos(model, member.taps)]
    if member.up_cross:
        taps += [t.name for t in getattr(model, 'all_taps', []) if t.name.startswith('up-')
                 and t.name.endswith('-cross-map') and t.reduction in UP_CROSS_STRIDES]
    return taps


def _member_nbytes(member: MemberConfig, kwargs: dict[str, Any]) -> int:
    """Bytes a member's weights take once loaded (pruned to its taps, in its dtypes): from a build on the meta device,
    nothing read."""
    import timm

    with torch.device('meta'):
        model = timm.create_model(member.model, prune_to=functools.partial(_member_needs, member), **kwargs)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 0,
        'input_size': (3, 1024, 1024),  # the largest member's size; SD1.5 sees it resized to 512
        'min_input_size': (3, 128, 128),  # SD1.5 sees half the input: at least 64 px
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': (0.5, 0.5, 0.5),  # [-1, 1] as the diffusion models expect
        'std': (0.5, 0.5, 0.5),
        'pool_size': (128, 128),  # the `multi` map: the grid
        'first_conv': 'models.0.vae.encoder.conv_in',
        'classifier': 'head.fc',
        'paper_name': 'Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        'paper_ids': 'arXiv:2410.03558',
        'origin_url': 'https://github.com/Darkbblue/generic-diffusion-feature',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ours_xl_t.gdf': _cfg(),
    'multi_diffusion.gdf': _cfg(min_input_size=(3, 64, 64)),
    'test_multi.tiny': _cfg(input_size=(3, 128, 128), pool_size=(16, 16)),
})

# Their Ours-XL-t: config_sdxl (config_xl_practical, 1024 px), config_full_15 (config_15_amalgamation + up-path
# cross-attention maps, 512 px), config_full_pgv2 (config_pg_amalgamation, 1024 px); t = 50 and their prompt for all.
_SD15_AMALGAMATION = ('up-level1-repeat1-vit-block0-cross-q', 'up-level2-repeat1-vit-block0-cross-q',
                      'up-level2-upsampler-out', 'up-level3-repeat0-vit-block0-self-k')
_OURS_XL_T = (
    dict(model='sdxl', taps='gdf_practical', size=1024),
    dict(model='sd15', taps=_SD15_AMALGAMATION, size=512, up_cross=True),
    dict(model='pgv2', taps=('up-level0-repeat0-vit-block3-out',), size=1024),
)


@register_model
def ours_xl_t(pretrained: bool = False, **kwargs) -> MultiBackbone:
    """Meng et al.'s Ours-XL-t: SDXL + SD1.5 + Playground v2 taps at t = 50, concatenated at 128 x 128 (8154 ch)."""
    model_args = dict(members=_OURS_XL_T, grid=(128, 128), img_size=1024, timestep=50, prompt=GDF_PROMPT)
    return _create_multi('ours_xl_t', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def multi_diffusion(pretrained: bool = False, **kwargs) -> MultiBackbone:
    """General form: `members=[dict(model=..., taps=..., size=...), ...]`, `grid=(h, w)`, shared member arguments."""
    if 'members' not in kwargs:
        raise InputError("multi_diffusion needs members=[dict(model='sd15', taps='gdf_practical', size=512), ...].")
    model_args = dict(grid=(128, 128), img_size=1024)
    return _create_multi('multi_diffusion', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_multi(pretrained: bool = False, **kwargs) -> MultiBackbone:
    """Tiny Ours-XL-t for tests: test_sdxl + test_dift (with cross-attention maps) at a 16 x 16 grid."""
    members = (dict(model='test_sdxl', taps='gdf_practical', size=128),
               dict(model='test_dift', taps=_SD15_AMALGAMATION, size=64, up_cross=True))
    model_args = dict(members=members, grid=(16, 16), img_size=128, timestep=50)
    return _create_multi('test_multi', pretrained=pretrained, **dict(model_args, **kwargs))
