"""`diffbackbone eval pixel`: label-scarce segmentation, DDPM-segmentation's protocol as Meng et al.'s
`scarce_segmentation/task-pixel.py` runs it.

Their steps (tap resizing, the MLP ensemble and its early stop, mIoU, the uncertainty) and our one departure (memory
stays bounded: pixels sampled from native-size maps, `PixelSampler`): docs/tasks.md#label-scarce-segmentation."""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from ..errors import InputError
from .pixel_data import IGNORE, PixelDataError, PixelDataset, PixelItem, load_label, load_pixel_dataset
from .pixel_pictures import SplitPictures, check_pictures, palette

__all__ = ['PixelClassifier', 'PixelSampler', 'TrainConfig', 'SplitResult', 'Prediction', 'MENG_CHANNELS',
           'preset_channels', 'split_items', 'train_labels', 'train_ensemble', 'predict_image', 'top_tenth_mean',
           'iou_scores', 'evaluate_split',
           'takes_meng_t', 'pixel_model_kwargs', 'run_pixel', 'PixelDataError']

MIN_PIXELS = 20  # a class with fewer pixels in a training image is ignored there (theirs)
# Meng et al.'s --feature_len of each setting (scarce_segmentation/README.md), by (our model, our preset).
MENG_CHANNELS = {('sd15', 'gdf_legacy'): ('Legacy-v1.5', 3520), ('sdxl', 'gdf_legacy'): ('Legacy-XL', 2240),
                 ('sd15', 'gdf_practical'): ('Ours-v1.5', 3520), ('sdxl', 'gdf_practical'): ('Ours-XL', 3840)}


class PixelClassifier(nn.Module):
    """DDPM-segmentation's (datasetGAN's) pixel MLP: widths 128/32 below 30 classes, 256/128 from 30."""

    def __init__(self, classes: int, dim: int):
        super().__init__()
        a, b = (128, 32) if classes < 30 else (256, 128)
        self.layers = nn.Sequential(nn.Linear(dim, a), nn.ReLU(), nn.BatchNorm1d(a), nn.Linear(a, b), nn.ReLU(),
                                    nn.BatchNorm1d(b), nn.Linear(b, classes))
        for m in self.layers:
            if isinstance(m, nn.Linear):  # their init_weights('normal', 0.02); BatchNorm1d keeps its defaults
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _nearest(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output position of `F.interpolate(mode='nearest')` along one axis (PyTorch's kernel:
    floor(i * in / out) in float32, clamped)."""
    if n_in == n_out:
        return torch.arange(n_out)
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    return (torch.arange(n_out, dtype=torch.float32) * scale).floor().long().clamp_max(n_in - 1)


def _axis(n_in: int, n_out: int, via: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, weight of i1) of `F.interpolate(mode='bilinear', align_corners=False)` along one axis; with `via`,
    of the bilinear resize of the map first resized to `via` by nearest neighbour (indices into the native map)."""
    n_mid = n_in if via is None else via
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_mid / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_mid - 1)
    i1, w = (i0 + 1).clamp_max(n_mid - 1), (src - i0).float()
    if via is not None:
        near = _nearest(n_in, via)
        i0, i1 = near[i0], near[i1]
    return i0, i1, w


class PixelSampler:
    """Reads pixels of label-size maps from native-size tap maps: what `F.interpolate(map, (L, L), mode='bilinear')`
    gives at those pixels, without making the (C, L, L) map. With `aggregate` (Meng et al.'s
    `extract_feature.py --aggregate_output`), each map is first resized to `aggregate` x `aggregate` by nearest
    neighbour (their `F.interpolate(map, largest)`), then bilinearly to L.

    Maps are held channels-last, (N, h, w, C) per tap; a pixel is (image n, flat position y * L + x).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], size: int,
                 aggregate: Union[None, int, Sequence[Optional[int]]] = None):
        self.size = size
        sides = aggregate if isinstance(aggregate, Sequence) else [aggregate] * len(shapes)
        self.axes = [(_axis(h, size, a), _axis(w, size, a)) for (_, h, w), a in zip(shapes, sides, strict=True)]
        self.dim = sum(c for c, _, _ in shapes)

    def __call__(self, maps: Sequence[torch.Tensor], n: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(P, C) float32 features of pixels `pos` of images `n` (index tensors on the maps' device)."""
        y, x = pos // self.size, pos % self.size
        out = []
        for m, ((y0, y1, wy), (x0, x1, wx)) in zip(maps, self.axes):
            y0, y1, wy = y0.to(m.device)[y], y1.to(m.device)[y], wy.to(m.device)[y, None]
            x0, x1, wx = x0.to(m.device)[x], x1.to(m.device)[x], wx.to(m.device)[x, None]
            top = m[n, y0, x0].float() * (1 - wx) + m[n, y0, x1].float() * wx
            bottom = m[n, y1, x0].float() * (1 - wx) + m[n, y1, x1].float() * wx
            out.append(top * (1 - wy) + bottom * wy)
        return torch.cat(out, dim=1)


@dataclass
class TrainConfig:
    """The ensemble's training settings (defaults: DDPM-segmentation's)."""
    classes: int
    members: int = 10
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 50  # stop when more than this many batches in a row bring no new lowest loss ...
    patience_from_epoch: int = 4  # ... counted from this epoch on (theirs: `if epoch > 3`)
    label_size: int = 256
    memory_bytes: int = 4 << 30
    device: str = 'cpu'


@dataclass
class SplitResult:
    seed: int
    train: list[str]
    test: list[str]
    miou: float
    iou: list[float]
    epochs: list[int] = field(default_factory=list)  # epochs each member trained (early stop)
    seconds: float = 0.0
    uncertainty: list[float] = field(default_factory=list)  # their top_k score of each test image

    @property
    def mean_uncertainty(self) -> float:
        """Their "Mean uncertainty": the mean of the test images' scores."""
        return sum(self.uncertainty) / len(self.uncertainty) if self.uncertainty else float('nan')


@dataclass
class Prediction:
    """One test image's prediction (label size)."""
    labels: np.ndarray  # (L, L) uint8: the members' majority vote
    uncertainty: np.ndarray  # (L, L) float32: entropy of the mean softmax less the mean of the members' entropies
    score: float  # their top_k: the mean of the highest tenth of `uncertainty`


class _Maps:
    """Native-size tap maps of images from the store, channels-last float16 on the device."""

    def __init__(self, store, taps: Sequence[str], device: str):
        self.store, self.taps, self.device = store, list(taps), device

    def load(self, paths: Sequence[str]) -> list[torch.Tensor]:
        per_tap: list[list[torch.Tensor]] = [[] for _ in self.taps]
        for p in paths:
            feats = self.store.get(p, self.taps)
            for i, t in enumerate(self.taps):
                per_tap[i].append(feats[t].permute(1, 2, 0).to(torch.float16))
        return [torch.stack(m).to(self.device) for m in per_tap]


def split_items(dataset: PixelDataset, seed: int, shuffle: bool = True, max_train: int = 50, max_test: int = 650
                ) -> tuple[list[PixelItem], list[PixelItem]]:
    """(train, test) of one run: theirs `shuffle_split` (pool train + test, shuffle with `seed`, the first len(train)
    train) and `num_images` caps (training_number 50, testing_number 650)."""
    pooled = list(dataset.train) + list(dataset.test)
    if shuffle:
        random.Random(seed).shuffle(pooled)
    n = len(dataset.train)
    return pooled[:n][:max_train], pooled[n:][:max_test]


def train_labels(item: PixelItem, classes: int, size: int) -> np.ndarray:
    """A training label map at size x size with small annotations (< 20 pixels of a class) set to 255, as theirs."""
    label = load_label(item.label, size)
    for c in range(classes):
        count = int((label == c).sum())
        if 0 < count < MIN_PIXELS:
            label[label == c] = IGNORE
    return label


def _batches(total: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(total, generator=generator)
    for i in range(total // batch_size):  # drop_last=True
        yield perm[i * batch_size:(i + 1) * batch_size]


def train_ensemble(maps: _Maps, sampler: PixelSampler, items: Sequence[PixelItem], cfg: TrainConfig, seed: int,
                   progress: bool = False) -> tuple[list[PixelClassifier], list[int]]:
    """The trained members and the epochs each ran. Training images' maps stay at native size; each batch samples
    its pixels from them (`PixelSampler`)."""
    from tqdm import tqdm

    labels = [torch.from_numpy(train_labels(it, cfg.classes, cfg.label_size)).flatten() for it in items]
    valid = [torch.nonzero(lab != IGNORE).flatten().to(torch.int32) for lab in labels]
    targets = [lab.long() for lab in labels]
    per_image = 2 * sum(c * h * w for c, h, w in maps_shapes(maps))
    group = max(1, min(len(items), cfg.memory_bytes // max(1, per_image)))
    paths = [str(it.image) for it in items]
    resident = maps.load(paths) if group >= len(items) else None  # all fit: one pool, shuffled as theirs
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    members, epochs_run = [], []
    device = cfg.device
    for m in tqdm(range(cfg.members), desc='ensemble', unit='model', disable=not progress):
        model = PixelClassifier(cfg.classes, sampler.dim).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        loss_fn = nn.CrossEntropyLoss()
        best, count, stop, epoch = math.inf, 0, False, 0
        for epoch in range(cfg.epochs):
            order = list(range(len(items))) if resident is not None else torch.randperm(len(items), generator=gen)
            for start in range(0, len(items), group):
                ids = [int(i) for i in order[start:start + group]]
                gmaps = resident if resident is not None else maps.load([paths[i] for i in ids])
                local = torch.arange(len(ids)) if resident is None else torch.tensor(ids)
                n = torch.cat([torch.full((len(valid[i]),), int(j), dtype=torch.long) for i, j in zip(ids, local)])
                pos = torch.cat([valid[i].long() for i in ids])
                y_all = torch.cat([targets[i][valid[i].long()] for i in ids])
                for b in _batches(len(pos), cfg.batch_size, gen):
                    x = sampler(gmaps, n[b].to(device), pos[b].to(device))
                    y = y_all[b].to(device)
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    opt.step()
                    if epoch >= cfg.patience_from_epoch:
                        if loss.item() < best:
                            best, count = loss.item(), 0
                        else:
                            count += 1
                        if count > cfg.patience:
                            stop = True
                            break
                if stop:
                    break
            if stop:
                break
        members.append(model.eval())
        epochs_run.append(epoch + 1)
    return members, epochs_run


def maps_shapes(maps: _Maps) -> list[list[int]]:
    shapes = maps.store.config.get('shapes') or {}
    return [list(shapes[t]) for t in maps.taps]


def top_tenth_mean(values: torch.Tensor) -> torch.Tensor:
    """Their per-image score: `values.sort()[0][-int(n / 10):].mean()` (all values when n < 10, as `[-0:]` is)."""
    return values.sort()[0][-int(values.shape[0] / 10):].mean()


@torch.no_grad()
def predict_image(members: Sequence[nn.Module], image_maps: list[torch.Tensor], sampler: PixelSampler,
                  chunk: int = 8192) -> Prediction:
    """One image's prediction, as their `predict_labels`, in chunks of pixels: the most frequent argmax of the
    members (`torch.mode`) and the uncertainty (entropy of the members' mean softmax less their mean entropy)."""
    size = sampler.size
    device = image_maps[0].device
    labels = torch.empty(size * size, dtype=torch.long)
    uncertainty = torch.empty(size * size, dtype=torch.float32)
    for start in range(0, size * size, chunk):
        pos = torch.arange(start, min(start + chunk, size * size), device=device)
        x = sampler(image_maps, torch.zeros_like(pos), pos)
        logits = [m(x) for m in members]
        mean = logits[0].softmax(dim=1)
        for z in logits[1:]:
            mean += z.softmax(dim=1)
        mean = mean / len(logits)
        entropy = torch.stack([Categorical(logits=z).entropy() for z in logits]).mean(0)
        uncertainty[start:start + len(pos)] = (Categorical(mean).entropy() - entropy).float().cpu()
        votes = torch.stack([torch.max(z.log_softmax(dim=1), dim=1)[1] for z in logits], dim=-1)  # their oht_to_scalar
        labels[start:start + len(pos)] = torch.mode(votes.cpu(), dim=-1)[0]
    return Prediction(labels.view(size, size).numpy().astype(np.uint8), uncertainty.view(size, size).numpy(),
                      float(top_tenth_mean(uncertainty)))


def iou_scores(intersections: np.ndarray, unions: np.ndarray) -> tuple[float, list[float]]:
    """(mIoU, IoU per class) from summed counts, as theirs: intersection / (1e-8 + union), every class counted."""
    iou = intersections / (1e-8 + unions)
    return float(iou.mean()), [float(v) for v in iou]


def evaluate_split(maps: _Maps, sampler: PixelSampler, train: Sequence[PixelItem], test: Sequence[PixelItem],
                   cfg: TrainConfig, seed: int, progress: bool = False,
                   on_image: Optional[Callable[[PixelItem, Prediction], None]] = None) -> SplitResult:
    """Train the ensemble on `train`, then mIoU and uncertainty over `test`; `on_image` gets each test image's
    prediction (the pictures)."""
    start = time.perf_counter()
    members, epochs = train_ensemble(maps, sampler, train, cfg, seed, progress)
    inter, union = np.zeros(cfg.classes), np.zeros(cfg.classes)
    scores = []
    for it in test:
        prediction = predict_image(members, maps.load([str(it.image)]), sampler)
        if on_image is not None:
            on_image(it, prediction)
        pred, gt = prediction.labels, load_label(it.label, cfg.label_size)
        scores.append(prediction.score)
        for c in range(cfg.classes):
            p, g = pred == c, gt == c
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    miou, iou = iou_scores(inter, union)
    return SplitResult(seed, [it.image.name for it in train], [it.image.name for it in test], miou, iou, epochs,
                       time.perf_counter() - start, scores)


def preset_channels(model: str, preset: str) -> int:
    """Channels of a preset's taps concatenated, from the model built on the meta device (no weights, no memory)."""
    import timm

    from .. import models  # noqa: F401  (registers the models)

    with torch.device('meta'):
        m = timm.create_model(model, pretrained=False, features_only=True, out_indices=(preset,))
    return sum(i['num_chs'] for i in m.feature_info.get_dicts())


# ---- the command -------------------------------------------------------------------------------------------------
def takes_meng_t(name: str) -> bool:
    """Whether a model takes `meng_t` (the noisy SD / SDXL UNets), built on the meta device (no weights)."""
    import timm

    from .. import models  # noqa: F401  (registers the models)

    if not timm.is_model(name):
        return False
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False)
    return getattr(model, 'meng_scheduler', None) is not None and not model.clean


def pixel_model_kwargs(args: argparse.Namespace) -> dict:
    """The model's kwargs: `--timestep` (default 50) is Meng et al.'s t, passed as `meng_t` to the SD / SDXL UNets
    (their t = 50 is UNet timestep 51 on SD1.5); a "timestep" or "meng_t" in `--model-kwargs` is kept as given."""
    from ..cli_args import model_kwargs
    from .common import eval_model_kwargs

    given = model_kwargs(args)
    if 'meng_t' in given:
        if args.timestep is not None:
            raise InputError('Give the timestep once: --timestep or "meng_t" in --model-kwargs, not both.')
        return given
    kwargs = eval_model_kwargs(args, default_timestep=50)  # Meng et al.'s --t 50, and --prompt
    if 'timestep' in kwargs and 'timestep' not in given and takes_meng_t(args.model):
        kwargs['meng_t'] = kwargs.pop('timestep')
    return kwargs


def _extract(args: argparse.Namespace, images: list[str], kwargs: dict) -> None:
    """Run every image into the feature store (resumable; images stored already are skipped)."""
    from ..data.extract import ExtractJob, extract_features

    extract_features(ExtractJob(
        images=images, out=args.store, model=args.model, taps=args.taps, size=args.size, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, weights=args.weights, random_weights=args.random_weights,
        model_kwargs=kwargs, workers=args.workers, on_error='fail', store_dtype='float16'))


def _check_paths(args: argparse.Namespace) -> None:
    from ..data.outputs import check_distinct_outputs, check_folder
    from ..cli_args import check_size_fits
    from .common import check_outputs

    store, data = Path(args.store).resolve(), Path(args.data).resolve()
    if store == data or data in store.parents or store in data.parents:
        raise InputError(f'--store {store} overlaps --data {data}: keep the feature store outside the dataset.')
    check_folder(args.store, 'store', [args.data], option='--store')  # a store of ours, resumed (as `features`)
    check_outputs(args, [args.data, args.store])
    if args.pictures:
        check_distinct_outputs({'--json': args.json}, {'--store': args.store, '--pictures': args.pictures})
        check_folder(args.pictures, 'folder', [args.data, args.store], option='--pictures')
    check_size_fits(args.size, args.batch_size, args.device, model=args.model)
    check_size_fits(args.label_size, 1, 'cpu', '--label-size')  # labels and features of an image at N x N


def _pictures(args: argparse.Namespace, dataset: PixelDataset) -> Optional[tuple[str, list[int]]]:
    """With `--pictures`: (name, flat RGB list) of the palette, after checking the picture names and each split's
    folder (before any work)."""
    if not args.pictures:
        return None
    chosen = palette(args.palette, dataset.name, dataset.classes)
    check_pictures(args.pictures, [args.seed + k for k in range(args.splits)],
                   [it.image for it in dataset.train + dataset.test])
    return chosen


def aggregate_sides(taps: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[int]:
    """Their `--aggregate_output` side for each tap: the width of the largest tap of its model (each model of a
    multi-model backbone, `member:tap`, is extracted on its own in their code), every tap resized to it first."""
    largest: dict[str, int] = {}
    for tap, shape in zip(taps, shapes):
        model = tap.rpartition(':')[0]
        largest[model] = max(largest.get(model, 0), shape[2])
    return [largest[tap.rpartition(':')[0]] for tap in taps]


def run_pixel(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval pixel`."""
    import resource

    from ..data.outputs import write_json
    from ..data.store import FeatureStore
    for name in ('splits', 'ensemble', 'epochs', 'pixel_batch', 'label_size'):
        if getattr(args, name) < 1:
            raise InputError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}.')
    if args.memory_gb <= 0:
        raise InputError(f'--memory-gb must be positive, got {args.memory_gb}.')
    _check_paths(args)
    dataset = load_pixel_dataset(args.data, args.classes)  # checked before any model is built
    pictures = _pictures(args, dataset)
    kwargs = pixel_model_kwargs(args)
    print(f'{dataset.name}: {len(dataset.train)} train + {len(dataset.test)} test images, {dataset.classes} classes')
    _extract(args, [str(it.image.resolve()) for it in dataset.train + dataset.test], kwargs)
    store = FeatureStore(args.store)
    taps = store.taps
    shapes = [list(store.config['shapes'][t]) for t in taps]
    sampler = PixelSampler(shapes, args.label_size, aggregate=aggregate_sides(taps, shapes))
    maps = _Maps(store, taps, args.device)
    print(f'{len(taps)} taps, {sampler.dim} channels per pixel: ' + ', '.join(f'{t} {s}' for t, s in zip(taps, shapes)))
    meng = MENG_CHANNELS.get((args.model, args.taps[0])) if args.taps and len(args.taps) == 1 else None
    if meng:
        same = 'matches' if meng[1] == sampler.dim else 'DIFFERS'
        print(f"Meng et al.'s {meng[0]}: --feature_len {meng[1]} ({same})")
    cfg = TrainConfig(classes=dataset.classes, members=args.ensemble, epochs=args.epochs, batch_size=args.pixel_batch,
                      label_size=args.label_size, memory_bytes=int(args.memory_gb * (1 << 30)), device=args.device)
    results = []
    for k in range(args.splits):
        seed = args.seed + k
        train, test = split_items(dataset, seed, not args.keep_split, args.max_train, args.max_test)
        if pictures is None:
            r = evaluate_split(maps, sampler, train, test, cfg, seed, progress=True)
        else:
            with SplitPictures(args.pictures, seed, dataset.classes, pictures[1]) as out:
                r = evaluate_split(maps, sampler, train, test, cfg, seed, True,
                                   lambda it, pred: out.add(it.image, pred.labels, pred.uncertainty))
                out.commit()
        results.append(r)
        print(f'split {k + 1}/{args.splits} (seed {seed}): mIoU {100 * r.miou:.2f}, mean uncertainty '
              f'{r.mean_uncertainty:.4f} ({len(train)} train, {len(test)} test; epochs {r.epochs}; {r.seconds:.1f} s)')
    mious = np.array([r.miou for r in results]) * 100
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'{args.model} {taps if len(taps) < 5 else args.taps} on {dataset.name}: mIoU {mious.mean():.2f} +- '
          f'{mious.std():.2f} over {len(results)} split(s) (peak RSS {rss:.0f} MB)')
    if pictures is not None:
        print(f'wrote pictures to {args.pictures} (seed<S>/visualizations, predictions, uncertainty; palette '
              f'{pictures[0]})')
    if args.json:
        write_json(args.json, dict(
            dataset=dataset.name, classes=dataset.classes, model=args.model, weights=args.weights, taps=taps,
            channels=sampler.dim, model_kwargs=kwargs, label_size=args.label_size, ensemble=args.ensemble,
            epochs=args.epochs, pixel_batch=args.pixel_batch, shuffle=not args.keep_split, store=str(args.store),
            miou_mean=float(mious.mean()), miou_std=float(mious.std()),
            uncertainty_mean=float(np.mean([r.mean_uncertainty for r in results])),
            pictures=str(args.pictures) if pictures is not None else None,
            splits=[dict(seed=r.seed, miou=100 * r.miou, iou=[100 * v for v in r.iou], train=r.train, test=r.test,
                         epochs=r.epochs, seconds=r.seconds, mean_uncertainty=r.mean_uncertainty,
                         uncertainty=r.uncertainty) for r in results]), 'eval pixel')
        print(f'wrote {args.json}')
    return 0
