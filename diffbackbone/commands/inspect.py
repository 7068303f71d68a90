"""`diffbackbone inspect`: a picture of every activation of a model over a few images, and statistics to sort them by.

Meng et al.'s `feature_visualization.py` (NeurIPS 2024) for many taps and images in one streamed pass: joint PCA or
k-means tiles per tap, numbered sheets and an index, per-tap statistics with `--json`. See
docs/tasks.md#looking-at-every-activation-inspect."""
from __future__ import annotations

import argparse
import fnmatch
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cli_args import add_model_args, add_prompt_arg, diffusion_model_name, positive_int
from ..errors import InputError

__all__ = ['select_taps', 'pca_colors', 'kmeans_labels', 'tap_stats', 'TileReducer', 'draw_sheets', 'sheet_paths',
           'add_parser', 'run', 'PALETTE']

# k-means cluster colours (Tableau 10), cluster i -> PALETTE[i % 10]
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], dtype=np.uint8)
_EXACT_PCA_CHANNELS = 4096  # above this, the (C, C) covariance is too large: randomised PCA (torch.pca_lowrank)


# ---- which taps ------------------------------------------------------------------------------------------------------
def select_taps(model, selectors: Optional[Sequence[str]]) -> list:
    """Taps of `model` (a diffusion backbone, weights not needed) for `--taps`, in execution order.

    Each selector is `all`, a preset, a tap name / alias / `feature_info` index, or a shell pattern over every tap name
    (`*cross-q`, `up-level1-*`). None: the model's `feature_info` taps.
    """
    from ..models._taps import TapError

    every = sorted(model.all_taps, key=lambda t: t.seq)
    if not selectors:
        return sorted(model.taps, key=lambda t: t.seq)
    chosen: dict[str, object] = {}
    for sel in selectors:
        if sel == 'all':
            found = every
        elif any(c in sel for c in '*?['):
            found = [t for t in every if fnmatch.fnmatchcase(t.name, sel)
                     or any(fnmatch.fnmatchcase(a, sel) for a in t.aliases)]
            if not found:
                raise TapError(f'--taps {sel!r} matches no tap of this model. List the names with `diffbackbone taps '
                               'MODEL --all`.')
        else:
            found = model._resolve([int(sel)] if sel.lstrip('-').isdigit() else [sel])
        for t in found:
            chosen.setdefault(t.name, t)
    return sorted(chosen.values(), key=lambda t: t.seq)


# ---- colours of one tap ----------------------------------------------------------------------------------------------
def _flat(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C) float64 rows, centred."""
    x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).double()
    return x - x.mean(0)


def pca_colors(maps: torch.Tensor) -> np.ndarray:
    """RGB (N, h, w, 3) uint8 of the first three principal components of (N, C, h, w), fitted jointly over the N maps.

    Each component is min-max scaled over all N maps (Meng et al.'s scaling) and its sign fixed so that its largest
    loading is positive. Fewer than three channels or components leave the missing colours at zero.
    """
    n, c, h, w = maps.shape
    x = _flat(maps)
    q = min(3, c, x.shape[0])
    if c <= _EXACT_PCA_CHANNELS:
        _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        v = vecs[:, -q:].flip(1)
    else:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=min(16, c, x.shape[0]), center=False, niter=8)
        torch.random.set_rng_state(gen_state)
        v = v[:, :q]
    signs = torch.sign(v[v.abs().argmax(0), torch.arange(q)])
    v = v * torch.where(signs == 0, 1.0, signs)
    proj = x @ v
    lo, hi = proj.amin(0), proj.amax(0)
    scaled = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64, device=x.device)
    rgb[:, :q] = scaled
    return (rgb * 255).round().to(torch.uint8).reshape(n, h, w, 3).cpu().numpy()


def kmeans_labels(maps: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Cluster labels (N, h, w) of the feature vectors of (N, C, h, w), jointly over the N maps.

    k-means++ initialisation from a seeded generator, then Lloyd iterations until no label changes (or `iters`).
    """
    n, c, h, w = maps.shape
    x = _flat(maps).float()
    m = x.shape[0]
    k = min(k, m)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    centres = [x[int(torch.randint(m, (1,), generator=gen))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((m,), 1.0 / m)
        centres.append(x[int(torch.multinomial(p, 1, generator=gen))])
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    cen = torch.stack(centres)
    labels = torch.full((m,), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new = torch.cdist(x, cen).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                cen[j] = x[members].mean(0)
    return labels.reshape(n, h, w).cpu()


# ---- statistics of one tap -------------------------------------------------------------------------------------------
def _median(v: torch.Tensor) -> float:
    """The median of a 1-D tensor, the mean of the two middle values for an even count (numpy's; torch's median
    returns the lower one)."""
    n = v.numel()
    lo = v.kthvalue((n + 1) // 2).values
    return float(lo) if n % 2 else (float(lo) + float(v.kthvalue(n // 2 + 1).values)) / 2


def tap_stats(maps: torch.Tensor) -> dict:
    """Statistics of a tap's full-size maps (N, C, h, w), averaged over the N images where per image.

    * `neighbour_cosine`: mean cosine similarity of the feature vectors of 4-neighbour positions;
      `global_cosine`: of all pairs of distinct positions; `locality` = their difference (positive: local structure).
    * `morans_i`: Moran's I of each channel with rook adjacency, averaged over channels (constant channels skipped).
    * `massive_ratio`: max |x| / median |x| over the whole map ("massive activations", Sun et al. 2024; DiTF).
    * `channel_max_ratio`: the largest per-channel max |x| over the median per-channel max |x|; `top_channel`: its
      index.
    Spatial statistics are None for a 1x1 map.
    """
    n, c, h, w = maps.shape
    x = maps.float()
    a = x.abs()
    med = _median(a.flatten())
    chan_max = a.amax(dim=(0, 2, 3))
    out = dict(channels=c, height=h, width=w, mean=float(x.mean()), std=float(x.std()) if x.numel() > 1 else 0.0,
               max_abs=float(chan_max.max()), massive_ratio=float(chan_max.max()) / med if med > 0 else math.inf,
               channel_max_ratio=float(chan_max.max()) / _median(chan_max) if _median(chan_max) > 0 else math.inf,
               top_channel=int(chan_max.argmax()))
    if h * w < 2:
        return dict(out, neighbour_cosine=None, global_cosine=None, locality=None, morans_i=None)
    u = F.normalize(x, dim=1)
    pairs = []
    if w > 1:
        pairs.append((u[..., :, 1:] * u[..., :, :-1]).sum(1).flatten(1))
    if h > 1:
        pairs.append((u[..., 1:, :] * u[..., :-1, :]).sum(1).flatten(1))
    neighbour = torch.cat(pairs, 1).mean(1)  # per image
    p = h * w
    total = u.flatten(2).sum(2)  # (N, C): sum of unit vectors
    norms = u.flatten(2).pow(2).sum(1).sum(1)  # (N,): number of non-zero vectors
    global_ = ((total ** 2).sum(1) - norms) / (p * (p - 1))
    z = x - x.mean(dim=(2, 3), keepdim=True)
    cross = torch.zeros(n, c, device=x.device)
    if w > 1:
        cross += (z[..., :, 1:] * z[..., :, :-1]).sum((2, 3))
    if h > 1:
        cross += (z[..., 1:, :] * z[..., :-1, :]).sum((2, 3))
    edges = h * (w - 1) + w * (h - 1)
    var = z.pow(2).sum((2, 3))
    moran = (p / edges) * cross / var
    moran = moran[var > 1e-12 * var.max().clamp_min(1e-30)]
    return dict(out, neighbour_cosine=float(neighbour.mean()), global_cosine=float(global_.mean()),
                locality=float((neighbour - global_).mean()),
                morans_i=float(moran.mean()) if moran.numel() else None)


# ---- the reducer fed by the forward pass -----------------------------------------------------------------------------
class TileReducer:
    """Sink of `stream_taps`: for each arriving tap, statistics of the full map and an RGB tile per image."""

    def __init__(self, taps: Sequence, mode: str = 'pca', grid: int = 64, clusters: int = 8, stats: bool = True,
                 tokens: Sequence[int] = ()):
        self.meta = {t.name: t for t in taps}
        self.mode, self.grid, self.clusters, self.with_stats = mode, grid, clusters, stats
        self.tokens = tuple(tokens)
        self.tiles: dict[str, np.ndarray] = {}  # name -> (N, h', w', 3) uint8
        self.stats: dict[str, dict] = {}

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        """Area-average a map to at most `grid` positions per side (the resolution a tile shows)."""
        h, w = maps.shape[-2:]
        if max(h, w) <= self.grid:
            return maps
        s = self.grid / max(h, w)
        return F.adaptive_avg_pool2d(maps.float(), (max(1, round(h * s)), max(1, round(w * s))))

    def __call__(self, name: str, maps: torch.Tensor) -> None:
        if name in self.tiles or name not in self.meta:
            return
        maps = maps.detach()
        if self.with_stats:
            self.stats[name] = tap_stats(maps)
        small = self.reduce(maps.float())
        if self.mode == 'pca':
            self.tiles[name] = pca_colors(small)
        else:
            self.tiles[name] = PALETTE[kmeans_labels(small, self.clusters).numpy() % len(PALETTE)]
        if is_cross_map(name):
            for t in self.tokens:
                self.tiles[token_tile_name(name, t)] = token_heat(small, t)


def is_cross_map(name: str) -> bool:
    return name.endswith('cross-map')


def token_tile_name(tap: str, token: int) -> str:
    return f'{tap}-token{token}'


def token_heat(maps: torch.Tensor, token: int) -> np.ndarray:
    """Grey (N, h, w, 3) uint8 heat map of one prompt token's channel of a cross-attention map, min-max scaled jointly
    over the N images (Meng et al.'s script draws a heat map per token)."""
    heat = maps[:, token].double()
    lo, hi = heat.amin(), heat.amax()
    grey = ((heat - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)
    return grey[..., None].expand(*grey.shape, 3).cpu().numpy()


# ---- sheets ----------------------------------------------------------------------------------------------------------
_LINE = 11  # px per title line (Pillow's default bitmap font)
_TITLE_LINES = 4


def _wrap(name: str, chars: int) -> list[str]:
    """Split a tap name at '-' into lines of at most `chars` characters (long parts are cut)."""
    lines, cur = [], ''
    for part in name.split('-'):
        piece = part if not cur else f'{cur}-{part}'
        if len(piece) <= chars:
            cur = piece
        else:
            if cur:
                lines.append(cur + '-')
            cur = part[:chars]
    lines.append(cur)
    return lines


def sheet_paths(out: Path, n_taps: int, per_sheet: int) -> tuple[list[Path], Optional[Path]]:
    """The sheet files (`out` itself when one sheet is enough, else `stem-01.png`, ...) and the index file
    (`stem-index.json`) or None."""
    n = max(1, math.ceil(n_taps / per_sheet))
    if n == 1:
        return [out], None
    digits = len(str(n))
    return ([out.with_name(f'{out.stem}-{i + 1:0{digits}d}{out.suffix}') for i in range(n)],
            out.with_name(f'{out.stem}-index.json'))


def tile_box(k: int, i: int, cols: int, n_images: int, tile: int) -> tuple[int, int]:
    """(left, top) pixel of the tile of the k-th tap of a sheet for image i (first column: the inputs)."""
    line, col = divmod(k, cols)
    top = line * (_TITLE_LINES * _LINE + 4 + n_images * (tile + 2)) + _TITLE_LINES * _LINE + 4 + i * (tile + 2)
    return (col + 1) * (tile + 2), top


def draw_sheets(inputs: Sequence[np.ndarray], names: Sequence[str], tiles: dict[str, np.ndarray], meta: dict,
                cols: int, per_sheet: int, tile: int):
    """PIL sheets: per line of up to `cols` taps, a title row and a row per image; the inputs in the first column."""
    from PIL import Image, ImageDraw

    n = len(inputs)
    thumbs = [Image.fromarray(a).resize((tile, tile), Image.BICUBIC) for a in inputs]
    chars = max(8, tile // 6)
    sheets = []
    for s in range(0, len(names), per_sheet):
        part = names[s:s + per_sheet]
        lines = math.ceil(len(part) / cols)
        width = (min(cols, len(part)) + 1) * (tile + 2)
        height = lines * (_TITLE_LINES * _LINE + 4 + n * (tile + 2))
        sheet = Image.new('RGB', (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for line in range(lines):
            left, top = tile_box(line * cols, 0, cols, n, tile)
            draw.text((2, top - _TITLE_LINES * _LINE - 2), 'input', fill=(0, 0, 0))
            for i, th in enumerate(thumbs):
                sheet.paste(th, (0, tile_box(line * cols, i, cols, n, tile)[1]))
        for k, name in enumerate(part):
            t = meta[name]
            left, top = tile_box(k, 0, cols, n, tile)
            h, w = tiles[name].shape[1:3]
            title = _wrap(name, chars)[:_TITLE_LINES - 1] + [f'{t.num_chs}ch /{t.reduction} {h}x{w}']
            for j, text in enumerate(title):
                draw.text((left + 1, top - (_TITLE_LINES - j) * _LINE - 2), text, fill=(0, 0, 0))
            for i in range(n):
                img = Image.fromarray(tiles[name][i]).resize((tile, tile), Image.NEAREST)
                sheet.paste(img, tile_box(k, i, cols, n, tile))
        sheets.append(sheet)
    return sheets


# ---- the command -----------------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `inspect` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser(
        'inspect', help="a picture of each tap's activations over a few images (PCA or k-means), with statistics",
        description="Meng et al.'s qualitative look at every activation: one pass of all images to the deepest tap; "
                    'per tap the first three principal components (fitted jointly over the images) as colours, a row '
                    'per image; several sheets and an index for many taps.')
    p.add_argument('images', nargs='+', help='a few image files, folders, quoted globs, @list.txt')
    p.add_argument('--model', type=diffusion_model_name, required=True, help="one of diffbackbone's models")
    p.add_argument('--taps', nargs='+', help='tap names, indices, presets, shell patterns ("*cross-q") or "all" '
                   "(default: the model's feature_info taps)")
    p.add_argument('--out', default='inspect.png', help='sheet .png (several: STEM-01.png, ... and STEM-index.json)')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files')
    p.add_argument('--mode', choices=('pca', 'kmeans'), default='pca', help='colours: 3 principal components (default) '
                   'or k-means clusters')
    p.add_argument('--clusters', type=positive_int, default=8, help='k of --mode kmeans (default: 8)')
    p.add_argument('--cols', type=positive_int, default=8, help='taps per line of a sheet (default: 8)')
    p.add_argument('--per-sheet', type=positive_int, default=48, help='taps per sheet (default: 48)')
    p.add_argument('--tile', type=positive_int, default=128, help='tile size in pixels (default: 128)')
    p.add_argument('--grid', type=positive_int, default=64, help='at most this many map positions per tile side; '
                   'larger maps are area-averaged first (default: 64)')
    p.add_argument('--json', help='per-tap statistics (locality, massive activations) to this JSON file')
    p.add_argument('--size', type=positive_int, help='square input size (default: the model pretrained_cfg input_size)')
    add_prompt_arg(p)
    p.add_argument('--tokens', nargs='+', type=int, metavar='I', help="for each selected '*cross-map' tap, also a grey "
                   'heat map per prompt token index I (0: the start token; CLIP: the words from 1), scaled jointly '
                   'over the images')
    p.add_argument('--max-images', type=positive_int, default=16, help=argparse.SUPPRESS)
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone inspect`."""
    import timm

    from ..cli_args import DTYPES, check_size_fits, model_kwargs
    from ..data.extract import check_output, data_config, load_extractor
    from ..data.images import load_image, open_image, resize_image
    from ..data.outputs import check_distinct_outputs, save_picture, write_json
    from ..data.pipeline import find_images

    images = find_images(args.images)
    if len(images) > args.max_images:
        raise InputError(f'{len(images)} images: inspect draws a row per image and fits each tap\'s PCA over all of '
                         f'them in one pass; give at most {args.max_images} (--max-images to allow more).')
    kwargs = model_kwargs(args)
    with torch.device('meta'):  # no weights: check the tap selection and outputs before any download
        probe = timm.create_model(args.model)
    taps = select_taps(probe, args.taps)
    tokens = list(args.tokens or ())
    crosses = [t for t in taps if is_cross_map(t.name)]
    if tokens and not crosses:
        raise InputError('--tokens draws the heat map of prompt tokens of cross-attention maps: also select a '
                         "'*cross-map' tap (--taps).")
    for t in crosses:
        bad = [i for i in tokens if not 0 <= i < t.num_chs]
        if bad:
            raise InputError(f'--tokens {bad}: {t.name} has {t.num_chs} prompt tokens (0..{t.num_chs - 1}).')
    names = []
    for t in taps:
        names.append(t.name)
        if is_cross_map(t.name):
            names += [token_tile_name(t.name, i) for i in tokens]
    out = Path(args.out)
    if out.suffix.lower() != '.png':
        raise InputError(f'--out {out}: give a .png file name for the sheet.')
    sheets, index = sheet_paths(out, len(names), args.per_sheet)
    outputs = sheets + ([index] if index else []) + ([Path(args.json)] if args.json else [])
    check_distinct_outputs([('--out', p) for p in sheets + [index]] + [('--json', args.json)])
    for p in outputs:
        check_output(p, images, args.overwrite)
    check_size_fits(args.size, len(images), args.device, model=args.model)
    check_size_fits(args.tile, len(images) * min(len(names), args.per_sheet), 'cpu', '--tile')  # the sheet's tiles

    tap_names = [t.name for t in taps]
    model = load_extractor(args.model, tap_names, args.device, args.dtype, not args.random_weights, args.weights,
                           kwargs)
    backbone = model.model
    cfg = data_config(model, args.size)
    size = tuple(cfg['input_size'][1:])
    x = torch.stack([load_image(p, size, 'stretch', cfg['mean'], cfg['std']) for p in images])
    x = x.to(device=args.device, dtype=DTYPES[args.dtype])
    reducer = TileReducer(taps, args.mode, args.grid, args.clusters, stats=bool(args.json), tokens=tokens)
    peak = _rss_mib()
    with torch.inference_mode():
        backbone.stream_taps(x, backbone._resolve(tap_names), reducer)
    missing = [n for n in names if n not in reducer.tiles]
    if missing:
        raise RuntimeError(f'the forward pass did not produce taps {missing[:5]}: please report this.')
    inputs = [np.asarray(resize_image(open_image(p), size, 'stretch')) for p in images]
    meta = {t.name: t for t in taps}
    meta.update({token_tile_name(t.name, i): SimpleNamespace(num_chs=1, reduction=t.reduction)
                 for t in crosses for i in tokens})
    pictures = draw_sheets(inputs, names, reducer.tiles, meta, args.cols, args.per_sheet, args.tile)
    for path, pic in zip(sheets, pictures):
        save_picture(pic, path, 'inspect')
        print(f'wrote {path}')
    if index:
        rows = [dict(sheet=path.name, line=k // args.cols + 1, column=k % args.cols + 1, tap=name,
                     channels=meta[name].num_chs, stride=meta[name].reduction)
                for s, path in enumerate(sheets)
                for k, name in enumerate(names[s * args.per_sheet:(s + 1) * args.per_sheet])]
        write_json(index, dict(model=args.model, sheets=[p.name for p in sheets], taps=rows), 'inspect')
        print(f'wrote {index} ({len(names)} taps over {len(sheets)} sheets)')
    if args.json:
        report = dict(model=args.model, images=images, input_size=list(size), mode=args.mode,
                      taps={n: dict(stride=meta[n].reduction, sheet=sheets[i // args.per_sheet].name,
                                    **reducer.stats[n]) for i, n in enumerate(names) if n in reducer.stats})
        write_json(args.json, report, 'inspect')
        print(f'wrote {args.json}')
    print(f'{len(tap_names)} taps of {len(images)} images at {size[0]}x{size[1]}; '
          f'peak RSS {max(peak, _rss_mib()):.0f} MiB')
    return 0


def _rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
