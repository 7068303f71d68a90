""" DeepFloyd IF stage I (IF-I-L) as a timm backbone: a pixel-space UNet, noisy extraction as Meng et al. run it.

DeepFloyd IF (DeepFloyd / Stability AI, `DeepFloyd/IF-I-L-v1.0` on the Hub, gated; "Photorealistic Text-to-Image
Diffusion Models with Deep Language Understanding" is the recipe it follows). Architecture, noise, prompt and taps:
docs/models.md#deepfloyd-if, docs/fidelity.md#deepfloyd-if.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._base import DiffusionBackbone
from ._builder import build_diffusion_model
from ._options import (
    HeadConfig, InputConfig, NoiseConfig, PromptConfig, SourceConfig, UNetNoiseConfig, UNetSourceConfig,
    check_timestep,
)
from .conditioning.text import encode_t5_prompt, uncached_prompt_files
from .diffusion_unet import DiffusionUNet, checkpoint_filter_fn

__all__ = ['DeepFloydIF', 'if_prompt']

# unet/config.json of DeepFloyd/IF-I-L-v1.0, as diffusers' scripts/convert_if.py derives it from IF's own config
# (block types from attention_resolutions 32,16,8 at 64 px, resblock_updown; group-norm cross attention, gelu, scale-
# shift resnets, 'text' addition embedding). The widths (model_channels 320, encoder_channels 1280) are from memory,
# checked against the published size: this layout has 935M parameters ("IF-I-L, 900M").
_IF_I_L = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=('ResnetDownsampleBlock2D',) + ('SimpleCrossAttnDownBlock2D',) * 3,
    up_block_types=('SimpleCrossAttnUpBlock2D',) * 3 + ('ResnetUpsampleBlock2D',),
    mid_block_type='UNetMidBlock2DSimpleCrossAttn', cross_attention_dim=1280, encoder_hid_dim=4096,
    encoder_hid_dim_type='text_proj', attention_head_dim=64, addition_embed_type='text',
    addition_embed_type_num_heads=64, cross_attention_norm='group_norm', resnet_time_scale_shift='scale_shift',
    act_fn='gelu', upcast_attention=False)
# Tiny: the same block types, 4 levels, 3 layers each (Meng et al.'s names and presets exist as at full size);
# cross_attention_dim a multiple of 32 (the prompt's group norm).
_IF_TEST = dict(_IF_I_L, block_out_channels=(8, 16, 16, 32), norm_num_groups=4, cross_attention_dim=32,
                encoder_hid_dim=32, attention_head_dim=4, addition_embed_type_num_heads=2)
# scheduler/scheduler_config.json (the betas are what the noise needs: squaredcos_cap_v2 over 1000 steps).
_SCHEDULER_IF = dict(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2', beta_start=0.0001, beta_end=0.02,
                     variance_type='learned_range', prediction_type='epsilon', thresholding=True,
                     dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
_MAX_TOKENS = 77  # IFPipeline.encode_prompt's max_length
_REDUCTION = 8  # three resamplings: image sides must be multiples of 8


def if_prompt(prompt: str) -> str:
    """IF's text preprocessing with `clean_caption=False` (what Meng et al.'s `encode_prompt` call uses)."""
    return prompt.lower().strip()


def if_timestep(t: int, scheduler_cfg: dict) -> int:
    """The UNet timestep of Meng et al.'s IF call for their t: the 1000-step schedule cut by strength t / 1000
    (`IFImg2ImgPipeline.get_timesteps`), its first step."""
    with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
        scheduler = DDPMScheduler(**scheduler_cfg)
        scheduler.set_timesteps(1000)
    init = min(int(1000 * t / 1000), 1000)
    if init < 1:
        raise InputError(f'timestep={t} leaves no denoising step (strength t / 1000 of 1000 steps): use t >= 1.')
    return int(scheduler.timesteps[1000 - init].item())


class DeepFloydIF(DiffusionUNet):
    """DeepFloyd IF stage I: the image noised in pixel space, one UNet pass, T5 prompt; every activation a tap."""

    def __init__(
            self,
            unet_cfg: dict,
            scheduler_cfg: dict,
            noise_cfg: NoiseConfig = NoiseConfig(),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: SourceConfig = SourceConfig(),
            head_cfg: HeadConfig = HeadConfig(head_tap='up-level1-upsampler-out'),
            input_cfg: InputConfig = InputConfig(),
    ):
        """
        Args:
            unet_cfg: diffusers `UNet2DConditionModel` config of the pixel-space UNet.
            scheduler_cfg: diffusers `DDPMScheduler` config (its betas give the noise level).
            noise_cfg: `timestep` is Meng et al.'s t (default 50): strength t / 1000 of 1000 steps; the UNet runs at
                the first step kept (t - 1) and the image is noised to it. No latent: the image is diffused itself.
            prompt_cfg, source_cfg, head_cfg, input_cfg: the shared options (`_options.py`).
        """
        t = 50 if noise_cfg.timestep is None else int(check_timestep(noise_cfg.timestep, whole=True))
        if noise_cfg.latent is not None:
            raise InputError('DeepFloyd IF diffuses the image itself (no VAE): it takes no latent= option.')
        if input_cfg.in_chans != unet_cfg['in_channels']:
            raise InputError(f'in_chans={input_cfg.in_chans} does not fit the pixel-space UNet, which takes '
                             f'{unet_cfg["in_channels"]}-channel images: convert the images instead.')
        noise = UNetNoiseConfig(timestep=if_timestep(t, scheduler_cfg), ensemble=noise_cfg.ensemble,
                                noise_seed=noise_cfg.noise_seed, latent='mode')
        prompt = prompt_cfg.prompt and if_prompt(prompt_cfg.prompt)  # None stays None: no prompt asked
        super().__init__(unet_cfg, None, clean=False, scheduler_cfg=scheduler_cfg, noise_cfg=noise,
                         prompt_cfg=PromptConfig(prompt), source_cfg=UNetSourceConfig(
                             base_repo=source_cfg.base_repo), head_cfg=head_cfg, input_cfg=input_cfg)
        self.meng_timestep = t  # their t; `timestep` is the UNet's (t - 1 with the 1000-step schedule)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^unet\.(?:conv_in|time_|encoder_hid_proj|add_embedding)', down=r'^unet\.down_blocks\.(\d+)',
                    mid=r'^unet\.mid_block\.', up=r'^unet\.up_blocks\.(\d+)')

    def _check_size(self, size: torch.Size) -> None:
        if any(s % _REDUCTION or s < _REDUCTION for s in size):
            raise InputError(f'Image sides must be multiples of {_REDUCTION} px (three resamplings in pixel space), '
                             f'got {tuple(size)}. Resize the images (IF-I works at 64 x 64).')

    encode_prompts = DiffusionBackbone.encode_prompts  # one T5 call per prompt, not the UNet's batched CLIP

    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """`prompt_embeds` (1, 77, 4096) of `prompt` as `IFPipeline.encode_prompt` computes it (IF's preprocessing,
        T5 with the token mask), cached per (repo commit, preprocessed prompt)."""
        return {'prompt_embeds': encode_t5_prompt(self.base_repo, if_prompt(prompt), _MAX_TOKENS)['prompt_embeds']}

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text encoders `prompt_tensors(prompt)` loads ([] when its embedding is cached)."""
        return uncached_prompt_files('t5', self.base_repo, if_prompt(prompt), _MAX_TOKENS)


def _create_if(variant: str, pretrained: bool = False, **kwargs) -> DeepFloydIF:
    return build_diffusion_model(DeepFloydIF, variant, pretrained, checkpoint_filter_fn, ('unet_cfg', 'scheduler_cfg'),
                                 **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 0, 'input_size': (3, 64, 64), 'min_input_size': (3, 8, 8), 'pool_size': (32, 32),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'unet.conv_in', 'classifier': 'head.fc',
        'hf_hub_filename': 'unet/diffusion_pytorch_model.fp16.safetensors',  # Meng et al. load variant='fp16'
        'origin_url': 'https://github.com/Darkbblue/generic-diffusion-feature',
        'paper_name': 'Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        'paper_ids': 'arXiv:2410.03558', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'deepfloyd_if.if_i_l': _cfg(hf_hub_id='DeepFloyd/IF-I-L-v1.0', license='deepfloyd-if-license'),
    'test_deepfloyd_if.tiny': _cfg(hf_hub_id='diffbackbone/test-if', license='apache-2.0'),
})


@register_model
def deepfloyd_if(pretrained: bool = False, **kwargs) -> DeepFloydIF:
    """DeepFloyd IF-I-L (935M pixel-space UNet at 64 px, T5-XXL prompt; gated on the Hub: accept its license and log
    in first), noisy at t=50 as Meng et al."""
    model_args = dict(unet_cfg=_IF_I_L, scheduler_cfg=_SCHEDULER_IF, base_repo='DeepFloyd/IF-I-L-v1.0')
    return _create_if('deepfloyd_if', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_deepfloyd_if(pretrained: bool = False, **kwargs) -> DeepFloydIF:
    """Tiny random-weight IF layout, for tests."""
    model_args = dict(unet_cfg=_IF_TEST, scheduler_cfg=_SCHEDULER_IF, base_repo='diffbackbone/test-if')
    return _create_if('test_deepfloyd_if', pretrained=pretrained, **dict(model_args, **kwargs))
