"""`diffbackbone features` at dataset scale: folders/globs/@lists in, a resumable feature store out, FeatureStore
reader and its Dataset view, kill -9 and resume, torchrun, and the output checks made before any extraction."""
import json
import os
import shutil
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


def test_store_of_a_pretrained_model_records_its_weights(published, hub_cache, dataset, tmp_path):  # noqa: F811
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


# ---- issue 23: concurrent writers, image identity, damaged stores, folder walking, interrupts ----------------------
def _env():
    return {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}


def _reference(paths, size=64):
    """The features the store must hold for `paths` (images.load_image + the fixed random model)."""
    with torch.no_grad():
        return _model()(torch.stack([load_image(p, size) for p in paths]))


def _finish(procs: list, timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of every process, waiting at most `timeout` s in all; on a timeout every process still running
    is killed and the test fails with their output (never a hang)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f'still running after {timeout:.0f} s: ' + ' | '.join(p.communicate()[1][-1500:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_writers_at_once_into_one_store_keep_every_image(tmp_path):
    halves = {'a': [tmp_path / 'data' / 'a' / f'{i}.png' for i in range(5)],
              'b': [tmp_path / 'data' / 'b' / f'{i}.png' for i in range(5)]}
    for k, files in enumerate(halves.values()):
        for i, f in enumerate(files):
            _save(f, 100 * k + i)
    (tmp_path / 'data' / 'b' / 'z_broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    out = tmp_path / 'store'
    # Each writer stops before its first image until both have set up their writers: the runs truly overlap. A writer
    # never waits for `go` longer than 300 s, and the test waits for them with timeouts and kills them on failure:
    # one writer failing early must fail the test, not leave it (or the other writer) waiting forever.
    code = ('import sys, time\nfrom pathlib import Path\nimport diffbackbone.data.pipeline as p\n'
            'get = p.ImageFiles.__getitem__\n'
            'def wait_then_get(self, i):\n'
            '    Path(sys.argv[1]).touch()\n'
            '    give_up = time.monotonic() + 300\n'
            '    while not Path(sys.argv[2]).exists():\n'
            '        if time.monotonic() > give_up:\n'
            '            sys.exit("no go after 300 s")\n'
            '        time.sleep(0.02)\n'
            '    return get(self, i)\n'
            'p.ImageFiles.__getitem__ = wait_then_get\n'
            'from diffbackbone.cli import main\nsys.exit(main(sys.argv[3:]))\n')
    go = tmp_path / 'go'
    procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / f'ready-{half}'), str(go), 'features',
                               str(tmp_path / 'data' / half), *BASE, '--workers', '0', '--batch-size', '1',
                               '--shard-size', '1', '--out', str(out)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for half in halves]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f'ready-{h}').exists() for h in halves) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):  # one ended before its first image: show why, kill the other
            go.touch()
            results = _finish(procs, 60)
            pytest.fail('a writer ended early: ' + ' | '.join(err[-2000:] for _, err in results))
        time.sleep(0.05)
    go.touch()
    results = _finish(procs, 300)
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
    fs = FeatureStore(out)
    every = [str(f) for files in halves.values() for f in files]
    assert sorted(fs.paths) == sorted(every)  # 10 of 10: no writer overwrote the other's shards
    assert list(fs.failed) == [str(tmp_path / 'data' / 'b' / 'z_broken.jpg')]  # merged, not overwritten
    assert sorted(FeatureStore(out, rescan=True).paths) == sorted(every)
    for stdout, _ in results:  # what a run reports is in the store when it exits
        reported = int(stdout.split(' images stored')[0].rsplit(' ', 1)[1])
        assert reported <= len(fs)
    ref = _reference(every)
    for i, path in enumerate(every):
        torch.testing.assert_close(fs[path]['us6'].float(), ref[0][i], atol=2e-3, rtol=2e-3)


def test_same_relative_paths_from_two_folders_do_not_collide(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'store'
    for k, work in enumerate(['w1', 'w2']):
        _save(tmp_path / work / 'imgs' / 'x.png', 10 + k)
        monkeypatch.chdir(tmp_path / work)
        assert main(['features', 'imgs', *BASE, '--workers', '0', '--out', str(out)]) == 0
        assert 'stored already' not in capsys.readouterr().out
    fs = FeatureStore(out)
    both = [str(tmp_path / w / 'imgs' / 'x.png') for w in ('w1', 'w2')]
    assert sorted(fs.paths) == both
    ref = _reference(both)
    for i, path in enumerate(both):
        torch.testing.assert_close(fs[path]['us6'].float(), ref[0][i], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fs['imgs/x.png']['us6'].float(), ref[0][1], atol=2e-3, rtol=2e-3)  # from w2


def test_resume_extracts_an_image_replaced_on_disk_again(tmp_path, capsys):
    files = [tmp_path / 'd' / 'a.png', tmp_path / 'd' / 'b.png']
    for i, f in enumerate(files):
        _save(f, i)
    out = tmp_path / 'store'
    args = ['features', str(tmp_path / 'd'), *BASE, '--workers', '0', '--out', str(out)]
    assert main(args) == 0
    _save(files[1], 99)  # same name and size, other pixels, later mtime
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert '1 of these images are stored already; extracting 1' in printed and '(1 new)' in printed
    fs = FeatureStore(out)
    assert len(fs) == 2
    torch.testing.assert_close(fs[str(files[1])]['us6'].float(), _reference([files[1]])[0][0], atol=2e-3, rtol=2e-3)
    assert main(args) == 0 and '2 of these images are stored already; extracting 0' in capsys.readouterr().out


def test_store_recorded_by_a_newer_writer_wins_on_rescan(tmp_path):
    from diffbackbone.data.store import StoreWriter, write_index

    config = dict(model='m', taps=['us6'], shapes={'us6': [1, 1, 1]})
    for value in (1.0, 2.0):  # the same image written twice (replaced on disk in between): the later row counts
        w = StoreWriter(tmp_path, config, shard_size=1, index_every_s=None)
        w.add(['/d/x.png'], {'us6': torch.full((1, 1, 1, 1), value)})
        w.flush()
        time.sleep(0.01)
    write_index(tmp_path, config)
    for fs in (FeatureStore(tmp_path), FeatureStore(tmp_path, rescan=True)):
        assert fs.paths == ['/d/x.png'] and fs['/d/x.png']['us6'].item() == 2.0


def _tiny_store(root: Path, paths, seed: int = 0, taps=('us6', 'mid')):
    """A store written by StoreWriter without a model: one shard per image, random maps."""
    from diffbackbone.data.store import StoreWriter, write_index

    config = dict(model='m', taps=list(taps), shapes={t: [2, 2, 2] for t in taps})
    w = StoreWriter(root, config, shard_size=1, index_every_s=None)
    g = torch.Generator().manual_seed(seed)
    for p in paths:
        w.add([p], {t: torch.randn(1, 2, 2, 2, generator=g) for t in taps})
    w.flush()
    write_index(root, config)
    return config


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob('shard-*.safetensors'))


def test_reader_checks_each_shard_against_the_index(tmp_path):
    from diffbackbone.data.store import StoreError

    a, b = tmp_path / 'a', tmp_path / 'b'
    _tiny_store(a, ['/x/1.png', '/x/2.png'])
    _tiny_store(b, ['/y/3.png', '/y/4.png'], seed=1)
    good = FeatureStore(a)['/x/1.png']['us6'].clone()
    first = FeatureStore(a)._entries['/x/1.png'][0]
    (a / first).write_bytes(_shards(b)[0].read_bytes())  # another store's shard, same settings, under this name
    with pytest.raises(StoreError, match=r'holds /y/3.png, not /x/1.png.*rescan=True'):
        FeatureStore(a)['/x/1.png']
    assert FeatureStore(a)['/x/2.png']['us6'].shape == (2, 2, 2)  # the other shard is fine
    assert not torch.equal(good, FeatureStore(b)['/y/3.png']['us6'])
    # a shard missing a tap of the store
    c = tmp_path / 'c'
    _tiny_store(c, ['/z/5.png'], taps=('us6',))
    (a / first).write_bytes(_shards(c)[0].read_bytes())
    with pytest.raises(StoreError, match=r"lacks the taps \['mid'\]"):
        FeatureStore(a)['/x/1.png']
    # a row out of range
    index = json.loads((a / 'index.json').read_text())
    index['entries']['/x/2.png'][1] = 5
    (a / 'index.json').write_text(json.dumps(index))
    with pytest.raises(StoreError, match='row 5'):
        FeatureStore(a)['/x/2.png']


@pytest.mark.parametrize('content,match', [
    ('[1, 2]', 'not a diffbackbone feature store index'),
    ('{"format": "diffbackbone-feature-store-2", "entries": {}}', 'no config'),
    ('{"format": "diffbackbone-feature-store-2", "config": {"taps": ["us6"]}, "entries": []}', 'entries'),
    ('{"format": "diffbackbone-feature-store-2", "config": {"taps": ["us6"]}, "entries": {"a": 1}}', 'entries'),
])
def test_reader_refuses_a_damaged_index_clearly(tmp_path, content, match):
    from diffbackbone.data.store import StoreError

    _tiny_store(tmp_path, ['/x/1.png'])
    (tmp_path / 'index.json').write_text(content)
    with pytest.raises(StoreError, match=match):
        FeatureStore(tmp_path)
    fs = FeatureStore(tmp_path, rescan=True)  # the shards are the truth: they alone rebuild the listing
    assert fs.paths == ['/x/1.png'] and fs.taps == ['us6', 'mid']


def test_reader_arguments_are_checked(tmp_path):
    _tiny_store(tmp_path, ['/x/1.png'])
    for bad in (0, -1, 1.5, 'x'):
        with pytest.raises((ValueError, TypeError), match='max_open'):
            FeatureStore(tmp_path, max_open=bad)
    fs = FeatureStore(tmp_path, max_open=1)
    with pytest.raises(TypeError, match=r"\['us6'\]"):
        fs.get('/x/1.png', 'us6')
    assert list(fs.get('/x/1.png', ['us6'])) == ['us6']
    with pytest.raises(KeyError, match=r"\['u', 's', '6'\]|us9"):
        fs.get('/x/1.png', ['us9'])


def test_reader_rescans_a_store_whose_index_is_gone(tmp_path):
    _tiny_store(tmp_path, ['/x/1.png', '/x/2.png'])
    before = FeatureStore(tmp_path)['/x/2.png']['mid']
    (tmp_path / 'index.json').unlink()
    from diffbackbone.data.store import StoreError

    with pytest.raises(StoreError, match='rescan=True'):
        FeatureStore(tmp_path)
    fs = FeatureStore(tmp_path, rescan=True)
    assert sorted(fs.paths) == ['/x/1.png', '/x/2.png'] and fs.config['model'] == 'm'
    assert torch.equal(fs['/x/2.png']['mid'], before)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(StoreError, match='not a feature store'):
        FeatureStore(empty, rescan=True)


def test_folder_walk_follows_links_once(tmp_path):
    d = tmp_path / 'd'
    _save(d / 'a.png', 0)
    _save(d / 'sub' / 'b.png', 1)
    (d / 'self').symlink_to(d, target_is_directory=True)  # a loop
    (d / 'sub' / 'up').symlink_to(d, target_is_directory=True)  # a second loop: exponential without detection
    (d / 'again').symlink_to(d / 'sub', target_is_directory=True)  # the same folder twice
    (d / 'c.png').symlink_to(d / 'a.png')  # the same file twice
    other = tmp_path / 'other'
    _save(other / 'e.png', 2)
    (d / 'ext').symlink_to(other, target_is_directory=True)  # a linked folder outside: followed
    code = ('import sys; from diffbackbone.data.pipeline import find_images\n'
            f'print("\\n".join(find_images([{str(d)!r}, {str(d / "self" / "a.png")!r}])))')
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    found = res.stdout.split()
    assert sorted(os.path.realpath(p) for p in found) == sorted(
        str(p) for p in (d / 'a.png', d / 'sub' / 'b.png', other / 'e.png'))


def test_list_files_including_themselves_or_empty(tmp_path, capsys, monkeypatch):
    import diffbackbone.data.extract as ex

    _save(tmp_path / 'a.png', 0)
    loop = tmp_path / 'loop.txt'
    loop.write_text(f'a.png\n@{loop}\n')
    with pytest.raises(ValueError, match='loop.txt includes itself'):
        find_images([f'@{loop}'])
    (tmp_path / 'inner.txt').write_text('@outer.txt\n')
    (tmp_path / 'outer.txt').write_text('a.png\n@inner.txt\n')
    with pytest.raises(ValueError, match='includes itself'):
        find_images([f'@{tmp_path / "outer.txt"}'])
    (tmp_path / 'twice.txt').write_text('@one.txt\n@one.txt\n')  # the same list twice is not a loop
    (tmp_path / 'one.txt').write_text('a.png\n')
    assert find_images([f'@{tmp_path / "twice.txt"}']) == [str(tmp_path / 'a.png')]
    empty = tmp_path / 'empty.txt'
    empty.write_text('# nothing yet\n\n')
    with pytest.raises(ValueError, match='empty.txt names no image'):
        find_images([f'@{empty}'])
    loaded = []
    monkeypatch.setattr(ex, 'load_extractor', lambda *a, **k: loaded.append(1))
    for listing in (empty, loop):
        assert main(['features', f'@{listing}', *BASE, '--out', str(tmp_path / 'store')]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and listing.name in err and 'Traceback' not in err
    assert not loaded and not (tmp_path / 'store').exists()


def test_ctrl_c_is_one_line_and_the_store_resumes(dataset, store, tmp_path, capsys):
    out = tmp_path / 'interrupted'
    cmd = [sys.executable, '-m', 'diffbackbone', 'features', str(dataset), *BASE, '--batch-size', '1',
           '--shard-size', '1', '--out', str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob('shard-*.safetensors'))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith('interrupted:') and 'run the same command again' in last
    assert main(cmd[3:]) == 0
    resumed, full = FeatureStore(out), FeatureStore(store)
    assert sorted(resumed.paths) == sorted(full.paths)
    for path in full.paths:
        torch.testing.assert_close(resumed[path]['us6'], full[path]['us6'], atol=1e-3, rtol=1e-3)


def test_a_second_ctrl_c_while_the_run_winds_down_is_one_line_and_the_store_is_whole(dataset, store, tmp_path):
    """Ctrl-C after 3 images, then Ctrl-C again while the loader workers stop and while the final shard is written:
    still one `interrupted:` line and exit 130 (no traceback, no 'Exception ignored'), and the 3 images are in the
    shard and the index, so the run resumes."""
    out = tmp_path / 'twice'
    code = ('import os, signal, sys\nimport diffbackbone.hub as hub\nimport diffbackbone.data.store as st\n'
            'from torch.utils.data import dataloader as dl\n'
            'state = dict(added=0, interrupted=False)\n'
            'add = st.StoreWriter.add\n'
            'def add_then_ctrl_c(self, *a, **k):\n'
            '    add(self, *a, **k)\n'
            '    state["added"] += 1\n'
            '    if state["added"] == 3:\n'
            '        state["interrupted"] = True\n'
            '        os.kill(os.getpid(), signal.SIGINT)\n'
            'st.StoreWriter.add = add_then_ctrl_c\n'
            'def again(real):\n'
            '    def wrapper(*a, **k):\n'
            '        if state["interrupted"]:\n'
            '            os.kill(os.getpid(), signal.SIGINT)\n'
            '        return real(*a, **k)\n'
            '    return wrapper\n'
            'hub.save_file = again(hub.save_file)\n'
            'it = dl._MultiProcessingDataLoaderIter\n'
            'it._shutdown_workers = again(it._shutdown_workers)\n'
            'from diffbackbone.cli import main\nsys.exit(main(sys.argv[1:]))\n')
    args = ['features', str(dataset), *BASE, '--batch-size', '1', '--shard-size', '100', '--out', str(out)]
    res = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 130, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr and 'Exception ignored' not in res.stderr, res.stderr[-3000:]
    last = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith('interrupted:') and 'run the same command again' in last
    indexed = FeatureStore(out)
    assert len(indexed) == 3 and sorted(FeatureStore(out, rescan=True).paths) == sorted(indexed.paths)
    assert main(args) == 0
    assert sorted(FeatureStore(out).paths) == sorted(FeatureStore(store).paths)


def test_disk_full_while_writing_a_shard(dataset, store, tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import diffbackbone.hub as hub

    real = hub.save_file
    out = tmp_path / 'full'
    args = ['features', str(dataset), *BASE, '--batch-size', '2', '--shard-size', '2', '--workers', '0', '--out',
            str(out)]
    for error in (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })'), OSError(errno.ENOSPC, 'No space left on device')):
        calls = []

        def save_file(tensors, path, metadata=None, error=error):
            calls.append(path)
            if len(calls) < 2:
                return real(tensors, path, metadata=metadata)
            Path(path).write_bytes(b'\0' * 100)  # half a file, then the disk is full
            raise error

        monkeypatch.setattr(hub, 'save_file', save_file)
        assert main(args) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # above it: the progress bar
        assert last.startswith('error: ') and err.count('error') == 1 and 'Traceback' not in err, err
        assert 'No space left on device' in last and str(out / 'shard-r000-') in last and 'resume' in last
        assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]
        FeatureStore(out, rescan=True)  # every shard on disk is whole
    monkeypatch.setattr(hub, 'save_file', real)
    assert main(args) == 0
    resumed, full = FeatureStore(out), FeatureStore(store)
    assert sorted(resumed.paths) == sorted(full.paths)
    for path in full.paths:
        torch.testing.assert_close(resumed[path]['mid'], full[path]['mid'], atol=1e-3, rtol=1e-3)


def test_store_form_with_no_readable_image_fails(dataset, tmp_path, capsys):
    assert main(['features', str(dataset / 'dogs/x/broken.jpg'), *BASE, '--workers', '0', '--out',
                 str(tmp_path / 'store')]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: the progress bar
    assert last.startswith('error: none of the 1 images could be read') and 'broken.jpg' in last


def test_safetensors_suffix_is_case_insensitive(dataset, tmp_path):
    out = tmp_path / 'feats.SAFETENSORS'
    assert main(['features', str(dataset / 'cats/a.png'), *BASE, '--workers', '0', '--out', str(out)]) == 0
    assert out.is_file()


def test_recursive_globs_match_glob_and_end_on_loops(tmp_path, monkeypatch):
    import glob as globmod

    for name in ['a/1.png', 'a/b/2.jpg', 'a/b/c/3.png', 'a/.hid/4.png', 'a/b/sub/5.png', 'a/x.txt']:
        _save(tmp_path / name, 0) if name.endswith(('png', 'jpg')) else (tmp_path / name).write_text('x')
    monkeypatch.chdir(tmp_path)
    for pattern in ['a/**/*.png', 'a/**', 'a/**/sub', '**/*.png', 'a/**/b/**/*.png', str(tmp_path / 'a/**/*.jpg')]:
        expected = [m for m in globmod.glob(pattern, recursive=True) if os.path.isfile(m) and m.endswith(('g',))]
        expected += [str(Path(r) / f) for m in globmod.glob(pattern, recursive=True) if os.path.isdir(m)
                     for r, _, fs in os.walk(m) for f in fs if f.endswith('g')]
        assert sorted(map(os.path.normpath, find_images([pattern]))) == sorted(set(map(os.path.normpath, expected)))
    (tmp_path / 'a' / 'loop').symlink_to(tmp_path / 'a', target_is_directory=True)
    (tmp_path / 'a' / 'b' / 'up').symlink_to(tmp_path / 'a', target_is_directory=True)
    pattern = str(tmp_path / 'a/**/*.png')
    code = f'from diffbackbone.data.pipeline import find_images\nprint(len(find_images([{pattern!r}])))'
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=60)  # glob.glob('a/**/*.png', recursive=True) does not end here
    assert res.returncode == 0 and res.stdout.split() == ['3'], res.stderr[-2000:]


def test_overwrite_refuses_a_store_another_run_is_filling(dataset, store, tmp_path, capsys):
    """--overwrite never deletes the shards of a run that is still writing (#30, second sweep): it is refused."""
    from diffbackbone.data.store import store_writer

    copy = tmp_path / 'busy'
    shutil.copytree(store, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    with store_writer(copy):  # another writer (its own open file: flock sees two writers)
        _fails([str(dataset), *BASE, '--out', str(copy), '--overwrite'], capsys, 'another run is writing into')
        assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before  # nothing deleted or touched
    assert main(['features', str(dataset), *BASE, '--out', str(copy), '--overwrite', '--on-error', 'skip']) == 0


def test_a_store_that_other_runs_are_creating_is_not_a_foreign_folder(tmp_path):
    """Three runs start into one new --out: the first has created the folder (locks, an index being written), the
    second is probing it for writability at this instant; the third's check must take it for a store."""
    from diffbackbone.data.extract import check_store
    from diffbackbone.data.outputs import OutputError

    out = tmp_path / 'store'
    out.mkdir()
    for name in ('.writers', '.lock', '.index.json.4242.0a1b2c3d.tmp', '.diffbackbone-probe-k2j_x9aa'):
        (out / name).touch()
    check_store(out, [])
    (out / 'notes.txt').touch()
    with pytest.raises(OutputError, match='notes.txt'):
        check_store(out, [])


def test_an_error_mid_run_leaves_inference_mode_off(dataset, tmp_path, monkeypatch):
    """The batches are made under torch.inference_mode: a run that stops on an error must leave it off in the caller's
    thread even while the error (and its traceback) is kept, or the caller's next models get inference tensors."""
    import diffbackbone.data.extract as ex
    from diffbackbone.data.store import StoreError

    def fail(self, *args, **kwargs):
        raise StoreError('disk gone')

    monkeypatch.setattr(ex.StoreWriter, 'add', fail)
    job = ex.ExtractJob([str(dataset)], tmp_path / 'store', model='test_cleandift', random_weights=True, size=64,
                        taps=['mid'], workers=0)
    with pytest.raises(StoreError) as kept:
        ex.extract_features(job)
    assert kept.value is not None and not torch.is_inference_mode_enabled()


def test_a_loader_workers_fd_thread_cut_short_by_the_exit_is_quiet(capsys):
    """In a loader worker, the fd-passing thread's handshake cut short by the main process's exit on Ctrl-C
    (AuthenticationError, EOFError, a socket error) prints nothing; any other thread error still shows."""
    import multiprocessing
    import threading

    from diffbackbone.data.pipeline import _quiet_resource_sharer

    serve = threading.Thread(target=lambda: None, name='Thread-1 (_serve)')
    for exc in (multiprocessing.AuthenticationError('digest received was wrong'), EOFError(), ConnectionResetError()):
        _quiet_resource_sharer(threading.ExceptHookArgs((type(exc), exc, None, serve)))
    assert capsys.readouterr().err == ''
    _quiet_resource_sharer(threading.ExceptHookArgs((ValueError, ValueError('a bug'), None, serve)))
    assert 'ValueError: a bug' in capsys.readouterr().err
