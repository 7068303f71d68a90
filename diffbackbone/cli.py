"""Command line: `diffbackbone features IMAGE... --model cleandift_sd21 --out feats.safetensors`.

Subcommands:
    features  extract tap maps of images (files, folders, globs, @lists) into a resumable feature store folder
              (`diffbackbone.FeatureStore`; torchrun for several GPUs), or into one safetensors file (one tensor per
              tap, images stacked), optionally with a PCA picture of one tap.
    taps      list a model's taps with channels and strides.
    clean-train  fine-tune a UNet with the CleanDIFT recipe (see `diffbackbone.train`).
    export    write a fine-tuned model as a timm Hub repo, loadable with `hf-hub:ORG/NAME`.
    bench     time our extractor against a plain-diffusers reference (see `diffbackbone.bench`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

import torch

__all__ = ['main', 'build_parser']


def _lazy(module: str, handler: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler imported only when the subcommand runs (keeps `--help` fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f'.{module}', __package__), handler)(args)

    return run


def _cmd_taps(args: argparse.Namespace) -> int:
    import timm

    from .models.taps import list_taps

    with torch.device('meta'):  # no weights, no download
        model = timm.create_model(args.model)
    index = {t.name: i for i, t in enumerate(model.taps)}
    taps = list_taps(args.model) if args.all else sorted(model.taps, key=lambda t: t.seq)
    print(f'{"index":>5}  {"name":<44} {"channels":>8} {"stride":>6}  aliases')
    for tap in taps:
        print(f'{index.get(tap.name, "-"):>5}  {tap.name:<44} {tap.num_chs:>8} {tap.reduction:>6}  {", ".join(tap.aliases)}')
    print('presets: ' + '; '.join(f'{k} = {", ".join(v)}' for k, v in model.presets.items()))
    if not args.all:
        print(f'{len(list_taps(args.model))} taps in all: `diffbackbone taps {args.model} --all` lists every one.')
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    bench_main(args.rest)
    return 0


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """`features` options of the dataset-scale pipeline (diffbackbone/pipeline.py, diffbackbone/store.py)."""
    p.add_argument('--resize', choices=('stretch', 'pad', 'crop'), default='stretch', help='how images reach --size')
    p.add_argument('--workers', type=int, help='image decoding processes (default: from the CPU count)')
    p.add_argument('--on-error', choices=('skip', 'fail'), help='unreadable images: skip and list them (store '
                   'default) or stop (single-file default)')
    p.add_argument('--store-dtype', choices=('float16', 'bfloat16', 'float32'),
                   help='dtype of stored maps (default: float16 in a store, float32 in a single file)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--feature-pool', type=int, metavar='R', help='average-pool stored maps by R (Meng et al.)')
    g.add_argument('--feature-size', type=int, metavar='N', help='resize stored maps to N x N (bilinear)')
    p.add_argument('--shard-size', type=int, metavar='N', help='images per store shard (default: about 256 MB)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output file or store')
    p.add_argument('--compile', nargs='?', const='default', help='torch.compile the model (optional mode)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='diffbackbone', description='Diffusion UNet features as vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract features of images into a feature store folder or a safetensors file')
    p.add_argument('images', nargs='+', help='image files, folders (recursive), quoted globs, @list.txt')
    p.add_argument('--model', default='cleandift_sd21', help='timm model name (default: cleandift_sd21)')
    p.add_argument('--taps', nargs='+', help='tap names, indices or a preset (default: the stride 8/16/32/64 pyramid)')
    p.add_argument('--out', required=True, help='feature store folder (resumable), or a .safetensors file for a few '
                   'images (one (N, C, H, W) tensor per tap)')
    p.add_argument('--size', type=int, help='square input size (default: the model pretrained_cfg input_size)')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=('bfloat16', 'float16', 'float32'), default='float32')
    p.add_argument('--weights', help='local weights file instead of the Hub (pretrained_cfg_overlay file=...)')
    p.add_argument('--random-weights', action='store_true', help='random weights, no download (for trying things out)')
    p.add_argument('--model-kwargs', help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.add_argument('--pca', metavar='TAP', help='also save a PCA picture of this tap next to --out')
    _add_store_options(p)
    p.set_defaults(func=_lazy('extract', 'run_features'))

    p = sub.add_parser('taps', help="list a model's taps (index, name, channels, stride)")
    p.add_argument('model')
    p.add_argument('--all', action='store_true', help='every activation, not only the block outputs')
    p.set_defaults(func=_cmd_taps)

    p = sub.add_parser('export', help='write a fine-tuned model as a timm Hub repo (config.json, model.safetensors)',
                       description='Export a clean-train run or weights file in timm\'s Hub layout; afterwards '
                                   'timm.create_model("hf-hub:ORG/NAME", pretrained=True) loads it by name.')
    p.add_argument('source', help='clean-train run folder (its output .safetensors) or a .safetensors weights file')
    p.add_argument('--out', required=True, help='folder to write (must be new or empty, unless --overwrite)')
    p.add_argument('--model', help='architecture, when the file does not record it (e.g. cleandift_sd21)')
    p.add_argument('--push', metavar='ORG/NAME', help='also upload the folder to this Hub repo (created if needed)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out folder')
    p.add_argument('--model-kwargs', help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')
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
    from .models import TapError

    try:
        return args.func(args)
    except (HubError, TapError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
