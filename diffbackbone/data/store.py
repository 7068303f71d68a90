"""A feature store: tap maps of many images in safetensors shards plus a JSON index, written as extraction runs.

Shards are the truth (written atomically, so `scan_shards` rebuilds the index and the settings from their headers);
each writer names its shards `shard-r<rank>-<writer id>-<n>` and rebuilds `index.json` under a `flock` on `.lock`.
Layout, resume and concurrency promises: docs/store.md#layout-of-a-store. Reading::

    store = FeatureStore('feats/')
    len(store), store.paths, store['img/0001.jpg']      # {tap: (C, h, w) tensor}; relative paths from the cwd"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

from ..errors import DiffbackboneError, InputError, InputTypeError
from ..hub import defer_sigint, save_safetensors, write_text_atomic

__all__ = ['FeatureStore', 'StoreDataset', 'StoreWriter', 'StoreError', 'ShardEntry', 'INDEX', 'scan_shards',
           'store_files', 'write_index', 'prepare_store', 'store_lock', 'store_writer']

INDEX = 'index.json'
LOCK = '.lock'
WRITERS = '.writers'  # every writer holds a shared flock on it for its whole run (`store_writer`)
FORMAT = 'diffbackbone-feature-store-2'
_OLD_FORMAT = 'diffbackbone-feature-store-1'  # keys as given, no sources: readable, not resumable
_SHARD = re.compile(r'shard-r(\d+)-(?:([0-9a-f]{8})-)?(\d+)\.safetensors')
_FAILED = re.compile(r'failed-r(\d+)(?:-[0-9a-f]{8})?\.json')


class StoreError(DiffbackboneError, ValueError):
    """A feature store is missing, damaged, or does not match the run that wants to write into it."""


class ShardEntry(NamedTuple):
    """Where an image is stored, the (size, mtime_ns) of its file when it was read, and when its shard was written."""

    shard: str
    row: int
    source: Optional[tuple[int, int]]
    written: int


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers never see half of it (the hub's atomic text writer)."""
    write_text_atomic(path, json.dumps(data, indent=1))


def store_files(root: Path) -> list[Path]:
    """Files of `root` belonging to a store (what `--overwrite` removes): shards, index, failure lists, lock,
    temporaries."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_file() and (
        p.name in (INDEX, LOCK) or _SHARD.fullmatch(p.name) or _FAILED.fullmatch(p.name)
        or (p.name.startswith('.') and p.name.endswith('.tmp')))]


@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Hold the store's lock (`flock` on `root/.lock`; blocks while another writer holds it).

    The kernel drops the lock when its process dies, so a killed writer never leaves a stale lock behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _damaged(what: Path, why: str) -> StoreError:
    return StoreError(f'{what} {why}. Move it out of the store (or delete it) and run the extraction again to '
                      're-extract its images.')


def _read_header(shard: Path) -> tuple[list[str], list, int, Optional[dict]]:
    """(paths, sources, written, config) from a shard's metadata, checked."""
    try:
        with safe_open(shard, 'pt') as f:
            meta = f.metadata() or {}
        paths = json.loads(meta.get('paths', '[]'))
        sources = json.loads(meta.get('sources', 'null')) or [None] * len(paths)
        config = json.loads(meta['config']) if 'config' in meta else None
        written = int(meta.get('written', 0))
    except (SafetensorError, OSError, ValueError) as e:  # a shard is written atomically: this one was damaged later
        raise _damaged(shard, f'is not a readable shard ({e})') from e
    if (not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not isinstance(sources, list)
            or len(sources) != len(paths) or not (config is None or isinstance(config, dict))):
        raise _damaged(shard, 'is not a diffbackbone shard (its metadata lists no image paths)')
    return paths, sources, written, config


def _shards(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob('shard-r*.safetensors') if _SHARD.fullmatch(p.name))


def _scan(root: Path, config: Optional[Mapping[str, Any]] = None
          ) -> tuple[dict[str, ShardEntry], dict[str, Optional[dict]]]:
    """({image path: newest ShardEntry}, {shard name: its config}) of the shards of `root`.

    With `config`, a shard written with other settings raises `StoreError` (it belongs to another store).
    """
    entries: dict[str, ShardEntry] = {}
    configs: dict[str, Optional[dict]] = {}
    for shard in _shards(root):
        paths, sources, written, shard_config = _read_header(shard)
        configs[shard.name] = shard_config
        if config is not None and shard_config is not None:
            diff = config_difference(shard_config, config)
            if diff:
                raise StoreError(f'{shard} was written with other settings ({"; ".join(diff)}): it belongs to '
                                 'another store. Move it away, or choose another --out.')
        for row, (path, source) in enumerate(zip(paths, sources)):
            entry = ShardEntry(shard.name, row, tuple(source) if source else None, written)
            old = entries.get(path)
            if old is None or (old.written, old.shard) < (entry.written, entry.shard):
                entries[path] = entry
    return entries, configs


def scan_shards(root: Path, config: Optional[Mapping[str, Any]] = None) -> dict[str, ShardEntry]:
    """{image path: ShardEntry} of every complete shard in `root`, from the shard headers only; an image stored twice
    (re-extracted after it changed) maps to its newest row. With `config`, shards of other settings are refused."""
    return _scan(root, config)[0]


def _index_problem(index: Any) -> Optional[str]:
    """What makes a parsed index unusable (None when it is fine)."""
    if not isinstance(index, dict) or index.get('format') not in (FORMAT, _OLD_FORMAT):
        fmt = index.get('format') if isinstance(index, dict) else type(index).__name__
        return f'is not a diffbackbone feature store index (format {fmt!r})'
    config = index.get('config')
    if not isinstance(config, dict) or not isinstance(config.get('taps'), list):
        return 'has no config (model settings and taps): it is damaged'
    entries = index.get('entries')
    if not isinstance(entries, dict) or not all(
            isinstance(v, list) and len(v) >= 2 and isinstance(v[0], str) and isinstance(v[1], int)
            for v in entries.values()):
        return 'has no valid entries ({image path: [shard, row]}): it is damaged'
    return None


def read_index(root: Path) -> dict:
    """The parsed and checked `index.json` of the store at `root`."""
    path = Path(root) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as e:
        hint = (' Its shards are there: FeatureStore(root, rescan=True) reads them, and running the same '
                '`diffbackbone features` command again rebuilds the index.' if _shards(root) else
                f' Write one with `diffbackbone features IMAGES --out {root}`.')
        raise StoreError(f'{root} is not a feature store (no {INDEX}).{hint}') from e
    except (OSError, ValueError) as e:
        index, problem = None, f'cannot be read ({e})'
    else:
        problem = _index_problem(index)
    if problem:
        raise StoreError(f'{path} {problem}. FeatureStore({str(root)!r}, rescan=True) reads the shards without it; '
                         'if it is a store index, deleting it and running the same `diffbackbone features` command '
                         'again rebuilds it.')
    return index


def _merge_failed(root: Path, old: Mapping[str, str], new: Optional[Mapping[str, str]]) -> tuple[dict, list[Path]]:
    """The failure list of the index: the old one, every writer's `failed-*.json`, then `new`."""
    failed = dict(old)
    files = sorted(p for p in root.glob('failed-r*.json') if _FAILED.fullmatch(p.name))
    for p in files:
        try:
            failed.update(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise _damaged(p, f'cannot be read ({e})') from e
    failed.update(new or {})
    return failed, files


def _write_index(root: Path, config: dict, failed: Optional[Mapping[str, str]] = None) -> dict:
    """`write_index` with the lock held."""
    entries = scan_shards(root, config)
    try:
        old = read_index(root).get('failed') or {}
    except StoreError:
        old = {}
    failed, merged = _merge_failed(root, old, failed)
    failed = {p: r for p, r in failed.items() if p not in entries}
    index = dict(format=FORMAT, config=config, count=len(entries),
                 entries={p: [e.shard, e.row] for p, e in entries.items()},
                 sources={p: list(e.source) for p, e in entries.items() if e.source}, failed=failed)
    try:
        _write_json_atomic(root / INDEX, index)
    except OSError as e:
        raise StoreError(f'cannot write {root / INDEX} ({e}); the shards are kept: free some space and run the same '
                         'command again to resume.') from e
    for p in merged:  # in the index now
        p.unlink(missing_ok=True)
    return index


def write_index(root: Path, config: dict, failed: Optional[Mapping[str, str]] = None) -> dict:
    """Rebuild `index.json` from the shards of `root` (under the store lock) and return it.

    The failure list merges the previous index's, the writers' `failed-*.json` files and `failed`, less the images
    stored since: concurrent writers never drop each other's.
    """
    root = Path(root)
    with defer_sigint(), store_lock(root):  # Ctrl-C waits for the index
        return _write_index(root, config, failed)


@contextlib.contextmanager
def store_writer(root: Path, clear: bool = False) -> Iterator[None]:
    """Be one of the store's writers for the block: a shared `flock` on `root/.writers`, which the kernel drops when the
    process dies. `clear` (`--overwrite`) first removes the store's files, and only when no other writer is running:
    another run filling the store is refused rather than having its shards deleted under it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / WRITERS, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if clear:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f'--overwrite: another run is writing into {root} right now; wait for it to end '
                                 '(or stop it), or choose another --out.') from None
            for p in store_files(root):
                p.unlink()
        fcntl.flock(fd, fcntl.LOCK_SH)  # from exclusive: converted in place
        yield
    finally:
        os.close(fd)


def prepare_store(root: Path, config: dict) -> dict[str, ShardEntry]:
    """Open `root` for writing with `config`: check an existing store's settings (or create its index, from any shards
    already there) under the lock, and return the images stored already."""
    root = Path(root)
    with store_lock(root):
        if (root / INDEX).is_file():
            index = read_index(root)
            if index['format'] != FORMAT:
                raise StoreError(f'{root} was written by an older diffbackbone (images keyed by the path as given, '
                                 'no file identity): it can be read but not resumed. Choose another --out, or pass '
                                 '--overwrite to replace it.')
            diff = config_difference(index['config'], config)
            if diff:
                raise StoreError(f'{root} holds features made with other settings ({"; ".join(diff)}). Resume with '
                                 'the same settings, choose another --out, or pass --overwrite to replace the store.')
        else:
            _write_index(root, config)
        return scan_shards(root, config)


def config_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: stored X, asked Y' for every setting that differs between two store configs."""
    return [f'{k}: stored {old.get(k)!r}, asked {new.get(k)!r}' for k in sorted(set(old) | set(new))
            if k != 'shapes' and old.get(k) != new.get(k)]


class StoreWriter:
    """Buffers the features of one writer and writes them as shards of about `shard_size` images each.

    Memory is bounded by one shard: the buffer is flushed to disk whenever it holds `shard_size` images. Shard names
    carry the rank and a random writer id, so any number of writers can fill one store at once.
    """

    def __init__(self, root: Path, config: dict, rank: int = 0, shard_size: int = 256, store_dtype=torch.float16,
                 index_every_s: Optional[float] = 30.0):
        self.root, self.config, self.rank = Path(root), config, rank
        self.shard_size, self.store_dtype = max(1, shard_size), store_dtype
        self.index_every_s = index_every_s  # None: never rewrite the index from here (distributed ranks)
        self.writer_id = uuid.uuid4().hex[:8]
        self._paths: list[str] = []
        self._sources: list[Optional[list[int]]] = []
        self._chunks: dict[str, list[torch.Tensor]] = {}
        self._next = 0
        self._last_index = time.monotonic()
        self.failed: dict[str, str] = {}
        self.bytes_written = 0
        self.stored = 0

    def add(self, paths: Sequence[str], feats: Mapping[str, torch.Tensor],
            sources: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> None:
        """Append a batch: `paths[i]` owns row i of every tap tensor; `sources[i]` is its file's (size, mtime_ns)."""
        for name, f in feats.items():
            self._chunks.setdefault(name, []).append(f.detach().to('cpu', self.store_dtype))
        self._paths.extend(paths)
        self._sources.extend(list(s) if s else None for s in (sources or [None] * len(paths)))
        if len(self._paths) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered images as one shard (atomically; a Ctrl-C meanwhile is acted on once it is written), then
        maybe refresh the index.

        If the write fails (disk full), the buffer is dropped with the half-written temporary: those images are not
        stored, and a resumed run extracts them again.
        """
        if not self._paths:
            return
        paths, sources, chunks = self._paths, self._sources, self._chunks
        self._paths, self._sources, self._chunks = [], [], {}
        tensors = {n: torch.cat(c) for n, c in chunks.items()}
        path = self.root / f'shard-r{self.rank:03d}-{self.writer_id}-{self._next:06d}.safetensors'
        self._next += 1
        metadata = dict(format=FORMAT, paths=json.dumps(paths), sources=json.dumps(sources),
                        written=str(time.time_ns()), config=json.dumps(self.config))
        with defer_sigint():  # Ctrl-C waits for the shard: the images extracted so far are kept for the resume
            try:
                save_safetensors(tensors, path, metadata=metadata)
            except (OSError, SafetensorError) as e:
                raise StoreError(f'cannot write {path} ({e}); its {len(paths)} images are not stored, the shards '
                                 'before it are. Free some space and run the same command again to resume.') from e
            self.bytes_written += path.stat().st_size
            self.stored += len(paths)
        if self.index_every_s is not None and time.monotonic() - self._last_index >= self.index_every_s:
            write_index(self.root, self.config)
            self._last_index = time.monotonic()

    def write_failed(self) -> None:
        """Leave this writer's failures for whichever writer rebuilds the index next (merged there)."""
        if self.failed:
            _write_json_atomic(self.root / f'failed-r{self.rank:03d}-{self.writer_id}.json', self.failed)


class FeatureStore:
    """Read a feature store folder: `len()`, `.paths`, `store[path] -> {tap: tensor}`, iteration, `.dataset()`.

    Paths are the absolute paths of the images (a relative path is looked up from the current folder). Each shard is
    checked against the index when first opened (its images, taps, shapes and settings), so a shard swapped in from
    another store raises `StoreError` instead of returning another image's features.

    Args:
        root: the folder written by `diffbackbone features ... --out DIR`.
        max_open: shard files kept open at once (at least 1).
        rescan: list the images from the shard headers instead of the index (a run still going, or killed, refreshes
            its index only now and then; the shards are always whole). Works without `index.json`: the settings are
            read from the shards.
    """

    def __init__(self, root: Union[str, Path], max_open: int = 8, rescan: bool = False):
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise InputError(f'max_open must be a whole number of at least 1 (shard files kept open), got '
                             f'{max_open!r}.')
        self.root = Path(root)
        if rescan:
            self.config, self.failed, entries = self._rescan()
        else:
            index = read_index(self.root)
            self.config, self.failed = index['config'], index.get('failed') or {}
            entries = {p: (v[0], v[1]) for p, v in index['entries'].items()}
        self._entries: dict[str, tuple[str, int]] = entries
        self.paths: list[str] = list(self._entries)
        self.taps: list[str] = list(self.config['taps'])
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._rows: dict[str, list[str]] = {}  # shard name -> its images, once checked
        self._real: Optional[dict[str, str]] = None

    def _rescan(self) -> tuple[dict, dict[str, str], dict[str, tuple[str, int]]]:
        try:
            index: Optional[dict] = read_index(self.root)
        except StoreError:
            index = None
        entries, configs = _scan(self.root, index['config'] if index else None)
        if index is not None:
            return index['config'], index.get('failed') or {}, {p: (e.shard, e.row) for p, e in entries.items()}
        if not configs:
            raise StoreError(f'{self.root} is not a feature store (no {INDEX}, no shards). Write one with '
                             f'`diffbackbone features IMAGES --out {self.root}`.')
        found = {json.dumps(c, sort_keys=True) for c in configs.values()}
        if None in configs.values() or len(found) != 1:
            why = ('its shards were written by an older diffbackbone and do not record the settings'
                   if None in configs.values() else 'its shards were written with different settings')
            raise StoreError(f'{self.root} has no usable {INDEX} and {why}; run the extraction again into it to '
                             'rebuild the index (or re-extract into a new folder).')
        return next(iter(configs.values())), {}, {p: (e.shard, e.row) for p, e in entries.items()}

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
        if not isinstance(path, (str, os.PathLike)):
            return None
        for key in (str(path), os.path.normpath(path), os.path.abspath(path)):
            if key in self._entries:
                return key
        if self._real is None:  # the same file through a link, or a relative key of an old store
            self._real = {}
            for key in self._entries:
                self._real.setdefault(os.path.realpath(key), key)
        return self._real.get(os.path.realpath(path))

    def _shard(self, name: str):
        handle = self._open.pop(name, None)
        if handle is None:
            file = self.root / name
            try:
                handle = safe_open(file, 'pt')
            except Exception as e:
                raise StoreError(f'{file} cannot be read ({e}); re-run the extraction into {self.root} to restore '
                                 'it.') from e
            if name not in self._rows:
                self._rows[name] = self._check_shard(file, handle)
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)
        self._open[name] = handle
        return handle

    def _check_shard(self, file: Path, handle) -> list[str]:
        """The images of a shard, after checking that it belongs to this store (taps, shapes, settings)."""
        paths, _, _, config = _read_header(file)
        fix = (f'FeatureStore({str(self.root)!r}, rescan=True) reads the shards as they are; running the extraction '
               f'into {self.root} again restores the store.')
        missing = [t for t in self.taps if t not in handle.keys()]
        if missing:
            raise StoreError(f'{file} lacks the taps {missing} of the store: it is not one of its shards. {fix}')
        diff = config_difference(config, self.config) if config is not None else []
        if diff:
            raise StoreError(f'{file} was written with other settings ({"; ".join(diff)}): it is not one of the '
                             f'shards of {self.root}. {fix}')
        shapes = self.config.get('shapes') or {}
        for t in self.taps:
            shape = list(handle.get_slice(t).get_shape())
            if shape[0] != len(paths) or (t in shapes and shape[1:] != list(shapes[t])):
                raise StoreError(f'{file}: tap {t} has shape {shape}, expected [{len(paths)}, '
                                 f'{", ".join(map(str, shapes.get(t, ["..."])))}]. {fix}')
        return paths

    def get(self, path: Union[str, Path], taps: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """{tap: (C, h, w) tensor} of one image (only `taps`, a list of tap names, if given)."""
        if isinstance(taps, (str, bytes)):
            raise InputTypeError(f'taps must be a list of tap names such as [{taps!r}], not the string {taps!r}.')
        if taps is not None and not isinstance(taps, Sequence):
            raise InputTypeError(f'taps must be a list of tap names (the store has {self.taps}), got {type(taps).__name__}.')
        key = self._key(path)
        if key is None:
            extra = f' (it failed: {self.failed[str(path)]})' if str(path) in self.failed else ''
            raise KeyError(f'{path} is not in the feature store {self.root}{extra}.')
        unknown = [t for t in taps or () if t not in self.taps]
        if unknown:
            raise KeyError(f'taps {unknown} are not in the feature store {self.root} (it has {self.taps}).')
        name, row = self._entries[key]
        handle = self._shard(name)
        rows = self._rows[name]
        if not 0 <= row < len(rows) or rows[row] != key:
            held = rows[row] if 0 <= row < len(rows) else f'nothing (the shard has {len(rows)} rows)'
            raise StoreError(f'{self.root / name} row {row} holds {held}, not {key}: the shard was replaced or {INDEX} '
                             f'is stale. FeatureStore({str(self.root)!r}, rescan=True) reads the shards as they are; '
                             f'running the extraction into {self.root} again restores the image.')
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
