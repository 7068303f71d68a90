"""`diffbackbone eval spair` on small synthetic datasets in SPair-71k's layout: PCK with planted features (known
answer), agreement with a transcription of DIFT's eval_spair.py, the CLI end to end on a tiny model, resume from the cache and
bad inputs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from diffbackbone import cli
from diffbackbone.evals import spair
from diffbackbone.evals.spair_data import SpairError, load_pairs
from test_correspondence import _planted  # planted one-hot features


def _write_pair(root: Path, name: str, category: str, src: tuple, trg: tuple, src_kps, trg_kps, bbox, **extra):
    """One pair annotation; `src`/`trg` are (image name, (W, H)); images are created if missing."""
    for imname, (w, h) in (src, trg):
        path = root / 'JPEGImages' / category / imname
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(abs(hash(imname)) % 2**32)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    ann = dict(src_imname=src[0], trg_imname=trg[0], src_imsize=[src[1][0], src[1][1], 3],
               trg_imsize=[trg[1][0], trg[1][1], 3], src_kps=src_kps, trg_kps=trg_kps, trg_bndbox=bbox,
               category=category, **extra)
    folder = root / 'PairAnnotation' / 'test'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{name}.json').write_text(json.dumps(ann))


def _px(row, col):
    """Pixel (x, y) that samples cell (row, col) exactly when the image is 5x the feature map."""
    return [5 * col + 2, 5 * row + 2]


@pytest.fixture
def planted(tmp_path):
    """Two pairs whose predicted matches are known (features are planted, images 5x the maps)."""
    root = tmp_path / 'SPair-71k'
    # cat: source 30x15 (map 3x6), target 50x40 (map 8x10), bbox 20 wide, 30 high -> threshold 3.0 px; image 5.0 px.
    # predicted matches: codes at target cells (2, 3), (7, 9), (4, 1) -> pixels (17, 12), (47, 37), (7, 22)
    _write_pair(root, '000001-a-b:cat', 'cat', ('a.jpg', (30, 15)), ('b.jpg', (50, 40)),
                src_kps=[_px(0, 1), _px(2, 5), _px(1, 0)],
                trg_kps=[[17, 12],     # distance 0: correct
                         [47, 33],     # distance 4: wrong by bbox (4 / 30 > 0.1), right by image (4 / 50)
                         [10, 22]],    # distance 3 = 0.1 x 30 exactly: correct (<=); by bbox width it would not be
                bbox=[5, 3, 25, 33])
    # dog: source 40x20 (map 4x8), target 20x35 (map 7x4); bbox 10x10 -> 1.0 px; image 3.5 px
    # predicted matches: codes at target cells (5, 1), (1, 3) -> pixels (7, 27), (17, 7). (Cells on the top or left
    # border would tie with the clamped pixels 0..2 before them, and the argmax takes the first.)
    _write_pair(root, '000002-c-d:dog', 'dog', ('c.jpg', (40, 20)), ('d.jpg', (20, 35)),
                src_kps=[_px(3, 7), _px(0, 2)],
                trg_kps=[[7, 27],      # correct
                         [7, 17]],     # x/y swapped of the prediction (17, 7): wrong by both
                bbox=[0, 0, 10, 10])
    feats = {
        'a.jpg': _planted(3, 6, [(0, 1), (2, 5), (1, 0)]), 'b.jpg': _planted(8, 10, [(2, 3), (7, 9), (4, 1)]),
        'c.jpg': _planted(4, 8, [(3, 7), (0, 2)]), 'd.jpg': _planted(7, 4, [(5, 1), (1, 3)]),
    }
    return root, feats


# by hand: cat bbox 2/3, img 3/3; dog bbox 1/2, img 1/2
EXPECTED = dict(per_image_pck=100 * (2 / 3 + 1 / 2) / 2, per_point_pck=100 * 3 / 5,
                per_image_pck_img=100 * (1 + 1 / 2) / 2, per_point_pck_img=100 * 4 / 5, num_pairs=2, num_points=5)


def test_planted_pck(planted):
    root, feats = planted
    pairs = load_pairs(root)
    scores = spair.evaluate(pairs, lambda cat, names: {n: feats[n] for n in names})
    assert scores.summary() == pytest.approx(EXPECTED)
    assert scores.summary('cat')['per_image_pck'] == pytest.approx(100 * 2 / 3)
    assert scores.summary('cat')['per_image_pck_img'] == pytest.approx(100.0)
    assert scores.summary('dog')['per_point_pck'] == pytest.approx(50.0)


def _dift_reference(root: Path, feats: dict) -> tuple[float, float, float]:
    """DIFT's eval_spair.py loop (per image, per point PCK@0.1 bbox) plus the image-size threshold."""
    total_pck, total_pck_img, all_correct, all_total = [], [], 0, 0
    for path in sorted((root / 'PairAnnotation' / 'test').glob('*.json')):
        data = json.loads(path.read_text())
        src_ft = nn.Upsample(size=data['src_imsize'][:2][::-1], mode='bilinear')(feats[data['src_imname']][None])
        trg_ft = nn.Upsample(size=data['trg_imsize'][:2][::-1], mode='bilinear')(feats[data['trg_imname']][None])
        h, w = trg_ft.shape[-2:]
        b = data['trg_bndbox']
        threshold = max(b[3] - b[1], b[2] - b[0])
        correct = correct_img = 0
        for src_point, trg_point in zip(data['src_kps'], data['trg_kps']):
            c = src_ft.size(1)
            src_vec = nn.functional.normalize(src_ft[0, :, src_point[1], src_point[0]].view(1, c)).transpose(0, 1)
            trg_vec = nn.functional.normalize(trg_ft.view(c, -1).transpose(0, 1))
            cos_map = torch.mm(trg_vec, src_vec).view(h, w).numpy()
            max_yx = np.unravel_index(cos_map.argmax(), cos_map.shape)
            dist = ((max_yx[1] - trg_point[0]) ** 2 + (max_yx[0] - trg_point[1]) ** 2) ** 0.5
            correct += dist / threshold <= 0.1
            correct_img += dist / max(h, w) <= 0.1
        all_correct += correct
        all_total += len(data['src_kps'])
        total_pck.append(correct / len(data['src_kps']))
        total_pck_img.append(correct_img / len(data['src_kps']))
    return 100 * np.mean(total_pck), 100 * all_correct / all_total, 100 * np.mean(total_pck_img)


def test_agrees_with_dift_loop_on_random_features(tmp_path):
    root = tmp_path / 'SPair-71k'
    rng = np.random.default_rng(1)
    sizes = {'p.jpg': (37, 23), 'q.jpg': (29, 41), 'r.jpg': (50, 31)}
    for i, (s, t) in enumerate([('p.jpg', 'q.jpg'), ('q.jpg', 'r.jpg'), ('r.jpg', 'p.jpg'), ('p.jpg', 'r.jpg')]):
        sw, sh = sizes[s]
        tw, th = sizes[t]
        n = 6
        _write_pair(root, f'{i:06d}:bird', 'bird', (s, sizes[s]), (t, sizes[t]),
                    src_kps=[[int(rng.integers(sw)), int(rng.integers(sh))] for _ in range(n)],
                    trg_kps=[[int(rng.integers(tw)), int(rng.integers(th))] for _ in range(n)],
                    bbox=[2, 3, 2 + int(rng.integers(5, tw - 2)), 3 + int(rng.integers(5, th - 3))])
    g = torch.Generator().manual_seed(0)
    # smooth random maps (few channels): matches land near, not only far from, the annotated keypoints
    feats = {n: torch.randn(3, 3, 4, generator=g) for n in sizes}
    scores = spair.evaluate(load_pairs(root), lambda cat, names: {n: feats[n] for n in names}).summary()
    per_image, per_point, per_image_img = _dift_reference(root, feats)
    assert scores['per_image_pck'] == pytest.approx(per_image)
    assert scores['per_point_pck'] == pytest.approx(per_point)
    assert scores['per_image_pck_img'] == pytest.approx(per_image_img)
    assert 0 < per_image_img < 100  # the comparison is not vacuous


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_planted_json(planted, tmp_path, monkeypatch, capsys):
    """The real command with the model's features replaced by the planted ones (by image file name)."""
    root, feats = planted
    import diffbackbone.correspondence as corr

    def fake_features(model, paths, size=None, prompts=None):
        assert size == 64 and prompts is None
        return [feats[Path(p).name] for p in paths]

    monkeypatch.setattr(corr, 'image_features', fake_features)
    out = tmp_path / 'res' / 'spair.json'
    rc, printed, err = _run(['eval', 'spair', '--data', str(root), '--model', 'test_cleandift', '--random-weights',
                             '--size', '64', '--batch-size', '1', '--json', str(out)], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert {k: result[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert result['model'] == 'test_cleandift'
    assert set(result['per_category']) == {'cat', 'dog'}
    assert result['per_category']['dog']['per_point_pck_img'] == pytest.approx(50.0)
    assert 'cat ' in printed and f'{EXPECTED["per_image_pck"]:.2f}' in printed


@pytest.fixture
def small(tmp_path):
    root = tmp_path / 'SPair-71k'
    _write_pair(root, '000001:cat', 'cat', ('a.jpg', (72, 64)), ('b.jpg', (64, 80)),
                src_kps=[[3, 5], [60, 40]], trg_kps=[[10, 10], [50, 70]], bbox=[0, 0, 60, 70])
    _write_pair(root, '000002:cat', 'cat', ('b.jpg', (64, 80)), ('a.jpg', (72, 64)),
                src_kps=[[10, 10], [50, 70]], trg_kps=[[3, 5], [60, 40]], bbox=[0, 0, 70, 60])
    _write_pair(root, '000003:dog', 'dog', ('c.jpg', (66, 66)), ('d.jpg', (70, 65)),
                src_kps=[[30, 30]], trg_kps=[[35, 32]], bbox=[10, 10, 60, 60])
    return root


def _features_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob('*.safetensors'))


def test_cli_end_to_end_and_resume(small, tmp_path, capsys):
    cache, out = tmp_path / 'cache', tmp_path / 'r.json'
    argv = ['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--random-weights', '--size', '64',
            '--batch-size', '3', '--cache', str(cache), '--json', str(out), '--device', 'cpu']
    rc, printed, err = _run(argv, capsys)
    assert rc == 0, err
    first = json.loads(out.read_text())
    assert first['num_pairs'] == 3 and first['num_points'] == 5
    assert set(first['per_category']) == {'cat', 'dog'} and first['per_category']['cat']['num_points'] == 4
    assert all(0 <= first[k] <= 100 for k in EXPECTED if k.endswith('pck') or k.endswith('img'))
    assert '4 images run' in printed
    files = _features_files(cache)
    assert len(files) == 4 and not list(cache.rglob('.*.tmp'))

    rc, printed, _ = _run(argv, capsys)  # everything from the cache
    assert rc == 0 and '0 images run' in printed
    assert json.loads(out.read_text()) == first

    files[0].unlink()  # as if the run had been killed before that image
    rc, printed, _ = _run(argv, capsys)
    assert rc == 0 and '1 images run' in printed
    assert json.loads(out.read_text()) == first

    Image.new('RGB', (66, 66), (200, 10, 10)).save(small / 'JPEGImages' / 'dog' / 'c.jpg')  # a replaced image
    rc, printed, _ = _run(argv, capsys)
    assert rc == 0 and '1 images run' in printed

    rc, printed, _ = _run(argv[:-4] + ['--size', '128', '--json', str(out)], capsys)  # another size: not stale
    assert rc == 0 and '4 images run' in printed
    assert len({p.parent.parent for p in _features_files(cache)}) == 2


def test_interrupted_run_leaves_only_whole_files(small, tmp_path, monkeypatch, capsys):
    import diffbackbone.correspondence as corr

    real, calls = corr.image_features, []

    def dies_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corr, 'image_features', dies_second_time)
    cache = tmp_path / 'cache'
    argv = ['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--random-weights', '--size', '64',
            '--batch-size', '1', '--cache', str(cache)]
    assert cli.main(argv) == 130  # Ctrl-C: one `interrupted:` line (cli.main), no traceback
    assert capsys.readouterr().err.splitlines()[-1].startswith('interrupted: ')
    assert len(_features_files(cache)) == 1 and not list(cache.rglob('.*.tmp'))
    monkeypatch.setattr(corr, 'image_features', real)
    rc, printed, err = _run(argv, capsys)
    assert rc == 0 and '3 images run' in printed, err


def _break(root: Path, name: str, **changes):
    path = root / 'PairAnnotation' / 'test' / f'{name}.json'
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize('change, message', [
    (dict(trg_bndbox=None), 'missing key(s) trg_bndbox'),
    (dict(src_kps=[[3, 5], [72, 40]]), 'src_kps[1] = [72, 40] is outside its 72x64 image'),
    (dict(trg_kps=[[10, -1], [50, 70]]), 'trg_kps[0] = [10, -1] is outside'),
    (dict(src_imsize=[70, 64, 3]), 'is 72x64 pixels but the annotation says 70x64'),
    (dict(trg_kps=[[10, 10]]), '2 src_kps but 1 trg_kps'),
    (dict(category='horse'), "category 'horse' has no folder"),
    (dict(trg_imname='zzz.jpg'), "no such image"),
])
def test_bad_annotations(small, tmp_path, capsys, change, message):
    path = _break(small, '000001:cat', **change)
    cache = tmp_path / 'cache'
    rc, _, err = _run(['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--random-weights',
                       '--cache', str(cache)], capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1
    assert str(path) in err and message in err
    assert not cache.exists()  # checked before anything is computed or cached


def test_bad_dataset_and_options(small, tmp_path, capsys):
    base = ['eval', 'spair', '--model', 'test_cleandift', '--random-weights']
    rc, _, err = _run(base + ['--data', str(tmp_path / 'nothing')], capsys)
    assert rc == 2 and 'nothing: no such folder' in err and 'PairAnnotation/test' in err
    (tmp_path / 'half' / 'PairAnnotation' / 'test').mkdir(parents=True)
    rc, _, err = _run(base + ['--data', str(tmp_path / 'half')], capsys)
    assert rc == 2 and 'JPEGImages: no such folder' in err
    rc, _, err = _run(base + ['--data', str(small), '--taps', 'us6', 'mid'], capsys)
    assert rc == 2 and '--taps takes exactly one tap' in err
    rc, _, err = _run(base + ['--data', str(small), '--prompt-template', 'a photo of a {animal}'], capsys)
    assert rc == 2 and 'must use only {category}' in err
    cache = tmp_path / 'cache'
    rc, _, err = _run(base + ['--data', str(small), '--taps', 'us99', '--size', '64', '--cache', str(cache)], capsys)
    assert rc == 2 and "Unknown tap 'us99'" in err and 'diffbackbone taps' in err
    assert not _features_files(cache)
    rc, _, err = _run(base + ['--data', str(small), '--weights', str(tmp_path / 'no.safetensors')], capsys)
    assert rc == 2 and 'no.safetensors: no such file' in err


def test_limit_takes_first_pairs(small):
    assert [p.name for p in load_pairs(small, limit=2)] == ['000001:cat.json', '000002:cat.json']
    with pytest.raises(SpairError, match='--limit'):
        load_pairs(small, limit=0)
    assert math.isclose(load_pairs(small)[2].img_threshold, 70.0)


from test_pretrained import published  # noqa: E402,F401  (tiny models on the fake Hub)


def test_weights_file_and_prompt_template(small, published, hub_cache, tmp_path, capsys):  # noqa: F811
    """--weights loads the local checkpoint; the template conditions each image on its category's caption."""
    import timm

    from diffbackbone.hub import load_safetensors

    weights, cache = published['tmp'] / 'unet.safetensors', tmp_path / 'cache'
    base = ['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--weights', str(weights),
            '--size', '64', '--cache', str(cache)]
    rc, _, err = _run(base + ['--prompt-template', 'a photo of a {category}'], capsys)
    assert rc == 0, err
    rc, _, err = _run(base, capsys)
    assert rc == 0, err
    folders = {p.parent.parent for p in _features_files(cache)}
    assert len(folders) == 2  # prompted and unprompted features never share a cache folder

    def cached(folder, cat, name):
        return load_safetensors(folder / cat / f'{name}.safetensors', what='test')['features']

    by_template = {json.loads((f / 'config.json').read_text())['prompt_template']: f for f in folders}
    prompted, plain = by_template['a photo of a {category}'], by_template[None]
    from diffbackbone.correspondence import image_features
    for prompt, folder in (('a photo of a dog', prompted), (None, plain)):
        model = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6',),
                                  pretrained_cfg_overlay=dict(file=str(weights)), prompt=prompt).eval()
        want = image_features(model, [small / 'JPEGImages' / 'dog' / 'c.jpg'], 64)[0]
        torch.testing.assert_close(cached(folder, 'dog', 'c.jpg'), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached(prompted, 'cat', 'a.jpg'), cached(plain, 'cat', 'a.jpg'), atol=1e-4)


def test_bfloat16_run(small, tmp_path, capsys):
    """--dtype bfloat16: the model runs in bf16 (a clean model's timestep stays fp32) and its features are cached so."""
    from safetensors.torch import load_file

    cache = tmp_path / 'cache'
    rc, printed, err = _run(['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--random-weights',
                             '--size', '64', '--dtype', 'bfloat16', '--cache', str(cache), '--limit', '1'], capsys)
    assert rc == 0, err
    files = _features_files(cache)
    assert len(files) == 2 and all(load_file(f)['features'].dtype == torch.bfloat16 for f in files)


# ---- DiTF's per-image captions (--captions) -------------------------------------------------------------------------
CAPTIONS = {'cata.jpg': 'a cat', 'catb.jpg': 'a kit', 'dogc.jpg': 'a dog', 'dogd.jpg': 'a pup'}  # DiTF's keys:
# category + image file name; short, so the tiny T5's 8-token window keeps them whole


from test_flux import tiny_repo  # noqa: E402,F401  (the tiny FLUX repo on the fake Hub)


def test_captions_condition_each_image_as_its_prompt(small, tiny_repo, hub_cache, tmp_path, capsys):  # noqa: F811
    """`--captions`: each image's cached features equal the model built with prompt=its caption (source and target
    each on their own), and differ from another caption's."""
    import timm

    from diffbackbone.correspondence import image_features
    from diffbackbone.hub import load_safetensors

    captions, cache, out = tmp_path / 'captions.json', tmp_path / 'cache', tmp_path / 'r.json'
    captions.write_text(json.dumps(dict(CAPTIONS, **{'horsex.jpg': 'unused'})))
    rc, _, err = _run(['eval', 'spair', '--data', str(small), '--model', 'test_ditf_flux', '--taps', 'ditf',
                       '--size', '64', '--batch-size', '2', '--captions', str(captions), '--cache', str(cache),
                       '--json', str(out)], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result['captions'] == str(captions) and len(result['captions_sha256']) == 64
    (folder,) = {p.parent.parent for p in _features_files(cache)}
    for key, cat, name in (('cata.jpg', 'cat', 'a.jpg'), ('dogd.jpg', 'dog', 'd.jpg')):
        model = timm.create_model('test_ditf_flux', pretrained=True, features_only=True, out_indices='ditf',
                                  prompt=CAPTIONS[key]).eval()
        with torch.no_grad():
            want = image_features(model, [small / 'JPEGImages' / cat / name], 64)[0]
        got = load_safetensors(folder / cat / f'{name}.safetensors', what='test')['features']
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = load_safetensors(folder / 'dog' / 'c.jpg.safetensors', what='test')['features']
    with torch.no_grad():
        on_d = image_features(model, [small / 'JPEGImages' / 'dog' / 'c.jpg'], 64)[0]  # c.jpg on d.jpg's caption
    assert not torch.allclose(other, on_d, atol=1e-4)


@pytest.mark.parametrize('content, message', [
    ('{"cata.jpg": ', 'not a readable JSON file'),
    ('["a cat"]', 'holds a JSON list'),
    (json.dumps(dict(CAPTIONS, **{'dogd.jpg': 3})), "the caption of 'dogd.jpg' is a int"),
    (json.dumps({k: v for k, v in CAPTIONS.items() if k != 'dogc.jpg'}), "no caption for 1 of the 4 images, e.g. "
                                                                          "c.jpg of dog (key 'dogc.jpg')"),
])
def test_bad_captions_one_error_line(small, tmp_path, capsys, content, message):
    captions, cache = tmp_path / 'captions.json', tmp_path / 'cache'
    captions.write_text(content)
    rc, _, err = _run(['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--random-weights',
                       '--captions', str(captions), '--cache', str(cache)], capsys)
    assert rc == 2 and err.startswith('error: --captions ') and err.count('\n') == 1, err
    assert message in err
    assert not cache.exists()  # checked before any model is built or anything cached


def test_captions_exclude_other_prompts(small, tmp_path, capsys):
    captions = tmp_path / 'captions.json'
    captions.write_text(json.dumps(CAPTIONS))
    base = ['eval', 'spair', '--data', str(small), '--model', 'test_cleandift', '--captions', str(captions)]
    rc, _, err = _run(base + ['--random-weights', '--prompt-template', 'a photo of a {category}'], capsys)
    assert rc == 2 and 'drop --prompt-template' in err and err.count('\n') == 1
    rc, _, err = _run(base + ['--model-kwargs', '{"prompt": "a cat"}'], capsys)
    assert rc == 2 and 'drop --prompt-template and the prompt of --model-kwargs' in err
    rc, _, err = _run(base + ['--protocol', 'gdf', '--split', 'x.json', '--store', str(tmp_path / 's')], capsys)
    assert rc == 2 and '--captions: options of --protocol dift, not of gdf' in err
    rc, _, err = _run(base + ['--random-weights', '--json', str(captions)], capsys)  # an input: never overwritten
    assert rc == 2 and err.startswith('error: --json') and err.count('\n') == 1, err
    assert json.loads(captions.read_text()) == CAPTIONS
