"""`diffbackbone eval pixel` (label-scarce segmentation, DDPM-segmentation's protocol as Meng et al. run it): the pixel
read-out against `F.interpolate`, their MLP, split, small-annotation and IoU rules, our presets' channel counts against
their --feature_len, the CLI end to end on a synthetic dataset in their layout whose labels are the colour of each block
(learnable: high mIoU) and a shuffled-label control (low), and bad layouts."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from diffbackbone import cli
from diffbackbone.data.store import FeatureStore, StoreWriter, write_index
from diffbackbone.evals import pixel
from diffbackbone.evals.pixel_data import IGNORE, PixelItem, load_pixel_dataset

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 60]], dtype=np.uint8)
S = 32  # image and label size


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _write_dataset(root: Path, n_train: int = 4, n_test: int = 4, seed: int = 0, shuffled: bool = False) -> Path:
    """horse-like layout: real/train, real/test; each image a 2 x 2 grid of the four colours in a random order, its
    label the colour's index (or, `shuffled`, a random class per block independent of its colour). Every image has
    the same colours in the same amounts, so that the per-image normalisations (GroupNorm) of a random-weight model
    map a colour to the same features in every image."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        folder = root / 'real' / split
        folder.mkdir(parents=True)
        for i in range(n):
            classes = rng.permutation(4)
            img, lab = np.zeros((S, S, 3), np.uint8), np.zeros((S, S), np.int64)
            for b, c in enumerate(classes):
                ys, xs = slice(b // 2 * S // 2, (b // 2 + 1) * S // 2), slice(b % 2 * S // 2, (b % 2 + 1) * S // 2)
                img[ys, xs] = COLOURS[c]
                lab[ys, xs] = rng.integers(4) if shuffled else c
            Image.fromarray(img).save(folder / f'{split}_{i}.png')
            np.save(folder / f'{split}_{i}.npy', lab)
    return root


# ---- the parts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('shape,size', [((5, 4, 4), 32), ((3, 7, 5), 16), ((2, 40, 36), 16), ((4, 1, 1), 8)])
def test_sampler_reads_what_interpolate_gives(shape, size):
    torch.manual_seed(0)
    maps = torch.randn(3, *shape)
    ref = F.interpolate(maps, (size, size), mode='bilinear', align_corners=False)  # theirs, at label size
    sampler = pixel.PixelSampler([shape], size)
    n, pos = torch.randint(0, 3, (200,)), torch.randint(0, size * size, (200,))
    got = sampler([maps.permute(0, 2, 3, 1)], n, pos)
    want = ref[n, :, pos // size, pos % size]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shapes,size', [([(5, 4, 4), (3, 8, 8), (2, 16, 16)], 32), ([(3, 7, 7), (2, 12, 12)], 16),
                                         ([(4, 1, 1), (3, 3, 3), (2, 5, 5)], 64)])
def test_sampler_resamples_as_their_aggregate_then_bilinear(shapes, size):
    """Meng et al.'s path (issue #27.4): `extract_feature.py --aggregate_output` resizes every tap to the largest width
    with `F.interpolate(v, largest)` (nearest), concatenates and saves it (float16 in their default run);
    `task-pixel.py` loads it as float and resizes bilinearly to `dim`."""
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, *s, generator=gen).half() for s in shapes]  # a float16 store, as their fp16 .npy
    largest = max(s[2] for s in shapes)
    aggregated = torch.cat([F.interpolate(v, largest) for v in maps], dim=1).numpy()  # their saved .npy
    ref = F.interpolate(torch.from_numpy(aggregated).type(torch.FloatTensor), (size, size), mode='bilinear')
    sampler = pixel.PixelSampler(shapes, size, aggregate=largest)
    n, pos = torch.randint(0, 2, (300,), generator=gen), torch.randint(0, size * size, (300,), generator=gen)
    got = sampler([m.permute(0, 2, 3, 1) for m in maps], n, pos)
    torch.testing.assert_close(got, ref[n, :, pos // size, pos % size], atol=1e-6, rtol=1e-6)
    straight = torch.cat([F.interpolate(m.float(), (size, size), mode='bilinear') for m in maps], dim=1)
    assert not torch.allclose(straight, ref)  # bilinear straight to the label size is not theirs


def test_multi_model_taps_aggregate_per_model_as_theirs():
    """Ours-XL-t in their code is one `extract_feature.py --aggregate_output` run per model (each to its own largest
    tap), the saved features then concatenated and resized bilinearly by `task-pixel.py`."""
    taps = ['sdxl:a', 'sdxl:b', 'sd15:a', 'sd15:b', 'sd15:c']
    shapes = [(3, 32, 32), (2, 16, 16), (4, 8, 8), (2, 64, 64), (1, 16, 16)]
    assert pixel.aggregate_sides(taps, shapes) == [32, 32, 64, 64, 64]
    assert pixel.aggregate_sides(['us6', 'mid'], [(4, 8, 8), (4, 4, 4)]) == [8, 8]
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, *s, generator=gen) for s in shapes]
    per_model = [torch.cat([F.interpolate(v, 32) for v in maps[:2]], 1),
                 torch.cat([F.interpolate(v, 64) for v in maps[2:]], 1)]
    size = 48
    ref = torch.cat([F.interpolate(v, (size, size), mode='bilinear') for v in per_model], 1)
    sampler = pixel.PixelSampler(shapes, size, aggregate=pixel.aggregate_sides(taps, shapes))
    n, pos = torch.randint(0, 2, (300,), generator=gen), torch.randint(0, size * size, (300,), generator=gen)
    got = sampler([m.permute(0, 2, 3, 1) for m in maps], n, pos)
    torch.testing.assert_close(got, ref[n, :, pos // size, pos % size], atol=5e-5, rtol=1e-5)  # float32 round-off
    one = pixel.PixelSampler(shapes, size, aggregate=64)([m.permute(0, 2, 3, 1) for m in maps], n, pos)
    assert not torch.allclose(one, got)  # one largest size across the models is not theirs


def test_classifier_is_theirs():
    small, large = pixel.PixelClassifier(21, 100), pixel.PixelClassifier(34, 100)
    widths = [(m.in_features, m.out_features) for m in small.layers if isinstance(m, nn.Linear)]
    assert widths == [(100, 128), (128, 32), (32, 21)]
    assert [(m.in_features, m.out_features) for m in large.layers if isinstance(m, nn.Linear)] == \
        [(100, 256), (256, 128), (128, 34)]
    assert [type(m).__name__ for m in small.layers] == ['Linear', 'ReLU', 'BatchNorm1d'] * 2 + ['Linear']
    w = torch.cat([m.weight.flatten() for m in large.layers if isinstance(m, nn.Linear)])
    assert abs(w.std().item() - 0.02) < 0.002 and all(
        not m.bias.any() for m in large.layers if isinstance(m, nn.Linear))


def test_split_pools_and_shuffles_as_theirs(tmp_path):
    ds = load_pixel_dataset(_write_dataset(tmp_path / 'd', n_train=3, n_test=5))
    for seed in (0, 3):
        random.seed(seed)  # their setup_seed + shuffle_split
        pooled = [('train', i) for i in range(3)] + [('test', i) for i in range(5)]
        random.shuffle(pooled)
        want = [(ds.train if s == 'train' else ds.test)[i].image for s, i in pooled]
        train, test = pixel.split_items(ds, seed)
        assert [it.image for it in train + test] == want and len(train) == 3
    train, test = pixel.split_items(ds, 0, shuffle=False, max_test=2)
    assert train == ds.train and test == ds.test[:2]


def test_small_annotations_are_ignored_in_training(tmp_path):
    lab = np.zeros((S, S), np.int64)
    lab[:3, :6] = 2  # 18 pixels < 20: ignored
    lab[10:15, 10:15] = 1  # 25 pixels: kept
    np.save(tmp_path / 'a.npy', lab)
    out = pixel.train_labels(PixelItem(tmp_path / 'a.png', tmp_path / 'a.npy', 'train'), 3, S)
    assert (out[:3, :6] == IGNORE).all() and (out[10:15, 10:15] == 1).all() and (out == IGNORE).sum() == 18


def test_iou_counts_every_class():
    miou, iou = pixel.iou_scores(np.array([5.0, 0.0, 2.0]), np.array([10.0, 0.0, 4.0]))
    assert iou[0] == pytest.approx(0.5) and iou[1] == 0.0 and miou == pytest.approx(1 / 3)  # absent class: 0


def test_presets_have_their_channel_counts():
    """Meng et al.'s --feature_len of Legacy-v1.5, Legacy-XL, Ours-v1.5, Ours-XL from our presets (meta device)."""
    assert {v[0]: v[1] for v in pixel.MENG_CHANNELS.values()} == {
        'Legacy-v1.5': 3520, 'Legacy-XL': 2240, 'Ours-v1.5': 3520, 'Ours-XL': 3840}
    for (model, preset), (_, channels) in pixel.MENG_CHANNELS.items():
        assert pixel.preset_channels(model, preset) == channels, (model, preset)


# ---- end to end --------------------------------------------------------------------------------------------------
ARGS = ['--model', 'test_dift', '--random-weights', '--label-size', str(S), '--ensemble', '3', '--splits', '2',
        '--epochs', '8', '--device', 'cpu', '--batch-size', '8']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp('pixel')
    data = _write_dataset(base / 'blocks_3')
    out = base / 'res.json'
    rc = cli.main(['eval', 'pixel', '--data', str(data), '--store', str(base / 'store'), '--json', str(out),
                   '--pictures', str(base / 'pics'), *ARGS])
    return rc, data, base / 'store', json.loads(out.read_text()) if out.is_file() else None


def test_cli_end_to_end(run):
    """Through the CLI with a tiny random-weight UNet: the store, the splits, the figures' bookkeeping. (Its random
    features do not carry colour -- GroupNorm and attention mix each image -- so the planted answers are tested on
    planted features below.)"""
    rc, data, store, result = run
    assert rc == 0
    assert result['classes'] == 4 and result['ensemble'] == 3 and len(result['splits']) == 2
    assert result['model_kwargs'] == {'meng_t': 50}  # Meng et al.'s t for a noisy model: UNet timestep 51
    assert result['channels'] == 16 + 32 + 32 + 32  # test_dift's gdf_practical taps
    assert [s['seed'] for s in result['splits']] == [0, 1]
    assert result['splits'][0]['train'] != result['splits'][1]['train']  # two random splits
    for s in result['splits']:
        assert len(s['train']) == 4 and len(s['test']) == 4 and sorted(s['train'] + s['test']) == sorted(
            p.name for p in (data / 'real').rglob('*.png'))
        assert s['miou'] == pytest.approx(np.mean(s['iou'])) and len(s['iou']) == 4
        assert all(1 <= e <= 8 for e in s['epochs'])
    assert result['miou_mean'] == pytest.approx(np.mean([s['miou'] for s in result['splits']]))
    assert result['miou_std'] == pytest.approx(np.std([s['miou'] for s in result['splits']]))
    st = FeatureStore(store)
    assert len(st) == 8 and st.config['model_kwargs'] == {'meng_t': 50}
    assert st.config['input_size'] == [128, 128]  # the model's native size


def test_cli_writes_uncertainty_and_pictures(run):
    """`--pictures`: per split, every test image's colour map, classes and uncertainty; the classes give back the
    split's IoU; the JSON holds each test image's uncertainty score and their mean per split."""
    _, data, _, result = run
    pics = Path(result['pictures'])
    assert sorted(p.name for p in pics.iterdir()) == ['seed0', 'seed1']
    for s in result['splits']:
        assert len(s['uncertainty']) == len(s['test']) and all(u >= -1e-6 for u in s['uncertainty'])
        assert s['mean_uncertainty'] == pytest.approx(np.mean(s['uncertainty']))
        folder = pics / f"seed{s['seed']}"
        inter, union = np.zeros(4), np.zeros(4)
        for name in s['test']:
            stem = name.split('.')[0]
            with Image.open(folder / 'predictions' / f'{stem}.png') as img:
                pred = np.array(img)
            gt = np.load(next(data.rglob(f'{stem}.npy')))
            inter += [((pred == c) & (gt == c)).sum() for c in range(4)]
            union += [((pred == c) | (gt == c)).sum() for c in range(4)]
            with Image.open(folder / 'visualizations' / f'{stem}.jpg') as img:
                assert img.size == (S, S) and img.mode == 'RGB'
            with Image.open(folder / 'uncertainty' / f'{stem}.png') as img:
                assert img.size == (S, S) and img.mode == 'L'
        assert s['iou'] == pytest.approx(list(100 * inter / (1e-8 + union)))
    assert result['uncertainty_mean'] == pytest.approx(np.mean([s['mean_uncertainty'] for s in result['splits']]))


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    """The dataset with a feature store of planted maps, as `features --out` lays it out: tap 'colour' is each
    block's class one-hot at 8 x 8 (stride 4) plus noise, tap 'noise' (4 x 4) is noise only."""
    base = tmp_path_factory.mktemp('planted')
    data = _write_dataset(base / 'blocks_4')
    ds = load_pixel_dataset(data)
    shapes = {'colour': [4, 8, 8], 'noise': [6, 4, 4]}
    config = dict(model='planted', taps=list(shapes), shapes=shapes)
    writer = StoreWriter(base / 'store', config, shard_size=3)
    gen = torch.Generator().manual_seed(0)
    for it in ds.train + ds.test:
        lab = torch.from_numpy(np.load(it.label))
        onehot = F.one_hot(lab, 4).permute(2, 0, 1).float()[None]
        colour = F.adaptive_avg_pool2d(onehot, 8)[0] + 0.3 * torch.randn(4, 8, 8, generator=gen)
        writer.add([str(it.image.resolve())], {'colour': colour[None], 'noise': torch.randn(1, 6, 4, 4,
                                                                                           generator=gen)})
    writer.flush()
    write_index(base / 'store', config)
    return ds, FeatureStore(base / 'store')


def _evaluate(ds, store, seed=0, **cfg):
    sampler = pixel.PixelSampler([store.config['shapes'][t] for t in store.taps], S)
    cfg = pixel.TrainConfig(**{**dict(classes=4, members=3, epochs=8, label_size=S), **cfg})
    train, test = pixel.split_items(ds, seed)
    return pixel.evaluate_split(pixel._Maps(store, store.taps, 'cpu'), sampler, train, test, cfg, seed=seed)


def test_planted_labels_are_learnt(planted):
    ds, store = planted
    r = _evaluate(ds, store)
    assert r.miou > 0.9, r
    assert _evaluate(ds, store).miou == r.miou  # seeded: the same figures again


def test_shuffled_labels_are_not_learnt(planted, tmp_path):
    """The control: same features, labels independent of the colours: chance-level mIoU."""
    ds, store = planted
    control = load_pixel_dataset(_write_dataset(tmp_path / 'c', shuffled=True, seed=1))
    ds = type(ds)(ds.root, 'control', [PixelItem(a.image, b.label, 'train') for a, b in zip(ds.train, control.train)],
                  [PixelItem(a.image, b.label, 'test') for a, b in zip(ds.test, control.test)], 4)
    assert _evaluate(ds, store).miou < 0.4


def test_memory_bound_groups_train_too(planted):
    """With a budget below one image's maps, epochs visit the images in groups of one: it still learns."""
    ds, store = planted
    assert _evaluate(ds, store, memory_bytes=1, members=2).miou > 0.7  # batches of one image: less than global


# ---- bad input ---------------------------------------------------------------------------------------------------
def _bad(tmp_path, fix):
    data = _write_dataset(tmp_path / 'bad', n_train=2, n_test=2)
    fix(data / 'real')
    return data


@pytest.mark.parametrize('fix,message', [
    (lambda r: [p.unlink() for p in (r / 'test').iterdir()] and (r / 'test').rmdir(), 'test: no such folder'),
    (lambda r: (r / 'train' / 'train_0.npy').unlink(), 'has no label map train_0.npy'),
    (lambda r: np.save(r / 'train' / 'train_1.npy', np.zeros((2, 4, 4))), 'a label map is 2-D'),
    (lambda r: np.save(r / 'test' / 'test_0.npy', np.full((S, S), 0.5)), 'integer class indices'),
    (lambda r: np.save(r / 'test' / 'test_1.npy', np.full((S, S), 300)), 'outside 0..255'),
    (lambda r: (r / 'train' / 'train_0.png').write_bytes(b'not a png'), 'cannot be read'),
])
def test_bad_layouts_stop_before_any_model(tmp_path, capsys, fix, message):
    data = _bad(tmp_path, fix)
    store = tmp_path / 'store'
    assert cli.main(['eval', 'pixel', '--data', str(data), '--store', str(store), *ARGS]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith('error: ') and err.count('\n') == 1, err
    assert not store.exists()


def test_too_few_classes_and_overlaps(tmp_path, capsys):
    data = _write_dataset(tmp_path / 'd', n_train=2, n_test=2)
    assert cli.main(['eval', 'pixel', '--data', str(data), '--store', str(tmp_path / 's'), '--classes', '3',
                     *ARGS]) == 2
    assert 'has label 3, but 3 classes' in capsys.readouterr().err
    assert cli.main(['eval', 'pixel', '--data', str(data), '--store', str(data / 'feats'), *ARGS]) == 2
    assert 'overlaps --data' in capsys.readouterr().err
    assert cli.main(['eval', 'pixel', '--data', str(tmp_path / 'nope'), '--store', str(tmp_path / 's'), *ARGS]) == 2
    assert 'no such folder' in capsys.readouterr().err
    assert not (tmp_path / 's').exists()


def test_label_maps_of_another_aspect_ratio_are_refused_and_other_sizes_warned(tmp_path, capsys):
    data = _bad(tmp_path, lambda r: np.save(r / 'train' / 'train_1.npy', np.zeros((17, 300), np.uint8)))
    store = tmp_path / 'store'
    assert cli.main(['eval', 'pixel', '--data', str(data), '--store', str(store), *ARGS]) == 2
    err = capsys.readouterr().err
    assert 'train_1.npy' in err and '17 x 300' in err and 'aspect ratio' in err and err.count('\n') == 1, err
    assert not store.exists()
    np.save(data / 'real' / 'train' / 'train_1.npy', np.zeros((1, 1), np.uint8))  # same aspect, another size: warned
    np.save(data / 'real' / 'test' / 'test_1.npy', np.ones((S // 2 + 1, S // 2), np.uint8))  # a rounding: warned
    with pytest.warns(UserWarning, match=r'2 label maps.*train_1.npy \(1 x 1 for a 32 x 32 image\)'):
        assert len(load_pixel_dataset(data).train) == 2
