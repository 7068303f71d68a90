"""J (region similarity) and F (boundary accuracy) as the DAVIS 2017 semi-supervised evaluation computes them
(davisvideochallenge/davis2017-evaluation, `davis2017/metrics.py`, `evaluation.py`, `utils.py`; our own code).

Per object (ids 1..K of the first ground-truth mask, void 255 counted as background, as that evaluation does) and per
frame, first and last frames left out: J = |pred & gt| / |pred | gt| (1 when both are empty); F = the F-measure of the
one-pixel boundary maps, a boundary pixel matching when the other boundary lies within `bound_pix` = ceil(0.008 x the
image diagonal) pixels (a disk dilation). Per object: mean M, recall R (fraction of frames above 0.5) and decay D
(mean of the first quarter of frames minus the last). J&F = (mean over objects of J-M + mean of F-M) / 2.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .davis_data import VOID

__all__ = ['region_similarity', 'boundary_map', 'disk', 'boundary_f', 'statistics', 'evaluate_sequence', 'summarise',
           'BOUND_TH']

BOUND_TH = 0.008


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """Jaccard index of two binary masks; 1 when both are empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    union = np.logical_or(gt, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(gt, pred).sum() / union)


def boundary_map(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask: pixels that differ from their right, lower or lower-right neighbour
    (the last row and column compare along themselves only; the bottom-right pixel is never a boundary)."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8 disk: offsets with x^2 + y^2 <= r^2."""
    r = np.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).astype(np.uint8)


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of a predicted binary mask against the ground truth."""
    import cv2

    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    fg, gtb = boundary_map(pred), boundary_map(gt)
    kernel = disk(int(bound_pix))
    fg_dil = cv2.dilate(fg.astype(np.uint8), kernel).astype(bool)
    gt_dil = cv2.dilate(gtb.astype(np.uint8), kernel).astype(bool)
    n_fg, n_gt = int(fg.sum()), int(gtb.sum())
    if n_fg == 0 and n_gt == 0:
        precision = recall = 1.0
    elif n_fg == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = float((fg & gt_dil).sum() / n_fg)
        recall = float((gtb & fg_dil).sum() / n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay (first quarter's mean minus the last's) of per-frame values."""
    v = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=RuntimeWarning)
        mean, recall = float(np.nanmean(v)), float(np.nanmean(v > 0.5))
        ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
        bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def evaluate_sequence(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(K, T - 2) J and F of every object over frames 1 .. T-2 of ground-truth and predicted (H, W) label maps."""
    if len(gt) != len(pred) or len(gt) < 3:
        raise InputError(f'need the same number (>= 3) of ground-truth and predicted frames, got {len(gt)} and '
                         f'{len(pred)}.')
    first = np.where(gt[0] == VOID, 0, gt[0])
    k = int(first.max())
    frames = range(1, len(gt) - 1)
    top = max(int(pred[t].max()) for t in frames)
    if top > k:
        raise InputError(f'a predicted mask holds object id {top}, but the sequence has {k} objects.')
    j, f = np.zeros((k, len(frames))), np.zeros((k, len(frames)))
    for i, t in enumerate(frames):
        g = np.where(gt[t] == VOID, 0, gt[t])
        for obj in range(1, k + 1):
            j[obj - 1, i] = region_similarity(g == obj, pred[t] == obj)
            f[obj - 1, i] = boundary_f(g == obj, pred[t] == obj)
    return j, f


def summarise(per_sequence: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """DAVIS's global table (percent): J&F-Mean, J-Mean/Recall/Decay, F-Mean/Recall/Decay, and J/F means per object
    (`<sequence>_<id>`)."""
    rows: dict[str, list[float]] = {k: [] for k in ('JM', 'JR', 'JD', 'FM', 'FR', 'FD')}
    objects = {}
    for seq, (j, f) in per_sequence.items():
        for i in range(j.shape[0]):
            jm, jr, jd = statistics(j[i])
            fm, fr, fd = statistics(f[i])
            for key, v in zip(rows, (jm, jr, jd, fm, fr, fd)):
                rows[key].append(v)
            objects[f'{seq}_{i + 1}'] = dict(J=100 * jm, F=100 * fm)
    m = {k: 100 * float(np.mean(v)) for k, v in rows.items()}
    return {'J&F-Mean': (m['JM'] + m['FM']) / 2, 'J-Mean': m['JM'], 'J-Recall': m['JR'], 'J-Decay': m['JD'],
            'F-Mean': m['FM'], 'F-Recall': m['FR'], 'F-Decay': m['FD'], 'num_objects': len(objects),
            'per_object': objects}
