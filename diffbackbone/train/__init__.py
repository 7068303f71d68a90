"""clean-train: make any Stable Diffusion UNet clean with the CleanDIFT recipe, producing weights our backbones load.

CleanDIFT (Stracke et al., CVPR 2025, arXiv 2412.03439). The recipe, the command line, the Python API, the output
file and its projection heads: docs/training.md#making-a-unet-clean."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .data import DataError, ImageFolder, find_images, read_caption
from .distill import BASES, CleanDistiller, DistillConfig, TrainError, build_models
from .heads import ProjectionHeads
from .trainer import CleanTrainer, TrainConfig, TrainResult, clean_train

__all__ = [
    'BASES',
    'CleanDistiller',
    'CleanTrainer',
    'DataError',
    'DistillConfig',
    'ImageFolder',
    'ProjectionHeads',
    'TrainConfig',
    'TrainError',
    'TrainResult',
    'build_models',
    'clean_train',
    'find_images',
    'load_clean_model',
    'read_caption',
]


def load_clean_model(path: str | Path, **kwargs):
    """The clean backbone in a clean-train output file, for any base (built from the configs stored in the file).

    `kwargs` go to timm.create_model (e.g. features_only=True, out_indices=('us6',)) or, for local bases, to
    `DiffusionUNet`. For SD2.1 / SD1.5 bases this is `timm.create_model('cleandift_sd21', pretrained=True,
    pretrained_cfg_overlay=dict(file=path))`.
    """
    import timm
    from safetensors import safe_open

    from .. import hub
    from ..models._builder import empty_weights, load_weights
    from ..models.diffusion_unet import DiffusionUNet, checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: give the .safetensors file written by clean-train.')
    with safe_open(path, 'pt') as f:
        meta = f.metadata() or {}
    if 'diffbackbone.model' not in meta:
        raise InputError(f'{path} was not written by clean-train (no diffbackbone metadata).')
    if meta['diffbackbone.model']:
        return timm.create_model(meta['diffbackbone.model'], pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    vae_cfg = json.loads(meta['diffbackbone.vae_cfg'])
    vae_cfg['block_out_channels'] = tuple(vae_cfg['block_out_channels'])
    with empty_weights():  # the file's tensors are assigned: no random initialisation first
        model = DiffusionUNet.from_kwargs(unet_cfg=json.loads(meta['diffbackbone.unet_cfg']), vae_cfg=vae_cfg,
                                          clean=True, base_repo=meta.get('diffbackbone.base_repo') or None, **kwargs)
    return load_weights(model, hub.load_safetensors(path, what=f'the clean-train output {path}'),
                        checkpoint_filter_fn).eval()
