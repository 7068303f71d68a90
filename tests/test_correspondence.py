"""`diffbackbone match` and `match_points`: CleanDIFT's notebook protocol, checked against a transcription of the
notebook and against features planted so that the right matches are known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffbackbone import cli
from diffbackbone.correspondence import match_images, match_points


def _notebook(src_feat, trg_feat, points, src_wh, trg_wh):
    """get_correspondences.ipynb, step by step (batch of one, as there)."""
    src_up = F.interpolate(src_feat[None], tuple(reversed(src_wh)), mode='bilinear')
    trg_up = F.interpolate(trg_feat[None], tuple(reversed(trg_wh)), mode='bilinear')
    pts = torch.tensor(points).long()
    src_vecs = src_up[0, :, pts[:, 1], pts[:, 0]].T[:, None]
    trg_flat = (trg_up / trg_up.norm(p=2, dim=1, keepdim=True)).reshape(trg_up.shape[1], -1)
    sims = (src_vecs / src_vecs.norm(p=2, dim=-1, keepdim=True)) @ trg_flat
    sims = sims.reshape(len(points), trg_up.shape[-2], trg_up.shape[-1])
    rows, cols = torch.unravel_index(sims.flatten(1).argmax(-1), sims.shape[1:])
    return [(int(c), int(r)) for r, c in zip(rows, cols)], sims


def test_match_points_equals_notebook():
    g = torch.Generator().manual_seed(0)
    src, trg = torch.randn(8, 5, 7, generator=g), torch.randn(8, 6, 4, generator=g)
    src_wh, trg_wh = (37, 23), (29, 41)  # non-square, upsampling factors differ per axis
    points = [(0, 0), (36, 22), (5, 17), (20, 3)]
    matches, sims = match_points(src, trg, points, src_wh, trg_wh)
    ref_matches, ref_sims = _notebook(src, trg, points, src_wh, trg_wh)
    assert sims.shape == (4, 41, 29)
    torch.testing.assert_close(sims, ref_sims, rtol=1e-5, atol=1e-6)
    assert matches == ref_matches


def _planted(h, w, cells, channels=8):
    """(C, h, w) features: background e0 everywhere, code e_k at cell (row, col) = cells[k-1]."""
    f = torch.zeros(channels, h, w)
    f[0] = 1.0
    for k, (r, c) in enumerate(cells, start=1):
        f[:, r, c] = 0
        f[k, r, c] = 1.0
    return f


def test_match_points_planted():
    # Images 5x the feature maps: pixel 5 * i + 2 samples cell i exactly (align_corners=False), its neighbours do not.
    src = _planted(3, 6, [(0, 1), (2, 5)])  # source image 30 x 15 (W x H)
    trg = _planted(4, 8, [(3, 2), (1, 6)])  # target image 40 x 20
    matches, sims = match_points(src, trg, [(7, 2), (27, 12)], (30, 15), (40, 20))
    assert matches == [(12, 17), (32, 7)]  # (x, y) of cells (row 3, col 2) and (row 1, col 6)
    assert sims.shape == (2, 20, 40)
    assert sims[0, 17, 12] == pytest.approx(1.0, abs=1e-5) and sims[0, 17, 11] < 0.99


def test_match_points_rejects_points_outside():
    f = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match=r'outside the image of 30x20'):
        match_points(f, f, [(30, 5)], (30, 20), (30, 20))
    with pytest.raises(ValueError, match='outside'):
        match_points(f, f, [(-1, 5)], (30, 20), (30, 20))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    src, trg = tmp_path / 'src.png', tmp_path / 'trg.jpg'
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(src)
    Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(trg)
    return src, trg


def test_match_images_runs_the_model(images):
    import timm

    src, trg = images
    model = timm.create_model('test_cleandift', features_only=True, out_indices=('us6',)).eval()
    matches, sims = match_images(src, trg, [(3, 4), (79, 47)], model=model, size=64)
    assert sims.shape == (2, 72, 64)
    assert all(0 <= x < 64 and 0 <= y < 72 for x, y in matches)
    # the features the model gives for the resized images, matched by the notebook's steps
    from diffbackbone.correspondence import image_features
    feats = image_features(model, [src, trg], 64)
    assert feats.shape[-2:] == (4, 4)
    assert matches == _notebook(feats[0], feats[1], [(3, 4), (79, 47)], (80, 48), (64, 72))[0]


def test_match_cli(images, tmp_path, capsys):
    src, trg = images
    out = tmp_path / 'pics' / 'match.png'
    rc = cli.main(['match', str(src), str(trg), '--points', '3,4', '70,40', '--model', 'test_cleandift',
                   '--random-weights', '--size', '64', '--out', str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.count('->') == 2 and '(3, 4) ->' in printed
    with Image.open(out) as pic:
        assert pic.size[1] == 2 * 256  # one row per point
    assert not list(out.parent.glob('.*'))


@pytest.mark.parametrize('argv, message', [
    (['--points', '80,10'], 'outside the image of 80x48'),
    (['--points', '1,1', '--taps', 'nope'], "Unknown tap 'nope'"),
    (['--points', '1,1', '--out', 'pic.txt'], 'ending in .png or .jpg'),
])
def test_match_cli_errors(images, tmp_path, capsys, argv, message):
    src, trg = images
    rc = cli.main(['match', str(src), str(trg), '--model', 'test_cleandift', '--random-weights', '--size', '64',
                   '--out', str(tmp_path / 'm.png')] + argv)  # a later --out wins
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and message in err and err.count('\n') == 1
    assert not (tmp_path / 'm.png').exists()


def test_match_cli_missing_image_and_bad_point(images, tmp_path, capsys):
    src, _ = images
    rc = cli.main(['match', str(src), str(tmp_path / 'none.jpg'), '--points', '1,1', '--random-weights',
                   '--model', 'test_cleandift'])
    assert rc == 2 and 'none.jpg: no such file' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(['match', str(src), str(src), '--points', '1;1'])
    assert e.value.code == 2 and 'X,Y pixel coordinates' in capsys.readouterr().err


from test_pretrained import published  # noqa: E402,F401  (tiny models on the fake Hub)


def test_match_cli_weights_and_prompt(images, published, hub_cache, capsys):  # noqa: F811  (pytest fixtures)
    """--weights and --prompt reach the model: the printed matches are those of a model built with both."""
    import timm

    from diffbackbone.correspondence import image_features

    src, trg = images
    weights = str(published['tmp'] / 'unet.safetensors')
    points = [(3, 4), (70, 40), (41, 9)]
    rc = cli.main(['match', str(src), str(trg), '--points'] + [f'{x},{y}' for x, y in points] +
                  ['--model', 'test_cleandift', '--weights', weights, '--prompt', 'a photo of a dog', '--size', '64'])
    printed = capsys.readouterr().out
    assert rc == 0
    got = [tuple(int(v) for v in line.split('-> (')[1].split(')')[0].split(', ')) for line in printed.splitlines()
           if ' -> (' in line]
    assert "prompt: 'a photo of a dog'" in printed
    model = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6',),
                              pretrained_cfg_overlay=dict(file=weights), prompt='a photo of a dog').eval()
    feats = image_features(model, [src, trg], 64)
    assert got == _notebook(feats[0], feats[1], points, (80, 48), (64, 72))[0]
    plain = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6',),
                              pretrained_cfg_overlay=dict(file=weights)).eval()
    assert not torch.allclose(image_features(plain, [src], 64), feats[:1], atol=1e-4)  # the prompt matters
