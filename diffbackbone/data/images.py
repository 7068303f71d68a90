"""The one image-loading path of the package: files -> RGB pixels -> model input tensors.

Used by `features`, the feature store, the evaluations and the trainer, so every entry point reads an image the same
way (EXIF orientation, 16-bit and float range, transparency on white, `stretch` / `pad` / `crop` resizing, the model's
mean/std): see docs/store.md#how-images-are-read."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DiffbackboneError

__all__ = [
    'IMAGE_EXTENSIONS', 'RESIZE_MODES', 'ImageError', 'open_image', 'resize_image', 'to_tensor', 'load_image',
    'image_size', 'parse_size',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff', '.gif', '.ppm', '.pgm', '.pbm')
RESIZE_MODES = ('stretch', 'pad', 'crop')
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_SD_MEAN = _SD_STD = (0.5, 0.5, 0.5)


class ImageError(DiffbackboneError, ValueError):
    """An image cannot be read or prepared; the message names the file and says what to do."""


def _high_depth_to_float(img: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1] of a single-channel 16-bit / 32-bit / float image."""
    a = np.asarray(img, dtype=np.float32)
    if img.mode == 'F':
        return np.clip(a, 0.0, 1.0)
    # 'I;16*' is 16-bit; Pillow also opens 16-bit PNGs as 'I' (32-bit int holding 16-bit values).
    return np.clip(a / 65535.0, 0.0, 1.0)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert('RGB')


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Pillow's errors while reading `path` as one `ImageError` naming the file and what to do."""
    try:
        yield
    except FileNotFoundError as e:
        raise ImageError(f'{path}: no such file. Give paths of existing image files.') from e
    except IsADirectoryError as e:
        raise ImageError(f'{path} is a folder, not an image file.') from e
    except Image.DecompressionBombError as e:
        raise ImageError(f'{path}: {e} Downscale the image first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust '
                         'the file.') from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow raises all of these on bad data
        raise ImageError(f'{path}: cannot read the image ({type(e).__name__}: {e}). Give a readable image file '
                         f'({", ".join(IMAGE_EXTENSIONS)}).') from e


def open_image(path: str | Path) -> Image.Image:
    """The image at `path`, upright (EXIF), decoded, as 'RGB' (8-bit) or 'F' (one float channel in [0, 1], grey).

    Raises:
        ImageError: missing, unreadable or over-large file.
    """
    path = Path(path)
    with _reading(path), Image.open(path) as img:
        img.load()  # decode now: truncated files fail here, not later in a transform
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
            return Image.fromarray(_high_depth_to_float(img), mode='F')
        if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (img.mode == 'P' and 'transparency' in img.info):
            return _flatten_alpha(img)
        return img.convert('RGB')


def parse_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """`size` as (height, width): an int is square; None stays None (native size)."""
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ImageError(f'Image size must be positive, got {tuple(size)}.')
    return h, w


def resize_image(img: Image.Image, size: int | Sequence[int] | None, mode: str = 'stretch',
                 fill: Sequence[float] = _SD_MEAN) -> Image.Image:
    """`img` at `size` (height, width) by `mode` (see the module docstring); bicubic, as PIL's default.

    `fill` is the padding colour in [0, 1] per channel (default: the SD mean, 0 after normalisation).
    """
    if mode not in RESIZE_MODES:
        raise ImageError(f'Unknown resize mode {mode!r}: choose one of {", ".join(RESIZE_MODES)}.')
    hw = parse_size(size)
    if hw is None:
        return img
    h, w = hw
    if mode == 'stretch':
        return img if img.size == (w, h) else img.resize((w, h), Image.BICUBIC)
    scale = (max if mode == 'crop' else min)(h / img.height, w / img.width)
    nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resized = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    if mode == 'crop':
        return resized.crop((left, top, left + w, top + h))
    colour = (tuple(round(255 * c) for c in fill) if img.mode == 'RGB' else float(sum(fill) / len(fill)))
    canvas = Image.new(img.mode, (w, h), colour)
    canvas.paste(resized, (-left, -top))
    return canvas


def to_tensor(img: Image.Image, mean: Sequence[float] = _SD_MEAN, std: Sequence[float] = _SD_STD) -> torch.Tensor:
    """(3, H, W) float32 of an 'RGB' or 'F' image, scaled to [0, 1] and normalised with `mean`/`std`."""
    if img.mode == 'F':  # bicubic resizing overshoots at edges; 8-bit pixels are clamped by their type, these here
        x = torch.from_numpy(np.array(img, dtype=np.float32)).clamp_(0.0, 1.0).unsqueeze(0).expand(3, -1, -1)
    else:
        x = torch.from_numpy(np.array(img.convert('RGB'), dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - m) / s).contiguous()


def load_image(path: str | Path, size: int | Sequence[int] | None = None, mode: str = 'stretch',
               mean: Sequence[float] = _SD_MEAN, std: Sequence[float] = _SD_STD) -> torch.Tensor:
    """Read, resize and normalise one image file: (3, H, W) float32 (default: [-1, 1], as Stable Diffusion wants)."""
    return to_tensor(resize_image(open_image(path), size, mode, fill=mean), mean, std)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as the model sees it (EXIF orientation applied), reading only its header.

    Raises `ImageError` for what `open_image` would refuse at open (missing, not an image, over the pixel limit).
    """
    path = Path(path)
    with _reading(path), Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
