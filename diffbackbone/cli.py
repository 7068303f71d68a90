"""Command line: `diffbackbone features IMAGE... --model cleandift_sd21 --out feats.safetensors`.

Subcommands:
    features  extract tap maps of images into a safetensors file (one tensor per tap, images stacked), optionally a
              PCA picture of one tap.
    taps      list a model's taps with channels and strides.
    clean-train  fine-tune a UNet with the CleanDIFT recipe (see `diffbackbone.train`).
    export    write a fine-tuned model as a timm Hub repo, loadable with `hf-hub:ORG/NAME`.
    bench     time our extractor against a plain-diffusers reference (see `diffbackbone.bench`).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ['main', 'build_parser', 'positive_int', 'model_name', 'diffusion_model_name', 'device', 'json_object']


def _lazy(module: str, handler: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler imported only when the subcommand runs (keeps `--help` fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f'.{module}', __package__), handler)(args)

    return run


# ---- argument types: a bad value is `error: argument --flag: ...`, exit 2, before anything runs --------------------
def positive_int(text: str) -> int:
    """A whole number >= 1 (batch sizes, image sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _our_models() -> list[str]:
    """The models diffbackbone registers with timm (importing `diffbackbone.models` registers them)."""
    import timm
    from timm.models import model_entrypoint

    from . import models  # noqa: F401

    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(__package__ + '.')]


def _unknown_model(name: str, candidates: Sequence[str], ours: Sequence[str]) -> argparse.ArgumentTypeError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    shown = ', '.join(n for n in ours if not n.startswith('test_'))
    return argparse.ArgumentTypeError(f'unknown model {name!r}: {hint}diffbackbone models: {shown}; '
                                      'timm.list_models() lists the others')


def model_name(text: str) -> str:
    """A timm model name (`name`, `name.tag`, `hf-hub:org/name`, `local-dir:/path`)."""
    import timm

    ours = _our_models()
    if text.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(text):
        return text
    raise _unknown_model(text, timm.list_models(), ours)


def diffusion_model_name(text: str) -> str:
    """The name of one of diffbackbone's diffusion models (for commands that need its taps)."""
    import timm

    ours = _our_models()
    if text.partition('.')[0] in ours and timm.is_model(text):
        return text
    if timm.is_model(text):
        raise argparse.ArgumentTypeError(f'{text!r} is a timm model but not one of diffbackbone\'s diffusion models: '
                                         f'choose one of {", ".join(ours)}')
    raise _unknown_model(text, ours, ours)


def device(text: str) -> str:
    """A torch device that exists on this machine: cpu, cuda, cuda:N, mps, xpu."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'unknown device {text!r}: use cpu, cuda, cuda:N or mps') from None
    if dev.type == 'cpu':
        return text
    backend = {'cuda': torch.cuda, 'xpu': getattr(torch, 'xpu', None), 'mps': torch.backends.mps}.get(dev.type)
    if backend is None:
        raise argparse.ArgumentTypeError(f'device {text!r} cannot run models here: use cpu, cuda, cuda:N or mps')
    if not backend.is_available():
        raise argparse.ArgumentTypeError(f'{text!r} was asked for but no {dev.type} device is available to torch '
                                         f'{torch.__version__}: use --device cpu, or install a {dev.type} build')
    count = backend.device_count() if hasattr(backend, 'device_count') else 1
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f'{text!r} does not exist: {count} {dev.type} device(s), '
                                         f'{dev.type}:0 to {dev.type}:{count - 1}')
    return text


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (model keyword arguments)."""
    example = '\'{"timestep": 100}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e}): give a JSON object such as {example}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as {example}, got a JSON '
                                         f'{type(value).__name__}: {text}')
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    bench_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='diffbackbone', description='Diffusion UNet features as vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract features of images into a safetensors file')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--model', default='cleandift_sd21', type=model_name,
                   help='timm model name (default: cleandift_sd21)')
    p.add_argument('--taps', nargs='+', help='tap names, indices or a preset (default: the stride 8/16/32/64 pyramid)')
    p.add_argument('--out', required=True, help='output .safetensors file (one (N, C, H, W) tensor per tap)')
    p.add_argument('--size', type=positive_int,
                   help='square input size (default: the model pretrained_cfg input_size)')
    p.add_argument('--batch-size', type=positive_int, default=4)
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=('bfloat16', 'float16', 'float32'), default='float32')
    p.add_argument('--weights', help='local weights file instead of the Hub (pretrained_cfg_overlay file=...)')
    p.add_argument('--random-weights', action='store_true', help='random weights, no download (for trying things out)')
    p.add_argument('--model-kwargs', type=json_object,
                   help='JSON object of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.add_argument('--pca', metavar='TAP', help='also save a PCA picture of this tap next to --out')
    p.set_defaults(func=_lazy('extract', 'run_features'))

    p = sub.add_parser('taps', help="list a model's taps (index, name, channels, stride)")
    p.add_argument('model', type=diffusion_model_name, help='one of diffbackbone\'s models, e.g. cleandift_sd21')
    p.add_argument('--all', action='store_true', help='every activation, not only the block outputs')
    p.set_defaults(func=_lazy('taps_cli', 'run_taps'))

    p = sub.add_parser('export', help='write a fine-tuned model as a timm Hub repo (config.json, model.safetensors)',
                       description='Export a clean-train run or weights file in timm\'s Hub layout; afterwards '
                                   'timm.create_model("hf-hub:ORG/NAME", pretrained=True) loads it by name.')
    p.add_argument('source', help='clean-train run folder (its output .safetensors) or a .safetensors weights file')
    p.add_argument('--out', required=True, help='folder to write (must be new or empty, unless --overwrite)')
    p.add_argument('--model', type=model_name,
                   help='architecture, when the file does not record it (e.g. cleandift_sd21)')
    p.add_argument('--push', metavar='ORG/NAME', help='also upload the folder to this Hub repo (created if needed)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out folder')
    p.add_argument('--model-kwargs', type=json_object,
                   help='JSON object of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.set_defaults(func=_lazy('export', 'run_export'))

    from .train.cli import add_clean_train_parser

    add_clean_train_parser(sub)

    p = sub.add_parser('bench', help='time our extractor against a plain-diffusers reference (same weights)',
                       add_help=False)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == 'bench':
        args.rest = rest
    elif rest:
        parser.error(f'unrecognized arguments: {" ".join(rest)}')
    from .hub import HubError
    from .images import ImageError
    from .models import TapError

    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (HubError, TapError, ImageError, ValueError, OSError) as e:
        # Expected failures (bad input, missing or broken files, no Hub access): one line, no traceback.
        print('error: ' + ' '.join(str(e).split('\n')), file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
