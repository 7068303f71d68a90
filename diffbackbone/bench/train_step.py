"""Speed and memory of one clean-train optimizer step, random weights and random images (no data, no download).

    python -m diffbackbone.bench.train_step --arch sd21 --size 768 --batch 8 --precision bf16      # the GPU check
    python -m diffbackbone.bench.train_step --arch test --size 128 --batch 2 --precision fp32 --device cpu

Prints one JSON line: steps/s, images/s, peak memory (CUDA allocator peak on GPUs, process peak RSS on CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence

import torch

from ..train.distill import BASES, CleanDistiller, DistillConfig, build_models


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def bench(arch: str, size: int, batch: int, precision: str, steps: int, warmup: int, device: str, bins: int,
          grad_checkpointing: bool, taps: str) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones."""
    dev = torch.device(device)
    with dev:  # build the weights on the device directly
        models = build_models(arch, pretrained=False)
    config = DistillConfig(taps=taps, bins=bins, precision=precision, warmup=0, grad_checkpointing=grad_checkpointing)
    distiller = CleanDistiller(models, config, device=dev)
    images = torch.rand(batch, 3, size, size, device=dev) * 2 - 1

    def step() -> float:
        loss, _ = distiller.loss(images)
        loss.backward()
        distiller.optimizer.step()
        distiller.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]  # float() syncs every step
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in distiller.trainable)
    return dict(arch=arch, size=size, batch=batch, bins=bins, precision=precision, taps=taps,
                grad_checkpointing=grad_checkpointing, device=str(dev),
                device_name=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu',
                trainable_params_m=round(n_params / 1e6, 1), steps=steps, steps_per_s=round(steps / seconds, 4),
                images_per_s=round(steps * batch / seconds, 3), peak_memory_gib=round(_peak_memory_gib(dev), 2),
                last_loss=round(losses[-1], 4))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench.train_step', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='sd21', choices=sorted(BASES), help='architecture (random weights)')
    p.add_argument('--size', type=int, default=768)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='bf16')
    p.add_argument('--steps', type=int, default=5, help='timed steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    p.add_argument('--bins', type=int, default=3)
    p.add_argument('--taps', default='cleandift')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    print(json.dumps(bench(args.arch, args.size, args.batch, args.precision, args.steps, args.warmup, args.device,
                           args.bins, args.grad_checkpointing, args.taps)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
