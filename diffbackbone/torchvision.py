"""Diffusion backbones for torchvision's detectors: FasterRCNN, MaskRCNN, RetinaNet, KeypointRCNN.

`fpn_backbone` wraps a timm `features_only` diffusion model with a feature pyramid (torchvision's FPN for a UNet,
ViTDet's simple pyramid for a transformer: Li et al., ECCV 2022) giving maps '0'..'3', 'pool'. Pass the detector
`image_mean=backbone.image_mean, image_std=backbone.image_std`. See docs/tasks.md#detection-torchvision."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .errors import InputError, InputTypeError
from .models._base import DiffusionBackbone
from .models.multi import MULTI_TAP, MultiBackbone, is_multi_model

__all__ = ['DiffusionFPN', 'SimpleFeaturePyramid', 'fpn_backbone']

SD_MEAN = SD_STD = [0.5, 0.5, 0.5]
NECKS = ('auto', 'fpn', 'simple')


def _trainable_blocks(model: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks that still run after pruning, in execution order: a UNet's down blocks, mid block and up
    blocks; a transformer's blocks (FLUX: double-stream, then single-stream); none for a model without either."""
    unet = getattr(model, 'unet', None)
    if unet is not None:
        blocks = list(unet.down_blocks)
        if unet.mid_block is not None:
            blocks.append(unet.mid_block)
        return blocks + list(unet.up_blocks)
    tr = getattr(model, 'transformer', None)
    blocks: list[nn.Module] = []
    if tr is None:
        return blocks
    for name in ('transformer_blocks', 'single_transformer_blocks', 'blocks'):
        blocks += list(getattr(tr, name, None) or ())
    return blocks


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on one map: levels at `strides` made by stride-2 deconvolutions (up) or max
    pooling (down) of the input, each then projected by conv 1x1 + LayerNorm, conv 3x3 + LayerNorm.

    Takes an OrderedDict with one map (stride `in_stride`); returns an OrderedDict '0', '1', ... fine to coarse, plus
    the names `extra_blocks` adds (torchvision's `LastLevelMaxPool`: 'pool').
    """

    def __init__(self, in_channels: int, out_channels: int = 256, in_stride: int = 16,
                 strides: Sequence[int] = (4, 8, 16, 32), extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm: bool = True):
        super().__init__()
        self.strides = tuple(strides)
        self.stages = nn.ModuleList()
        for stride in self.strides:
            ratio = in_stride / stride
            steps = math.log2(ratio) if ratio >= 1 else math.log2(1 / ratio)
            if steps != int(steps):
                raise InputError(f'Pyramid stride {stride} is not a power-of-two step from the input stride '
                                 f'{in_stride}.')
            layers: list[nn.Module] = []
            chs = in_channels
            if ratio > 1:  # ViTDet: deconv, LN, GELU between two deconvs; each halves the channels
                for i in range(int(steps)):
                    if i:
                        layers += [LayerNorm2d(chs), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(chs, max(chs // 2, 1), 2, stride=2))
                    chs = max(chs // 2, 1)
            elif ratio < 1:
                layers.append(nn.MaxPool2d(int(1 / ratio), int(1 / ratio)))
            ln = (lambda: LayerNorm2d(out_channels)) if norm else nn.Identity
            layers += [nn.Conv2d(chs, out_channels, 1, bias=not norm), ln(),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not norm), ln()]
            self.stages.append(nn.Sequential(*layers))
        self.extra_blocks = extra_blocks

    def forward(self, x: 'OrderedDict[str, torch.Tensor]') -> 'OrderedDict[str, torch.Tensor]':
        (feat,) = x.values()
        results = [stage(feat) for stage in self.stages]
        names = [str(i) for i in range(len(results))]
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, [feat], names)
        return OrderedDict(zip(names, results))


class DiffusionFPN(nn.Module):
    """A diffusion model's taps through a feature pyramid: `forward(images) -> OrderedDict[str, Tensor]`.

    Attributes:
        out_channels: channels of every output map (torchvision's detectors read it).
        body: the timm `features_only` model; `fpn`: torchvision's `FeaturePyramidNetwork` (taps of several strides)
            or `SimpleFeaturePyramid` (taps of one stride, concatenated along channels).
        image_mean, image_std: the normalisation to give the detector (Stable Diffusion's [-1, 1] input).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, trainable: int = 0,
                 extra_blocks: Optional[ExtraFPNBlock] = None, norm_layer: Optional[type[nn.Module]] = None,
                 neck: str = 'auto', inputs: Optional[Sequence[int]] = None):
        """
        Args:
            body: a timm `features_only` diffbackbone model.
            out_channels, extra_blocks, norm_layer: as torchvision's `BackboneWithFPN` (`norm_layer`: FPN only).
            trainable: denoiser blocks trained, counted back from the deepest that runs (0: frozen body).
            neck: 'fpn', 'simple' (ViTDet's simple pyramid on one stride) or 'auto' (simple when the taps share one
                stride).
            inputs: indices of the body's outputs the neck reads (default: all).
        """
        super().__init__()
        model = body.model if hasattr(body, 'model') else body
        if not isinstance(model, (DiffusionBackbone, MultiBackbone)):
            raise InputTypeError(f'fpn_backbone needs a diffbackbone diffusion model, got {type(model).__name__}.')
        if neck not in NECKS:
            raise InputError(f"neck must be one of {', '.join(map(repr, NECKS))}, got {neck!r}.")
        # A multi-model backbone: every member trains its own last `trainable` blocks.
        parts = [_trainable_blocks(m) for m in (model.models if isinstance(model, MultiBackbone) else [model])]
        most = min(len(blocks) for blocks in parts)
        if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= most:
            each = ' of each member' if len(parts) > 1 else ''
            raise InputError(f'trainable must be an int from 0 (frozen backbone, only the pyramid trains) to '
                             f'{most} (every denoiser block{each} that runs for these taps), got {trainable!r}.')
        # torchvision's trainable_layers convention: freeze all, then unfreeze the last `trainable` blocks. The VAE
        # encoder, the time embedding and the learned timestep stay frozen.
        body.requires_grad_(False)
        for blocks in parts:
            for block in blocks[len(blocks) - trainable:]:
                block.requires_grad_(True)
        self.trainable = trainable
        self.body = body
        info = body.feature_info
        self.inputs = list(range(len(info.channels()))) if inputs is None else list(inputs)
        channels = [info.channels()[i] for i in self.inputs]
        strides = {info.reduction()[i] for i in self.inputs}
        self.neck = ('simple' if len(strides) == 1 else 'fpn') if neck == 'auto' else neck
        extra = LastLevelMaxPool() if extra_blocks is None else extra_blocks
        if self.neck == 'simple':
            if len(strides) != 1:
                raise InputError(f'The simple pyramid takes taps of one stride; these have strides {sorted(strides)}. '
                                 "Select taps of one stride, or use neck='fpn'.")
            if norm_layer is not None:
                raise InputError("norm_layer is the FPN's; the simple pyramid has its own LayerNorms.")
            self.fpn = SimpleFeaturePyramid(sum(channels), out_channels, in_stride=strides.pop(), extra_blocks=extra)
        else:
            self.fpn = FeaturePyramidNetwork(in_channels_list=channels, out_channels=out_channels, extra_blocks=extra,
                                             norm_layer=norm_layer)
        self.out_channels = out_channels
        self.image_mean, self.image_std = list(SD_MEAN), list(SD_STD)

    def train(self, mode: bool = True) -> 'DiffusionFPN':
        super().train(mode)
        if self.trainable == 0:
            self.body.eval()
        return self

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        if self.trainable == 0:
            with torch.no_grad():  # frozen body: keep no activations for backward
                feats = self.body(x)
        else:
            feats = self.body(x)
        feats = [feats[i] for i in self.inputs]
        if self.neck == 'simple':
            return self.fpn(OrderedDict([('0', torch.cat(feats, dim=1) if len(feats) > 1 else feats[0])]))
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def fpn_backbone(
        model_name: str,
        pretrained: bool = False,
        taps: Union[None, str, Sequence[Union[int, str]]] = None,
        out_channels: int = 256,
        trainable: int = 0,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[type[nn.Module]] = None,
        neck: str = 'auto',
        **model_kwargs,
) -> DiffusionFPN:
    """A torchvision detection backbone (module with `out_channels`, returning an OrderedDict of pyramid maps).

    Args:
        model_name: a diffbackbone timm model (`cleandift_sd21`, `sd15`, `pixart_sigma_512`, `flux`, ...).
        pretrained: load the weights from the Hub (see the README for overrides).
        taps: taps to feed the pyramid (names, indices or a preset). Default: the model's 'pyramid' preset for
            the FPN; for a diffusion transformer the deepest of them, its last block (ViTDet's choice); for a
            multi-model backbone (`ours_xl_t`, `multi_diffusion`) its `multi` map, through the simple pyramid.
            Several taps of one stride are concatenated along channels before the simple pyramid.
        out_channels: channels of the pyramid maps.
        trainable: denoiser blocks trained (UNet blocks, transformer blocks), counted back from the deepest block
            that runs (0: backbone frozen, the default; the VAE encoder is always frozen), as torchvision's
            `trainable_layers`; in a multi-model backbone, in every member.
        extra_blocks: extra block after the pyramid (default `LastLevelMaxPool`, the 'pool' map).
        norm_layer: FPN normalisation layer (torchvision's FPN only).
        neck: 'auto' (taps of several strides: torchvision's FPN; of one stride: ViTDet's simple pyramid), 'fpn' or
            'simple'.
        **model_kwargs: passed to `timm.create_model` (e.g. `timestep`, `prompt`, `pretrained_cfg_overlay`).
    """
    if neck not in NECKS:
        raise InputError(f"neck must be one of {', '.join(map(repr, NECKS))}, got {neck!r}.")
    if taps is None and is_multi_model(model_name):
        taps = (MULTI_TAP,)  # the concatenation; its members' taps are many, at repeated strides
    body = timm.create_model(model_name, pretrained=pretrained, features_only=True, out_indices=taps, **model_kwargs)
    inputs = None
    if taps is None and neck != 'fpn' and len(set(body.feature_info.reduction())) == 1:
        inputs = [len(body.feature_info.channels()) - 1]  # the deepest: the blocks up to it run anyway
    return DiffusionFPN(body, out_channels=out_channels, trainable=trainable, extra_blocks=extra_blocks,
                        norm_layer=norm_layer, neck=neck, inputs=inputs)
