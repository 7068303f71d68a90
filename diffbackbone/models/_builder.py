"""Building a diffusion backbone as timm builds its models, with the package's loading rules.

`build_diffusion_model` is the one place that builds, loads, completes and wraps; the steps in order:
docs/speed.md#cold-start and docs/development.md#layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ..errors import InputError
from ._options import Options

__all__ = ['features_revision', 'build_diffusion_model', 'option_params', 'group_kwargs', 'pretrained_checkpoint',
           'Checkpoint', 'check_keys', 'empty_weights', 'assign_weights', 'assigning_loads', 'resolve_dtype',
           'load_weights', 'build_composite', 'check_memory', 'PROMPT_KEY']

_KEEP = ('vae.',)  # keys read as stored (see `pretrained_checkpoint`)
PROMPT_KEY = 'diffbackbone.prompt'  # safetensors metadata: the prompt of the file's `prompt_embeds` (our writers)

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
Select = Optional[Callable[[str], bool]]  # the checkpoint keys to read (None: all)
# a composite model's part: the taps it will be asked for, or a function of the built part giving them
PruneTo = Union[Sequence[str], Callable[[nn.Module], Sequence[str]]]


def _prune_to(net: nn.Module, prune_to: PruneTo) -> None:
    net.prune_intermediate_layers(list(prune_to(net) if callable(prune_to) else prune_to))


def option_params(cls: type) -> dict[str, type[Options]]:
    """{constructor parameter: option type} of a family class."""
    hints = typing.get_type_hints(cls.__init__)
    return {name: tp for name, tp in hints.items() if isinstance(tp, type) and issubclass(tp, Options)}


class UnknownArgumentError(InputError, TypeError):
    """A model argument no constructor takes: a `TypeError`, as timm's factory contract (and Python) has it."""


def group_kwargs(cls: type, kwargs: dict[str, Any], internal: Sequence[str] = ()) -> dict[str, Any]:
    """Constructor arguments of `cls` from flat keyword arguments: option fields are grouped into their objects (an
    option object may also be given whole, by its parameter name); anything else must be a constructor parameter."""
    kwargs = dict(kwargs)
    options = option_params(cls)
    plain = set(inspect.signature(cls.__init__).parameters) - {'self'} - set(options)
    fields = {f for tp in options.values() for f in tp.field_names()}
    unknown = sorted(set(kwargs) - plain - fields - set(options))
    if unknown:
        valid = sorted((plain - set(internal)) | fields)
        raise UnknownArgumentError(f'Unknown model argument(s) {", ".join(unknown)}. Model arguments: '
                                   f'{", ".join(valid)}.')
    out = {k: v for k, v in kwargs.items() if k in plain}
    params = inspect.signature(cls.__init__).parameters
    for name, tp in options.items():
        given = kwargs.get(name)
        taken = {k: kwargs[k] for k in tp.field_names() if k in kwargs}
        if given is not None and taken:
            raise InputError(f'Give {name} or its fields ({", ".join(sorted(taken))}), not both.')
        default = params[name].default  # the family's defaults (a UNet's head tap, FLUX's 28 steps)
        out[name] = given if given is not None else dataclasses.replace(default, **taken) \
            if isinstance(default, tp) else tp(**taken)
    return out


@dataclasses.dataclass
class Checkpoint:
    """The checkpoint a pretrained cfg names, fetched but not read yet: its tensors on the meta device (names, shapes,
    dtypes from the file's header: what the key mapping and the completion step need), `nbytes(select)` the bytes the
    selected tensors take once read in `dtype`, `read(select)`, and a single file's header metadata (`PROMPT_KEY`: the
    prompt of its `prompt_embeds`)."""
    meta: dict[str, torch.Tensor]
    nbytes: Callable[[Select], int]
    read: Callable[[Select], dict[str, torch.Tensor]]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def pretrained_checkpoint(cfg: dict, what: str, dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """The checkpoint a pretrained cfg names: its `state_dict`, its local `file` (a `.safetensors`, or the
    `.index.json` of a sharded one) or its Hub file (`hf_hub_id` + `hf_hub_filename`), read through `hub.py` so a
    truncated or corrupted cached file is removed and fetched again on the next call.

    Files are read in `dtype` (`hub.load_safetensors`), in the load step, after the check that they and the files
    the completion reads fit in memory (`_load_step`). A VAE in the file (our own checkpoints) is left as stored: a
    family may keep it in float32 (SDXL's, in float16), and `assign_weights` casts it once the model's dtypes are known.
    """
    from .. import hub

    if cfg.get('state_dict') is not None and cfg.get('source') != 'hf-hub':
        sd = cfg['state_dict']
        return Checkpoint({k: v.to('meta') for k, v in sd.items()}, lambda select: 0,
                          lambda select: {k: v for k, v in sd.items() if select is None or select(k)})
    if cfg.get('file') and cfg.get('source') != 'hf-hub':
        path = Path(cfg['file']).expanduser()
        if not path.is_file():
            raise hub.HubError(f'Could not get {what}: {path} does not exist or is not a file. Give the path of a '
                               '.safetensors weights file (or the .safetensors.index.json of a sharded one).')
        if path.name.endswith('.index.json'):
            paths = hub.sharded_safetensors_files(str(path.parent), path.name, what=what)
            return _sharded(str(path.parent), path.name, paths, what, dtype)
    elif cfg.get('hf_hub_id'):
        repo, filename = cfg['hf_hub_id'], cfg.get('hf_hub_filename') or 'model.safetensors'
        if filename.endswith('.index.json'):  # sharded (FLUX's transformer)
            paths = hub.sharded_safetensors_files(repo, filename, what=what)
            return _sharded(repo, filename, paths, what, dtype)
        path = hub.download(repo, filename, what=what)
    else:
        raise hub.HubError(f'{what} have no source: give pretrained_cfg_overlay=dict(file=...) or '
                           "dict(hf_hub_id='org/name'), or pretrained=False.")
    return Checkpoint(hub.safetensors_meta(path, dtype=dtype, keep=_KEEP),
                      lambda select: hub.safetensors_nbytes(path, dtype, select),
                      lambda select: hub.load_safetensors(path, what=what, dtype=dtype, keep=_KEEP, select=select),
                      hub.safetensors_metadata(path))


def _sharded(repo: str, index_file: str, paths: dict[str, Path], what: str,
             dtype: Optional[torch.dtype]) -> Checkpoint:
    """A sharded checkpoint (its index, its shards fetched as `paths`) as a `Checkpoint`."""
    from .. import hub

    return Checkpoint(hub.safetensors_meta(*paths.values(), dtype=dtype, keep=_KEEP),
                      lambda select: sum(hub.safetensors_nbytes(p, dtype, select) for p in paths.values()),
                      lambda select: hub.load_sharded_safetensors(repo, index_file, what=what, dtype=dtype, keep=_KEEP,
                                                                  select=select))


def check_keys(state_dict: dict[str, torch.Tensor], model: nn.Module,
               own: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Every key of the model (`own`: its state dict before it was pruned) but its classifier, of the model's shapes,
    and nothing else (timm then loads strictly or, when the classifier changes size, without it)."""
    from ..hub import HubError  # a RuntimeError: what timm users catch for a bad checkpoint

    own = {k: v for k, v in (model.state_dict() if own is None else own).items() if not k.startswith('head.')}
    got = {k for k in state_dict if not k.startswith('head.')}
    missing, unexpected = sorted(own.keys() - got), sorted(got - own.keys())
    resized = [f'{k} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})' for k, v in own.items()
               if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or resized:
        raise HubError(
            f'Checkpoint does not match {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}, {len(resized)} of other shapes {resized[:3]}. Is '
            'it for another architecture (SD1.5 vs SD2.1)? Give weights of this model, or pick the model they are for.')


_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


# Bumped for a family when its features change, so that feature caches and stores made before are not reused.
_FEATURES_REVISION = {
    'diffbackbone.models.fused': 2,  # 2: sd-dino's sliding window and posterior mean (#27)
    'diffbackbone.models.multi': 2,  # 2: a member of another size gets the input resized bicubically, not bilinearly
}


def features_revision(model_name: str) -> dict[str, int]:
    """`{'features_revision': n}` for a cache or store key when the model's family changed its features since the
    first release, else `{}` (so the keys of every other model stay as they were)."""
    from timm.models import is_model, model_entrypoint

    if not is_model(model_name):
        return {}
    revision = _FEATURES_REVISION.get(model_entrypoint(model_name).__module__, 1)
    return {'features_revision': revision} if revision > 1 else {}


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A model's `dtype=` argument: a floating torch dtype or its name ('float32', 'bfloat16', 'float16')."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix('torch.') in _DTYPES:
        return _DTYPES[dtype.removeprefix('torch.')]
    raise InputError(f"dtype must be one of {', '.join(_DTYPES)} (or the torch dtype), got {dtype!r}.")


_REGISTER = nn.Module.register_parameter


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no memory and no random initialisation (the
    weights are assigned afterwards, `assign_weights`). Buffers are built as usual: the non-persistent ones (noise
    schedule steps, SDXL's size ids, PixArt's position table) are computed by the constructor and in no checkpoint.

    As accelerate's `init_empty_weights` (diffusers' `low_cpu_mem_usage`), `nn.Module.register_parameter` is
    patched while the block runs, so do not build other modules in other threads meanwhile.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to('meta'), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy where its memory-mapped data does not start on a 64-byte boundary: CPU kernels pick their code
    path by alignment, and an unaligned weight changes the last bits of the features (4e-7 seen on a tiny UNet)."""
    return t.clone() if t.data_ptr() % 64 else t


def assign_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Make `state_dict`'s tensors the model's own (`load_state_dict(assign=True)`, cast where the model's dtype
    differs), then initialise what is still on the meta device as its constructor would (a new classifier)."""
    own = model.state_dict()
    state_dict = {k: _aligned(v if v.dtype == own[k].dtype else v.to(own[k].dtype))
                  for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(state_dict, strict=False, assign=True)
    _init_meta(model)


@contextlib.contextmanager
def assigning_loads() -> Iterator[None]:
    """Inside, `load_state_dict` into a model with parameters on the meta device (built inside `empty_weights`) gives
    it copies of the tensors in its own dtypes (not copies into nothing), and what no tensor came for is initialised
    as its constructor would: how another library's loader (timm's `load_pretrained` of a DINOv2) loads a model built
    without a random initialisation. Patches `nn.Module.load_state_dict` while the block runs, as `empty_weights`."""
    load = nn.Module.load_state_dict

    def assigning(module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if assign or not any(p.is_meta for p in module.parameters()):
            return load(module, state_dict, strict=strict, assign=assign)
        own = module.state_dict()
        state_dict = {k: v.to(own[k].dtype if k in own else v.dtype, copy=True) for k, v in state_dict.items()}
        patched, nn.Module.register_parameter = nn.Module.register_parameter, _REGISTER  # inside `empty_weights`
        try:  # the assigned tensors must stay, not go to the meta device as new parameters do there
            out = load(module, state_dict, strict=strict, assign=True)
            _init_meta(module)
        finally:
            nn.Module.register_parameter = patched
        return out

    nn.Module.load_state_dict = assigning
    try:
        yield
    finally:
        nn.Module.load_state_dict = load


def _init_meta(model: nn.Module) -> None:
    """Initialise the modules whose tensors are still on the meta device (`reset_parameters`)."""
    for name, module in model.named_modules():
        if any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            if not hasattr(module, 'reset_parameters'):
                raise RuntimeError(f'{name or type(model).__name__} has tensors that no checkpoint gives and no '
                                   'reset_parameters to initialise them.')
            module.to_empty(device='cpu', recurse=False)
            module.reset_parameters()


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], filter_fn: FilterFn) -> nn.Module:
    """Load a checkpoint into a built model as `build_diffusion_model` does: map its keys, complete the model from its
    base repo, check every key, load, finish (a LoRA is fused). A model built inside `empty_weights` gets the tensors
    assigned (`assign_weights`: no random initialisation, no copy)."""
    state_dict = filter_fn(state_dict, model)
    state_dict = {**state_dict, **model.complete_weights(state_dict)}
    check_keys(state_dict, model)
    if any(t.is_meta for t in model.parameters()):
        assign_weights(model, state_dict)
    else:
        model.load_state_dict(state_dict, strict=True)
    model.finish_loading()
    return model


def check_memory(model: nn.Module, meta: dict[str, torch.Tensor], nbytes: int, what: str,
                 dtype: Optional[torch.dtype]) -> None:
    """The one memory check before a model's weights are read: the checkpoint's `nbytes` (its keys mapped onto the
    model in `meta`), the files the completion reads, the text encoder of an uncached prompt and the weights announced
    to come after it (`hub.weights_to_come`: a fused model's DINOv2, a multi model's later members)."""
    from .. import hub

    files = model.completion_files(meta)
    parts = [(f.what, hub.safetensors_nbytes(f.path, f.dtype, f.select)) for f in files]
    encoders = model.prompt_encoder_files(meta)  # loaded in float32, once, to encode an uncached prompt
    if encoders:
        parts.append(('text encoder', sum(hub.safetensors_nbytes(p, torch.float32) for p in encoders)))
    parts += hub.pending_weights()
    names = list(dict.fromkeys(name for name, _ in parts))
    with_parts = f' with {", ".join(names[:-1])} and {names[-1]}' if len(names) > 1 else \
        f' with {names[0]}' if names else ''
    hub.check_fits(nbytes + sum(n for _, n in parts), what + with_parts, dtype)


def _load_step(filter_fn: FilterFn, checkpoint: list[Checkpoint], what: str, dtype: Optional[torch.dtype],
               prune: Callable[[nn.Module], None]) -> FilterFn:
    """timm's `pretrained_filter_fn`: prune the model to what it will compute (`prune`: the `features_only` taps, a
    classifier's head tap) so the rest is never read; check that the checkpoint's remaining tensors (`checkpoint[0]`,
    taken once: timm is handed a placeholder, since it deep-copies its pretrained cfg, twice with `features_only`) and
    every file the completion will read fit in memory, before any is read; read and map them, complete the model from
    its base repo, check every key against the unpruned model, assign the tensors and finish loading; timm's own load
    of the returned state dict then puts each tensor onto itself. The model learns the prompt the checkpoint records
    for its embedding (`PROMPT_KEY`)."""
    from .. import hub

    def load(placeholder: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        source = checkpoint.pop()
        model.checkpoint_prompt = source.metadata.get(PROMPT_KEY)
        meta = filter_fn(source.meta, model)
        whole = model.state_dict()  # the keys a checkpoint of this model holds, pruned or not
        origin = {id(v): k for k, v in source.meta.items()}  # a mapped tensor's checkpoint key
        renamed = all(id(v) in origin for v in meta.values() if v.is_meta)  # else the mapping made tensors anew
        if renamed:
            prune(model)
        kept = model.state_dict().keys()
        select = {origin[id(v)] for k, v in meta.items() if k in kept and id(v) in origin}.__contains__ \
            if renamed else None
        check_memory(model, meta, source.nbytes(select), what, dtype)
        if renamed:  # the mapping found on the headers, applied to the tensors read; the unread stay on meta
            read = source.read(select)
            state_dict = {k: read.get(origin.get(id(v)), v) for k, v in meta.items()}
        else:
            state_dict = filter_fn(source.read(None), model)
        state_dict = {**state_dict, **model.complete_weights(state_dict)}
        check_keys(state_dict, model, whole)
        state_dict = {k: v for k, v in state_dict.items() if k in kept}
        unread = [k for k, v in state_dict.items() if v.is_meta]
        if unread:
            raise RuntimeError(f'{what}: {unread[:3]} were not read, but the pruned model keeps them.')
        assign_weights(model, state_dict)
        model.finish_loading()
        return model.state_dict()

    return load


def _build(cls: type, internal: Sequence[str], pretrained: bool,
           dtype: Optional[torch.dtype]) -> Callable[..., nn.Module]:
    """The model constructor timm calls: with pretrained weights the parameters stay empty until they are assigned;
    the model is cast to `dtype` (on the meta device, the cast costs nothing and tells the load step each tensor's
    dtype: SDXL's VAE stays float32 in float16)."""

    def build(**kwargs: Any) -> nn.Module:
        with empty_weights() if pretrained else contextlib.nullcontext():
            model = cls(**group_kwargs(cls, kwargs, internal))
        return model if dtype is None else model.to(dtype)

    return build


def build_diffusion_model(cls: type, variant: str, pretrained: bool, filter_fn: FilterFn,
                          internal: Sequence[str] = (), **kwargs: Any) -> nn.Module:
    """timm's `build_model_with_cfg` for a diffusion family class (see the module docstring).

    `internal`: constructor parameters the entry points set (architecture configs), left out of the error that lists
    the valid arguments. `features_only` defaults to the model's own 'pyramid' preset, not every tap. `dtype` (a
    torch dtype or its name) loads the weights in that dtype; random weights are initialised in float32 and cast.
    `prune_to` (a composite model's part: tap names, or a function of the built model giving them) drops the blocks no
    such tap needs, before the weights are read.
    """
    from .. import hub

    dtype = resolve_dtype(kwargs.pop('dtype', None))
    device = kwargs.pop('device', None)  # timm's factory argument: the model is built, then moved there
    prune_to: Optional[PruneTo] = kwargs.pop('prune_to', None)
    out_indices = kwargs.pop('out_indices', None)
    out_indices = 'pyramid' if out_indices is None else tuple(out_indices) if isinstance(out_indices, list) \
        else out_indices
    overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
    what = f'weights of {variant}'
    errors = lambda: hub.hub_errors(what, repo=overlay.get('hf_hub_id'), filename=overlay.get('file'))  # noqa: E731
    if pretrained:
        with errors():
            cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                         pretrained_cfg_overlay=overlay).to_dict()
            checkpoint = [pretrained_checkpoint(cfg, what, dtype or torch.float32)]  # read in the load step
            overlay = dict(overlay, state_dict={'checkpoint': torch.zeros(())}, source=None)  # see _load_step
    feature_cfg = dict(out_indices=out_indices, feature_cls='getter')
    features_only = kwargs.get('features_only', False)

    def prune(net: nn.Module) -> None:  # before the weights are read, so that what is dropped is never read
        if not net.prunes_before_loading:
            return
        if prune_to is not None:
            _prune_to(net, prune_to)
        if features_only:  # as timm's feature wrapper will, which then finds nothing more to drop
            taken = net.prune_intermediate_layers(out_indices, prune_norm=True)
            feature_cfg['out_indices'] = tuple(net.taps[i].name for i in taken)  # indices may have moved
        elif net.num_classes > 0:
            net.prune_intermediate_layers([net.head_tap], prune_head=False)

    try:
        with errors() if pretrained else contextlib.nullcontext():
            model = build_model_with_cfg(
                _build(cls, internal, pretrained, dtype), variant, pretrained,
                pretrained_filter_fn=_load_step(filter_fn, checkpoint, what, dtype, prune) if pretrained else None,
                pretrained_cfg_overlay=overlay or None, feature_cfg=feature_cfg, **kwargs)
    except RuntimeError as e:  # the key check's error: name the weights that were given
        source = pretrained and (overlay.get('file') or overlay.get('hf_hub_id'))
        if not source or not str(e).startswith('Checkpoint does not match'):
            raise
        raise type(e)(f'Could not use the weights {str(source)!r} for {variant}: {e}') from e
    net = getattr(model, 'model', model)  # the features_only wrapper holds the model
    for m in (model, net):  # the placeholder checkpoint (see _load_step) is no one's business
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
            cfg['state_dict'] = None
    if not pretrained and net.prompt:
        # The prompt's embedding is computed while pretrained weights load; without them it stays zeros until a state
        # dict holding it is loaded. Until then a forward refuses, so a prompt is never recorded without being applied.
        net._prompt_pending = True
        net.register_load_state_dict_post_hook(_prompt_loaded)
    if prune_to is not None:  # done already where the weights allowed it (not a LoRA's, nor built tensors)
        _prune_to(net, prune_to)
    if not features_only and net.num_classes > 0:
        # A classifier uses the denoiser only up to its head tap; drop the rest so every parameter gets a gradient.
        net.prune_intermediate_layers([net.head_tap], prune_head=False)
    return model if device is None else model.to(device)


def _prompt_loaded(module: nn.Module, incompatible) -> None:
    """Post-hook of `load_state_dict`: a state dict holding `prompt_embeds` gives the pending prompt its embedding."""
    if not any(k.endswith('prompt_embeds') for k in incompatible.missing_keys):
        module._prompt_pending = False


_TIMM_ARGS = {'features_only', 'feature_cls', 'pretrained_cfg', 'feature_cfg', 'pretrained_strict', 'cache_dir'}


def build_composite(cls: type, variant: str, pretrained: bool, parts_kwargs: str, filter_fn: FilterFn,
                    overlay_to_parts: bool = True, **kwargs: Any) -> nn.Module:
    """timm's `build_model_with_cfg` for a model made of our models (fused, multi): each part loads its own weights
    (`load_weights`), and the arguments the class does not know (with `pretrained_cfg_overlay` when
    `overlay_to_parts`) go to its parts through the constructor argument `parts_kwargs`. `features_only` defaults to
    every tap."""
    out_indices = kwargs.pop('out_indices', None)
    out_indices = tuple(out_indices) if isinstance(out_indices, list) else out_indices
    device = kwargs.pop('device', None)
    prune_to: Optional[PruneTo] = kwargs.pop('prune_to', None)  # as another composite's part: pruned once loaded
    params = set(inspect.signature(cls.__init__).parameters) - {'self', 'load_weights'}
    known = params | {f for tp in option_params(cls).values() for f in tp.field_names()}
    shared = dict(kwargs.pop(parts_kwargs, None) or {})
    if not overlay_to_parts:
        kwargs.pop('pretrained_cfg_overlay', None)
    for k in list(kwargs):
        if k not in known and k not in _TIMM_ARGS:
            shared[k] = kwargs.pop(k)
    model = build_model_with_cfg(
        lambda **kw: cls(**group_kwargs(cls, kw)), variant, pretrained=False, pretrained_filter_fn=filter_fn,
        load_weights=pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **{parts_kwargs: shared}, **kwargs)
    if prune_to is not None:
        _prune_to(getattr(model, 'model', model), prune_to)
    return model if device is None else model.to(device)
