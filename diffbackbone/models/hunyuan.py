""" HunyuanDiT as a timm backbone (noisy extraction as Meng et al. do it).

Hunyuan-DiT (Tencent, arXiv:2405.08748; `Tencent-Hunyuan/HunyuanDiT-Diffusers` on the Hub, as Meng et al.'s
`models.py` loads it). Taps by PixArt's names in Meng et al. (NeurIPS 2024, github Darkbblue/generic-diffusion-feature).
Noise, size conditioning and taps: docs/models.md#hunyuandit, docs/fidelity.md#hunyuandit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMScheduler, HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._attention import ActivationRecorder
from ._base import per_latent
from ._builder import build_diffusion_model
from ._options import HeadConfig, Img2ImgNoiseConfig, InputConfig, PromptConfig, SourceConfig
from ._vae import VAE_SDXL, VAE_TEST
from ._dit import DiTBackbone, dit_cfg, filter_transformer_state_dict
from ._taps import Tap, _ffn_inner_chs, _TableBuilder
from .conditioning.text import encode_hunyuan_prompt, uncached_prompt_files

__all__ = ['HunyuanDiTBackbone', 'checkpoint_filter_fn', 'hunyuan_taps']

# transformer/config.json of Tencent-Hunyuan/HunyuanDiT-Diffusers (DiT-g/2, 1.5B).
_HUNYUAN_DIT = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                    activation_fn='gelu-approximate', sample_size=128, hidden_size=1408, num_layers=40,
                    mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024, norm_type='layer_norm',
                    cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256)
_HUNYUAN_TEST = dict(_HUNYUAN_DIT, num_attention_heads=2, attention_head_dim=8, hidden_size=16, sample_size=8,
                     num_layers=6, mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=32,
                     pooled_projection_dim=16, text_len=8, text_len_t5=8)
# scheduler/scheduler_config.json.
_SCHEDULER_HUNYUAN = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule='scaled_linear',
                          prediction_type='v_prediction', clip_sample=False, steps_offset=1,
                          timestep_spacing='leading')
_VAE_TEST_HUNYUAN = dict(VAE_TEST, scaling_factor=0.13025)
_HEAD_KEYS = ('norm_out.', 'proj_out.')
_BUFFERS = ('prompt_embeds', 'prompt_mask', 'prompt_embeds_t5', 'prompt_mask_t5')


def hunyuan_taps(transformer: HunyuanDiT2DModel, reduction: int, prefix: str = 'transformer') -> list[Tap]:
    """Every tap of a HunyuanDiT transformer in execution order, with Meng et al.'s names; block k is stage k.
    A cross-attention map has one channel per prompt token: CLIP's, then mT5's."""
    tb = _TableBuilder('', 0)
    dim, cfg = transformer.inner_dim, transformer.config
    tokens = cfg.text_len + cfg.text_len_t5
    for k, block in enumerate(transformer.blocks):
        tb.stage = k
        b, m = f'vit-block{k}', f'{prefix}.blocks.{k}'
        for p in ('q', 'k', 'v'):
            tb.add(f'{b}-self-{p}', dim, reduction, f'{m}.attn1.to_{p}', p)
        tb.add(f'{b}-self-map', block.attn1.heads, reduction, f'{m}.attn1', 'self-map')
        tb.add(f'{b}-cross-q', dim, reduction, f'{m}.attn2.to_q', 'q')
        tb.add(f'{b}-cross-map', tokens, reduction, f'{m}.attn2', 'cross-map')
        tb.add(f'{b}-ffn-inner', _ffn_inner_chs(block.ff), reduction, f'{m}.ff.net.0', 'tokens')
        tb.add(f'{b}-out', dim, reduction, m, 'tokens')
    return tb.taps


class HunyuanDiTBackbone(DiTBackbone):
    """VAE encoder + HunyuanDiT transformer as a backbone: every block's activations are taps, all at stride 16."""

    block_list = 'blocks'
    stem = 'pos_embed|time_extra_emb|text_embedder|text_embedding_padding'

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
            cond_size: tuple[int, int] = (1024, 1024),
            attn_maps: str = 'reduced',
    ):
        """
        Args:
            transformer_cfg: diffusers `HunyuanDiT2DModel` config.
            vae_cfg: `VAEEncoder` arguments.
            scheduler_cfg: diffusers `DDPMScheduler` config of the base repo.
            noise_cfg, prompt_cfg, source_cfg, head_cfg, input_cfg: as `DiTBackbone`.
            cond_size: (height, width) of the image-size conditioning (`image_meta_size`).
            attn_maps: 'reduced' (map taps as `_attention.MAP_REDUCTIONS` says) or 'full' (unreduced probabilities,
                (B, heads, N, N) / (B, heads, N, tokens), as their processor records them).
        """
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg)
        # the patched pipeline's get_timesteps (SDXL img2img's): int(steps * strength) steps are kept
        _, start = self.noise_cfg.start(whole_steps_kept=True)
        num_inference_steps = self.noise_cfg.num_inference_steps
        self.transformer = HunyuanDiT2DModel(**transformer_cfg)
        tr = self.transformer
        tr.norm_out = tr.proj_out = None  # output head: back to noise space, no tap needs it
        self.patch = tr.config.patch_size
        self.reduction = self.vae.reduction * self.patch
        with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
            scheduler = DDPMScheduler(**scheduler_cfg)
            scheduler.set_timesteps(num_inference_steps, device='cpu')
            step = int(scheduler.timesteps[start])
            alphas_cumprod = scheduler.alphas_cumprod
        self.noise_scales = (alphas_cumprod[step].sqrt().item(), (1 - alphas_cumprod[step]).sqrt().item())
        self.register_buffer('timestep', torch.tensor(float(step)), persistent=False)
        h, w = cond_size
        self.register_buffer('image_meta_size', torch.tensor([[h, w, h, w, 0, 0]], dtype=torch.float32),
                             persistent=False)
        cfg = tr.config
        self.register_buffer('prompt_embeds', torch.zeros(1, cfg.text_len, cfg.cross_attention_dim))
        self.register_buffer('prompt_mask', torch.zeros(1, cfg.text_len))
        self.register_buffer('prompt_embeds_t5', torch.zeros(1, cfg.text_len_t5, cfg.cross_attention_dim_t5))
        self.register_buffer('prompt_mask_t5', torch.zeros(1, cfg.text_len_t5))

        self._init_block_taps(hunyuan_taps(tr, self.reduction), head_cfg, attn_maps)

    # --- forward ------------------------------------------------------------------------------------------------------
    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        if self._prompt_override is not None:
            raise InputError('Per-image prompts (use_prompts) are not supported by HunyuanDiT yet: build one model '
                             'per prompt with prompt=...')
        return self.transformer_features(z, taps)

    def rotary(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's 2D rotary embedding for a `grid` of patches (cos, sin), relative to a 512-px base grid."""
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        base = 512 // self.reduction
        return get_2d_rotary_pos_embed(self.transformer.inner_dim // self.transformer.num_heads,
                                       get_resize_crop_region_for_grid(grid, base), grid, device=device,
                                       output_type='pt')

    def transformer_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """{tap name: map} of the transformer on noised latents `z`, as `HunyuanDiT2DModel.forward` runs its blocks
        (long skips included), stopping after the deepest of `taps`."""
        tr, n = self.transformer, z.shape[0]
        grid = (z.shape[-2] // self.patch, z.shape[-1] // self.patch)
        deepest = max(t.order for t in taps)
        h = tr.pos_embed(z)
        t = self.timestep.to(z.dtype).expand(n)
        t5 = per_latent(self.prompt_embeds_t5.to(h.dtype), n)
        temb = tr.time_extra_emb(t, t5, self.image_meta_size.to(h.dtype).repeat(n, 1),
                                 torch.zeros(n, dtype=torch.long, device=z.device), hidden_dtype=t.dtype)
        ctx = torch.cat([per_latent(self.prompt_embeds.to(h.dtype), n), tr.text_embedder(t5)], dim=1)
        mask = torch.cat([self.prompt_mask, self.prompt_mask_t5], dim=-1).bool().unsqueeze(2)
        ctx = torch.where(per_latent(mask, n), ctx, tr.text_embedding_padding.to(h.dtype))
        rope = self.rotary(grid, z.device)
        half = tr.config.num_layers // 2  # diffusers: blocks after it take a skip, blocks before half - 1 give one
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        with ActivationRecorder(self, taps, full_maps=self.attn_maps == 'full') as rec:
            rec.set_size('transformer', grid)
            for k, block in enumerate(tr.blocks):
                kw = dict(temb=temb, encoder_hidden_states=ctx, image_rotary_emb=rope)
                if k > half:
                    kw['skip'] = skips.pop()
                h = self._run(block, h, **kw)
                if k < half - 1:
                    skips.append(h)
                self._record(feats, by_loc, rec.drain())
                if k >= deepest:
                    break
        return feats

    # --- weights ------------------------------------------------------------------------------------------------------
    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's conditioning buffers for `prompt` (CLIP and mT5 embeddings and masks), cached."""
        cfg = self.transformer.config
        return encode_hunyuan_prompt(self.base_repo, prompt, cfg.text_len, cfg.text_len_t5)

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text encoders `prompt_tensors(prompt)` loads ([] when its embedding is cached)."""
        cfg = self.transformer.config
        return uncached_prompt_files('hunyuan', self.base_repo, prompt, cfg.text_len, cfg.text_len_t5)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: HunyuanDiTBackbone) -> dict[str, torch.Tensor]:
    """Map a diffusers `HunyuanDiT2DModel` state dict (or our own) onto the model's keys."""
    return filter_transformer_state_dict(state_dict, _BUFFERS, skip=_HEAD_KEYS)


def _create_hunyuan(variant: str, pretrained: bool = False, **kwargs) -> HunyuanDiTBackbone:
    return build_diffusion_model(HunyuanDiTBackbone, variant, pretrained, checkpoint_filter_fn,
                          ('transformer_cfg', 'vae_cfg', 'scheduler_cfg'), **kwargs)


def _cfg(**kwargs) -> dict:
    return dit_cfg(**kwargs)


default_cfgs = generate_default_cfgs({
    'hunyuan_dit.v1_0': _cfg(hf_hub_id='Tencent-Hunyuan/HunyuanDiT-Diffusers', license='tencent-hunyuan-community'),
    'test_hunyuan_dit.tiny': _cfg(hf_hub_id='diffbackbone/test-hunyuan', input_size=(3, 128, 128),
                                  pool_size=(8, 8), license='apache-2.0'),
})


@register_model
def hunyuan_dit(pretrained: bool = False, **kwargs) -> HunyuanDiTBackbone:
    """HunyuanDiT v1.0 (1.5B DiT-g/2, SDXL's VAE, bilingual CLIP + mT5), noisy at t=50 as Meng et al."""
    model_args = dict(transformer_cfg=_HUNYUAN_DIT, vae_cfg=VAE_SDXL, scheduler_cfg=_SCHEDULER_HUNYUAN,
                      base_repo='Tencent-Hunyuan/HunyuanDiT-Diffusers')
    return _create_hunyuan('hunyuan_dit', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_hunyuan_dit(pretrained: bool = False, **kwargs) -> HunyuanDiTBackbone:
    """Tiny random-weight HunyuanDiT layout (long skips), for tests."""
    model_args = dict(transformer_cfg=_HUNYUAN_TEST, vae_cfg=_VAE_TEST_HUNYUAN, scheduler_cfg=_SCHEDULER_HUNYUAN,
                      base_repo='diffbackbone/test-hunyuan')
    return _create_hunyuan('test_hunyuan_dit', pretrained=pretrained, **dict(model_args, **kwargs))
