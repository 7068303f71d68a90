"""`diffbackbone features` at dataset scale: folders/globs/@lists in, a resumable feature store out, FeatureStore
reader and its Dataset view, kill -9 and resume, torchrun, and the output checks made before any extraction."""
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone import FeatureStore
from diffbackbone.cli import main
from diffbackbone.data.images import load_image
from diffbackbone.data.pipeline import find_images
from test_pretrained import published  # noqa: F401  (tiny models on the fake Hub)

REPO = Path(__file__).resolve().parents[1]
BASE = ['--model', 'test_cleandift', '--random-weights', '--size', '64', '--taps', 'us6', 'mid', '--workers', '1']


def _save(path: Path, seed: int, size=(72, 56)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _huge_png(path: Path, side: int = 20000) -> None:
    """A valid PNG header declaring side x side pixels (Pillow refuses it as a decompression bomb on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')

    ihdr = side.to_bytes(4, 'big') * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 16))
                     + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Nested folders with PNG, JPEG, BMP, WebP and grey images, one corrupt JPEG and a non-image file."""
    root = tmp_path_factory.mktemp('data')
    files = ['cats/a.png', 'cats/b.jpg', 'cats/deep/c.bmp', 'cats/deep/d.webp', 'dogs/e.png', 'dogs/f.jpg',
             'dogs/x/g.png', 'dogs/x/y/h.jpg']
    for i, name in enumerate(files):
        _save(root / name, i, size=(72 + 8 * i, 56))
    Image.open(root / 'dogs/e.png').convert('L').save(root / 'dogs/e.png')
    (root / 'dogs/x/broken.jpg').write_bytes((root / 'dogs/f.jpg').read_bytes()[:200])
    (root / 'dogs/notes.txt').write_text('not an image')
    return root


@pytest.fixture(scope='module')
def store(dataset, tmp_path_factory):
    """One uninterrupted store of the whole dataset (reference for the other tests)."""
    out = tmp_path_factory.mktemp('stores') / 'full'
    assert main(['features', str(dataset), *BASE, '--batch-size', '3', '--shard-size', '4', '--out', str(out)]) == 0
    return out


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model('test_cleandift', features_only=True, out_indices=('us6', 'mid')).eval()


def test_inputs_mix_folders_globs_and_lists(dataset, tmp_path):
    listing = tmp_path / 'list.txt'
    listing.write_text(f'# comment\n{dataset / "cats/a.png"}\n\n{dataset / "dogs/f.jpg"}\n')
    found = find_images([str(dataset / 'cats'), str(dataset / 'dogs' / '**' / '*.png'), f'@{listing}'])
    rel = [str(Path(p).relative_to(dataset)) for p in found]
    assert rel == ['cats/a.png', 'cats/b.jpg', 'cats/deep/c.bmp', 'cats/deep/d.webp', 'dogs/e.png', 'dogs/x/g.png',
                   'dogs/f.jpg']  # recursive, sorted, extensions only, duplicates dropped
    with pytest.raises(ValueError, match='nope: no such file'):
        find_images([str(dataset / 'nope')])
    with pytest.raises(ValueError, match='matches no image'):
        find_images([str(dataset / '*.tif')])


def test_store_of_nested_folders_with_a_corrupt_file(dataset, store, capsys):
    fs = FeatureStore(store)
    good = sorted(str(p) for p in dataset.rglob('*') if p.suffix in ('.png', '.jpg', '.bmp', '.webp')
                  and p.name != 'broken.jpg')
    assert sorted(fs.paths) == good and len(fs) == 8
    assert list(fs.failed) == [str(dataset / 'dogs/x/broken.jpg')]
    index = json.loads((store / 'index.json').read_text())
    assert index['config']['model'] == 'test_cleandift' and index['config']['input_size'] == [64, 64]
    assert index['config']['shapes'] == {'us6': [32, 4, 4], 'mid': [32, 1, 1]}
    assert len(list(store.glob('shard-r000-*.safetensors'))) == 2  # 8 images, 4 per shard
    # stored features are the model's features of the image as images.load_image reads it (float16 store)
    model = _model()
    with torch.no_grad():
        ref = model(torch.stack([load_image(p, 64) for p in good]))
    for i, path in enumerate(good):
        feats = fs[path]
        assert feats['us6'].dtype == torch.float16 and feats['us6'].shape == (32, 4, 4)
        torch.testing.assert_close(feats['us6'].float(), ref[0][i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(feats['mid'].float(), ref[1][i], atol=2e-3, rtol=2e-3)
    assert sum(1 for _ in fs) == 8
    with pytest.raises(KeyError, match='broken.jpg.*failed'):
        fs[str(dataset / 'dogs/x/broken.jpg')]


def test_mismatched_resume_is_refused(dataset, store, capsys):
    before = sorted(p.stat().st_mtime_ns for p in store.iterdir())
    args = ['features', str(dataset), *BASE, '--out', str(store)]
    bigger = [a if a != '64' else '128' for a in args]
    assert main(bigger) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'input_size: stored [64, 64], asked [128, 128]' in err and '--overwrite' in err
    assert main(['features', str(dataset), *BASE, '--store-dtype', 'float32', '--out', str(store)]) == 2
    assert "store_dtype: stored 'float16', asked 'float32'" in capsys.readouterr().err
    assert sorted(p.stat().st_mtime_ns for p in store.iterdir()) == before  # nothing touched
    # the same settings again: everything is stored, nothing recomputed
    assert main(args) == 0
    assert '8 of these images are stored already; extracting 1' in capsys.readouterr().out


def test_kill_then_resume_equals_uninterrupted(dataset, store, tmp_path, capsys):
    out = tmp_path / 'resumed'
    cmd = [sys.executable, '-m', 'diffbackbone', 'features', str(dataset), *BASE, '--batch-size', '1',
           '--shard-size', '1', '--out', str(out)]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob('shard-*.safetensors'))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = len(list(out.glob('shard-*.safetensors')))
    assert 2 <= killed_with < 8, 'the run was not killed in the middle'
    partial = FeatureStore(out, rescan=True)  # every shard on disk is whole and readable
    assert len(partial) == killed_with and all(f['us6'].shape == (32, 4, 4) for _, f in partial)
    assert main(cmd[3:]) == 0
    assert f'{killed_with} of these images are stored already' in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]
    resumed, full = FeatureStore(out), FeatureStore(store)
    assert sorted(resumed.paths) == sorted(full.paths)
    for path in full.paths:
        for tap, f in full[path].items():
            torch.testing.assert_close(resumed[path][tap], f, atol=1e-3, rtol=1e-3)


def test_torchrun_two_ranks_one_index(dataset, store, tmp_path):
    out = tmp_path / 'dist'
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m',
           'diffbackbone', 'features', str(dataset), *BASE, '--device', 'cpu', '--workers', '0', '--out', str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '8 images stored (8 new), 1 failed' in res.stdout
    assert {p.name[:10] for p in out.glob('shard-*')} == {'shard-r000', 'shard-r001'}
    assert not list(out.glob('failed-r*'))
    dist, full = FeatureStore(out), FeatureStore(store)
    assert sorted(dist.paths) == sorted(full.paths) and list(dist.failed) == list(full.failed)
    for path in full.paths:
        torch.testing.assert_close(dist[path]['us6'], full[path]['us6'], atol=1e-3, rtol=1e-3)


def test_dataset_view_trains_a_linear_probe(store):
    fs = FeatureStore(store)
    labels = {p: int('/dogs/' in p) for p in fs.paths}
    ds = fs.dataset('us6', targets=labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=1)
    probe = torch.nn.Linear(32, 2)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1)
    before = probe.weight.detach().clone()
    x, y = next(iter(loader))
    assert x.shape == (4, 32, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    loss = torch.nn.functional.cross_entropy(probe(x.mean((2, 3))), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, probe.weight)
    both = fs.dataset()[0]
    assert set(both) == {'us6', 'mid'}
    with pytest.raises(KeyError, match='targets has no entry'):
        fs.dataset('us6', targets={})


def _fails(args, capsys, match):
    assert main(['features', *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err and match in err, err
    return err


def test_output_checks_before_extracting(dataset, tmp_path, capsys):
    img = tmp_path / 'in.png'
    _save(img, 0)
    original = img.read_bytes()
    one = [str(img), *BASE]
    _fails([*one, '--out', str(img)], capsys, 'is one of the input images')
    link = tmp_path / 'in.safetensors'
    link.symlink_to(img)
    _fails([*one, '--out', str(link)], capsys, 'is one of the input images')
    assert img.read_bytes() == original
    existing = tmp_path / 'old.safetensors'
    existing.write_bytes(b'keep me')
    _fails([*one, '--out', str(existing)], capsys, 'add --overwrite')
    assert existing.read_bytes() == b'keep me'
    _fails([*one, '--out', '/proc/x.safetensors'], capsys, 'Cannot write to /proc')
    _fails([*one, '--out', '/sys/x.safetensors'], capsys, 'Cannot write to /sys')  # read-only file system
    (tmp_path / 'afile').write_text('x')
    _fails([*one, '--out', str(tmp_path / 'afile' / 'f.safetensors')], capsys, 'is a file, not a folder')
    (tmp_path / 'dir.safetensors').mkdir()
    _fails([*one, '--out', str(tmp_path / 'dir.safetensors')], capsys, 'is a folder')
    out = tmp_path / 'f.safetensors'
    _fails([*one, '--out', str(out), '--pca', 'us9'], capsys, "--pca us9 is not among the extracted taps")
    _fails([*one, '--out', str(out), '--pca', 'mid'], capsys, 'its map is 1x1')
    _fails([*one, '--out', str(tmp_path / 'store'), '--pca', 'us6'], capsys, '--pca needs the single-file form')
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'mine.txt').write_text('x')
    _fails([*one, '--out', str(tmp_path / 'other')], capsys, 'not a feature store')
    _fails([str(dataset), *BASE, '--out', str(dataset / 'cats')], capsys, 'is a folder holding the input image')
    huge = tmp_path / 'huge.png'
    _huge_png(huge)
    _fails([str(huge), *BASE, '--out', str(out)], capsys, 'huge.png')
    broken = dataset / 'dogs/x/broken.jpg'
    _fails([str(img), str(broken), *BASE, '--out', str(out)], capsys, 'broken.jpg')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile', 'dir.safetensors', 'huge.png', 'in.png',
                                                          'in.safetensors', 'old.safetensors', 'other']  # nothing written


def test_single_file_overwrite_and_skip(dataset, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / 'f.safetensors'
    save_file({'x': torch.zeros(1)}, out, metadata={'diffbackbone': 'features'})  # ours: --overwrite may replace it
    huge = tmp_path / 'huge.png'
    _huge_png(huge)
    good = str(dataset / 'cats/a.png')
    assert main(['features', good, str(huge), *BASE, '--out', str(out), '--overwrite', '--on-error', 'skip',
                 '--pca', 'us6']) == 0
    printed = capsys.readouterr().out
    assert '1 image(s) could not be read' in printed and 'huge.png' in printed
    with safe_open(out, 'pt') as f:
        assert json.loads(f.metadata()['images']) == [good]
        assert list(json.loads(f.metadata()['failed'])) == [str(huge)]
        assert f.get_tensor('us6').shape == (1, 32, 4, 4) and f.get_tensor('us6').dtype == torch.float32
    assert (tmp_path / 'f_pca_us6.png').is_file()


def test_store_of_a_pretrained_model_records_its_weights(published, hub_cache, dataset, tmp_path):
    out = tmp_path / 'pre'
    args = ['features', str(dataset / 'cats'), '--model', 'test_cleandift', '--size', '64', '--taps', 'mid',
            '--model-kwargs', '{"timestep": 100}', '--workers', '0', '--out', str(out)]
    assert main(args) == 0
    fs = FeatureStore(out)
    assert len(fs) == 4 and fs.config['weights'] == 'diffbackbone/test-cleandift'
    assert fs.config['model_kwargs'] == {'timestep': 100} and fs.config['prompt'] is None
    model = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('mid',),
                              timestep=100).eval()
    path = fs.paths[0]
    with torch.no_grad():
        ref = model(load_image(path, 64)[None])[0][0]
    torch.testing.assert_close(fs[path]['mid'].float(), ref, atol=2e-3, rtol=2e-3)
