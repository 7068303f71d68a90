"""`eval pixel`'s uncertainty and pictures against DDPM-segmentation's own steps, re-implemented here from their
`src/pixel_classifier.py` (`predict_labels`, `save_predictions`), `src/utils.py` (`colorize_mask`, `oht_to_scalar`)
and `src/data_util.py` (palettes); and the `--pictures` folder's safety (checked before any work, nothing
half-written, only our own folders replaced)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.distributions import Categorical

from diffbackbone import cli
from diffbackbone.data.outputs import is_ours
from diffbackbone.evals import pixel
from diffbackbone.evals.pixel_data import CATEGORY_CLASSES
from diffbackbone.evals.pixel_pictures import PALETTES, SplitPictures, check_pictures, colorize, palette

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _their_predict_labels(models, features, size):
    """Their `predict_labels`, step by step (`.cuda()` dropped): per member the logits' Categorical entropy, the
    softmaxes summed then averaged, js = entropy of the mean - mean of the entropies, top_k = mean of the sorted tail
    of len / 10, the label the mode of the members' `oht_to_scalar`."""
    mean_seg, all_seg, all_entropy, seg_mode_ensemble = None, [], [], []
    softmax_f = nn.Softmax(dim=1)
    with torch.no_grad():
        for model in models:
            preds = model(features)
            all_entropy.append(Categorical(logits=preds).entropy())
            all_seg.append(preds)
            mean_seg = softmax_f(preds) if mean_seg is None else mean_seg + softmax_f(preds)
            _, tags = torch.max(torch.log_softmax(preds, dim=1), dim=1)  # oht_to_scalar
            seg_mode_ensemble.append(tags.reshape(*size))
        mean_seg = mean_seg / len(all_seg)
        full_entropy = Categorical(mean_seg).entropy()
        js = full_entropy - torch.mean(torch.stack(all_entropy), 0)
        top_k = js.sort()[0][- int(js.shape[0] / 10):].mean()
        img_seg_final = torch.mode(torch.stack(seg_mode_ensemble, dim=-1), 2)[0]
    return img_seg_final, top_k, js


def _members(classes: int, dim: int, n: int = 5) -> list[pixel.PixelClassifier]:
    """Trained-looking members that disagree: wide random weights, random BatchNorm statistics, eval mode."""
    gen = torch.Generator().manual_seed(classes)
    members = []
    for _ in range(n):
        m = pixel.PixelClassifier(classes, dim)
        for layer in m.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.data = torch.randn(layer.weight.shape, generator=gen) / layer.in_features ** 0.5 * 3
            elif isinstance(layer, nn.BatchNorm1d):
                layer.running_mean = torch.randn(layer.num_features, generator=gen) * 0.1
                layer.running_var = torch.rand(layer.num_features, generator=gen) + 0.5
        members.append(m.eval())
    return members


@pytest.mark.parametrize('size,classes,chunk', [(24, 4, 100), (24, 34, 8192), (3, 21, 8192)])
def test_uncertainty_and_labels_are_their_predict_labels(size, classes, chunk):
    """Maps at label size (the sampler reads them as they are) through their predict_labels on the whole image and
    ours in chunks: the same labels, per-pixel uncertainty and top_k score (3 x 3: 9 pixels, their [-0:] takes all)."""
    dim = 7
    maps = torch.randn(1, size, size, dim, generator=torch.Generator().manual_seed(size))
    members = _members(classes, dim)
    ours = pixel.predict_image(members, [maps], pixel.PixelSampler([(dim, size, size)], size), chunk=chunk)
    labels, top_k, js = _their_predict_labels(members, maps.reshape(-1, dim), (size, size))
    assert js.std() > 0.05  # the members disagree: a real test of the uncertainty
    assert (ours.labels == labels.numpy()).all()
    assert ours.uncertainty.shape == (size, size)
    np.testing.assert_allclose(ours.uncertainty.ravel(), js.numpy(), rtol=0, atol=1e-6)
    assert ours.score == pytest.approx(float(top_k), abs=1e-6)
    if size * size < 10:  # their [-0:]: every pixel
        assert ours.score == pytest.approx(float(js.mean()), abs=1e-6)
    else:
        assert ours.score > float(js.mean()) + 0.05


def test_palettes_are_theirs():
    """One colour per class of each category (their number_class); ffhq_34's fractions truncated as int(f * 255)."""
    for category, classes in CATEGORY_CLASSES.items():
        assert len(PALETTES[category]) == classes, category
    ffhq = [1.0000, 1.0000, 1.0000, 0.4420, 0.5100, 0.4234, 0.9450, 0.6721, 0.6162]  # their first two and last
    want = [int(v * 255) for v in ffhq]
    assert [v for c in PALETTES['ffhq_34'][:2] + PALETTES['ffhq_34'][-1:] for v in c] == want
    assert PALETTES['horse_21'][:3] == ((255, 255, 255), (255, 74, 70), (0, 137, 65))
    assert PALETTES['ade_bedroom_30'][-1] == (29, 193, 187)  # ade_bedroom_50_palette[:90]
    assert len(set(PALETTES['voc'])) == 256 and PALETTES['voc'][1] == (128, 0, 0)
    assert palette(None, 'horse_21', 21)[0] == 'horse_21' and palette(None, 'blocks', 4)[0] == 'voc'
    assert palette('cat_15', 'horse_21', 15)[0] == 'cat_15'


def test_pictures_are_their_save_predictions(tmp_path):
    """Their colour map (colorize_mask, saved as JPEG with Pillow's defaults) decodes to the same pixels as ours; the
    classes come back exactly from predictions/, the uncertainty as grey levels of ln(classes); every file ours."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, (40, 40)).astype(np.uint8)
    unc = (rng.random((40, 40)) * np.log(21)).astype(np.float32)
    _, flat = palette(None, 'horse_21', 21)
    with SplitPictures(tmp_path / 'pics', 3, 21, flat) as out:
        out.add(tmp_path / 'img_7.a.png', labels, unc)
        out.commit()
    split = tmp_path / 'pics' / 'seed3'
    # theirs: Image.fromarray(colorize_mask(pred, palette)).save(<exp_dir>/visualizations/<name>.jpg)
    mask = Image.fromarray(labels.astype(np.uint8)).convert('P')
    mask.putpalette(flat)
    Image.fromarray(np.array(mask.convert('RGB'))).save(tmp_path / 'theirs.jpg')
    ours = np.array(Image.open(split / 'visualizations' / 'img_7.jpg'))
    assert np.array_equal(ours, np.array(Image.open(tmp_path / 'theirs.jpg')))
    assert np.array_equal(colorize(labels, flat), np.array(PALETTES['horse_21'], np.uint8)[labels])
    with Image.open(split / 'predictions' / 'img_7.png') as img:
        assert img.mode == 'P' and np.array_equal(np.array(img), labels)
    with Image.open(split / 'uncertainty' / 'img_7.png') as img:
        assert np.array_equal(np.array(img), np.rint(unc / np.log(21) * 255).astype(np.uint8))
    files = sorted(p.relative_to(split).as_posix() for p in split.rglob('*') if p.is_file())
    assert files == ['predictions/img_7.png', 'uncertainty/img_7.png', 'visualizations/img_7.jpg']
    assert all(is_ours(split / f, 'eval pixel') for f in files)
    assert [p.name for p in (tmp_path / 'pics').iterdir()] == ['seed3']


def test_pictures_are_never_half_written_and_replace_only_ours(tmp_path):
    folder = tmp_path / 'pics'
    labels, unc = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)
    with pytest.raises(RuntimeError), SplitPictures(folder, 0, 4, palette(None, 'x', 4)[1]) as out:
        out.add(tmp_path / 'a.png', labels, unc)
        raise RuntimeError('training failed')
    assert list(folder.iterdir()) == []  # no split folder, no temporary
    with SplitPictures(folder, 0, 4, palette(None, 'x', 4)[1]) as out:
        out.add(tmp_path / 'a.png', labels, unc)
        out.commit()
    check_pictures(folder, [0, 1], [tmp_path / 'a.png'])  # our own split folder: replaced
    with SplitPictures(folder, 0, 4, palette(None, 'x', 4)[1]) as out:
        out.add(tmp_path / 'b.png', labels, unc)
        out.commit()
    assert sorted(p.name for p in (folder / 'seed0').rglob('*.*')) == ['b.jpg', 'b.png', 'b.png']
    (folder / 'seed0' / 'predictions' / 'notes.txt').write_text('mine')
    with pytest.raises(Exception, match='predictions/notes.txt, not written by diffbackbone'):
        check_pictures(folder, [0], [])
    with pytest.raises(Exception, match='the same picture name "x"'):
        check_pictures(tmp_path / 'new', [0], [tmp_path / 'train' / 'x.png', tmp_path / 'test' / 'x.1.jpg'])


def _dataset(root, n=2):
    for split in ('train', 'test'):
        (root / 'real' / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / 'real' / split / f'{split}{i}.png')
            np.save(root / 'real' / split / f'{split}{i}.npy', np.arange(256).reshape(16, 16) % 3)
    return root


@pytest.mark.parametrize('where,extra,message', [
    ('d/pics', [], 'is inside the input folder'),
    ('store', [], 'overlap'),
    ('store/pics', [], 'overlap'),
    ('pics', ['--classes', '16', '--palette', 'cat_15'], '--palette cat_15 has 15 colours but the dataset has 16'),
    ('taken', [], 'taken/seed0 holds x.jpg, not written by diffbackbone'),
])
def test_bad_pictures_stop_before_any_work(tmp_path, capsys, where, extra, message):
    data = _dataset(tmp_path / 'd')
    (tmp_path / 'taken' / 'seed0').mkdir(parents=True)
    (tmp_path / 'taken' / 'seed0' / 'x.jpg').write_bytes(b'x')
    argv = ['eval', 'pixel', '--data', str(data), '--store', str(tmp_path / 'store'), '--pictures',
            str(tmp_path / where), '--model', 'test_dift', '--random-weights', '--device', 'cpu', *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
    assert not (tmp_path / 'store').exists() and not (tmp_path / 'pics').exists()
    assert not (data / 'real' / 'pics').exists() and sorted(p.name for p in (tmp_path / 'taken').rglob('*')) == [
        'seed0', 'x.jpg']
