"""`diffbackbone features`: tap maps of image files into a safetensors file, and a PCA picture of one tap."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .hub import save_safetensors
from .images import load_image

__all__ = ['extract_features', 'pca_image', 'run_features', 'DTYPES']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def extract_features(
        images: Sequence[Path],
        model_name: str,
        taps: Optional[Sequence[str]] = None,
        size: Optional[int] = None,
        batch_size: int = 4,
        device: str = 'cpu',
        dtype: str = 'float32',
        pretrained: bool = True,
        weights: Optional[str] = None,
        model_kwargs: Optional[dict] = None,
        resize: str = 'stretch',
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run `model_name` on image files; return {tap name: (N, C, H, W) tensor} and the model's data config."""
    import timm
    from timm.data import resolve_data_config
    from tqdm import tqdm

    import diffbackbone  # noqa: F401  (registers the models)

    kwargs = dict(model_kwargs or {})
    if weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights)
    model = timm.create_model(
        model_name, pretrained=pretrained or bool(weights), features_only=True,
        out_indices=tuple(taps) if taps else None, **kwargs)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    data_cfg = resolve_data_config({}, model=model)
    if size:
        data_cfg['input_size'] = (3, size, size)
    names = [info['name'] for info in model.feature_info.get_dicts()]
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.inference_mode(), tqdm(total=len(images), unit='img', desc=model_name) as bar:
        for start in range(0, len(images), batch_size):
            paths = images[start:start + batch_size]
            x = torch.stack([load_image(p, data_cfg['input_size'][1:], resize, data_cfg['mean'], data_cfg['std'])
                             for p in paths]).to(device=device, dtype=DTYPES[dtype])
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
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise SystemExit(f'error: no such image file: {", ".join(missing)}')
    kwargs = args.model_kwargs or {}  # a dict: cli.json_object parsed it
    feats, data_cfg = extract_features(
        images, args.model, taps=args.taps, size=args.size, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, pretrained=not args.random_weights, weights=args.weights, model_kwargs=kwargs)
    metadata = dict(model=args.model, images=json.dumps([str(p) for p in images]),
                    input_size=json.dumps(list(data_cfg['input_size'])))
    out = Path(args.out)
    save_safetensors(feats, out, metadata=metadata)
    for name, f in feats.items():
        print(f'{name}: {tuple(f.shape)}')
    print(f'wrote {out}')
    if args.pca:
        if args.pca not in feats:
            raise SystemExit(f'error: --pca {args.pca} is not among the extracted taps {list(feats)}; add it to --taps.')
        pca_out = out.with_name(f'{out.stem}_pca_{args.pca}.png')
        pca_image(feats[args.pca], pca_out)
        print(f'wrote {pca_out}')
    return 0
