"""Checks that turn bad segmentation configs into clear errors before training starts.

- `check_head_channels`: the neck or decode heads take exactly the channels the backbone returns.
- `check_config`: crops and resizes keep images at least `MIN_INPUT_SIZE` px per side for a diffusion backbone, and
  the dataset folders exist.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Iterator, Sequence

import torch.nn as nn

from ..errors import DiffbackboneError, InputError
from ..models import MIN_INPUT_SIZE

__all__ = ['ConfigError', 'check_head_channels', 'check_config', 'check_image_sizes', 'check_dataset_paths']


class ConfigError(DiffbackboneError, ValueError):
    """A segmentation config that cannot work with the diffusion backbone or the files on disk."""


def _describe(channels: Sequence[int], taps: Sequence[str], strides: Sequence[int]) -> str:
    return ', '.join(f'[{i}] {t}: {c} ch, stride {s}' for i, (c, t, s) in enumerate(zip(channels, taps, strides)))


def check_head_channels(segmentor: nn.Module) -> None:
    """Raise `ConfigError` when the neck (or, without a neck, each head) does not take the backbone's channels.

    Works for any mmseg `EncoderDecoder` whose backbone reports `out_channels` (as `DiffusionBackbone` does).
    """
    backbone = segmentor.backbone
    channels = getattr(backbone, 'out_channels', None)
    if channels is None:
        return
    channels = list(channels)
    taps = getattr(backbone, 'tap_names', [f'out{i}' for i in range(len(channels))])
    strides = getattr(backbone, 'strides', ['?'] * len(channels))
    outputs = f"The backbone returns {len(channels)} maps: {_describe(channels, taps, strides)}."
    try:
        _check_heads(segmentor, channels, outputs)
    except ConfigError as e:
        if type(segmentor).__name__ == 'DiffusionEncoderDecoder':
            raise
        # Plain EncoderDecoder: only our tools run this check; mmseg's own tools fail at the first step instead.
        raise ConfigError(f"{e} Use model.type='DiffusionEncoderDecoder' (registered by diffbackbone.mmseg) to have "
                          "this checked whenever the model is built, also by mmseg's own tools.") from None


def _check_heads(segmentor: nn.Module, channels: list[int], outputs: str) -> None:
    if getattr(segmentor, 'with_neck', False):
        in_ch = getattr(segmentor.neck, 'in_channels', None)
        if isinstance(in_ch, (list, tuple)) and list(in_ch) != channels:
            raise ConfigError(
                f'model.neck.in_channels={list(in_ch)} does not match the backbone. {outputs} '
                f'Set model.neck.in_channels={channels}.')
        return  # the heads read the neck's outputs

    heads = [('decode_head', segmentor.decode_head)]
    aux = getattr(segmentor, 'auxiliary_head', None)
    if isinstance(aux, nn.ModuleList):
        heads += [(f'auxiliary_head[{i}]', h) for i, h in enumerate(aux)]
    elif aux is not None:
        heads.append(('auxiliary_head', aux))
    for where, head in heads:
        _check_head(where, head, channels, outputs)


def _check_head(where: str, head: nn.Module, channels: list[int], outputs: str) -> None:
    transform = getattr(head, 'input_transform', None)
    in_index = getattr(head, 'in_index', None)
    if in_index is None or not hasattr(head, 'in_channels'):
        return
    indices = list(in_index) if isinstance(in_index, (list, tuple)) else [in_index]
    bad = [i for i in indices if not -len(channels) <= i < len(channels)]
    if bad:
        raise ConfigError(f'model.{where}.in_index={in_index} selects maps {bad} that do not exist. {outputs}')
    picked = [channels[i] for i in indices]
    if transform == 'multiple_select':
        expected: Any = picked
        got: Any = list(head.in_channels)
    elif transform == 'resize_concat':
        expected, got = sum(picked), head.in_channels
    else:
        expected, got = picked[0], head.in_channels
    if got != expected:
        raise ConfigError(
            f'model.{where}.in_channels={got} (in_index={in_index}) does not match the backbone. {outputs} '
            f'Set model.{where}.in_channels={expected}.')


def _short_sides(transform: dict) -> Iterator[tuple[str, float]]:
    """(what, smallest image side) that one pipeline transform can produce, as far as its config tells."""
    kind = transform.get('type', '')
    if kind == 'RandomCrop' and transform.get('crop_size') is not None:
        yield 'RandomCrop.crop_size', min(_pair(transform['crop_size']))
    elif kind == 'Resize' and transform.get('scale') is not None:
        yield 'Resize.scale', min(_pair(transform['scale']))
    elif kind == 'RandomResize' and transform.get('scale') is not None:
        low = min(transform.get('ratio_range') or (1.0,))
        yield 'RandomResize.scale x ratio_range', min(_pair(transform['scale'])) * low
    elif kind == 'RandomChoiceResize' and transform.get('scales'):
        yield 'RandomChoiceResize.scales', min(min(_pair(s)) for s in transform['scales'])
    for nested in transform.get('transforms') or ():  # TestTimeAug, RandomApply, ...
        for t in nested if isinstance(nested, (list, tuple)) else [nested]:
            if isinstance(t, dict):
                yield from _short_sides(t)


def _pair(size: Any) -> tuple:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _pipelines(dataset: dict, where: str) -> Iterator[tuple[str, list]]:
    if dataset.get('pipeline'):
        yield f'{where}.pipeline', dataset['pipeline']
    for i, sub in enumerate(dataset.get('datasets') or ()):
        yield from _pipelines(sub, f'{where}.datasets.{i}')
    if isinstance(dataset.get('dataset'), dict):
        yield from _pipelines(dataset['dataset'], f'{where}.dataset')


def _loaders(cfg: Any, mode: str) -> list[str]:
    if mode == 'train':
        names = ['train_dataloader']
        if cfg.get('val_cfg') and cfg.get('val_dataloader'):
            names.append('val_dataloader')
        return names
    return ['test_dataloader']


def _size_pipelines(cfg: Any, mode: str) -> Iterator[tuple[str, list]]:
    """(name, pipeline) of every pipeline whose output reaches the backbone in this run, or in a later `test` run.

    A training run also checks the test data loader, so that a too small test `Resize` is found before training, not
    after it. Pipelines equal to the config's `test_pipeline` / `train_pipeline` variables are named after them.
    """
    loaders = _loaders(cfg, mode) + (['test_dataloader'] if mode == 'train' else [])
    named = {key: cfg.get(key) for key in ('test_pipeline', 'train_pipeline') if cfg.get(key)}
    seen: list[list] = []
    for loader in dict.fromkeys(loaders):
        dataset = (cfg.get(loader) or {}).get('dataset')
        if not dataset:
            continue
        for where, pipeline in _pipelines(dataset, f'{loader}.dataset'):
            if pipeline in seen:
                continue
            seen.append(pipeline)
            name = next((key for key, p in named.items() if p == pipeline), None)
            yield (f'{name} ({where})' if name else where), pipeline


def check_image_sizes(cfg: Any, mode: str = 'train', min_size: int = MIN_INPUT_SIZE) -> None:
    """Raise `ConfigError` when the config's crops or resizes make images smaller than `min_size` px per side.

    Checks the training crop (`data_preprocessor.size`), the sliding window, and the pipelines of the run's data
    loaders; a training run also checks the test pipeline (`test_pipeline`), which it would otherwise meet only at
    the end.
    """
    model = cfg.get('model') or {}
    if (model.get('backbone') or {}).get('type') != 'DiffusionBackbone':
        return
    found: list[tuple[str, float]] = []
    size = (model.get('data_preprocessor') or {}).get('size')
    if size is not None and mode == 'train':
        found.append(('model.data_preprocessor.size', min(_pair(size))))
    test_cfg = model.get('test_cfg') or {}
    if test_cfg.get('mode') == 'slide' and test_cfg.get('crop_size') is not None:
        found.append(('model.test_cfg.crop_size', min(_pair(test_cfg['crop_size']))))
    for where, pipeline in _size_pipelines(cfg, mode):
        for t in pipeline:
            if isinstance(t, dict):
                found += [(f'{where}: {what}', side) for what, side in _short_sides(t)]
    small = [(where, side) for where, side in found if side < min_size]
    if small:
        listing = '; '.join(f'{where} gives {side:g} px' for where, side in small)
        raise ConfigError(
            f'Images would reach the diffusion backbone smaller than {min_size} px per side ({listing}). Its deepest '
            f'level has stride {min_size}: raise these crop sizes / scales to at least {min_size}.')


def _dataset_paths(dataset: dict, where: str) -> Iterator[tuple[str, str, str]]:
    """(dataset key, field, path) of every folder or file a dataset config names, nested datasets included."""
    root = dataset.get('data_root')
    if root:
        yield where, 'data_root', root
    prefix = dataset.get('data_prefix') or {}
    for key in ('img_path', 'seg_map_path'):
        if prefix.get(key):
            yield where, f'data_prefix.{key}', osp.join(root or '', prefix[key])
    if dataset.get('ann_file'):
        yield where, 'ann_file', osp.join(root or '', dataset['ann_file'])
    for i, sub in enumerate(dataset.get('datasets') or ()):
        yield from _dataset_paths(sub, f'{where}.datasets.{i}')
    if isinstance(dataset.get('dataset'), dict):
        yield from _dataset_paths(dataset['dataset'], f'{where}.dataset')


def check_dataset_paths(cfg: Any, mode: str = 'train') -> None:
    """Raise `ConfigError` naming the first dataset folder or file the run needs that does not exist."""
    for loader in _loaders(cfg, mode):
        dataset = (cfg.get(loader) or {}).get('dataset')
        if not dataset:
            continue
        for where, field, path in _dataset_paths(dataset, f'{loader}.dataset'):
            if '://' in path or osp.exists(path):
                continue
            raise ConfigError(
                f'{where}.{field} points at {path!r} (from {osp.abspath(path)!r}), which does not exist. Prepare the '
                "dataset as MMSegmentation's docs/en/user_guides/2_dataset_prepare.md describes and link it there, or "
                f'pass --cfg-options {where}.data_root=/path/to/dataset.')


def check_config(cfg: Any, mode: str = 'train') -> None:
    """All config checks for a `train` or `test` run."""
    if mode not in ('train', 'test'):
        raise InputError(f"mode must be 'train' or 'test', got {mode!r}.")
    check_image_sizes(cfg, mode)
    check_dataset_paths(cfg, mode)
