"""The extraction pipeline of `diffbackbone features`: inputs -> DataLoader workers -> model -> feature batches.

* `find_images` expands image files, folders (recursive, following links, each real folder once), globs and
  `@list.txt` files (one path per line) in order, each real file once.
* `ImageFiles` is a `Dataset` whose workers decode, convert and resize with `images.load_image`, off the main process;
  an unreadable image becomes an error record instead of stopping the loader.
* `extract_batches` runs the model on every batch (pinned memory and non-blocking copies on CUDA) and yields
  a `Batch` (paths, {tap: features}, failures, file stamps) as it goes, so the caller can write them out with
  bounded memory.
* `dist_info`/`init_distributed` read torchrun's environment: each rank takes the slice `paths[rank::world]`.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError
from ..hub import defer_sigint
from .images import IMAGE_EXTENSIONS, ImageError, load_image

__all__ = ['find_images', 'folder_images', 'file_stamp', 'Batch', 'ImageFiles', 'extract_batches', 'pool_features',
           'default_workers', 'DistInfo', 'dist_info', 'init_distributed']


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def file_stamp(path: str | Path) -> Optional[tuple[int, int]]:
    """(size, mtime in ns) of a file, its identity for the feature store (None if it cannot be stat-ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _walk(folder: str, seen: set[str]) -> Iterator[tuple[str, bool]]:
    """(path, is_folder) of everything under `folder`, depth first and sorted, following links.

    A folder whose real path was walked already (a link to itself or to a parent, the same folder through two links)
    is not walked again, so loops end. Real folders come before links to folders, so a folder reached both ways keeps
    its own name.
    """
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise InputError(f'cannot list the folder {folder} ({e.strerror or e}); check its permissions.') from e
    folders = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError:
            is_dir = False
        if is_dir:
            folders.append(entry)
        else:
            yield entry.path, False
    for entry in sorted(folders, key=lambda e: (e.is_symlink(), e.name)):
        yield entry.path, True
        yield from _walk(entry.path, seen)


def folder_images(folder: str | Path, seen: Optional[set[str]] = None) -> list[str]:
    """Image files under `folder` (by extension), walked as every command walks folders: following links, each real
    folder once."""
    return [p for p, is_dir in _walk(str(folder), set() if seen is None else seen) if not is_dir and _is_image(p)]


def _match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """glob's rules on path components: `**` spans any number of folders, `*` and `?` stay within one and, like
    glob, skip names starting with a dot unless the pattern does."""
    if not pattern:
        return not parts
    if pattern[0] == '**':
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith('.') for p in parts[:i]))
    return (bool(parts) and not (parts[0].startswith('.') and not pattern[0].startswith('.'))
            and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:]))


def _glob_images(pattern: str) -> list[str]:
    """Image files matched by `pattern`, and those under the folders it matches.

    Patterns with `**` are walked by `_walk` (glob's own recursion follows links to folders without end).
    """
    parts = pattern.split(os.sep)
    if '**' not in parts:
        matches = sorted(glob.glob(pattern))
        images = [m for m in matches if os.path.isfile(m) and _is_image(m)]
        return images + [i for m in matches if os.path.isdir(m) for i in folder_images(m)]
    cut = parts.index('**')
    prefix = os.sep.join(parts[:cut])
    bases = sorted(glob.glob(prefix)) if prefix else [os.sep if cut else os.curdir]
    images: list[str] = []
    for base in (b for b in bases if os.path.isdir(b)):
        if all(x == '**' for x in parts[cut:]):  # `base/**` matches `base/` itself, as in glob: all of it
            images += folder_images(base)
            continue
        matched_dirs: list[str] = []
        for path, is_dir in _walk(base, set()):
            rel = os.path.relpath(path, base).split(os.sep)
            if is_dir and _match_parts(parts[cut:], rel):
                matched_dirs.append(os.path.join(path, ''))
            elif not is_dir and _is_image(path) and (
                    _match_parts(parts[cut:], rel) or any(path.startswith(d) for d in matched_dirs)):
                images.append(path[len(os.curdir) + 1:] if base == os.curdir else path)
    return images


def _relative_to(base: Path, line: str) -> str:
    """A line of a list file: a path (or an @list) relative to the list's folder unless absolute."""
    at = '@' if line.startswith('@') else ''
    name = line[len(at):]
    return at + (name if os.path.isabs(name) else str(base / name))


def find_images(inputs: Sequence[str]) -> list[str]:
    """Image paths named by `inputs`: files, folders (recursive, image extensions only), globs, `@list.txt`.

    A file named directly is taken whatever its extension (it is read, or reported, later). Folders are walked
    following links, each real folder once (loops end); a file reached twice (a link, two inputs) is kept once, under
    the first name found. Raises `ValueError` for an input that names nothing, a list file that names no image or
    includes itself.
    """
    found: dict[str, str] = {}  # real path -> first name

    def add(paths: Sequence[str]) -> None:
        for path in paths:
            found.setdefault(os.path.realpath(path), path)

    def expand(items: Sequence[str], lists: tuple[str, ...]) -> None:
        for item in items:
            if item.startswith('@'):
                listing = Path(item[1:])
                real = os.path.realpath(listing)
                if real in lists:
                    chain = ' -> '.join([*(os.path.basename(x) for x in lists), listing.name])
                    raise InputError(f'the list file {listing} includes itself ({chain}); remove the @ line that '
                                     'leads back to it.')
                try:
                    lines = listing.read_text().splitlines()
                except (OSError, UnicodeDecodeError) as e:
                    raise InputError(f'cannot read the list file {listing} ({getattr(e, "strerror", None) or e}); '
                                     'give a text file with one image path per line after @.') from e
                base = listing.parent
                names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith('#')]
                if not names:
                    raise InputError(f'the list file {listing} names no image (only blank or # lines); give a text '
                                     'file with one image path per line after @.')
                expand([_relative_to(base, n) for n in names], (*lists, real))
                continue
            path = Path(item)
            if path.is_dir():
                images = folder_images(item)
                if not images:
                    raise InputError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under the folder {item}.')
                add(images)
            elif path.is_file():
                add([item])
            elif glob.has_magic(item):
                images = _glob_images(item)
                if not images:
                    raise InputError(f'the pattern {item!r} matches no image file.')
                add(images)
            else:
                raise InputError(f'{item}: no such file, folder or pattern. Check the path (quote glob patterns so '
                                 'the shell does not expand them).')

    expand(inputs, ())
    return list(found.values())


class ImageFiles(Dataset):
    """Item i: `(i, (3, H, W) float32 image or None, error message or None, file_stamp)`; decoding runs in the worker.

    The stamp (size, mtime) is taken before the file is read: if the file changes meanwhile, the stamp is the old one
    and a resumed run reads the file again.
    """

    def __init__(self, paths: Sequence[str], size: tuple[int, int], resize: str, mean: Sequence[float],
                 std: Sequence[float]):
        self.paths, self.size, self.resize, self.mean, self.std = list(paths), size, resize, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        stamp = file_stamp(self.paths[i])
        try:
            return i, load_image(self.paths[i], self.size, self.resize, self.mean, self.std), None, stamp
        except ImageError as e:
            return i, None, str(e), stamp


def _collate(items):
    """(indices of good images, stacked images or None, [(index, error)], stamps of the good images)."""
    good = [(i, x, st) for i, x, _, st in items if x is not None]
    errors = [(i, e) for i, _, e, _ in items if e is not None]
    x = torch.stack([x for _, x, _ in good]) if good else None
    return [i for i, _, _ in good], x, errors, [st for _, _, st in good]


class Batch(NamedTuple):
    """One batch of `extract_batches`: its images, their features, the images that failed, and the images'
    (size, mtime) stamps taken when they were read (`file_stamp`)."""

    paths: list[str]
    features: dict[str, torch.Tensor]
    failures: list[tuple[str, str]]
    stamps: list[Optional[tuple[int, int]]]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the main process owns the cores for the model; workers only decode and resize
    # Ctrl-C is the main process's to handle (one line, exit 130); a terminal sends it to the workers too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.excepthook = _quiet_resource_sharer


def _quiet_resource_sharer(args: threading.ExceptHookArgs) -> None:
    """In a loader worker, multiprocessing's fd-passing thread (`resource_sharer._serve`) fails on its socket when the
    main process exits on Ctrl-C mid-batch (on the socket, or in the handshake it cut short: AuthenticationError); that
    traceback says nothing to the user. Any other thread's error is shown."""
    import multiprocessing

    lost = (OSError, EOFError, multiprocessing.AuthenticationError)
    if args.thread is not None and args.thread.name.endswith('(_serve)') and issubclass(args.exc_type, lost):
        return
    threading.__excepthook__(args)


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
) -> Iterator[Batch]:
    """Run `model` (timm `features_only`, outputs named `names`) over `paths`; yield a `Batch` (paths, {tap: CPU
    features}, [(path, error)], stamps) per batch, in input order.

    Features are pooled and cast to `out_dtype` on the device, so fewer bytes cross to the host. On CUDA the copy of a
    batch's features is queued behind its forward and waited for only after the next batch's forward is queued: the
    GPU is not idle while the host stores the previous batch.
    """
    cuda = device.type == 'cuda'
    loader = DataLoader(ImageFiles(paths, size, resize, mean, std), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=cuda, worker_init_fn=_worker_init,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    pending = None  # (Batch, CUDA event of the copy)

    def finish(item):
        if item[1] is not None:
            item[1].synchronize()
        return item[0]

    batches = iter(loader)  # a local, so that `finally` drops the last reference (and stops the workers) itself
    try:
        with torch.inference_mode():
            for idx, x, errors, stamps in batches:
                failures = [(paths[i], e) for i, e in errors]
                if x is None:
                    if pending is not None:
                        yield finish(pending)
                        pending = None
                    yield Batch([], {}, failures, [])
                    continue
                x = x.to(device, non_blocking=cuda).to(dtype)  # channels_last: `fast.optimize`'s input hook
                out = model(x)
                feats = {n: pool_features(f, pool, feature_size).to(out_dtype or f.dtype)
                         .to('cpu', non_blocking=cuda) for n, f in zip(names, out)}
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                if pending is not None:
                    yield finish(pending)
                pending = (Batch([paths[i] for i in idx], feats, failures, stamps), event)
            if pending is not None:
                yield finish(pending)
    finally:
        with defer_sigint():  # stopping the loader workers (on Ctrl-C too) is not cut short by a second Ctrl-C
            del batches


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
