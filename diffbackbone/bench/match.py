"""Benchmark of `eval spair`'s matching: the reference path (both maps upsampled to the image sizes, cosine, argmax:
`score_pair`) against the batched one (`score_pairs_fast`: source keypoints sampled, every keypoint of the pairs
sharing a target matched at once through `UpsampledTarget`, no upsampled map built), timed in this process on the
same synthetic pairs, with the same matches checked.

    python -m diffbackbone.bench.match                      # SD2.1 us6 at 768 px: 1280 x 48 x 48 maps, 500x375 images
    python -m diffbackbone.bench.match --device cuda --pairs 200

Pairs: `--pairs` sources matched onto `--targets` targets (as SPair's test pairs share targets within a category),
`--keypoints` random keypoints each, random smooth maps. Prints pairs/s of each path and their ratio.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from ..cli_args import device, positive_int

__all__ = ['main', 'make_pairs']


def make_pairs(n: int, targets: int, channels: int, side: int, size: tuple[int, int], keypoints: int, seed: int = 0):
    """`n` synthetic SPair pairs over `targets` target images, with one random (channels, side, side) map per image."""
    from ..evals.spair_data import Pair

    g = torch.Generator().manual_seed(seed)
    w, h = size
    pairs, feats = [], {}
    for i in range(n):
        src, trg = f's{i}', f't{i % targets}'
        kps = [tuple((float(torch.randint(0, w, (1,), generator=g)), float(torch.randint(0, h, (1,), generator=g)))
                     for _ in range(keypoints)) for _ in range(2)]
        pairs.append(Pair(f'{i:06d}', 'bench', src, trg, size, size, kps[0], kps[1], (0.0, 0.0, float(w), float(h))))
        for name in (src, trg):
            if name not in feats:
                feats[name] = torch.randn(channels, side, side, generator=g)
    return pairs, feats


def _time(fn, repeat: int, sync) -> tuple[float, object]:
    best, out = float('inf'), None
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..evals import spair

    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench.match', description=__doc__.split('\n\n')[0])
    p.add_argument('--pairs', type=positive_int, default=6)
    p.add_argument('--targets', type=positive_int, default=2, help='distinct target images among the pairs')
    p.add_argument('--channels', type=positive_int, default=1280, help='feature channels (us6 of SD2.1: 1280)')
    p.add_argument('--map', type=positive_int, default=48, help='feature map side (us6 at 768 px: 48)')
    p.add_argument('--image', default='500x375', help='original image size WxH (SPair images: about 500x375)')
    p.add_argument('--keypoints', type=positive_int, default=10, help='keypoints per pair')
    p.add_argument('--repeat', type=positive_int, default=2, help='timed runs of each path (the best is kept)')
    p.add_argument('--device', type=device, default='cpu')
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.image.lower().split('x'))
    except ValueError:
        p.error(f'--image must be WxH, e.g. 500x375, got {args.image!r}')
    pairs, feats = make_pairs(args.pairs, min(args.targets, args.pairs), args.channels, args.map, (w, h),
                              args.keypoints)
    feats = {k: v.to(args.device) for k, v in feats.items()}
    fn = lambda cat, names: {n: feats[n] for n in names}  # noqa: E731
    sync = torch.cuda.synchronize if torch.device(args.device).type == 'cuda' else (lambda: None)
    print(f'{args.pairs} pairs onto {min(args.targets, args.pairs)} targets, {args.keypoints} keypoints each, maps '
          f'{args.channels} x {args.map} x {args.map}, images {w}x{h}, {args.device}, {torch.get_num_threads()} '
          'threads')
    spair.evaluate(pairs[:1], fn, args.device, fast=True)  # warm-up of both paths
    spair.evaluate(pairs[:1], fn, args.device, fast=False)
    t_ref, ref = _time(lambda: spair.evaluate(pairs, fn, args.device, fast=False), args.repeat, sync)
    t_new, new = _time(lambda: spair.evaluate(pairs, fn, args.device, fast=True), args.repeat, sync)
    same = sum(a == b for a, b in zip(ref.pairs, new.pairs))
    print(f'reference (upsampled maps): {args.pairs / t_ref:10.2f} pairs/s ({t_ref / args.pairs * 1000:.1f} ms a pair)')
    print(f'batched (UpsampledTarget):  {args.pairs / t_new:10.2f} pairs/s ({t_new / args.pairs * 1000:.1f} ms a pair)')
    print(f'{t_ref / t_new:.1f}x faster; same PCK counts in {same}/{args.pairs} pairs')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
