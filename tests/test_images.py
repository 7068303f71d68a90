"""Training reads images through `diffbackbone.data.images` like every other entry point (#10): EXIF orientation, 16-bit
and float images scaled, transparency on white, unreadable and over-large files skipped and reported. (The loader's
own cases are in test_reliability.py.)"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffbackbone.data.images import IMAGE_EXTENSIONS
from diffbackbone.train.data import ImageFolder, find_images


def _eval_sample(path, size: int) -> torch.Tensor:
    x = ImageFolder([path], size, train=False).read(path)
    assert x is not None and x.shape == (3, size, size)
    return x


def test_training_applies_exif_orientation(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # stored: left half white
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": upright, the white half is on top
    img.save(tmp_path / 'rot.jpg', exif=exif, quality=100)
    x = _eval_sample(tmp_path / 'rot.jpg', 32)  # short side to 32, centre crop: rows 16..48 of the upright 32x64
    assert x[:, :12].mean() > 0.8 and x[:, -12:].mean() < -0.8


def test_training_scales_16_bit_and_float_images(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / 'depth16.png')
    x = _eval_sample(tmp_path / 'depth16.png', 64)
    assert (x == 1).float().mean() < 0.01  # Image.convert('RGB') clipped 99.6% of it to white
    expected = torch.from_numpy(ramp / 65535.0 * 2 - 1).float()
    for channel in x:  # grey: three equal channels, 8-bit steps of the 16-bit values
        torch.testing.assert_close(channel, expected, atol=2 / 255 + 1e-6, rtol=0)

    Image.fromarray(np.full((64, 64), 0.25, np.float32)).save(tmp_path / 'float.tif')  # mode 'F'
    torch.testing.assert_close(_eval_sample(tmp_path / 'float.tif', 64), torch.full((3, 64, 64), 64 / 127.5 - 1))


def test_training_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    x = _eval_sample(tmp_path / 'a.png', 64)
    assert (x[:, :, :30] == 1).all()  # white, not the black that dropping alpha gave
    assert (x[0, :, 34:] == 1).all() and (x[1:, :, 34:] == -1).all()


def test_training_skips_unreadable_and_over_large_images(tmp_path, monkeypatch):
    Image.new('RGB', (300, 300), 'white').save(tmp_path / 'a_big.png')
    (tmp_path / 'b_bad.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    Image.new('RGB', (64, 64), 'black').save(tmp_path / 'c_good.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 5000)  # a_big.png (90,000 px > 2x) is then a decompression bomb
    files = find_images(tmp_path)
    sample = ImageFolder(files, 64, train=False)[0]
    assert sample['skipped'] == [str(tmp_path / 'a_big.png'), str(tmp_path / 'b_bad.jpg')]
    assert (sample['image'] == -1).all()  # c_good.png


def test_training_finds_every_extension_the_loader_reads(tmp_path):
    for ext in IMAGE_EXTENSIONS:
        (tmp_path / f'x{ext}').touch()
    assert [p.suffix for p in find_images(tmp_path)] == sorted(IMAGE_EXTENSIONS, key=lambda e: f'x{e}')


def test_training_walks_linked_folders_as_every_command(tmp_path):
    data, other = tmp_path / 'data', tmp_path / 'other'
    for folder, name in ((data / 'sub', 'a.png'), (other, 'b.png')):
        folder.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(folder / name)
    (data / 'linked').symlink_to(other, target_is_directory=True)  # a folder of images kept elsewhere
    (data / 'loop').symlink_to(data, target_is_directory=True)  # a loop ends
    assert find_images(data) == [data / 'linked' / 'b.png', data / 'sub' / 'a.png']
