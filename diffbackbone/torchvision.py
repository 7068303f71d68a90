"""Diffusion backbones for torchvision's detectors: FasterRCNN, MaskRCNN, RetinaNet, KeypointRCNN.

`fpn_backbone` wraps a timm `features_only` diffusion model with torchvision's own `FeaturePyramidNetwork` (and
`LastLevelMaxPool`), the way `torchvision.models.detection.backbone_utils.BackboneWithFPN` wraps a ResNet:

    from torchvision.models.detection import FasterRCNN
    from diffbackbone.torchvision import fpn_backbone

    backbone = fpn_backbone('cleandift_sd21', pretrained=True)           # taps us9/us6/us3/mid -> FPN '0'..'3', 'pool'
    detector = FasterRCNN(backbone, num_classes=91, image_mean=backbone.image_mean, image_std=backbone.image_std,
                          min_size=512, max_size=768)

Stable Diffusion wants images in [-1, 1]: torchvision's `GeneralizedRCNNTransform` normalises with ImageNet
statistics unless the detector is given `image_mean=backbone.image_mean, image_std=backbone.image_std` (0.5), so pass
them. The default pyramid has four maps (strides 8/16/32/64, plus the max-pooled 'pool' at 128): five levels, as the
detectors' default anchor generators and RoI poolers (feature maps '0'..'3') expect.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .models import DiffusionUNet

__all__ = ['DiffusionFPN', 'fpn_backbone']

SD_MEAN = SD_STD = [0.5, 0.5, 0.5]


def _unet_blocks(model: DiffusionUNet) -> list[nn.Module]:
    """The UNet's blocks that still run after pruning, in execution order (down blocks, mid block, up blocks)."""
    unet = model.unet
    blocks = list(unet.down_blocks)
    if unet.mid_block is not None:
        blocks.append(unet.mid_block)
    return blocks + list(unet.up_blocks)


class DiffusionFPN(nn.Module):
    """A diffusion model's taps through torchvision's FPN: `forward(images) -> OrderedDict[str, Tensor]`.

    Attributes:
        out_channels: channels of every output map (torchvision's detectors read it).
        body: the timm `features_only` model; `fpn`: torchvision's `FeaturePyramidNetwork`.
        image_mean, image_std: the normalisation to give the detector (Stable Diffusion's [-1, 1] input).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, trainable: int = 0,
                 extra_blocks: Optional[ExtraFPNBlock] = None, norm_layer: Optional[type[nn.Module]] = None):
        super().__init__()
        model = body.model if hasattr(body, 'model') else body
        if not isinstance(model, DiffusionUNet):
            raise TypeError(f'fpn_backbone needs a diffbackbone diffusion model, got {type(model).__name__}.')
        blocks = _unet_blocks(model)
        if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= len(blocks):
            raise ValueError(f'trainable must be an int from 0 (frozen backbone, only the FPN trains) to {len(blocks)} '
                             f'(every UNet block that runs for these taps), got {trainable!r}.')
        # torchvision's trainable_layers convention: freeze all, then unfreeze the last `trainable` blocks. The VAE
        # encoder, the time embedding and the learned timestep stay frozen.
        body.requires_grad_(False)
        for block in blocks[len(blocks) - trainable:]:
            block.requires_grad_(True)
        self.trainable = trainable
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(), out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks, norm_layer=norm_layer)
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
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def fpn_backbone(
        model_name: str,
        pretrained: bool = False,
        taps: Union[None, str, Sequence[Union[int, str]]] = None,
        out_channels: int = 256,
        trainable: int = 0,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[type[nn.Module]] = None,
        **model_kwargs,
) -> DiffusionFPN:
    """A torchvision detection backbone (module with `out_channels`, returning an OrderedDict of FPN maps).

    Args:
        model_name: a diffbackbone timm model (`cleandift_sd21`, `sd15`, ...).
        pretrained: load the weights from the Hub (see the README for overrides).
        taps: taps to feed the FPN, fine to coarse (default: the model's 'pyramid' preset); names, indices or a preset.
        out_channels: channels of the FPN maps.
        trainable: UNet blocks trained, counted back from the deepest block that runs (0: backbone frozen, the
            default; the VAE encoder is always frozen), as torchvision's `trainable_layers`.
        extra_blocks: FPN extra block (default `LastLevelMaxPool`, the 'pool' map).
        norm_layer: FPN normalisation layer.
        **model_kwargs: passed to `timm.create_model` (e.g. `timestep`, `prompt`, `pretrained_cfg_overlay`).
    """
    body = timm.create_model(model_name, pretrained=pretrained, features_only=True, out_indices=taps, **model_kwargs)
    return DiffusionFPN(body, out_channels=out_channels, trainable=trainable, extra_blocks=extra_blocks,
                        norm_layer=norm_layer)
