""" Stable Diffusion 3.5 Medium (MMDiT-X) as a timm backbone (noisy extraction in the manner of Meng et al.).

"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (Esser et al., ICML 2024);
`stabilityai/stable-diffusion-3.5-medium` on the Hub (gated). Taps named as Meng et al.'s FLUX taps. Noise, taps and
text embeddings: docs/models.md#stable-diffusion-35-medium, docs/fidelity.md#sd35-medium.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._attention import ActivationRecorder
from ._base import per_latent
from ._builder import build_diffusion_model
from ._options import HeadConfig, Img2ImgNoiseConfig, InputConfig, PromptConfig, SourceConfig
from ._vae import VAE_TEST
from ._dit import DiTBackbone, dit_cfg, filter_transformer_state_dict
from ._taps import Tap, _ffn_inner_chs, _TableBuilder
from .conditioning.text import encode_sd3_prompt, uncached_prompt_files

__all__ = ['SD3Backbone', 'checkpoint_filter_fn', 'sd3_taps']

# transformer/config.json of stabilityai/stable-diffusion-3.5-medium.
_SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm='rms_norm')
# Tiny: dual attention in blocks 0-1, block 3 is the last (context_pre_only) one, as at full size; four blocks for
# the four-map 'pyramid'.
_SD3_TEST = dict(_SD35_MEDIUM, sample_size=8, num_layers=4, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                 dual_attention_layers=(0, 1))
# vae/config.json: 16 latent channels, no quant_conv, latents shifted then scaled.
_VAE_SD3 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)
_VAE_TEST_SD3 = dict(VAE_TEST, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)
# scheduler/scheduler_config.json: a fixed shift, no dependence on the image size.
_SCHEDULER_SD3 = dict(num_train_timesteps=1000, shift=3.0)
_HEAD_KEYS = ('norm_out.', 'proj_out.')


def sd3_taps(transformer: SD3Transformer2DModel, reduction: int, tokens: int, prefix: str = 'transformer') -> list[Tap]:
    """Every tap of an SD3 transformer in execution order, named as Meng et al. name FLUX's; block k is stage k."""
    tb = _TableBuilder('', tokens)
    dim = transformer.inner_dim
    for k, block in enumerate(transformer.transformer_blocks):
        tb.stage = k
        b, m = f'vit-block{k}', f'{prefix}.transformer_blocks.{k}'
        for p in ('q', 'k', 'v'):
            tb.add(f'{b}-{p}', dim, reduction, f'{m}.attn.to_{p}', p)
        tb.add(f'{b}-attn-out', dim, reduction, f'{m}.attn.to_out.0', 'tokens')
        if block.use_dual_attention:
            for p in ('q', 'k', 'v'):
                tb.add(f'{b}-attn2-{p}', dim, reduction, f'{m}.attn2.to_{p}', p)
            tb.add(f'{b}-attn2-out', dim, reduction, f'{m}.attn2.to_out.0', 'tokens')
        tb.add(f'{b}-norm-out', dim, reduction, f'{m}.ff', 'input')
        tb.add(f'{b}-ffn-inner', _ffn_inner_chs(block.ff), reduction, f'{m}.ff.net.0', 'tokens')
        tb.add(f'{b}-out', dim, reduction, m, 'tokens@1')  # blocks return (text, image)
    return tb.taps


class SD3Backbone(DiTBackbone):
    """VAE encoder + SD3 MMDiT transformer as a backbone: every block's activations are taps, all at stride 16."""

    stem = 'pos_embed|time_text_embed|context_embedder'

    def __init__(
            self,
            transformer_cfg: dict,
            vae_cfg: dict,
            scheduler_cfg: dict,
            noise_cfg: Img2ImgNoiseConfig = Img2ImgNoiseConfig(),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: SourceConfig = SourceConfig(),
            head_cfg: HeadConfig = HeadConfig(),
            input_cfg: InputConfig = InputConfig(),
            max_tokens: int = 256,
    ):
        """
        Args:
            transformer_cfg: diffusers `SD3Transformer2DModel` config.
            vae_cfg: `VAEEncoder` arguments.
            scheduler_cfg: diffusers `FlowMatchEulerDiscreteScheduler` config of the base repo.
            noise_cfg, prompt_cfg, source_cfg, head_cfg, input_cfg: as `DiTBackbone`.
            max_tokens: T5 sequence length (the pipeline's 256); the context is 77 CLIP tokens + these.
        """
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg)
        _, self.t_start = self.noise_cfg.start()  # StableDiffusion3Img2ImgPipeline.get_timesteps
        num_inference_steps = self.num_inference_steps = self.noise_cfg.num_inference_steps
        self.scheduler_cfg = scheduler_cfg
        self.transformer = SD3Transformer2DModel(**transformer_cfg)
        tr = self.transformer
        tr.norm_out = tr.proj_out = None  # output head: back to velocity space, no tap needs it
        self.patch = tr.config.patch_size
        self.reduction = self.vae.reduction * self.patch
        self.max_side = tr.config.pos_embed_max_size * self.reduction  # PatchEmbed crops its position table
        with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
            scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_cfg)
            scheduler.set_timesteps(num_inference_steps, device='cpu')
        self.sigma = scheduler.sigmas[self.t_start].item()
        self.noise_scales = (1.0 - self.sigma, self.sigma)  # FlowMatchEulerDiscreteScheduler.scale_noise
        self.register_buffer('timestep', torch.tensor(scheduler.timesteps[self.t_start].item()), persistent=False)
        self.register_buffer('prompt_embeds', torch.zeros(1, 77 + max_tokens, tr.config.joint_attention_dim))
        self.register_buffer('pooled_prompt_embeds', torch.zeros(1, tr.config.pooled_projection_dim))

        self._init_block_taps(sd3_taps(tr, self.reduction, 77 + max_tokens), head_cfg)

    def _check_size(self, size: torch.Size) -> None:
        super()._check_size(size)
        if max(size) > self.max_side:
            raise InputError(f'Image sides must be at most {self.max_side} px (the transformer\'s position table has '
                             f'{self.transformer.config.pos_embed_max_size} patches a side), got {tuple(size)}. '
                             'Resize the images.')

    # --- forward ------------------------------------------------------------------------------------------------------
    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.transformer_features(z, taps)

    def transformer_features(self, z: torch.Tensor, taps: Sequence[Tap],
                             timestep: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{tap name: map} of the transformer on noised latents `z` (B, 16, h, w), as `SD3Transformer2DModel.forward`
        runs its blocks, stopping after the deepest of `taps`. `timestep` (0-1000, one per latent) overrides the
        model's."""
        tr, n = self.transformer, z.shape[0]
        deepest = max(t.order for t in taps)
        h = tr.pos_embed(z).contiguous()
        embeds, pooled = self._prompt_override or (self.prompt_embeds, self.pooled_prompt_embeds)
        t = (self.timestep if timestep is None else timestep).to(h.dtype).expand(n)
        temb = tr.time_text_embed(t, per_latent(pooled.to(h.dtype), n))
        ctx = tr.context_embedder(per_latent(embeds.to(h.dtype), n))
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        with ActivationRecorder(self, taps) as rec:
            rec.set_size('transformer', (z.shape[-2] // self.patch, z.shape[-1] // self.patch))
            for k, block in enumerate(tr.transformer_blocks):
                ctx, h = self._run(block, h, ctx, temb)
                self._record(feats, by_loc, rec.drain())
                if k >= deepest:
                    break
        return feats

    # --- weights ------------------------------------------------------------------------------------------------------
    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's conditioning buffers for `prompt` (CLIP-L + CLIP-G + T5 tokens, pooled CLIPs), cached."""
        return encode_sd3_prompt(self.base_repo, prompt, self.prompt_embeds.shape[1] - 77)

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text encoders `prompt_tensors(prompt)` loads ([] when its embedding is cached)."""
        return uncached_prompt_files('sd3', self.base_repo, prompt, self.prompt_embeds.shape[1] - 77)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SD3Backbone) -> dict[str, torch.Tensor]:
    """Map a diffusers `SD3Transformer2DModel` state dict (or our own) onto the model's keys."""
    return filter_transformer_state_dict(state_dict, ('prompt_embeds', 'pooled_prompt_embeds'),
                                         skip=_HEAD_KEYS)


def _create_sd3(variant: str, pretrained: bool = False, **kwargs) -> SD3Backbone:
    return build_diffusion_model(SD3Backbone, variant, pretrained, checkpoint_filter_fn,
                          ('transformer_cfg', 'vae_cfg', 'scheduler_cfg'), **kwargs)


def _cfg(**kwargs) -> dict:
    return dit_cfg(**{'origin_url': 'https://github.com/Stability-AI/sd3.5',
                      'paper_name': 'Scaling Rectified Flow Transformers for High-Resolution Image Synthesis',
                      'paper_ids': 'arXiv:2403.03206', **kwargs})


default_cfgs = generate_default_cfgs({
    'sd35_medium.stabilityai': _cfg(hf_hub_id='stabilityai/stable-diffusion-3.5-medium',
                                    license='stabilityai-ai-community'),
    'test_sd3.tiny': _cfg(hf_hub_id='diffbackbone/test-sd3', input_size=(3, 128, 128), pool_size=(8, 8),
                          license='apache-2.0'),
})


@register_model
def sd35_medium(pretrained: bool = False, **kwargs) -> SD3Backbone:
    """Stable Diffusion 3.5 Medium (2.5B MMDiT-X; gated on the Hub: accept its license and log in first)."""
    model_args = dict(transformer_cfg=_SD35_MEDIUM, vae_cfg=_VAE_SD3, scheduler_cfg=_SCHEDULER_SD3,
                      base_repo='stabilityai/stable-diffusion-3.5-medium')
    return _create_sd3('sd35_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_sd3(pretrained: bool = False, **kwargs) -> SD3Backbone:
    """Tiny random-weight SD3.5 layout (dual attention, last block context-pre-only), for tests."""
    model_args = dict(transformer_cfg=_SD3_TEST, vae_cfg=_VAE_TEST_SD3, scheduler_cfg=_SCHEDULER_SD3, max_tokens=8,
                      base_repo='diffbackbone/test-sd3')
    return _create_sd3('test_sd3', pretrained=pretrained, **dict(model_args, **kwargs))
