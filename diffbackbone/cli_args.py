"""Argument types and shared options of the command lines (`diffbackbone`, `python -m diffbackbone.bench...`).

Bad values end in argparse's `error: ...` line and exit 2 before anything runs. `--prompt` is declared here
(`add_prompt_arg`) and resolved here (`model_kwargs`) for every command that builds a model. Below every command:
`cli.py`, the command modules, the evaluations and the benchmarks import from here, and this module imports none of
them.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from typing import Optional, Sequence

import torch

from .errors import InputError

__all__ = ['DTYPES', 'model_name', 'diffusion_model_name', 'feature_model_name', 'device', 'positive_int', 'finite_float',
           'positive_float', 'non_negative_float', 'json_object', 'point', 'add_model_args', 'add_prompt_arg',
           'check_prompt', 'model_kwargs', 'check_size_fits', 'fmt_bytes']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}  # `--dtype` values


def _diffusion_models() -> list[str]:
    """The models diffbackbone registers with timm (importing `diffbackbone.models` registers them), but the plain
    timm ones (the tiny DINOv2 of the tests): every model here with taps."""
    import timm
    from timm.models import model_entrypoint

    from .models.fused import PLAIN_TIMM_MODELS

    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(__package__ + '.')
            and n not in PLAIN_TIMM_MODELS]


def _unknown_model(value: str, candidates: Sequence[str]) -> argparse.ArgumentTypeError:
    close = difflib.get_close_matches(value, candidates, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    return argparse.ArgumentTypeError(f'unknown model {value!r}.{hint} Diffusion models: '
                                      f'{", ".join(sorted(_diffusion_models()))}.')


def model_name(value: str) -> str:
    """A registered diffbackbone/timm model name (with an optional `.tag`), `hf-hub:org/name` or `local-dir:PATH`."""
    import timm

    from . import models  # noqa: F401  (registers the models)

    if value.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(value):
        return value
    raise _unknown_model(value, timm.list_models())


def diffusion_model_name(value: str) -> str:
    """The name of one of diffbackbone's diffusion models (commands that need its taps)."""
    import timm

    ours = _diffusion_models()
    if value.partition('.')[0] in ours and timm.is_model(value):
        return value
    if timm.is_model(value):
        raise argparse.ArgumentTypeError(f'{value!r} is a timm model but not a diffusion model of diffbackbone: '
                                         f'choose one of {", ".join(sorted(ours))}.')
    raise _unknown_model(value, ours)


def feature_model_name(value: str) -> str:
    """A model whose taps can be extracted: one of diffbackbone's, or one exported from it (`hf-hub:org/name`,
    `local-dir:PATH`). Other timm models are refused: their stages are not taps."""
    if value.startswith(('hf-hub:', 'local-dir:')):
        return value
    return diffusion_model_name(value)


def device(value: str) -> str:
    """A torch device that exists here."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'invalid device {value!r}: use cpu, cuda, cuda:N or mps.') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f'{value!r}: no CUDA GPU is available here; use --device cpu.')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f'{value!r}: only {torch.cuda.device_count()} CUDA GPU(s) here.')
    elif dev.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'{value!r}: MPS is not available here; use --device cpu.')
    return str(dev)


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a whole number.') from None
    if n < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {n}.')
    return n


def finite_float(value: str) -> float:
    """A number, not nan or inf (the type of every float option)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number.') from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f'{value!r} is not a finite number.')
    return x


def positive_float(value: str) -> float:
    x = finite_float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {x:g}.')
    return x


def non_negative_float(value: str) -> float:
    x = finite_float(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {x:g}.')
    return x


def json_object(value: str) -> dict:
    """A JSON object, e.g. '{"timestep": 100}'."""
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'invalid JSON ({e.msg} at column {e.colno}): give an object such as '
                                         '\'{"timestep": 100}\'.') from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as \'{{"timestep": 100}}\', got a '
                                         f'{type(obj).__name__}.')
    return obj


def point(text: str) -> tuple[float, float]:
    """'X,Y' -> (x, y)."""
    try:
        x, y = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'points are X,Y pixel coordinates, e.g. 120,200; got {text!r}') from None
    return x, y


def add_model_args(p: argparse.ArgumentParser, batch_size: Optional[int] = None) -> None:
    """The options every model-running subcommand shares: batch, device, dtype, weights, model kwargs."""
    if batch_size:
        p.add_argument('--batch-size', type=positive_int, default=batch_size)
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=tuple(DTYPES), default='float32')
    p.add_argument('--weights', help='local weights file instead of the Hub (pretrained_cfg_overlay file=...)')
    p.add_argument('--random-weights', action='store_true', help='random weights, no download (for trying things out)')
    p.add_argument('--model-kwargs', type=json_object,
                   help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')


# ---- the prompt ----------------------------------------------------------------------------------------------------
PROMPT_HELP = 'caption the model is conditioned on, e.g. "a photo of a dog" (default: empty)'


def add_prompt_arg(p: argparse.ArgumentParser, help: str = PROMPT_HELP, default: Optional[str] = None,
                   needs_weights: bool = True) -> None:
    """`--prompt`, resolved by `model_kwargs`. `needs_weights=False`: the command encodes the caption itself (`depth`),
    so random weights may take one."""
    p.add_argument('--prompt', default=default, help=help)
    p.set_defaults(prompt_needs_weights=needs_weights)


def check_prompt(args: argparse.Namespace) -> None:
    """Refuse `--prompt` with `--random-weights` where the prompt's text embedding is computed while pretrained
    weights load: it would be recorded but not applied."""
    needs_weights = getattr(args, 'prompt_needs_weights', True)
    if getattr(args, 'prompt', None) and getattr(args, 'random_weights', False) and needs_weights:
        raise InputError('--prompt needs pretrained weights: its text embedding is computed while they load, so with '
                         '--random-weights it would be recorded but not applied. Drop --prompt or --random-weights.')


def model_kwargs(args: argparse.Namespace) -> dict:
    """The model arguments of a command: `--model-kwargs` with `--prompt` (when given) as `prompt`. Every command that
    builds a model resolves its prompt here."""
    check_prompt(args)
    kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    if getattr(args, 'prompt', None) is not None:
        kwargs['prompt'] = args.prompt
    return kwargs


# ---- sizes that cannot fit ---------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.5 KB, 2.0 GB."""
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
        n /= 1024
    return f'{n:.1f} TB'


def _free_memory(device: str) -> Optional[int]:
    """Bytes free for tensors on `device` (CPU: MemAvailable), None when unknown."""
    dev = torch.device(device)
    if dev.type == 'cuda':
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == 'cpu':
        try:
            with open('/proc/meminfo') as f:
                for line in f:
                    if line.startswith('MemAvailable:'):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_size_fits(size: Optional[int], batch_size: int, device: str, option: str = '--size',
                    model: Optional[str] = None) -> None:
    """The one size rule of every command, before any model loads: at least `model`'s smallest input side (its
    pretrained cfg's `min_input_size`), and an input batch (decoded as float32) that fits in `device`'s free memory
    (the model's own activations need many times more)."""
    if not size:
        return
    low = _min_side(model) if model else None
    if low and size < low:
        raise InputError(f'{option} {size}: {model} takes images of at least {low} x {low} px. Use {option} {low} or '
                         'more.')
    need = batch_size * 3 * size * size * 4
    free = _free_memory(device)
    if free is not None and need > free:
        raise InputError(f'{option} {size}: one batch of {batch_size} input image(s) alone needs {fmt_bytes(need)} '
                         f'({batch_size} x 3 x {size} x {size} float32), more than the {fmt_bytes(free)} free on '
                         f'{device}, and the model needs many times that. Use a smaller {option} (diffusion models '
                         'are trained at 512 to 1024 px).')


def _min_side(model: str) -> Optional[int]:
    """A registered model's smallest input side (None when its cfg does not say: exported `hf-hub:` models)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model)
    except (RuntimeError, ValueError, KeyError):
        return None
    side = cfg and (cfg.min_input_size or cfg.input_size)
    return int(side[-1]) if side and cfg.min_input_size else None
