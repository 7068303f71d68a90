"""`diffbackbone eval davis`: J and F on planted masks counted by hand, the propagation against a transcription of
DIFT's / DINO's `label_propagation`, a synthetic moving-squares video through the real command (colour features:
the masks follow the squares), the command end to end on a tiny model (masks written, resume from the cache), bad
inputs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from diffbackbone import cli
from diffbackbone.evals import davis, davis_metrics as dm
from diffbackbone.evals.davis_data import DavisError, load_davis


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _square(shape, top, left, size=10):
    m = np.zeros(shape, dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def test_j_and_f_by_hand():
    gt = _square((20, 20), 5, 5)
    # bound_pix = ceil(0.008 * hypot(20, 20)) = 1: a plus-shaped tolerance
    assert (dm.region_similarity(gt, gt), dm.boundary_f(gt, gt)) == (1.0, 1.0)
    shifted = _square((20, 20), 5, 6)  # one pixel right: every boundary pixel within the tolerance
    assert dm.region_similarity(gt, shifted) == pytest.approx(90 / 110)
    assert dm.boundary_f(gt, shifted) == pytest.approx(1.0)
    # Left half (cols 5..9). Boundary maps (pixels unlike their right / lower / lower-right neighbour): the square's
    # 40 = row 14 + col 14 inside (19) + row 4 cols 4..14 + col 4 rows 5..14 outside (21); the half's 30. Matches
    # within the plus: 23 of the half's (not col 9 rows 6..12) and 23 of the square's -> F = 2 * 23 / (30 + 40).
    half = gt.copy()
    half[:, 10:] = False
    assert dm.boundary_map(gt).sum() == 40 and dm.boundary_map(half).sum() == 30
    assert dm.region_similarity(gt, half) == pytest.approx(0.5)
    assert dm.boundary_f(gt, half) == pytest.approx(46 / 70)
    empty = np.zeros_like(gt)
    assert (dm.region_similarity(gt, empty), dm.boundary_f(gt, empty)) == (0.0, 0.0)
    assert (dm.region_similarity(empty, empty), dm.boundary_f(empty, empty)) == (1.0, 1.0)
    assert dm.disk(2).sum() == 13 and dm.disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_statistics_by_hand():
    # ids = round(linspace(1, 4, 5) + 1e-10) - 1 = [0, 1, 2, 2, 3]: bins [1, 1], [1, 0], [0], [0, 0] -> decay 1 - 0
    assert dm.statistics([1.0, 1.0, 0.0, 0.0]) == pytest.approx((0.5, 0.5, 1.0))
    # ids = round([1, 1.5, 2, 2.5, 3] + 1e-10) - 1 = [0, 1, 1, 2, 2]: first bin [0.2, 0.6], last [0.9]
    assert dm.statistics([0.2, 0.6, 0.9]) == pytest.approx((17 / 30, 2 / 3, 0.4 - 0.9))


def test_sequence_scores_by_hand():
    """4 frames, 2 objects; frames 1 and 2 scored. Object 1: exact, except that in frame 2 the prediction also covers a
    10x2 void strip (void counts as background): J = 100 / 120 there. Object 2: missed in frame 1, exact in frame 2."""
    shape = (30, 30)
    gt, pred = [], []
    for t in range(4):
        g = np.zeros(shape, np.uint8)
        g[_square(shape, 2, 2 + t)] = 1
        g[_square(shape, 15, 15)] = 2
        p = g.copy()
        if t == 1:
            p[p == 2] = 0
        if t == 2:
            g[2:12, 12 + 2:14 + 2] = 255
            p[2:12, 12 + 2:14 + 2] = 1
        gt.append(g)
        pred.append(p)
    j, f = dm.evaluate_sequence(gt, pred)
    np.testing.assert_allclose(j, [[1.0, 100 / 120], [0.0, 1.0]])
    assert f[1].tolist() == [0.0, 1.0] and f[0, 0] == 1.0 and 0 < f[0, 1] < 1
    s = dm.summarise({'seq': (j, f)})
    assert s['J-Mean'] == pytest.approx(100 * (1 + 100 / 120 + 0 + 1) / 4)
    assert s['J&F-Mean'] == pytest.approx((s['J-Mean'] + s['F-Mean']) / 2)
    assert s['J-Recall'] == pytest.approx(75.0)  # 1, 0.83 above 0.5; 0 below, 1 above
    # decay of two values: bins [v0], [v0, v1], [v1], [v1] -> v0 - v1
    assert s['J-Decay'] == pytest.approx(100 * ((1 - 100 / 120) + (0 - 1)) / 2)
    assert set(s['per_object']) == {'seq_1', 'seq_2'} and s['per_object']['seq_2']['J'] == pytest.approx(50.0)
    with pytest.raises(ValueError, match='object id 3'):
        dm.evaluate_sequence(gt, [p if i != 1 else np.full(shape, 3, np.uint8) for i, p in enumerate(pred)])


def _their_restrict_neighborhood(h: int, w: int, r: int) -> torch.Tensor:
    """DINO's `restrict_neighborhood` (DIFT and DiTF use it as is): (hw, hw), 1 where two positions are within r."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * r + 1):
                for q in range(2 * r + 1):
                    if 0 <= i - r + p < h and 0 <= j - r + q < w:
                        mask[i, j, i - r + p, j - r + q] = 1
    return mask.reshape(h * w, h * w)


def _dift_label_propagation(feat_tar, feat_sources, segs, h, w, temperature, topk, size_mask_neighborhood):
    """DIFT's / DINO's label_propagation steps (feat_tar (hw, C); feat_sources (n, C, hw); segs (n, K, h, w))."""
    ncontext = feat_sources.shape[0]
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / temperature)
    if size_mask_neighborhood > 0:
        mask = _their_restrict_neighborhood(h, w, size_mask_neighborhood)
        aff *= mask.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    n, c, h, w = segs.shape
    segs = segs.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T
    return torch.mm(segs, aff).reshape(c, h, w)


@pytest.mark.parametrize('radius, chunk', [(2, 2 ** 26), (2, 40), (0, 2 ** 26)])
def test_propagate_matches_dift(monkeypatch, radius, chunk):
    monkeypatch.setattr(davis, '_CHUNK_ELEMENTS', chunk)  # 40: one target position per chunk
    g = torch.Generator().manual_seed(0)
    n, c, h, w, k = 3, 6, 5, 7, 3
    sources, target = torch.randn(n, c, h, w, generator=g), torch.randn(c, h, w, generator=g)
    segs = torch.rand(n, k, h, w, generator=g)
    got = davis.propagate(target, sources, segs, temperature=0.2, topk=5, neighborhood=radius)
    want = _dift_label_propagation(target.reshape(c, -1).T, sources.reshape(n, c, -1), segs, h, w, 0.2, 5, radius)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_input_size_is_dift_read_frame():
    assert davis.input_size((854, 480)) == (832, 480)  # DAVIS 480p landscape
    assert davis.input_size((480, 854)) == (480, 832)
    assert davis.input_size((910, 480)) == (896, 480)


FW, FH = 128, 96
RED, GREEN = (230, 30, 30), (30, 220, 40)


def _write_sequence(root: Path, name: str, objects: list[tuple], frames: int):
    """`objects`: (colour, (x0, y0), (dx, dy), side) squares on a dark background; masks: ids 1.. in that order."""
    img_dir, ann_dir = root / 'JPEGImages' / '480p' / name, root / 'Annotations' / '480p' / name
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for t in range(frames):
        img = np.full((FH, FW, 3), 20, np.uint8)
        lab = np.zeros((FH, FW), np.uint8)
        for i, (colour, (x0, y0), (dx, dy), side) in enumerate(objects, start=1):
            x, y = x0 + dx * t, y0 + dy * t
            img[y:y + side, x:x + side] = colour
            lab[y:y + side, x:x + side] = i
        Image.fromarray(img).save(img_dir / f'{t:05d}.jpg', quality=95)
        m = Image.fromarray(lab, 'P')
        m.putpalette(palette)
        m.save(ann_dir / f'{t:05d}.png')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('davis') / 'DAVIS'
    _write_sequence(root, 'squares', [(RED, (8, 16), (5, 0), 24), (GREEN, (90, 10), (-3, 4), 20)], frames=7)
    _write_sequence(root, 'still', [(GREEN, (40, 30), (0, 0), 30)], frames=4)
    (root / 'ImageSets' / '2017').mkdir(parents=True)
    (root / 'ImageSets' / '2017' / 'val.txt').write_text('squares\nstill\n')
    return root


class ColourModel(nn.Module):
    """Features that make propagation easy: one-hot (background, red, green) per pixel, average-pooled by 4."""

    pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x):
        rgb = x * 0.5 + 0.5
        red = (rgb[:, 0] > 0.5) & (rgb[:, 1] < 0.5)
        green = (rgb[:, 1] > 0.5) & (rgb[:, 0] < 0.5)
        onehot = torch.stack([~(red | green), red, green], dim=1).float()
        return [F.avg_pool2d(onehot, 4)]


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _iou(a, b):
    return (a & b).sum() / (a | b).sum() if (a | b).any() else 1.0


def test_moving_squares_follow(dataset, tmp_path, monkeypatch, capsys):
    """The real command with colour features: the masks follow both squares; the reported J equals the IoU of the
    written masks, recomputed here."""
    import diffbackbone.correspondence as corr

    monkeypatch.setattr(corr, 'load_tap_model', lambda *a, **k: ColourModel())
    out, masks = tmp_path / 'r.json', tmp_path / 'masks'
    rc, printed, err = _run(['eval', 'davis', '--data', str(dataset), '--random-weights', '--short-side', '96',
                             '--json', str(out), '--masks', str(masks)], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result['num_objects'] == 3 and set(result['per_sequence']) == {'squares', 'still'}
    assert result['model_kwargs'] == {'timestep': 51} and result['topk'] == 15 and result['n_last_frames'] == 28
    assert result['J-Mean'] > 85 and result['F-Mean'] > 90, result
    for seq, n in (('squares', 7), ('still', 4)):
        files = sorted((masks / seq).glob('*.png'))
        assert [f.stem for f in files] == [f'{t:05d}' for t in range(n)]
        pred = [np.array(Image.open(f)) for f in files]
        gt = [np.array(Image.open(dataset / 'Annotations' / '480p' / seq / f.name)) for f in files]
        assert Image.open(files[1]).mode == 'P'
        for obj in range(1, int(gt[0].max()) + 1):
            want = 100 * np.mean([_iou(gt[t] == obj, pred[t] == obj) for t in range(1, n - 1)])
            assert result['per_object'][f'{seq}_{obj}']['J'] == pytest.approx(want)
    assert not list(masks.glob('.*'))  # no temporary folder left
    assert 'squares' in printed and f'{result["J&F-Mean"]:.2f}' in printed


def test_cli_tiny_model_end_to_end_and_resume(dataset, tmp_path, capsys):
    cache, out, masks = tmp_path / 'cache', tmp_path / 'r.json', tmp_path / 'masks'
    argv = ['eval', 'davis', '--data', str(dataset), '--model', 'test_dift', '--random-weights', '--short-side', '64',
            '--batch-size', '4', '--cache', str(cache), '--json', str(out), '--masks', str(masks), '--device', 'cpu',
            '--topk', '5', '--neighborhood', '3']
    rc, printed, err = _run(argv, capsys)
    assert rc == 0, err
    first = json.loads(out.read_text())
    assert first['num_objects'] == 3 and 0 <= first['J&F-Mean'] <= 100
    assert '11 frames run' in printed
    files = sorted(cache.rglob('*.safetensors'))
    assert len(files) == 11 and not list(cache.rglob('.*.tmp'))
    assert len(list((masks / 'squares').glob('*.png'))) == 7

    files[3].unlink()  # as if killed before that frame
    rc, printed, _ = _run(argv, capsys)
    assert rc == 0 and '1 frames run' in printed
    assert json.loads(out.read_text()) == first

    rc, printed, _ = _run(argv + ['--sequences', 'still', '--timestep', '7'], capsys)
    assert rc == 0 and '4 frames run' in printed
    assert json.loads(out.read_text())['model_kwargs'] == {'timestep': 7}


@pytest.mark.parametrize('breakage, message', [
    ('mask', 'needs one <frame>.png mask per frame'),
    ('size', 'pixels, but the frames are 128x96'),
    ('empty', "first frame's mask has no object"),
    ('rgb', 'DAVIS masks are indexed (P) or greyscale (L)'),
    ('short', 'needs at least 3'),
])
def test_bad_data(dataset, tmp_path, capsys, breakage, message):
    import shutil

    data = tmp_path / 'DAVIS'
    shutil.copytree(dataset, data)
    ann = data / 'Annotations' / '480p' / 'still'
    if breakage == 'mask':
        culprit = ann
        (ann / '00002.png').unlink()
    elif breakage == 'size':
        culprit = ann / '00001.png'
        Image.new('P', (100, 96)).save(culprit)
    elif breakage == 'empty':
        culprit = ann / '00000.png'
        Image.new('P', (FW, FH)).save(culprit)
    elif breakage == 'rgb':
        culprit = ann / '00003.png'
        Image.new('RGB', (FW, FH)).save(culprit)
    else:
        culprit = data / 'JPEGImages' / '480p' / 'still'
        for t in (2, 3):
            (culprit / f'{t:05d}.jpg').unlink()
            (ann / f'{t:05d}.png').unlink()
    cache = tmp_path / 'cache'
    rc, _, err = _run(['eval', 'davis', '--data', str(data), '--model', 'test_dift', '--random-weights',
                       '--cache', str(cache)], capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert str(culprit) in err and message in err
    assert not cache.exists()


def test_bad_options(dataset, tmp_path, capsys):
    base = ['eval', 'davis', '--model', 'test_dift', '--random-weights']
    rc, _, err = _run(base + ['--data', str(tmp_path / 'nothing')], capsys)
    assert rc == 2 and 'nothing: no such folder' in err
    rc, _, err = _run(base + ['--data', str(dataset), '--split', 'test'], capsys)
    assert rc == 2 and 'test.txt: no such file' in err
    rc, _, err = _run(base + ['--data', str(dataset), '--sequences', 'dogs'], capsys)
    assert rc == 2 and '--sequences dogs: not in' in err
    with pytest.raises(SystemExit) as info:  # an argparse type: one usage error line
        cli.main(base + ['--data', str(dataset), '--temperature', '0'])
    assert info.value.code == 2 and 'argument --temperature: must be positive' in capsys.readouterr().err
    rc, _, err = _run(base + ['--data', str(dataset), '--masks', str(dataset / 'Annotations')], capsys)
    assert rc == 2 and 'inside the input folder' in err
    assert [s.name for s in load_davis(dataset, limit=1)] == ['squares']
    with pytest.raises(DavisError, match='--limit'):
        load_davis(dataset, limit=0)
    assert math.isclose(load_davis(dataset)[1].num_objects, 1)


def test_noise_is_drawn_per_frame_as_dift(dataset):
    """DIFT's `SDFeaturizer.forward` draws fresh noise for every frame (issue #27.9): frame k gets the draw of seed
    noise_seed + k (the model run alone on it with that seed); `--same-noise` keeps one draw for every frame. The
    `still` sequence's frames are identical images, so only the noise tells them apart."""
    import timm

    from diffbackbone.evals.davis import FrameFeatures, input_size, load_frame
    from diffbackbone.evals.davis_data import load_davis

    torch.manual_seed(0)
    model = timm.create_model('test_dift', features_only=True, out_indices=['us9']).eval()
    seq = [s for s in load_davis(dataset) if s.name == 'still'][0]
    per_frame = list(FrameFeatures(lambda: model, 64, batch_size=3, frame_noise=True)(seq))
    same = list(FrameFeatures(lambda: model, 64, batch_size=3)(seq))
    x = torch.stack([load_frame(f, input_size(seq.size, 64), (0.5,) * 3, (0.5,) * 3) for f in seq.frames])
    assert torch.equal(x[0], x[3])
    with torch.no_grad():
        for k in range(len(seq.frames)):
            model.model.noise_seed = k
            torch.testing.assert_close(per_frame[k], model(x[k:k + 1])[0][0])
        model.model.noise_seed = 0
    assert not torch.allclose(per_frame[0], per_frame[3], atol=1e-3)
    torch.testing.assert_close(same[0], same[3])  # in different batches: float round-off only
    torch.testing.assert_close(per_frame[0], same[0])  # frame 0: seed noise_seed + 0


# ---- DiTF's protocol (Gan et al., eval_davis.py) --------------------------------------------------------------------
def _ditf_video(feats, first_mask, scale_factor, temperature, topk, n_last_frames, size_mask_neighborhood):
    """DiTF's eval_video_tracking_davis + label_propagation, step by step: frame features (C, h, w) in order, the first
    frame's (H, W) labels; a queue of the n_last_frames previous (feature, soft mask) pairs besides the first frame;
    upsampling by scale_factor, norm_mask, argmax, nearest resize to the frame size. Returns frames 1..'s labels."""
    import queue

    c, h, w = feats[0].shape
    ori_h, ori_w = first_mask.shape
    mask = _their_restrict_neighborhood(h, w, size_mask_neighborhood)  # built once per video as theirs
    small = np.array(Image.fromarray(first_mask).resize((w, h), 0))
    t = torch.from_numpy(small.copy()).long().view(-1, 1)
    n_dims = int(t.max() + 1)
    first_seg = torch.zeros(t.shape[0], n_dims).scatter_(1, t, 1).view(h, w, n_dims).permute(2, 0, 1)[None]
    frame1_feat = feats[0].reshape(c, -1)  # extract_feature(...).T: dim x h*w
    que = queue.Queue(n_last_frames)
    out = []
    for cnt in range(1, len(feats)):
        used_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        feat_tar = feats[cnt].reshape(c, -1).T  # hw x dim; label_propagation from here (DINO's, line by line)
        ncontext = len(used_feats)
        tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(ncontext, 1, 1)
        aff = torch.exp(torch.bmm(tar, F.normalize(torch.stack(used_feats), dim=1, p=2)) / temperature)
        aff *= mask.unsqueeze(0)
        aff = aff.float().transpose(2, 1).reshape(-1, h * w)
        tk_val, _ = torch.topk(aff, dim=0, k=topk)
        tk_val_min, _ = torch.min(tk_val, dim=0)
        aff[aff < tk_val_min] = 0
        aff = aff / torch.sum(aff, keepdim=True, axis=0)
        segs = torch.cat(used_segs)
        segs = segs.reshape(ncontext, segs.shape[1], -1).transpose(2, 1).reshape(-1, segs.shape[1]).T
        seg = torch.mm(segs, aff).reshape(1, -1, h, w)
        if que.qsize() == n_last_frames:
            que.get()
        que.put([feat_tar.T, seg.clone()])
        up = F.interpolate(seg, scale_factor=scale_factor, mode='bilinear', align_corners=False,
                           recompute_scale_factor=False)[0]
        for k in range(up.shape[0]):  # norm_mask
            if up[k].max() > 0:
                m = up[k] - up[k].min()
                up[k] = m / m.max()
        lab = torch.max(up, dim=0)[1].squeeze().numpy().astype(np.uint8)
        out.append(np.array(Image.fromarray(lab).resize((ori_w, ori_h), 0)))
    return out


def test_label_video_with_ditf_settings_equals_theirs():
    """12 frames (the 7-frame queue fills and drops), a 10 x 28 map (the 12-cell neighbourhood restricts across), DiTF's
    temperature 0.1 and top-k 5: our labels equal their loop's."""
    proto = davis.PROTOCOLS['ditf']
    assert (proto.temperature, proto.topk, proto.n_last_frames, proto.neighborhood) == (0.1, 5, 7, 12)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 10, 28, generator=g)
    feats = [base + 0.7 * torch.randn(8, 10, 28, generator=g) for _ in range(12)]  # related frames, no ties
    first = np.zeros((40, 112), np.uint8)
    first[4:24, 8:50], first[20:38, 60:104] = 1, 2
    got = list(davis.label_video(iter(feats), first, (112, 40), (112, 40), proto.temperature, proto.topk,
                                 proto.n_last_frames, proto.neighborhood))
    want = _ditf_video(feats, first, 4, proto.temperature, proto.topk, proto.n_last_frames, proto.neighborhood)
    assert len(got) == len(want) == 11
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert len({int(v) for v in np.unique(np.stack(got))}) == 3  # every label survives: not a trivial comparison


def test_ditf_protocol_settings(dataset, tmp_path, monkeypatch, capsys):
    """--protocol ditf: DiTF's model, tap, model arguments (prompt included) and propagation settings reach the model
    builder and the propagation; an explicit option wins; --random-weights leaves the protocol's prompt out."""
    import diffbackbone.correspondence as corr

    built, propagated = [], []
    monkeypatch.setattr(corr, 'load_tap_model', lambda name, tap, **k: built.append((name, tap, k)) or ColourModel())
    real = davis.label_video

    def spy(features, first, size, model_size, *settings):
        propagated.append(settings)
        return real(features, first, size, model_size, *settings)

    monkeypatch.setattr(davis, 'label_video', spy)
    out = tmp_path / 'r.json'
    base = ['eval', 'davis', '--data', str(dataset), '--protocol', 'ditf', '--short-side', '96', '--json', str(out)]
    rc, _, err = _run(base, capsys)
    assert rc == 0, err
    name, tap, k = built[0]
    assert (name, tap) == ('ditf_flux', 'ditf_davis')
    assert k['model_kwargs'] == {'timestep': 90, 'ensemble': 1, 'prompt': 'a photo of a image'} and k['pretrained']
    assert set(propagated) == {(0.1, 5, 7, 12)}
    result = json.loads(out.read_text())
    assert (result['protocol'], result['temperature'], result['topk'], result['n_last_frames'],
            result['neighborhood']) == ('ditf', 0.1, 5, 7, 12)
    built.clear(), propagated.clear()
    rc, _, err = _run(base + ['--random-weights', '--topk', '3', '--timestep', '50'], capsys)
    assert rc == 0, err
    assert built[0][2]['model_kwargs'] == {'timestep': 50, 'ensemble': 1} and set(propagated) == {(0.1, 3, 7, 12)}
    with pytest.raises(SystemExit) as info:  # argparse's usage error, before anything loads
        cli.main(base + ['--random-weights', '--prompt', 'a dog'])
    assert info.value.code == 2 and '--prompt needs pretrained weights' in capsys.readouterr().err
