"""Pictures of `diffbackbone eval pixel --pictures DIR`: DDPM-segmentation's `save_predictions` (their colour maps,
`src/pixel_classifier.py` + `src/utils.py colorize_mask`, palettes of `src/data_util.py`) and the per-pixel uncertainty
of their `predict_labels`.

Per split, ``DIR/seed<S>/{visualizations,predictions,uncertainty}/<name>``, written whole or not at all: see
docs/tasks.md#label-scarce-segmentation."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.outputs import check_replaceable, is_ours, save_picture
from ..errors import InputError

__all__ = ['PALETTES', 'voc_palette', 'SUBFOLDERS', 'palette', 'picture_name', 'colorize', 'uncertainty_levels',
           'check_pictures', 'SplitPictures']

COMMAND = 'eval pixel'
SUBFOLDERS = ('visualizations', 'predictions', 'uncertainty')
# DDPM-segmentation's get_palette(category), colour per class (src/data_util.py; ffhq_34's given there as fractions,
# taken as int(fraction * 255) as theirs).
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    'ffhq_34': ((255, 255, 255), (112, 130, 107), (218, 243, 81), (61, 119, 252), (215, 237, 192), (95, 201, 83),
        (4, 126, 96), (190, 3, 144), (41, 61, 186), (5, 111, 104), (149, 226, 156), (203, 232, 247), (173, 159, 218),
        (254, 119, 98), (136, 210, 69), (44, 92, 212), (135, 170, 125), (54, 88, 120), (174, 31, 37), (98, 118, 25),
        (58, 10, 77), (146, 139, 250), (33, 245, 19), (72, 47, 66), (248, 240, 169), (99, 113, 164), (221, 100, 24),
        (155, 247, 6), (93, 170, 79), (164, 186, 243), (157, 27, 230), (86, 126, 185), (42, 235, 167),
        (240, 171, 157)),
    'bedroom_28': ((255, 255, 255), (238, 229, 102), (255, 72, 69), (124, 99, 34), (193, 127, 15), (106, 177, 21),
        (248, 213, 43), (252, 155, 83), (220, 147, 77), (99, 83, 3), (116, 116, 138), (63, 182, 24), (200, 226, 37),
        (225, 184, 161), (233, 5, 219), (142, 172, 248), (153, 112, 146), (38, 112, 254), (229, 30, 141),
        (99, 205, 255), (74, 59, 83), (186, 9, 0), (107, 121, 0), (0, 194, 160), (255, 170, 146), (255, 144, 201),
        (185, 3, 170), (221, 239, 255), (0, 0, 53)),
    'cat_15': ((255, 255, 255), (190, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (102, 102, 156),
        (152, 251, 152), (119, 11, 32), (244, 35, 232), (220, 20, 60), (52, 83, 84), (194, 87, 125), (143, 176, 255),
        (31, 102, 211), (104, 131, 101)),
    'horse_21': ((255, 255, 255), (255, 74, 70), (0, 137, 65), (0, 111, 166), (163, 0, 89), (255, 219, 229),
        (122, 73, 0), (0, 0, 166), (99, 255, 172), (183, 151, 98), (0, 77, 67), (143, 176, 255), (241, 38, 110),
        (27, 210, 105), (128, 150, 147), (228, 230, 158), (160, 136, 106), (79, 198, 1), (59, 93, 255),
        (115, 214, 209), (255, 47, 128)),
    'ade_bedroom_30': ((240, 156, 206), (69, 88, 93), (240, 49, 184), (27, 107, 126), (50, 82, 241), (54, 250, 147),
        (156, 213, 3), (176, 108, 79), (251, 150, 149), (66, 51, 34), (210, 97, 53), (30, 53, 102), (232, 164, 118),
        (204, 150, 17), (101, 86, 178), (249, 20, 213), (54, 35, 82), (157, 68, 216), (58, 161, 73), (174, 67, 67),
        (193, 181, 78), (169, 60, 178), (220, 204, 166), (4, 127, 85), (245, 106, 216), (222, 172, 168),
        (84, 148, 105), (137, 220, 89), (68, 252, 126), (29, 193, 187)),
    'celeba_19': ((255, 255, 255), (238, 229, 102), (250, 150, 50), (124, 99, 34), (193, 127, 15), (225, 96, 18),
        (220, 147, 77), (99, 83, 3), (116, 116, 138), (200, 226, 37), (225, 184, 161), (142, 172, 248),
        (153, 112, 146), (38, 112, 254), (229, 30, 141), (52, 83, 84), (194, 87, 125), (248, 213, 42), (31, 102, 211)),

}


def voc_palette() -> tuple[tuple[int, int, int], ...]:
    """PASCAL VOC's colour map (bit-interleaved class index; the DAVIS masks' too): 256 distinct colours."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


PALETTES['voc'] = voc_palette()


def palette(name: Optional[str], category: str, classes: int) -> tuple[str, list[int]]:
    """(name, flat RGB list) of the palette: `name` when given, else DDPM-segmentation's of the dataset's category
    (horse_21, ...), else VOC's. A palette with fewer colours than classes is refused (theirs paints those black)."""
    chosen = name or (category if category in PALETTES else 'voc')
    colours = PALETTES[chosen]
    if len(colours) < classes:
        raise InputError(f'--palette {chosen} has {len(colours)} colours but the dataset has {classes} classes; give '
                         '--palette voc (256 colours).')
    return chosen, [v for c in colours for v in c]


def picture_name(image: Path) -> str:
    """Their file name of an image's pictures: `image_path.split('/')[-1].split('.')[0]`."""
    return image.name.split('.')[0]


def colorize(labels: np.ndarray, flat_palette: Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 colour map of a label map: their `colorize_mask` (class index -> palette colour)."""
    from PIL import Image

    img = Image.fromarray(labels.astype(np.uint8)).convert('P')
    img.putpalette(list(flat_palette))
    return np.array(img.convert('RGB'))


def uncertainty_levels(uncertainty: np.ndarray, classes: int) -> np.ndarray:
    """Grey levels (uint8) of a per-pixel uncertainty map: 255 at ln(classes), its largest possible value."""
    return np.clip(np.rint(uncertainty / np.log(classes) * 255), 0, 255).astype(np.uint8)


def _foreign_in_split(folder: Path) -> list[str]:
    """Entries of a split's folder that are not `eval pixel`'s pictures."""
    foreign = []
    for entry in folder.iterdir():
        if entry.name not in SUBFOLDERS or not entry.is_dir() or entry.is_symlink():
            foreign.append(entry.name)
        else:
            foreign += [f'{entry.name}/{p.name}' for p in entry.iterdir() if not is_ours(p, COMMAND)]
    return foreign


def check_pictures(folder: str | Path, seeds: Sequence[int], images: Sequence[Path]) -> None:
    """Before any work: every image gets a distinct picture name (theirs: the file name up to its first dot), and
    each split's folder `seed<S>` is new or one of ours."""
    seen: dict[str, Path] = {}
    for image in images:
        name = picture_name(image)
        if not name or name in seen:
            other = f'{seen[name]} and ' if name in seen else ''
            raise InputError(f'--pictures: {other}{image} would get the same picture name "{name}" (the file name up '
                             'to its first dot, as DDPM-segmentation names them). Rename the images so that these '
                             'names differ, or leave out --pictures.')
        seen[name] = image
    for seed in seeds:
        check_replaceable(Path(folder) / f'seed{seed}', '--pictures', 'pictures', COMMAND, _foreign_in_split)


class SplitPictures:
    """The pictures of one split, written into a temporary folder beside `DIR/seed<S>` and moved into place by
    `commit` (a failure leaves no partial folder: use as a context manager)."""

    def __init__(self, folder: str | Path, seed: int, classes: int, flat_palette: Sequence[int]):
        from ..hub import umask

        self.final = Path(folder) / f'seed{seed}'
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.classes, self.palette, self._umask = classes, list(flat_palette), umask()
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f'.{self.final.name}.', suffix='.tmp'))
        for sub in SUBFOLDERS:
            (self.tmp / sub).mkdir()

    def add(self, image: Path, labels: np.ndarray, uncertainty: np.ndarray) -> None:
        """Write the pictures of one test image: `labels` (H, W) classes, `uncertainty` (H, W) their per-pixel
        uncertainty."""
        from PIL import Image

        name = picture_name(image)
        save_picture(Image.fromarray(colorize(labels, self.palette)), self.tmp / 'visualizations' / f'{name}.jpg',
                     COMMAND)
        indexed = Image.fromarray(labels.astype(np.uint8), 'P')
        indexed.putpalette(self.palette)
        save_picture(indexed, self.tmp / 'predictions' / f'{name}.png', COMMAND)
        save_picture(Image.fromarray(uncertainty_levels(uncertainty, self.classes), 'L'),
                     self.tmp / 'uncertainty' / f'{name}.png', COMMAND)

    def commit(self) -> None:
        """Move the complete folder into place (an earlier one of ours, checked up front, is replaced)."""
        for d in (self.tmp, *(self.tmp / s for s in SUBFOLDERS)):
            os.chmod(d, 0o777 & ~self._umask)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)

    def __enter__(self) -> 'SplitPictures':
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
