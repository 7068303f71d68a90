"""MMSegmentation backbone wrapping a diffbackbone timm model, and a segmentor that checks its heads at build time.

mmseg's own `TIMMBackbone` builds any timm model with `features_only=True`, but cannot freeze parts of it, run it in
another dtype or pick taps by name; `DiffusionBackbone` adds those. The wrapped `DiffusionUNet` sits at
`backbone.model`, so its UNet parameters are named `backbone.model.unet.*` and an lr multiplier is one line:
`paramwise_cfg=dict(custom_keys={'backbone.model.unet': dict(lr_mult=0.1)})`. A multi-model backbone (`ours_xl_t`,
`multi_diffusion`) is taken too: its members sit at `backbone.model.models.<i>`, each VAE frozen as a single model's.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from ..errors import InputError
from ..models import MIN_INPUT_SIZE
from ..models.multi import MULTI_TAP, MultiBackbone, is_multi_model
from .checks import ConfigError, _pair, check_head_channels

__all__ = ['DiffusionBackbone', 'DiffusionEncoderDecoder']

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


# Families registered by diffbackbone that are not segmentation backbones, and why (module -> reason).
_NOT_FOR_MMSEG = {
    'diffbackbone.models.fused': 'a fused SD + DINOv2 model is a zero-shot correspondence extractor (one map, two '
                                 'networks, no VAE or UNet of its own to freeze or checkpoint): use its diffusion '
                                 "part here (e.g. 'cleandift_sd21'), or the DINOv2 with mmseg's type='TIMMBackbone'",
}


def _family(name: str) -> Optional[str]:
    """The module that registers the timm model `name` when it is one of diffbackbone's, else None."""
    from timm.models import model_entrypoint

    import diffbackbone.models  # noqa: F401  (registers the models)

    if not timm.is_model(name):
        return None
    module = model_entrypoint(name).__module__
    return module if module.startswith('diffbackbone.models.') else None


def diffusion_model_names() -> list[str]:
    """timm names of the diffusion backbones this package registers that `DiffusionBackbone` takes: every family
    (the SD / SDXL / CleanDIFT UNets, DeepFloyd IF, PixArt, FLUX, DiTF, SD3.5, HunyuanDiT) but the fused ones."""
    return sorted(n for n in timm.list_models() if _family(n) and _family(n) not in _NOT_FOR_MMSEG)


@MODELS.register_module()
class DiffusionBackbone(BaseModule):
    """Diffusion features (the UNets of CleanDIFT / DIFT-style SD, SDXL and DeepFloyd IF; the PixArt, FLUX, DiTF,
    SD3.5 and HunyuanDiT transformers) as an mmseg backbone returning a tuple of maps.

    Maps come fine to coarse (strides 8/16/32/64 for a SD UNet's default 'pyramid' preset; four blocks at stride 16
    for the transformers), always as float32.
    """

    def __init__(
            self,
            model_name: str,
            pretrained: Union[bool, str] = True,
            out_indices: Union[None, str, int, Sequence[Union[int, str]]] = None,
            frozen: bool = False,
            freeze_vae: bool = True,
            dtype: str = 'float32',
            with_cp: bool = False,
            model_kwargs: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        """
        Args:
            model_name: timm name of a diffbackbone model ('cleandift_sd21', 'sd15', 'pixart_sigma', 'flux', ...;
                `diffusion_model_names()`).
            pretrained: load the model's published weights; a path loads that checkpoint file instead.
            out_indices: taps to return: names ('us6'), a preset ('pyramid', 'cleandift'), indices, or a mix.
                Default: 'pyramid'; for a multi-model backbone its concatenated map ('multi').
            frozen: freeze the whole backbone: no gradients, eval mode even in training, forward under no_grad.
            freeze_vae: keep the VAE encoder frozen while the UNet is fine-tuned.
            dtype: dtype of the backbone's weights and compute: 'float32', 'bfloat16' or 'float16'.
            with_cp: gradient checkpointing inside the UNet (saves memory when fine-tuning).
            model_kwargs: further `timm.create_model` arguments, e.g. `timestep` / `ensemble` of noisy models,
                `base_repo`, `pretrained_cfg_overlay`.
            init_cfg: mmengine init config; weights normally come from `pretrained`.
        """
        super().__init__(init_cfg=init_cfg)
        if dtype not in _DTYPES:
            raise InputError(f'dtype must be one of {", ".join(_DTYPES)}, got {dtype!r}.')
        if _family(model_name) in _NOT_FOR_MMSEG:
            raise InputError(f'{model_name!r} cannot be an mmseg backbone: {_NOT_FOR_MMSEG[_family(model_name)]}.')
        known = diffusion_model_names()
        if model_name not in known:
            raise InputError(
                f'Unknown diffusion model {model_name!r}. Known: {", ".join(known)}. For other timm models use '
                f"mmseg's type='TIMMBackbone'.")
        kwargs = dict(model_kwargs or {})
        if isinstance(pretrained, str):
            overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {}, file=pretrained)
            kwargs['pretrained_cfg_overlay'] = overlay
            pretrained = True
        if out_indices is None:
            out_indices = (MULTI_TAP,) if is_multi_model(model_name) else 'pyramid'
        if isinstance(out_indices, list):
            out_indices = tuple(out_indices)
        getter = timm.create_model(  # weights read in `dtype`: no float32 copy first
            model_name, pretrained=pretrained, features_only=True, out_indices=out_indices, dtype=_DTYPES[dtype],
            **kwargs)
        # Unwrap timm's feature getter so parameters are named backbone.model.unet.* / backbone.model.vae.*.
        self.model: nn.Module = getter.model
        self.out_indices: list[int] = list(getter.out_indices)
        self.feature_info = getter.feature_info
        self.out_channels: list[int] = self.feature_info.channels()
        self.strides: list[int] = self.feature_info.reduction()
        self.tap_names: list[str] = self.feature_info.get('name')
        self.model_name = model_name
        self.frozen = frozen
        self.freeze_vae = freeze_vae or frozen
        self.dtype = _DTYPES[dtype]
        self.model.set_grad_checkpointing(with_cp)

        # The learned timestep of clean models keeps its trained value; segmentation fine-tunes the weights.
        for part in self._parts():
            if isinstance(getattr(part, 'timestep', None), nn.Parameter):  # FLUX has a sigma, no timestep
                part.timestep.requires_grad_(False)
        for vae in self._vaes():
            vae.requires_grad_(False)
        if frozen:
            self.model.requires_grad_(False)
        elif self.dtype != torch.float32:
            print_log(
                f'DiffusionBackbone: fine-tuning with {dtype} weights updates them in {dtype}; prefer a float32 '
                'backbone with `--amp` (mixed precision) for training, or set frozen=True.',
                logger='current', level=logging.WARNING)
        self.train()

    def _parts(self) -> list[nn.Module]:
        """The diffusion models inside: a multi-model backbone's members, else the model itself."""
        return list(self.model.models) if isinstance(self.model, MultiBackbone) else [self.model]

    def _vaes(self) -> list[nn.Module]:
        """The VAE encoders kept frozen (none with `freeze_vae=False`; DeepFloyd IF works in pixel space: no VAE)."""
        if not self.freeze_vae:
            return []
        return [part.vae for part in self._parts() if getattr(part, 'vae', None) is not None]

    def train(self, mode: bool = True) -> 'DiffusionBackbone':
        super().train(mode)
        if self.frozen:
            self.model.eval()
        else:
            for vae in self._vaes():
                vae.eval()
        return self

    def init_weights(self) -> None:
        # Weights come from timm at construction; only an explicit init_cfg (e.g. a Pretrained checkpoint) applies.
        if self.init_cfg:
            super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            feats = self.model.forward_intermediates(
                x.to(self.dtype), indices=self.out_indices, intermediates_only=True)
        return tuple(f.float() for f in feats)

    def extra_repr(self) -> str:
        return (f'model_name={self.model_name!r}, taps={self.tap_names}, frozen={self.frozen}, '
                f'freeze_vae={self.freeze_vae}, dtype={self.dtype}')


@MODELS.register_module()
class DiffusionEncoderDecoder(EncoderDecoder):
    """mmseg's `EncoderDecoder` that checks, once built, that its neck or heads take the backbone's channels and that
    its training crop (`data_preprocessor.size`) and sliding window are at least `MIN_INPUT_SIZE` px per side; at test
    time it names `test_pipeline` when images reach it smaller than that.

    With plain `EncoderDecoder` these mistakes surface as shape errors deep inside the first training or test step
    (`python -m diffbackbone.mmseg` checks the channels of plain `EncoderDecoder` configs too, after building them).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_head_channels(self)
        sizes = {'model.data_preprocessor.size': getattr(self.data_preprocessor, 'size', None),
                 'model.test_cfg.crop_size': (self.test_cfg or {}).get('crop_size')}
        for where, size in sizes.items():
            if size is not None and min(_pair(size)) < MIN_INPUT_SIZE:
                raise ConfigError(
                    f'{where}={tuple(_pair(size))} is smaller than the {MIN_INPUT_SIZE} px per side the diffusion '
                    f'backbone needs (its deepest level has stride {MIN_INPUT_SIZE}). Raise it to at least '
                    f'{MIN_INPUT_SIZE}.')

    def inference(self, inputs: torch.Tensor, batch_img_metas: list[dict]) -> torch.Tensor:
        if min(inputs.shape[-2:]) < MIN_INPUT_SIZE:
            raise ConfigError(
                f'Test images reach the model at {tuple(inputs.shape[-2:])} px, smaller than the {MIN_INPUT_SIZE} px '
                f'per side the diffusion backbone needs (its deepest level has stride {MIN_INPUT_SIZE}). Raise the '
                f'`Resize` scale in test_pipeline (and tta_pipeline) so that the short side is at least '
                f'{MIN_INPUT_SIZE} px.')
        return super().inference(inputs, batch_img_metas)
