"""`DiffusionBackbone`: the contract every diffusion family fulfils, and the timm model API implemented once over it.

A family provides its denoiser, its tap table, its prompt tensors, how it noises a latent and the denoiser call it
taps (the abstract members below); the base turns images into latents, runs the pass, and serves `forward_features`,
`forward_intermediates`, `prune_intermediate_layers` bookkeeping, streaming and the classifier head.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..errors import InputError
from ._head import ClassifierHeadMixin
from ._options import HeadConfig, InputConfig, NoiseConfig, PromptConfig, SourceConfig, check_timestep
from ._taps import Tap, TapError, resolve_taps
from ._vae import SCHEDULER_SD, VAE_SD, VAE_SDXL, VAE_TEST, VAEEncoder, encoder_key, vae_keys

__all__ = ['DiffusionBackbone', 'WeightFile', 'PromptReencodedWarning', 'per_latent', 'weights_dtype', 'check_timestep',
           'VAEEncoder', 'vae_keys', 'VAE_SD', 'VAE_SDXL', 'VAE_TEST', 'SCHEDULER_SD']

Indices = Union[None, int, str, Sequence[Union[int, str]]]


class DiffusionBackbone(ClassifierHeadMixin, nn.Module, ABC):
    """Base of every diffusion backbone (timm model contract).

    The constructor of a family calls `super().__init__(...)` with its option objects (which builds the VAE encoder
    first, or none in pixel space), builds its denoiser, then calls `_init_taps`.
    """

    vae: Optional[VAEEncoder]  # the latent encoder; None when the denoiser sees the image itself (DeepFloyd IF)
    all_taps: list[Tap]  # every activation, in execution order
    taps: list[Tap]  # `feature_info` order
    presets: dict[str, tuple[str, ...]]

    def __init__(self, vae_cfg: Optional[dict], noise: NoiseConfig, prompt: PromptConfig, source: SourceConfig,
                 inputs: InputConfig, clean: bool = False, latent: str = 'sample'):
        super().__init__()
        noise = noise.resolved(clean, latent)
        self.noise_cfg, self.prompt_cfg, self.source_cfg, self.input_cfg = noise, prompt, source, inputs
        self.clean, self.ensemble, self.noise_seed, self.latent = clean, noise.ensemble, noise.noise_seed, noise.latent
        self.prompt, self.base_repo, self.vae_file = prompt.text, source.base_repo, source.vae_file
        self.in_chans, self.check_inputs = inputs.in_chans, inputs.check_inputs
        self.grad_checkpointing = False
        self._prompt_override: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # prompts.use_prompts
        self._prompt_pending = False  # a prompt given without the weights that compute its embedding (_builder)
        self.checkpoint_prompt: Optional[str] = None  # the prompt the checkpoint records for its embedding (_builder)
        self._noise_cache: dict = {}
        self._resolved: dict = {}
        self._tap_sink: Optional[Callable[[str, torch.Tensor], None]] = None
        self.vae = None if vae_cfg is None else VAEEncoder(in_chans=inputs.in_chans, **vae_cfg)

    @classmethod
    def from_kwargs(cls, **kwargs) -> 'DiffusionBackbone':
        """The model built from flat keyword arguments (`timestep=`, `prompt=`, ...), as `timm.create_model` passes
        them; random weights (load a checkpoint with `_builder.load_weights`)."""
        from ._builder import group_kwargs

        return cls(**group_kwargs(cls, kwargs))

    # --- what a family provides ---------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The UNet or transformer whose activations are the taps."""

    @abstractmethod
    def prompt_tensors(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's conditioning buffers for `prompt` (its text encoders' embeddings), encoded once and cached."""

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{prompt: `prompt_tensors`} of each distinct prompt (a family may batch the text encoder)."""
        return {p: self.prompt_tensors(p) for p in dict.fromkeys(prompts)}

    @abstractmethod
    def noise_level(self, z: torch.Tensor) -> tuple[float, float]:
        """(signal, noise) factors of a noised latent like `z` (a flow-matching family's may depend on its size)."""

    @abstractmethod
    def _check_size(self, size: torch.Size) -> None:
        """Refuse an image size the family cannot run (with what to do)."""

    @abstractmethod
    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """{tap name: map} of the denoiser on latents `z`, one pass stopped after the deepest of `taps`."""

    @abstractmethod
    def prune_intermediate_layers(self, indices: Indices = None, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what runs after the deepest selected tap; return the selection as `feature_info` indices."""

    # --- taps and head ------------------------------------------------------------------------------------------------
    def _init_taps(self, all_taps: list[Tap], taps: list[Tap], presets: dict, head: HeadConfig,
                   head_tap: Optional[str] = None) -> None:
        """The tap tables and the classifier head, which reads `head.head_tap`, else `head_tap`, else the last tap."""
        self.all_taps, self.taps, self.presets = all_taps, taps, presets
        self.feature_info = [t.info() for t in taps]
        self._deepest: Optional[int] = None  # deepest stage still computable after pruning (None: all)
        name = head.head_tap or head_tap
        tap = taps[-1] if name is None else self._resolve([name])[0]
        if tap not in taps:
            raise TapError(f'head_tap must be one of the default taps {self.tap_names()}, got {name!r}.')
        self.head_tap = taps.index(tap)
        self._init_head(tap.num_chs, head)

    def _add_to_feature_info(self, take: Sequence[Tap], key: Callable[[Tap], object]) -> None:
        """Selected taps that are not in `feature_info` yet join it, ordered by `key` (timm: strides never fall)."""
        extra = [t for t in take if t not in self.taps]
        if extra:
            head = self.taps[self.head_tap]
            self._resolved.clear()  # indices now point into the extended list
            self.taps = sorted(self.taps + extra, key=key)
            self.feature_info = [t.info() for t in self.taps]
            self.head_tap = self.taps.index(head)

    def _pruned(self, take: Sequence[Tap], deepest: Optional[int], prune_head: bool) -> list[int]:
        """Record that stages after `deepest` (None: nothing) are gone; drop the classifier when asked; return the
        `feature_info` indices of `take`."""
        if deepest is not None:
            self._deepest = deepest if self._deepest is None else min(deepest, self._deepest)
        if prune_head:
            self.reset_classifier(0, '')
        return [self.taps.index(t) for t in take]

    def _deepest_wanted(self, take: Sequence[Tap], prune_head: bool) -> int:
        return max(t.order for t in (take if prune_head else [*take, self.taps[self.head_tap]]))

    def tap_names(self, all: bool = False) -> list[str]:
        """Canonical names of the `feature_info` taps in their order, or with `all` of every tap in execution order."""
        if all:
            return [t.name for t in sorted(self.all_taps, key=lambda t: t.seq)]
        return [t.name for t in self.taps]

    def _resolve(self, indices: Indices) -> list[Tap]:
        """Taps for `out_indices`-style selections, memoised: timm's feature wrapper asks again on every forward."""
        key = tuple(indices) if isinstance(indices, (list, tuple)) else indices
        if key not in self._resolved:
            self._resolved[key] = resolve_taps(self.taps, indices, presets=self.presets, all_taps=self.all_taps)
        return list(self._resolved[key])

    # --- timm model API -----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Indices = None,
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

    # --- latents --------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def _noise(self, shape: Sequence[int], x: torch.Tensor, offset: int) -> torch.Tensor:
        """Seeded Gaussian noise, the same for every image of a batch so features do not depend on batch mates.

        Drawn on the CPU (the same numbers on every device) once per shape, then kept on the device.
        """
        key = (tuple(shape), offset, self.noise_seed, x.device, x.dtype)
        cache = self._noise_cache
        if key not in cache:
            gen = torch.Generator(device='cpu').manual_seed(self.noise_seed + offset)
            if len(cache) > 8:
                cache.clear()
            cache[key] = torch.randn(tuple(shape), generator=gen).to(device=x.device, dtype=x.dtype)
        return cache[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent; noisy models return `ensemble` noised latents per image (B*E, ...).

        In pixel space (`vae` None: DeepFloyd IF) the image itself is noised.
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
        return self.add_noise(z, x)

    def add_noise(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Seeded noise at the model's noise level on latents `z` of images `x` (`ensemble` draws per image)."""
        if z.shape[0] == x.shape[0]:
            z = z.repeat_interleave(self.ensemble, dim=0)
        noise = self._noise((self.ensemble, *z.shape[1:]), x, offset=0).repeat(x.shape[0], 1, 1, 1)
        a, s = self.noise_level(z)
        return self._in_denoiser_dtype(a * z + s * noise)

    def _in_denoiser_dtype(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the denoiser's dtype: a VAE kept in float32 (SDXL's) gives float32 latents."""
        dtype = next(self.denoiser.parameters()).dtype
        return z if z.dtype == dtype or torch.is_autocast_enabled(z.device.type) else z.to(dtype)

    # --- one pass: checks, latents, the denoiser up to the deepest tap, ensemble mean ----------------------------
    def input_conv(self) -> nn.Module:
        """The first convolution the images meet (its weight dtype is the input dtype): the VAE encoder's, or the
        denoiser's own in pixel space."""
        return self.vae.encoder.conv_in if self.vae is not None else self.denoiser.conv_in

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
        if not torch.compiler.is_compiling() and x.device.type != 'meta' and not bool(torch.isfinite(x).all()):
            raise InputError('Input contains NaN or Inf values. Check the image loading and normalisation.')

    def _check_prompt_count(self, x: torch.Tensor) -> None:
        """Per-image prompts (`prompts.use_prompts`, held in `_prompt_override`) must be one, or one per image."""
        override = self._prompt_override
        if override is not None and override[0].shape[0] not in (1, x.shape[0]):
            raise InputError(f'{override[0].shape[0]} prompts for a batch of {x.shape[0]} images: give one prompt per '
                             'image, or one for all, to use_prompts.')

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        """Maps of the `wanted` taps by name, from one pass stopped after the deepest of them."""
        if self._prompt_pending and self._prompt_override is None:
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
        if self.ensemble > 1 and self._tap_sink is None:
            feats = {k: f.unflatten(0, (-1, self.ensemble)).mean(1) for k, f in feats.items()}
        return feats

    # --- streaming taps: each map handed on as it is computed, none kept (diffbackbone inspect) ---------------------
    def stream_taps(self, x: torch.Tensor, taps: Sequence[Tap], sink: Callable[[str, torch.Tensor], None]) -> None:
        """One pass up to the deepest of `taps`, calling `sink(name, map)` with each tap's (ensemble-averaged) map as
        soon as it is computed; the maps are not kept, so memory holds one tap's map at a time beyond the pass's own."""
        self._tap_sink = sink
        try:
            self._extract(x, list(taps))
        finally:
            self._tap_sink = None

    def _emit(self, feats: dict[str, torch.Tensor], name: str, m: torch.Tensor) -> None:
        """Keep a tap's map in `feats`, or hand it to the sink of `stream_taps`."""
        if self._tap_sink is None:
            feats[name] = m
        else:
            self._tap_sink(name, m.unflatten(0, (-1, self.ensemble)).mean(1) if self.ensemble > 1 else m)

    def _run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)`, through activation checkpointing while training with `set_grad_checkpointing`."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _record(self, feats: dict[str, torch.Tensor], by_loc: dict[str, str], drained) -> None:
        """Keep (or stream) the recorded (location, map) pairs that are taps asked for."""
        for loc, m in drained:
            if loc in by_loc:
                self._emit(feats, by_loc[loc], m)

    # --- completing a denoiser-only checkpoint (`_builder`, after the keys are mapped) ----------------------------
    def completion_files(self, state_dict: dict[str, torch.Tensor]) -> list[WeightFile]:
        """The weight files `complete_weights` reads for a checkpoint with `state_dict`'s keys (values may be on the
        meta device), fetched but not read: the VAE when the checkpoint has none. `_builder` checks that they fit in
        memory with the checkpoint before reading any."""
        from .. import hub  # deferred: only weight loading needs the Hub client

        if self.vae is None or any(k.startswith('vae.') for k in state_dict):
            return []
        if not self.base_repo:
            raise hub.HubError('The checkpoint has no VAE and the model has no base_repo to take it from.')
        path = hub.download(self.base_repo, self.vae_file, what='VAE')
        return [WeightFile('VAE', path, weights_dtype(self.vae), vae_keys, encoder_key)]  # the decoder is not read

    def prompt_encoder_files(self, state_dict: dict[str, torch.Tensor]) -> list[Path]:
        """The text-encoder weight files `complete_weights` reads to encode the prompt for a checkpoint with
        `state_dict`'s keys, fetched but not read: none when the checkpoint holds the asked prompt's embedding or the
        embedding is cached. `_builder` counts them in its memory check."""
        return self.text_encoder_files(self.prompt) if self._encodes_prompt(state_dict) and self.base_repo else []

    def _encodes_prompt(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether loading a checkpoint with `state_dict`'s keys encodes the prompt: it holds no embedding, or a prompt
        was asked that it does not record as its embedding's."""
        return 'prompt_embeds' not in state_dict or (self.prompt_cfg.prompt is not None
                                                     and self.checkpoint_prompt != self.prompt)

    def text_encoder_files(self, prompt: str) -> list[Path]:
        """The text-encoder weight files `prompt_tensors(prompt)` reads ([] when its embedding is cached); families
        that encode prompts override it."""
        return []

    def complete_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a denoiser-only checkpoint lacks: those of `completion_files` and the prompt buffers.

        Called with the model's parameters still on the meta device (`_builder`): each part is read in the dtype of
        the module it goes to (`weights_dtype`), and nothing may read a parameter's value.
        """
        from .. import hub  # deferred: only weight loading needs the Hub client

        parts: dict[str, torch.Tensor] = {}
        for f in self.completion_files(state_dict):
            parts.update(f.keys(hub.load_safetensors(f.path, what=f.what, dtype=f.dtype, select=f.select)))
        if not self._encodes_prompt(state_dict):
            if self.prompt_cfg.prompt is None:  # no prompt asked: the checkpoint's embedding, under its own name
                self.prompt = self.checkpoint_prompt or self.prompt
        elif 'prompt_embeds' in state_dict:
            parts.update(self._asked_prompt(state_dict))
        elif not self.base_repo:
            raise hub.HubError('The checkpoint has no prompt embedding and the model has no base_repo.')
        else:
            parts.update(self.prompt_tensors(self.prompt))
        return parts

    def _asked_prompt(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prompt buffers of the asked prompt over a checkpoint that holds an embedding it does not record as that
        prompt's: the asked prompt is encoded (cached) and wins; the checkpoint's are kept only when they are its."""
        import warnings

        from ..errors import DiffbackboneError

        recorded = 'records no prompt' if self.checkpoint_prompt is None else \
            f'was made for the prompt {self.checkpoint_prompt!r}'
        try:
            if not self.base_repo:
                raise InputError('the model has no base_repo')
            asked = self.prompt_tensors(self.prompt)
        except DiffbackboneError as e:
            raise InputError(
                f'The weights hold a prompt embedding that {recorded}, and prompt={self.prompt!r} was asked: it must '
                f'be encoded with the text encoder of base_repo {self.base_repo!r}, which failed ({e}). Drop the '
                'prompt to use the weights\' own embedding, or give a base_repo whose text encoder can be loaded.') from e
        if all(k in state_dict and state_dict[k].shape == v.shape
               and torch.allclose(state_dict[k].float(), v.float(), rtol=1e-2, atol=1e-2) for k, v in asked.items()):
            return {}  # the checkpoint's embedding is the asked prompt's: kept as stored
        warnings.warn(f'The weights hold the embedding of another prompt (it {recorded}); prompt={self.prompt!r} was '
                      f'encoded with the text encoder of {self.base_repo!r} and is used instead.',
                      PromptReencodedWarning, stacklevel=2)
        return asked

    def finish_loading(self) -> None:
        """What runs once the weights are in (a UNet fuses its LoRA)."""

    @property
    def prunes_before_loading(self) -> bool:
        """Whether `prune_intermediate_layers` may run before the weights are read (then what it drops is never read);
        False where `finish_loading` needs the whole model (a LoRA is fused into every block)."""
        return True


class WeightFile(NamedTuple):
    """A weights file the completion step reads: what it is, its local path, the dtype it is read in, the mapping of
    its keys onto the model's, and the keys read (None: all)."""
    what: str
    path: Path
    dtype: torch.dtype
    keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    select: Optional[Callable[[str], bool]] = None


class PromptReencodedWarning(UserWarning):
    """The weights held another prompt's embedding; the asked prompt was encoded and is used."""


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's weights are read in: its first floating parameter's (a meta one's too)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


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
