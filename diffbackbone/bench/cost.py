"""What a model costs per image at its native size: FLOPs and parameters (meta device, nothing downloaded), and the
activation peak of one bf16 forward on the CPU.

    python -m diffbackbone.bench.cost flops flux flux_schnell pixart_sigma
    python -m diffbackbone.bench.cost memory flux --blocks 1

FLOPs are counted by torch's `FlopCounterMode` on the meta device for the `pyramid` taps (VAE included). `memory`
builds the model with full-width blocks and random weights in bf16, keeps `--blocks` blocks of each kind (one block's
temporaries are what a pass holds at a time, so depth does not change the peak), and reports the RSS peak of one
forward above the RSS before it (sampled every millisecond), next to the full model's weights.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import models  # noqa: F401  (registers the models)
from .speed import _RSSPeak
from ..cli_args import diffusion_model_name, positive_int

__all__ = ['count', 'activation_peak', 'main']


def _native_size(name: str) -> int:
    return timm.get_pretrained_cfg(name).input_size[-1]


def count(name: str, size: Optional[int] = None) -> tuple[float, int]:
    """(GFLOP per image of the `pyramid` features, parameters) at `size` (default: the model's native size)."""
    size = size or _native_size(name)
    with torch.device('meta'):
        m = timm.create_model(name, features_only=True, check_inputs=False).eval().requires_grad_(False)
        x = torch.empty(1, 3, size, size)
    m.model._check_size(x.shape[-2:])  # inputs are not checked on meta tensors, the size rule still applies
    if hasattr(m.model.vae, 'force_upcast'):
        m.model.vae.force_upcast = False  # autocast does not exist on the meta device; same FLOPs
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    return fc.get_total_flops() / 1e9, sum(p.numel() for p in m.parameters())


def activation_peak(name: str, blocks: int = 1, size: Optional[int] = None) -> tuple[int, int]:
    """(RSS peak above the baseline of one bf16 forward, bytes of the kept blocks' weights) on the CPU."""
    size = size or _native_size(name)
    with torch.device('meta'):
        full = timm.create_model(name)
    cfg = dict(full.transformer.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith('_')}
    cfg.update({k: blocks for k in ('num_layers', 'num_single_layers') if k in cfg})
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = timm.create_model(name, transformer_cfg=cfg, features_only=True, out_indices=1).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.rand(1, 3, size, size, dtype=torch.bfloat16) * 2 - 1
    with torch.no_grad(), _RSSPeak() as peak:
        m(x)
    return peak.peak - peak.base, sum(t.numel() * t.element_size() for t in m.parameters())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench.cost', description=__doc__.split('\n\n')[0])
    p.add_argument('what', choices=('flops', 'memory'))
    p.add_argument('models', nargs='+', type=diffusion_model_name, metavar='MODEL')
    p.add_argument('--size', type=positive_int, help='square input side (default: each model\'s native size)')
    p.add_argument('--blocks', type=positive_int, default=1, help='memory: blocks of each kind kept (default 1)')
    args = p.parse_args(argv)
    if args.what == 'memory':
        unets = [n for n in args.models if not timm.get_pretrained_cfg(n).hf_hub_filename.startswith('transformer/')]
        if unets:
            p.error(f'memory measures the diffusion transformers (pixart_*, flux*), not {", ".join(unets)}; '
                    'use `flops` for them, or `python -m diffbackbone.bench` for the UNets.')
    for name in args.models:
        size = args.size or _native_size(name)
        try:
            gflop, params = count(name, size)
        except ValueError as err:  # the model's size rule
            p.error(f'{name} at {size} px: {err}')
        line = f'{name} {size}px pyramid: {gflop:.0f} GFLOP/img, params {params / 1e9:.2f}B = {params * 2 / 2**30:.2f} GiB in bf16'
        if args.what == 'memory':
            t0 = time.perf_counter()
            peak, _ = activation_peak(name, args.blocks, size)
            line += f'; activation peak (CPU, batch 1, bf16) {peak / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)'
        print(line, flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
