"""Meng et al.'s trained semantic correspondence on SPair-71k (`correspondence/task-corres.py`, after Diffusion
Hyperfeatures), from a feature store.

Their steps and our one departure (the models run once per image into a feature store, `data/store.py`):
docs/tasks.md#trained-correspondence-meng-et-al."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DiffbackboneError

__all__ = ['CorresError', 'CorresPair', 'load_split', 'rescale_points', 'points_to_idxs', 'clip_loss', 'nn_matches',
           'pck', 'CorresHead', 'StoreMaps', 'CorresConfig', 'validate', 'train_corres', 'save_head', 'load_head',
           'GRID', 'LOAD_SIZE', 'SPLIT_KEYS', 'HEAD_FORMAT']

GRID = (128, 128)  # their output_size (w, h): every tap resized to it
LOAD_SIZE = (512, 512)  # their load_size (w, h): points and maps for matching
SPLIT_KEYS = ('source_path', 'target_path', 'source_points', 'target_points', 'target_bounding_box', 'category')
HEAD_FORMAT = 'diffbackbone-corres-head-1'
LOGIT_SCALE = math.log(1 / 0.07)


class CorresError(DiffbackboneError, ValueError):
    """A split file, its images, a head checkpoint or a run folder that cannot be used; the message says why."""


# ---- their split files ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorresPair:
    """One pair of a split file. Sizes (w, h) of the image files; points (K, 2) as (x, y) in original pixels."""
    src: str
    trg: str
    category: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_points: np.ndarray = field(compare=False)
    trg_points: np.ndarray = field(compare=False)
    bbox: tuple[float, float, float, float]


def _points(value, file: Path, i: int, key: str) -> np.ndarray:
    try:
        pts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        pts = np.zeros((0,))
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or not np.isfinite(pts).all():
        raise CorresError(f'{file}: pair {i}: {key} must be a non-empty list of [x, y] points, got {value!r:.80}.')
    return pts


def load_split(file: str | Path, images: str | Path, limit: Optional[int] = None) -> list[CorresPair]:
    """The pairs of one of their split files (`spair_71k_train.json`, ...), every image found and sized; `limit`: the
    first N pairs."""
    from ..data.images import ImageError, image_size

    file, images = Path(file), Path(images)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CorresError(f'{file}: not a readable JSON split file ({e}).') from None
    if not isinstance(data, list) or not data or not all(isinstance(a, dict) for a in data):
        raise CorresError(f'{file}: a split file is a non-empty JSON list of pairs with keys {", ".join(SPLIT_KEYS)} '
                          "(Diffusion Hyperfeatures' spair_71k_*.json).")
    sizes: dict[str, tuple[int, int]] = {}
    pairs = []
    for i, ann in enumerate(data[:limit] if limit else data):
        missing = [k for k in SPLIT_KEYS if k not in ann]
        if missing:
            raise CorresError(f'{file}: pair {i} lacks {", ".join(missing)} (keys of a split file: '
                              f'{", ".join(SPLIT_KEYS)}).')
        for key in ('source_path', 'target_path'):
            name = str(ann[key])
            if name not in sizes:
                path = images / name
                if not path.is_file():
                    raise CorresError(f'{file}: pair {i}: {key} {name!r}: no such image {path} (--data must be the '
                                      'SPair-71k JPEGImages folder).')
                try:
                    sizes[name] = image_size(path)
                except ImageError as e:
                    raise CorresError(f'{file}: pair {i}: {e}') from None
        src = _points(ann['source_points'], file, i, 'source_points')
        trg = _points(ann['target_points'], file, i, 'target_points')
        if len(src) != len(trg):
            raise CorresError(f'{file}: pair {i}: {len(src)} source_points but {len(trg)} target_points.')
        try:
            bbox = tuple(float(v) for v in ann['target_bounding_box'])
        except (TypeError, ValueError):
            bbox = ()
        if len(bbox) != 4 or max(bbox[2] - bbox[0], bbox[3] - bbox[1]) <= 0:
            raise CorresError(f'{file}: pair {i}: target_bounding_box must be [left, top, right, bottom], got '
                              f'{ann["target_bounding_box"]!r}.')
        pairs.append(CorresPair(str(ann['source_path']), str(ann['target_path']), str(ann['category']),
                                sizes[str(ann['source_path'])], sizes[str(ann['target_path'])], src, trg, bbox))
    return pairs


# ---- their steps ---------------------------------------------------------------------------------------------------
def rescale_points(points_yx: np.ndarray, old_wh: Sequence[int], new_wh: Sequence[int]) -> np.ndarray:
    """(y, x) points from a (w, h) image to another (their `rescale_points`)."""
    return np.multiply(points_yx, np.array([new_wh[1] / old_wh[1], new_wh[0] / old_wh[0]]))


def points_to_idxs(points_yx: np.ndarray, size_wh: Sequence[int]) -> np.ndarray:
    """Flat row-major indices of (y, x) points on a (w, h) grid: clipped, then rounded half to even (`np.round`)."""
    y = np.clip(points_yx[:, 0], 0, size_wh[1] - 1)
    x = np.clip(points_yx[:, 1], 0, size_wh[0] - 1)
    return (size_wh[1] * np.round(y) + np.round(x)).astype(np.int64)


def clip_loss(f_src: torch.Tensor, f_trg: torch.Tensor, src_idx: torch.Tensor, trg_idx: torch.Tensor,
              logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Their `compute_clip_loss` on two (C, h, w) maps: the rows of the (hw x hw) cosine logits at the keypoints only
    (the same numbers without the hw x hw matrix), cross-entropy both ways, averaged."""
    a = F.normalize(f_src.flatten(1).T, dim=1, eps=0)  # (hw, C); their normalisation has no epsilon
    b = F.normalize(f_trg.flatten(1).T, dim=1, eps=0)
    scale = math.exp(logit_scale)
    loss_src = F.cross_entropy(scale * (a[src_idx] @ b.T), trg_idx)
    loss_trg = F.cross_entropy(scale * (b[trg_idx] @ a.T), src_idx)
    return (loss_src + loss_trg) / 2


def nn_matches(f_src: torch.Tensor, f_trg: torch.Tensor, src_yx_load: np.ndarray,
               load_wh: Sequence[int] = LOAD_SIZE) -> np.ndarray:
    """Their `find_nn_source_correspondences`: both maps bilinearly upsampled to the load size, each source keypoint's
    vector matched by cosine argmax over the target; (K, 2) (y, x) on the load grid. The upsampled maps are never
    built (`UpsampledTarget`): the same argmax up to float rounding."""
    from ..correspondence import UpsampledTarget, sample_points

    w = load_wh[0]
    idx = points_to_idxs(src_yx_load, load_wh)
    vecs = sample_points(f_src, np.stack([idx % w, idx // w], 1).tolist(), load_wh)
    xy = UpsampledTarget(f_trg, load_wh).argmax(vecs).cpu().numpy()
    return np.stack([xy[:, 1], xy[:, 0]], 1).astype(np.float64)


def pck(pred_yx: np.ndarray, trg_yx: np.ndarray, size_wh: Sequence[int], bbox: Optional[Sequence[float]] = None,
        alpha: float = 0.1) -> np.ndarray:
    """Their `compute_pck`: per keypoint, distance <= alpha x max side of the image, or of the bounding box."""
    dist = np.linalg.norm(pred_yx - trg_yx, axis=-1)
    if bbox is None:
        return dist <= alpha * max(size_wh)
    left, top, right, bottom = bbox
    return dist <= alpha * max(right - left, bottom - top)


def pair_pck(pair: CorresPair, f_src: torch.Tensor, f_trg: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(correct by image, correct by bbox) per keypoint of one pair, as their `validate`."""
    src = rescale_points(np.flip(pair.src_points, 1), pair.src_size, LOAD_SIZE)
    trg = rescale_points(np.flip(pair.trg_points, 1), pair.trg_size, LOAD_SIZE)
    pred = rescale_points(nn_matches(f_src, f_trg, src), LOAD_SIZE, pair.trg_size)
    trg = rescale_points(trg, LOAD_SIZE, pair.trg_size)
    return pck(pred, trg, pair.trg_size), pck(pred, trg, pair.trg_size, pair.bbox)


# ---- the head ------------------------------------------------------------------------------------------------------
class CorresHead(nn.Module):
    """Their `AggregationNetwork.out`: one 3 x 3 convolution without bias (`conv`), or none (`nn`)."""

    def __init__(self, dim: int, out_dim: Optional[int]):
        super().__init__()
        self.dim, self.out_dim = dim, out_dim
        self.out = nn.Conv2d(dim, out_dim, 3, 1, 1, bias=False) if out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.out is None else self.out(x.float())


# ---- features from the store ---------------------------------------------------------------------------------------
class StoreMaps:
    """Each image's taps from a feature store, resized bilinearly to the grid and concatenated in `taps` order."""

    def __init__(self, store, images: Path, taps: Sequence[str], device: str = 'cpu', keep: int = 64):
        self.store, self.images, self.taps, self.device = store, Path(images), list(taps), device
        self.keep, self.cache = keep, {}  # a few recent images (a target shared by pairs): memory stays bounded

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.cache:
            return self.cache[name]
        maps = self.store.get(str((self.images / name).resolve()), self.taps)
        out = torch.cat([F.interpolate(maps[t][None].to(self.device).float(), GRID[::-1], mode='bilinear')[0]
                         for t in self.taps])
        if len(self.cache) >= self.keep:
            self.cache.pop(next(iter(self.cache)))
        self.cache[name] = out
        return out


# ---- training ------------------------------------------------------------------------------------------------------
@dataclass
class CorresConfig:
    """What `train corres` runs (their defaults)."""
    epochs: int = 2
    pairs_per_epoch: int = 5000
    lr: float = 5e-4
    weight_decay: float = 0.01
    val_every: int = 500
    log_every: int = 100
    seed: int = 0
    keep_checkpoints: int = 2


def validate(head: CorresHead, maps: Callable[[str], torch.Tensor], pairs: Sequence[CorresPair],
             progress: bool = False) -> dict[str, float]:
    """PCK@0.1 (percent) by image and by bounding box, pooled over every keypoint (their `validate`)."""
    from tqdm import tqdm

    by_img, by_bbox = [], []
    with torch.no_grad():
        for p in tqdm(pairs, unit='pair', desc='validation', disable=not progress, leave=False):
            a, b = pair_pck(p, head(maps(p.src)[None])[0], head(maps(p.trg)[None])[0])
            by_img.append(a)
            by_bbox.append(b)
    img, bbox = np.concatenate(by_img), np.concatenate(by_bbox)
    return dict(pck_img=100 * img.sum() / len(img), pck_bbox=100 * bbox.sum() / len(bbox), pairs=len(pairs),
                points=int(len(img)))


def train_step(head: CorresHead, opt: torch.optim.Optimizer, f_src: torch.Tensor, f_trg: torch.Tensor,
               pair: CorresPair) -> float:
    """One of their steps: points at the 128 grid, the loss on the head's maps, backward, AdamW step."""
    src = rescale_points(np.flip(pair.src_points, 1), pair.src_size, GRID)
    trg = rescale_points(np.flip(pair.trg_points, 1), pair.trg_size, GRID)
    src_idx = torch.from_numpy(points_to_idxs(src, GRID)).to(f_src.device)
    trg_idx = torch.from_numpy(points_to_idxs(trg, GRID)).to(f_src.device)
    opt.zero_grad()
    loss = clip_loss(head(f_src[None])[0], head(f_trg[None])[0], src_idx, trg_idx)
    loss.backward()
    opt.step()
    return loss.item()


def epoch_orders(n: int, cfg: CorresConfig) -> list[np.ndarray]:
    """Their `np.random.permutation(train_anns)[:max_steps_per_epoch]` per epoch, from one seeded stream."""
    rng = np.random.RandomState(cfg.seed)
    return [rng.permutation(n)[:cfg.pairs_per_epoch] for _ in range(cfg.epochs)]


def save_head(path: Path, head: CorresHead, meta: dict, **extra) -> None:
    """A head checkpoint (atomic: a killed run leaves the previous one whole)."""
    tmp = path.with_name(f'.{path.name}.tmp')
    torch.save(dict(format=HEAD_FORMAT, meta=meta, dim=head.dim, out_dim=head.out_dim, head=head.state_dict(),
                    **extra), tmp)
    os.replace(tmp, path)


def load_head(path: str | Path) -> tuple[CorresHead, dict]:
    """(head, checkpoint) of a file written by `train corres`."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the user's to fix)
        raise CorresError(f'{path}: not a readable head checkpoint ({type(e).__name__}: {e}).') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != HEAD_FORMAT:
        raise CorresError(f'{path}: not a correspondence head of `diffbackbone train corres`.')
    head = CorresHead(ckpt['dim'], ckpt['out_dim'])
    head.load_state_dict(ckpt['head'])
    return head, ckpt


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob('checkpoint_step_*.pt'), key=lambda p: int(p.stem.rsplit('_', 1)[1]))


def train_corres(head: CorresHead, maps: Callable[[str], torch.Tensor], train: Sequence[CorresPair],
                 val: Sequence[CorresPair], cfg: CorresConfig, out: Path, meta: dict, resume: bool = False,
                 progress: bool = True, stop_after: Optional[int] = None) -> dict:
    """Their `train`: returns the best validation PCK (img, bbox) and where the best head is. Every `val_every` steps
    a checkpoint (head, optimizer, best so far) and a validation; `resume` continues from the latest checkpoint of
    `out` exactly (same pair order, same optimizer state). `stop_after`: stop after this step (tests)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW([{'params': head.parameters(), 'lr': cfg.lr}], weight_decay=cfg.weight_decay)
    best = dict(pck_img=0.0, pck_bbox=0.0, step=None)
    last_val: Optional[dict] = None
    start = 0
    log = out / 'log.jsonl'
    if resume and _checkpoints(out):
        ckpt_path = _checkpoints(out)[-1]
        _, ckpt = load_head(ckpt_path)
        if ckpt['meta'] != meta or ckpt.get('cfg') != asdict(cfg):
            raise CorresError(f'{ckpt_path} was written by a run with other settings; resume it with the same options '
                              'or choose another --out.')
        head.load_state_dict(ckpt['head'])
        opt.load_state_dict(ckpt['optimizer'])
        best, last_val, start = ckpt['best'], ckpt['last_val'], ckpt['step'] + 1
        print(f'resumed from {ckpt_path} (step {ckpt["step"]})')
    orders = epoch_orders(len(train), cfg)
    total = sum(len(o) for o in orders)
    bar = tqdm(total=total, initial=start, unit='step', desc='train corres', disable=not progress, dynamic_ncols=True)
    step = start
    for epoch, order in enumerate(orders):
        for i, k in enumerate(order):
            step = epoch * len(order) + i
            if step < start:
                continue
            pair = train[k]
            loss = train_step(head, opt, maps(pair.src), maps(pair.trg), pair)
            bar.update(1)
            post = dict(epoch=epoch, loss=f'{loss:.4f}')
            if last_val:
                post.update(pck_img=f'{last_val["pck_img"]:.2f}', pck_bbox=f'{last_val["pck_bbox"]:.2f}')
            bar.set_postfix(post, refresh=False)
            if step % cfg.log_every == 0:
                with open(log, 'a') as f:
                    f.write(json.dumps(dict(step=step, epoch=epoch, loss=loss, time=time.time())) + '\n')
            if step > 0 and step % cfg.val_every == 0:
                last_val = validate(head, maps, val)
                if best['step'] is None or last_val['pck_bbox'] > best['pck_bbox']:
                    save_head(out / 'best.pt', head, meta, step=step, validation=last_val)
                    best['step'] = step
                best.update(pck_img=max(best['pck_img'], last_val['pck_img']),
                            pck_bbox=max(best['pck_bbox'], last_val['pck_bbox']))
                with open(log, 'a') as f:
                    f.write(json.dumps(dict(step=step, validation=last_val, best=best)) + '\n')
                save_head(out / f'checkpoint_step_{step}.pt', head, meta, step=step, optimizer=opt.state_dict(),
                          best=best, last_val=last_val, cfg=asdict(cfg))
                for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
                    old.unlink()
                bar.write(f'step {step}: loss {loss:.4f}, val PCK@0.1 img {last_val["pck_img"]:.2f} bbox '
                          f'{last_val["pck_bbox"]:.2f} (best {best["pck_img"]:.2f} / {best["pck_bbox"]:.2f})')
            if stop_after is not None and step >= stop_after:
                bar.close()
                return dict(best=best, stopped=step)
    bar.close()
    save_head(out / 'last.pt', head, meta, step=step, best=best)
    return dict(best=best, steps=total)
