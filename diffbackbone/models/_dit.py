"""What the diffusion-transformer backbones (PixArt, FLUX) share: one stride, taps by block, a transformer-only
checkpoint completed from the base repo (VAE encoder, cached prompt embeddings)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from timm.layers import ClassifierHead

from ..errors import InputError
from ._attention import MAP_HOOKS
from ._base import NoisyLatents, TapBackbone, vae_keys
from ._taps import Tap

__all__ = ['DiTBackbone', 'filter_transformer_state_dict', 'dit_cfg']


class DiTBackbone(NoisyLatents, TapBackbone):
    """Base of the transformer backbones. The host sets what `TapBackbone` needs plus `reduction`, `base_repo`,
    `prompt`, `vae_file`, and implements `prompt_tensors(prompt)` (its conditioning buffers for a prompt)."""

    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _init_block_taps(self, all_taps: list[Tap], num_classes: int, global_pool: str, drop_rate: float,
                         attn_maps: str = 'reduced') -> None:
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
        self.all_taps = all_taps
        self.taps = [t for t in all_taps if t.location == f'vit-block{t.order}-out']
        n = len(self.taps)
        levels = sorted({max(0, (n * (i + 1)) // 4 - 1) for i in range(4)})  # fewer than 4 blocks: each one once
        self.presets = {'pyramid': tuple(self.taps[k].name for k in levels),
                        'blocks': tuple(t.name for t in self.taps)}
        self.feature_info = [t.info() for t in self.taps]
        self._deepest: Optional[int] = None
        self.head_tap = n - 1
        self.num_features = self.head_hidden_size = self.taps[-1].num_chs
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def _check_size(self, size: torch.Size) -> None:
        if any(s % self.reduction or s < 2 * self.reduction for s in size):
            raise InputError(f'Image sides must be multiples of {self.reduction} px (2x2 patches on the 8x latent) and '
                             f'at least {2 * self.reduction}, got {tuple(size)}. Resize the images.')

    def _take_into_feature_info(self, take: Sequence[Tap]) -> None:
        """Selected inner activations join `feature_info` (one stride: in execution order)."""
        extra = [t for t in take if t not in self.taps]
        if extra:
            head = self.taps[self.head_tap]
            self.__dict__.pop('_resolved', None)
            self.taps = sorted(self.taps + extra, key=lambda t: t.seq)
            self.feature_info = [t.info() for t in self.taps]
            self.head_tap = self.taps.index(head)

    def fill_missing_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add what a transformer-only checkpoint lacks: VAE encoder and prompt embeddings from `base_repo`."""
        from .. import hub

        if not any(k.startswith('vae.') for k in state_dict):
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no VAE and the model has no base_repo to take it from.')
            path = hub.download(self.base_repo, self.vae_file, what='VAE')
            state_dict.update(vae_keys(hub.load_safetensors(path, what='VAE')))
        if 'prompt_embeds' not in state_dict:
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no prompt embedding and the model has no base_repo.')
            state_dict.update(self.prompt_tensors(self.prompt or ''))
        return state_dict


def filter_transformer_state_dict(state_dict: dict[str, torch.Tensor], model: DiTBackbone,
                                  buffers: Sequence[str], skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Map a diffusers transformer state dict (or our own) onto `model`: diffusers keys go under `transformer.`, keys
    starting with `skip` (an output head that is not built) are dropped, VAE and prompt buffers are filled in, and
    the result must hold exactly the model's keys."""
    from ..hub import HubError  # a RuntimeError: what timm users catch for a bad checkpoint

    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not k.startswith(('transformer.', 'vae.', 'head.')) and k not in buffers:
            k = 'transformer.' + k  # diffusers layout
        if skip and k.startswith(tuple('transformer.' + s for s in skip)):
            continue
        out[k] = v
    out = model.fill_missing_weights(out)
    expected = {k for k in model.state_dict() if not k.startswith('head.')}
    got = {k for k in out if not k.startswith('head.')}
    if expected != got:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise HubError(f'Checkpoint does not match {type(model).__name__}: {len(missing)} missing keys '
                       f'{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}.')
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
