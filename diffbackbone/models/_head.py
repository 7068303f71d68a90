"""`ClassifierHeadMixin`: timm's classifier head API over one map, shared by every backbone here.

The diffusion families (`DiffusionBackbone`, on their head tap) and the compositions of them (`FusedBackbone` on the
fused map, `MultiBackbone` on the concatenated map) hold a timm `ClassifierHead` as `head` and read it the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ClassifierHead

from ._options import HeadConfig

__all__ = ['ClassifierHeadMixin']


class ClassifierHeadMixin:
    """`get_classifier`, `reset_classifier`, `forward_head` and `forward` over `self.head`, the timm `ClassifierHead`
    that `_init_head` builds on the map `forward_features` returns (0 classes: pooling only, or none with pool '')."""

    head: ClassifierHead

    def _init_head(self, num_features: int, head: HeadConfig) -> None:
        """The head on a map of `num_features` channels (`head.head_tap` is the caller's business)."""
        self.num_features = self.head_hidden_size = num_features
        self.num_classes, self.drop_rate = head.num_classes, head.drop_rate
        self.head = ClassifierHead(num_features, head.num_classes, pool_type=head.global_pool,
                                   drop_rate=head.drop_rate)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        from timm.layers import get_device_dtype

        self.num_classes = num_classes
        # a new classifier takes the model's device and dtype (the head holds no parameter to take them from at 0)
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
