"""Where an extractor's time goes: per-block times of the eager forward, and the top operators of a (compiled) call.

Used by `python -m diffbackbone.bench --profile`. Block times come from forward hooks around the units our forward and
diffusers' both call (resnets, transformer / attention modules, down/upsamplers and the stem convolutions), with CUDA
events on GPU and `perf_counter` on CPU; what runs between units (embeddings, the posterior, skip concatenation) is
reported as glue. The hooks only fire in eager mode, so the block table is always the eager forward, whatever
`--compile` says; the operator table is the extractor as benchmarked.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

__all__ = ['BlockProfile', 'profile_blocks', 'format_blocks', 'top_operators', 'stamp', 'elapsed_ms']

KINDS = ('resnets', 'attention', 'sampler', 'stem')
_UNIT_KIND = ((ResnetBlock2D, 'resnets'), (Transformer2DModel, 'attention'), (Attention, 'attention'),
              (Downsample2D, 'sampler'), (Upsample2D, 'sampler'))
_BLOCK = re.compile(r'^(.*?(?:down_blocks|up_blocks)\.\d+|.*?mid_block)\.')
_NEVER_RUN = ('vae.decoder', 'vae.post_quant_conv')  # the reference's AutoencoderKL holds a decoder it never calls


def stamp(device: torch.device) -> Union[torch.cuda.Event, float]:
    """A point in time on `device`'s stream: a recorded CUDA event on GPU, `perf_counter()` on CPU."""
    if device.type == 'cuda':
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start: Union[torch.cuda.Event, float], end: Union[torch.cuda.Event, float]) -> float:
    """Milliseconds between two `stamp`s (waits for the end event on GPU)."""
    if isinstance(start, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end)
    return (end - start) * 1e3


def _units(root: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
    """(module name, block, kind, module) for the outermost timed units under `root`, in module order."""
    units: list[tuple[str, str, str, nn.Module]] = []
    for name, module in root.named_modules():
        if name.startswith(_NEVER_RUN) or any(name.startswith(u[0] + '.') for u in units):
            continue
        kind = next((k for cls, k in _UNIT_KIND if isinstance(module, cls)), None)
        if kind is None and isinstance(module, (nn.Conv2d, nn.GroupNorm)) and not _BLOCK.match(name + '.'):
            kind = 'stem'  # conv_in, conv_norm_out, conv_out, quant_conv
        if kind is not None:
            match = _BLOCK.match(name + '.')
            block = match.group(1) if match else name.split('.')[0] + ' stem'
            units.append((name, block, kind, module))
    return units


@dataclass
class BlockProfile:
    """Median eager ms per image of each block (split by unit kind), the glue between units, and the whole call."""
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)
    glue_ms: float = 0.0
    total_ms: float = 0.0

    def block_total(self, block: str) -> float:
        return sum(self.blocks[block].values())


def profile_blocks(fn: Callable, root: nn.Module, x: torch.Tensor, iters: int = 3) -> BlockProfile:
    """Time every unit of `root` while the eager `fn(x)` runs, `iters` times after one warm-up; ms per image."""
    device = x.device
    units = _units(root)
    spans: list[tuple[str, object, object]] = []
    open_: dict[str, object] = {}

    def pre(name):
        return lambda module, args: open_.__setitem__(name, stamp(device))

    def post(name):
        return lambda module, args, out: spans.append((name, open_.pop(name), stamp(device)))

    handles = []
    for name, _, _, module in units:
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    runs: list[tuple[float, dict[str, float]]] = []
    try:
        with torch.inference_mode():
            fn(x)
            for _ in range(iters):
                spans.clear()
                start = stamp(device)
                fn(x)
                total = elapsed_ms(start, stamp(device))  # on GPU this waits for the call, so every span has ended
                per_unit: dict[str, float] = {}
                for name, a, b in spans:
                    per_unit[name] = per_unit.get(name, 0.0) + elapsed_ms(a, b)
                runs.append((total, per_unit))
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    prof = BlockProfile(total_ms=statistics.median(r[0] for r in runs) / n)
    for name, block, kind, _ in units:
        times = [r[1][name] for r in runs if name in r[1]]
        if times:
            row = prof.blocks.setdefault(block, dict.fromkeys(KINDS, 0.0))
            row[kind] += statistics.median(times) / n
    prof.glue_ms = prof.total_ms - sum(prof.block_total(b) for b in prof.blocks)
    return prof


def format_blocks(ours: BlockProfile, ref: Optional[BlockProfile] = None) -> str:
    """A table of ours per block and kind (ms per image, share of the call), with the reference's block totals."""
    head = (f"{'block (eager)':<28}" + ''.join(f'{k:>10}' for k in KINDS) + f"{'ours':>10}{'share':>8}"
            + (f"{'reference':>11}" if ref else ''))
    lines = [head, '-' * len(head)]
    blocks = list(ours.blocks) + [b for b in (ref.blocks if ref else {}) if b not in ours.blocks]

    def line(label: str, parts: Sequence[str], total: Optional[float], ref_total: Optional[float]) -> str:
        share = f'{100 * total / ours.total_ms:7.1f}%' if total is not None else f"{'-':>8}"
        text = f'{label:<28}' + ''.join(f'{p:>10}' for p in parts) + (f'{total:10.2f}' if total is not None
                                                                         else f"{'-':>10}") + share
        if ref:
            text += f'{ref_total:11.2f}' if ref_total is not None else f"{'-':>11}"
        return text

    for b in blocks:
        row = ours.blocks.get(b)
        parts = [f'{row[k]:.2f}' if row and row[k] else '-' for k in KINDS]
        lines.append(line(b, parts, ours.block_total(b) if row else None,
                          ref.block_total(b) if ref and b in ref.blocks else None))
    lines.append(line('glue between units', ['-'] * len(KINDS), ours.glue_ms, ref.glue_ms if ref else None))
    lines.append(line('whole call', ['-'] * len(KINDS), ours.total_ms, ref.total_ms if ref else None))
    return '\n'.join(lines)


def top_operators(fn: Callable, x: torch.Tensor, rows: int = 15) -> str:
    """torch.profiler's operator table for one call of `fn(x)` (after one warm-up), by self device or CPU time."""
    cuda = x.device.type == 'cuda'
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        fn(x)
        with torch.profiler.profile(activities=activities) as prof:
            fn(x)
            if cuda:
                torch.cuda.synchronize(x.device)
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
