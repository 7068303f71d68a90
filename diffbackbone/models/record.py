"""Taps recorded while a user's own diffusers pipeline generates (Meng et al.'s "background extraction"); see
docs/tasks.md for the call numbering and docs/fidelity.md for how ours differs from theirs.

    with diffbackbone.record(pipe, taps=['us6'], calls=[1, 10, 20]) as rec:
        image = pipe('a photo of a cat').images[0]
    rec.features['us6'][10]  # (2, C, h, w): call 10's batch, both classifier-free guidance halves
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers import (
    FluxTransformer2DModel, HunyuanDiT2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel,
)
from diffusers.utils import BaseOutput

from ..errors import InputError
from ._attention import ActivationRecorder
from ._dit import block_taps
from ._options import whole_number
from ._taps import Tap, TapError, build_taps, presets_for, resolve_taps
from .flux import flux_taps
from .hunyuan import hunyuan_taps
from .pixart import pixart_taps
from .sd3 import sd3_taps

__all__ = ['record', 'Recording', 'pipeline_taps', 'denoiser_of', 'check_calls', 'build_pipeline']

Grid = Callable[[tuple, dict], tuple[int, int]]
_KNOWN = 'UNet2DConditionModel (SD 1.x / 2.x, SDXL, DeepFloyd IF), PixArt, FLUX, SD3 or HunyuanDiT transformers'


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """('unet', pipe.unet) or ('transformer', pipe.transformer): the denoiser whose activations are the taps."""
    for attr in ('unet', 'transformer'):
        module = getattr(pipe, attr, None)
        if isinstance(module, (UNet2DConditionModel, PixArtTransformer2DModel, FluxTransformer2DModel,
                               SD3Transformer2DModel, HunyuanDiT2DModel)):
            return attr, module
    found = ', '.join(f'{a}={type(getattr(pipe, a)).__name__}' for a in ('unet', 'transformer')
                      if getattr(pipe, a, None) is not None) or 'no pipe.unet or pipe.transformer'
    raise InputError(f'record: {type(pipe).__name__} has a denoiser diffbackbone has no taps for ({found}); it knows '
                     f'{_KNOWN}.')


def _vae_scale(pipe: Any) -> int:
    """Stride of the latent relative to the image: the pipeline's VAE's, 1 in pixel space (DeepFloyd IF)."""
    return int(getattr(pipe, 'vae_scale_factor', 1)) if getattr(pipe, 'vae', None) is not None else 1


def pipeline_taps(pipe: Any) -> tuple[list[Tap], list[Tap], dict[str, tuple[str, ...]]]:
    """(every tap in execution order, the default taps, the presets) of a pipeline's denoiser, as our backbone of
    that family has them (a cross-attention map has one channel per token of the pipeline's default prompt length)."""
    attr, den = denoiser_of(pipe)
    scale = _vae_scale(pipe)
    if isinstance(den, UNet2DConditionModel):
        taps = build_taps(den, latent_reduction=scale, prefix=attr, tokens=77)
        return sorted(taps, key=lambda t: t.seq), [t for t in taps if t.base], presets_for(den)
    patch = getattr(den.config, 'patch_size', 2)
    if isinstance(den, FluxTransformer2DModel):
        taps = flux_taps(den, scale * 2, tokens=512)  # 2x2 latent patches packed into tokens; T5's 512
    elif isinstance(den, PixArtTransformer2DModel):
        taps = pixart_taps(den, scale * patch, tokens=300 if 'Sigma' in type(pipe).__name__ else 120)
    elif isinstance(den, SD3Transformer2DModel):
        taps = sd3_taps(den, scale * patch, tokens=256)
    else:
        taps = hunyuan_taps(den, scale * patch)
    return taps, *block_taps(taps)


def _grid(den: nn.Module) -> Optional[Grid]:
    """How a transformer call's arguments give its token grid (H, W); None for a UNet (its transformers' NCHW inputs
    give theirs)."""
    if isinstance(den, UNet2DConditionModel):
        return None
    if isinstance(den, FluxTransformer2DModel):
        def flux(args: tuple, kwargs: dict) -> tuple[int, int]:  # packed tokens: the grid is in their position ids
            ids = kwargs['img_ids'].reshape(-1, 3)
            return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return flux
    patch = den.config.patch_size

    def patched(args: tuple, kwargs: dict) -> tuple[int, int]:
        x = args[0] if args else kwargs['hidden_states']
        return x.shape[-2] // patch, x.shape[-1] // patch
    return patched


def check_calls(calls: Any, limit: Optional[int] = None) -> tuple[int, ...]:
    """The chosen denoiser calls, sorted: distinct whole numbers from 1 (Meng et al.'s count), at most `limit` (the
    denoiser calls of the run)."""
    if isinstance(calls, int) and not isinstance(calls, bool):
        calls = (calls,)
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence) or not calls:
        raise InputError(f'calls must be a list of denoiser calls counted from 1 (e.g. [1, 10, 20]), got {calls!r}.')
    out = tuple(sorted(whole_number('calls', c, what='denoiser calls count from 1') for c in calls))
    if len(set(out)) != len(out):
        raise InputError(f'calls lists a call twice: {list(calls)}.')
    if limit is not None and out[-1] > limit:
        raise InputError(f'calls {[c for c in out if c > limit]} are beyond the run\'s {limit} denoiser calls: choose '
                         f'calls from 1 to {limit}, or run more steps.')
    return out


def _names(asked: Any, taps: Sequence[Tap], presets: dict) -> list[str]:
    """The key of each selected tap in `features`: the name or alias it was asked by, else its canonical name (an
    index, a preset)."""
    sel = [asked] if isinstance(asked, str) else list(asked) if isinstance(asked, (list, tuple)) else []
    given = {s for s in sel if isinstance(s, str) and s not in presets}
    return [next((a for a in (t.name, t.location, *t.aliases) if a in given), t.name) for t in taps]


class _CallRecorder(ActivationRecorder):
    """`ActivationRecorder` on a bare denoiser (tap modules under `prefix.`), plus the taps a backbone's own forward
    yields rather than hooks (hook ''): a block's output (the first item of a tuple), `unet-in` the input of
    `conv_in`."""

    def __init__(self, denoiser: nn.Module, prefix: str, taps: Sequence[Tap]):
        super().__init__(denoiser, taps)
        self.prefix = prefix
        self.outputs = [t for t in taps if not t.hook]

    def _module(self, path: str) -> nn.Module:
        return self.root if path == self.prefix else self.root.get_submodule(path.removeprefix(self.prefix + '.'))

    def __enter__(self) -> '_CallRecorder':
        super().__enter__()
        for tap in self.outputs:
            module = self._module(tap.module)
            if tap.location == 'unet-in':
                self._handles.append(module.register_forward_pre_hook(self._store_first_input(tap.location)))
            else:
                self._handles.append(module.register_forward_hook(self._store_output(tap.location)))
        return self

    def _store_first_input(self, location: str):
        def hook(module, args):
            self._out[location] = args[0]
        return hook

    def _store_output(self, location: str):
        def hook(module, args, out):
            self._out[location] = out[0] if isinstance(out, (tuple, list, BaseOutput)) else out
        return hook


class Recording:
    """Taps of a pipeline's denoiser at chosen calls, recorded inside a `with` block (see `record`).

    Attributes:
        features: {tap name: {call: map}}; each map is the batch the denoiser saw at that call (with classifier-free
            guidance both halves, in the pipeline's order), detached, on `device` when one was given.
        taps: the selected taps (`Tap`: name, channels, stride, module); `names` their keys in `features` (the name
            or alias each was asked by; an index or a preset gives canonical names).
        calls: the chosen calls, sorted; a call is one denoiser forward, counted from 1 when the block begins.
        count: the denoiser forwards seen in the block so far.
    """

    def __init__(self, pipe: Any, taps: Union[None, str, Sequence[Union[str, int]]], calls: Sequence[int],
                 device: Union[None, str, torch.device] = None):
        self.prefix, self.denoiser = denoiser_of(pipe)
        all_taps, default, presets = pipeline_taps(pipe)
        self.taps = resolve_taps(default, taps, presets, all_taps)
        self.names = _names(taps, self.taps, presets)
        self.calls = check_calls(calls)
        self.device = None if device is None else torch.device(device)
        self.features: dict[str, dict[int, torch.Tensor]] = {}
        self.count = 0
        self._grid = _grid(self.denoiser)
        self._by_loc = {t.location: n for t, n in zip(self.taps, self.names)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active: Optional[_CallRecorder] = None

    def __enter__(self) -> 'Recording':
        if self._handles:
            raise InputError('This recording is already running: nest a new diffbackbone.record(...) instead.')
        self.features = {name: {} for name in self.names}
        self.count = 0
        den = self.denoiser
        self._handles = [den.register_forward_pre_hook(self._before, with_kwargs=True),
                         den.register_forward_hook(self._after)]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._active is not None:  # the denoiser raised inside a chosen call
            self._active.__exit__(None, None, None)
            self._active = None
        missing = [c for c in self.calls if c > self.count]
        if exc_type is None and missing:
            self.features = {}
            raise InputError(f'record: calls {missing} were asked for, but the pipeline called its denoiser '
                             f'{self.count} times in the block (once per step; twice where guidance runs two passes):'
                             f' choose calls from 1 to {self.count}, or run more steps. Nothing was kept.')

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.count += 1
        if self.count not in self.calls:
            return
        rec = _CallRecorder(self.denoiser, self.prefix, self.taps).__enter__()
        self._active = rec
        if self._grid is not None:  # hooks placed now on the denoiser itself first run at its next call
            rec.set_size(self.prefix, self._grid(args, kwargs))

    def _after(self, module: nn.Module, args: tuple, out: Any) -> None:
        rec, self._active = self._active, None
        if rec is None:
            return
        rec.__exit__(None, None, None)
        got = dict(rec.drain())
        missing = [name for loc, name in self._by_loc.items() if loc not in got]
        if missing:  # the tap table and the denoiser's forward disagree: a bug, not the user's input
            raise TapError(f'record: taps {missing} were not computed in denoiser call {self.count}.')
        for loc, name in self._by_loc.items():
            m = got[loc].detach()
            self.features[name][self.count] = m if self.device is None else m.to(self.device)


def record(pipe: Any, taps: Union[None, str, Sequence[Union[str, int]]] = None, *, calls: Sequence[int],
           device: Union[None, str, torch.device] = None) -> Recording:
    """Record our taps of `pipe`'s denoiser at the chosen denoiser `calls` of the generation run inside the block.

    Args:
        pipe: a diffusers pipeline whose `unet` or `transformer` is one we have taps for (else `InputError`).
        taps: tap names, aliases, indices or a preset, as `out_indices` of the backbone of that family (None: its
            default taps); `diffbackbone taps MODEL --all` lists them.
        calls: denoiser forwards to keep, counted from 1 as Meng et al.'s `set_background_extraction` (one per step;
            a pipeline running guidance as two passes calls it twice per step). A call the run never reaches raises
            `InputError` when the block ends.
        device: where the kept maps go (e.g. 'cpu' to free accelerator memory); default: where they were computed.

    Returns:
        The `Recording`, filled as the block runs: `rec.features[tap][call]`.
    """
    return Recording(pipe, taps, calls, device)


# --- a pipeline of one of our UNet models (`diffbackbone generate`) ------------------------------------------------
def _full_vae(model: nn.Module) -> nn.Module:
    """The base repo's whole VAE (our backbones build only the encoder), shaped as the model's encoder."""
    from diffusers import AutoencoderKL

    from .. import hub
    from ._base import weights_dtype

    enc = model.vae
    blocks = enc.encoder.down_blocks
    n = len(blocks)
    vae = AutoencoderKL(
        block_out_channels=tuple(b.resnets[0].out_channels for b in blocks),
        layers_per_block=len(blocks[0].resnets), latent_channels=enc.encoder.conv_out.out_channels // 2,
        norm_num_groups=enc.encoder.conv_norm_out.num_groups, scaling_factor=enc.scaling_factor,
        shift_factor=enc.shift_factor or None, force_upcast=enc.force_upcast,
        use_quant_conv=not isinstance(enc.quant_conv, nn.Identity),
        use_post_quant_conv=not isinstance(enc.quant_conv, nn.Identity),
        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n)
    what = f'VAE of {model.base_repo}'
    path = hub.download(model.base_repo, model.vae_file, what=what)
    renames = {'.query.': '.to_q.', '.key.': '.to_k.', '.value.': '.to_v.', '.proj_attn.': '.to_out.0.'}
    state = {}
    for k, v in hub.load_safetensors(path, what=what, dtype=weights_dtype(enc)).items():
        for old, new in renames.items():
            k = k.replace(old, new)
        state[k] = v[..., 0, 0] if '.attentions.' in k and v.ndim == 4 and v.shape[-1] == 1 else v
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise hub.HubError(f'{what} ({model.vae_file}) does not fit the model\'s VAE: missing {missing[:3]}, '
                           f'unexpected {unexpected[:3]}.')
    return vae.to(weights_dtype(enc))


def build_pipeline(model: nn.Module) -> Any:
    """A diffusers text-to-image pipeline of one of our latent UNet models (SD 1.x / 2.x, SDXL, Playground): its UNet,
    the base repo's VAE, the scheduler of Meng et al.'s pipeline for it (DDIM with SD's betas when it has none). No
    text encoder: `generate` passes our cached prompt embeddings (`prompt_tensors`)."""
    import diffusers

    from ._vae import SCHEDULER_SD
    from .diffusion_unet import DiffusionUNet

    if not isinstance(model, DiffusionUNet) or model.vae is None:
        raise InputError(f'generate builds pipelines of the latent UNet models (SD 1.x / 2.x, SDXL, Playground); '
                         f'{type(model).__name__} is not one. For another family run your own diffusers pipeline '
                         'inside diffbackbone.record(pipe, ...).')
    if model.unet.conv_out is None:
        raise InputError('This model\'s UNet has no output head (its checkpoint holds no conv_out weights), so it '
                         'cannot denoise: generate with a model whose weights are a whole UNet (e.g. the dift_* or '
                         'sd* models).')
    if model.controlnet is not None or model.noise == 'ddim_inversion':
        raise InputError('generate runs the plain text-to-image pipeline: build the model without control or '
                         'noise=ddim_inversion.')
    cfg = model.meng_scheduler or dict(SCHEDULER_SD, _class_name='DDIMScheduler', clip_sample=False,
                                       set_alpha_to_one=False, steps_offset=1)
    scheduler = getattr(diffusers, cfg['_class_name']).from_config(cfg)
    parts = dict(vae=_full_vae(model), unet=model.unet, scheduler=scheduler, text_encoder=None, tokenizer=None)
    if model.sdxl:
        return diffusers.StableDiffusionXLPipeline(text_encoder_2=None, tokenizer_2=None, **parts)
    return diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **parts)
