"""Zero-shot semantic correspondence: `diffbackbone match SRC TRG --points X,Y ...`.

The protocol of CleanDIFT's `get_correspondences.ipynb` (and of DIFT's SPair-71k evaluation): both images are resized
to the model's input size (aspect ratio not kept) and mapped to [-1, 1]; one tap's feature maps are upsampled
bilinearly (`align_corners=False`, as `F.interpolate` / `nn.Upsample` default) to each image's original (H, W); the
source feature is read at the integer pixel (x, y); its L2-normalised dot product with every L2-normalised target
feature is the similarity map, whose argmax is the match.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .data.images import image_size, load_image, open_image
from .data.outputs import check_distinct_outputs, check_file, save_picture, write_json
from .errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from .prompts import PromptBatch

__all__ = [
    'upsample', 'point_features', 'normalised_map', 'similarity_argmax', 'linear_taps', 'sample_points',
    'UpsampledTarget', 'match_points', 'check_points',
    'load_tap_model', 'image_features', 'match_images', 'draw_matches', 'run_match',
]

Point = tuple[int, int]


def upsample(feat: torch.Tensor, size_wh: Sequence[int]) -> torch.Tensor:
    """(C, h, w) or (N, C, h, w) features bilinearly resized to (W, H), as `nn.Upsample(mode='bilinear')` does."""
    w, h = size_wh
    x = feat if feat.ndim == 4 else feat[None]
    out = F.interpolate(x, size=(int(h), int(w)), mode='bilinear', align_corners=False)
    return out if feat.ndim == 4 else out[0]


def check_points(points: Sequence[Sequence[float]], size_wh: Sequence[int], where: str) -> list[Point]:
    """Points as integer (x, y) pixels (truncated, as `.long()` does), checked to lie inside a (W, H) image."""
    w, h = size_wh
    out = []
    for p in points:
        if len(p) != 2:
            raise InputError(f'{where}: a point must be (x, y), got {list(p)}.')
        x, y = float(p[0]), float(p[1])
        if not (0 <= x < w and 0 <= y < h):
            raise InputError(f'{where}: point ({p[0]}, {p[1]}) is outside the image of {w}x{h} pixels (x in [0, {w}), '
                             f'y in [0, {h})). Give pixel coordinates of the original image, x first.')
        out.append((int(x), int(y)))
    return out


def point_features(src_feat: torch.Tensor, points: Sequence[Point], src_size: Sequence[int]) -> torch.Tensor:
    """(K, C) features of the upsampled source map at integer points (x, y)."""
    up = upsample(src_feat.float(), src_size)
    xy = torch.tensor(points, dtype=torch.long, device=up.device).reshape(-1, 2)
    return up[:, xy[:, 1], xy[:, 0]].T


def normalised_map(trg_feat: torch.Tensor, trg_size: Sequence[int]) -> torch.Tensor:
    """(C, H*W) target features upsampled to (W, H) and L2-normalised per pixel (kept for several source images)."""
    up = upsample(trg_feat.float(), trg_size).flatten(1)
    return F.normalize(up, dim=0)


def similarity_argmax(src_vecs: torch.Tensor, trg_norm: torch.Tensor, trg_size: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine maps (K, H, W) of source vectors over a `normalised_map`, and their argmax as (K, 2) integer (x, y)."""
    w, h = trg_size
    sims = F.normalize(src_vecs, dim=1) @ trg_norm
    flat = sims.argmax(dim=1)
    matches = torch.stack([flat % w, flat // w], dim=1)
    return sims.view(-1, h, w), matches


def linear_taps(n_in: int, n_out: int, device: str | torch.device = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
    """Per output position, the lower input index and the weight of the next one, as `F.interpolate(mode='bilinear',
    align_corners=False)` computes them (float32): src = (n_in / n_out) (dst + 1/2) - 1/2, clamped at 0. The next index
    is always lower + 1: use a map padded by one (replicate) row and column, which gives the value PyTorch takes."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    low = src.long()
    return low.to(device), (src - low).clamp(0, 1).to(device)


def _padded(feat: torch.Tensor) -> torch.Tensor:
    """(C, h + 1, w + 1) float32 map with the last row and column repeated."""
    return F.pad(feat.float()[None], (0, 1, 0, 1), mode='replicate')[0]


def sample_points(feat: torch.Tensor, points: Sequence[Point], size_wh: Sequence[int]) -> torch.Tensor:
    """(K, C) features of the bilinearly upsampled (C, h, w) map at integer (x, y) of a (W, H) image, without
    upsampling the whole map: equal to `point_features` up to float rounding."""
    c, h, w = feat.shape
    xy = torch.as_tensor(points, dtype=torch.long, device=feat.device).reshape(-1, 2)
    y0, ly = (t[xy[:, 1]] for t in linear_taps(h, int(size_wh[1]), feat.device))
    x0, lx = (t[xy[:, 0]] for t in linear_taps(w, int(size_wh[0]), feat.device))
    tp = _padded(feat)
    top = tp[:, y0, x0] * (1 - lx) + tp[:, y0, x0 + 1] * lx
    bottom = tp[:, y0 + 1, x0] * (1 - lx) + tp[:, y0 + 1, x0 + 1] * lx
    return (top * (1 - ly) + bottom * ly).T


def _interpolation_matrix(low: torch.Tensor, weight: torch.Tensor, n_in: int) -> torch.Tensor:
    """(n_out, n_in) matrix of `linear_taps`: row i holds 1 - weight at low[i] and weight at low[i] + 1."""
    m = torch.zeros(len(low), n_in, device=low.device)
    rows = torch.arange(len(low), device=low.device)
    m[rows, low] = 1 - weight
    m[rows, low + 1] = weight
    return m


class UpsampledTarget:
    """A (C, h, w) target map, ready for cosine argmax at every pixel of its (W, H) image without building the
    (C, H, W) upsampled map (`normalised_map`): bilinear upsampling is linear, so a source vector's dot products with
    the upsampled map are the upsampled dot products with the small map, and each upsampled vector's norm comes from
    the dot products of its four neighbouring cells. Same matches as `similarity_argmax(..., normalised_map(...))` up to
    float rounding, at a cost of C x h x w per source point instead of C x H x W."""

    def __init__(self, feat: torch.Tensor, size_wh: Sequence[int]):
        c, h, w = feat.shape
        self.size = (int(size_wh[0]), int(size_wh[1]))
        width, height = self.size
        tp = _padded(feat)
        self.flat = tp.flatten(1)  # (C, (h + 1) (w + 1))
        self.hw = (h, w)
        self.y0, self.ly = linear_taps(h, height, feat.device)
        self.x0, self.lx = linear_taps(w, width, feat.device)
        cells = [tp[:, dy:dy + h, dx:dx + w] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
        ly, lx = self.ly[:, None], self.lx[None, :]
        weights = [(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx]  # (H, W) each
        norm2 = torch.zeros(height, width, device=feat.device)
        for i in range(4):
            for j in range(i, 4):
                dot = (cells[i] * cells[j]).sum(0)[self.y0[:, None], self.x0[None, :]]  # (H, W)
                norm2 += (1 if i == j else 2) * weights[i] * weights[j] * dot
        self.inv_norm = 1 / norm2.clamp_min(0).sqrt().clamp_min(1e-12)  # F.normalize's eps
        # the upsampling as two small matrices (H, h + 1) and (W, w + 1): matmuls instead of gathers
        self.rows = _interpolation_matrix(self.y0, self.ly, h + 1)
        self.cols = _interpolation_matrix(self.x0, self.lx, w + 1)

    def similarity(self, vecs: torch.Tensor) -> torch.Tensor:
        """(K, H, W) cosine similarity of (K, C) source vectors with the upsampled target."""
        h, w = self.hw
        s = (F.normalize(vecs.float(), dim=1) @ self.flat).view(-1, h + 1, w + 1)
        return self.rows @ (s @ self.cols.T) * self.inv_norm  # (K, H, W)

    def argmax(self, vecs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(K, 2) integer (x, y) of each source vector's best match, `chunk` vectors at a time."""
        width = self.size[0]
        flat = torch.cat([self.similarity(vecs[i:i + chunk]).flatten(1).argmax(dim=1)
                          for i in range(0, len(vecs), chunk)]) if len(vecs) else vecs.new_zeros(0, dtype=torch.long)
        return torch.stack([flat % width, flat // width], dim=1)


def match_points(
        src_feat: torch.Tensor,
        trg_feat: torch.Tensor,
        points: Sequence[Sequence[float]],
        src_size: Sequence[int],
        trg_size: Sequence[int],
) -> tuple[list[Point], torch.Tensor]:
    """Match source points onto the target by feature similarity (CleanDIFT notebook protocol).

    Args:
        src_feat: (C, h, w) features of the source image (any resolution; the model's input was the resized image).
        trg_feat: (C, h', w') features of the target image.
        points: source points (x, y) in pixels of the original source image.
        src_size: (W, H) of the original source image.
        trg_size: (W', H') of the original target image.

    Returns:
        The matched (x', y') per point, and the (K, H', W') cosine similarity maps.
    """
    if src_feat.ndim != 3 or trg_feat.ndim != 3 or src_feat.shape[0] != trg_feat.shape[0]:
        raise InputError(f'Features must be (C, h, w) with the same C, got {tuple(src_feat.shape)} and '
                         f'{tuple(trg_feat.shape)}.')
    pts = check_points(points, src_size, 'source image')
    sims, matches = similarity_argmax(point_features(src_feat, pts, src_size), normalised_map(trg_feat, trg_size),
                                      trg_size)
    return [(int(x), int(y)) for x, y in matches.tolist()], sims


def load_tap_model(
        model_name: str,
        tap: str | Sequence[str],
        weights: Optional[str] = None,
        pretrained: bool = True,
        prompt: Optional[str] = None,
        device: str = 'cpu',
        dtype: torch.dtype = torch.float32,
        model_kwargs: Optional[dict] = None,
) -> torch.nn.Module:
    """A timm `features_only` model returning one tap (or several, in the order given), in eval mode on `device`.

    `weights` is a local checkpoint (`pretrained_cfg_overlay=dict(file=...)`, as in `diffbackbone features`);
    `prompt` conditions every image on that caption (None: the model's own, empty prompt).
    """
    import timm

    import diffbackbone  # noqa: F401  (registers the models)

    from .models import TapError

    kwargs = dict(model_kwargs or {})
    if weights:
        if not Path(weights).is_file():
            raise InputError(f'--weights {weights}: no such file. Give a local .safetensors checkpoint.')
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
    if prompt is not None:
        kwargs['prompt'] = prompt
    taps = (tap,) if isinstance(tap, str) else tuple(tap)
    try:
        model = timm.create_model(model_name, pretrained=pretrained or bool(weights), features_only=True,
                                  out_indices=taps, **kwargs)
    except TapError as e:
        raise TapError(f'{model_name}, --taps {" ".join(taps)}: {e}') from e
    return model.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def image_features(model: torch.nn.Module, paths: Sequence[Path], size: Optional[int] = None,
                   prompts: Optional[str | Sequence[str] | 'PromptBatch'] = None,
                   all_taps: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """(N, C, h, w) tap features of image files resized to `size` x `size` (default: the model's input size).

    `prompts` (one per image, one for all, or a `PromptBatch`) conditions the UNet through
    `diffbackbone.prompts.use_prompts`; None: the model's own prompt. With `all_taps`, the list of every tap the
    model returns (in its order) instead of the first.
    """
    import contextlib

    cfg = model.pretrained_cfg
    side = size or cfg['input_size'][-1]
    param = next(p for p in model.parameters() if p.ndim > 1)  # a weight (a clean model's timestep stays fp32)
    x = torch.stack([load_image(p, (side, side), 'stretch', cfg['mean'], cfg['std']) for p in paths])
    x = x.to(device=param.device, dtype=param.dtype)
    ctx = contextlib.nullcontext()
    if prompts is not None:
        from .prompts import use_prompts
        ctx = use_prompts(model, prompts)
    with ctx:
        out = model(x)
    if all_taps:
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return out[0] if isinstance(out, (list, tuple)) else out


def match_images(
        src: str | Path,
        trg: str | Path,
        points: Sequence[Sequence[float]],
        model: str | torch.nn.Module = 'cleandift_sd21',
        tap: str = 'us6',
        size: Optional[int] = None,
        co_pca: Optional[Sequence[int]] = None,
        **model_args,
) -> tuple[list[Point], torch.Tensor]:
    """Run a model (a name, built with `load_tap_model(**model_args)`, or a one-tap features model) on two image files
    and match `points` of `src` onto `trg`. Returns matches (x', y') and the (K, H', W') similarity maps.

    `co_pca` (fused models, e.g. `cleandift_sd21_dinov2`): PCA dims of each SD tap, fitted on the two images together
    as "A Tale of Two Features" does (one value: the same for every tap); `tap` is then ignored."""
    src, trg = Path(src), Path(trg)
    src_size, trg_size = image_size(src), image_size(trg)
    check_points(points, src_size, str(src))  # before any model is loaded
    if co_pca is not None:
        from .models.fused import RAW_PRESET, fused_module, is_fused_model, pair_co_pca

        if isinstance(model, str):
            if not is_fused_model(model):
                raise InputError(f'co-PCA needs a fused diffusion + DINOv2 model (e.g. cleandift_sd21_dinov2), not '
                                 f'{model}.')
            model = load_tap_model(model, RAW_PRESET, **model_args)
        fused = fused_module(model)
        feats = image_features(model, [src, trg], size, all_taps=True)
        names = [i['name'] for i in model.feature_info.get_dicts()]
        a, b = pair_co_pca({n: f[0] for n, f in zip(names, feats)}, {n: f[1] for n, f in zip(names, feats)},
                           co_pca, fused.sd_weight, fused.dino_weight)
        return match_points(a, b, points, src_size, trg_size)
    if isinstance(model, str):
        model = load_tap_model(model, tap, **model_args)
    feats = image_features(model, [src, trg], size)
    return match_points(feats[0], feats[1], points, src_size, trg_size)


def _heat(sim: torch.Tensor) -> 'Image.Image':
    """A similarity map as an RGB picture (dark blue low -> yellow high)."""
    import numpy as np
    from PIL import Image

    s = sim.float()
    s = ((s - s.min()) / (s.max() - s.min()).clamp_min(1e-8)).cpu().numpy()
    stops = np.array([[48, 18, 59], [40, 120, 220], [60, 200, 120], [250, 230, 40]], dtype=np.float32)
    pos = s * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8), 'RGB')


def draw_matches(src: str | Path, trg: str | Path, points: Sequence[Sequence[float]], matches: Sequence[Point],
                 sims: torch.Tensor, out: str | Path, height: int = 256) -> None:
    """Save a picture: one row per point with the source and its point, the similarity map, the target and the match."""
    from PIL import Image, ImageDraw

    src_img, trg_img = open_image(src).convert('RGB'), open_image(trg).convert('RGB')
    colours = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]

    def scaled(img: Image.Image) -> tuple[Image.Image, float]:
        s = height / img.height
        return img.resize((max(1, round(img.width * s)), height), Image.BICUBIC), s

    src_small, s_src = scaled(src_img)
    trg_small, s_trg = scaled(trg_img)
    row_w = src_small.width + 2 * trg_small.width
    sheet = Image.new('RGB', (row_w, height * len(points)), (255, 255, 255))
    r = max(3, height // 50)
    for i, ((x, y), (mx, my)) in enumerate(zip(points, matches)):
        colour = colours[i % len(colours)]
        a, b = src_small.copy(), trg_small.copy()
        heat = _heat(sims[i]).resize(b.size, Image.BILINEAR)
        for img, px, py, s in ((a, x, y, s_src), (b, mx, my, s_trg), (heat, mx, my, s_trg)):
            cx, cy = (px + 0.5) * s, (py + 0.5) * s
            ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255))
        top = i * height
        sheet.paste(a, (0, top))
        sheet.paste(heat, (src_small.width, top))
        sheet.paste(b, (src_small.width + trg_small.width, top))
    save_picture(sheet, out, 'match')


def run_match(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone match`."""
    from PIL import Image

    from .cli_args import DTYPES, check_size_fits

    if args.out and Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise InputError(f'--out {args.out}: give a picture file name ending in .png or .jpg.')
    check_distinct_outputs({'--out': args.out, '--json': getattr(args, 'json', None)})
    for option in ('out', 'json'):  # before any model loads: never an input, never a file of someone else
        if getattr(args, option, None):
            check_file(getattr(args, option), [args.src, args.trg], option=f'--{option}')
    check_size_fits(args.size, 2, args.device)
    kwargs = dict(args.model_kwargs or {})
    prompt = args.prompt if args.prompt is not None else kwargs.get('prompt') or ''
    matches, sims = match_images(
        args.src, args.trg, args.points, model=args.model, tap=args.taps, size=args.size, co_pca=args.co_pca,
        weights=args.weights, pretrained=not args.random_weights, prompt=args.prompt, device=args.device,
        dtype=DTYPES[args.dtype], model_kwargs=kwargs)
    print(f'prompt: {prompt!r}' + ('' if prompt else ' (the empty prompt; CleanDIFT\'s notebook uses '
                                                      '"A photo of a dog": --prompt)'))
    print('points are (x, y) pixels of the original images, x to the right, y down (CleanDIFT\'s notebook lists '
          '(y, x) rows)')
    for (x, y), (mx, my), sim in zip(args.points, matches, sims):
        print(f'({x:g}, {y:g}) -> ({mx}, {my})  similarity {sim.max().item():.4f}')
    if args.out:
        draw_matches(args.src, args.trg, args.points, matches, sims, args.out)
        print(f'wrote {args.out}')
    if getattr(args, 'json', None):
        write_json(args.json, dict(
            coordinates='(x, y) pixels of the original images, x to the right, y down', src=str(args.src),
            trg=str(args.trg), model=args.model, tap=args.taps, prompt=prompt,
            points=[[float(x), float(y)] for x, y in args.points], matches=[list(m) for m in matches],
            similarity=[round(s.max().item(), 6) for s in sims]), 'match')
        print(f'wrote {args.json}')
    return 0
