"""Benchmark of `diffbackbone features DIR --out STORE`: bounded memory and pipeline efficiency, as ratios of one run.

    python -m diffbackbone.bench.store_speed --model test_cleandift --size 64 --batch-size 8 --workers 1

Both measures, their targets and measured numbers: docs/store.md#benchmark."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import check_json_arg

__all__ = ['main', 'run', 'make_images', 'measure_command', 'model_only_throughput', 'RunStats']

_SUMMARY = re.compile(r'(\d+) images stored \((\d+) new\), (\d+) failed, ([0-9.]+) s, ([0-9.]+) img/s')

# Runs the measured command as its child and writes the child's peak RSS (KiB; loader workers included: their peak
# reaches it when they are reaped) to the file argv[1]. Being small, it keeps the memory of the big process that
# starts it out of the figure: Linux charges the pre-exec memory of a forked or vforked child to its ru_maxrss.
_LAUNCHER = (
    'import resource, subprocess, sys\n'
    'rc = subprocess.call(sys.argv[2:])\n'
    'open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n'
    'sys.exit(rc)\n')


@dataclass
class RunStats:
    """One `features` subprocess: images, wall seconds, the command's img/s, peak memory (MiB), store size (MiB)."""
    images: int
    seconds: float
    img_per_s: float
    maxrss_mib: float
    tree_rss_mib: float
    store_mib: float = 0.0


def make_images(folder: Path, count: int, side: int = 96, per_folder: int = 100, seed: int = 0) -> list[Path]:
    """Write `count` random-noise JPEGs of `side` x `side` px under `folder`, `per_folder` a subfolder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f'part{i // per_folder:03d}' / f'img{i:05d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _tree_rss(root: int) -> int:
    """Sum of the resident set sizes (bytes) of the descendants of process `root` (not `root` itself), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf('SC_PAGE_SIZE')
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        rss[pid] = int(fields[21]) * page  # fields[21]: rss in pages
    total, todo = 0, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


def measure_command(cmd: Sequence[str], env: Optional[dict] = None, interval: float = 0.05
                    ) -> tuple[str, float, float, float]:
    """Run `cmd`; return (stdout, seconds, its peak RSS in MiB (largest process), peak process-tree RSS in MiB).

    Raises `RuntimeError` with the command's output if it fails.
    """
    with tempfile.TemporaryDirectory(prefix='diffbackbone-rss-') as tmp:
        report = Path(tmp) / 'maxrss'
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, '-c', _LAUNCHER, str(report), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed (exit {proc.returncode}):\n{out}{err[-3000:]}')
        maxrss_kib = int(report.read_text())
    return out, seconds, maxrss_kib / 1024, peak / 2 ** 20


def model_only_throughput(model_name: str, size: int, batch_size: int, dtype: str, device: str, images: int,
                          taps: Optional[Sequence[str]] = None, warmup: int = 2) -> float:
    """Images/s of the model alone (random input already on `device`, features left on `device`)."""
    from ..cli_args import DTYPES
    from ..data.extract import load_extractor

    model = load_extractor(model_name, taps, device, dtype, pretrained=False)
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=DTYPES[dtype])
    batches = max(1, -(-images // batch_size))

    def sync() -> None:
        if x.device.type == 'cuda':
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        sync()
    return batches * batch_size / (time.perf_counter() - start)


def _features_cmd(args: argparse.Namespace, folder: Path, out: Path) -> list[str]:
    cmd = [sys.executable, '-m', 'diffbackbone', 'features', str(folder), '--out', str(out), '--model', args.model,
           '--random-weights', '--size', str(args.size), '--batch-size', str(args.batch_size), '--workers',
           str(args.workers), '--device', args.device, '--dtype', args.dtype, '--shard-size', str(args.shard_size)]
    if args.taps:
        cmd += ['--taps', *args.taps]
    if args.feature_size:
        cmd += ['--feature-size', str(args.feature_size)]
    return cmd


def _run_features(args: argparse.Namespace, folder: Path, out: Path, expect: int) -> RunStats:
    env = {**os.environ, 'TQDM_DISABLE': '1'}
    stdout, seconds, maxrss, tree = measure_command(_features_cmd(args, folder, out), env)
    m = _SUMMARY.search(stdout)
    if m is None:
        raise RuntimeError(f'no summary line (N images stored ... img/s) in the output of features:\n{stdout}')
    if int(m[2]) != expect or int(m[3]) != 0:
        raise RuntimeError(f'features stored {m[2]} new images with {m[3]} failures; expected {expect} and none.')
    store = sum(p.stat().st_size for p in out.glob('*.safetensors')) / 2 ** 20
    return RunStats(int(m[2]), seconds, float(m[5]), maxrss, tree, store)


def run(args: argparse.Namespace) -> dict:
    """Both measurements; prints a table and the two ratios, returns them as a dict."""
    def model_only() -> float:
        return model_only_throughput(args.model, args.size, args.batch_size, args.dtype, args.device,
                                     args.model_images or args.large, args.taps)

    with tempfile.TemporaryDirectory(prefix='diffbackbone-bench-store-') as tmp:
        root = Path(tmp)
        make_images(root / 'images', args.large, args.image_side)
        # the small run reads the large folder's first images, hard-linked into a folder of their own
        small_dir = root / 'small'
        for path in sorted((root / 'images').rglob('*.jpg'))[:args.small]:
            target = small_dir / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        small = _run_features(args, small_dir, root / 'store_small', args.small)
        # model-only timed just before and just after the large run, the faster kept: a busy machine can only
        # lower the efficiency figure, never raise it
        speeds = [model_only()]
        large = _run_features(args, root / 'images', root / 'store_large', args.large)
        speeds.append(model_only())
    result = dict(
        settings=dict(model=args.model, size=args.size, batch_size=args.batch_size, workers=args.workers,
                      dtype=args.dtype, device=args.device, taps=args.taps, feature_size=args.feature_size,
                      shard_size=args.shard_size, image_side=args.image_side, torch_threads=torch.get_num_threads()),
        small=asdict(small), large=asdict(large),
        memory_ratio=large.maxrss_mib / small.maxrss_mib, tree_memory_ratio=large.tree_rss_mib / small.tree_rss_mib,
        model_only_img_per_s=max(speeds), efficiency=large.img_per_s / max(speeds))
    s = result['settings']
    print(f'features benchmark: {s["model"]} (random weights), {s["size"]} px, batch {s["batch_size"]}, {s["dtype"]}, '
          f'{s["device"]}, {s["workers"]} loader workers, taps {s["taps"] or "default"}, stored maps '
          f'{s["feature_size"] or "as extracted"}, shards of {s["shard_size"]} images, {s["torch_threads"]} threads')
    print(f'{"run":<16} {"images":>7} {"wall s":>8} {"img/s":>8} {"maxrss MiB":>11} {"tree RSS MiB":>13} '
          f'{"store MiB":>10}')
    for name, r in (('features small', small), ('features large', large)):
        print(f'{name:<16} {r.images:>7} {r.seconds:>8.1f} {r.img_per_s:>8.1f} {r.maxrss_mib:>11.0f} '
              f'{r.tree_rss_mib:>13.0f} {r.store_mib:>10.1f}')
    print(f'peak memory {args.large} vs {args.small} images: {result["memory_ratio"]:.3f} (largest process), '
          f'{result["tree_memory_ratio"]:.3f} (process tree); target <= 1.2')
    print(f'model only: {max(speeds):.1f} img/s; pipeline efficiency (features img/s / model-only img/s): '
          f'{result["efficiency"]:.3f} (GPU target >= 0.9)')
    if args.json:
        from ..data.outputs import write_json

        write_json(args.json, result, 'bench_store')
    return result


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench.store_speed', description=__doc__.split('\n')[0])
    p.add_argument('--model', default='test_cleandift', help='model (random weights, nothing downloaded)')
    p.add_argument('--size', type=_positive, default=64, help='model input size in pixels')
    p.add_argument('--batch-size', type=_positive, default=8)
    p.add_argument('--workers', type=int, default=1, help='loader workers of the features command')
    p.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--taps', nargs='+', default=['mid'], help='taps stored (default: mid)')
    p.add_argument('--feature-size', type=_positive, default=96, help='stored maps resized to N x N (default 96)')
    p.add_argument('--small', type=_positive, default=100, help='images of the small run')
    p.add_argument('--large', type=_positive, default=1000, help='images of the large run (and the efficiency run)')
    p.add_argument('--shard-size', type=_positive, default=64, help='images per store shard (both runs)')
    p.add_argument('--image-side', type=_positive, default=96, help='side of the synthetic JPEGs in pixels')
    p.add_argument('--model-images', type=_positive, help='images timed for the model-only figure (default: --large)')
    p.add_argument('--json', metavar='PATH', help='also write the results to this JSON file')
    args = p.parse_args(argv)
    if args.small >= args.large:
        p.error(f'--small ({args.small}) must be smaller than --large ({args.large})')
    check_json_arg(p, args.json)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
