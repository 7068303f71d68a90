"""`diffbackbone features`: tap maps of images into a feature store folder, or into one safetensors file.

`--out DIR` writes a `FeatureStore` (data/store.py) as the run goes: resumable, bounded memory, one slice of
the images per torchrun rank. `--out F.safetensors` keeps today's single-file form for a few images (one (N, C, H, W)
tensor per tap, optionally a PCA picture of one tap).

Everything that can be checked is checked before the model runs: image headers (`--on-error fail`), the output path
(not an input, not an existing file unless `--overwrite`, writable) and the `--pca` tap.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..cli_args import DTYPES, check_size_fits
from ..data.images import ImageError, image_size
from ..data.outputs import OutputError, check_file, check_folder, mark_metadata, save_picture
from ..data.pipeline import (
    DistInfo,
    barrier,
    default_workers,
    dist_info,
    extract_batches,
    file_stamp,
    find_images,
    init_distributed,
)
from ..data.store import (
    INDEX,
    ShardEntry,
    StoreError,
    StoreWriter,
    prepare_store,
    scan_shards,
    store_files,
    write_index,
)
from ..errors import InputError
from ..hub import save_safetensors

__all__ = ['OutputError', 'check_output', 'load_extractor', 'pca_image', 'run_features']

SHARD_BYTES = 256 << 20  # default shard size: about 256 MiB of features


def load_extractor(
        model_name: str,
        taps: Optional[Sequence[str]] = None,
        device: str = 'cpu',
        dtype: str = 'float32',
        pretrained: bool = True,
        weights: Optional[str] = None,
        model_kwargs: Optional[dict] = None,
) -> nn.Module:
    """The timm `features_only` model for `taps` (names, indices or a preset; default the pyramid), ready to run."""
    import timm

    from .. import models  # noqa: F401  (registers the models)

    kwargs = dict(model_kwargs or {})
    if weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights)
    pretrained = pretrained or bool(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every run: a resumed store must not mix two models
        model = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                  out_indices=tuple(taps) if taps else None, **kwargs)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def data_config(model: nn.Module, size: Optional[int] = None) -> dict:
    """timm's data config of `model` (input size, mean, std), at `size` x `size` if given."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if size:
        cfg['input_size'] = (3, size, size)
    return cfg


def _tap_names(model) -> list[str]:
    return [info['name'] for info in model.feature_info.get_dicts()]


def pca_image(features: torch.Tensor, out: Path, tile: int = 256) -> None:
    """Save the first three principal components of (N, C, H, W) features as an RGB picture, one tile per image."""
    from PIL import Image

    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(flat, q=min(3, c), center=False)
    proj = flat @ v[:, :3]
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1])], 1)
    rgb = (rgb.reshape(n, h, w, 3) * 255).round().byte().numpy()
    sheet = Image.new('RGB', (tile * n, tile * h // w))
    for i in range(n):
        sheet.paste(Image.fromarray(rgb[i]).resize((tile, tile * h // w), Image.NEAREST), (tile * i, 0))
    save_picture(sheet, out, 'features --pca')


# ---- checks made before any work ---------------------------------------------------------------------------------
def check_output(out: Path, inputs: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Refuse an output file that is an input, a folder, an existing file (unless `overwrite` and ours) or not
    writable (`outputs.check_file`)."""
    return check_file(out, inputs, overwrite, noun='input images')


def check_store(out: Path, inputs: Sequence[str], overwrite: bool = False) -> None:
    """`--out DIR` must be a new or empty folder or an existing feature store, and hold none of the inputs
    (`outputs.check_folder`)."""
    check_folder(out, 'store', inputs, overwrite, noun='input images')


def check_images(paths: Sequence[str]) -> None:
    """Read every image header now (cheap), so a bad file stops the run before any feature is computed."""
    unreadable = []
    for path in paths:
        try:
            image_size(path)
        except ImageError as e:
            unreadable.append(str(e))
    if unreadable:
        raise ImageError(f'{len(unreadable)} of {len(paths)} images cannot be read: ' + '; '.join(unreadable[:5]))


def probe_shapes(model, names: Sequence[str], size: Sequence[int], device, dtype, pool=None, feature_size=None
                 ) -> dict[str, list[int]]:
    """(C, h, w) of every stored tap, from one forward of a blank image (also checks the model runs at `size`)."""
    from ..data.pipeline import pool_features

    with torch.inference_mode():
        out = model(torch.zeros(1, 3, *size, device=device, dtype=dtype))
    return {n: list(pool_features(f, pool, feature_size).shape[1:]) for n, f in zip(names, out)}


def _fmt_bytes(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
        n /= 1024
    return f'{n:.1f} TB'


def _report_failed(failed: dict[str, str], where: str) -> None:
    if failed:
        print(f'{len(failed)} image(s) could not be read and were skipped (listed in {where}):')
        for path, reason in list(failed.items())[:20]:
            print(f'  {reason}')
        if len(failed) > 20:
            print(f'  ... and {len(failed) - 20} more')


# ---- the command -------------------------------------------------------------------------------------------------
def _is_single_file(out: Path) -> bool:
    return out.suffix.lower() == '.safetensors'


def run_features(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone features`: Ctrl-C ends it with one line and exit status 130 (a store stays
    resumable: the images extracted so far are flushed and indexed)."""
    try:
        return _run_features(args)
    except KeyboardInterrupt:
        out = Path(args.out)
        where = (f'nothing written to {out}' if _is_single_file(out) else
                 f'{out} keeps the images extracted so far; run the same command again to resume')
        print(f'interrupted: {where}.', file=sys.stderr)
        return 130


def _run_features(args: argparse.Namespace) -> int:
    info = dist_info()
    out = Path(args.out)
    single = _is_single_file(out)
    on_error = args.on_error or ('fail' if single else 'skip')
    args.store_dtype = args.store_dtype or ('float32' if single else 'float16')
    if args.pca and not single:
        raise InputError('--pca needs the single-file form (--out F.safetensors); a feature store has no picture.')
    if single and info.world > 1:
        raise InputError('torchrun needs a feature store: give --out a folder (no .safetensors suffix).')
    if args.workers is not None and args.workers < 0:
        raise InputError(f'--workers must be at least 0, got {args.workers}.')
    if args.compile:
        from ..models.fast import COMPILE_MODES

        if args.compile not in COMPILE_MODES:
            raise InputError(f'--compile {args.compile}: choose one of {", ".join(COMPILE_MODES)}.')
    images = find_images(args.images)
    if single:
        check_output(out, images, args.overwrite)
        if args.pca:
            check_output(out.with_name(f'{out.stem}_pca_{args.pca}.png'), images, args.overwrite)
    else:
        check_store(out, images, args.overwrite)
    if not single:
        images = [os.path.abspath(p) for p in images]  # the store's keys: two working folders never collide
    mine = images[info.rank::info.world]
    check_size_fits(args.size, args.batch_size, args.device)
    if on_error == 'fail':
        check_images(mine)
    kwargs = dict(args.model_kwargs or {})

    device = torch.device(args.device)
    if device.type == 'cuda' and info.world > 1:
        device = torch.device('cuda', info.local_rank)
        torch.cuda.set_device(device)
    init_distributed(info, device)
    model = load_extractor(args.model, args.taps, str(device), args.dtype, not args.random_weights, args.weights,
                           kwargs)
    data_cfg = data_config(model, args.size)
    size = tuple(data_cfg['input_size'][1:])
    names = _tap_names(model)
    shapes = probe_shapes(model, names, size, device, DTYPES[args.dtype], args.feature_pool, args.feature_size)
    if args.pca:
        if args.pca not in names:
            raise OutputError(f'--pca {args.pca} is not among the extracted taps {names}; add it to --taps.')
        if shapes[args.pca][1] * shapes[args.pca][2] < 2:
            raise OutputError(f'--pca {args.pca}: its map is {shapes[args.pca][1]}x{shapes[args.pca][2]} at input '
                             f'size {size[0]}; a PCA picture needs at least 2 positions. Pick a finer tap or a larger '
                             '--size.')
    if args.compile or args.channels_last:
        from ..models.fast import optimize

        model = optimize(model, channels_last=args.channels_last, compile=args.compile or False)
    workers = default_workers(info.local_world) if args.workers is None else args.workers
    run = dict(model=model, names=names, size=size, mean=data_cfg['mean'], std=data_cfg['std'], resize=args.resize,
               batch_size=args.batch_size, workers=workers, device=device, dtype=DTYPES[args.dtype],
               pool=args.feature_pool, feature_size=args.feature_size, out_dtype=DTYPES[args.store_dtype])
    if single:
        return _run_single(args, out, images, run, shapes, on_error)
    config = dict(
        model=args.model, weights=args.weights or ('random' if args.random_weights else
                                                   model.pretrained_cfg.get('hf_hub_id') or 'pretrained'),
        prompt=kwargs.get('prompt'), lora=getattr(getattr(model, 'model', model), 'lora_identity', None),
        model_kwargs=kwargs, taps=names, shapes=shapes, dtype=args.dtype,
        store_dtype=args.store_dtype, input_size=list(size), resize=args.resize, mean=list(data_cfg['mean']),
        std=list(data_cfg['std']), feature_pool=args.feature_pool, feature_size=args.feature_size)
    return _run_store(args, out, images, run, config, shapes, on_error, info)


def _progress(total: int, info: DistInfo, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit='img', desc=desc, disable=not info.main, dynamic_ncols=True)


def _run_single(args, out: Path, images: list[str], run: dict, shapes: dict, on_error: str) -> int:
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in run['names']}
    done: list[str] = []
    failed: dict[str, str] = {}
    with _progress(len(images), DistInfo(), args.model) as bar:
        for paths, feats, failures, _ in extract_batches(paths=images, **run):
            if failures and on_error == 'fail':
                raise ImageError(failures[0][1])
            failed.update(failures)
            for n, f in feats.items():
                chunks[n].append(f)  # already in the store dtype (extract_batches' out_dtype)
            done.extend(paths)
            bar.update(len(paths) + len(failures))
    if not done:
        raise InputError(f'none of the {len(images)} images could be read; nothing written.')
    feats = {n: torch.cat(c) for n, c in chunks.items()}
    metadata = dict(model=args.model, images=json.dumps(done), failed=json.dumps(failed),
                    input_size=json.dumps([3, *run['size']]), resize=args.resize)
    save_safetensors(feats, out, metadata=mark_metadata(metadata, 'features'))
    for name, f in feats.items():
        print(f'{name}: {tuple(f.shape)}')
    print(f'wrote {out}')
    _report_failed(failed, f'the metadata of {out}')
    if args.pca:
        pca_out = out.with_name(f'{out.stem}_pca_{args.pca}.png')
        pca_image(feats[args.pca].float(), pca_out)
        print(f'wrote {pca_out}')
    return 0


def _prepare_store(args, out: Path, config: dict, info: DistInfo) -> dict[str, ShardEntry]:
    """Check an existing store against `config` (or clear it with --overwrite); return the images stored already."""
    stored = {}
    if info.main:
        if args.overwrite:
            for p in store_files(out):
                p.unlink()
        stored = prepare_store(out, config)
    barrier(info)
    return stored if info.main else scan_shards(out, config)


def _run_store(args, out: Path, images: list[str], run: dict, config: dict, shapes: dict, on_error: str,
               info: DistInfo) -> int:
    start = time.perf_counter()
    stored = _prepare_store(args, out, config, info)
    mine = images[info.rank::info.world]
    # an image counts as stored only as the same file: same absolute path, size and mtime (else it was replaced)
    todo = [p for p in mine if p not in stored or stored[p].source is None or stored[p].source != file_stamp(p)]
    per_image = sum(math.prod(s) for s in shapes.values()) * DTYPES[args.store_dtype].itemsize
    shard_size = args.shard_size or max(args.batch_size, SHARD_BYTES // max(1, per_image))
    writer = StoreWriter(out, config, info.rank, shard_size, DTYPES[args.store_dtype],
                         index_every_s=30.0 if info.world == 1 else None)
    if info.main and len(todo) < len(mine):
        print(f'{out}: {len(mine) - len(todo)} of these images are stored already; extracting {len(todo)}.')
    try:
        with _progress(len(todo), info, args.model) as bar:
            for paths, feats, failures, stamps in extract_batches(paths=todo, **run):
                if paths:
                    writer.add(paths, feats, stamps)
                if failures and on_error == 'fail':
                    raise ImageError(f'{failures[0][1]} (stopped by --on-error fail; the images before it are '
                                     'stored, run again to resume)')
                writer.failed.update(failures)
                bar.update(len(paths) + len(failures))
    except KeyboardInterrupt:
        writer.flush()  # whole shards only: what was extracted is kept for the resume, and listed in the index
        if info.world == 1:
            write_index(out, config)
        raise
    finally:
        writer.flush()  # whole shards only: what was extracted before an error is kept for the resume
    writer.write_failed()
    barrier(info)
    if not info.main:
        return 0
    index = write_index(out, config)
    seconds = time.perf_counter() - start
    entries, failed = index['entries'], index['failed']
    missing = [p for p in images if p not in entries and p not in failed]
    if missing:  # never report images that are not in the store
        raise StoreError(f'{len(missing)} images of this run are not in {out} at its end (e.g. {missing[0]}): another '
                         'process removed them (--overwrite?). Run the same command again to extract them.')
    if not any(p in entries for p in images):
        reasons = '; '.join(failed[p] for p in images[:3])
        raise ImageError(f'none of the {len(images)} images could be read; nothing stored in {out} ({reasons}).')
    new = sum(1 for p in images if p in entries and (p not in stored or stored[p].shard != entries[p][0]))
    total = sum(p.stat().st_size for p in out.glob('shard-r*.safetensors'))
    _report_failed({p: failed[p] for p in images if p in failed}, out / INDEX)
    print(f'{out}: {index["count"]} images stored ({new} new), {len(failed)} failed, {seconds:.1f} s, '
          f'{new / max(seconds, 1e-9):.1f} img/s, store {_fmt_bytes(total)}')
    return 0
