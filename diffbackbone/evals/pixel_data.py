"""Datasets of `diffbackbone eval pixel` in DDPM-segmentation's layout (yandex-research/ddpm-segmentation, as Meng et
al.'s `scarce_segmentation/` reads them)::

    horse_21/real/train/<name>.png  + <name>.npy     (an image and its (H, W) integer label map)
    horse_21/real/test/<name>.png   + <name>.npy

`--data` may name the dataset folder (holding `real/`) or `real/` itself. Images are listed as theirs: recursively,
extensions jpg/jpeg/png/gif, sorted by path; each label is the image's path with the extension replaced by `.npy`.
Label 255 is ignored. A label map has its image's size, or its aspect ratio (another size is resized by nearest
neighbour, with a warning; another aspect ratio is refused, never stretched). Everything is checked here, before any
model is built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DiffbackboneError

__all__ = ['IGNORE', 'CATEGORY_CLASSES', 'PixelDataError', 'PixelItem', 'PixelDataset', 'list_images',
           'load_pixel_dataset', 'load_label']

IGNORE = 255
# number_class of DDPM-segmentation's get_dataset_setting (bedroom_28 has 29: background + 28).
CATEGORY_CLASSES = {'ffhq_34': 34, 'bedroom_28': 29, 'cat_15': 15, 'horse_21': 21, 'ade_bedroom_30': 30,
                    'celeba_19': 19}
_EXTS = ('jpg', 'jpeg', 'png', 'gif')


class PixelDataError(DiffbackboneError, ValueError):
    """A dataset folder is not in DDPM-segmentation's layout, or a label file is unusable."""


@dataclass(frozen=True)
class PixelItem:
    image: Path
    label: Path
    split: str  # 'train' | 'test': the folder it came from


@dataclass
class PixelDataset:
    root: Path  # the folder holding train/ and test/
    name: str  # the category (horse_21, ...): the folder above real/, or the folder given
    train: list[PixelItem]
    test: list[PixelItem]
    classes: int


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by path as DDPM-segmentation's `_list_image_files_recursively`
    + `sorted` list them."""
    def walk(d: Path) -> list[str]:
        out: list[str] = []
        for entry in sorted(p.name for p in d.iterdir()):
            full = d / entry
            if '.' in entry and entry.rsplit('.', 1)[-1].lower() in _EXTS and full.is_file():
                out.append(str(full))
            elif full.is_dir():
                out.extend(walk(full))
        return out

    return [Path(p) for p in sorted(walk(folder))]


def _root(data: Path) -> tuple[Path, str]:
    if not data.is_dir():
        raise PixelDataError(f'--data {data}: no such folder. Give a dataset in DDPM-segmentation\'s layout '
                             '(e.g. horse_21/ holding real/train and real/test).')
    if (data / 'real' / 'train').is_dir() or (data / 'real' / 'test').is_dir():
        return data / 'real', data.resolve().name
    name = data.resolve().parent.name if data.resolve().name == 'real' else data.resolve().name
    return data, name


def load_label(path: Path, size: Optional[int] = None) -> np.ndarray:
    """A label map as uint8 (theirs: `np.load(...).astype('uint8')`), resized to size x size by nearest neighbour
    (`cv2.INTER_NEAREST`) when `size` is given."""
    label = np.load(path, allow_pickle=False).astype('uint8')
    if size is not None and label.shape != (size, size):
        import cv2

        label = cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)
    return label


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the size `a` is `b` scaled, each side rounded (within a pixel)."""
    return max((a[0] - 1) / b[0], (a[1] - 1) / b[1]) < min((a[0] + 1) / b[0], (a[1] + 1) / b[1])


def _check_label(path: Path, image: Path, image_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(the largest class in a label file (IGNORE excluded; -1 when all ignored), its (H, W)), after checking it
    against its image of size `image_hw`."""
    try:
        label = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PixelDataError(f'{path} cannot be read as a .npy label map ({e}).') from e
    if label.ndim != 2 or min(label.shape) < 1:
        raise PixelDataError(f'{path} has shape {label.shape}; a label map is 2-D (H, W) with one class per pixel.')
    if not _same_aspect(label.shape, image_hw):
        raise PixelDataError(f'{path} is {label.shape[0]} x {label.shape[1]} (H x W) but its image {image.name} is '
                             f'{image_hw[0]} x {image_hw[1]}: another aspect ratio, it would be stretched. Give each '
                             'image a label map of its size (or its aspect ratio).')
    if label.dtype.kind not in 'iub' and not (label.dtype.kind == 'f' and np.all(label == np.round(label))):
        raise PixelDataError(f'{path} holds {label.dtype} values; labels are integer class indices (255: ignore).')
    values = np.unique(label)
    if values.min() < 0 or values.max() > IGNORE:
        raise PixelDataError(f'{path} has labels outside 0..255 ({values.min()}..{values.max()}); classes are 0..N-1 '
                             'and 255 marks ignored pixels.')
    kept = values[values != IGNORE]
    return int(kept.max()) if kept.size else -1, label.shape


def load_pixel_dataset(data: str | Path, classes: Optional[int] = None) -> PixelDataset:
    """The checked dataset at `data`. `classes` defaults to DDPM-segmentation's number_class of a known category
    (horse_21: 21, ...), else the largest label + 1."""
    from ..data.images import ImageError, image_size

    root, name = _root(Path(data))
    splits: dict[str, list[PixelItem]] = {}
    largest, resized = -1, []
    for split in ('train', 'test'):
        folder = root / split
        if not folder.is_dir():
            raise PixelDataError(f'{folder}: no such folder. DDPM-segmentation\'s layout is <dataset>/real/train and '
                                 '<dataset>/real/test, each with images and same-named .npy label maps.')
        images = list_images(folder)
        if not images:
            raise PixelDataError(f'{folder} holds no images (.jpg, .jpeg, .png, .gif).')
        items = []
        for image in images:
            label = image.with_suffix('.npy')
            if not label.is_file():
                raise PixelDataError(f'{image} has no label map {label.name} beside it; every image needs one.')
            try:
                w, h = image_size(image)
            except ImageError as e:
                raise PixelDataError(f'{image} cannot be read: {e}') from e
            top, shape = _check_label(label, image, (h, w))
            largest = max(largest, top)
            if shape != (h, w):
                resized.append(f'{label.name} ({shape[0]} x {shape[1]} for a {h} x {w} image)')
            items.append(PixelItem(image, label, split))
        splits[split] = items
    if resized:
        warnings.warn(f'{len(resized)} label map{"s differ" if len(resized) > 1 else " differs"} in size from '
                      f'{"their images" if len(resized) > 1 else "its image"} ({", ".join(resized[:3])}'
                      f'{", ..." if len(resized) > 3 else ""}): the same aspect ratio, resized by nearest neighbour.',
                      stacklevel=2)
    if largest < 0:
        raise PixelDataError(f'{root}: every label is 255 (ignored); nothing to learn.')
    if classes is None:
        classes = CATEGORY_CLASSES.get(name, largest + 1)
    if classes < 2:
        raise PixelDataError(f'{root}: {classes} class; segmentation needs at least 2 (give --classes).')
    if largest >= classes:
        raise PixelDataError(f'{root} has label {largest}, but {classes} classes (0..{classes - 1}) were expected; '
                             'give --classes with the number of classes.')
    if classes >= IGNORE:
        raise PixelDataError(f'--classes {classes}: at most 255 classes (label 255 marks ignored pixels).')
    return PixelDataset(root, name, splits['train'], splits['test'], classes)
