"""Bad input gets a clear error, files are written safely, and images are read faithfully (issue #10)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone.hub import save_safetensors
from diffbackbone.data.images import ImageError, load_image, open_image

X = torch.rand(1, 3, 128, 128) * 2 - 1


# ---- model arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,timestep', [('test_cleandift', 2000), ('test_cleandift', -5),
                                           ('test_cleandift', float('nan')), ('test_dift', 1000), ('test_dift', 'x')])
def test_timestep_out_of_range_is_refused_alike(name, timestep):
    with pytest.raises(ValueError, match=r'timestep must be a number in \[0, 999\]'):
        timm.create_model(name, timestep=timestep)


def test_noisy_timestep_and_ensemble_must_be_whole():
    with pytest.raises(ValueError, match='whole number.*261.9'):
        timm.create_model('test_dift', timestep=261.9)
    with pytest.raises(ValueError, match='ensemble must be a whole number'):
        timm.create_model('test_dift', ensemble=2.5)
    assert timm.create_model('test_cleandift', timestep=100.5).timestep.item() == 100.5  # clean: any real t


def test_unknown_model_argument_lists_the_valid_ones():
    with pytest.raises(ValueError, match='Unknown model argument.*nope.*timestep'):
        timm.create_model('test_cleandift', nope=1)


def test_bad_batches_name_the_problem():
    model = timm.create_model('test_cleandift').eval()
    with pytest.raises(ValueError, match='batch of 0 images'):
        model(X[:0])
    with pytest.raises(ValueError, match='bfloat16.*float32.*autocast'):
        model(X.bfloat16())
    with pytest.raises(ValueError, match='floating point'):
        model((X * 127).to(torch.uint8))
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        assert model(X).shape == (1, model.num_features)  # autocast is the documented way to mix


# ---- files written -----------------------------------------------------------------------------------------------
def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / 'f.safetensors'
        save_safetensors({'a': torch.zeros(2)}, out)
        assert out.stat().st_mode & 0o777 == 0o644
        out.chmod(0o664)
        os.umask(0o002)
        save_safetensors({'a': torch.ones(2)}, out)  # overwrite
        assert out.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / 'big.safetensors'
    code = (f'import os, torch\nfrom diffbackbone.hub import atomic_path\n'
            f'with atomic_path({str(out)!r}) as tmp:\n'
            f'    tmp.write_bytes(b"x" * 1000)\n    os.kill(os.getpid(), 9)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True)
    assert proc.returncode == -9
    orphans = list(tmp_path.glob('.big.safetensors.*.tmp'))
    assert len(orphans) == 1 and not out.exists()
    save_safetensors({'a': torch.zeros(1)}, out)
    assert out.is_file() and not list(tmp_path.glob('.big.safetensors.*.tmp'))


# ---- images ------------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # left half white, as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / 'rot.jpg', exif=exif, quality=100)
    upright = open_image(tmp_path / 'rot.jpg')
    assert upright.size == (40, 80)  # width and height swapped
    top, bottom = np.asarray(upright)[:20].mean(), np.asarray(upright)[-20:].mean()
    assert top > 200 and bottom < 50  # the stored left half is on top once rotated


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / 'depth16.png')
    assert Image.open(tmp_path / 'depth16.png').mode.startswith('I')
    x = load_image(tmp_path / 'depth16.png')  # native size, [-1, 1]
    assert x.shape == (3, 64, 64)
    assert (x == 1).float().mean() < 0.01  # was 99.6% at 255 before
    torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535.0 * 2 - 1).float(), atol=1e-4, rtol=0)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent on the left half
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    px = np.asarray(open_image(tmp_path / 'a.png'))
    assert (px[:, :32] == 255).all() and (px[:, 32:] == [255, 0, 0]).all()


def test_long_image_is_kept_whole_unless_crop_is_asked(tmp_path):
    pixels = np.zeros((64, 4000, 3), np.uint8)
    pixels[:, :400] = 255  # white first tenth: dropped by a centre crop
    Image.fromarray(pixels).save(tmp_path / 'long.png')
    whole = load_image(tmp_path / 'long.png', 128)  # default 'stretch': the whole image
    assert whole.shape == (3, 128, 128)
    assert whole[:, :, :11].min() > 0.9 and whole[:, :, 15:].max() < -0.9
    padded = load_image(tmp_path / 'long.png', 128, 'pad')  # aspect kept, bands of the mean colour (0 in [-1, 1])
    assert padded.shape == (3, 128, 128)
    assert padded[:, :60].abs().max() < 0.01 and padded[:, 63:65, :2].min() > 0.9
    cropped = load_image(tmp_path / 'long.png', 128, 'crop')  # the centre only (3% of it), on request
    assert cropped.shape == (3, 128, 128) and cropped.max() < -0.9


def test_unreadable_images_raise_image_error(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match='missing.png'):
        open_image(tmp_path / 'missing.png')
    (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    with pytest.raises(ImageError, match='bad.jpg'):
        open_image(tmp_path / 'bad.jpg')
    Image.new('RGB', (300, 300)).save(tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 90,000 px is then > 2x the limit: a "bomb"
    with pytest.raises(ImageError, match='bomb.png.*Downscale'):
        open_image(tmp_path / 'bomb.png')


# ---- the features command: every bad input is refused before any work, nothing is lost -------------------------
def _img(path, size=(96, 96)):
    Image.fromarray((np.random.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(path)
    return path


def _features(*args):
    from diffbackbone.cli import main

    return main(['features', '--model', 'test_cleandift', '--random-weights', '--size', '128', *map(str, args)])


def test_features_never_overwrites_an_input_or_an_existing_output(tmp_path, capsys):
    img = _img(tmp_path / 'in.png')
    before = img.read_bytes()
    assert _features(img, '--out', img) == 2
    assert 'is one of the input images' in capsys.readouterr().err and img.read_bytes() == before
    out = tmp_path / 'f.safetensors'
    out.write_bytes(b'precious')
    assert _features(img, '--out', out) == 2
    assert '--overwrite' in capsys.readouterr().err and out.read_bytes() == b'precious'
    assert _features(img, '--out', out, '--overwrite', '--taps', 'us6') == 2  # not ours: never replaced
    assert 'not written by diffbackbone' in capsys.readouterr().err and out.read_bytes() == b'precious'
    out.unlink()
    assert _features(img, '--out', out, '--taps', 'us6') == 0
    first = out.read_bytes()
    assert _features(img, '--out', out, '--overwrite', '--taps', 'mid') == 0  # ours: replaced
    assert out.read_bytes() != first
    assert _features(img, '--out', tmp_path) == 2
    assert 'is a folder' in capsys.readouterr().err


def test_features_checks_the_output_and_the_pca_tap_before_running(tmp_path, capsys, monkeypatch):
    import diffbackbone.data.extract as ex

    ran = []
    monkeypatch.setattr(ex, 'extract_batches', lambda *a, **k: ran.append(1) or iter(()))
    img = _img(tmp_path / 'in.png')
    assert _features(img, '--out', '/proc/x.safetensors') == 2
    assert 'Cannot write to /proc' in capsys.readouterr().err
    readonly = tmp_path / 'ro'
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() != 0:  # root writes anywhere; /proc above covers the unwritable case then
        assert _features(img, '--out', readonly / 'f.safetensors') == 2
    assert _features(img, '--out', tmp_path / 'f.safetensors', '--taps', 'us6', '--pca', 'mid') == 2
    assert 'not among the extracted taps' in capsys.readouterr().err
    assert _features(img, '--out', tmp_path / 'f.safetensors', '--taps', 'mid', '--pca', 'mid', '--size', '64') == 2
    assert '1x1' in capsys.readouterr().err
    assert not ran and not (tmp_path / 'f.safetensors').exists()


def test_features_finds_unreadable_images_first(tmp_path, capsys, monkeypatch):
    good = _img(tmp_path / 'good.png')
    (tmp_path / 'bad.jpg').write_bytes(b'nope')
    big = _img(tmp_path / 'big.png', (300, 300))
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 20000)  # 'big.png' (90,000 px) is then a bomb
    assert _features(good, tmp_path / 'bad.jpg', big, '--out', tmp_path / 'f.safetensors') == 2
    err = capsys.readouterr().err
    assert err.startswith('error: 2 of 3 images cannot be read') and 'bad.jpg' in err and 'big.png' in err


@pytest.mark.parametrize('argv,message', [
    (['--model', 'nope_model'], "unknown model 'nope_model'"),
    (['--model', 'cleandift_sd12'], 'Did you mean cleandift_sd21'),
    (['--batch-size', '0'], 'must be at least 1'),
    (['--batch-size', '-1'], 'must be at least 1'),
    (['--size', '0'], 'must be at least 1'),
    (['--model-kwargs', '{"timestep": '], 'invalid JSON'),
    (['--model-kwargs', '[1, 2]'], 'must be a JSON object'),
    (['--device', 'gpu0'], "invalid device 'gpu0'"),
    (['--device', 'cuda'], 'no CUDA GPU'),
])
def test_features_argument_errors(argv, message, tmp_path, capsys):
    from diffbackbone.cli import main

    if argv == ['--device', 'cuda'] and torch.cuda.is_available():
        pytest.skip('this check is about machines without a GPU')
    with pytest.raises(SystemExit) as exit_info:
        main(['features', 'diffbackbone/assets/sample.jpg', '--out', str(tmp_path / 'f.safetensors'), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_unknown_model_kwarg_and_taps_of_unknown_model(tmp_path, capsys):
    from diffbackbone.cli import main

    img = _img(tmp_path / 'in.png')
    assert _features(img, '--out', tmp_path / 'f.safetensors', '--model-kwargs', '{"nope": 1}') == 2
    assert 'Unknown model argument(s) nope' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(['taps', 'nope_model'])
    assert exit_info.value.code == 2 and "unknown model 'nope_model'" in capsys.readouterr().err


@pytest.mark.parametrize('mode', ['I;16', 'F'])
def test_high_bit_depth_images_stay_in_range_after_resizing(tmp_path, mode):
    board = ((np.indices((64, 64)) // 8).sum(0) % 2).astype(np.float32)  # 8 px squares: bicubic overshoots at edges
    if mode == 'F':
        Image.fromarray(board, mode='F').save(tmp_path / 'x.tif')
        path = tmp_path / 'x.tif'
    else:
        Image.fromarray((board * 65535).astype(np.uint16)).save(tmp_path / 'x.png')
        path = tmp_path / 'x.png'
    for resize in ('stretch', 'pad', 'crop'):
        x = load_image(path, (48, 40), resize)
        assert x.min() >= -1 and x.max() <= 1, (resize, x.min().item(), x.max().item())
        assert x.min() < -0.5 and x.max() > 0.5  # still the picture
