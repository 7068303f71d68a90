"""`diffbackbone eval hpatches`: homography estimation on HPatches, DIFT's protocol (`eval_hpatches.py` +
`eval_homography.py`).

Each image is resized to size x size (aspect ratio not kept), mapped to [-1, 1] and run once (batched, cached); the
descriptor of a keypoint is the tap's map sampled bilinearly (`grid_sample`, zero padding, `align_corners=False`) at
the keypoint normalised by the centre of the original image, `(p - c) / c` with `c = ((W - 1) / 2, (H - 1) / 2)`, as
DIFT does. Keypoints are deduplicated; image 1 is matched with images 2..6 by mutual nearest neighbours (cosine, or L2);
`cv2.findHomography` (LMEDS, or RANSAC with a 3 px threshold) fits H from the matches; the error is the mean distance of
image 1's four corners mapped by the estimate and by the true H_1_k. Accuracy at e px: the percent of the 5 x
sequences pairs with error <= e, over all sequences and over the i_* (illumination) and v_* (viewpoint) ones. A pair
with fewer than 4 mutual matches, or where OpenCV finds no homography, counts as wrong (DIFT's script would stop).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .feature_cache import FeatureCache
from .hpatches_data import MIN_DISTANCE, NUM_KEYPOINTS, QUALITY, HPatchesError, HSequence, corner_error, load_hpatches

__all__ = ['THRESHOLDS', 'descriptors', 'mutual_nn', 'estimate_homography', 'PairResult', 'Scores', 'evaluate',
           'SequenceDescriptors', 'run_hpatches', 'HPatchesError']

THRESHOLDS = (1, 3, 5)  # px, DIFT's np.linspace(1, 5, 3)
DescribeFn = Callable[[HSequence], list[torch.Tensor]]  # a sequence -> (N_k, C) descriptors of its six images


def descriptors(feat: torch.Tensor, keypoints: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """(N, C) descriptors of a (C, h, w) map at keypoints (N, 2) x, y in pixels of the original (W, H) image."""
    w, h = size
    kp = torch.as_tensor(keypoints, dtype=torch.float32, device=feat.device)
    c = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], device=feat.device)
    grid = ((kp - c) / c).view(1, -1, 1, 2)
    out = F.grid_sample(feat[None].float(), grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return out[0, :, :, 0].T


def mutual_nn(a: torch.Tensor, b: torch.Tensor, metric: str = 'cosine') -> np.ndarray:
    """(M, 2) index pairs (i in a, j in b) that are each other's nearest neighbour, by cosine similarity or L2."""
    if metric == 'cosine':
        sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    elif metric == 'l2':
        sim = -((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T)
    else:
        raise InputError(f"metric must be 'cosine' or 'l2', got {metric!r}.")
    nn12, nn21 = sim.argmax(dim=1), sim.argmax(dim=0)
    ids = torch.arange(len(a), device=a.device)
    keep = nn21[nn12] == ids
    return torch.stack([ids[keep], nn12[keep]], dim=1).cpu().numpy()


def estimate_homography(pts_a: np.ndarray, pts_b: np.ndarray, method: str = 'lmeds') -> Optional[np.ndarray]:
    """H mapping pts_a onto pts_b by OpenCV (LMEDS or RANSAC, reprojection threshold 3 px); None when it finds none."""
    import cv2

    if len(pts_a) < 4:
        return None
    flag = {'lmeds': cv2.LMEDS, 'ransac': cv2.RANSAC}[method]
    h, _ = cv2.findHomography(pts_a.reshape(-1, 1, 2).astype(np.float32), pts_b.reshape(-1, 1, 2).astype(np.float32),
                              flag, ransacReprojThreshold=3)
    return h


@dataclass
class PairResult:
    sequence: str
    image: int  # k of H_1_k
    matches: int
    error: float  # mean corner error, px (inf: no homography)


@dataclass
class Scores:
    """Homography accuracy (percent) of a list of pair results."""
    pairs: list[PairResult] = field(default_factory=list)

    def summary(self, kind: Optional[str] = None) -> dict[str, Optional[float]]:
        ps = [p for p in self.pairs if kind is None or p.sequence[0] == kind]
        """Accuracy at each threshold, number of pairs and mean mutual matches (None without pairs of that kind)."""
        out: dict[str, Optional[float]] = {f'acc@{t}px': 100 * sum(p.error <= t for p in ps) / len(ps) if ps else None
                                           for t in THRESHOLDS}
        out.update(num_pairs=len(ps), mean_matches=sum(p.matches for p in ps) / len(ps) if ps else None)
        return out


def evaluate(sequences: Sequence[HSequence], describe: DescribeFn, metric: str = 'cosine', method: str = 'lmeds',
             device: str | torch.device = 'cpu', progress: bool = False) -> Scores:
    """Match image 1 of each sequence with images 2..6 and score the homographies; `describe(seq)` gives the six
    images' (N_k, C) descriptors at `seq.keypoints`."""
    from tqdm import tqdm

    scores = Scores()
    with torch.inference_mode():
        for seq in tqdm(sequences, unit='seq', desc='matching', disable=not progress):
            desc = [d.to(device) for d in describe(seq)]
            for k in range(2, 7):
                m = mutual_nn(desc[0], desc[k - 1], metric)
                h = estimate_homography(seq.keypoints[0][m[:, 0]], seq.keypoints[k - 1][m[:, 1]], method)
                scores.pairs.append(PairResult(seq.name, k, len(m), corner_error(h, seq.homographies[k - 2],
                                                                                 seq.sizes[0])))
    return scores


class SequenceDescriptors:
    """Descriptors of a sequence's images at its keypoints: from the cache when present (and made at the same
    keypoints), else computed in batches and cached."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module], size: Optional[int], batch_size: int = 8,
                 cache: Optional[FeatureCache] = None):
        self.model_fn, self.model = model_fn, None  # built only when something is missing from the cache
        self.size, self.batch_size, self.cache = size, batch_size, cache
        self.computed = 0

    def _cached(self, seq: HSequence, i: int) -> Optional[torch.Tensor]:
        if self.cache is None:
            return None
        got = self.cache.get(seq.name, seq.images[i].name, seq.images[i])
        if not isinstance(got, dict) or set(got) != {'keypoints', 'descriptors'}:
            return None
        if not torch.equal(got['keypoints'], torch.from_numpy(seq.keypoints[i])):
            return None  # other keypoints: compute again
        return got['descriptors']

    def __call__(self, seq: HSequence) -> list[torch.Tensor]:
        from ..correspondence import image_features

        out: dict[int, torch.Tensor] = {i: d for i in range(6) if (d := self._cached(seq, i)) is not None}
        todo = [i for i in range(6) if i not in out]
        for start in range(0, len(todo), self.batch_size):
            if self.model is None:
                self.model = self.model_fn()
            batch = todo[start:start + self.batch_size]
            feats = image_features(self.model, [seq.images[i] for i in batch], self.size)
            for i, f in zip(batch, feats):
                d = descriptors(f, seq.keypoints[i], seq.sizes[i]).cpu()
                if self.cache:
                    self.cache.put(seq.name, seq.images[i].name,
                                   {'keypoints': torch.from_numpy(seq.keypoints[i]), 'descriptors': d}, seq.images[i])
                out[i] = d
            self.computed += len(batch)
        return [out[i] for i in range(6)]


def _table(scores: Scores) -> str:
    head = f'{"sequences":<14}{"pairs":>7}' + ''.join(f'{f"acc@{t}px":>10}' for t in THRESHOLDS) + f'{"matches":>9}'
    rows = [head, '-' * len(head)]
    for kind, label in (('i', 'illumination'), ('v', 'viewpoint'), (None, 'all')):
        s = scores.summary(kind)
        if not s['num_pairs']:
            continue
        rows.append(f'{label:<14}{s["num_pairs"]:>7}' + ''.join(f'{s[f"acc@{t}px"]:>10.2f}' for t in THRESHOLDS)
                    + f'{s["mean_matches"]:>9.1f}')
    return '\n'.join(rows)


def run_hpatches(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval hpatches`."""
    from ..data.outputs import write_json
    from ..cli_args import check_size_fits
    from .common import check_outputs, eval_model_kwargs, feature_cache, model_builder

    if args.taps is None or len(args.taps) != 1:
        raise InputError(f'--taps takes exactly one tap (DIFT: us9, their up_ft_index=2), got {args.taps}.')
    tap = args.taps[0]
    check_outputs(args, [args.data, args.keypoints])
    check_size_fits(args.size, args.batch_size, args.device, model=args.model)
    sequences = load_hpatches(args.data, args.keypoints, args.limit)  # everything checked before any model is built
    kwargs = eval_model_kwargs(args, default_timestep=0)
    model_fn = model_builder(args, tap, kwargs)
    keypoints = (f'files:{Path(args.keypoints).resolve()}' if args.keypoints
                 else f'opencv-shi-tomasi:{NUM_KEYPOINTS}:{QUALITY}:{MIN_DISTANCE}')
    cache = feature_cache(args, tap, kwargs, size=args.size, keypoints=keypoints,
                          protocol='hpatches-stretch-[-1,1]-grid_sample', version=1)
    describe = SequenceDescriptors(model_fn, args.size, args.batch_size, cache)
    scores = evaluate(sequences, describe, args.metric, args.method, device=args.device, progress=True)
    print(_table(scores))
    s = scores.summary()
    print(f'{args.model} {tap} {kwargs}: homography accuracy ' + ', '.join(f'{s[f"acc@{t}px"]:.2f}% at {t} px'
                                                                            for t in THRESHOLDS)
          + f' ({s["num_pairs"]} pairs, {describe.computed} images run, the rest from the cache)')
    if args.json:
        result = dict(overall=s, illumination=scores.summary('i'), viewpoint=scores.summary('v'), model=args.model,
                      weights=args.weights, tap=tap, model_kwargs=kwargs, size=args.size, metric=args.metric,
                      method=args.method, keypoints=keypoints,
                      pairs=[dict(sequence=p.sequence, image=p.image, matches=p.matches,
                                  error=p.error if math.isfinite(p.error) else None) for p in scores.pairs])
        write_json(args.json, result, 'eval hpatches')
        print(f'wrote {args.json}')
    return 0
