"""`diffbackbone taps MODEL [--all]`: a model's taps with index, channels, stride and aliases, its presets and (with
`--all`) what each kind of attention-map tap holds."""
from __future__ import annotations

import argparse

import torch

from ..cli_args import diffusion_model_name

__all__ = ['add_parser', 'run', 'map_notes']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `taps` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser('taps', help="list a model's taps (index, name, channels, stride)")
    p.add_argument('model', type=diffusion_model_name, help="one of diffbackbone's models, e.g. cleandift_sd21")
    p.add_argument('--all', action='store_true', help='every activation, not only the block outputs')
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone taps`."""
    import timm

    from ..models._attention import MAP_HOOKS
    from ..models._taps import list_taps

    with torch.device('meta'):  # no weights, no download
        model = timm.create_model(args.model)
    if not hasattr(model, 'taps'):  # a fused diffusion + DINOv2 backbone: its own short list
        print(f'{"index":>5}  {"name":<44} {"channels":>8} {"stride":>6}')
        for i, info in enumerate(model.feature_info):
            print(f'{i:>5}  {info["name"]:<44} {info["num_chs"]:>8} {info["reduction"]:>6}')
        print(f'presets: raw = {", ".join(model.tap_names()[1:])}')
        return 0
    index = {t.name: i for i, t in enumerate(model.taps)}
    taps = list_taps(args.model) if args.all else sorted(model.taps, key=lambda t: t.seq)
    print(f'{"index":>5}  {"name":<44} {"channels":>8} {"stride":>6}  aliases')
    for tap in taps:
        print(f'{index.get(tap.name, "-"):>5}  {tap.name:<44} {tap.num_chs:>8} {tap.reduction:>6}  '
              f'{", ".join(tap.aliases)}')
    print('presets: ' + '; '.join(f'{k} = {", ".join(v)}' for k, v in model.presets.items()))
    if not args.all:
        print(f'{len(list_taps(args.model))} taps in all: `diffbackbone taps {args.model} --all` lists every one.')
    elif any(t.hook in MAP_HOOKS for t in taps):
        for line in map_notes(model, taps):
            print(line)
    return 0


def map_notes(model, taps) -> list[str]:
    """Lines saying, per kind of map tap, its shape, its reduction, and the unreduced map's shape and memory."""
    from ..models._attention import MAP_HOOKS, MAP_REDUCTIONS, map_shapes

    size = model.pretrained_cfg.get('input_size', (3, 512, 512))[1:]
    full_kwarg = ('model kwarg attn_maps="full" keeps them unreduced' if hasattr(model, 'attn_maps')
                  else 'this model gives them reduced only')
    lines = [f'attention maps (N = H x W image tokens; {full_kwarg}):']
    for hook in MAP_HOOKS:
        kind = [t for t in taps if t.hook == hook]
        if not kind:
            continue
        reduced, how, full = MAP_REDUCTIONS[hook]
        joint = ', joint prompt + image attention' if hook.startswith('joint') else ''

        def elements(t, hook=hook) -> int:
            grid = (size[0] // t.reduction, size[1] // t.reduction)
            shape = map_shapes(hook, model.get_submodule(t.module).heads, t.num_chs, grid, full=True)
            return shape[0] * shape[1] * shape[2]

        biggest = max(kind, key=elements)
        tap = hook.split('-', 1)[1] if joint else hook
        lines.append(f'  *-{tap} ({len(kind)} taps{joint}): {reduced}, {how}. Unreduced: {full}, at '
                     f'{size[0]}x{size[1]} px up to {elements(biggest) * 4 / 2 ** 20:.0f} MiB per image and map in '
                     f'float32 ({biggest.name}).')
    return lines
