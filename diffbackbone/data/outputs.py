"""Where commands write: one check of every output path, made before any model loads or any work starts.

The promises (no input overwritten, only our own outputs replaced, distinct outputs, unwritable destinations refused
up front) are listed in docs/reliability.md#outputs-of-every-command. Writers: `mark_metadata` (safetensors),
`save_picture` (PNG, JPEG, WebP, TIFF), `write_json`."""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from ..errors import DiffbackboneError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ['OutputError', 'check_distinct_outputs', 'check_file', 'check_folder', 'check_replaceable', 'check_writable',
           'is_ours',
           'mark_metadata', 'save_picture', 'write_json', 'MARK']

MARK = 'diffbackbone'
_SOFTWARE = 0x0131  # EXIF/TIFF "Software" tag
_EXPORT_FILES = frozenset({'model.safetensors', 'config.json', 'README.md'})
_STORE_TEMP = re.compile(r'\..+\.\d+\.[0-9a-f]+\.tmp')  # hub.atomic_path temporaries
_PROBE = '.diffbackbone-probe-'  # `check_writable`'s probe files (another writer's, for an instant, in a store)
PathLike = Union[str, os.PathLike]


class OutputError(DiffbackboneError, ValueError):
    """An output path cannot be used; the message says why and what to do."""


# ---- marks -----------------------------------------------------------------------------------------------------------
def mark_metadata(metadata: Optional[dict[str, str]], command: str) -> dict[str, str]:
    """Safetensors metadata with our mark (the command that wrote the file) added."""
    return {**(metadata or {}), MARK: command}


def save_picture(img: 'Image.Image', path: PathLike, command: str) -> None:
    """Save a picture atomically, marked as ours in its Software tag (formats without one cannot be recognised)."""
    from PIL import Image

    from ..hub import atomic_path

    path = Path(path)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    exif = Image.Exif()
    exif[_SOFTWARE] = f'{MARK} {command}'
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, exif=exif) if fmt in ('PNG', 'JPEG', 'WEBP', 'TIFF') else img.save(tmp, format=fmt)


def write_json(path: PathLike, data: dict, command: str) -> None:
    """Write a JSON object atomically with a `"diffbackbone": command` key (our mark)."""
    from ..hub import write_text_atomic

    write_text_atomic(path, json.dumps({**data, MARK: command}, indent=1) + '\n')


def _store_formats() -> tuple[str, ...]:
    from .store import _OLD_FORMAT, FORMAT

    return FORMAT, _OLD_FORMAT


def _picture_writer(path: Path) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            tag = str(img.getexif().get(_SOFTWARE, ''))
    except Exception:  # not a picture PIL reads: not ours
        return None
    return tag[len(MARK):].strip() if tag.startswith(MARK) else None


def _safetensors_meta(path: Path) -> Optional[dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, 'pt') as f:
            return f.metadata() or {}
    except Exception:  # not a safetensors file
        return None


def _writer(path: Path) -> Optional[str]:
    """The command whose mark the file `path` carries ('' for our files of unknown kind: store files, earlier
    versions), None when diffbackbone did not write it."""
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == '.safetensors':
        meta = _safetensors_meta(path)
        if meta is None:
            return None
        if MARK in meta:
            return meta[MARK]
        ours = (any(k.startswith(MARK + '.') for k in meta) or meta.get('format') in _store_formats()
                or {'model', 'images', 'input_size'} <= set(meta))  # single-file features of earlier versions
        return '' if ours else None
    if suffix == '.json':
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        return str(data[MARK]) if MARK in data else '' if data.get('format') in _store_formats() else None
    if suffix == '.npy':  # a depth map: ours when its picture (same stem) is, and it is that picture's size
        import numpy as np

        picture = path.with_suffix('.png')
        writer = _picture_writer(picture)
        if writer is None:
            return None
        try:
            arr = np.load(path, mmap_mode='r', allow_pickle=False)
            from PIL import Image

            with Image.open(picture) as img:
                return writer if arr.dtype == np.float32 and arr.shape == (img.height, img.width) else None
        except Exception:
            return None
    return _picture_writer(path)


def is_ours(path: PathLike, command: Optional[str] = None) -> bool:
    """Whether diffbackbone wrote the file `path` (by its mark; see the module docstring), and when `command` is given,
    whether that command did (an output kind replaces only its own files)."""
    writer = _writer(Path(path))
    return writer is not None and (command is None or writer == command)


# ---- path relations ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _real_dir(folder: str) -> str:
    return os.path.realpath(folder)


def _real(path: PathLike) -> str:
    """The path the kernel opens: the real path of the parent folder (resolved through a cache, inputs share few
    folders), then the name, itself resolved if a link. `..` is never taken as text: after a linked folder it is the
    link target's parent (`link/../x`)."""
    path = os.path.join(os.getcwd(), os.path.expanduser(os.fspath(path)))  # absolute, `..` kept for the kernel
    head, name = os.path.split(path.rstrip(os.sep) or os.sep)
    if name in ('', '.', '..') or os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(_real_dir(head), name)


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it (both real paths)."""
    return path == folder or path.startswith(os.path.join(folder, ''))


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _split_inputs(inputs: Iterable[PathLike]) -> tuple[list[str], list[str]]:
    """(input files, input folders), as given."""
    files, folders = [], []
    for p in inputs:
        (folders if os.path.isdir(p) else files).append(os.fspath(p))
    return files, folders


def _input_holding(real: str, inputs: Iterable[PathLike]) -> Optional[tuple[str, bool]]:
    """The input that `real` is (an input file, or inside an input folder): (input, is_folder), else None."""
    files, folders = _split_inputs(inputs)
    for f in files:
        if _real(f) == real or _same_file(f, real):
            return f, False
    for d in folders:
        if _inside(real, _real(d)):
            return d, True
    return None


def check_writable(path: PathLike, option: str = '--out') -> None:
    """Raise `OutputError` unless a file can be created at `path` (a probe file is created beside it and removed)."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f'Cannot write to {path}: {parent} is a file, not a folder. Choose another {option}.')
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE, dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f'Cannot write to {parent} ({e.strerror or e}): choose a writable {option}.') from e


# ---- the checks ----------------------------------------------------------------------------------------------------
def check_file(path: PathLike, inputs: Sequence[PathLike] = (), overwrite: Optional[bool] = None,
               option: str = '--out', noun: str = 'inputs') -> Path:
    """Check an output file before any work: not an input, not a folder, writable, and an existing file only when
    diffbackbone wrote it.

    Args:
        path: the output file.
        inputs: input files and folders of the command (an existing path inside an input folder is an input).
        overwrite: the command's `--overwrite` (True: replace our own file; False: refuse any existing file); None
            for commands without that option, which replace their own earlier outputs.
        option: the option naming `path`, for the messages.
        noun: what the inputs are, for the messages ('input images').
    """
    path = Path(path).expanduser()
    real = _real(path)
    held = _input_holding(real, inputs)  # also for paths that exist only once written (`new/../input.png`)
    if held is not None and (not held[1] or os.path.lexists(real)):
        what = f'inside the input folder {held[0]}' if held[1] else f'one of the {noun}'
        raise OutputError(f'{option} {path} is {what}: it would be overwritten. Choose another output path.')
    path = Path(real) if not path.exists() else path  # `new/../x` is written where its name says, not via `new`
    if path.is_dir():
        raise OutputError(f'{option} {path} is a folder: give a file path such as {path / ("out" + path.suffix)}.')
    if path.exists():
        if overwrite is False:
            raise OutputError(f'{option} {path} exists: choose another path, or add --overwrite to replace it.')
        if not is_ours(path):
            raise OutputError(f'{option} {path} exists and was not written by diffbackbone: it is never replaced'
                              f'{" (--overwrite replaces only diffbackbone outputs)" if overwrite else ""}. Move it '
                              'away or choose another path.')
    check_writable(path, option)
    return path


def _is_store_file(p: Path) -> bool:
    """A file name of a feature store (`data.store`: index, locks, writer-unique shards, failure lists, temporaries,
    and the probe of a writer checking the folder at this instant: a store being created by several runs at once)."""
    from .store import _FAILED, _SHARD, INDEX, LOCK, WRITERS

    return (p.name in (INDEX, LOCK, WRITERS) or bool(_SHARD.fullmatch(p.name)) or bool(_FAILED.fullmatch(p.name))
            or bool(_STORE_TEMP.fullmatch(p.name)) or p.name.startswith(_PROBE))


def _check_store(folder: Path, overwrite: bool, option: str) -> None:
    entries = [p for p in folder.iterdir()]
    index = folder / 'index.json'
    if index.exists() and not is_ours(index):
        raise OutputError(f'{option} {folder} holds an index.json that diffbackbone did not write: it is not a feature '
                          'store and nothing in it is replaced (--overwrite or not). Give a new or empty folder.')
    if not index.exists():
        foreign = sorted(p.name for p in entries if not _is_store_file(p))
        if foreign:
            raise OutputError(f'{option} {folder} is a folder with other files ({", ".join(foreign[:3])}), not a '
                              'feature store. Give a new or empty folder.')
    if overwrite:  # every file --overwrite deletes must be one of ours
        foreign = sorted(p.name for p in entries if p.suffix == '.safetensors' and _is_store_file(p)
                         and not is_ours(p))
        if foreign:
            raise OutputError(f'{option} {folder}: {", ".join(foreign[:3])} {"is" if len(foreign) == 1 else "are"} '
                              'named like store shards but not written by diffbackbone; --overwrite replaces only '
                              'diffbackbone outputs. Move them away or give another folder.')


def _check_export(folder: Path, overwrite: bool, option: str) -> None:
    names = {p.name for p in folder.iterdir()}
    if not names:
        return
    if not overwrite:
        raise OutputError(f'{option} {folder} is not empty: give a new folder, or --overwrite to replace an earlier '
                          'export.')
    if not names <= _EXPORT_FILES or not is_ours(folder / 'model.safetensors'):
        other = sorted(names - _EXPORT_FILES) or ['model.safetensors']
        raise OutputError(f'{option} {folder} is not an export of diffbackbone (it holds {", ".join(other[:3])}): '
                          '--overwrite replaces only diffbackbone outputs. Give a new or empty folder.')


def check_folder(path: PathLike, kind: str, inputs: Sequence[PathLike] = (), overwrite: bool = False,
                 option: str = '--out', noun: str = 'inputs') -> Path:
    """Check an output folder before any work (see `check_file`): `kind` 'store' (a feature store, resumed unless
    `overwrite`), 'export' (replaced whole with `overwrite`) or 'folder' (files are written into it, each checked
    with `check_file`)."""
    path = Path(path).expanduser()
    real = _real(path)
    files, folders = _split_inputs(inputs)
    if path.exists() and not path.is_dir():
        held = _input_holding(real, files)
        if held is not None:
            raise OutputError(f'{option} {path} is one of the {noun}: it would be overwritten. Choose another '
                              'output folder.')
        hint = {'store': ' A feature store is a folder; for a single file give a name ending in .safetensors.',
                'export': ' Give a folder for the Hub layout.'}.get(kind, ' Give a folder.')
        raise OutputError(f'{option} {path} is a file.{hint}')
    for d in folders:
        rd = _real(d)
        if _inside(rd, real):
            raise OutputError(f'{option} {path} {"is" if rd == real else "holds"} the input {d}: its files would be '
                              'mixed with or replaced by the output. Choose another output folder.')
        if _inside(real, rd):  # new or not: a dataset's reader would take it for part of the data on the next run
            raise OutputError(f'{option} {path} is inside the input folder {d}: it is part of the input'
                              f'{"" if path.exists() else " once written"}. Choose another output folder.')
    if kind != 'folder':
        inside = next((f for f in files if _inside(_real(f), real)), None)
        if inside is not None:
            raise OutputError(f'{option} {path} {"is" if _real(inside) == real else "is a folder holding"} the '
                              f'{"input" if noun == "inputs" else noun.removesuffix("s")} {inside}; write to another '
                              'folder.')
    if path.is_dir():
        if kind == 'store':
            _check_store(path, overwrite, option)
        elif kind == 'export':
            _check_export(path, overwrite, option)
    check_writable(path / '.probe', option)
    return path



def check_replaceable(folder: PathLike, option: str, what: str, command: str,
                      foreign: Callable[[Path], Iterable[str]]) -> None:
    """Before any work: a folder a command replaces whole (a split's pictures, a sequence's masks) is new, or a real
    folder in which `foreign` names nothing (the entries `command` did not write)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise OutputError(f'{option}: {folder} exists and is not a folder of {what} diffbackbone {command} wrote; it is '
                          f'never replaced. Move it away or choose another {option} folder.')
    names = sorted(foreign(folder))
    if names:
        raise OutputError(f'{option}: {folder} holds {", ".join(names[:3])}, not written by diffbackbone {command}; '
                          f'the folder is replaced whole, so it is refused. Move it away or choose another {option} '
                          'folder.')


Outputs = Union[Mapping[str, Optional[PathLike]], Iterable[tuple[str, Optional[PathLike]]]]


def check_distinct_outputs(files: Outputs, folders: Outputs = ()) -> None:
    """Check, before any work, that a command's outputs do not overwrite each other: no file named twice, no file
    inside an output folder, no output folder inside another (all by real path, so links and `..` count).

    Args:
        files: (option, path) of each output file (a mapping or pairs; an option may name several files); None paths
            are skipped.
        folders: (option, path) of each output folder.
    """
    def real(outputs: Outputs) -> list[tuple[str, str, str]]:
        pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
        return [(option, os.fspath(p), _real(Path(p).expanduser())) for option, p in pairs if p is not None]

    files, folders = real(files), real(folders)
    for i, (opt, path, r) in enumerate(files):
        for opt2, path2, r2 in files[:i]:
            if r == r2 or _same_file(r, r2):
                raise OutputError(f'{opt2} {path2} and {opt} {path} are the same file: give each output its own path.')
        for opt2, path2, r2 in folders:
            if _inside(r, r2):
                raise OutputError(f'{opt} {path} is inside {opt2} {path2}: the one would overwrite or lose the other. '
                                  f'Give {opt} a path outside that folder.')
    for i, (opt, path, r) in enumerate(folders):
        for opt2, path2, r2 in folders[:i]:
            if _inside(r, r2) or _inside(r2, r):
                raise OutputError(f'{opt2} {path2} and {opt} {path} overlap: give them separate folders.')
