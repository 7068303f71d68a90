"""`diffbackbone eval spair`: zero-shot semantic correspondence on SPair-71k, DIFT's protocol (`eval_spair.py`).

Each test image is resized to size x size (aspect ratio not kept), mapped to [-1, 1] and run once (batched, cached on
disk); one tap's features are upsampled bilinearly to the original image size; the source feature at each integer
keypoint is matched by cosine argmax over the target; a keypoint is correct when the match lies within 0.1 x max side
of the target bounding box (PCK@0.1 bbox) or of the target image (PCK@0.1 img, CleanDIFT's "alpha_img"). "Per image"
averages the per-pair fractions, "per point" pools all keypoints.

`--captions FILE` conditions each image on its own caption, as DiTF's `eval_spair.py` does with
`spair_detailed_captions.json` (`load_captions`: a JSON object, key = category + image file name, value = caption):
source and target each on their own, through `prompts.use_prompts`, so the model is built once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..correspondence import UpsampledTarget, normalised_map, point_features, sample_points, similarity_argmax
from ..data.outputs import check_distinct_outputs, check_file, check_folder, write_json
from ..errors import InputError
from ..models._builder import features_revision
from .common import lora_fingerprint
from .feature_cache import FeatureCache, weights_fingerprint
from .spair_data import Pair, SpairError, load_pairs

__all__ = ['ALPHA', 'PairScore', 'Scores', 'score_pair', 'score_pairs_fast', 'evaluate', 'ImageFeatures', 'run_spair',
           'spair_cache', 'SpairError', 'Captions', 'load_captions']

ALPHA = 0.1
# (category, image names) -> {image name: (C, h, w) features}, or {image name: {tap: map}} for a pair transform
FeatureFn = Callable[[str, Sequence[str]], dict[str, torch.Tensor]]
# (source features, target features) -> the two (C, h, w) maps to match (e.g. a fused model's co-PCA per pair)
PairFn = Callable[[object, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PairScore:
    category: str
    num_points: int
    correct_bbox: int
    correct_img: int


def _score(pair: Pair, matches: torch.Tensor) -> PairScore:
    """Count the pair's matches (K, 2) x, y that lie within the bbox and image thresholds of the target keypoints."""
    correct_bbox = correct_img = 0
    for (mx, my), (tx, ty) in zip(matches.tolist(), pair.trg_kps):
        dist = math.hypot(mx - tx, my - ty)
        correct_bbox += dist / pair.bbox_threshold <= ALPHA
        correct_img += dist / pair.img_threshold <= ALPHA
    return PairScore(pair.category, len(pair.src_kps), correct_bbox, correct_img)


def _src_points(pair: Pair) -> list[tuple[int, int]]:
    return [(int(x), int(y)) for x, y in pair.src_kps]


def score_pair(pair: Pair, src_feat: torch.Tensor, trg_norm: torch.Tensor) -> PairScore:
    """Match the pair's source keypoints over a `normalised_map` of the target; count the correct ones (the reference
    path: the upsampled maps are built)."""
    _, matches = similarity_argmax(point_features(src_feat, _src_points(pair), pair.src_size), trg_norm, pair.trg_size)
    return _score(pair, matches)


def score_pairs_fast(pairs: Sequence[Pair], src_feats: Sequence[torch.Tensor], target: UpsampledTarget
                     ) -> list[PairScore]:
    """Score pairs that share one target: every source keypoint of all of them in one batched match over the target
    (`UpsampledTarget`: no upsampled map is built; the same matches as `score_pair` except among pixels whose
    similarities tie to float rounding)."""
    vecs = [sample_points(f, _src_points(p), p.src_size) for p, f in zip(pairs, src_feats)]
    matches = target.argmax(torch.cat(vecs)).split([len(v) for v in vecs])
    return [_score(p, m) for p, m in zip(pairs, matches)]


@dataclass
class Scores:
    """PCK figures (percent) of a list of pair scores."""
    pairs: list[PairScore] = field(default_factory=list)

    def summary(self, category: Optional[str] = None) -> dict[str, float | int]:
        ps = [p for p in self.pairs if category is None or p.category == category]
        points = sum(p.num_points for p in ps)
        return dict(
            per_image_pck=100 * sum(p.correct_bbox / p.num_points for p in ps) / len(ps),
            per_point_pck=100 * sum(p.correct_bbox for p in ps) / points,
            per_image_pck_img=100 * sum(p.correct_img / p.num_points for p in ps) / len(ps),
            per_point_pck_img=100 * sum(p.correct_img for p in ps) / points,
            num_pairs=len(ps), num_points=points)

    def categories(self) -> list[str]:
        return sorted({p.category for p in self.pairs})


def evaluate(pairs: Sequence[Pair], features: FeatureFn, device: str | torch.device = 'cpu',
             progress: bool = False, pair_fn: Optional[PairFn] = None, fast: bool = True) -> Scores:
    """Score every pair; `features(category, names)` gives each image's (C, h, w) map, one category at a time.

    `pair_fn(src, trg)`, if given, turns the two images' features into the maps matched (computed per pair). `fast`:
    match all keypoints of the pairs sharing a target at once without building upsampled maps (`score_pairs_fast`);
    False: the reference path (`score_pair`), which upsamples both maps to the image sizes."""
    from tqdm import tqdm

    by_cat: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_cat[p.category].append(p)
    scores = Scores()
    with torch.inference_mode(), tqdm(total=len(pairs), unit='pair', desc='matching', disable=not progress) as bar:
        for cat in sorted(by_cat):
            cat_pairs = sorted(by_cat[cat], key=lambda p: (p.trg, p.name))  # reuse each target's map
            names = sorted({p.src for p in cat_pairs} | {p.trg for p in cat_pairs})
            feats = {k: ({t: m.to(device) for t, m in v.items()} if isinstance(v, dict) else v.to(device))
                     for k, v in features(cat, names).items()}
            if pair_fn is not None:
                for p in cat_pairs:
                    src_map, trg_map = pair_fn(feats[p.src], feats[p.trg])
                    if fast:
                        scores.pairs += score_pairs_fast([p], [src_map], UpsampledTarget(trg_map, p.trg_size))
                    else:
                        scores.pairs.append(score_pair(p, src_map, normalised_map(trg_map, p.trg_size)))
                    bar.update(1)
            elif fast:
                for trg in dict.fromkeys(p.trg for p in cat_pairs):
                    group = [p for p in cat_pairs if p.trg == trg]
                    target = UpsampledTarget(feats[trg], group[0].trg_size)
                    scores.pairs += score_pairs_fast(group, [feats[p.src] for p in group], target)
                    bar.update(len(group))
            else:
                trg_name, trg_norm = None, None
                for p in cat_pairs:
                    if p.trg != trg_name:
                        trg_name, trg_norm = p.trg, None  # free the previous map first
                        trg_norm = normalised_map(feats[p.trg], p.trg_size)
                    scores.pairs.append(score_pair(p, feats[p.src], trg_norm))
                    bar.update(1)
            del feats
    return scores


@dataclass(frozen=True)
class Captions:
    """Per-image captions: `text[category + image name]` (DiTF's keys), and the sha256 of the file they came from."""
    file: str
    sha256: str
    text: Mapping[str, str]

    def of(self, category: str, name: str) -> str:
        return self.text[category + name]


def load_captions(file: str | Path, pairs: Sequence[Pair]) -> Captions:
    """DiTF's per-image captions (their `spair_detailed_captions.json`): a JSON object whose keys are the category
    followed by the image file name (`"car" + "2008_007466.jpg"`) and whose values are the captions. Every image of
    `pairs` must have one; anything else raises `SpairError` saying what to fix."""
    file = Path(file)
    how = ('a JSON object {category + image file name: caption}, e.g. {"car2008_007466.jpg": "The image showcases '
           'a ..."}, as DiTF\'s spair_detailed_captions.json')
    try:
        raw = file.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise SpairError(f'--captions {file}: not a readable JSON file ({e}); give {how}.') from None
    if not isinstance(data, dict):
        raise SpairError(f'--captions {file}: holds a JSON {type(data).__name__}; give {how}.')
    bad = next((k for k, v in data.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise SpairError(f'--captions {file}: the caption of {bad!r} is a {type(data[bad]).__name__}, not a string; '
                         f'give {how}.')
    images = dict.fromkeys((p.category, n) for p in pairs for n in (p.src, p.trg))
    missing = [(c, n) for c, n in images if c + n not in data]
    if missing:
        c, n = missing[0]
        raise SpairError(f'--captions {file}: no caption for {len(missing)} of the {len(images)} images, e.g. {n} of '
                         f'{c} (key {c + n!r}); the keys are the category followed by the image file name, as in '
                         "DiTF's spair_detailed_captions.json.")
    return Captions(str(file), hashlib.sha256(raw).hexdigest(), data)


class ImageFeatures:
    """Features of SPair images: from the cache when present, else computed in batches (and cached)."""

    def __init__(self, root: Path, model_fn: Callable[[], torch.nn.Module], size: Optional[int],
                 batch_size: int = 8, template: Optional[str] = None, cache: Optional[FeatureCache] = None,
                 progress: bool = False, all_taps: bool = False, captions: Optional[Captions] = None):
        """`template`: one caption per category (`{category}`); `captions`: one per image (`load_captions`)."""
        self.images = Path(root) / 'JPEGImages'
        self.captions = captions
        self.model_fn, self.model = model_fn, None  # built only when a feature is missing from the cache
        self.size, self.batch_size, self.template = size, batch_size, template
        self.cache, self.progress, self.all_taps = cache, progress, all_taps
        self.computed = 0

    def __call__(self, category: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from ..correspondence import image_features

        out = {n: f for n in names
               if self.cache and (f := self.cache.get(category, n, self.images / category / n)) is not None}
        todo = [n for n in names if n not in out]
        prompt = None
        for start in range(0, len(todo), self.batch_size):
            if self.model is None:
                self.model = self.model_fn()
            if self.template and prompt is None:  # encoded once per category, then broadcast to every image
                from ..prompts import encode_prompts
                prompt = encode_prompts(self.model, [self.template.format(category=category)])
            batch = todo[start:start + self.batch_size]
            paths = [self.images / category / n for n in batch]
            if self.captions:  # each image on its own caption (encoded once per caption, ever: `prompts`)
                prompt = [self.captions.of(category, n) for n in batch]
            if self.all_taps:  # {tap: map} per image
                feats = image_features(self.model, paths, self.size, prompts=prompt, all_taps=True)
                names = [i['name'] for i in self.model.feature_info.get_dicts()]
                feats = [{t: m[i] for t, m in zip(names, feats)} for i in range(len(batch))]
            else:
                feats = image_features(self.model, paths, self.size, prompts=prompt)
            for n, f in zip(batch, feats):
                f = ({t: m.detach().cpu().clone() for t, m in f.items()} if isinstance(f, dict)
                     else f.detach().cpu().clone())
                if self.cache:
                    self.cache.put(category, n, f, self.images / category / n)
                out[n] = f
            self.computed += len(batch)
            if self.progress:
                print(f'  {category}: features of {min(start + self.batch_size, len(todo))}/{len(todo)} new images',
                      flush=True)
        return out


def _table(scores: Scores) -> str:
    head = f'{"category":<14}{"pairs":>7}{"points":>8}{"img/bbox":>10}{"pt/bbox":>9}{"img/img":>9}{"pt/img":>8}'
    rows = [head, '-' * len(head)]
    for cat in scores.categories() + [None]:
        s = scores.summary(cat)
        rows.append(f'{cat or "all":<14}{s["num_pairs"]:>7}{s["num_points"]:>8}{s["per_image_pck"]:>10.2f}'
                    f'{s["per_point_pck"]:>9.2f}{s["per_image_pck_img"]:>9.2f}{s["per_point_pck_img"]:>8.2f}')
    return '\n'.join(rows)


def spair_cache(args: argparse.Namespace, tap: str, kwargs: dict, captions: Optional[Captions] = None
                ) -> Optional[FeatureCache]:
    """The `--cache` folder of these features (None without `--cache`), keyed by all that shapes them, the LoRA's
    identity and the captions file's content included."""
    if not args.cache:
        return None
    cache = FeatureCache(args.cache, dict(
        model=args.model, weights=weights_fingerprint(args.weights), random_weights=args.random_weights and args.seed,
        tap=tap, size=args.size, prompt_template=args.prompt_template, dtype=args.dtype, model_kwargs=kwargs,
        protocol='stretch-[-1,1]', version=1, **lora_fingerprint(kwargs), **features_revision(args.model),
        **({'captions_sha256': captions.sha256} if captions else {})))
    print(f'feature cache: {cache.folder}')
    return cache


def run_spair(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval spair`."""
    from ..cli_args import check_size_fits, model_kwargs
    from .common import model_builder

    co_pca = getattr(args, 'co_pca', None)
    if co_pca is not None:
        from ..models.fused import RAW_PRESET, is_fused_model

        if not is_fused_model(args.model):
            raise InputError(f'--co-pca needs a fused diffusion + DINOv2 model (e.g. cleandift_sd21_dinov2), not '
                             f'{args.model}.')
        tap = RAW_PRESET  # the raw maps of both sources; the pair's co-PCA fuses them
    elif args.taps is not None and len(args.taps) != 1:
        raise InputError(f'--taps takes exactly one tap (DIFT and CleanDIFT use us6), got {args.taps}.')
    else:
        tap = args.taps[0] if args.taps else 'us6'
    if args.size is None:
        args.size = 768  # DIFT's
    if args.prompt_template is not None:
        try:
            args.prompt_template.format(category='cat')
        except (KeyError, IndexError, ValueError) as e:
            raise InputError(f'--prompt-template {args.prompt_template!r} must use only {{category}}, e.g. '
                             f'"a photo of a {{category}}" ({type(e).__name__}: {e}).') from None
    check_size_fits(args.size, args.batch_size, args.device, model=args.model)
    check_distinct_outputs({'--json': args.json}, {'--cache': args.cache})
    if args.json:  # outputs first: never a file of the dataset, never someone else's, writable
        check_file(args.json, [p for p in (args.data, args.captions) if p], option='--json')
    if args.cache:
        check_folder(args.cache, 'folder', [p for p in (args.data, args.captions) if p], option='--cache')
    pairs = load_pairs(args.data, limit=args.limit)  # every annotation checked before any model is built
    kwargs = model_kwargs(args)
    captions = None
    if args.captions:
        if args.prompt_template is not None or 'prompt' in kwargs:
            raise InputError('--captions gives every image its own caption: drop --prompt-template and the prompt of '
                             '--model-kwargs.')
        captions = load_captions(args.captions, pairs)
    weights = args.weights
    model_fn = model_builder(args, tap, kwargs)
    cache = spair_cache(args, tap, kwargs, captions)
    feats = ImageFeatures(Path(args.data), model_fn, args.size, args.batch_size, args.prompt_template, cache,
                          progress=True, all_taps=co_pca is not None, captions=captions)
    pair_fn = None
    if co_pca is not None:
        from ..models.fused import pair_co_pca

        def pair_fn(a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return pair_co_pca(a, b, co_pca, kwargs.get('sd_weight', 1.0), kwargs.get('dino_weight', 1.0))

    scores = evaluate(pairs, feats, device=args.device, progress=True, pair_fn=pair_fn)
    print(_table(scores))
    overall = scores.summary()
    print(f'{args.model} {tap}: PCK@0.1 bbox {overall["per_image_pck"]:.2f} per image, {overall["per_point_pck"]:.2f} '
          f'per point; PCK@0.1 img {overall["per_image_pck_img"]:.2f} per image, {overall["per_point_pck_img"]:.2f} '
          f'per point ({overall["num_pairs"]} pairs, {overall["num_points"]} points, {feats.computed} images run, '
          f'the rest from the cache)')
    if args.json:
        result = {k: overall[k] for k in ('per_image_pck', 'per_point_pck', 'per_image_pck_img', 'per_point_pck_img')}
        result.update(per_category={c: scores.summary(c) for c in scores.categories()}, model=args.model,
                      weights=weights, tap=tap, co_pca=co_pca, size=args.size, prompt_template=args.prompt_template,
                      num_pairs=overall['num_pairs'], num_points=overall['num_points'], protocol='dift',
                      **({'captions': captions.file, 'captions_sha256': captions.sha256} if captions else {}))
        write_json(args.json, result, 'eval spair')
        print(f'wrote {args.json}')
    return 0

