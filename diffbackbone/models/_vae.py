"""The VAE encoder the latent-diffusion families share (diffusers' `AutoencoderKL` encoder half, same parameter names),
its configs, and the key mapping of a diffusers VAE checkpoint onto it."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, Encoder

__all__ = ['VAEEncoder', 'vae_keys', 'encoder_key', 'VAE_SD', 'VAE_SDXL', 'VAE_TEST', 'SCHEDULER_SD']

# VAE architectures (diffusers AutoencoderKL config values; the decoder is never built).
VAE_SD = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    scaling_factor=0.18215)
# SDXL's VAE: SD's architecture retrained; its activations overflow in float16, so it is kept in float32.
VAE_SDXL = dict(VAE_SD, scaling_factor=0.13025, force_upcast=True)
# Tiny random-weight VAE for CI (4 levels, 8x latents).
VAE_TEST = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                scaling_factor=0.18215)

# The noise schedule all Stable Diffusion 1.x / 2.x UNets were trained with (DIFT's DDIM scheduler uses the same betas).
SCHEDULER_SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')


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
        # float16 autocast would overflow (no autocast exists on the meta device, where shapes are checked)
        with torch.autocast(x.device.type, enabled=False) if x.device.type != 'meta' else contextlib.nullcontext():
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


def encoder_key(key: str) -> bool:
    """Whether a key of a diffusers AutoencoderKL state dict is of the encoder half (the decoder is not built)."""
    return key.startswith(('encoder.', 'quant_conv.'))


def vae_keys(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder half of a diffusers AutoencoderKL state dict under `vae.`; old attention names are renamed."""
    renames = {'.query.': '.to_q.', '.key.': '.to_k.', '.value.': '.to_v.', '.proj_attn.': '.to_out.0.'}
    out = {}
    for k, v in vae_sd.items():
        if not encoder_key(k):
            continue  # decoder and post_quant_conv: not built
        for old, new in renames.items():
            k = k.replace(old, new)
        if k.startswith('encoder.mid_block.attentions') and v.ndim == 4 and v.shape[-1] == 1:
            v = v[..., 0, 0]  # 1x1 conv attention projections of very old checkpoints
        out['vae.' + k] = v
    return out
