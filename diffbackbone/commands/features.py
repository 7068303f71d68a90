"""`diffbackbone features`: tap maps of images into a feature store folder, or into one safetensors file (the work is
`data.extract.extract_features`)."""
from __future__ import annotations

import argparse
import sys

from ..cli_args import add_model_args, add_prompt_arg, feature_model_name, positive_int

__all__ = ['add_parser', 'run']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `features` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser('features', help='extract features of images into a feature store folder or a '
                                                'safetensors file')
    p.add_argument('images', nargs='+', help='image files, folders (recursive), quoted globs, @list.txt')
    p.add_argument('--model', type=feature_model_name, default='cleandift_sd21',
                   help="one of diffbackbone's models, or an exported one (hf-hub:ORG/NAME) (default: cleandift_sd21)")
    p.add_argument('--taps', nargs='+', help='tap names, indices or a preset (default: the stride 8/16/32/64 pyramid)')
    p.add_argument('--out', required=True, help='feature store folder (resumable), or a .safetensors file for a few '
                   'images (one (N, C, H, W) tensor per tap)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out file or feature store')
    p.add_argument('--size', type=positive_int, help='square input size (default: the model pretrained_cfg input_size)')
    p.add_argument('--resize', choices=('stretch', 'pad', 'crop'), default='stretch',
                   help='stretch: whole image to size x size, as DIFT/CleanDIFT (default); pad: keep the aspect ratio, '
                        'pad with the mean colour; crop: short side to size, centre crop (drops the rest)')
    add_model_args(p, batch_size=4)
    p.add_argument('--pca', metavar='TAP', help='also save a PCA picture of this tap next to --out')
    add_prompt_arg(p)
    _add_store_options(p)
    p.set_defaults(func=run)
    return p


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """Options of the dataset-scale pipeline (diffbackbone/data/pipeline.py, diffbackbone/data/store.py)."""
    p.add_argument('--workers', type=int, help='image decoding processes (default: from the CPU count)')
    p.add_argument('--on-error', choices=('skip', 'fail'), help='unreadable images: skip and list them (store '
                   'default) or stop (single-file default)')
    p.add_argument('--store-dtype', choices=('float16', 'bfloat16', 'float32'),
                   help='dtype of stored maps (default: float16 in a store, float32 in a single file)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--feature-pool', type=positive_int, metavar='R', help='average-pool stored maps by R (Meng et al.)')
    g.add_argument('--feature-size', type=positive_int, metavar='N', help='resize stored maps to N x N (bilinear)')
    p.add_argument('--shard-size', type=positive_int, metavar='N',
                   help='images per store shard (default: about 256 MB)')
    p.add_argument('--compile', nargs='?', const='default', help='torch.compile the model (optional mode)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone features`: Ctrl-C ends it with one line and exit status 130 (a store stays
    resumable: the images extracted so far are flushed and indexed)."""
    from ..cli_args import model_kwargs
    from ..data.extract import ExtractJob, extract_features, is_single_file

    try:
        extract_features(ExtractJob.from_args(args, model_kwargs=model_kwargs(args)))
    except KeyboardInterrupt:
        where = (f'nothing written to {args.out}' if is_single_file(args.out) else
                 f'{args.out} keeps the images extracted so far; run the same command again to resume')
        print(f'interrupted: {where}.', file=sys.stderr)
        return 130
    return 0
