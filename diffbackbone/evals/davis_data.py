"""DAVIS 2017 video sequences (Pont-Tuset et al. 2017, https://davischallenge.org/davis2017/code.html), read and
checked before any model runs.

Layout (`DAVIS-2017-trainval-480p.zip`, as DIFT's `eval_davis.py` and the DAVIS 2017 evaluation read it):
`ImageSets/2017/<split>.txt` (one sequence a line), `JPEGImages/480p/<sequence>/<frame>.jpg` and
`Annotations/480p/<sequence>/<frame>.png` (indexed masks: 0 background, 1..K objects, 255 void), one per frame.
Every problem raises `DavisError` naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..data.images import ImageError, image_size
from ..errors import DiffbackboneError

__all__ = ['DavisError', 'DavisSequence', 'load_davis', 'read_mask', 'VOID']

VOID = 255


class DavisError(DiffbackboneError, ValueError):
    """The dataset folder or one of its files is not usable; the message names it and says what to do."""


@dataclass
class DavisSequence:
    """A sequence's frames and their masks (same order, same stems), the frame size (W, H) and its object count."""
    name: str
    frames: list[Path]
    masks: list[Path]
    size: tuple[int, int]
    num_objects: int


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 labels of an indexed (or greyscale) mask PNG."""
    with Image.open(path) as img:
        return np.array(img)


def _mask_header(path: Path) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except (OSError, ValueError) as e:
        raise DavisError(f'{path}: not a readable PNG mask ({e}).') from None


def _sequence(name: str, images: Path, annotations: Path) -> DavisSequence:
    frames = sorted((images / name).glob('*.jpg'))
    if not frames:
        raise DavisError(f'{images / name}: no .jpg frames for sequence {name!r}.')
    if len(frames) < 3:
        raise DavisError(f'{images / name}: {len(frames)} frames; the evaluation skips the first and last, so a '
                         'sequence needs at least 3.')
    masks = sorted((annotations / name).glob('*.png'))
    stems, mask_stems = [f.stem for f in frames], [m.stem for m in masks]
    if mask_stems != stems:
        missing = sorted(set(stems) - set(mask_stems))
        extra = sorted(set(mask_stems) - set(stems))
        raise DavisError(f'{annotations / name}: needs one <frame>.png mask per frame of {images / name}; missing '
                         f'{missing[:3]}{" ..." if len(missing) > 3 else ""}, without a frame {extra[:3]}.')
    try:
        size = image_size(frames[0])
        for f in frames[1:]:
            if image_size(f) != size:
                raise DavisError(f'{f}: {image_size(f)[0]}x{image_size(f)[1]} pixels, but {frames[0]} is '
                                 f'{size[0]}x{size[1]}; every frame of a sequence must have one size.')
    except ImageError as e:
        raise DavisError(str(e)) from e
    for m in masks:
        msize, mode = _mask_header(m)
        if msize != size:
            raise DavisError(f'{m}: {msize[0]}x{msize[1]} pixels, but the frames are {size[0]}x{size[1]}.')
        if mode not in ('P', 'L'):
            raise DavisError(f'{m}: a {mode} image; DAVIS masks are indexed (P) or greyscale (L) PNGs of object ids.')
    first = read_mask(masks[0])
    objects = first[first != VOID]
    num = int(objects.max()) if objects.size else 0
    if num < 1:
        raise DavisError(f'{masks[0]}: the first frame\'s mask has no object (all 0 or void); nothing to propagate.')
    return DavisSequence(name, frames, masks, size, num)


def load_davis(root: str | Path, split: str = 'val', sequences: Optional[Sequence[str]] = None,
               limit: Optional[int] = None, resolution: str = '480p') -> list[DavisSequence]:
    """The sequences of `ImageSets/2017/<split>.txt` in its order (only `sequences` if given; the first `limit`)."""
    root = Path(root)
    listing = root / 'ImageSets' / '2017' / f'{split}.txt'
    images, annotations = root / 'JPEGImages' / resolution, root / 'Annotations' / resolution
    for what in (root, images, annotations):
        if not what.is_dir():
            raise DavisError(f'{what}: no such folder. --data must be the DAVIS folder holding '
                             f'JPEGImages/{resolution}, Annotations/{resolution} and ImageSets/2017 (DAVIS-2017-trainval-{resolution}.zip from '
                             'https://davischallenge.org/davis2017/code.html, unpacked).')
    if not listing.is_file():
        raise DavisError(f'{listing}: no such file; --split names ImageSets/2017/<split>.txt (val, train).')
    try:
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:  # e.g. permission denied: the user's to fix, one error line
        raise DavisError(f'{listing}: cannot read the sequence list ({e}).') from e
    if not names:
        raise DavisError(f'{listing}: lists no sequence.')
    odd = next((n for n in names if n in ('.', '..') or '/' in n or os.sep in n), None)
    if odd is not None:
        raise DavisError(f'{listing}: {odd!r} is not a sequence name (a folder name of JPEGImages/{resolution}, '
                         'without / or ..). Fix the line.')
    if sequences:
        unknown = [s for s in sequences if s not in names]
        if unknown:
            raise DavisError(f'--sequences {" ".join(unknown)}: not in {listing}.')
        names = [n for n in names if n in set(sequences)]
    if limit is not None:
        if limit < 1:
            raise DavisError(f'--limit must be at least 1, got {limit}.')
        names = names[:limit]
    return [_sequence(n, images, annotations) for n in names]
