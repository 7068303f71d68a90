"""Tap maps of images into a feature store folder or one safetensors file: the library side of `diffbackbone
features`, also run by `eval pixel` and the store benchmark.

`ExtractJob(out=DIR)` writes a `FeatureStore` (data/store.py) as the run goes: resumable, bounded memory, one slice of
the images per torchrun rank. `out=F.safetensors` keeps the single-file form for a few images (one (N, C, H, W) tensor
per tap, optionally a PCA picture of one tap).

Everything that can be checked is checked before the model runs: image headers (`on_error='fail'`), the output path
(not an input, not an existing file unless `overwrite`, writable) and the `pca` tap.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..cli_args import DTYPES, check_size_fits, fmt_bytes
from ..errors import InputError
from ..hub import defer_sigint, save_safetensors
from ..models._builder import features_revision
from .images import ImageError, image_size
from .outputs import OutputError, check_file, check_folder, mark_metadata, save_picture
from .pipeline import (
    DistInfo,
    barrier,
    default_workers,
    dist_info,
    extract_batches,
    file_stamp,
    find_images,
    init_distributed,
)
from .store import (
    INDEX,
    ShardEntry,
    StoreError,
    StoreWriter,
    prepare_store,
    scan_shards,
    store_writer,
    write_index,
)

__all__ = ['ExtractJob', 'OutputError', 'check_output', 'data_config', 'extract_features', 'is_single_file',
           'load_extractor', 'pca_image']

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
                                  out_indices=tuple(taps) if taps else None, dtype=DTYPES[dtype], **kwargs)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()  # weights are loaded in `dtype`: casts nothing


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


def _report_failed(failed: dict[str, str], where: str) -> None:
    if failed:
        print(f'{len(failed)} image(s) could not be read and were skipped (listed in {where}):')
        for path, reason in list(failed.items())[:20]:
            print(f'  {reason}')
        if len(failed) > 20:
            print(f'  ... and {len(failed) - 20} more')


# ---- the run -----------------------------------------------------------------------------------------------------
@dataclass
class ExtractJob:
    """What to extract and where: the options of `diffbackbone features` (same names, same defaults).

    `model_kwargs` holds every model argument, the prompt included (`cli_args.model_kwargs` resolves `--prompt`).
    `on_error` and `store_dtype` default by the form of `out`: a store skips unreadable images and keeps float16, a
    single file stops at one and keeps float32.
    """
    images: Sequence[str]
    out: str | Path
    model: str = 'cleandift_sd21'
    taps: Optional[Sequence[str]] = None
    overwrite: bool = False
    size: Optional[int] = None
    resize: str = 'stretch'
    batch_size: int = 4
    device: str = 'cpu'
    dtype: str = 'float32'
    weights: Optional[str] = None
    random_weights: bool = False
    model_kwargs: Optional[dict] = None
    pca: Optional[str] = None
    workers: Optional[int] = None
    on_error: Optional[str] = None
    store_dtype: Optional[str] = None
    feature_pool: Optional[int] = None
    feature_size: Optional[int] = None
    shard_size: Optional[int] = None
    compile: Optional[str] = None
    channels_last: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, **changes) -> 'ExtractJob':
        """The job of parsed `features` arguments, with `changes` (e.g. the resolved `model_kwargs`)."""
        return cls(**{**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, **changes})


def is_single_file(out: str | Path) -> bool:
    """`out` names one safetensors file (else a feature store folder)."""
    return Path(out).suffix.lower() == '.safetensors'


def _check_job(job: ExtractJob, single: bool, info: DistInfo) -> None:
    """Refuse option combinations that cannot work, before anything is read."""
    if job.pca and not single:
        raise InputError('--pca needs the single-file form (--out F.safetensors); a feature store has no picture.')
    if single and info.world > 1:
        raise InputError('torchrun needs a feature store: give --out a folder (no .safetensors suffix).')
    if job.workers is not None and job.workers < 0:
        raise InputError(f'--workers must be at least 0, got {job.workers}.')
    if job.compile:
        from ..models.fast import COMPILE_MODES

        if job.compile not in COMPILE_MODES:
            raise InputError(f'--compile {job.compile}: choose one of {", ".join(COMPILE_MODES)}.')


def _check_pca(job: ExtractJob, names: Sequence[str], shapes: dict, size: Sequence[int]) -> None:
    if job.pca not in names:
        raise OutputError(f'--pca {job.pca} is not among the extracted taps {names}; add it to --taps.')
    if shapes[job.pca][1] * shapes[job.pca][2] < 2:
        raise OutputError(f'--pca {job.pca}: its map is {shapes[job.pca][1]}x{shapes[job.pca][2]} at input size '
                          f'{size[0]}; a PCA picture needs at least 2 positions. Pick a finer tap or a larger --size.')


def extract_features(job: ExtractJob) -> None:
    """Run `job`: every image's tap maps into its feature store (resumable: images stored already are skipped) or
    single file. Ctrl-C leaves a store resumable (the images extracted so far are flushed and indexed)."""
    info = dist_info()
    out = Path(job.out)
    single = is_single_file(out)
    job = dataclasses.replace(job, on_error=job.on_error or ('fail' if single else 'skip'),
                              store_dtype=job.store_dtype or ('float32' if single else 'float16'))
    _check_job(job, single, info)
    images = find_images(job.images)
    if single:
        check_output(out, images, job.overwrite)
        if job.pca:
            check_output(out.with_name(f'{out.stem}_pca_{job.pca}.png'), images, job.overwrite)
    else:
        check_store(out, images, job.overwrite)
        images = [os.path.abspath(p) for p in images]  # the store's keys: two working folders never collide
    check_size_fits(job.size, job.batch_size, job.device, model=job.model)
    if job.on_error == 'fail':
        check_images(images[info.rank::info.world])
    kwargs = dict(job.model_kwargs or {})

    device = torch.device(job.device)
    if device.type == 'cuda' and info.world > 1:
        device = torch.device('cuda', info.local_rank)
        torch.cuda.set_device(device)
    init_distributed(info, device)
    model = load_extractor(job.model, job.taps, str(device), job.dtype, not job.random_weights, job.weights, kwargs)
    data_cfg = data_config(model, job.size)
    size = tuple(data_cfg['input_size'][1:])
    names = _tap_names(model)
    shapes = probe_shapes(model, names, size, device, DTYPES[job.dtype], job.feature_pool, job.feature_size)
    if job.pca:
        _check_pca(job, names, shapes, size)
    if job.compile or job.channels_last:
        from ..models.fast import optimize

        model = optimize(model, channels_last=job.channels_last, compile=job.compile or False)
    workers = default_workers(info.local_world) if job.workers is None else job.workers
    run = dict(model=model, names=names, size=size, mean=data_cfg['mean'], std=data_cfg['std'], resize=job.resize,
               batch_size=job.batch_size, workers=workers, device=device, dtype=DTYPES[job.dtype],
               pool=job.feature_pool, feature_size=job.feature_size, out_dtype=DTYPES[job.store_dtype])
    if single:
        _run_single(job, out, images, run)
        return
    config = dict(
        model=job.model, weights=job.weights or ('random' if job.random_weights else
                                                 model.pretrained_cfg.get('hf_hub_id') or 'pretrained'),
        prompt=kwargs.get('prompt'), lora=getattr(getattr(model, 'model', model), 'lora_identity', None),
        model_kwargs=kwargs, taps=names, shapes=shapes, dtype=job.dtype,
        store_dtype=job.store_dtype, input_size=list(size), resize=job.resize, mean=list(data_cfg['mean']),
        std=list(data_cfg['std']), feature_pool=job.feature_pool, feature_size=job.feature_size,
        **features_revision(job.model))
    _run_store(job, out, images, run, config, shapes, info)


def _progress(total: int, info: DistInfo, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit='img', desc=desc, disable=not info.main, dynamic_ncols=True)


def _run_single(job: ExtractJob, out: Path, images: list[str], run: dict) -> None:
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in run['names']}
    done: list[str] = []
    failed: dict[str, str] = {}
    with _progress(len(images), DistInfo(), job.model) as bar:
        for paths, feats, failures, _ in extract_batches(paths=images, **run):
            if failures and job.on_error == 'fail':
                raise ImageError(failures[0][1])
            failed.update(failures)
            for n, f in feats.items():
                chunks[n].append(f)  # already in the store dtype (extract_batches' out_dtype)
            done.extend(paths)
            bar.update(len(paths) + len(failures))
    if not done:
        raise InputError(f'none of the {len(images)} images could be read; nothing written.')
    feats = {n: torch.cat(c) for n, c in chunks.items()}
    metadata = dict(model=job.model, images=json.dumps(done), failed=json.dumps(failed),
                    input_size=json.dumps([3, *run['size']]), resize=job.resize)
    save_safetensors(feats, out, metadata=mark_metadata(metadata, 'features'))
    for name, f in feats.items():
        print(f'{name}: {tuple(f.shape)}')
    print(f'wrote {out}')
    _report_failed(failed, f'the metadata of {out}')
    if job.pca:
        pca_out = out.with_name(f'{out.stem}_pca_{job.pca}.png')
        pca_image(feats[job.pca].float(), pca_out)
        print(f'wrote {pca_out}')


def _prepare_store(job: ExtractJob, out: Path, config: dict, info: DistInfo,
                   writers: contextlib.ExitStack) -> dict[str, ShardEntry]:
    """Join the store's writers (`writers` holds that until the run ends) and check an existing store against `config`
    (or clear it with --overwrite, when no other run is writing); return the images stored already."""
    stored = {}
    if info.main:
        writers.enter_context(store_writer(out, clear=job.overwrite))
        stored = prepare_store(out, config)
    barrier(info)
    if not info.main:  # after the main rank's --overwrite check, which they would otherwise block
        writers.enter_context(store_writer(out))
    return stored if info.main else scan_shards(out, config)


def _run_store(job: ExtractJob, out: Path, images: list[str], run: dict, config: dict, shapes: dict,
               info: DistInfo) -> None:
    start = time.perf_counter()
    with contextlib.ExitStack() as writers:
        _fill_store(job, out, images, run, config, shapes, info, _prepare_store(job, out, config, info, writers), start)


def _fill_store(job: ExtractJob, out: Path, images: list[str], run: dict, config: dict, shapes: dict, info: DistInfo,
                stored: dict[str, ShardEntry], start: float) -> None:
    mine = images[info.rank::info.world]
    # an image counts as stored only as the same file: same absolute path, size and mtime (else it was replaced)
    todo = [p for p in mine if p not in stored or stored[p].source is None or stored[p].source != file_stamp(p)]
    per_image = sum(math.prod(s) for s in shapes.values()) * DTYPES[job.store_dtype].itemsize
    shard_size = job.shard_size or max(job.batch_size, SHARD_BYTES // max(1, per_image))
    writer = StoreWriter(out, config, info.rank, shard_size, DTYPES[job.store_dtype],
                         index_every_s=30.0 if info.world == 1 else None)
    if info.main and len(todo) < len(mine):
        print(f'{out}: {len(mine) - len(todo)} of these images are stored already; extracting {len(todo)}.')
    batches = extract_batches(paths=todo, **run)  # held here: closed (loader workers stopped) under defer_sigint
    try:
        with _progress(len(todo), info, job.model) as bar:
            for paths, feats, failures, stamps in batches:
                if paths:
                    writer.add(paths, feats, stamps)
                if failures and job.on_error == 'fail':
                    raise ImageError(f'{failures[0][1]} (stopped by --on-error fail; the images before it are '
                                     'stored, run again to resume)')
                writer.failed.update(failures)
                bar.update(len(paths) + len(failures))
    except KeyboardInterrupt:
        with defer_sigint():  # a second Ctrl-C waits for the final flush: the store is left whole and indexed
            batches.close()
            writer.flush()  # whole shards only: what was extracted is kept for the resume, and listed in the index
            if info.world == 1:
                write_index(out, config)
        raise
    finally:
        # stopped now, on any error too: the generator is suspended inside torch.inference_mode, which would otherwise
        # stay on in this thread for as long as the error's traceback keeps it alive
        batches.close()
        writer.flush()  # whole shards only: what was extracted before an error is kept for the resume
    writer.write_failed()
    barrier(info)
    if not info.main:
        return
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
          f'{new / max(seconds, 1e-9):.1f} img/s, store {fmt_bytes(total)}')
