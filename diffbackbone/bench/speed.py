"""Benchmark: our backbone against the CleanDIFT / DIFT extractors written with plain diffusers, in one process.

    python -m diffbackbone.bench --model cleandift_sd21 --size 768 --batch 8 --dtype bf16 --taps cleandift --compile

The reference, the noisy ensemble and what each reported figure measures: docs/speed.md#the-benchmark."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import statistics
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from timm.models._features import FeatureGetterNet
from torch.utils.flop_counter import FlopCounterMode

from . import check_json_arg
from ..errors import InputError
from ..models.diffusion_unet import DiffusionUNet
from ..models.fast import COMPILE_MODES, compile_model, optimize
from ..models._taps import Tap
from .profiling import elapsed_ms, format_blocks, profile_blocks, stamp, top_operators

__all__ = ['main', 'run', 'Reference', 'FeatureMismatch', 'check_same', 'TOLERANCE']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Largest allowed relative error ||ours - ref|| / ||ref|| per tap; both sides run the same kernels on the same weights.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
NOISY_OF = {'cleandift_sd21': 'sd21', 'cleandift_sd15': 'sd15', 'test_cleandift': 'test_dift'}


class FeatureMismatch(RuntimeError):
    """Our features and the reference's differ beyond the tolerance of the dtype."""


class Reference(nn.Module):
    """CleanDIFT's (clean models) or DIFT's (noisy models) extractor in plain diffusers, holding `model`'s weights."""

    def __init__(self, model: DiffusionUNet):
        """Copy the weights of `model` (before it is pruned: the reference runs the whole UNet); `read` sets taps."""
        super().__init__()
        enc = model.vae.encoder
        self.vae = AutoencoderKL(
            in_channels=model.in_chans,
            block_out_channels=tuple(b.resnets[-1].out_channels for b in enc.down_blocks),
            layers_per_block=len(enc.down_blocks[0].resnets),
            latent_channels=model.vae.quant_conv.out_channels // 2,
            norm_num_groups=enc.conv_norm_out.num_groups,
            down_block_types=('DownEncoderBlock2D',) * len(enc.down_blocks),
            up_block_types=('UpDecoderBlock2D',) * len(enc.down_blocks),
            scaling_factor=model.vae.scaling_factor,
        )
        self.unet = UNet2DConditionModel(**model.unet.config)
        _load_part(self.vae, model, 'vae.', unused=('decoder.', 'post_quant_conv.'))
        _load_part(self.unet, model, 'unet.', unused=('conv_norm_out.', 'conv_out.'))
        self.register_buffer('prompt_embeds', model.prompt_embeds.detach().clone())
        self.timestep = model.timestep.detach().float().clone()  # the value the model runs at, after its dtype cast
        self.clean, self.ensemble, self.noise_seed = model.clean, model.ensemble, model.noise_seed
        self.latent = 'sample'
        self.names: list[str] = []
        self._store: dict[str, torch.Tensor] = {}
        self.scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False)

    def read(self, taps: Sequence[Tap]) -> 'Reference':
        """Record `taps` (block outputs) with forward hooks on the modules they name; forward returns them."""
        inner = [t.name for t in taps if t.hook not in ('', 'conv')]
        if inner:
            raise InputError(f'The reference reads module outputs with hooks; taps {inner} are inside a layer. '
                             'Benchmark block-output taps (the CleanDIFT ones).')
        self.names = [t.name for t in taps]
        for tap in taps:
            self.unet.get_submodule(tap.module.removeprefix('unet.')).register_forward_hook(self._hook(tap.name))
        return self

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out) -> None:
            self._store[name] = out[0] if isinstance(out, tuple) else out
        return hook

    def _unet(self, z: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        self._store.clear()
        self.unet(z, t, encoder_hidden_states=self.prompt_embeds.to(z.dtype).expand(z.shape[0], -1, -1))
        return [self._store[n] for n in self.names]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scale = self.vae.config.scaling_factor
        if self.clean:
            dist = self.vae.encode(x).latent_dist
            z = (dist.mode() if self.latent == 'mode' else dist.sample()) * scale
            return self._unet(z, self.timestep.to(x.device))
        # DIFT: one image at a time, repeated `ensemble` times, noised at t, features averaged over the ensemble.
        # Seeded like our model (latent draw from seed + 1, noise from seed) so the two can be compared.
        t = self.timestep.long().to(x.device)
        feats = []
        for img in x:
            dist = self.vae.encode(img.expand(self.ensemble, -1, -1, -1)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(self.noise_seed + 1))
            z = (dist.mean + dist.std * eps.to(dist.mean)) * scale
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(self.noise_seed)).to(z)
            feats.append([f.mean(0) for f in self._unet(self.scheduler.add_noise(z, noise, t), t)])
        return [torch.stack(maps) for maps in zip(*feats)]


def _load_part(module: nn.Module, model: nn.Module, prefix: str, unused: tuple[str, ...]) -> None:
    """Copy `model`'s weights under `prefix` into `module`; only the parts our model never builds may stay unset."""
    sd = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.startswith(unused)]
    if left or unexpected:
        raise RuntimeError(f'Reference {type(module).__name__} does not match the model: missing {left[:5]}, '
                           f'unexpected {unexpected[:5]}.')


def check_same(
        ours: Callable, ref: Callable, x: torch.Tensor, names: Sequence[str], tol: float,
) -> list[dict]:
    """Run both on `x`; return per-tap relative error and cosine, raising `FeatureMismatch` beyond `tol`."""
    with torch.inference_mode():
        a, b = ours(x), ref(x)
        rows = []
        for name, fa, fb in zip(names, a, b):
            if fa.shape != fb.shape:
                raise FeatureMismatch(f'tap {name}: ours has shape {tuple(fa.shape)}, the reference {tuple(fb.shape)}.')
            fa, fb = fa.float(), fb.float()
            rel = ((fa - fb).norm() / fb.norm().clamp_min(1e-12)).item()
            cos = torch.nn.functional.cosine_similarity(fa.flatten(), fb.flatten(), dim=0).item()
            rows.append(dict(tap=name, rel_err=rel, cosine=cos))
    bad = [r for r in rows if not r['rel_err'] <= tol]  # `not <=` also catches NaN
    if bad:
        raise FeatureMismatch(
            'Our features differ from the reference extractor: ' + ', '.join(
                f"{r['tap']} rel. error {r['rel_err']:.3g} (cosine {r['cosine']:.5f})" for r in bad)
            + f'; tolerance {tol:g}. The backbone no longer computes what diffusers computes.')
    return rows


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096


class _RSSPeak:
    """Highest resident set size seen while the block runs (a sampling thread, every millisecond)."""

    def __enter__(self):
        try:
            ctypes.CDLL('libc.so.6').malloc_trim(0)  # give back freed memory so the baseline is today's, not history
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def time_extractor(fn: Callable, x: torch.Tensor, iters: int, warmup: int, weights: int) -> tuple[float, int]:
    """Median ms per batch over `iters` runs after `warmup` runs, and peak memory in bytes (see module docstring)."""
    device = x.device
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        _sync(device)
        times = []
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with contextlib.nullcontext() if device.type == 'cuda' else _RSSPeak() as rss:
            for _ in range(iters):
                start = stamp(device)
                fn(x)
                times.append(elapsed_ms(start, stamp(device)))
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == 'cuda' else rss.peak - rss.base
    return statistics.median(times), peak + weights


def count_flops(fn: Callable, x: torch.Tensor) -> int:
    """FLOPs of one eager call, as torch's FlopCounterMode counts them."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


@dataclass
class Row:
    extractor: str
    ms_per_img: float
    img_per_s: float
    peak_mem_mib: float
    gflop_per_img: float
    mfu: Optional[float]
    vs_ref: Optional[float] = None  # our throughput / the reference's


def _bench_pair(args: argparse.Namespace, variant: str, label: str, ref_label: str, **model_kwargs) -> tuple:
    """Build, check and time one (ours, reference) pair; return their rows and the check's per-tap errors."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    backbone = timm.create_model(variant, **model_kwargs)
    with torch.no_grad():  # random weights, but a prompt embedding and timestep like trained ones
        backbone.prompt_embeds.normal_()
        if backbone.clean:
            backbone.timestep.fill_(args.timestep)
    backbone.to(dtype=dtype)  # first, so the reference takes the timestep the model runs at in this dtype
    ref = Reference(backbone)
    sel = list(range(len(backbone.taps))) if args.taps == ['all'] else args.taps
    ours = FeatureGetterNet(backbone, out_indices=sel)  # what timm's features_only=True builds (and prunes)
    taps = [backbone.taps[i] for i in ours.out_indices]
    ours = ours.to(device=device).eval().requires_grad_(False)
    ref = ref.read(taps).to(device=device, dtype=dtype).eval().requires_grad_(False)
    names = [t.name for t in taps]

    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    flops = (count_flops(ours, x[:1]), count_flops(ref, x[:1]))

    optimize(ours, channels_last=args.channels_last)
    profile = {}
    if args.profile:  # eager block times first: forward hooks do not fire inside compiled graphs
        mine, theirs = profile_blocks(ours, backbone, x), profile_blocks(ref, ref, x)
        profile.update(blocks=format_blocks(mine, theirs), block_ms=dict(ours=asdict(mine), reference=asdict(theirs)))
    if args.compile:  # as CleanDIFT: torch.compile's default mode on the VAE (its encoder, which encode() runs) and UNet
        compile_model(ours, args.compile)
        ref.vae.encoder.compile()
        ref.unet.compile()
    ref.latent = 'mode'
    errors = check_same(ours, ref, x, names, TOLERANCE[dtype])
    ref.latent = 'sample'

    rows = []
    for name, fn, module, fl in ((label, ours, ours, flops[0]), (ref_label, ref, ref, flops[1])):
        ms, peak = time_extractor(fn, x, args.iters, args.warmup, _weight_bytes(module))
        ms_img = ms / args.batch
        mfu = fl * 1e3 / ms_img / (args.peak_tflops * 1e12) if args.peak_tflops else None
        rows.append(Row(name, ms_img, 1e3 / ms_img, peak / 2 ** 20, fl / 1e9, mfu))
    rows[0].vs_ref = rows[1].ms_per_img / rows[0].ms_per_img
    if args.profile:
        profile['operators'] = {label: top_operators(ours, x), ref_label: top_operators(ref, x)}
    return rows, errors, profile


def format_table(rows: Sequence[Row]) -> str:
    head = f"{'extractor':<34} {'ms/img':>9} {'img/s':>9} {'peak MiB':>10} {'GFLOP/img':>10} {'MFU':>6} {'vs ref':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        mfu = f'{100 * r.mfu:5.1f}%' if r.mfu is not None else '     -'
        ratio = f'{r.vs_ref:6.2f}x' if r.vs_ref is not None else '      -'
        lines.append(f'{r.extractor:<34} {r.ms_per_img:9.2f} {r.img_per_s:9.2f} {r.peak_mem_mib:10.0f} '
                     f'{r.gflop_per_img:10.1f} {mfu} {ratio}')
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed `args`; print and return the table, equality checks and profiles."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda asked for, but no CUDA device is available. Use --device cpu.')
    device = torch.device(args.device)
    if args.peak_tflops is None and device.type == 'cuda':
        args.peak_tflops = 790.0
    taps = ' '.join(args.taps)
    ours_desc = 'ours' + (f' compile={args.compile}' if args.compile else '') + (' cl' if args.channels_last else '')
    rows, checks, profile = _bench_pair(args, args.model, ours_desc, 'reference (diffusers + hooks)')
    profiles = {args.model: profile} if profile else {}
    if args.noisy_ensemble:
        noisy = NOISY_OF.get(args.model)
        if noisy is None:
            raise SystemExit(f'error: no noisy counterpart known for {args.model}; choose one of {", ".join(NOISY_OF)}.')
        n_rows, n_checks, n_profile = _bench_pair(
            args, noisy, f'ours {noisy} E={args.noisy_ensemble} one pass', f'DIFT reference E={args.noisy_ensemble}',
            ensemble=args.noisy_ensemble)
        rows += n_rows
        checks += [dict(c, tap=f'{noisy}:{c["tap"]}') for c in n_checks]
        if n_profile:
            profiles[f'{noisy} E={args.noisy_ensemble}'] = n_profile
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    header = (f'diffbackbone bench: {args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, taps {taps}, '
              f'{device_name}, torch {torch.__version__}, {datetime.date.today()}')
    print(header)
    worst = max(checks, key=lambda c: c['rel_err'])
    print(f'features equal: {len(checks)} tap maps within rel. error {TOLERANCE[DTYPES[args.dtype]]:g} '
          f"(worst {worst['tap']}: {worst['rel_err']:.2e}, cosine {worst['cosine']:.5f})")
    print(format_table(rows))
    mem = ('GPU max_memory_allocated above the pre-run allocation' if device.type == 'cuda'
           else 'CPU RSS peak (1 ms sampling) above the pre-run RSS')
    print(f'peak memory = {mem} + own weights; MFU against {args.peak_tflops} TFLOP/s'
          if args.peak_tflops else f'peak memory = {mem} + own weights; MFU needs --peak-tflops')
    for model, prof in profiles.items():
        print(f'\nwhere time goes, {model}: ms per image by block, eager forward (forward hooks)\n{prof["blocks"]}')
        for name, table in prof['operators'].items():
            print(f'\ntop operators, {name}, as benchmarked (torch.profiler, one call)\n{table}')
    result = dict(header=header, args=vars(args), rows=[asdict(r) for r in rows], checks=checks, profiles=profiles)
    if args.json:
        _write_json(args.json, result)
    return result


def _write_json(path: str, result: dict) -> None:
    """Write `result` to `path` atomically."""
    from ..data.outputs import write_json

    write_json(path, result, 'bench')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from ..cli_args import device, diffusion_model_name, finite_float, positive_float

    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='cleandift_sd21', type=diffusion_model_name,
                   help='clean model (random weights, nothing downloaded)')
    p.add_argument('--size', type=int, default=768, help='image side in pixels')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--dtype', choices=DTYPES, default='bf16')
    p.add_argument('--taps', nargs='+', default=['cleandift'],
                   help="'all', a preset (cleandift, pyramid) or tap names such as us6")
    p.add_argument('--compile', nargs='?', const='default', choices=COMPILE_MODES, default=None,
                   help='torch.compile ours in this mode (default: default) and the reference as CleanDIFT does')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format for ours')
    p.add_argument('--peak-tflops', type=positive_float, default=None,
                   help='device peak for MFU (default 790 on CUDA: H100 bf16)')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--noisy-ensemble', type=int, default=0, metavar='E',
                   help='also time the noisy model with this ensemble against DIFT (0: skip)')
    p.add_argument('--timestep', type=finite_float, default=261.0, help='clean models: the timestep they run at')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--profile', action='store_true',
                   help='also print where time goes: eager per-block times of both, and the top operators of each')
    p.add_argument('--json', metavar='PATH', help='also write the results (and profiles) to this JSON file')
    args = p.parse_args(argv)
    if args.size < 64 or args.batch < 1 or args.iters < 1 or args.warmup < 0 or args.noisy_ensemble < 0:
        p.error('need --size >= 64, --batch >= 1, --iters >= 1, --warmup >= 0, --noisy-ensemble >= 0')
    check_json_arg(p, args.json)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
