"""What the diffusion-transformer backbones (PixArt, FLUX, SD3, HunyuanDiT) share: one stride, taps by block, the
image-to-image noise of Meng et al.'s pipelines, a transformer-only checkpoint's keys."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from ._attention import MAP_HOOKS
from ._base import DiffusionBackbone
from ._options import HeadConfig, InputConfig, NoiseConfig, PromptConfig, SourceConfig
from ._taps import Tap

__all__ = ['DiTBackbone', 'block_taps', 'filter_transformer_state_dict', 'dit_cfg']


class DiTBackbone(DiffusionBackbone):
    """Base of the transformer backbones: the denoiser is `transformer`, every map has the stride `reduction`, and
    the one transformer call runs at `noise_scales` (the first step the image-to-image strength keeps)."""

    transformer: nn.Module
    reduction: int
    noise_scales: tuple[float, float]
    block_list: str = 'transformer_blocks'  # the transformer's ModuleList of blocks
    stem: str = 'pos_embed'  # regex of the transformer's modules before the blocks

    def __init__(self, vae_cfg: dict, noise_cfg: NoiseConfig, prompt_cfg: PromptConfig,
                 source_cfg: SourceConfig, input_cfg: InputConfig):
        """
        Args:
            vae_cfg: `VAEEncoder` arguments.
            noise_cfg: `timestep` is Meng et al.'s t (default 50). The families that run an image-to-image pipeline
                (`Img2ImgNoiseConfig`) cut a schedule of `num_inference_steps` by the strength t / 1000; the one
                transformer call runs at the first step kept.
            prompt_cfg, source_cfg, input_cfg: the shared options (`_options.py`); `head_cfg` (the family's) too.
        """
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg, clean=False, latent='sample')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=rf'^vae\.|^transformer\.(?:{self.stem})', blocks=rf'^transformer\.{self.block_list}\.(\d+)')

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the transformer blocks after the deepest selected tap; return the selection as `feature_info` indices."""
        def keep(deepest: int) -> None:
            blocks = getattr(self.transformer, self.block_list)
            setattr(self.transformer, self.block_list, nn.ModuleList(list(blocks)[:deepest + 1]))
        return self._prune_blocks(indices, prune_head, keep)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def noise_level(self, z: torch.Tensor) -> tuple[float, float]:
        return self.noise_scales

    def _init_block_taps(self, all_taps: list[Tap], head_cfg: HeadConfig, attn_maps: str = 'reduced') -> None:
        """Taps and head: `feature_info` lists the block outputs `vit-block{k}-out` (block k is stage k), `pyramid` is
        four evenly spaced ones for a multi-level neck (each block once for a model of fewer than four), and the
        classifier reads the last. With `attn_maps='full'` the map taps are the unreduced probabilities (B, heads, N,
        keys): their `num_chs` is the head count."""
        if attn_maps not in ('reduced', 'full'):
            raise InputError(f"attn_maps must be 'reduced' (maps over the token grid, see `diffbackbone taps MODEL "
                             f"--all`) or 'full' (unreduced (B, heads, N, keys) probabilities), got {attn_maps!r}.")
        self.attn_maps = attn_maps
        if attn_maps == 'full':
            all_taps = [dataclasses.replace(t, num_chs=self.get_submodule(t.module).heads) if t.hook in MAP_HOOKS
                        else t for t in all_taps]
        taps, presets = block_taps(all_taps)
        self._init_taps(all_taps, taps, presets, head_cfg)

    def _check_size(self, size: torch.Size) -> None:
        if any(s % self.reduction or s < 2 * self.reduction for s in size):
            raise InputError(f'Image sides must be multiples of {self.reduction} px (2x2 patches on the 8x latent) and '
                             f'at least {2 * self.reduction}, got {tuple(size)}. Resize the images.')

    def _prune_blocks(self, indices, prune_head: bool, keep: callable) -> list[int]:
        """`prune_intermediate_layers` of a transformer: selected inner activations join `feature_info` (one stride:
        execution order), `keep(deepest)` drops the blocks after the deepest selected one."""
        take = self._resolve(indices)
        self._add_to_feature_info(take, key=lambda t: t.seq)
        deepest = self._deepest_wanted(take, prune_head)
        keep(deepest)
        return self._pruned(take, deepest, prune_head)


def block_taps(all_taps: Sequence[Tap]) -> tuple[list[Tap], dict[str, tuple[str, ...]]]:
    """The `feature_info` taps of a transformer (the block outputs `vit-block{k}-out`, block k being stage k) and its
    presets: `pyramid`, four evenly spaced block outputs (each block once for a model of fewer than four), `blocks`."""
    taps = [t for t in all_taps if t.location == f'vit-block{t.order}-out']
    n = len(taps)
    levels = sorted({max(0, (n * (i + 1)) // 4 - 1) for i in range(4)})  # fewer than 4 blocks: each one once
    return taps, {'pyramid': tuple(taps[k].name for k in levels), 'blocks': tuple(t.name for t in taps)}


def filter_transformer_state_dict(state_dict: dict[str, torch.Tensor], buffers: Sequence[str],
                                  skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Map a diffusers transformer state dict (or our own) onto a transformer backbone's keys: diffusers keys go under
    `transformer.`, keys starting with `skip` (an output head that is not built) are dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not k.startswith(('transformer.', 'vae.', 'head.')) and k not in buffers:
            k = 'transformer.' + k  # diffusers layout
        if skip and k.startswith(tuple('transformer.' + s for s in skip)):
            continue
        out[k] = v
    return out


MENG_ET_AL = dict(origin_url='https://github.com/Darkbblue/generic-diffusion-feature',
                  paper_name='Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
                  paper_ids='arXiv:2410.03558')


def dit_cfg(**kwargs) -> dict:
    """The pretrained cfg every diffusion transformer shares (1024 px, [-1, 1] input, weights in `transformer/`)."""
    return {
        'num_classes': 0, 'input_size': (3, 1024, 1024), 'min_input_size': (3, 32, 32), 'pool_size': (64, 64),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'vae.encoder.conv_in', 'classifier': 'head.fc',
        'hf_hub_filename': 'transformer/diffusion_pytorch_model.safetensors', **MENG_ET_AL, **kwargs,
    }
