""" DiTF: FLUX features with AdaLN modulation and massive-channel discard, as timm models.

Diffusion Transformer Features (DiTF) - https://arxiv.org/abs/2505.18584 (Gan et al., NeurIPS 2025),
code https://github.com/ganchaofan0000/DiTF (read for the method; written here from scratch).
Their extraction, the `vit-block{k}-in-mod` taps and presets:
docs/models.md#ditf-flux-features-without-massive-activations; settings and departures: docs/fidelity.md#ditf.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._builder import build_diffusion_model
from ._options import (
    HeadConfig,
    Img2ImgNoiseConfig,
    InputConfig,
    NoiseConfig,
    PromptConfig,
    SourceConfig,
    check_timestep,
)
from .flux import _FLUX_DEV, _FLUX_TEST, _SCHEDULER_DEV, _VAE_FLUX, _VAE_TEST_FLUX, FluxBackbone, checkpoint_filter_fn
from .flux import _cfg as _flux_cfg
from ._taps import Tap

__all__ = ['DiTFFlux', 'ditf_modulate', 'MASSIVE_CHANNELS_FLUX_DEV', 'DAVIS_PROMPT', 'PRESET_SETTINGS']

MASSIVE_CHANNELS_FLUX_DEV = (154, 1446)  # their eval_spair.py / eval_davis.py, for FLUX.1 [dev]
DAVIS_PROMPT = 'a photo of a image'  # eval_davis.py calls Featurizer4Eval.forward without a caption: its default
# Model arguments of their run of each preset (eval_spair.sh, eval_davis.sh); the SPair caption is per image.
PRESET_SETTINGS = {
    'ditf': dict(timestep=260, ensemble=8),
    'ditf_davis': dict(timestep=90, ensemble=1, prompt=DAVIS_PROMPT),
}


def ditf_modulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  massive_channels: Sequence[int] = ()) -> torch.Tensor:
    """DiTF's feature from a block's input map (B, C, h, w) and its AdaLN (shift, scale) (B, C): massive channels set
    to 0, layer norm over channels (no affine, eps 1e-6), then (1 + scale) * x + shift."""
    x = tokens.float().permute(0, 2, 3, 1)
    if massive_channels:
        keep = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
        keep[list(massive_channels)] = 0
        x = x * keep
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    x = x * (1 + scale.float()[:, None, None]) + shift.float()[:, None, None]
    return x.permute(0, 3, 1, 2).to(tokens.dtype)


class DiTFFlux(FluxBackbone):
    """FLUX with DiTF's noise (one pass at sigma = t / 1000) and its modulated taps `vit-block{k}-in-mod`."""

    def __init__(
            self,
            transformer_cfg: dict,
            vae_cfg: dict,
            scheduler_cfg: dict,
            noise_cfg: NoiseConfig = NoiseConfig(timestep=260, ensemble=8),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: SourceConfig = SourceConfig(),
            head_cfg: HeadConfig = HeadConfig(),
            input_cfg: InputConfig = InputConfig(),
            guidance: float = 3.5,
            massive_channels: Sequence[int] = MASSIVE_CHANNELS_FLUX_DEV,
            max_tokens: int = 512,
    ):
        """
        Args:
            noise_cfg: `timestep` t: the latent is noised to sigma = t / 1000 (theirs: 260 for SPair, 90 for DAVIS);
                `ensemble`: noise draws whose block inputs are averaged before the modulation (theirs: 8).
            guidance: guidance scale the dev model is told (theirs: 3.5).
            massive_channels: channels set to 0 before the layer norm (their "channel discard"; () to keep them).
            Other arguments: as `FluxBackbone` (one pass: no `num_inference_steps`).
        """
        t = int(check_timestep(260 if noise_cfg.timestep is None else noise_cfg.timestep, whole=True))
        if t == 0:
            raise InputError('DiTF adds noise at sigma = t / 1000: timestep must be at least 1.')
        noise = Img2ImgNoiseConfig(**{**dataclasses.asdict(noise_cfg), 'timestep': t, 'num_inference_steps': 28})
        super().__init__(transformer_cfg, vae_cfg, scheduler_cfg, noise, prompt_cfg, source_cfg, head_cfg, input_cfg,
                         guidance=guidance, max_tokens=max_tokens)
        self.ditf_timestep = t
        width = self.transformer.inner_dim
        bad = [c for c in massive_channels if not 0 <= int(c) < width]
        if bad:
            raise InputError(f'massive_channels {bad} are outside the {width} channels of this transformer.')
        self.massive_channels = tuple(int(c) for c in massive_channels)
        n_double = len(self.transformer.transformer_blocks)
        n_blocks = n_double + len(self.transformer.single_transformer_blocks)
        by_name = {t.name: t for t in self.all_taps}
        last_seq = max(t.seq for t in self.all_taps)
        extra = []
        for k in range(n_double, n_blocks):
            src = by_name[f'vit-block{k - 1}-out']
            extra.append(dataclasses.replace(
                src, name=f'vit-block{k}-in-mod', location=f'vit-block{k}-in-mod', order=k, aliases=(), base=False,
                module=f'transformer.single_transformer_blocks.{k - n_double}.norm', seq=last_seq + 1 + k))
        self.all_taps = self.all_taps + extra
        self._mod_source = {t.name: by_name[f'vit-block{t.order - 1}-out'] for t in extra}
        if n_blocks > 28:
            self.presets.update(ditf=('vit-block28-in-mod',), ditf_davis=('vit-block24-in-mod',),
                                pyramid=tuple(f'vit-block{k}-in-mod' for k in (20, 24, 28)))
        else:  # tiny test layouts: the last block, the first, and every one
            self.presets.update(ditf=(extra[-1].name,), ditf_davis=(extra[0].name,),
                                pyramid=tuple(t.name for t in extra))

    def schedule(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass at sigma = t / 1000 (their `t = timestep / 1000`), no shift: (timesteps, sigmas)."""
        sigma = self.ditf_timestep / 1000
        return torch.tensor([float(self.ditf_timestep)]), torch.tensor([sigma, 0.0])

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        mods = [t for t in wanted if t.name in self._mod_source]
        if not mods:
            return super()._extract(x, wanted)
        sink, self._tap_sink = self._tap_sink, None  # stream_taps: the modulated maps need their sources, so no
        if sink is not None:                          # streaming here; each map is handed on at the end
            try:
                maps = self._extract(x, wanted)
            finally:
                self._tap_sink = sink
            for name, m in maps.items():
                sink(name, m)
            return {}
        sources = [self._mod_source[t.name] for t in mods]
        base = [t for t in wanted if t not in mods]
        base += [s for s in dict.fromkeys(sources) if s not in base]
        feats = super()._extract(x, base)  # ensemble-averaged block inputs
        shift_scale = self._modulation([t.order for t in mods], x)
        out = {t.name: feats[t.name] for t in wanted if t not in mods}
        for t, src in zip(mods, sources):
            shift, scale = shift_scale[t.order]
            out[t.name] = ditf_modulate(feats[src.name], shift, scale, self.massive_channels)
        return out

    def _modulation(self, blocks: Sequence[int], x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(shift, scale) of each single-stream block's AdaLN for each image (its prompt's pooled embedding)."""
        tr, n_double = self.transformer, len(self.transformer.transformer_blocks)
        _, pooled = self._prompt_override or (self.prompt_embeds, self.pooled_prompt_embeds)
        dtype = tr.x_embedder.weight.dtype
        pooled = pooled.to(x.device, dtype).expand(x.shape[0], -1) if pooled.shape[0] == 1 else pooled.to(x.device,
                                                                                                            dtype)
        t = torch.full((x.shape[0],), float(self.ditf_timestep), device=x.device, dtype=dtype)  # sigma * 1000
        if tr.config.guidance_embeds:
            g = torch.full((x.shape[0],), self.guidance * 1000, device=x.device, dtype=dtype)
            temb = tr.time_text_embed(t, g, pooled)
        else:
            temb = tr.time_text_embed(t, pooled)
        out = {}
        for k in blocks:
            norm = tr.single_transformer_blocks[k - n_double].norm
            shift, scale, _ = norm.linear(norm.silu(temb)).chunk(3, dim=1)
            out[k] = (shift, scale)
        return out


def _create_ditf(variant: str, pretrained: bool = False, **kwargs) -> DiTFFlux:
    return build_diffusion_model(DiTFFlux, variant, pretrained, checkpoint_filter_fn,
                          ('transformer_cfg', 'vae_cfg', 'scheduler_cfg'), **kwargs)


_DITF = dict(origin_url='https://github.com/ganchaofan0000/DiTF', paper_ids='arXiv:2505.18584',
             paper_name='Diffusion Transformers as Open-World Spatiotemporal Foundation Models')

default_cfgs = generate_default_cfgs({
    'ditf_flux.dev': _flux_cfg(hf_hub_id='black-forest-labs/FLUX.1-dev', license='flux-1-dev-non-commercial-license',
                               input_size=(3, 640, 640), pool_size=(40, 40), **_DITF),
    'test_ditf_flux.tiny': _flux_cfg(hf_hub_id='diffbackbone/test-flux', input_size=(3, 128, 128), pool_size=(8, 8),
                                     license='apache-2.0', **_DITF),
})


@register_model
def ditf_flux(pretrained: bool = False, **kwargs) -> DiTFFlux:
    """DiTF on FLUX.1 [dev]: t = 260, 8 draws, guidance 3.5, `ditf` preset = vit-block28-in-mod (SPair);
    `features_only` default: the modulated blocks 20, 24, 28."""
    model_args = dict(transformer_cfg=_FLUX_DEV, vae_cfg=_VAE_FLUX, scheduler_cfg=_SCHEDULER_DEV,
                      base_repo='black-forest-labs/FLUX.1-dev')
    return _create_ditf('ditf_flux', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_ditf_flux(pretrained: bool = False, **kwargs) -> DiTFFlux:
    """Tiny random-weight DiTF FLUX layout for tests (massive channel 3)."""
    model_args = dict(transformer_cfg=_FLUX_TEST, vae_cfg=_VAE_TEST_FLUX, scheduler_cfg=_SCHEDULER_DEV, max_tokens=8,
                      base_repo='diffbackbone/test-flux', massive_channels=(3,), ensemble=2)
    return _create_ditf('test_ditf_flux', pretrained=pretrained, **dict(model_args, **kwargs))
