"""`diffbackbone taps MODEL [--all]`: a model's taps with index, channels, stride and aliases, and its presets."""
from __future__ import annotations

import argparse

import torch

__all__ = ['run_taps']


def run_taps(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone taps`."""
    import timm

    from ..models.taps import list_taps

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
        print(f'{index.get(tap.name, "-"):>5}  {tap.name:<44} {tap.num_chs:>8} {tap.reduction:>6}  {", ".join(tap.aliases)}')
    print('presets: ' + '; '.join(f'{k} = {", ".join(v)}' for k, v in model.presets.items()))
    if not args.all:
        print(f'{len(list_taps(args.model))} taps in all: `diffbackbone taps {args.model} --all` lists every one.')
    return 0
