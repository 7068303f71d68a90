"""`diffbackbone eval hpatches` on a small synthetic HPatches (textured images warped by known homographies): planted
descriptors with a known accuracy, descriptor sampling against a hand-written bilinear read-out of DIFT's
`grid_sample`, mutual nearest neighbours against a loop, the CLI end to end on a tiny model (resume from the cache,
OpenCV corners) and with image-derived features that recover the planted homographies, and bad inputs."""
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffbackbone import cli
from diffbackbone.evals import hpatches
from diffbackbone.evals.hpatches_data import HPatchesError, corner_error, load_hpatches

W, H = 96, 80


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour texture (blurred noise): corners to detect, patches to tell apart."""
    img = rng.random((H, W, 3)).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _homography(rng: np.random.Generator) -> np.ndarray:
    """A mild homography about the image centre (rotation <= 4 deg, scale 0.95..1.05, shift <= 3 px, small tilt)."""
    a, s = math.radians(rng.uniform(-4, 4)), rng.uniform(0.95, 1.05)
    c = np.array([[1, 0, -W / 2], [0, 1, -H / 2], [0, 0, 1]])
    r = np.array([[s * math.cos(a), -s * math.sin(a), rng.uniform(-3, 3)],
                  [s * math.sin(a), s * math.cos(a), rng.uniform(-3, 3)],
                  [rng.uniform(-2e-4, 2e-4), rng.uniform(-2e-4, 2e-4), 1]])
    return np.linalg.inv(c) @ r @ c


def _warp(points: np.ndarray, h: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ h.T
    return p[:, :2] / p[:, 2:]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Two sequences (i_ and v_); image k = image 1 warped by H_1_k; keypoint files: image 1's corners and their
    images under H_1_k (kept where they land inside image k). Returns (root, keypoints folder, true homographies)."""
    base = tmp_path_factory.mktemp('hpatches')
    root, kps = base / 'hpatches-sequences-release', base / 'superpoint-1k'
    kps.mkdir()
    rng = np.random.default_rng(0)
    truth = {}
    for name in ('i_synth', 'v_synth'):
        folder = root / name
        folder.mkdir(parents=True)
        img1 = _texture(rng)
        cv2.imwrite(str(folder / '1.ppm'), img1)
        corners = cv2.goodFeaturesToTrack(cv2.cvtColor(img1, cv2.COLOR_BGR2GRAY), 60, 0.01, 4).reshape(-1, 2)
        corners = corners[(corners[:, 0] > 8) & (corners[:, 0] < W - 9) & (corners[:, 1] > 8) & (corners[:, 1] < H - 9)]
        np.savetxt(kps / f'{name}-1.kp', corners, fmt='%.2f')
        truth[name] = []
        for k in range(2, 7):
            hk = _homography(rng)
            truth[name].append(hk)
            cv2.imwrite(str(folder / f'{k}.ppm'), cv2.warpPerspective(img1, hk, (W, H), borderMode=cv2.BORDER_REFLECT))
            np.savetxt(folder / f'H_1_{k}', hk)
            warped = _warp(corners, hk)
            inside = (warped[:, 0] >= 0) & (warped[:, 0] < W) & (warped[:, 1] >= 0) & (warped[:, 1] < H)
            np.savetxt(kps / f'{name}-{k}.kp', warped[inside], fmt='%.2f')
    return root, kps, truth


def test_planted_descriptors_known_accuracy(dataset, tmp_path):
    """Descriptors that make matching exact: a code per image-1 keypoint, shared by its warped copy in image k. The
    v_ sequence's H_1_3 file is shifted by 2 px: wrong at 1 px, right at 3 and 5 px."""
    import shutil

    root, kps, truth = dataset
    data = tmp_path / 'data'
    shutil.copytree(root, data)
    np.savetxt(data / 'v_synth' / 'H_1_3', np.array([[1, 0, 2], [0, 1, 0], [0, 0, 1.]]) @ truth['v_synth'][1])
    seqs = load_hpatches(data, kps)

    def describe(seq):
        first = np.loadtxt(kps / f'{seq.name}-1.kp', dtype=np.float32)
        codes = torch.randn(len(first), 32, generator=torch.Generator().manual_seed(1))
        out = []
        for k in range(1, 7):
            ref = first if k == 1 else _warp(first, truth[seq.name][k - 2])
            # each (deduplicated, sorted) keypoint of image k takes the code of the image-1 keypoint it comes from
            dist = np.linalg.norm(seq.keypoints[k - 1][:, None] - ref[None].astype(np.float32), axis=2)
            out.append(codes[torch.from_numpy(dist.argmin(1))])
        return out

    scores = hpatches.evaluate(seqs, describe)
    assert scores.summary('i') == pytest.approx({'acc@1px': 100.0, 'acc@3px': 100.0, 'acc@5px': 100.0,
                                                 'num_pairs': 5, 'mean_matches': scores.summary('i')['mean_matches']})
    v = scores.summary('v')
    assert (v['acc@1px'], v['acc@3px'], v['acc@5px']) == (80.0, 100.0, 100.0)
    assert scores.summary()['acc@1px'] == 90.0
    shifted = next(p for p in scores.pairs if p.sequence == 'v_synth' and p.image == 3)
    assert shifted.error == pytest.approx(2.0, abs=0.01)
    assert max(p.error for p in scores.pairs if p is not shifted) < 0.01
    assert all(p.matches >= 20 for p in scores.pairs)


def test_descriptors_are_dift_grid_sample():
    """Bilinear read-out written by hand: x_f = ((x - c) / c + 1) * w_f / 2 - 1/2, zero outside the map."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(5, 6, 9, generator=g)
    size = (50, 37)
    pts = np.array([[0, 0], [49, 36], [10.5, 3.25], [24.5, 18], [33, 30.7]], dtype=np.float32)
    got = hpatches.descriptors(feat, pts, size)
    want = torch.zeros(len(pts), 5)
    for i, (x, y) in enumerate(pts):
        u = ((x - 24.5) / 24.5 + 1) * 9 / 2 - 0.5
        v = ((y - 18.0) / 18.0 + 1) * 6 / 2 - 0.5
        x0, y0 = math.floor(u), math.floor(v)
        for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
            for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                if 0 <= xx < 9 and 0 <= yy < 6:
                    want[i] += wx * wy * feat[:, yy, xx]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mutual_nn_and_corner_error():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 8, generator=g), torch.randn(25, 8, generator=g)
    for metric in ('cosine', 'l2'):
        if metric == 'cosine':
            sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
        else:
            sim = -torch.cdist(a, b)
        want = [(i, int(sim[i].argmax())) for i in range(30) if int(sim[:, int(sim[i].argmax())].argmax()) == i]
        assert [tuple(m) for m in hpatches.mutual_nn(a, b, metric).tolist()] == want and want
    shift = np.array([[1, 0, 3], [0, 1, 4], [0, 0, 1.]])
    assert corner_error(shift, np.eye(3), (10, 10)) == pytest.approx(5.0)
    assert corner_error(None, np.eye(3), (10, 10)) == math.inf


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_recovers_planted_homographies(dataset, tmp_path, monkeypatch, capsys):
    """The real command with image-derived features (each pixel's 5x5 colour patch, at full resolution): the mild
    planted homographies are recovered through keypoint sampling, mutual matching and LMEDS."""
    import diffbackbone.correspondence as corr
    from diffbackbone.data.images import load_image

    root, kps, _ = dataset

    def patch_features(model, paths, size=None, prompts=None):
        assert size == 768 and prompts is None
        out = []
        for p in paths:
            x = load_image(p)[None]  # (1, 3, H, W), original size
            out.append(F.unfold(x, 5, padding=2).view(75, H, W))
        return torch.stack(out)

    monkeypatch.setattr(corr, 'image_features', patch_features)
    monkeypatch.setattr(corr, 'load_tap_model', lambda *a, **k: None)
    out = tmp_path / 'res.json'
    rc, printed, err = _run(['eval', 'hpatches', '--data', str(root), '--keypoints', str(kps), '--random-weights',
                             '--json', str(out)], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result['overall']['acc@3px'] == 100.0 and result['overall']['num_pairs'] == 10
    assert result['illumination']['num_pairs'] == result['viewpoint']['num_pairs'] == 5
    assert result['model'] == 'sd21' and result['tap'] == 'us9' and result['model_kwargs'] == {'timestep': 0}
    assert max(p['error'] for p in result['pairs']) < 3
    assert 'viewpoint' in printed and '100.00' in printed


def test_cli_tiny_model_end_to_end_and_resume(dataset, tmp_path, capsys):
    root, kps, _ = dataset
    cache, out = tmp_path / 'cache', tmp_path / 'r.json'
    argv = ['eval', 'hpatches', '--data', str(root), '--model', 'test_dift', '--random-weights', '--size', '64',
            '--batch-size', '4', '--cache', str(cache), '--json', str(out), '--device', 'cpu']
    rc, printed, err = _run(argv + ['--keypoints', str(kps)], capsys)
    assert rc == 0, err
    first = json.loads(out.read_text())
    assert first['overall']['num_pairs'] == 10 and first['model_kwargs'] == {'timestep': 0}
    assert all(0 <= first['overall'][f'acc@{t}px'] <= 100 for t in (1, 3, 5))
    assert '12 images run' in printed
    files = sorted(cache.rglob('*.safetensors'))
    assert len(files) == 12 and not list(cache.rglob('.*.tmp'))

    files[0].unlink()  # as if killed before that image
    rc, printed, _ = _run(argv + ['--keypoints', str(kps)], capsys)
    assert rc == 0 and '1 images run' in printed
    assert json.loads(out.read_text()) == first

    rc, printed, err = _run(argv + ['--timestep', '5'], capsys)  # OpenCV corners, another timestep: another folder
    assert rc == 0 and '12 images run' in printed, err
    result = json.loads(out.read_text())
    assert result['keypoints'].startswith('opencv-shi-tomasi') and result['model_kwargs'] == {'timestep': 5}
    assert len({p.parent.parent for p in cache.rglob('*.safetensors')}) == 2


@pytest.mark.parametrize('breakage, message', [
    ('H_1_4', 'no such homography'),
    ('kp', 'no such keypoints file'),
    ('outside', 'is outside its 96x80 image'),
    ('folder', 'are named i_* or v_*'),
    ('badH', 'invertible 3x3'),
])
def test_bad_data(dataset, tmp_path, capsys, breakage, message):
    import shutil

    root, kps, _ = dataset
    data, points = tmp_path / 'data', tmp_path / 'kps'
    shutil.copytree(root, data)
    shutil.copytree(kps, points)
    culprit = {'H_1_4': data / 'v_synth' / 'H_1_4', 'kp': points / 'i_synth-2.kp', 'outside': points / 'v_synth-5.kp',
               'folder': data / 'extra', 'badH': data / 'i_synth' / 'H_1_2'}[breakage]
    if breakage in ('H_1_4', 'kp'):
        culprit.unlink()
    elif breakage == 'outside':
        culprit.write_text('3 4\n96.5 10\n')
    elif breakage == 'folder':
        culprit.mkdir()
    else:
        culprit.write_text('1 0 0\n0 1 0\n')
    cache = tmp_path / 'cache'
    rc, _, err = _run(['eval', 'hpatches', '--data', str(data), '--keypoints', str(points), '--model', 'test_dift',
                       '--random-weights', '--cache', str(cache)], capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert str(culprit) in err and message in err
    assert not cache.exists()  # checked before anything is computed or cached


def test_bad_options(dataset, tmp_path, capsys):
    root, kps, _ = dataset
    base = ['eval', 'hpatches', '--model', 'test_dift', '--random-weights']
    rc, _, err = _run(base + ['--data', str(tmp_path / 'nothing')], capsys)
    assert rc == 2 and 'nothing: no such folder' in err
    rc, _, err = _run(base + ['--data', str(root), '--keypoints', str(tmp_path / 'nokp')], capsys)
    assert rc == 2 and 'nokp: no such folder' in err
    rc, _, err = _run(base + ['--data', str(root), '--taps', 'us9', 'us6'], capsys)
    assert rc == 2 and '--taps takes exactly one tap' in err
    rc, _, err = _run(base + ['--data', str(root), '--json', str(root / 'i_synth' / 'H_1_2')], capsys)
    assert rc == 2 and 'inside the input folder' in err
    rc, _, err = _run(base + ['--data', str(root), '--timestep', '3', '--model-kwargs', '{"timestep": 4}'], capsys)
    assert rc == 2 and 'Give the timestep once' in err
    with pytest.raises(HPatchesError, match='--limit'):
        load_hpatches(root, kps, limit=0)
