"""The base every diffusion backbone shares: the VAE encoder, latents with seeded noise, the timm model API over taps,
and the builder that loads weights through the package's Hub client; the VAE and noise-schedule configs the families
share.

Kept apart from the families as timm keeps `_builder.py` and `_features.py`: `diffusion_unet.py` (Stable Diffusion
UNets), `pixart.py` and `flux.py` (diffusion transformers, through `dit.py`) each hold one family and import only
the public names here.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, Encoder
from timm.models import build_model_with_cfg

from ..errors import InputError, InputTypeError
from ._taps import Tap, TapError, resolve_taps

__all__ = [
    'TapBackbone', 'NoisyLatents', 'VAEEncoder', 'build_backbone', 'checked_constructor', 'check_timestep',
    'per_latent', 'vae_keys', 'VAE_SD', 'VAE_SDXL', 'VAE_TEST', 'SCHEDULER_SD',
]

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


def check_timestep(timestep: Any, whole: bool) -> float:
    """A diffusion timestep in [0, 999]; noisy models index the noise schedule, so theirs must be a whole number."""
    n = SCHEDULER_SD['num_train_timesteps']
    try:
        t = float(timestep)
    except (TypeError, ValueError):
        t = float('nan')
    if not 0 <= t <= n - 1 or isinstance(timestep, bool):  # also rejects NaN
        raise InputError(f'timestep must be a number in [0, {n - 1}], got {timestep!r}.')
    if whole and t != int(t):
        raise InputError(f'timestep of a noisy model indexes the {n}-step noise schedule and must be a whole number, '
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
            raise InputError(f'ensemble must be a whole number >= 1 (noise draws averaged per image), got {ensemble!r}.')
        if latent not in ('mode', 'sample'):
            raise InputError(f"latent must be 'mode' or 'sample', got {latent!r}.")
        if clean and ensemble != 1:
            raise InputError('Clean models take no noise: ensemble must be 1. Use a noisy model (sd21, sd15) to ensemble.')
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
            raise InputTypeError(f'noise_seed must be a whole number >= 0 (the seed of the noise and latent draws), got '
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
        """Image in [-1, 1] -> scaled latent; noisy models return `ensemble` noised latents per image (B*E, ...).

        A pixel-space host (`vae` None: DeepFloyd IF) diffuses the image itself: it is noised as it is.
        """
        if self.vae is None:
            z = x
        elif self.latent == 'mode':
            z = self.vae(x)
        else:
            posterior = self.vae.posterior(x)
            eps = self._noise((self.ensemble, *posterior.mean.shape[1:]), x, offset=1)
            z = self.vae.scale((posterior.mean.unsqueeze(1) + posterior.std.unsqueeze(1) * eps).flatten(0, 1))
        if self.clean:
            return self._in_denoiser_dtype(z)
        if getattr(self, 'noise', 'ddpm') == 'ddim_inversion':  # deterministic noising (models/conditioning/inversion.py)
            return self._invert(self._in_denoiser_dtype(z))
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

    The host sets `taps` (its `feature_info` order), `all_taps`, `presets`, `head_tap`, `head`, `vae` (None in pixel
    space), `in_chans`,
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
            raise InputError(f"Only output_fmt='NCHW' is supported, got {output_fmt!r}.")
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
            raise InputError(f'{override[0].shape[0]} prompts for a batch of {x.shape[0]} images: give one prompt per '
                             'image, or one for all, to use_prompts.')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- one pass: checks, latents, the denoiser up to the deepest tap, ensemble mean ----------------------------
    def input_conv(self) -> nn.Module:
        """The first convolution the images meet (its weight dtype is the input dtype): the VAE encoder's, or the
        denoiser's own in pixel space."""
        if self.vae is not None:
            return self.vae.encoder.conv_in
        return (getattr(self, 'unet', None) or self.transformer).conv_in

    def _check_input(self, x: torch.Tensor) -> None:
        """Shape, batch, dtype and finiteness of an input batch; the model's size rule is `_check_size`."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputError(
                f'Expected images of shape (batch, {self.in_chans}, height, width), got {tuple(x.shape)}. '
                f'Convert grayscale/RGBA images to RGB, or build the model with in_chans={x.shape[1] if x.ndim == 4 else "?"}.')
        if x.shape[0] == 0:
            raise InputError(f'Got a batch of 0 images (shape {tuple(x.shape)}): give at least one image.')
        self._check_size(x.shape[-2:])
        w = self.input_conv().weight
        if not x.is_floating_point():
            raise InputError(f'Images must be floating point, normalised to [-1, 1] (mean = std = 0.5 on [0, 1]); got '
                             f'{x.dtype}. Convert with x.float() / 127.5 - 1.')
        upcast = self.vae is not None and self.vae.force_upcast
        if x.dtype != w.dtype and not upcast and not torch.is_autocast_enabled(x.device.type):
            raise InputError(f'Input dtype {x.dtype} differs from the model weights\' dtype {w.dtype}: cast the images '
                             f'(x.to({w.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast.')
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise InputError('Input contains NaN or Inf values. Check the image loading and normalisation.')

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """Maps of the `wanted` taps by name, from one pass stopped after the deepest of them."""
        if getattr(self, '_prompt_pending', False) and self._prompt_override is None:
            raise InputError(
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
        if self.ensemble > 1 and self.__dict__.get('_tap_sink') is None:
            feats = {k: f.unflatten(0, (-1, self.ensemble)).mean(1) for k, f in feats.items()}
        return feats

    # --- streaming taps: each map handed on as it is computed, none kept (diffbackbone inspect) ---------------------
    def stream_taps(self, x: torch.Tensor, taps: Sequence[Tap], sink: Callable[[str, torch.Tensor], None]) -> None:
        """One pass up to the deepest of `taps`, calling `sink(name, map)` with each tap's (ensemble-averaged) map as
        soon as it is computed; the maps are not kept, so memory holds one tap's map at a time beyond the pass's own."""
        self.__dict__['_tap_sink'] = sink
        try:
            self._extract(x, list(taps))
        finally:
            self.__dict__.pop('_tap_sink', None)

    def _emit(self, feats: dict[str, torch.Tensor], name: str, m: torch.Tensor) -> None:
        """Keep a tap's map in `feats`, or hand it to the sink of `stream_taps`."""
        sink = self.__dict__.get('_tap_sink')
        if sink is None:
            feats[name] = m
        else:
            sink(name, m.unflatten(0, (-1, self.ensemble)).mean(1) if self.ensemble > 1 else m)


def per_latent(embeds: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt embeddings (one, or one per image) for `n` latents; an image's `ensemble` latents are consecutive."""
    m = embeds.shape[0]
    if m == n:
        return embeds
    if m == 1:
        return embeds.expand(n, *embeds.shape[1:])
    if n % m:
        raise InputError(f'{m} prompt embeddings do not divide {n} latents: give one prompt per image, or one for all.')
    return embeds.repeat_interleave(n // m, dim=0)


def vae_keys(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def checked_constructor(cls: type, internal: Sequence[str] = ()) -> Callable[..., nn.Module]:
    """`cls(**kwargs)` with an error naming unknown arguments (what timm forwards to the model) and the valid ones."""
    known = set(inspect.signature(cls.__init__).parameters) - {'self'}

    def build(**kwargs: Any) -> nn.Module:
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f'Unknown model argument(s) {", ".join(unknown)}. Model arguments: '
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
    if not pretrained and getattr(getattr(model, 'model', model), 'prompt', ''):
        # The prompt's embedding is computed while pretrained weights load; without them it stays zeros until a state
        # dict holding it is loaded. Until then a forward refuses, so a prompt is never recorded without being applied.
        net = getattr(model, 'model', model)
        net._prompt_pending = True
        net.register_load_state_dict_post_hook(_prompt_loaded)
    return model


def _prompt_loaded(module: nn.Module, incompatible) -> None:
    """Post-hook of `load_state_dict`: a state dict holding `prompt_embeds` gives the pending prompt its embedding."""
    if not any(k.endswith('prompt_embeds') for k in incompatible.missing_keys):
        module._prompt_pending = False
