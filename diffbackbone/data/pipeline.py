"""The extraction pipeline of `diffbackbone features`: inputs -> DataLoader workers -> model -> feature batches.

* `find_images` expands image files, folders (recursive), globs and `@list.txt` files (one path per line) in order,
  without duplicates.
* `ImageFiles` is a `Dataset` whose workers decode, convert and resize with `images.load_image`, off the main process;
  an unreadable image becomes an error record instead of stopping the loader.
* `extract_batches` runs the model on every batch (pinned memory and non-blocking copies on CUDA) and yields
  `(paths, {tap: features}, failures)` as it goes, so the caller can write them out with bounded memory.
* `dist_info`/`init_distributed` read torchrun's environment: each rank takes the slice `paths[rank::world]`.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .images import IMAGE_EXTENSIONS, ImageError, load_image

__all__ = ['find_images', 'ImageFiles', 'extract_batches', 'pool_features', 'default_workers', 'DistInfo',
           'dist_info', 'init_distributed']


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if _is_image(Path(f)))
    return found


def find_images(inputs: Sequence[str]) -> list[str]:
    """Image paths named by `inputs`: files, folders (recursive, image extensions only), globs, `@list.txt`.

    A file named directly is taken whatever its extension (it is read, or reported, later). Raises `ValueError` for
    an input that names nothing.
    """
    found: list[str] = []
    for item in inputs:
        if item.startswith('@'):
            listing = Path(item[1:])
            try:
                lines = listing.read_text().splitlines()
            except OSError as e:
                raise ValueError(f'cannot read the list file {listing} ({e.strerror}); give a text file with one '
                                 'image path per line after @.') from e
            base = listing.parent
            names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith('#')]
            found.extend(find_images([n if os.path.isabs(n) or n.startswith('@') else str(base / n) for n in names]))
            continue
        path = Path(item)
        if path.is_dir():
            images = _folder_images(path)
            if not images:
                raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under the folder {item}.')
            found.extend(images)
        elif path.is_file():
            found.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            images = [m for m in matches if os.path.isfile(m) and _is_image(Path(m))]
            images += [i for m in matches if os.path.isdir(m) for i in _folder_images(Path(m))]
            if not images:
                raise ValueError(f'the pattern {item!r} matches no image file.')
            found.extend(images)
        else:
            raise ValueError(f'{item}: no such file, folder or pattern. Check the path (quote glob patterns so the '
                             'shell does not expand them).')
    return list(dict.fromkeys(found))


class ImageFiles(Dataset):
    """Item i: `(i, (3, H, W) float32 image or None, error message or None)`; decoding runs in the worker."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int], resize: str, mean: Sequence[float],
                 std: Sequence[float]):
        self.paths, self.size, self.resize, self.mean, self.std = list(paths), size, resize, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i], self.size, self.resize, self.mean, self.std), None
        except ImageError as e:
            return i, None, str(e)


def _collate(items):
    """(indices of good images, stacked images or None, [(index, error)])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = [(i, e) for i, _, e in items if e is not None]
    x = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], x, errors


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the main process owns the cores for the model; workers only decode and resize


def default_workers(local_world_size: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared by the local ranks, one left for the model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, local_world_size) - 1))


def pool_features(feats: torch.Tensor, pool: Optional[int] = None, size: Optional[int] = None) -> torch.Tensor:
    """Spatially shrink stored maps: average-pool by `pool` (`F.adaptive_avg_pool2d`), or resize to `size` x `size`
    (bilinear, antialiased when shrinking), as Meng et al.'s `feature_resize`."""
    if pool and pool > 1:
        h, w = feats.shape[-2:]
        return F.adaptive_avg_pool2d(feats, (max(1, h // pool), max(1, w // pool)))
    if size:
        shrink = size < max(feats.shape[-2:])
        return F.interpolate(feats.float(), size=(size, size), mode='bilinear', align_corners=False,
                             antialias=shrink).to(feats.dtype)
    return feats


def extract_batches(
        model: torch.nn.Module,
        names: Sequence[str],
        paths: Sequence[str],
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        resize: str = 'stretch',
        batch_size: int = 4,
        workers: int = 0,
        device: torch.device = torch.device('cpu'),
        dtype: torch.dtype = torch.float32,
        pool: Optional[int] = None,
        feature_size: Optional[int] = None,
        out_dtype: Optional[torch.dtype] = None,
) -> Iterator[tuple[list[str], dict[str, torch.Tensor], list[tuple[str, str]]]]:
    """Run `model` (timm `features_only`, outputs named `names`) over `paths`; yield (paths, {tap: CPU features},
    [(path, error)]) per batch, in input order.

    Features are pooled and cast to `out_dtype` on the device, so fewer bytes cross to the host. On CUDA the copy of a
    batch's features is queued behind its forward and waited for only after the next batch's forward is queued: the
    GPU is not idle while the host stores the previous batch.
    """
    cuda = device.type == 'cuda'
    loader = DataLoader(ImageFiles(paths, size, resize, mean, std), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=cuda, worker_init_fn=_worker_init,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    pending = None  # (paths, {tap: host tensor}, failures, CUDA event of the copy)

    def finish(item):
        if item[3] is not None:
            item[3].synchronize()
        return item[:3]

    with torch.inference_mode():
        for idx, x, errors in loader:
            failures = [(paths[i], e) for i, e in errors]
            if x is None:
                if pending is not None:
                    yield finish(pending)
                    pending = None
                yield [], {}, failures
                continue
            x = x.to(device, non_blocking=cuda).to(dtype)  # channels_last: `fast.optimize`'s input hook
            out = model(x)
            feats = {n: pool_features(f, pool, feature_size).to(out_dtype or f.dtype).to('cpu', non_blocking=cuda)
                     for n, f in zip(names, out)}
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
            if pending is not None:
                yield finish(pending)
            pending = ([paths[i] for i in idx], feats, failures, event)
        if pending is not None:
            yield finish(pending)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); 0 of 1 alone."""
    env = os.environ
    return DistInfo(int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0)),
                    int(env.get('LOCAL_WORLD_SIZE', 1)))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise) when there is more than one rank."""
    import torch.distributed as dist

    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()
