""" Fused diffusion + DINOv2 backbones: "A Tale of Two Features" as timm models.

A Tale of Two Features - https://arxiv.org/abs/2305.15347 (Zhang et al., NeurIPS 2023), code
https://github.com/Junyi42/sd-dino (no licence: read for the recipe, written here from scratch).
Recipe, sliding window and reduction: docs/models.md#fused-with-dinov2-a-tale-of-two-features; departures:
docs/fidelity.md#fused-with-dinov2.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter

from ..errors import InputError
from ._builder import assigning_loads, build_composite, empty_weights
from ._head import ClassifierHeadMixin
from ._options import HeadConfig, Options, finite_number, whole_number
from ._taps import Tap, TapError

__all__ = ['FusedBackbone', 'WindowConfig', 'window_starts', 'pca_basis', 'fuse_maps', 'co_pca_fuse', 'fused_module',
           'pair_co_pca', 'is_fused_model', 'FUSED_TAP', 'DINO_TAP', 'RAW_PRESET', 'PLAIN_TIMM_MODELS',
           'checkpoint_filter_fn']

FUSED_TAP, DINO_TAP = 'fused', 'dino'
PLAIN_TIMM_MODELS = ('test_vit_dinov2',)  # registered here, but a plain timm ViT (the tiny fused model's DINOv2)
RAW_PRESET = 'raw'  # selection: the 'dino' map and every SD tap, unreduced (what the per-pair co-PCA needs)
# Their SD levels (ODISE output blocks 8, 5, 2), fine to coarse, and PCA dims per level.
_TALE_TAPS = ('us8', 'us5', 'us2')
_TALE_DIMS = (256, 256, 256)


def pca_basis(samples: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), basis (C, dims)) of the principal components of (N, C) samples, by an exact SVD in float64.

    Their code uses `torch.pca_lowrank` (randomised, 2 power iterations); an exact decomposition is what it
    approximates. Component signs are arbitrary, which does not change any similarity.
    """
    if dims > min(samples.shape):
        raise InputError(f'PCA to {dims} dims needs at least {dims} samples and channels, got {tuple(samples.shape)}.')
    x = samples.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.to(samples.dtype), vh[:dims].T.to(samples.dtype).contiguous()


def _project(feat: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, d, h, w) through a PCA basis."""
    x = feat.permute(0, 2, 3, 1) - mean.to(feat.dtype)
    return (x @ basis.to(feat.dtype)).permute(0, 3, 1, 2)


def fuse_maps(sd_maps: Sequence[torch.Tensor], dino_map: torch.Tensor, sd_weight: float = 1.0,
              dino_weight: float = 1.0) -> torch.Tensor:
    """Their fusion of (reduced) maps: SD levels listed fine to coarse are stacked coarse to fine (each step upsampled
    bilinearly to the next level and concatenated after it), then each source is L2-normalised over its channels,
    weighted, and the two are concatenated; the DINO map is resized to the SD grid if it differs."""
    stack = sd_maps[-1]
    for level in reversed(sd_maps[:-1]):
        stack = torch.cat([level, F.interpolate(stack, size=level.shape[-2:], mode='bilinear', align_corners=False)], 1)
    if dino_map.shape[-2:] != stack.shape[-2:]:
        dino_map = F.interpolate(dino_map, size=stack.shape[-2:], mode='bilinear', align_corners=False)
    return torch.cat([F.normalize(stack, dim=1) * sd_weight, F.normalize(dino_map, dim=1) * dino_weight], 1)


def _pair_pca(a: torch.Tensor, b: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One PCA fitted on the positions of both (C, h, w) maps, applied to each."""
    samples = torch.cat([a.flatten(1), b.flatten(1)], 1).T
    mean, basis = pca_basis(samples.float(), dims)
    return _project(a[None].float(), mean, basis)[0], _project(b[None].float(), mean, basis)[0]


def co_pca_fuse(src: Mapping[str, torch.Tensor], trg: Mapping[str, torch.Tensor], sd_taps: Sequence[str],
                sd_dims: Sequence[int] = _TALE_DIMS, dino_dims: Optional[int] = None, sd_weight: float = 1.0,
                dino_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's per-pair fusion of two images' raw maps ({tap: (C, h, w)}, SD taps fine to coarse and 'dino'):
    each SD tap reduced by a PCA fitted on both images together (co-PCA), optionally the DINO map too
    (their `CO_PCA_DINO`), then `fuse_maps`. Returns the two fused (C, h, w) maps."""
    if len(sd_dims) != len(sd_taps):
        raise InputError(f'co-PCA needs one dimension per SD tap {list(sd_taps)}, got {list(sd_dims)}.')
    missing = [t for t in (*sd_taps, DINO_TAP) if t not in src or t not in trg]
    if missing:
        raise InputError(f'co-PCA needs the raw maps {missing} of both images (a fused model with those taps).')
    pairs = [_pair_pca(src[t], trg[t], d) for t, d in zip(sd_taps, sd_dims)]
    dino_a, dino_b = src[DINO_TAP].float(), trg[DINO_TAP].float()
    if dino_dims:
        dino_a, dino_b = _pair_pca(dino_a, dino_b, dino_dims)
    fa = fuse_maps([p[0][None] for p in pairs], dino_a[None], sd_weight, dino_weight)[0]
    fb = fuse_maps([p[1][None] for p in pairs], dino_b[None], sd_weight, dino_weight)[0]
    return fa, fb


def fused_module(model: nn.Module) -> 'FusedBackbone':
    """The `FusedBackbone` in `model` (itself or inside timm's `features_only` wrapper)."""
    for sub in model.modules():
        if isinstance(sub, FusedBackbone):
            return sub
    raise InputError(f'{type(model).__name__} is not a fused backbone: co-PCA needs a diffusion + DINOv2 model such as '
                     'cleandift_sd21_dinov2.')


def pair_co_pca(src: Mapping[str, torch.Tensor], trg: Mapping[str, torch.Tensor], dims: Sequence[int],
                sd_weight: float = 1.0, dino_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`co_pca_fuse` of two images' raw maps as the `raw` selection returns them ({'dino': ..., SD taps...}): the SD
    taps are every other map, fine to coarse; one value in `dims` applies to every SD tap."""
    sd_taps = sorted((k for k in src if k != DINO_TAP), key=lambda k: -src[k].shape[-2] * src[k].shape[-1])
    dims = list(dims) * len(sd_taps) if len(dims) == 1 else list(dims)
    return co_pca_fuse(src, trg, sd_taps, dims, None, sd_weight, dino_weight)


def is_fused_model(name: str) -> bool:
    """Whether a timm model name (optionally `.tag`) is one of the fused backbones registered here."""
    from timm.models import is_model, model_entrypoint

    arch = name.partition('.')[0]
    return is_model(arch) and model_entrypoint(arch).__module__ == __name__ and arch not in PLAIN_TIMM_MODELS


@dataclasses.dataclass(frozen=True)
class FusionConfig(Options):
    """How the two sources are fused.

    Args:
        sd_weight, dino_weight: weights of the two L2-normalised sources in the fused map (theirs: 1 and 1).
        sd_dims: fixed PCA projection of each SD tap to these dims (fit it with `fit_projection`); None: raw.
        dino_dims: fixed PCA projection of the DINO tokens (None: raw, as theirs without co-PCA).
    """
    sd_weight: float = 1.0
    dino_weight: float = 1.0
    sd_dims: Optional[Sequence[int]] = None
    dino_dims: Optional[int] = None

    def __post_init__(self) -> None:
        finite_number('sd_weight', self.sd_weight)
        finite_number('dino_weight', self.dino_weight)


@dataclasses.dataclass(frozen=True)
class WindowConfig(Options):
    """The sliding window of their SD pass (ODISE's `slide_forward`, as sd-dino builds it: `slide_training=True`).

    Args:
        slide: run the diffusion model on square windows of the image and average its maps where windows overlap
            (theirs); False: one pass over the whole image.
        slide_window: window side in pixels (theirs: 512), shrunk to the image's short side.
        slide_stride: step between windows, at most `slide_window` (None: the window side, as theirs); the last
            window of each axis is moved back inside the image.
    """
    slide: bool = True
    slide_window: int = 512
    slide_stride: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.slide, bool):
            raise InputError(f'slide must be True (their sliding window) or False (one pass), got {self.slide!r}.')
        whole_number('slide_window', self.slide_window, what='side of the sliding window in pixels')
        if self.slide_stride is not None:
            whole_number('slide_stride', self.slide_stride, maximum=self.slide_window,
                         what='step between sliding windows in pixels, at most slide_window')


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """First pixel of each window along an axis of `size` pixels (`window` <= `size`): one every `stride` until the
    axis is covered, the last one moved back so that it ends at the image's edge."""
    count = 1 + -(-(size - window) // stride)  # the first window, then ceil(rest / stride)
    return [min(i * stride, size - window) for i in range(count)]


class FusedBackbone(ClassifierHeadMixin, nn.Module):
    """A diffusion backbone of this package and a timm DINOv2, fused as "A Tale of Two Features" does.

    Taps (`feature_info`, fine to coarse; all of them by default with `features_only`): `fused` (the fused map on the
    finest SD tap's grid), `dino` (raw DINOv2 tokens of `dino_layer` on the same grid), then the raw SD taps by their
    names. Each source runs once per batch, and only when a selected tap needs it. The classifier head (timm's, with
    `num_classes`) reads the fused map.
    """

    def __init__(
            self,
            diffusion: str = 'cleandift_sd21',
            dino: str = 'vit_base_patch14_dinov2.lvd142m',
            sd_taps: Sequence[str] = _TALE_TAPS,
            dino_layer: Optional[int] = None,
            fusion_cfg: FusionConfig = FusionConfig(),
            window_cfg: WindowConfig = WindowConfig(),
            diffusion_kwargs: Optional[dict[str, Any]] = None,
            dino_kwargs: Optional[dict[str, Any]] = None,
            load_weights: bool = False,
            head_cfg: HeadConfig = HeadConfig(),
            in_chans: int = 3,
    ):
        """
        Args:
            diffusion: a diffusion model of this package (`cleandift_sd21`, `sd15`, ...).
            dino: a timm DINOv2 (any `vit_*_patch14_dinov2*` name, with or without registers, `.tag` allowed).
            sd_taps: SD taps fused, fine to coarse (default their levels: us8, us5, us2).
            dino_layer: DINOv2 block whose tokens are used (default: the last, as their 11 / 23 / 39 for B / L / G).
            fusion_cfg: the sources' weights and fixed PCA projections (`FusionConfig`).
            window_cfg: their sliding window over the diffusion model, or one pass (`WindowConfig`).
            diffusion_kwargs: arguments of the diffusion model (prompt, timestep, ensemble, pretrained_cfg_overlay...).
            dino_kwargs: arguments of the timm DINOv2 (e.g. pretrained_cfg_overlay).
            load_weights: download and load both parts' pretrained weights (set by `pretrained=True`).
            head_cfg: the timm classifier head on the fused map (0 classes: none).
        """
        super().__init__()
        import timm

        sd_weight, dino_weight = fusion_cfg.sd_weight, fusion_cfg.dino_weight
        sd_dims, dino_dims = fusion_cfg.sd_dims, fusion_cfg.dino_dims
        if in_chans != 3:
            raise InputError(f'Fused backbones take RGB images (in_chans=3), got in_chans={in_chans}.')
        self.sd_taps = list(sd_taps)
        if not self.sd_taps or len(set(self.sd_taps)) != len(self.sd_taps):
            raise InputError(f'sd_taps must be distinct tap names, got {list(sd_taps)}.')
        if sd_dims is not None and len(sd_dims) != len(self.sd_taps):
            raise InputError(f'sd_dims needs one dimension per SD tap {self.sd_taps}, got {list(sd_dims)}.')
        self.sd_weight, self.dino_weight = float(sd_weight), float(dino_weight)
        self.window_cfg = window_cfg
        self.in_chans = in_chans

        from .. import hub

        # the diffusion part's memory check counts the DINOv2 weights read after it: one check before either is read
        with hub.weights_to_come('DINOv2', _dino_nbytes(dino, dino_kwargs) if load_weights else 0):
            self.diffusion = timm.create_model(diffusion, pretrained=load_weights, **(diffusion_kwargs or {}))
        if not hasattr(self.diffusion, 'forward_intermediates') or not hasattr(self.diffusion, 'taps'):
            raise InputError(f'diffusion={diffusion!r} is not a diffusion backbone of diffbackbone.')
        names = self.diffusion.tap_names(all=True)
        unknown = [t for t in self.sd_taps if t not in names and t not in self.diffusion.tap_names()]
        if unknown:
            raise TapError(f'{diffusion} has no taps {unknown}; see `diffbackbone taps {diffusion}`.')
        from timm.models import is_model, model_entrypoint

        arch = dino.partition('.')[0]
        if not is_model(arch) or model_entrypoint(arch).__module__ not in ('timm.models.vision_transformer', __name__):
            raise InputError(f'dino={dino!r} is not a timm VisionTransformer: use a DINOv2 such as '
                             "'vit_base_patch14_dinov2.lvd142m' (timm.list_models('*dinov2*')).")
        with (empty_weights() if load_weights else contextlib.nullcontext()), assigning_loads():
            # timm's own loader reads the DINOv2 weights into a model built without a random initialisation
            self.dino = timm.create_model(dino, pretrained=load_weights, num_classes=0, dynamic_img_size=True,
                                          **(dino_kwargs or {}))
        if not isinstance(self.dino, VisionTransformer):
            raise InputError(f'dino={dino!r} is not a timm VisionTransformer (use a vit_*_dinov2 model).')
        depth = len(self.dino.blocks)
        self.dino_layer = depth - 1 if dino_layer is None else int(dino_layer)
        if not 0 <= self.dino_layer < depth:
            raise InputError(f'dino_layer must be in [0, {depth - 1}] for {dino}, got {dino_layer}.')
        # no tap reads later blocks, the final norm or the head
        self.dino.prune_intermediate_layers([self.dino_layer], prune_norm=True, prune_head=True)
        self.dino_patch = self.dino.patch_embed.patch_size[0]
        cfg = self.dino.pretrained_cfg
        self.register_buffer('dino_mean', torch.tensor(cfg['mean']).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('dino_std', torch.tensor(cfg['std']).view(1, 3, 1, 1), persistent=False)

        sd_info = {i['name']: i for i in self.diffusion.feature_info}
        sd_info.update({t.name: t.info() for t in self.diffusion.all_taps if t.name not in sd_info})
        chans = [sd_info[t]['num_chs'] for t in self.sd_taps]
        strides = [sd_info[t]['reduction'] for t in self.sd_taps]
        if strides != sorted(strides):
            raise InputError(f'sd_taps must be listed fine to coarse, got strides {strides} for {self.sd_taps}.')
        self.sd_strides = dict(zip(self.sd_taps, strides))
        self.sd_dims = list(sd_dims) if sd_dims is not None else None
        self.dino_dims = dino_dims
        for i, (c, d) in enumerate(zip(chans, self.sd_dims or [None] * len(chans))):
            if d is not None:
                self.register_buffer(f'sd_pca_mean_{i}', torch.zeros(c))
                self.register_buffer(f'sd_pca_basis_{i}', torch.zeros(c, d))
        embed = self.dino.embed_dim
        if dino_dims:
            self.register_buffer('dino_pca_mean', torch.zeros(embed))
            self.register_buffer('dino_pca_basis', torch.zeros(embed, dino_dims))
        self.register_buffer('projection_fitted', torch.tensor(False))
        fused_chs = sum(self.sd_dims or chans) + (dino_dims or embed)
        stride = strides[0]
        self.feature_info = [dict(num_chs=fused_chs, reduction=stride, module='fused', name=FUSED_TAP),
                             dict(num_chs=embed, reduction=stride, module='dino', name=DINO_TAP)]
        self.feature_info += [dict(num_chs=c, reduction=s, module=f'diffusion.{t}', name=t)
                              for t, c, s in zip(self.sd_taps, chans, strides)]
        self._init_head(fused_chs, head_cfg)
        if head_cfg.num_classes:
            # A classifier reads the fused map only: drop the SD blocks after its deepest SD tap, as the builder prunes
            # a diffusion model's classifier, so that every parameter gets a gradient.
            self.diffusion.prune_intermediate_layers(self.sd_taps)

    # ---- taps ----------------------------------------------------------------------------------------------------
    def tap_names(self, all: bool = False) -> list[str]:
        return [i['name'] for i in self.feature_info]

    @property
    def all_taps(self) -> list[Tap]:
        """The `feature_info` entries as taps (what `diffbackbone inspect` selects from), in their order."""
        return [Tap(i['name'], i['name'], i['num_chs'], i['reduction'], i['module'], order=k, base=True, seq=k)
                for k, i in enumerate(self.feature_info)]

    taps = all_taps

    @property
    def presets(self) -> dict[str, tuple[str, ...]]:
        return {RAW_PRESET: tuple(self.tap_names()[1:])}

    def _resolve(self, indices) -> list[Tap]:
        taps = self.all_taps
        return [taps[i] for i in self._take(indices)]

    def stream_taps(self, x: torch.Tensor, taps: Sequence[Tap], sink) -> None:
        """`sink(name, map)` for each of `taps` (`DiffusionBackbone.stream_taps`; here the maps of one pass)."""
        maps = self.forward_intermediates(x, [t.name for t in taps], intermediates_only=True)
        for t, m in zip(taps, maps):
            sink(t.name, m)

    def _take(self, indices: Union[None, int, str, Sequence[Union[int, str]]]) -> list[int]:
        """`feature_info` indices of a selection: None = every tap, an int n = the last n, names or indices."""
        names = self.tap_names()
        if indices is None:
            return list(range(len(names)))
        if isinstance(indices, int):
            return list(range(len(names) - indices, len(names)))
        if indices == RAW_PRESET or indices == (RAW_PRESET,) or indices == [RAW_PRESET]:
            return list(range(1, len(names)))
        if isinstance(indices, str):
            indices = [indices]
        out = []
        for i in indices:
            if isinstance(i, str) and i in names:
                out.append(names.index(i))
            elif isinstance(i, int) and not isinstance(i, bool) and -len(names) <= i < len(names):
                out.append(i % len(names))
            else:
                raise TapError(f'Unknown tap {i!r} of a fused backbone: choose among {names} (or their indices).')
        return out

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the SD blocks after the deepest SD tap needed and the DINOv2 blocks after `dino_layer`."""
        take = self._take(indices)
        names = [self.tap_names()[i] for i in take]
        sd_needed = self.sd_taps if FUSED_TAP in names else [n for n in names if n in self.sd_taps]
        if sd_needed:
            self.diffusion.prune_intermediate_layers(sd_needed)
        if prune_head:
            self.reset_classifier(0, '')
        return take

    # ---- forward -------------------------------------------------------------------------------------------------
    def _dino_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """DINOv2 tokens (B, D, h, w) of images in [-1, 1] resized to the grid x patch size, ImageNet-normalised."""
        size = (grid[0] * self.dino_patch, grid[1] * self.dino_patch)
        img = (x.float() + 1) / 2
        if img.shape[-2:] != size:
            img = F.interpolate(img, size=size, mode='bilinear', align_corners=False, antialias=True)
        img = ((img - self.dino_mean) / self.dino_std).to(self.dino.patch_embed.proj.weight.dtype)
        return self.dino.forward_intermediates(img, indices=[self.dino_layer], norm=False, intermediates_only=True)[0]

    def raw_features(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Raw maps of SD taps and 'dino' by name: one batched pass of each source that is needed (of the diffusion
        model, one per window of the sliding window)."""
        out: dict[str, torch.Tensor] = {}
        sd = [n for n in self.sd_taps if n in names]
        if sd:
            windows = self._windows(x)
            if windows is None:
                out.update(zip(sd, self.diffusion.forward_intermediates(x, indices=sd, intermediates_only=True)))
            else:
                out.update(self._slide(x, sd, *windows))
        if DINO_TAP in names:
            out[DINO_TAP] = self._dino_tokens(x, self._grid(x))
        return out

    def _windows(self, x: torch.Tensor) -> Optional[tuple[int, list[int], list[int]]]:
        """(window side, row starts, column starts) of the sliding window over images `x`; None for one pass (the
        window off, or one window covering the whole image)."""
        if not self.window_cfg.slide or x.ndim != 4:
            return None
        h, w = x.shape[-2:]
        side = min(self.window_cfg.slide_window, h, w)  # theirs: the window shrinks to the short side
        stride = min(self.window_cfg.slide_stride or side, side)
        rows, cols = window_starts(h, side, stride), window_starts(w, side, stride)
        return None if len(rows) == len(cols) == 1 else (side, rows, cols)

    def _slide(self, x: torch.Tensor, taps: Sequence[str], side: int, rows: Sequence[int],
               cols: Sequence[int]) -> dict[str, torch.Tensor]:
        """Maps of SD `taps` by the sliding window: each window's maps added where the window lies on the tap's grid
        (its offset // stride; the grid is the image size // stride), divided by the number of windows over each
        position."""
        strides = {t: self.sd_strides[t] for t in taps}
        misfit = sorted(t for t, s in strides.items() if side % s)
        if misfit:
            need = max(strides[t] for t in misfit)
            raise InputError(f'A sliding window of {side} px does not tile the maps of {misfit} (stride up to {need}): '
                             f'give images whose short side is at least slide_window={self.window_cfg.slide_window}, '
                             f'a slide_window that is a multiple of {need}, or slide=False for one pass.')
        h, w = x.shape[-2:]
        sums: dict[str, torch.Tensor] = {}
        counts = {s: x.new_zeros(h // s, w // s, dtype=torch.float32) for s in set(strides.values())}
        dtype = x.dtype
        for top in rows:
            for left in cols:
                maps = self.diffusion.forward_intermediates(x[:, :, top:top + side, left:left + side], indices=taps,
                                                            intermediates_only=True)
                for tap, m in zip(taps, maps):
                    s, dtype = strides[tap], m.dtype
                    if tap not in sums:  # accumulated in float32 (theirs: in the input's dtype, float32)
                        sums[tap] = m.new_zeros(m.shape[0], m.shape[1], h // s, w // s, dtype=torch.float32)
                    sums[tap][:, :, top // s:top // s + m.shape[-2], left // s:left // s + m.shape[-1]] += m.float()
                for s, count in counts.items():
                    count[top // s:(top + side) // s, left // s:(left + side) // s] += 1
        return {t: (sums[t] / counts[strides[t]]).to(dtype) for t in taps}

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the finest SD tap's map for an input: in one pass each stride-2 step of the VAE and UNet rounds
        up (diffusers' `upsample_size`); the sliding window's grid is the image size // stride, as theirs."""
        stride = self.feature_info[0]['reduction']
        h, w = x.shape[-2:]
        if self._windows(x) is not None:
            return h // stride, w // stride
        return -(-h // stride), -(-w // stride)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = True,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """Maps of the selected taps (names or `feature_info` indices) in the order asked for."""
        if output_fmt != 'NCHW':
            raise InputError(f"Only output_fmt='NCHW' is supported, got {output_fmt!r}.")
        names = [self.tap_names()[i] for i in self._take(indices)]
        need = set(names) - {FUSED_TAP}
        if FUSED_TAP in names:
            need |= {*self.sd_taps, DINO_TAP}
        raw = self.raw_features(x, [n for n in self.tap_names() if n in need])
        maps = [self._fuse(raw) if n == FUSED_TAP else raw[n] for n in names]
        if intermediates_only:
            return maps
        return (self._fuse(raw) if FUSED_TAP in names else maps[-1]), maps

    def _fuse(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sd = [raw[t] for t in self.sd_taps]
        dino = raw[DINO_TAP]
        if self.sd_dims is not None or self.dino_dims:
            if not bool(self.projection_fitted):
                raise RuntimeError('This fused backbone reduces its sources by a fixed PCA projection that is not '
                                   'fitted yet: call model.fit_projection(images) once (or load a state dict that '
                                   'holds it), or build it with sd_dims=None, dino_dims=None.')
        if self.sd_dims is not None:
            sd = [_project(f.float(), getattr(self, f'sd_pca_mean_{i}'), getattr(self, f'sd_pca_basis_{i}'))
                  for i, f in enumerate(sd)]
        if self.dino_dims:
            dino = _project(dino.float(), self.dino_pca_mean, self.dino_pca_basis)
        fused = fuse_maps([f.float() for f in sd], dino.float(), self.sd_weight, self.dino_weight)
        return fused.to(raw[DINO_TAP].dtype)

    @torch.no_grad()
    def fit_projection(self, x: torch.Tensor) -> None:
        """Fit the fixed PCA projection(s) on a batch of images (every position of every image is a sample; with a
        pair of images this is exactly their co-PCA). Kept in the state dict."""
        if self.sd_dims is None and not self.dino_dims:
            raise InputError('Nothing to fit: this fused backbone has no reduction (sd_dims=None, dino_dims=None).')
        raw = self.raw_features(x, [*self.sd_taps, DINO_TAP])
        for i, d in enumerate(self.sd_dims or []):
            f = raw[self.sd_taps[i]].float()
            mean, basis = pca_basis(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), d)
            getattr(self, f'sd_pca_mean_{i}').copy_(mean)
            getattr(self, f'sd_pca_basis_{i}').copy_(basis)
        if self.dino_dims:
            f = raw[DINO_TAP].float()
            mean, basis = pca_basis(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), self.dino_dims)
            self.dino_pca_mean.copy_(mean)
            self.dino_pca_basis.copy_(basis)
        self.projection_fitted.fill_(True)

    # ---- timm model API ------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.diffusion.set_grad_checkpointing(enable)
        self.dino.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, [FUSED_TAP], intermediates_only=True)[0]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FusedBackbone) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the fused model's keys (offline; the model is not changed): our own state dicts as they
    are; a checkpoint of the diffusion part alone (its own keys, or its family's foreign layout) under `diffusion.`.

    `pretrained=True` loads each part through its own loader; this serves a state dict given by hand."""
    if any(k.startswith(('diffusion.', 'dino.')) for k in state_dict):
        return dict(state_dict)
    import importlib

    from timm.models import model_entrypoint

    net = model.diffusion
    family = importlib.import_module(model_entrypoint(net.pretrained_cfg['architecture']).__module__)
    return {'diffusion.' + k: v for k, v in family.checkpoint_filter_fn(state_dict, net).items()}


def _dino_nbytes(dino: str, dino_kwargs: Optional[dict[str, Any]]) -> int:
    """Bytes of the DINOv2 weights timm's loader reads into the (float32) model: from the header of the safetensors
    file it reads, fetched here into the HF cache timm reads from (a `.pth`: its size); for a file timm downloads from
    a URL, the float32 state dict of the model built on the meta device; 0 where the weights cannot be fetched
    (timm's loader then says why)."""
    from timm.models import resolve_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source

    from .. import hub

    kwargs = dino_kwargs or {}
    with contextlib.suppress(RuntimeError, ValueError, AssertionError):  # not a pretrained cfg: timm says why
        cfg = resolve_pretrained_cfg(dino, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
        source, loc = _resolve_pretrained_source(cfg)
        path = None
        if source == 'file':
            path = Path(loc)
        elif source == 'hf-hub':
            repo, filename = loc if isinstance(loc, tuple) else (loc, 'model.safetensors')
            with contextlib.suppress(hub.HubError):
                path = hub.download(repo, filename, what=f'DINOv2 weights of {dino}')
        if path is not None and path.is_file():
            return hub.safetensors_nbytes(path, torch.float32) or path.stat().st_size
        if source == 'url':
            import timm

            with torch.device('meta'):
                model = timm.create_model(dino, num_classes=0, dynamic_img_size=True,
                                          **{k: v for k, v in kwargs.items() if k != 'dtype'})
            return sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
                       for t in model.state_dict().values())
    return 0


def _create_fused(variant: str, pretrained: bool = False, **kwargs) -> FusedBackbone:
    """Both parts load their own weights (the diffusion model through diffbackbone's loader, DINOv2 through timm's);
    `pretrained_cfg_overlay` and any argument the fused model does not know go to the diffusion model."""
    return build_composite(FusedBackbone, variant, pretrained, 'diffusion_kwargs', checkpoint_filter_fn, **kwargs)


def _create_test_vit_dinov2(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)  # as timm's own ViTs: the last 3 blocks
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=_vit_filter,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 0,
        'input_size': (3, 960, 960),  # their SD input; DINOv2 then sees 840 px (60 x 60 patches)
        'min_input_size': (3, 64, 64),
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0.5, 0.5, 0.5),  # [-1, 1] as Stable Diffusion expects; the DINOv2 part renormalises
        'std': (0.5, 0.5, 0.5),
        'pool_size': (60, 60),  # the fused map: the finest SD tap's grid (stride 16)
        'first_conv': 'diffusion.vae.encoder.conv_in',
        'classifier': 'head.fc',
        'paper_name': 'A Tale of Two Features: Stable Diffusion Complements DINO for Zero-Shot Semantic Correspondence',
        'paper_ids': 'arXiv:2305.15347',
        'origin_url': 'https://github.com/Junyi42/sd-dino',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'cleandift_sd21_dinov2.tale': _cfg(),
    'cleandift_sd15_dinov2.tale': _cfg(),
    'sd15_dinov2.tale': _cfg(),
    'sd21_dinov2.tale': _cfg(),
    'diffusion_dinov2.tale': _cfg(),
    'test_cleandift_dinov2.tiny': _cfg(input_size=(3, 128, 128), pool_size=(8, 8)),
    'test_vit_dinov2.tiny': {
        'hf_hub_id': 'diffbackbone/test-dinov2', 'num_classes': 0, 'input_size': (3, 56, 56), 'crop_pct': 1.0,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'first_conv': 'patch_embed.proj',
        'classifier': 'head'},
})

_TALE = dict(sd_taps=_TALE_TAPS, sd_weight=1.0, dino_weight=1.0)
# Their SD pass (ODISE's LdmExtractor as sd-dino runs it): t=100, one draw, the VAE posterior mean, and the noise one
# draw of `torch.randn` from a CPU generator seeded 42 at the window's latent size, the same for every window and image
# (ODISE's `shared_noise`): our `noise_seed=42` draws the same numbers.
_TALE_SD_NOISE = dict(timestep=100, ensemble=1, latent='mode', noise_seed=42)


@register_model
def cleandift_sd21_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """CleanDIFT SD2.1 (us8, us5, us2) fused with DINOv2 ViT-B/14 block 11, Tale of Two Features' recipe."""
    model_args = dict(_TALE, diffusion='cleandift_sd21', dino='vit_base_patch14_dinov2.lvd142m')
    return _create_fused('cleandift_sd21_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cleandift_sd15_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """CleanDIFT SD1.5 fused with DINOv2 ViT-B/14 (the SD version of the paper, without noise)."""
    model_args = dict(_TALE, diffusion='cleandift_sd15', dino='vit_base_patch14_dinov2.lvd142m')
    return _create_fused('cleandift_sd15_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd15_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """The paper's setting: SD1.5 noised at t=100 by their one seeded draw (posterior-mean latent, sliding window),
    fused with DINOv2 ViT-B/14."""
    model_args = dict(_TALE, **_TALE_SD_NOISE, diffusion='sd15', dino='vit_base_patch14_dinov2.lvd142m')
    return _create_fused('sd15_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd21_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """SD2.1 with the paper's SD pass (t=100, their seeded draw, posterior-mean latent, sliding window), fused with
    DINOv2 ViT-B/14."""
    model_args = dict(_TALE, **_TALE_SD_NOISE, diffusion='sd21', dino='vit_base_patch14_dinov2.lvd142m')
    return _create_fused('sd21_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def diffusion_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """General form: `diffusion=` any diffusion model here, `dino=` any timm DINOv2, weights and reductions as args."""
    if 'diffusion' not in kwargs:
        raise InputError("diffusion_dinov2 needs diffusion='<model>' (e.g. 'cleandift_sd21'), and optionally dino=, "
                         'sd_taps=, dino_layer=, sd_weight=, dino_weight=, sd_dims=, dino_dims=.')
    model_args = dict(_TALE, dino='vit_base_patch14_dinov2.lvd142m')
    return _create_fused('diffusion_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_cleandift_dinov2(pretrained: bool = False, **kwargs) -> FusedBackbone:
    """Tiny random-weight fused model for tests: test_cleandift + test_vit_dinov2."""
    model_args = dict(_TALE, diffusion='test_cleandift', dino='test_vit_dinov2')
    return _create_fused('test_cleandift_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vit_dinov2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DINOv2-layout ViT (patch 14, layer scale) for tests."""
    model_args = dict(img_size=56, patch_size=14, embed_dim=24, depth=3, num_heads=2, init_values=1e-5)
    return _create_test_vit_dinov2('test_vit_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))
