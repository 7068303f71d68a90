"""A feature store: tap maps of many images in safetensors shards plus a JSON index, written as extraction runs.

Layout of a store folder::

    index.json                        config (model, weights, prompt, taps, shapes, dtypes, input size, resize mode),
                                      entries {image path: [shard, row]}, failed {image path: reason}
    shard-r000-000000.safetensors     one (n, C, h, w) tensor per tap; metadata 'paths' = JSON list of its n images

Shards are the truth: each is written atomically (`hub.save_safetensors`), so a killed run leaves whole shards only,
and `scan_shards` recovers every stored image from the shard headers alone. Each rank of a distributed run writes its
own `shard-r<rank>-*` files; `index.json` is rebuilt from the shards at the end (and now and then during a run).

Reading::

    store = FeatureStore('feats/')
    len(store), store.paths, store['img/0001.jpg']      # {tap: (C, h, w) tensor}
    loader = DataLoader(store.dataset('us6', targets=labels), batch_size=64, shuffle=True)
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open

from ..hub import save_safetensors, write_text_atomic

__all__ = ['FeatureStore', 'StoreDataset', 'StoreWriter', 'StoreError', 'INDEX', 'scan_shards', 'store_files',
           'write_index']

INDEX = 'index.json'
FORMAT = 'diffbackbone-feature-store-1'
_SHARD = re.compile(r'shard-r(\d+)-(\d+)\.safetensors')
_FAILED = re.compile(r'failed-r(\d+)\.json')


class StoreError(ValueError):
    """A feature store is missing, damaged, or does not match the run that wants to write into it."""


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers never see half of it (the hub's atomic text writer)."""
    write_text_atomic(path, json.dumps(data, indent=1))


def store_files(root: Path) -> list[Path]:
    """Files of `root` belonging to a store (what `--overwrite` removes): shards, index, failure lists, temporaries."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_file() and (
        p.name == INDEX or _SHARD.fullmatch(p.name) or _FAILED.fullmatch(p.name)
        or (p.name.startswith('.') and p.name.endswith('.tmp')))]


def scan_shards(root: Path) -> dict[str, tuple[str, int]]:
    """{image path: (shard file name, row)} of every complete shard in `root`, read from the shard headers only."""
    entries: dict[str, tuple[str, int]] = {}
    for shard in sorted(p for p in root.glob('shard-r*.safetensors') if _SHARD.fullmatch(p.name)):
        try:
            with safe_open(shard, 'pt') as f:
                paths = json.loads((f.metadata() or {}).get('paths', '[]'))
        except Exception as e:  # a shard is written atomically: a bad one was damaged afterwards
            raise StoreError(f'{shard} is not a readable shard ({e}); delete it and run again to re-extract its '
                             'images.') from e
        for row, path in enumerate(paths):
            entries[path] = (shard.name, row)
    return entries


def read_index(root: Path) -> dict:
    """The parsed `index.json` of the store at `root`."""
    path = Path(root) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise StoreError(f'{root} is not a feature store (no {INDEX}). Write one with `diffbackbone features IMAGES '
                         f'--out {root}`.') from e
    except (OSError, ValueError) as e:
        raise StoreError(f'{path} cannot be read ({e}).') from e
    if index.get('format') != FORMAT:
        raise StoreError(f'{path} is not a diffbackbone feature store index (format {index.get("format")!r}).')
    return index


def write_index(root: Path, config: dict, failed: Optional[Mapping[str, str]] = None) -> dict:
    """Rebuild `index.json` from the shards of `root` and return it."""
    entries = scan_shards(root)
    failed = {p: r for p, r in (failed or {}).items() if p not in entries}
    index = dict(format=FORMAT, config=config, count=len(entries),
                 entries={p: list(v) for p, v in entries.items()}, failed=failed)
    _write_json_atomic(root / INDEX, index)
    return index


def config_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: stored X, asked Y' for every setting that differs between two store configs."""
    return [f'{k}: stored {old.get(k)!r}, asked {new.get(k)!r}' for k in sorted(set(old) | set(new))
            if k != 'shapes' and old.get(k) != new.get(k)]


class StoreWriter:
    """Buffers the features of one rank and writes them as shards of about `shard_size` images each.

    Memory is bounded by one shard: the buffer is flushed to disk whenever it holds `shard_size` images.
    """

    def __init__(self, root: Path, config: dict, rank: int = 0, shard_size: int = 256, store_dtype=torch.float16,
                 index_every_s: Optional[float] = 30.0):
        self.root, self.config, self.rank = Path(root), config, rank
        self.shard_size, self.store_dtype = max(1, shard_size), store_dtype
        self.index_every_s = index_every_s  # None: never rewrite the index from here (distributed ranks)
        self._paths: list[str] = []
        self._chunks: dict[str, list[torch.Tensor]] = {}
        self._next = 1 + max((int(m[2]) for p in self.root.glob(f'shard-r{rank:03d}-*.safetensors')
                              if (m := _SHARD.fullmatch(p.name)) and int(m[1]) == rank), default=-1)
        self._last_index = time.monotonic()
        self.failed: dict[str, str] = {}
        self.bytes_written = 0

    def add(self, paths: Sequence[str], feats: Mapping[str, torch.Tensor]) -> None:
        """Append a batch: `paths[i]` owns row i of every tap tensor."""
        for name, f in feats.items():
            self._chunks.setdefault(name, []).append(f.detach().to('cpu', self.store_dtype))
        self._paths.extend(paths)
        if len(self._paths) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered images as one shard (atomically), then maybe refresh the index."""
        if not self._paths:
            return
        tensors = {n: torch.cat(c) for n, c in self._chunks.items()}
        path = self.root / f'shard-r{self.rank:03d}-{self._next:06d}.safetensors'
        save_safetensors(tensors, path, metadata=dict(paths=json.dumps(self._paths), format=FORMAT))
        self.bytes_written += path.stat().st_size
        self._next += 1
        self._paths, self._chunks = [], {}
        if self.index_every_s is not None and time.monotonic() - self._last_index >= self.index_every_s:
            write_index(self.root, self.config)
            self._last_index = time.monotonic()

    def write_failed(self) -> None:
        """Leave this rank's failures for the rank that writes the final index."""
        _write_json_atomic(self.root / f'failed-r{self.rank:03d}.json', self.failed)


def collect_failed(root: Path) -> dict[str, str]:
    """Merge and remove the per-rank failure lists."""
    failed: dict[str, str] = {}
    for p in sorted(root.glob('failed-r*.json')):
        failed.update(json.loads(p.read_text()))
        p.unlink()
    return failed


class FeatureStore:
    """Read a feature store folder: `len()`, `.paths`, `store[path] -> {tap: tensor}`, iteration, `.dataset()`.

    Args:
        root: the folder written by `diffbackbone features ... --out DIR`.
        max_open: shard files kept open at once.
        rescan: list the images from the shard headers instead of the index (a run still going, or killed, refreshes
            its index only now and then; the shards are always whole).
    """

    def __init__(self, root: Union[str, Path], max_open: int = 8, rescan: bool = False):
        self.root = Path(root)
        index = read_index(self.root)
        self.config: dict = index['config']
        self.failed: dict[str, str] = index.get('failed', {})
        entries = scan_shards(self.root) if rescan else index['entries']
        self._entries: dict[str, tuple[str, int]] = {p: (s, r) for p, (s, r) in entries.items()}
        self.paths: list[str] = list(self._entries)
        self.taps: list[str] = list(self.config['taps'])
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: object) -> bool:
        return self._key(path) is not None

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(path, {tap: tensor}) for every image, shard by shard (each shard opened once)."""
        for path in sorted(self.paths, key=lambda p: self._entries[p]):
            yield path, self[path]

    def __repr__(self) -> str:
        return (f'FeatureStore({str(self.root)!r}, {len(self)} images, model={self.config.get("model")!r}, '
                f'taps={self.taps})')

    def _key(self, path: object) -> Optional[str]:
        for key in (str(path), os.path.normpath(str(path))):
            if key in self._entries:
                return key
        return None

    def _shard(self, name: str):
        handle = self._open.pop(name, None)
        if handle is None:
            try:
                handle = safe_open(self.root / name, 'pt')
            except Exception as e:
                raise StoreError(f'{self.root / name} cannot be read ({e}); re-run the extraction into '
                                 f'{self.root} to restore it.') from e
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)
        self._open[name] = handle
        return handle

    def get(self, path: Union[str, Path], taps: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """{tap: (C, h, w) tensor} of one image (only `taps`, if given)."""
        key = self._key(path)
        if key is None:
            extra = f' (it failed: {self.failed[str(path)]})' if str(path) in self.failed else ''
            raise KeyError(f'{path} is not in the feature store {self.root}{extra}.')
        name, row = self._entries[key]
        handle = self._shard(name)
        unknown = [t for t in taps or () if t not in self.taps]
        if unknown:
            raise KeyError(f'taps {unknown} are not in the feature store {self.root} (it has {self.taps}).')
        return {t: handle.get_slice(t)[row:row + 1][0] for t in (taps or self.taps)}

    __getitem__ = get

    def dataset(self, taps: Union[str, Sequence[str], None] = None,
                targets: Union[Mapping[str, Any], Callable[[str], Any], None] = None) -> 'StoreDataset':
        """A `torch.utils.data.Dataset` over the stored images (see `StoreDataset`)."""
        return StoreDataset(self, taps, targets)

    def __getstate__(self) -> dict:  # DataLoader workers open their own shard handles
        return {**self.__dict__, '_open': OrderedDict()}


class StoreDataset(torch.utils.data.Dataset):
    """Cached features for training probes: item i is the features of `store.paths[i]` (float32).

    `taps` a single name gives a tensor, a list (or None: all) a {tap: tensor} dict. With `targets` (a mapping or a
    function of the image path) an item is `(features, target)`.
    """

    def __init__(self, store: FeatureStore, taps: Union[str, Sequence[str], None] = None,
                 targets: Union[Mapping[str, Any], Callable[[str], Any], None] = None):
        self.store, self.targets = store, targets
        self.single = isinstance(taps, str)
        self.taps = [taps] if self.single else list(taps or store.taps)
        if isinstance(targets, Mapping):
            missing = [p for p in store.paths if p not in targets]
            if missing:
                raise KeyError(f'targets has no entry for {len(missing)} stored images, e.g. {missing[0]}.')

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        path = self.store.paths[i]
        feats = {k: v.float() for k, v in self.store.get(path, self.taps).items()}
        x = feats[self.taps[0]] if self.single else feats
        if self.targets is None:
            return x
        target = self.targets[path] if isinstance(self.targets, Mapping) else self.targets(path)
        return x, target
