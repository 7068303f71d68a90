"""An optimizer-wrapper constructor that logs a summary of the parameter groups instead of one line per parameter.

mmengine's `DefaultOptimWrapperConstructor` logs every option of every parameter a `paramwise_cfg` touches (three
lines per UNet parameter with an lr multiplier: about 2,000 for SD2.1) and warns once per frozen parameter (about 800
for a frozen SD2.1), which buries the training log. `DiffusionOptimWrapperConstructor` builds exactly the same
parameter groups (it is that constructor) and logs a few summary lines instead::

    optim_wrapper = dict(constructor='DiffusionOptimWrapperConstructor', paramwise_cfg=dict(...), ...)
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Optional, Union

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['DiffusionOptimWrapperConstructor']

# The per-parameter messages of DefaultOptimWrapperConstructor.add_params (mmengine 0.10).
_PER_PARAMETER = ('paramwise_options -- ', ' is skipped since its requires_grad=False')


class _DropPerParameter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in _PER_PARAMETER)


def _area(name: str) -> str:
    """Where a parameter lives, coarsely: `backbone.model.unet`, `decode_head`, ..."""
    parts = name.split('.')
    return '.'.join(parts[:3] if parts[:2] == ['backbone', 'model'] else parts[:1])


def _count(n: int) -> str:
    return f'{n / 1e6:.2f}M' if n >= 1e5 else str(n)


def _value(v: object) -> str:
    return f'{v:.6g}' if isinstance(v, float) else str(v)


def _areas(names: list[str]) -> str:
    return ', '.join(f'{area} ({n})' for area, n in Counter(_area(name) for name in names).items())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DiffusionOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor (same groups, learning rates and options), with a summary log."""

    def add_params(self, params: list[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        if prefix:  # the recursion into children: as mmengine does it
            return super().add_params(params, module, prefix, is_dcn_module)
        logger = MMLogger.get_current_instance()
        quiet = _DropPerParameter()
        logger.addFilter(quiet)
        try:
            super().add_params(params, module, prefix, is_dcn_module)
        finally:
            logger.removeFilter(quiet)
        self._log_summary(params, module)

    def _log_summary(self, params: list[dict], module: nn.Module) -> None:
        names = {id(p): n for n, p in module.named_parameters()}
        settings: dict[tuple, list] = defaultdict(list)
        for group in params:
            options = tuple(sorted((k, v) for k, v in group.items() if k != 'params'))
            settings[options] += group['params']
        lines = [f'{type(self).__name__}: {sum(map(len, settings.values()))} parameter tensors in '
                 f'{len(settings)} setting(s) (optimizer defaults: lr={_value(self.base_lr)}, '
                 f'weight_decay={_value(self.base_wd)}):']
        for options, group in settings.items():
            what = ', '.join(f'{k}={_value(v)}' for k, v in options) or 'optimizer defaults'
            lines.append(f'  {what}: {len(group)} tensors, {_count(sum(p.numel() for p in group))} values -- '
                         f'{_areas([names.get(id(p), "?") for p in group])}')
        frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        if frozen:
            lines.append(f'  frozen (requires_grad=False, not optimised): {len(frozen)} tensors, '
                         f'{_count(sum(p.numel() for _, p in frozen))} values -- {_areas([n for n, _ in frozen])}')
        print_log('\n'.join(lines), logger='current', level=logging.INFO)
