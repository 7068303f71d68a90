"""What the DIFT evaluations (`eval hpatches`, `eval davis`) share: the noise timestep default, the lazily built model,
the feature cache's configuration and the check of the outputs (`data.outputs`, as every command)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data.outputs import check_distinct_outputs, check_file, check_folder
from ..errors import InputError
from ..models._builder import features_revision
from .feature_cache import FeatureCache, weights_fingerprint

__all__ = ['noisy_model', 'eval_model_kwargs', 'model_builder', 'lora_fingerprint', 'feature_cache', 'check_outputs']


def noisy_model(name: str) -> Optional[bool]:
    """True for a model that noises its latent at a timestep (sd21, sd15, ...), False for a clean or fused one, None
    when it cannot be told without downloading (`hf-hub:` / `local-dir:` names). Built on the meta device: no memory,
    no weights."""
    import timm

    import diffbackbone  # noqa: F401  (registers the models)

    if not timm.is_model(name):
        return None
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False)
    return getattr(model, 'clean', None) is False


def eval_model_kwargs(args: argparse.Namespace, default_timestep: int) -> dict[str, Any]:
    """`--model-kwargs` (with `--prompt`, `cli_args.model_kwargs`) plus the timestep: `--timestep` when given, else
    the protocol's for a noisy model (clean and fused models keep their own, e.g. CleanDIFT's learned one)."""
    from ..cli_args import model_kwargs

    kwargs = model_kwargs(args)
    timestep = getattr(args, 'timestep', None)
    if 'timestep' in kwargs and timestep is not None:
        raise InputError('Give the timestep once: --timestep or "timestep" in --model-kwargs, not both.')
    if timestep is not None:
        kwargs['timestep'] = timestep
    elif 'timestep' not in kwargs and noisy_model(args.model):
        kwargs['timestep'] = default_timestep
    return kwargs


def model_builder(args: argparse.Namespace, tap: str, kwargs: dict[str, Any]) -> Callable[[], torch.nn.Module]:
    """A function building the one-tap model when the first feature is missing from the cache."""
    from ..cli_args import DTYPES
    from ..correspondence import load_tap_model

    if args.weights and not Path(args.weights).is_file():
        raise InputError(f'--weights {args.weights}: no such file. Give a local .safetensors checkpoint.')

    def build() -> torch.nn.Module:
        if args.random_weights:
            torch.manual_seed(args.seed)  # reproducible random weights, so their cached features stay valid
        return load_tap_model(args.model, tap, weights=args.weights, pretrained=not args.random_weights,
                              device=args.device, dtype=DTYPES[args.dtype], model_kwargs=kwargs)

    return build


def lora_fingerprint(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`{'lora': identity}` of the `lora` model argument (a Hub commit or the file's sha256, `models.lora`), so that a
    cache keyed by it changes when the LoRA changes under the same name; `{}` without a LoRA (keys stay as before)."""
    spec = kwargs.get('lora')
    if not spec:
        return {}
    from ..models.conditioning.lora import lora_spec, resolve_lora

    spec, _ = lora_spec(spec, kwargs.get('lora_scale', 1.0))
    return {'lora': resolve_lora(spec)[1]}


def feature_cache(args: argparse.Namespace, tap: str, kwargs: dict[str, Any], **protocol: Any
                  ) -> Optional[FeatureCache]:
    """The `--cache` folder for these features (None without `--cache`); `protocol` names what else shapes them."""
    if not args.cache:
        return None
    cache = FeatureCache(args.cache, dict(
        model=args.model, weights=weights_fingerprint(args.weights), random_weights=args.random_weights and args.seed,
        tap=tap, dtype=args.dtype, model_kwargs=kwargs, **lora_fingerprint(kwargs), **features_revision(args.model),
        **protocol))
    print(f'feature cache: {cache.folder}')
    return cache


def check_outputs(args: argparse.Namespace, inputs: list[Optional[str]]) -> None:
    """Check `--cache`, `--masks` (folders) and `--json` before anything is read or built, with the check every command
    makes (`data.outputs`): never an input (`inputs`: the data, the keypoints, a feature store read) or inside one,
    never a file diffbackbone did not write; our own earlier `--json` is replaced."""
    inputs = [p for p in inputs if p]
    cache, masks = getattr(args, 'cache', None), getattr(args, 'masks', None)
    check_distinct_outputs({'--json': args.json}, {'--store': getattr(args, 'store', None), '--cache': cache,
                                                   '--masks': masks})
    if cache:
        check_folder(cache, 'folder', inputs, option='--cache')
    if masks:
        check_folder(masks, 'folder', inputs, option='--masks')
    if args.json:
        check_file(args.json, inputs + [p for p in (cache, masks) if p], option='--json')
