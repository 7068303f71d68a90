"""`diffbackbone features`: tap maps of image files into a safetensors file, and a PCA picture of one tap.

Everything that can be checked is checked before the model runs: every image's header, the output path (not an
input, not an existing file unless `--overwrite`, writable) and the `--pca` tap. Images are read by `images.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .hub import save_safetensors
from .images import ImageError, image_size, load_image

__all__ = ['DTYPES', 'OutputError', 'check_output', 'load_extractor', 'extract_features', 'pca_image', 'run_features']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class OutputError(ValueError):
    """An output path cannot be used; the message says why and what to do."""


def check_output(out: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> Path:
    """Refuse an output file that is an input, a folder, an existing file (unless `overwrite`) or not writable.

    Writability is probed by creating (and removing) a file beside it, so a read-only file system is found before
    any work is done.
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    for path in inputs:
        if Path(path).resolve() == resolved:
            raise OutputError(f'--out {out} is one of the input images: it would be overwritten. Choose another '
                              'output path.')
    if out.is_dir():
        raise OutputError(f'--out {out} is a folder: give a file path such as {out / "features.safetensors"}.')
    if out.exists() and not overwrite:
        raise OutputError(f'--out {out} exists: choose another path, or add --overwrite to replace it.')
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f'.{out.name}.', suffix='.probe', dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f'Cannot write to {parent} ({e.strerror or e}): choose a writable --out.') from e
    return out


def load_extractor(
        model_name: str,
        taps: Optional[Sequence[str]] = None,
        device: str = 'cpu',
        dtype: str = 'float32',
        pretrained: bool = True,
        weights: Optional[str] = None,
        model_kwargs: Optional[dict] = None,
) -> nn.Module:
    """The timm `features_only` model for `taps` (names, indices or a preset; default the pyramid), ready to run."""
    import timm

    from . import models  # noqa: F401  (registers the models)

    kwargs = dict(model_kwargs or {})
    if weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights)
    model = timm.create_model(
        model_name, pretrained=pretrained or bool(weights), features_only=True,
        out_indices=tuple(taps) if taps else None, **kwargs)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def extract_features(
        images: Sequence[Path],
        model: nn.Module,
        size: Optional[int] = None,
        batch_size: int = 4,
        resize: str = 'stretch',
        desc: str = 'features',
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run a `load_extractor` model on image files; return {tap name: (N, C, H, W) float32} and the data config."""
    from timm.data import resolve_data_config
    from tqdm import tqdm

    data_cfg = resolve_data_config({}, model=model)
    if size:
        data_cfg['input_size'] = (3, size, size)
    param = next(model.parameters())
    names = [info['name'] for info in model.feature_info.get_dicts()]
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.inference_mode(), tqdm(total=len(images), unit='img', desc=desc) as bar:
        for start in range(0, len(images), batch_size):
            paths = images[start:start + batch_size]
            x = torch.stack([load_image(p, data_cfg['input_size'][1:], resize, data_cfg['mean'], data_cfg['std'])
                             for p in paths]).to(device=param.device, dtype=param.dtype)
            for name, feat in zip(names, model(x)):
                chunks[name].append(feat.float().cpu())
            bar.update(len(paths))
    return {n: torch.cat(c) for n, c in chunks.items()}, data_cfg


def pca_image(features: torch.Tensor, out: Path, tile: int = 256) -> None:
    """Save the first three principal components of (N, C, H, W) features as an RGB picture, one tile per image."""
    from PIL import Image

    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(flat, q=min(3, c), center=False)
    proj = flat @ v[:, :3]
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1])], 1)
    rgb = (rgb.reshape(n, h, w, 3) * 255).round().byte().numpy()
    sheet = Image.new('RGB', (tile * n, tile * h // w))
    for i in range(n):
        sheet.paste(Image.fromarray(rgb[i]).resize((tile, tile * h // w), Image.NEAREST), (tile * i, 0))
    sheet.save(out)


def run_features(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone features`."""
    images = [Path(p) for p in args.images]
    unreadable = []
    for path in images:  # headers only: a bad file is found before any model work
        try:
            image_size(path)
        except ImageError as e:
            unreadable.append(str(e))
    if unreadable:
        raise ImageError(f'{len(unreadable)} of {len(images)} images cannot be read: ' + '; '.join(unreadable[:5]))
    out = check_output(Path(args.out), images, args.overwrite)
    pca_out = out.with_name(f'{out.stem}_pca_{args.pca}.png') if args.pca else None
    if pca_out is not None:
        check_output(pca_out, images, args.overwrite)
    model = load_extractor(args.model, taps=args.taps, device=args.device, dtype=args.dtype,
                           pretrained=not args.random_weights, weights=args.weights, model_kwargs=args.model_kwargs)
    if args.pca:
        infos = {i['name']: i for i in model.feature_info.get_dicts()}
        if args.pca not in infos:
            raise OutputError(f'--pca {args.pca} is not among the extracted taps ({", ".join(infos)}); add it to --taps.')
        side = args.size or model.pretrained_cfg['input_size'][-1]
        if math.ceil(side / infos[args.pca]['reduction']) < 2:
            raise OutputError(f'--pca {args.pca}: its map is 1x1 at {side} px (stride {infos[args.pca]["reduction"]}), '
                              'nothing to picture. Pick a finer tap or a larger --size.')
    feats, data_cfg = extract_features(images, model, size=args.size, batch_size=args.batch_size,
                                       resize=args.resize, desc=args.model)
    metadata = dict(model=args.model, images=json.dumps([str(p) for p in images]),
                    input_size=json.dumps(list(data_cfg['input_size'])), resize=args.resize)
    save_safetensors(feats, out, metadata=metadata)
    for name, f in feats.items():
        print(f'{name}: {tuple(f.shape)}')
    print(f'wrote {out}')
    if pca_out is not None:
        pca_image(feats[args.pca], pca_out)
        print(f'wrote {pca_out}')
    return 0
