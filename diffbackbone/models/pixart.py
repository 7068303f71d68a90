""" PixArt-alpha / PixArt-Sigma diffusion transformers as timm backbones (noisy extraction as Meng et al. do it).

PixArt-alpha - https://arxiv.org/abs/2310.00426, PixArt-Sigma - https://arxiv.org/abs/2403.04692 (weights
`PixArt-alpha/*` on the Hub). Taps by the names of Meng et al. (NeurIPS 2024, github
Darkbblue/generic-diffusion-feature).
Noise, taps, prompts and attention maps: docs/models.md#diffusion-transformers-pixart, docs/fidelity.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMScheduler, PixArtTransformer2DModel
from timm.models import generate_default_cfgs, register_model

from ._attention import ActivationRecorder
from ._dit import DiTBackbone, dit_cfg, filter_transformer_state_dict
from ._base import per_latent
from ._builder import build_diffusion_model
from ._options import HeadConfig, InputConfig, NoiseConfig, PromptConfig, SourceConfig
from ._vae import VAE_SD, VAE_SDXL, VAE_TEST
from ._taps import Tap, _TableBuilder
from .conditioning.text import encode_t5_prompt, uncached_prompt_files

__all__ = ['PixArtBackbone', 'checkpoint_filter_fn', 'pixart_taps']

# transformer/config.json of the Hub repos.
_PIXART_SIGMA = dict(
    sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
    patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type='ada_norm_single',
    norm_elementwise_affine=False, norm_eps=1e-6, activation_fn='gelu-approximate', attention_bias=True,
    num_embeds_ada_norm=1000, use_additional_conditions=False, interpolation_scale=2)
_PIXART_SIGMA_512 = dict(_PIXART_SIGMA, sample_size=64, interpolation_scale=1)
_PIXART_ALPHA_512 = dict(_PIXART_SIGMA_512)  # same transformer; T5 prompts of 120 tokens, SD's VAE
_PIXART_TEST = dict(_PIXART_SIGMA, sample_size=8, num_layers=4, num_attention_heads=2, attention_head_dim=8,
                    cross_attention_dim=16, caption_channels=32, norm_num_groups=8, interpolation_scale=1)
# PixArt's training noise schedule (scheduler/scheduler_config.json).
_SCHEDULER_PIXART = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear')
_HEAD_KEYS = ('proj_out.', 'scale_shift_table')


def pixart_taps(transformer: PixArtTransformer2DModel, reduction: int, tokens: int) -> list[Tap]:
    """Every tap of a PixArt transformer (under `transformer.`) in execution order, with Meng et al.'s names; block k
    is stage k. (Maps: `tokens` channels for `-cross-map`, heads for `-self-map`.)"""
    table = _TableBuilder('', tokens=tokens)
    table.transformer('vit', transformer, 'transformer', reduction, stage_per_block=True)
    return table.taps


class PixArtBackbone(DiTBackbone):
    """VAE encoder + PixArt transformer as a backbone: every block's activations are taps, all at stride 16."""

    stem = 'pos_embed|adaln_single|caption_projection'

    def __init__(
            self,
            transformer_cfg: dict,
            vae_cfg: dict,
            noise_cfg: NoiseConfig = NoiseConfig(),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: SourceConfig = SourceConfig(),
            head_cfg: HeadConfig = HeadConfig(),
            input_cfg: InputConfig = InputConfig(),
            max_tokens: int = 300,
            attn_maps: str = 'reduced',
    ):
        """
        Args:
            transformer_cfg: diffusers `PixArtTransformer2DModel` config.
            vae_cfg: `VAEEncoder` arguments.
            noise_cfg: `timestep` is Meng et al.'s t (default 50), the one transformer call's timestep.
            prompt_cfg, source_cfg, head_cfg, input_cfg: the shared options (`_options.py`).
            max_tokens: T5 sequence length (Sigma 300, alpha 120).
            attn_maps: 'reduced' (map taps as `_attention.MAP_REDUCTIONS` says) or 'full' (unreduced
                probabilities, (B, heads, N, N) / (B, heads, N, tokens): 1 GiB / 75 MiB per image and map for
                PixArt-Sigma at 1024 px in float32).
        """
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg)
        t = 50 if self.noise_cfg.timestep is None else int(self.noise_cfg.timestep)
        self.transformer = PixArtTransformer2DModel(**transformer_cfg)
        tr = self.transformer
        tr.norm_out = tr.proj_out = tr.scale_shift_table = None  # output head: back to noise space, no tap needs it
        self.patch = tr.config.patch_size
        self.reduction = self.vae.reduction * self.patch
        self.register_buffer('prompt_embeds', torch.zeros(1, max_tokens, tr.config.caption_channels))
        self.register_buffer('prompt_mask', torch.zeros(1, max_tokens))
        self.register_buffer('timestep', torch.tensor(t), persistent=False)
        with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
            alphas_cumprod = DDPMScheduler(**_SCHEDULER_PIXART).alphas_cumprod
        self.noise_scales = (alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item())

        self._init_block_taps(pixart_taps(tr, self.reduction, max_tokens), head_cfg, attn_maps)

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.transformer_features(z, taps)

    def transformer_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """{tap name: map} of the transformer on (noised) latents `z`, stopping after the deepest of `taps`."""
        tr, n = self.transformer, z.shape[0]
        deepest = max(t.order for t in taps)
        h = tr.pos_embed(z)
        t_emb, _ = tr.adaln_single(self.timestep.expand(n), None, batch_size=n, hidden_dtype=h.dtype)
        embeds, mask = self._prompt_override or (self.prompt_embeds, self.prompt_mask)  # per image: use_prompts
        ctx = per_latent(tr.caption_projection(embeds.to(h.dtype)), n)
        bias = per_latent(((1 - mask.to(h.dtype)) * -10000.0).unsqueeze(1), n)
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        with ActivationRecorder(self, taps, full_maps=self.attn_maps == 'full') as rec:
            rec.set_size('transformer', (z.shape[-2] // self.patch, z.shape[-1] // self.patch))
            for k, block in enumerate(tr.transformer_blocks):
                h = self._run(block, h, None, ctx, bias, t_emb)
                self._record(feats, by_loc, rec.drain())
                if k >= deepest:
                    break
        return feats

    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's conditioning buffers for `prompt` (T5 embedding and mask of the lower-cased, stripped prompt),
        encoded once and cached."""
        return encode_t5_prompt(self.base_repo, prompt, self.prompt_embeds.shape[1])

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text encoders `prompt_tensors(prompt)` loads ([] when its embedding is cached)."""
        return uncached_prompt_files('t5', self.base_repo, prompt, self.prompt_embeds.shape[1])



def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: PixArtBackbone) -> dict[str, torch.Tensor]:
    """Map a diffusers `PixArtTransformer2DModel` state dict (or our own) onto the model's keys."""
    return filter_transformer_state_dict(state_dict, ('prompt_embeds', 'prompt_mask'), skip=_HEAD_KEYS)


def _create_pixart(variant: str, pretrained: bool = False, **kwargs) -> PixArtBackbone:
    return build_diffusion_model(PixArtBackbone, variant, pretrained, checkpoint_filter_fn, ('transformer_cfg', 'vae_cfg'),
                          **kwargs)


def _cfg(**kwargs) -> dict:
    return dit_cfg(**{'license': 'openrail++', **kwargs})


default_cfgs = generate_default_cfgs({
    'pixart_sigma.1024_ms': _cfg(hf_hub_id='PixArt-alpha/PixArt-Sigma-XL-2-1024-MS'),
    'pixart_sigma_512.512_ms': _cfg(hf_hub_id='PixArt-alpha/PixArt-Sigma-XL-2-512-MS', input_size=(3, 512, 512),
                                    pool_size=(32, 32)),
    'pixart_alpha.512': _cfg(hf_hub_id='PixArt-alpha/PixArt-XL-2-512x512', input_size=(3, 512, 512),
                             pool_size=(32, 32)),
    'test_pixart.tiny': _cfg(hf_hub_id='diffbackbone/test-pixart', input_size=(3, 128, 128), pool_size=(8, 8)),
})


@register_model
def pixart_sigma(pretrained: bool = False, **kwargs) -> PixArtBackbone:
    """PixArt-Sigma XL/2 1024 px (SDXL's VAE, T5 prompts of 300 tokens), noisy at t=50 as Meng et al."""
    model_args = dict(transformer_cfg=_PIXART_SIGMA, vae_cfg=VAE_SDXL, max_tokens=300,
                      base_repo='PixArt-alpha/PixArt-Sigma-XL-2-1024-MS')
    return _create_pixart('pixart_sigma', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pixart_sigma_512(pretrained: bool = False, **kwargs) -> PixArtBackbone:
    """PixArt-Sigma XL/2 512 px."""
    model_args = dict(transformer_cfg=_PIXART_SIGMA_512, vae_cfg=VAE_SDXL, max_tokens=300,
                      base_repo='PixArt-alpha/PixArt-Sigma-XL-2-512-MS')
    return _create_pixart('pixart_sigma_512', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pixart_alpha(pretrained: bool = False, **kwargs) -> PixArtBackbone:
    """PixArt-alpha XL/2 512 px (SD's VAE, T5 prompts of 120 tokens)."""
    model_args = dict(transformer_cfg=_PIXART_ALPHA_512, vae_cfg=VAE_SD, max_tokens=120,
                      base_repo='PixArt-alpha/PixArt-XL-2-512x512')
    return _create_pixart('pixart_alpha', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_pixart(pretrained: bool = False, **kwargs) -> PixArtBackbone:
    """Tiny random-weight PixArt layout, for tests."""
    model_args = dict(transformer_cfg=_PIXART_TEST, vae_cfg=VAE_TEST, max_tokens=8, base_repo='diffbackbone/test-pixart')
    return _create_pixart('test_pixart', pretrained=pretrained, **dict(model_args, **kwargs))
