"""mmengine 0.10 on current PyTorch.

Since PyTorch 2.6, `torch.load` defaults to `weights_only=True`. mmengine 0.10 (the last release, required by
mmseg 1.2.2) calls `torch.load` without the argument, and its training checkpoints hold the message hub's state
(`HistoryBuffer`, numpy arrays rebuilt through `getattr`) that the weights-only unpickler refuses, so `--resume` and
`load_from` fail. The local-file loader is replaced by one that loads them as mmengine did before PyTorch 2.6:
a checkpoint is trusted code, as it always was with mmengine.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Optional

import torch
from mmengine.runner import CheckpointLoader

__all__ = ['load_local_checkpoint', 'allow_mmengine_checkpoints']


def load_local_checkpoint(filename: str, map_location: Optional[Any] = None) -> Any:
    """mmengine's `load_from_local`, with `weights_only=False` spelled out."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'Checkpoint {filename!r} does not exist.')
    return torch.load(filename, map_location=map_location, weights_only=False)


def allow_mmengine_checkpoints() -> None:
    """Make mmengine load local checkpoints (resume, load_from, Pretrained init) on PyTorch >= 2.6."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
