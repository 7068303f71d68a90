"""`diffbackbone depth IMAGE...`: metric depth with CleanDIFT's published depth probe (the predictor is
`diffbackbone.depth`)."""
from __future__ import annotations

import argparse

from ..cli_args import add_model_args, add_prompt_arg, model_name, positive_int

__all__ = ['add_parser', 'run']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `depth` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser(
        'depth', help="metric depth with CleanDIFT's published NYUv2 depth probe (us6, cleandift_sd21)",
        description="CleanDIFT's depth probe as their DepthPred.predict runs it; writes <stem>_depth.npy (metres, "
                    'float32, input size) and <stem>_depth.png per image.')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--out', default='.', help='output folder (default: the current folder)')
    p.add_argument('--probe', help='probe .safetensors file, folder, or Hub repo "org/name[:file]" (default: '
                                   'CompVis/cleandift cleandift_sd21_depth_probe.safetensors)')
    p.add_argument('--model', type=model_name, default='cleandift_sd21', help='timm model (default: cleandift_sd21)')
    p.add_argument('--tap', default='us6', help='tap the probe reads (default: us6)')
    p.add_argument('--size', type=positive_int, default=768, help='square size images are resized to (default: 768)')
    # the predictor encodes the caption itself (`load_depth_predictor`): random weights take one too
    add_prompt_arg(p, default='A photo of a room', help='caption (default: "A photo of a room", CleanDIFT\'s)',
                   needs_weights=False)
    add_model_args(p, batch_size=4)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone depth`."""
    from pathlib import Path

    from ..cli_args import DTYPES, check_size_fits, model_kwargs
    from ..data.images import image_size, open_image, to_tensor
    from ..data.outputs import check_file, check_folder
    from ..depth import DepthError, load_depth_predictor, predict_depth, save_depth

    paths = [Path(p) for p in args.images]
    for p in paths:
        image_size(p)  # a missing or unreadable image fails before anything runs
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise DepthError(f'Several images are named {", ".join(twice)}: their outputs would overwrite each other; '
                         'run them in separate calls with different --out folders.')
    check_size_fits(args.size, args.batch_size, args.device, model=args.model)
    out = check_folder(args.out, 'folder', paths)
    for p in paths:  # before any model loads: no output is an input (`depth a.png a_depth.png`), nor someone's file
        for name in (f'{p.stem}_depth.npy', f'{p.stem}_depth.png'):
            check_file(out / name, paths, option=f'--out (depth of {p.name})')
    kwargs = model_kwargs(args)
    predictor = load_depth_predictor(
        args.model, probe=args.probe, tap=args.tap, size=args.size, prompt=kwargs.pop('prompt'), weights=args.weights,
        pretrained=not args.random_weights, model_kwargs=kwargs, device=args.device, dtype=DTYPES[args.dtype])
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        depths = predict_depth(predictor, [to_tensor(open_image(p)) for p in batch], batch_size=args.batch_size)
        for p, depth in zip(batch, depths):
            npy, png = save_depth(depth, out, p.stem)
            print(f'{p}: depth {depth.min():.3f} .. {depth.max():.3f} m (median {depth.median():.3f}) -> {npy}, {png}')
    return 0
