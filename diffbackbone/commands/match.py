"""`diffbackbone match SRC TRG --points X,Y ...`: zero-shot correspondence of points between two images (the protocol
is `diffbackbone.correspondence`)."""
from __future__ import annotations

import argparse

from ..cli_args import add_model_args, add_prompt_arg, model_name, point, positive_int

__all__ = ['add_parser', 'run']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `match` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser(
        'match', help='match points of a source image onto a target image (zero-shot correspondence)',
        description="CleanDIFT's correspondence protocol: both images resized to the model's size, one tap upsampled "
                    'to each original size, cosine argmax over the target.')
    p.add_argument('src', help='source image')
    p.add_argument('trg', help='target image')
    p.add_argument('--points', nargs='+', required=True, type=point, metavar='X,Y',
                   help='source points as (x, y) pixels of the original source image, x to the right, y down '
                        '(CleanDIFT\'s notebook lists (y, x) rows)')
    p.add_argument('--model', type=model_name, default='cleandift_sd21', help='timm model (default: cleandift_sd21)')
    p.add_argument('--taps', default='us6', help='the tap to match with (default: us6)')
    add_prompt_arg(p, help='caption to condition the UNet on (default: empty, the model\'s own prompt; CleanDIFT\'s '
                           'notebook uses "A photo of a dog")')
    p.add_argument('--size', type=positive_int, help='square input size (default: the model input_size)')
    p.add_argument('--out', help='picture: source points, each similarity map, matches on the target')
    p.add_argument('--json', help='also write the points and matches, as (x, y) pixels, to this JSON file')
    p.add_argument('--co-pca', nargs='+', type=positive_int, metavar='D',
                   help='fused models (cleandift_sd21_dinov2, ...): reduce each SD tap to D dims by a PCA fitted on '
                        'the two images together, as "A Tale of Two Features" (theirs: 256); --taps is then unused')
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone match`."""
    from pathlib import Path

    from PIL import Image

    from ..cli_args import DTYPES, check_size_fits, model_kwargs
    from ..correspondence import draw_matches, match_images
    from ..data.outputs import check_distinct_outputs, check_file, write_json
    from ..errors import InputError

    if args.out and Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise InputError(f'--out {args.out}: give a picture file name ending in .png or .jpg.')
    check_distinct_outputs({'--out': args.out, '--json': getattr(args, 'json', None)})
    for option in ('out', 'json'):  # before any model loads: never an input, never a file of someone else
        if getattr(args, option, None):
            check_file(getattr(args, option), [args.src, args.trg], option=f'--{option}')
    check_size_fits(args.size, 2, args.device, model=args.model)
    kwargs = model_kwargs(args)
    prompt = kwargs.get('prompt') or ''
    matches, sims = match_images(
        args.src, args.trg, args.points, model=args.model, tap=args.taps, size=args.size, co_pca=args.co_pca,
        weights=args.weights, pretrained=not args.random_weights, device=args.device, dtype=DTYPES[args.dtype],
        model_kwargs=kwargs)
    print(f'prompt: {prompt!r}' + ('' if prompt else ' (the empty prompt; CleanDIFT\'s notebook uses '
                                                      '"A photo of a dog": --prompt)'))
    print('points are (x, y) pixels of the original images, x to the right, y down (CleanDIFT\'s notebook lists '
          '(y, x) rows)')
    for (x, y), (mx, my), sim in zip(args.points, matches, sims):
        print(f'({x:g}, {y:g}) -> ({mx}, {my})  similarity {sim.max().item():.4f}')
    if args.out:
        draw_matches(args.src, args.trg, args.points, matches, sims, args.out)
        print(f'wrote {args.out}')
    if getattr(args, 'json', None):
        write_json(args.json, dict(
            coordinates='(x, y) pixels of the original images, x to the right, y down', src=str(args.src),
            trg=str(args.trg), model=args.model, tap=args.taps, prompt=prompt,
            points=[[float(x), float(y)] for x, y in args.points], matches=[list(m) for m in matches],
            similarity=[round(s.max().item(), 6) for s in sims]), 'match')
        print(f'wrote {args.json}')
    return 0
