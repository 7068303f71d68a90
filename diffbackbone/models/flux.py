""" FLUX.1 diffusion transformers as timm backbones (noisy extraction as Meng et al. do it).

FLUX.1 [dev] / [schnell] (Black Forest Labs, `black-forest-labs/FLUX.1-*` on the Hub). Taps by the names of "Not All
Diffusion Model Activations Have Been Evaluated as Discriminative Features" (Meng et al., NeurIPS 2024, github
Darkbblue/generic-diffusion-feature). Noise, taps and departures: docs/models.md#flux, docs/fidelity.md#flux.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._attention import ActivationRecorder
from ._base import per_latent
from ._builder import build_diffusion_model
from ._options import HeadConfig, Img2ImgNoiseConfig, InputConfig, PromptConfig, SourceConfig, finite_number
from ._vae import VAE_TEST
from ._dit import DiTBackbone, dit_cfg, filter_transformer_state_dict
from ._taps import Tap, _ffn_inner_chs, _TableBuilder
from .conditioning.text import encode_flux_prompt, uncached_prompt_files

__all__ = ['FluxBackbone', 'checkpoint_filter_fn', 'flux_taps']

# transformer/config.json of the Hub repos (dev is guidance-distilled: it embeds the guidance scale).
_FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
_FLUX_SCHNELL = dict(_FLUX_DEV, guidance_embeds=False)
_FLUX_TEST = dict(_FLUX_DEV, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
# vae/config.json: 16 latent channels, no quant_conv, latents shifted then scaled.
_VAE_FLUX = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)
_VAE_TEST_FLUX = dict(VAE_TEST, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)
# scheduler/scheduler_config.json: dev shifts its sigmas by the image size (`mu`), schnell does not shift.
_SCHEDULER_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
_SCHEDULER_SCHNELL = dict(_SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)


def flux_taps(transformer: FluxTransformer2DModel, reduction: int, tokens: int, prefix: str = 'transformer') -> list[Tap]:
    """Every tap of a FLUX transformer in execution order, with Meng et al.'s names; block k is stage k.
    (Maps: `tokens` channels for `-cross-map`, heads for `-self-map`.)"""
    tb = _TableBuilder('', tokens)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    n_double = len(transformer.transformer_blocks)
    dim = transformer.inner_dim
    for k, block in enumerate(blocks):
        tb.stage = k
        b = f'vit-block{k}'
        m = f'{prefix}.transformer_blocks.{k}' if k < n_double else f'{prefix}.single_transformer_blocks.{k - n_double}'
        for p in ('q', 'k', 'v'):
            tb.add(f'{b}-{p}', dim, reduction, f'{m}.attn.to_{p}', p)
        tb.add(f'{b}-cross-map', tokens, reduction, f'{m}.attn', 'joint-cross-map')
        tb.add(f'{b}-self-map', block.attn.heads, reduction, f'{m}.attn', 'joint-self-map')
        if k < n_double:
            tb.add(f'{b}-attn-out', dim, reduction, f'{m}.attn.to_out.0', 'tokens')
            tb.add(f'{b}-norm-out', dim, reduction, f'{m}.ff', 'input')
            tb.add(f'{b}-ffn-inner', _ffn_inner_chs(block.ff), reduction, f'{m}.ff.net.0', 'tokens')
        else:
            tb.add(f'{b}-attn-out', dim, reduction, f'{m}.attn', 'tokens')
        tb.add(f'{b}-out', dim, reduction, m, 'tokens@1')  # blocks return (text, image)
    return tb.taps


class FluxBackbone(DiTBackbone):
    """VAE encoder + FLUX transformer as a backbone: every block's activations are taps, all at stride 16."""

    def __init__(
            self,
            transformer_cfg: dict,
            vae_cfg: dict,
            scheduler_cfg: dict,
            noise_cfg: Img2ImgNoiseConfig = Img2ImgNoiseConfig(num_inference_steps=28),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: SourceConfig = SourceConfig(),
            head_cfg: HeadConfig = HeadConfig(),
            input_cfg: InputConfig = InputConfig(),
            shift_size: Union[int, str] = 1024,
            guidance: float = 1.0,
            max_tokens: int = 512,
            attn_maps: str = 'reduced',
    ):
        """
        Args:
            transformer_cfg: diffusers `FluxTransformer2DModel` config.
            vae_cfg: `VAEEncoder` arguments.
            scheduler_cfg: diffusers `FlowMatchEulerDiscreteScheduler` config of the base repo.
            noise_cfg: `timestep` is Meng et al.'s t: the image-to-image strength is t / 1000 (default 50) of
                `num_inference_steps` (the pipeline's 28); the one transformer call runs at the first step kept.
            prompt_cfg, source_cfg, head_cfg, input_cfg: the shared options (`_options.py`).
            shift_size: dev's schedule is shifted as for a `shift_size` x `shift_size` image (Meng et al.'s 1024: the
                noise level does not depend on the input size); 'input': as for the input's own size.
            guidance: guidance scale a guidance-distilled model (dev) is told (Meng et al.: 1).
            max_tokens: T5 sequence length (the pipeline's 512).
            attn_maps: 'reduced' (map taps as `_attention.MAP_REDUCTIONS` says) or 'full' (unreduced
                probabilities, (B, heads, N, N) / (B, heads, N, tokens): 1.5 GiB / 192 MiB per image and map at
                1024 px in float32).
        """
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg)
        bad_size = isinstance(shift_size, bool) or not isinstance(shift_size, int) or shift_size < 16
        if shift_size != 'input' and bad_size:
            raise InputError(f"shift_size must be a whole number of pixels >= 16 (1024: Meng et al.'s noise level) or "
                             f"'input' (shift by the input's size), got {shift_size!r}.")
        _, self.t_start = self.noise_cfg.start()
        self.shift_size = shift_size
        self.num_inference_steps, self.scheduler_cfg = self.noise_cfg.num_inference_steps, scheduler_cfg
        self.guidance = finite_number('guidance', guidance)
        self._schedules: dict = {}

        self.transformer = FluxTransformer2DModel(**transformer_cfg)
        tr = self.transformer
        self.reduction = self.vae.reduction * 2  # 2x2 latent patches packed into tokens
        self.register_buffer('prompt_embeds', torch.zeros(1, max_tokens, tr.config.joint_attention_dim))
        self.register_buffer('pooled_prompt_embeds', torch.zeros(1, tr.config.pooled_projection_dim))

        self._init_block_taps(flux_taps(tr, self.reduction, max_tokens), head_cfg, attn_maps)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # one key per part, in execution order: timm's ordinal is (key index, block index), numbers only
        return dict(stem=r'^vae\.|^transformer\.(?:pos_embed|time_text_embed|context_embedder|x_embedder)',
                    double=r'^transformer\.transformer_blocks\.(\d+)',
                    single=r'^transformer\.single_transformer_blocks\.(\d+)',
                    head=r'^transformer\.(?:norm_out|proj_out)')

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the deepest selected tap and the output head (the one call never reaches them);
        return the selection as `feature_info` indices."""
        def keep(deepest: int) -> None:
            tr, n_double = self.transformer, len(self.transformer.transformer_blocks)
            tr.single_transformer_blocks = nn.ModuleList(
                list(tr.single_transformer_blocks)[:max(deepest + 1 - n_double, 0)])
            tr.transformer_blocks = nn.ModuleList(list(tr.transformer_blocks)[:deepest + 1])
            tr.norm_out = tr.proj_out = None  # back to velocity space: no tap needs it
        return self._prune_blocks(indices, prune_head, keep)

    # --- the truncated image-to-image schedule ---------------------------------------------------------------------
    def schedule(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of the strength-cut schedule for latents of `height` x `width`, as
        `FluxImg2ImgPipeline` computes them (float32, CPU); the one transformer call runs at the first of them. The
        shift is that of a `shift_size` image (or of the latent's own size when `shift_size` is 'input')."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if self.shift_size != 'input':  # the pipeline's token count of its resized image
            height = width = self.shift_size // self.vae.reduction
        cache = self._schedules
        if (height, width) not in cache:
            cfg = self.scheduler_cfg
            scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
            n = self.num_inference_steps
            mu = calculate_shift((height // 2) * (width // 2), cfg['base_image_seq_len'], cfg['max_image_seq_len'],
                                 cfg['base_shift'], cfg['max_shift'])
            with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
                scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device='cpu')
            cache[height, width] = (scheduler.timesteps[self.t_start:].clone(), scheduler.sigmas[self.t_start:].clone())
        return cache[height, width]

    def noise_level(self, z: torch.Tensor) -> tuple[float, float]:
        sigma = self.schedule(*z.shape[-2:])[1][0].item()  # FlowMatchEulerDiscreteScheduler.scale_noise
        return 1.0 - sigma, sigma

    # --- forward ------------------------------------------------------------------------------------------------------
    def _conditioning(self, x: torch.Tensor, height: int, width: int) -> dict:
        """Transformer keyword arguments besides the latents and the timestep, for packed latents `x`."""
        tr, n = self.transformer, x.shape[0]
        embeds, pooled = self._prompt_override or (self.prompt_embeds, self.pooled_prompt_embeds)
        img_ids = torch.zeros(height // 2, width // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(height // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(width // 2, device=x.device)[None, :]
        guidance = torch.full((n,), self.guidance, device=x.device) if tr.config.guidance_embeds else None
        return dict(encoder_hidden_states=per_latent(embeds.to(x.dtype), n),
                    pooled_projections=per_latent(pooled.to(x.dtype), n),
                    img_ids=img_ids.flatten(0, 1).to(x.dtype),
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype), guidance=guidance)

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        n, c, h, w = z.shape
        x = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        return self.features_from_packed(x, h, w, taps)

    def features_from_packed(self, x: torch.Tensor, height: int, width: int, taps: Sequence[Tap]
                             ) -> dict[str, torch.Tensor]:
        """{tap name: map} from packed noised latents `x` (B, HW/4, 64) of a `height` x `width` latent: one transformer
        call at the first timestep of the cut schedule (Meng et al.'s only call), up to the deepest of `taps`."""
        t = self.schedule(height, width)[0][0].to(x.device).expand(x.shape[0]).to(x.dtype)
        return self._tapped_pass(x, t / 1000, self._conditioning(x, height, width), (height // 2, width // 2), taps)

    def _tapped_pass(self, x: torch.Tensor, t: torch.Tensor, cond: dict, grid: tuple[int, int], taps: Sequence[Tap]
                     ) -> dict[str, torch.Tensor]:
        """The transformer's forward (diffusers' `FluxTransformer2DModel.forward`) up to the deepest of `taps`."""
        tr = self.transformer
        deepest = max(t.order for t in taps)
        h = tr.x_embedder(x)
        t = t.to(h.dtype) * 1000
        guidance = cond['guidance']
        temb = (tr.time_text_embed(t, cond['pooled_projections']) if guidance is None
                else tr.time_text_embed(t, guidance.to(h.dtype) * 1000, cond['pooled_projections']))
        ctx = tr.context_embedder(cond['encoder_hidden_states'])
        rope = tr.pos_embed(torch.cat((cond['txt_ids'], cond['img_ids']), dim=0))
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        with ActivationRecorder(self, taps, full_maps=self.attn_maps == 'full') as rec:
            rec.set_size('transformer', grid)
            for k, block in enumerate([*tr.transformer_blocks, *tr.single_transformer_blocks]):
                ctx, h = self._run(block, h, ctx, temb, rope)
                self._record(feats, by_loc, rec.drain())
                if k >= deepest:
                    break
        return feats

    # --- weights ------------------------------------------------------------------------------------------------------
    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's conditioning buffers for `prompt` (T5 embedding, CLIP pooled), encoded once and cached."""
        return encode_flux_prompt(self.base_repo, prompt, self.prompt_embeds.shape[1])

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text encoders `prompt_tensors(prompt)` loads ([] when its embedding is cached)."""
        return uncached_prompt_files('flux', self.base_repo, prompt, self.prompt_embeds.shape[1])



def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FluxBackbone) -> dict[str, torch.Tensor]:
    """Map a diffusers `FluxTransformer2DModel` state dict (or our own) onto the model's keys."""
    return filter_transformer_state_dict(state_dict, ('prompt_embeds', 'pooled_prompt_embeds'))


def _create_flux(variant: str, pretrained: bool = False, **kwargs) -> FluxBackbone:
    return build_diffusion_model(FluxBackbone, variant, pretrained, checkpoint_filter_fn,
                          ('transformer_cfg', 'vae_cfg', 'scheduler_cfg'), **kwargs)


def _cfg(**kwargs) -> dict:
    return dit_cfg(**{'hf_hub_filename': 'transformer/diffusion_pytorch_model.safetensors.index.json',  # sharded
                      **kwargs})


default_cfgs = generate_default_cfgs({
    'flux.dev': _cfg(hf_hub_id='black-forest-labs/FLUX.1-dev', license='flux-1-dev-non-commercial-license'),
    'flux_schnell.schnell': _cfg(hf_hub_id='black-forest-labs/FLUX.1-schnell', license='apache-2.0'),
    'test_flux.tiny': _cfg(hf_hub_id='diffbackbone/test-flux', input_size=(3, 128, 128), pool_size=(8, 8),
                           license='apache-2.0'),
})


@register_model
def flux(pretrained: bool = False, **kwargs) -> FluxBackbone:
    """FLUX.1 [dev], the FLUX Meng et al. evaluated (gated on the Hub: accept its license and log in first)."""
    model_args = dict(transformer_cfg=_FLUX_DEV, vae_cfg=_VAE_FLUX, scheduler_cfg=_SCHEDULER_DEV,
                      base_repo='black-forest-labs/FLUX.1-dev')
    return _create_flux('flux', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flux_schnell(pretrained: bool = False, **kwargs) -> FluxBackbone:
    """FLUX.1 [schnell]: the same architecture without guidance embedding, Apache-2.0, not gated."""
    model_args = dict(transformer_cfg=_FLUX_SCHNELL, vae_cfg=_VAE_FLUX, scheduler_cfg=_SCHEDULER_SCHNELL,
                      base_repo='black-forest-labs/FLUX.1-schnell')
    return _create_flux('flux_schnell', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_flux(pretrained: bool = False, **kwargs) -> FluxBackbone:
    """Tiny random-weight FLUX layout (dev's schedule and guidance), for tests."""
    model_args = dict(transformer_cfg=_FLUX_TEST, vae_cfg=_VAE_TEST_FLUX, scheduler_cfg=_SCHEDULER_DEV, max_tokens=8,
                      base_repo='diffbackbone/test-flux')
    return _create_flux('test_flux', pretrained=pretrained, **dict(model_args, **kwargs))
