"""SPair-71k test pairs (Min et al. 2019, https://cvlab.postech.ac.kr/research/SPair-71k/), read and checked.

Layout: `SPair-71k/PairAnnotation/test/*.json` (one pair each) and `SPair-71k/JPEGImages/<category>/<image>`.
Every problem (missing folders or keys, a keypoint outside its image, an image whose size disagrees with its
annotation) is found before any model runs and raises `SpairError` naming the file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.images import ImageError, image_size
from ..errors import DiffbackboneError

__all__ = ['Pair', 'SpairError', 'load_pairs', 'REQUIRED_KEYS']

REQUIRED_KEYS = ('src_imname', 'trg_imname', 'src_imsize', 'trg_imsize', 'src_kps', 'trg_kps', 'trg_bndbox',
                 'category')


class SpairError(DiffbackboneError, ValueError):
    """The dataset folder or one of its files is not usable; the message names it and says what to do."""


@dataclass(frozen=True)
class Pair:
    """One annotated pair. Sizes are (W, H); keypoints (x, y) in pixels of the original images."""
    name: str
    category: str
    src: str
    trg: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_kps: tuple[tuple[float, float], ...]
    trg_kps: tuple[tuple[float, float], ...]
    bbox: tuple[float, float, float, float]

    @property
    def bbox_threshold(self) -> float:
        """max(height, width) of the target bounding box (PCK's 'alpha_bbox' reference length)."""
        x1, y1, x2, y2 = self.bbox
        return max(y2 - y1, x2 - x1)

    @property
    def img_threshold(self) -> float:
        """max(height, width) of the target image (PCK's 'alpha_img' reference length)."""
        return float(max(self.trg_size))


def _size(value, file: Path, key: str) -> tuple[int, int]:
    try:
        w, h = int(value[0]), int(value[1])
    except (TypeError, ValueError, IndexError):
        raise SpairError(f'{file}: {key} must be [width, height, channels], got {value!r}.') from None
    if w < 1 or h < 1:
        raise SpairError(f'{file}: {key} must be positive, got {value!r}.')
    return w, h


def _points(value, size: tuple[int, int], file: Path, key: str) -> tuple[tuple[float, float], ...]:
    w, h = size
    if not isinstance(value, list) or not value:
        raise SpairError(f'{file}: {key} must be a non-empty list of [x, y] keypoints, got {value!r}.')
    out = []
    for i, p in enumerate(value):
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            raise SpairError(f'{file}: {key}[{i}] must be [x, y], got {p!r}.') from None
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise SpairError(f'{file}: {key}[{i}] = {p!r} is outside its {w}x{h} image (x in [0, {w}), y in [0, {h})). '
                             'Fix or remove this annotation file.')
        out.append((x, y))
    return tuple(out)


def _read(file: Path, images: Path, sizes: dict[Path, tuple[int, int]]) -> Pair:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SpairError(f'{file}: not a readable JSON annotation ({e}).') from e
    if not isinstance(data, dict):
        raise SpairError(f'{file}: expected a JSON object with keys {", ".join(REQUIRED_KEYS)}.')
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise SpairError(f'{file}: missing key(s) {", ".join(missing)}. SPair-71k pair annotations have '
                         f'{", ".join(REQUIRED_KEYS)}; is --data the SPair-71k folder?')
    category = str(data['category'])
    if not (images / category).is_dir():
        raise SpairError(f'{file}: category {category!r} has no folder {images / category}.')
    src_size, trg_size = _size(data['src_imsize'], file, 'src_imsize'), _size(data['trg_imsize'], file, 'trg_imsize')
    for key, size in (('src_imname', src_size), ('trg_imname', trg_size)):
        path = images / category / str(data[key])
        if path not in sizes:
            if not path.is_file():
                raise SpairError(f'{file}: {key} {data[key]!r}: no such image {path}.')
            try:
                sizes[path] = image_size(path)
            except ImageError as e:
                raise SpairError(f'{file}: {key}: {e}') from e
        if sizes[path] != size:
            raise SpairError(f'{file}: {path} is {sizes[path][0]}x{sizes[path][1]} pixels but the annotation says '
                             f'{size[0]}x{size[1]} ({key.replace("imname", "imsize")}). Use the original SPair-71k '
                             'images, unresized.')
    src_kps = _points(data['src_kps'], src_size, file, 'src_kps')
    trg_kps = _points(data['trg_kps'], trg_size, file, 'trg_kps')
    if len(src_kps) != len(trg_kps):
        raise SpairError(f'{file}: {len(src_kps)} src_kps but {len(trg_kps)} trg_kps; they must pair up.')
    try:
        bbox = tuple(float(v) for v in data['trg_bndbox'])
    except (TypeError, ValueError):
        bbox = ()
    if (len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[2] < bbox[0] or bbox[3] < bbox[1]
            or max(bbox[3] - bbox[1], bbox[2] - bbox[0]) <= 0):
        raise SpairError(f'{file}: trg_bndbox must be [x1, y1, x2, y2] with x2 >= x1, y2 >= y1 and a positive size, '
                         f'got {data["trg_bndbox"]!r}. Fix or remove this annotation file.')
    return Pair(file.name, category, str(data['src_imname']), str(data['trg_imname']), src_size, trg_size,
                src_kps, trg_kps, bbox)


def load_pairs(root: str | Path, limit: Optional[int] = None, split: str = 'test') -> list[Pair]:
    """The pairs of `root/PairAnnotation/<split>/*.json`, sorted by file name (the first `limit` if given)."""
    root = Path(root)
    ann, images = root / 'PairAnnotation' / split, root / 'JPEGImages'
    for folder in (root, ann, images):
        if not folder.is_dir():
            raise SpairError(f'{folder}: no such folder. --data must be the SPair-71k folder holding JPEGImages/ and '
                             f'PairAnnotation/{split}/ (download SPair-71k.tar.gz from '
                             'https://cvlab.postech.ac.kr/research/SPair-71k/ and unpack it).')
    files = sorted(ann.glob('*.json'))
    if not files:
        raise SpairError(f'{ann}: no .json pair annotations in it.')
    if limit is not None:
        if limit < 1:
            raise SpairError(f'--limit must be at least 1, got {limit}.')
        files = files[:limit]
    sizes: dict[Path, tuple[int, int]] = {}
    return [_read(f, images, sizes) for f in files]
