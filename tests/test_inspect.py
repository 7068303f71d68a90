"""`diffbackbone inspect`: the sheet's tiles against an independent PCA of each tap, the statistics against a direct
computation, streaming taps against the model's own forward, several sheets with an index, bad outputs refused."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone import cli
from diffbackbone.commands import inspect as ins
from diffbackbone.data.images import load_image


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp('inspect_images')
    paths = []
    for i in range(2):
        rng = np.random.RandomState(i)
        a = np.zeros((96, 112, 3), np.uint8)
        a[:, :56] = rng.randint(0, 255, 3)  # two colour halves plus noise: structure for the features to show
        a[:, 56:] = rng.randint(0, 255, 3)
        a = np.clip(a + rng.randint(0, 40, a.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f'im{i}.png'))
        Image.fromarray(a).save(paths[-1])
    return paths


def _reference_maps(model_name: str, taps: list[str], paths: list[str], size: int) -> dict[str, torch.Tensor]:
    """The taps through timm's public features_only API (same seeded random weights as the command)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(model_name, features_only=True, out_indices=tuple(taps)).eval()
    x = torch.stack([load_image(p, size) for p in paths])
    with torch.no_grad():
        return dict(zip(taps, model(x)))


def _independent_pca(maps: torch.Tensor) -> np.ndarray:
    """sklearn-style PCA by SVD in numpy (components' largest loading positive), min-max scaled jointly: (N,h,w,3)."""
    n, c, h, w = maps.shape
    x = maps.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    vt = vt[:3]
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    p = x @ vt.T
    p = (p - p.min(0)) / (p.max(0) - p.min(0))
    rgb = np.zeros((p.shape[0], 3))
    rgb[:, :p.shape[1]] = p
    return (rgb * 255).reshape(n, h, w, 3)


def _tile_cells(sheet: np.ndarray, k: int, i: int, cols: int, n: int, tile: int, h: int, w: int) -> np.ndarray:
    """The (h, w, 3) cell colours of tap k, image i, read at each cell's centre in the sheet."""
    left, top = ins.tile_box(k, i, cols, n, tile)
    ys = top + ((np.arange(h) + 0.5) * tile / h).astype(int)
    xs = left + ((np.arange(w) + 0.5) * tile / w).astype(int)
    return sheet[np.ix_(ys, xs)].astype(float)


@pytest.mark.parametrize('model_name,taps', [
    ('test_cleandift', ['down-level0-repeat0-vit-block0-self-map', 'us9', 'up-level1-repeat1-vit-block0-cross-q']),
    ('test_pixart', ['vit-block0-self-k', 'vit-block1-ffn-inner']),
    ('test_flux', ['vit-block0-attn-out', 'vit-block2-q']),
    ('test_cleandift_dinov2', ['fused', 'dino', 'us5']),  # a fused model: its feature_info entries are its taps
])
def test_tiles_are_the_joint_pca_of_each_tap(model_name, taps, images, tmp_path):
    out = tmp_path / 'sheet.png'
    assert cli.main(['inspect', *images, '--model', model_name, '--random-weights', '--taps', *taps, '--out', str(out),
                     '--device', 'cpu', '--tile', '64', '--cols', '2']) == 0
    sheet = np.asarray(Image.open(out).convert('RGB'))
    size = timm.get_pretrained_cfg(model_name).input_size[-1]
    ref = _reference_maps(model_name, taps, images, size)
    order = ins.select_taps(_meta(model_name), taps)  # the sheet lists taps in execution order
    for k, tap in enumerate(t.name for t in order):
        maps = ref[tap]
        n, c, h, w = maps.shape
        expected = _independent_pca(maps)
        for i in range(n):
            got = _tile_cells(sheet, k, i, 2, n, 64, h, w)
            assert np.abs(got - expected[i]).max() <= 1.0, (tap, i)
        assert expected.std() > 10  # the tap is not a constant picture: the comparison means something


def _meta(name: str):
    with torch.device('meta'):
        return timm.create_model(name)


def test_streamed_maps_equal_the_models_forward_and_each_tap_arrives_once():
    """stream_taps hands on the same (ensemble-averaged) maps as forward_intermediates, once each, in pass order."""
    taps = ['us6', 'up-level2-repeat0-vit-block0-self-q', 'mid', 'down-level1-repeat0-res-out']
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model('test_dift', ensemble=2).eval()
    x = torch.randn(2, 3, 128, 128).clamp(-1, 1)
    got: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad():
        expected = dict(zip(taps, model.forward_intermediates(x, indices=taps, intermediates_only=True)))
        model.stream_taps(x, model._resolve(taps), lambda name, m: got.append((name, m.clone())))
    seq = {t.name: t.seq for t in model.all_taps}
    assert [n for n, _ in got] == sorted(taps, key=seq.get)
    for name, m in got:
        torch.testing.assert_close(m, expected[name], msg=name)
    assert model.__dict__.get('_tap_sink') is None  # the sink is gone after the pass


def test_large_maps_are_reduced_to_the_grid_before_colouring():
    reducer = ins.TileReducer(ins.select_taps(_meta('test_cleandift'), ['us9']), grid=4)
    maps = torch.randn(2, 8, 16, 16)
    reducer('us9', maps)
    assert reducer.tiles['us9'].shape == (2, 4, 4, 3)
    np.testing.assert_allclose(reducer.tiles['us9'], _independent_pca(F.avg_pool2d(maps, 4)), atol=1)


def _direct_stats(maps: torch.Tensor) -> dict:
    """The statistics by explicit loops over positions and neighbour pairs (numpy)."""
    x = maps.double().numpy()
    n, c, h, w = x.shape
    neigh, glob, moran = [], [], []
    for b in range(n):
        v = x[b].reshape(c, -1).T
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        pairs = [(r * w + q, r * w + q + 1) for r in range(h) for q in range(w - 1)]
        pairs += [(r * w + q, (r + 1) * w + q) for r in range(h - 1) for q in range(w)]
        neigh.append(np.mean([u[i] @ u[j] for i, j in pairs]))
        sim = u @ u.T
        glob.append((sim.sum() - np.trace(sim)) / (h * w * (h * w - 1)))
        for ch in range(c):
            z = v[:, ch] - v[:, ch].mean()
            weights = np.zeros((h * w, h * w))
            for i, j in pairs:
                weights[i, j] = weights[j, i] = 1
            if z @ z > 1e-20:  # constant channels have no Moran's I
                moran.append(h * w / weights.sum() * (z @ weights @ z) / (z @ z))
    a = np.abs(x)
    chan_max = a.max(axis=(0, 2, 3))
    return dict(neighbour_cosine=np.mean(neigh), global_cosine=np.mean(glob), locality=np.mean(neigh) - np.mean(glob),
                morans_i=np.mean(moran) if moran else None, massive_ratio=a.max() / np.median(a),
                channel_max_ratio=chan_max.max() / np.median(chan_max), top_channel=int(chan_max.argmax()))


def test_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    smooth = F.interpolate(torch.randn(2, 5, 3, 4), size=(6, 7), mode='bilinear')  # spatially smooth: local
    smooth[:, 3] *= 40  # a massive channel
    noise = torch.randn(2, 5, 6, 7)
    for maps in (smooth, noise):
        got, want = ins.tap_stats(maps), _direct_stats(maps)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert ins.tap_stats(smooth)['locality'] > ins.tap_stats(noise)['locality'] + 0.2
    assert ins.tap_stats(smooth)['top_channel'] == 3 and ins.tap_stats(smooth)['channel_max_ratio'] > 10


def test_json_holds_the_statistics_of_every_tap(images, tmp_path):
    taps = ['us6', 'up-level1-repeat0-vit-block0-cross-map']
    js = tmp_path / 'stats.json'
    assert cli.main(['inspect', *images, '--model', 'test_cleandift', '--random-weights', '--taps', *taps,
                     '--out', str(tmp_path / 's.png'), '--json', str(js), '--device', 'cpu']) == 0
    report = json.loads(js.read_text())
    ref = _reference_maps('test_cleandift', taps, images, 128)
    assert set(report['taps']) == set(taps) and report['images'] == images
    for tap in taps:
        want = _direct_stats(ref[tap])
        entry = report['taps'][tap]
        assert entry['channels'] == ref[tap].shape[1] and entry['sheet'] == 's.png'
        for key in ('neighbour_cosine', 'global_cosine', 'massive_ratio', 'channel_max_ratio'):
            assert entry[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (tap, key)


def test_kmeans_tiles_are_a_converged_clustering(images, tmp_path):
    """Each cell's colour is a cluster; every feature vector is nearest to the mean of its own cluster (Lloyd's
    fixed point), checked on the independently computed maps."""
    out = tmp_path / 'k.png'
    assert cli.main(['inspect', *images, '--model', 'test_cleandift', '--random-weights', '--taps', 'us9', '--out',
                     str(out), '--mode', 'kmeans', '--clusters', '4', '--device', 'cpu', '--tile', '64']) == 0
    sheet = np.asarray(Image.open(out).convert('RGB'))
    maps = _reference_maps('test_cleandift', ['us9'], images, 128)['us9']
    n, c, h, w = maps.shape
    cells = np.stack([_tile_cells(sheet, 0, i, 8, n, 64, h, w) for i in range(n)]).reshape(-1, 3)
    palette = ins.PALETTE.astype(float)
    labels = np.abs(cells[:, None] - palette[None]).sum(2).argmin(1)
    assert np.abs(cells - palette[labels]).max() == 0 and len(set(labels)) == 4
    x = maps.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    centres = np.stack([x[labels == j].mean(0) for j in sorted(set(labels))])
    nearest = np.array(sorted(set(labels)))[((x[:, None] - centres[None]) ** 2).sum(2).argmin(1)]
    assert (nearest == labels).all()


def test_many_taps_go_to_several_sheets_with_an_index(images, tmp_path):
    out = tmp_path / 'all.png'
    assert cli.main(['inspect', images[0], '--model', 'test_cleandift', '--random-weights', '--taps', 'down-*',
                     '--out', str(out), '--per-sheet', '20', '--cols', '5', '--tile', '32', '--device', 'cpu']) == 0
    names = [t.name for t in ins.select_taps(_meta('test_cleandift'), ['down-*'])]
    sheets = sorted(tmp_path.glob('all-*.png'))
    assert len(names) > 40 and len(sheets) == -(-len(names) // 20) and not out.exists()
    index = json.loads((tmp_path / 'all-index.json').read_text())
    rows = index['taps']
    assert [r['tap'] for r in rows] == names and index['sheets'] == [p.name for p in sheets]
    assert rows[0]['sheet'] == sheets[0].name and rows[-1]['sheet'] == sheets[-1].name
    assert (rows[6]['line'], rows[6]['column']) == (2, 2)
    assert Image.open(sheets[0]).size == (6 * 34, 4 * (4 * 11 + 4 + 34))  # 5 taps + the input, 4 lines of one image


def test_select_taps_all_patterns_presets_and_names():
    model = _meta('test_cleandift')
    every = ins.select_taps(model, ['all'])
    assert len(every) == len(model.all_taps) and [t.seq for t in every] == sorted(t.seq for t in every)
    assert {t.name for t in ins.select_taps(model, ['*cross-q'])} == {t.name for t in model.all_taps
                                                                      if t.name.endswith('cross-q')}
    assert [t.name for t in ins.select_taps(model, ['pyramid', 'us6'])] == ['mid', 'us3', 'us6', 'us9']
    with pytest.raises(ValueError, match='matches no tap'):
        ins.select_taps(model, ['*nothing*'])


def test_bad_outputs_end_in_one_line_and_write_nothing(images, tmp_path, capsys):
    base = ['inspect', *images, '--model', 'test_cleandift', '--random-weights', '--taps', 'us6', '--device', 'cpu']
    assert cli.main([*base, '--out', images[0]]) == 2  # an input image (a .png)
    err = capsys.readouterr().err
    assert 'input images' in err and len(err.strip().splitlines()) == 1
    existing = tmp_path / 'old.png'
    existing.write_bytes(b'keep')
    assert cli.main([*base, '--out', str(existing)]) == 2
    assert existing.read_bytes() == b'keep' and 'exists' in capsys.readouterr().err
    assert cli.main([*base, '--out', str(tmp_path / 'a.png'), '--json', images[1]]) == 2
    assert cli.main([*base, '--out', str(tmp_path / 'a.jpg')]) == 2
    assert cli.main([*base[:-4], '--taps', 'us99', '--device', 'cpu', '--out', str(tmp_path / 'b.png')]) == 2
    assert 'Unknown tap' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['old.png']


def test_token_heat_is_one_tokens_channel_scaled_jointly():
    """A per-token tile is that token's channel of the (grid-reduced) cross-attention map, min-max over all images."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 77, 12, 10, generator=gen)
    reducer = ins.TileReducer([SimpleNamespace(name='x-cross-map')], grid=64, stats=False, tokens=(0, 5))
    reducer('x-cross-map', maps)
    assert set(reducer.tiles) == {'x-cross-map', 'x-cross-map-token0', 'x-cross-map-token5'}
    for t in (0, 5):
        ch = maps[:, t].double().numpy()
        expected = np.round((ch - ch.min()) / (ch.max() - ch.min()) * 255)
        got = reducer.tiles[f'x-cross-map-token{t}']
        assert got.shape == (2, 12, 10, 3) and (got[..., 0] == got[..., 2]).all()
        assert np.abs(got[..., 0].astype(float) - expected).max() <= 1
    assert not np.array_equal(reducer.tiles['x-cross-map-token0'], reducer.tiles['x-cross-map-token5'])


def test_tokens_add_a_tile_per_token_of_each_cross_map(images, tmp_path, capsys):
    tap = 'down-level0-repeat0-vit-block0-cross-map'
    out = tmp_path / 'tok.png'
    args = ['inspect', *images, '--model', 'test_cleandift', '--random-weights', '--device', 'cpu', '--tile', '32',
            '--out', str(out)]
    assert cli.main([*args, '--taps', tap, 'us9', '--tokens', '0', '3', '--per-sheet', '2']) == 0
    index = json.loads((tmp_path / 'tok-index.json').read_text())
    assert [r['tap'] for r in index['taps']] == [tap, f'{tap}-token0', f'{tap}-token3', 'us9']
    assert cli.main([*args, '--taps', tap, '--tokens', '77', '--out', str(tmp_path / 'bad.png')]) == 2
    assert '77 prompt tokens' in capsys.readouterr().err
    assert cli.main([*args, '--taps', 'us9', '--tokens', '1', '--out', str(tmp_path / 'bad.png')]) == 2
    assert 'cross-map' in capsys.readouterr().err and not (tmp_path / 'bad.png').exists()
