"""`diffbackbone train corres` and `eval spair --head` (Meng et al.'s trained correspondence): our steps against a
re-implementation of theirs (`task-corres.py`, `correspondence_utils.py`, `AggregationNetwork`) written here, resume
exactness, the CLI end to end on a tiny model and a synthetic SPair layout in their split format, and bad inputs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffbackbone import cli
from diffbackbone.train import corres


# ---- their steps, written out as their code runs them ---------------------------------------------------------------
def _their_rescale(points, old, new):
    return np.multiply(points, np.array([new[1] / old[1], new[0] / old[0]]))


def _their_idxs(points, load_size):
    y = np.clip(points[:, 0], 0, load_size[1] - 1)
    x = np.clip(points[:, 1], 0, load_size[0] - 1)
    return load_size[1] * np.round(y) + np.round(x)


def _their_flat_norm(f):
    b, c = f.shape[:2]
    f = f.view(b, c, -1).permute(0, 2, 1)
    return f / torch.linalg.norm(f, dim=-1)[:, :, None]


def _their_loss(img1, img2, src_pts, trg_pts, output_size):
    scale = torch.ones([]) * np.log(1 / 0.07)
    a, b = _their_flat_norm(img1), _their_flat_norm(img2)
    src_logits = scale.exp() * torch.matmul(a, b.permute(0, 2, 1))
    trg_logits = scale.exp() * torch.matmul(b, a.permute(0, 2, 1))
    si = torch.from_numpy(_their_idxs(src_pts, output_size)).long()
    ti = torch.from_numpy(_their_idxs(trg_pts, output_size)).long()
    return (F.cross_entropy(src_logits[0, si], ti) + F.cross_entropy(trg_logits[0, ti], si)) / 2


def _their_nn(img1, img2, src_pts, load_size):
    img1 = F.interpolate(img1, load_size, mode='bilinear')
    img2 = F.interpolate(img2, load_size, mode='bilinear')
    si = torch.from_numpy(_their_idxs(src_pts, load_size)).long()
    a = _their_flat_norm(img1)[:, si, :]
    a = a / torch.linalg.norm(a, dim=-1)[:, :, None]
    sims = torch.matmul(a, _their_flat_norm(img2).permute(0, 2, 1))
    n = int(math.sqrt(sims.shape[-1]))
    p = sims.argmax(dim=-1)
    return torch.stack([p // n, p % n], dim=-1)[0].numpy()


def _their_pck(pred, trg, load_size, bbox=None):
    d = np.linalg.norm(pred - trg, axis=-1)
    if bbox is None:
        return d <= 0.1 * max(load_size)
    left, top, right, bottom = bbox
    return d <= 0.1 * max(right - left, bottom - top)


def test_loss_conv_and_adamw_step_equal_theirs():
    g = torch.Generator().manual_seed(0)
    c, grid = 6, (16, 16)
    f1, f2 = torch.randn(c, 16, 16, generator=g), torch.randn(c, 16, 16, generator=g)
    src = np.array([[3.4, 7.5], [15.9, 0.2], [8.5, 8.5]])  # (y, x) on the grid, with halves to round
    trg = np.array([[1.0, 2.5], [12.2, 14.7], [0.5, 15.0]])
    torch.manual_seed(3)
    ours = corres.CorresHead(c, c // 2)
    theirs = torch.nn.Conv2d(c, c // 2, kernel_size=3, stride=1, padding=1, bias=False)
    theirs.load_state_dict({'weight': ours.out.weight.detach().clone()})
    opt_o = torch.optim.AdamW([{'params': ours.parameters(), 'lr': 5e-4}], weight_decay=0.01)
    opt_t = torch.optim.AdamW([{'params': theirs.parameters(), 'lr': 5e-4}], weight_decay=0.01)
    for _ in range(2):
        ref = _their_loss(theirs(f1)[None], theirs(f2)[None], src, trg, grid)  # their unbatched conv on (C, H, W)
        opt_t.zero_grad()
        ref.backward()
        opt_t.step()
        si = torch.from_numpy(corres.points_to_idxs(src, grid))
        ti = torch.from_numpy(corres.points_to_idxs(trg, grid))
        opt_o.zero_grad()
        loss = corres.clip_loss(ours(f1[None])[0], ours(f2[None])[0], si, ti)
        loss.backward()
        opt_o.step()
        torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ours.out.weight, theirs.weight)


def test_nn_matches_and_pck_equal_theirs():
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(1, 8, 12, 12, generator=g), torch.randn(1, 8, 12, 12, generator=g)
    rng = np.random.default_rng(0)
    src_orig, trg_orig = rng.uniform(0, 300, (7, 2)), rng.uniform(0, 200, (7, 2))  # (x, y) in original pixels
    src_size, trg_size, bbox = (300, 250), (200, 180), (20, 10, 150, 170)
    load = (512, 512)
    src = _their_rescale(np.flip(src_orig, 1), src_size, load)
    trg = _their_rescale(np.flip(trg_orig, 1), trg_size, load)
    ref = _their_rescale(_their_nn(f1, f2, src, load), load, trg_size)
    pred = corres.rescale_points(corres.nn_matches(f1[0], f2[0], src), load, trg_size)
    np.testing.assert_allclose(pred, ref)
    trg_back = _their_rescale(trg, load, trg_size)
    pair = corres.CorresPair('a', 'b', 'cat', src_size, trg_size, src_orig, trg_orig, bbox)
    by_img, by_bbox = corres.pair_pck(pair, f1[0], f2[0])
    np.testing.assert_array_equal(by_img, _their_pck(ref, trg_back, trg_size))
    np.testing.assert_array_equal(by_bbox, _their_pck(ref, trg_back, trg_size, bbox))


def test_epoch_order_is_their_permutation():
    anns = [dict(i=i) for i in range(40)]
    cfg = corres.CorresConfig(epochs=2, pairs_per_epoch=15, seed=7)
    np.random.seed(7)
    theirs = [[a['i'] for a in np.random.permutation(anns)[:15]] for _ in range(2)]
    assert [list(o) for o in corres.epoch_orders(len(anns), cfg)] == theirs


# ---- a planted synthetic set: each image's features put a one-hot code at each keypoint --------------------------
def _planted_set(n_pairs=8, c=24, seed=0):
    rng = np.random.default_rng(seed)
    feats, pairs = {}, []
    for k in range(n_pairs):
        names = (f's{k}.jpg', f't{k}.jpg')
        sizes = ((200, 160), (180, 220))
        pts = [rng.uniform(10, 150, (4, 2)), rng.uniform(10, 150, (4, 2))]
        for name, size, p in zip(names, sizes, pts):
            f = torch.randn(c, 128, 128) * 0.3
            for j, (x, y) in enumerate(p):
                gx, gy = int(x * 128 / size[0]), int(y * 128 / size[1])
                f[j, max(gy - 3, 0):gy + 4, max(gx - 3, 0):gx + 4] += 3.0
            feats[name] = f
        pairs.append(corres.CorresPair(*names, 'cat', *sizes, pts[0], pts[1], (0, 0, 180, 220)))
    return feats, pairs


def _train(tmp, feats, pairs, **kw):
    torch.manual_seed(0)
    head = corres.CorresHead(24, 24)
    cfg = corres.CorresConfig(epochs=2, pairs_per_epoch=6, val_every=2, log_every=1, seed=0)
    result = corres.train_corres(head, feats.__getitem__, pairs, pairs[:3], cfg, tmp, dict(model='x'),
                                 progress=False, **kw)
    return head, result


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    feats, pairs = _planted_set()
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    whole, _ = _train(tmp_path / 'a', feats, pairs)
    _train(tmp_path / 'b', feats, pairs, stop_after=7)  # killed after step 7: its last checkpoint is step 6
    assert sorted(p.name for p in (tmp_path / 'b').glob('checkpoint_step_*.pt')) == ['checkpoint_step_4.pt',
                                                                                     'checkpoint_step_6.pt']
    resumed, result = _train(tmp_path / 'b', feats, pairs, resume=True)
    torch.testing.assert_close(resumed.out.weight, whole.out.weight, rtol=0, atol=0)
    head, ckpt = corres.load_head(tmp_path / 'b' / 'last.pt')
    torch.testing.assert_close(head.out.weight, whole.out.weight, rtol=0, atol=0)
    assert result['best']['step'] is not None


# ---- the CLI on a tiny model ----------------------------------------------------------------------------------------
def _dataset(root, n=3):
    """JPEGImages/<category>/ images and their split files (Diffusion Hyperfeatures' format)."""
    rng = np.random.default_rng(0)
    cat = root / 'cat'
    cat.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (60 + 8 * i, 70, 3), dtype=np.uint8)).save(cat / f'{i}.jpg')
    def pair(a, b):
        return dict(source_path=f'cat/{a}.jpg', target_path=f'cat/{b}.jpg', category='cat',
                    source_points=[[5, 6], [40, 30], [60, 50]], target_points=[[7, 9], [33, 41], [12, 20]],
                    target_bounding_box=[2, 3, 60, 55])
    (root / 'spair_71k_train.json').write_text(json.dumps([pair(0, 1), pair(1, 2), pair(2, 0)]))
    (root / 'spair_71k_val-360.json').write_text(json.dumps([pair(0, 2), pair(1, 0)]))
    return root


TINY = ['--model', 'test_dift', '--random-weights', '--taps', 'us6', 'us9', '--size', '64', '--device', 'cpu',
        '--workers', '0']


def test_cli_end_to_end(tmp_path, capsys):
    data = _dataset(tmp_path / 'JPEGImages')
    store, out = tmp_path / 'store', tmp_path / 'run'
    assert cli.main(['train', 'corres', '--data', str(data), '--store', str(store), '--out', str(out),
                     '--epochs', '2', '--pairs-per-epoch', '2', '--val-every', '2', '--no-progress', *TINY]) == 0
    printed = capsys.readouterr().out
    assert 'best validation PCK@0.1' in printed
    assert {'last.pt', 'best.pt', 'log.jsonl', 'checkpoint_step_2.pt'} <= {p.name for p in out.iterdir()}
    head, ckpt = corres.load_head(out / 'best.pt')
    assert head.out.weight.shape == (64, 64, 3, 3) and ckpt['meta']['model'] == 'test_dift'
    best = json.loads([line for line in (out / 'log.jsonl').read_text().splitlines() if 'validation' in line][-1])
    res = tmp_path / 'r.json'
    assert cli.main(['eval', 'spair', '--data', str(data), '--model', 'test_dift', '--head', str(out / 'best.pt'),
                     '--split', str(data / 'spair_71k_val-360.json'), '--store', str(store), '--json', str(res),
                     '--device', 'cpu']) == 0
    got = json.loads(res.read_text())
    assert got['pck_bbox'] == pytest.approx(best['validation']['pck_bbox'])
    assert cli.main(['train', 'corres', '--algorithm', 'nn', '--data', str(data), '--store', str(store),
                     '--no-progress', *TINY]) == 0
    assert 'nn (64 channels): PCK@0.1' in capsys.readouterr().out


def test_bad_inputs_one_error_line(tmp_path, capsys):
    data = _dataset(tmp_path / 'JPEGImages')
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'pairs': []}))
    args = ['train', 'corres', '--algorithm', 'nn', '--data', str(data), '--store', str(tmp_path / 's'), *TINY]
    assert cli.main([*args, '--val-split', str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'split file' in err
    missing = tmp_path / 'missing.json'
    missing.write_text(json.dumps([dict(source_path='cat/9.jpg', target_path='cat/0.jpg', category='cat',
                                        source_points=[[1, 1]], target_points=[[1, 1]],
                                        target_bounding_box=[0, 0, 5, 5])]))
    assert cli.main([*args, '--val-split', str(missing)]) == 2
    assert 'no such image' in capsys.readouterr().err
    assert not (tmp_path / 's').exists() or not any((tmp_path / 's').iterdir())
    assert cli.main(['train', 'corres', '--data', str(data), '--store', str(tmp_path / 's'), *TINY]) == 2
    assert 'needs --out' in capsys.readouterr().err
    head = corres.CorresHead(4, 4)
    corres.save_head(tmp_path / 'h.pt', head, dict(model='test_sdxl', taps=['us6'], size=None, model_kwargs={}))
    assert cli.main(['eval', 'spair', '--data', str(data), '--model', 'test_dift', '--head', str(tmp_path / 'h.pt'),
                     '--split', str(data / 'spair_71k_val-360.json'), '--store', str(tmp_path / 's2'),
                     '--device', 'cpu']) == 2
    assert 'is a head for test_sdxl' in capsys.readouterr().err
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    assert cli.main(['eval', 'spair', '--data', str(data), '--model', 'test_dift', '--head', str(tmp_path / 'junk.pt'),
                     '--split', str(data / 'spair_71k_val-360.json'), '--store', str(tmp_path / 's2')]) == 2
    assert 'not a readable head checkpoint' in capsys.readouterr().err


def _distracted(n_pairs, seed, c=16, k=4):
    """Pairs whose keypoint codes (channels 0..k-1, weak) hide under strong per-image noise (the other channels):
    nearest neighbours fail, a head that learns to drop the noise channels succeeds."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    feats, pairs = {}, []
    for p in range(n_pairs):
        names = (f's{seed}_{p}', f't{seed}_{p}')
        pts = [rng.uniform(8, 120, (k, 2)), rng.uniform(8, 120, (k, 2))]
        for name, pt in zip(names, pts):
            f = torch.zeros(c, 128, 128)
            f[k:] = torch.randn(c - k, 128, 128, generator=g) * 2
            for j, (x, y) in enumerate(pt):
                f[j, max(int(y) - 4, 0):int(y) + 5, max(int(x) - 4, 0):int(x) + 5] += 1.0
            feats[name] = f
        pairs.append(corres.CorresPair(*names, 'cat', (128, 128), (128, 128), pts[0], pts[1], (0, 0, 128, 128)))
    return feats, pairs


def test_training_lifts_pck_well_above_nn(tmp_path):
    feats, train = _distracted(20, 0)
    val_feats, val = _distracted(4, 1)
    feats.update(val_feats)
    nn = corres.validate(corres.CorresHead(16, None), feats.__getitem__, val)
    torch.manual_seed(0)
    head = corres.CorresHead(16, 16)
    cfg = corres.CorresConfig(epochs=2, pairs_per_epoch=20, lr=2e-2, val_every=39, log_every=100)
    best = corres.train_corres(head, feats.__getitem__, train, val, cfg, tmp_path, {}, progress=False)['best']
    assert nn['pck_bbox'] < 20 and best['pck_bbox'] > 80, (nn, best)


def test_protocol_gdf_scores_as_their_validate(tmp_path, capsys):
    """`eval spair --protocol gdf` (no head: their nearest neighbours) on the store's taps: PCK equals their validate
    re-done here (taps bilinear to 128 x 128 and concatenated, points at 512 x 512, `find_nn_source_correspondences`,
    back to the target size, `compute_pck` pooled over the keypoints)."""
    from diffbackbone.data.store import FeatureStore

    data = _dataset(tmp_path / 'JPEGImages')
    store, res = tmp_path / 'store', tmp_path / 'r.json'
    split = data / 'spair_71k_train.json'
    assert cli.main(['eval', 'spair', '--protocol', 'gdf', '--data', str(data), '--split', str(split), '--store',
                     str(store), '--json', str(res), *TINY[:-2]]) == 0, capsys.readouterr().err  # no --workers
    capsys.readouterr()
    got = json.loads(res.read_text())
    assert (got['protocol'], got['head'], got['taps'], got['size']) == ('gdf', 'nn', ['us6', 'us9'], 64)
    fs = FeatureStore(store)
    by_img, by_bbox = [], []
    for ann in json.loads(split.read_text()):
        feats = []
        for key in ('source_path', 'target_path'):
            maps = fs.get(str((data / ann[key]).resolve()), ['us6', 'us9'])
            feats.append(torch.cat([F.interpolate(maps[t][None].float(), (128, 128), mode='bilinear')
                                    for t in ('us6', 'us9')], 1))
        src_size, trg_size = (Image.open(data / ann[k]).size for k in ('source_path', 'target_path'))
        src = _their_rescale(np.flip(np.array(ann['source_points'], float), 1), src_size, (512, 512))
        trg = _their_rescale(np.flip(np.array(ann['target_points'], float), 1), trg_size, (512, 512))
        pred = _their_rescale(_their_nn(feats[0], feats[1], src, (512, 512)), (512, 512), trg_size)
        trg = _their_rescale(trg, (512, 512), trg_size)
        by_img.append(_their_pck(pred, trg, trg_size))
        by_bbox.append(_their_pck(pred, trg, trg_size, ann['target_bounding_box']))
    assert got['pck_img'] == pytest.approx(100 * np.concatenate(by_img).mean())
    assert got['pck_bbox'] == pytest.approx(100 * np.concatenate(by_bbox).mean())
    assert got['points'] == 9 and 0 < got['pck_img']  # not a vacuous comparison
    for extra, message in ((['--protocol', 'dift', '--head', 'nn'], '--head: options of --protocol gdf'),
                           (['--protocol', 'gdf', '--cache', str(tmp_path / 'c')], '--cache: options of --protocol '
                                                                                    'dift'),
                           (['--protocol', 'gdf'], '--head needs --split FILE')):
        assert cli.main(['eval', 'spair', '--data', str(data), '--model', 'test_dift', '--random-weights',
                         *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
