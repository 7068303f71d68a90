"""Downloads killed mid-way: the next download from the repo resumes the partial file (one Range request for the
rest) instead of starting anew, also for files downloaded by others (transformers), and leaves no partial file behind
in the HF cache."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from huggingface_hub.file_download import repo_folder_name

from diffbackbone import hub

REPO_ROOT = Path(__file__).resolve().parents[1]


def _partials(cache: Path) -> list[Path]:
    return sorted(cache.rglob('*.incomplete'))


def _gets(fake_hub, name: str) -> list[tuple]:
    return [(r, n) for m, p, r, n in list(fake_hub.requests) if m == 'GET' and p.endswith(name)]


def _kill_mid_download(fake_hub, hub_cache, repo: str, name: str, min_bytes: int) -> Path:
    """Start `hub.download` in a subprocess whose connection keeps dropping, SIGKILL it once `min_bytes` are on disk;
    return the partial file it left."""
    code = f"from diffbackbone import hub; hub.download({repo!r}, {name!r}, what='weights')"
    env = {**os.environ, **hub_cache.env, 'PYTHONPATH': str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            parts = _partials(hub_cache.hf)
            if parts and parts[0].stat().st_size >= min_bytes:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fake_hub._truncate.pop(name, None)
    parts = _partials(hub_cache.hf)
    assert len(parts) == 1 and parts[0].stat().st_size >= min_bytes  # what huggingface_hub alone leaves for ever
    return parts[0]


@pytest.fixture
def big_file(fake_hub):
    import huggingface_hub.file_download as fd

    def publish(repo: str, name: str) -> tuple[bytes, int]:
        chunk = fd.constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes whole chunks only
        data = os.urandom(chunk + (2 << 20))
        fake_hub.add_file(repo, name, data)
        # Every GET sends a little more than one chunk, then drops the connection: retries make no progress.
        fake_hub.truncate_next(name, chunk + 1000, times=100)
        return data, chunk

    return publish


def test_killed_download_is_resumed_by_the_next_call(fake_hub, hub_cache, big_file):
    data, chunk = big_file('org/killed', 'big.safetensors')
    partial = _kill_mid_download(fake_hub, hub_cache, 'org/killed', 'big.safetensors', chunk)
    done = partial.stat().st_size
    fake_hub.requests.clear()
    path = hub.download('org/killed', 'big.safetensors', what='weights')
    assert path.read_bytes() == data
    assert _gets(fake_hub, 'big.safetensors') == [(f'bytes={done}-', len(data) - done)]  # only the rest
    assert _partials(hub_cache.hf) == []
    assert path.resolve().stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_partial_file_that_is_not_a_prefix_is_discarded(fake_hub, hub_cache):
    import hashlib

    data = os.urandom(50_000)
    fake_hub.add_file('org/garbled', 'g.safetensors', data)
    part, _ = _fake_partial(hub_cache, 'org/garbled', hashlib.sha256(data).hexdigest(), content=os.urandom(20_000))
    fake_hub.requests.clear()
    assert hub.download('org/garbled', 'g.safetensors', what='weights').read_bytes() == data  # e.g. out of order
    assert _gets(fake_hub, 'g.safetensors') == [('bytes=20000-', 30_000), (None, 50_000)]  # checked, then anew
    assert _partials(hub_cache.hf) == []


def _fake_partial(hub_cache, repo: str, etag: str, age_s: float = 0, content: bytes = b'partial') -> tuple[Path, Path]:
    folder = repo_folder_name(repo_id=repo, repo_type='model')
    part = hub_cache.hf / folder / 'blobs' / f'{etag}.0123abcd.incomplete'
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(content)
    if age_s:
        os.utime(part, (time.time() - age_s, time.time() - age_s))
    return part, hub_cache.hf / '.locks' / folder / f'{etag}.lock'


def test_partial_file_of_a_running_download_is_left_alone(fake_hub, hub_cache):
    import hashlib

    data = b'y' * 5000
    fake_hub.add_file('org/busy', 'a.safetensors', data)
    part, lock = _fake_partial(hub_cache, 'org/busy', hashlib.sha256(data).hexdigest(), content=data[:1000])
    with FileLock(lock):  # held by the process downloading it, as huggingface_hub does
        assert hub.resume_killed_downloads('org/busy') == []
        assert part.read_bytes() == data[:1000]
    fake_hub.requests.clear()
    [blob] = hub.resume_killed_downloads('org/busy')  # its writer is gone now: completed
    assert blob.read_bytes() == data and not part.exists()
    assert _gets(fake_hub, 'a.safetensors') == [('bytes=1000-', 4000)]


def test_partial_text_encoder_is_resumed_by_the_next_download_from_the_repo(fake_hub, hub_cache):
    """A text encoder killed mid-download by transformers is completed when the VAE of the same repo is fetched."""
    import hashlib

    encoder, vae = os.urandom(40_000), os.urandom(1000)
    fake_hub.add_file('org/base', 'text_encoder/model.safetensors', encoder)
    fake_hub.add_file('org/base', 'vae/diffusion_pytorch_model.safetensors', vae)
    part, _ = _fake_partial(hub_cache, 'org/base', hashlib.sha256(encoder).hexdigest(), content=encoder[:30_000])
    fake_hub.requests.clear()
    assert hub.download('org/base', 'vae/diffusion_pytorch_model.safetensors', what='VAE').read_bytes() == vae
    assert _gets(fake_hub, 'text_encoder/model.safetensors') == [('bytes=30000-', 10_000)]
    assert not part.exists()
    from huggingface_hub import hf_hub_download

    fake_hub.requests.clear()  # transformers' own hf_hub_download now finds the file in the cache
    assert Path(hf_hub_download('org/base', 'text_encoder/model.safetensors')).read_bytes() == encoder
    assert _gets(fake_hub, 'text_encoder/model.safetensors') == []


def test_orphans_of_other_files_go_when_stale(fake_hub, hub_cache):
    fake_hub.add_file('org/many', 'a.safetensors', b'a' * 100)
    fresh, _ = _fake_partial(hub_cache, 'org/many', 'f' * 64)
    stale, _ = _fake_partial(hub_cache, 'org/many', 'e' * 64, age_s=2 * 86400)
    assert hub.download('org/many', 'a.safetensors', what='a').read_bytes() == b'a' * 100
    assert fresh.exists()  # another file's: resumed when that file is asked for
    assert not stale.exists()


def test_no_request_when_nothing_is_partial(fake_hub, hub_cache):
    fake_hub.add_file('org/plain', 'p.safetensors', b'p' * 10)
    fake_hub.requests.clear()
    assert hub.resume_killed_downloads('org/plain') == []
    assert fake_hub.requests == []


# ---- small file-level guarantees of hub.py ----------------------------------------------------------------------
@pytest.mark.parametrize('mask', [0o022, 0o077, 0o002])
def test_umask_is_read_without_setting_it(mask, monkeypatch):
    old = os.umask(mask)
    try:
        def no_set(_):  # setting the umask to read it races with files other threads create meanwhile
            raise AssertionError('os.umask called')

        monkeypatch.setattr(os, 'umask', no_set)
        assert hub.umask() == mask
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_folder_or_pickle_given_as_weights_is_a_clear_error(tmp_path):
    with pytest.raises(hub.HubError, match='is a folder'):
        hub.load_safetensors(tmp_path, what='weights')
    pickle = tmp_path / 'unet.pt'
    torch.save({'w': torch.zeros(2)}, pickle)
    with pytest.raises(hub.HubError, match=r'unet\.pt is truncated or corrupted, or not a safetensors file.*convert'):
        hub.load_safetensors(pickle, what='weights')
    assert pickle.exists()  # a user's file is never deleted
