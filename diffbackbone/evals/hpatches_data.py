"""HPatches sequences (Balntas et al. 2017) and their keypoints, read and checked before any model runs.

Layout (D2-Net's download, `hpatches-sequences-release`, as DIFT's `eval_hpatches.py` reads it): one folder per
sequence, `i_*` (illumination changes) or `v_*` (viewpoint changes), holding `1.ppm` ... `6.ppm` and the homographies
`H_1_2` ... `H_1_6` (3x3 text, image 1 -> image k).

Keypoints: DIFT's precomputed SuperPoint set (`superpoint-1k/<sequence>-<k>.kp`, N x 2 text rows `x y` in pixels of the
original image). Without it, `detect_keypoints` finds the 1000 strongest Shi-Tomasi corners of each image with OpenCV
(`cv2.goodFeaturesToTrack`, quality 0.01, at least 4 px apart as SuperPoint's non-maximum suppression): SuperPoint
itself is a learned network, not in OpenCV, so figures with detected corners are not DIFT's.
Every problem raises `HPatchesError` naming the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.images import ImageError, image_size
from ..errors import DiffbackboneError

__all__ = ['HPatchesError', 'HSequence', 'load_hpatches', 'detect_keypoints', 'corner_error', 'NUM_KEYPOINTS',
           'MIN_DISTANCE']

NUM_KEYPOINTS = 1000
MIN_DISTANCE = 4  # SuperPoint's NMS distance
QUALITY = 0.01


class HPatchesError(DiffbackboneError, ValueError):
    """The dataset or keypoints folder, or one of its files, is not usable; the message names it."""


@dataclass
class HSequence:
    """One sequence: six images, their (W, H), H_1_k for k = 2..6, and each image's unique keypoints (N, 2) x, y."""
    name: str
    images: list[Path]
    sizes: list[tuple[int, int]]
    homographies: list[np.ndarray]
    keypoints: list[np.ndarray]

    @property
    def kind(self) -> str:
        """'i' (illumination) or 'v' (viewpoint)."""
        return self.name[0]


def detect_keypoints(path: Path, n: int = NUM_KEYPOINTS) -> np.ndarray:
    """The `n` strongest Shi-Tomasi corners of an image, (N, 2) float32 x, y (strongest first)."""
    import cv2

    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise HPatchesError(f'{path}: OpenCV cannot read this image.')
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=n, qualityLevel=QUALITY, minDistance=MIN_DISTANCE)
    if pts is None:
        raise HPatchesError(f'{path}: no corners found (a blank image?). Give --keypoints instead.')
    return pts.reshape(-1, 2).astype(np.float32)


def _homography(file: Path) -> np.ndarray:
    try:
        h = np.loadtxt(file, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise HPatchesError(f'{file}: not a readable 3x3 homography ({e}).') from None
    if h.shape != (3, 3) or not np.isfinite(h).all() or abs(np.linalg.det(h)) < 1e-12:
        raise HPatchesError(f'{file}: must hold an invertible 3x3 matrix of finite numbers, got shape {h.shape}.')
    return h


def _keypoints(file: Path, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    if not file.is_file():
        raise HPatchesError(f'{file}: no such keypoints file. --keypoints must hold <sequence>-<k>.kp for every image '
                            "(DIFT's superpoint-1k folder), or leave --keypoints out to detect corners with OpenCV.")
    try:
        kp = np.loadtxt(file, dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as e:
        raise HPatchesError(f'{file}: not a readable keypoints file ({e}).') from None
    if kp.ndim != 2 or kp.shape[1] != 2 or len(kp) == 0:
        raise HPatchesError(f'{file}: must hold one "x y" row per keypoint, got shape {kp.shape}.')
    bad = ~(np.isfinite(kp).all(1) & (kp[:, 0] >= 0) & (kp[:, 0] < w) & (kp[:, 1] >= 0) & (kp[:, 1] < h))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HPatchesError(f'{file}: keypoint {i} ({kp[i, 0]:g}, {kp[i, 1]:g}) is outside its {w}x{h} image.')
    return kp


def _unique(kp: np.ndarray) -> np.ndarray:
    """Rows sorted and deduplicated, as DIFT's `np.unique(..., axis=0)` before matching."""
    return np.unique(kp, axis=0)


def load_hpatches(root: str | Path, keypoints: Optional[str | Path] = None, limit: Optional[int] = None
                  ) -> list[HSequence]:
    """The sequences of `root` sorted by name (the first `limit` if given), with their keypoints; everything checked.

    `keypoints`: a folder of `<sequence>-<k>.kp` files; None detects corners with OpenCV (`detect_keypoints`)."""
    root = Path(root)
    if not root.is_dir():
        raise HPatchesError(f'{root}: no such folder. --data must be hpatches-sequences-release (the i_*/v_* sequence '
                            'folders; D2-Net\'s hpatches_sequences/download.sh fetches it).')
    if keypoints is not None and not Path(keypoints).is_dir():
        raise HPatchesError(f'--keypoints {keypoints}: no such folder (DIFT\'s superpoint-1k, unpacked).')
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise HPatchesError(f'{root}: no sequence folders in it. Is --data the hpatches-sequences-release folder?')
    if limit is not None:
        if limit < 1:
            raise HPatchesError(f'--limit must be at least 1, got {limit}.')
        folders = folders[:limit]
    out = []
    for folder in folders:
        if not folder.name.startswith(('i_', 'v_')):
            raise HPatchesError(f'{folder}: HPatches sequence folders are named i_* or v_*; remove other folders '
                                'from --data.')
        images = [folder / f'{k}.ppm' for k in range(1, 7)]
        sizes = []
        for img in images:
            if not img.is_file():
                raise HPatchesError(f'{img}: no such image; an HPatches sequence holds 1.ppm ... 6.ppm.')
            try:
                sizes.append(image_size(img))
            except ImageError as e:
                raise HPatchesError(str(e)) from e
        homs = []
        for k in range(2, 7):
            file = folder / f'H_1_{k}'
            if not file.is_file():
                raise HPatchesError(f'{file}: no such homography; an HPatches sequence holds H_1_2 ... H_1_6.')
            homs.append(_homography(file))
        if keypoints is None:
            kps = [detect_keypoints(img) for img in images]
        else:
            kps = [_keypoints(Path(keypoints) / f'{folder.name}-{k}.kp', size)
                   for k, size in zip(range(1, 7), sizes)]
        out.append(HSequence(folder.name, images, sizes, homs, [_unique(k) for k in kps]))
    return out


def corner_error(h_est: Optional[np.ndarray], h_gt: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance (px) between image 1's four corners mapped by the estimated and by the true homography, as
    DIFT's `eval_homography.py`; infinite when no homography was found."""
    if h_est is None:
        return math.inf
    w, h = size
    corners = np.array([[0, 0, 1], [0, h - 1, 1], [w - 1, 0, 1], [w - 1, h - 1, 1]], dtype=np.float64)
    true = corners @ h_gt.T
    est = corners @ h_est.T
    true, est = true[:, :2] / true[:, 2:], est[:, :2] / est[:, 2:]
    err = float(np.mean(np.linalg.norm(true - est, axis=1)))
    return err if math.isfinite(err) else math.inf
