"""Test set-up: a fake Hugging Face Hub on loopback and throw-away caches, in place before anything imports
huggingface_hub (it reads HF_ENDPOINT, HF_HUB_OFFLINE and the cache paths once, at import time)."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

if 'huggingface_hub' in sys.modules:
    raise RuntimeError('huggingface_hub was imported before tests/conftest.py could point it at the fake Hub; '
                       'run the tests with `python -m pytest` from the repository root and no plugin importing it.')

from fakehub import FakeHub  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix='diffbackbone-tests-'))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)

# Tiny models: one BLAS/OpenMP thread per process is as fast on a quiet machine and avoids thread thrashing on a
# busy one (measured up to 80x slower forwards with torch's default threads under load); subprocesses inherit it.
os.environ.setdefault('OMP_NUM_THREADS', '1')

HUB = FakeHub().start()
for _name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_CACHE',
              'HF_XET_CACHE', 'HF_ASSETS_CACHE'):
    os.environ.pop(_name, None)
os.environ.update({
    'HF_ENDPOINT': HUB.url,
    'HF_HOME': str(_TMP / 'hf_home'),
    'DIFFBACKBONE_CACHE': str(_TMP / 'diffbackbone'),
    'HF_HUB_DISABLE_TELEMETRY': '1',
    'HF_HUB_DISABLE_PROGRESS_BARS': '1',
    'HF_HUB_DISABLE_XET': '1',
    'DO_NOT_TRACK': '1',
})

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def fake_hub() -> FakeHub:
    """The fake Hub every Hub call of the test session talks to (`HF_ENDPOINT`)."""
    return HUB


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Empty HF cache (`.hf`) and diffbackbone cache (`.ours`) for one test; `.env` carries them to subprocesses."""
    from huggingface_hub import constants

    caches = SimpleNamespace(hf=tmp_path / 'hf_cache', ours=tmp_path / 'diffbackbone_cache')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(caches.hf))
    monkeypatch.setenv('HF_HUB_CACHE', str(caches.hf))
    monkeypatch.setenv('DIFFBACKBONE_CACHE', str(caches.ours))
    caches.env = {'HF_HUB_CACHE': str(caches.hf), 'DIFFBACKBONE_CACHE': str(caches.ours)}
    return caches


@pytest.fixture
def run_python():
    """Run a Python snippet in a fresh interpreter (e.g. with HF_HUB_OFFLINE=1); returns the CompletedProcess."""

    def run(code: str, *, env: dict[str, str] | None = None, offline: bool = False) -> subprocess.CompletedProcess:
        path = os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)])
        full_env = {**os.environ, **(env or {}), 'PYTHONPATH': path}
        if offline:
            full_env['HF_HUB_OFFLINE'] = '1'
        return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO_ROOT, env=full_env,
                              capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope='module')
def one_thread():
    """Tiny ops run far faster on one thread than on threads fighting over a shared CPU (a test module takes it with
    `pytestmark = pytest.mark.usefixtures('one_thread')`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
