"""Command line: `diffbackbone features IMAGE... --model cleandift_sd21 --out feats.safetensors`.

Subcommands:
    features  extract tap maps of images into a safetensors file (one tensor per tap, images stacked), optionally a
              PCA picture of one tap.
    taps      list a model's taps with channels and strides.
    clean-train  fine-tune a UNet with the CleanDIFT recipe (see `diffbackbone.train`).
    bench     time our extractor against a plain-diffusers reference (see `diffbackbone.bench`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ['main', 'extract_features', 'pca_image']

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _load_images(paths: Sequence[Path], transform) -> list[torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append(transform(img.convert('RGB')))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise SystemExit(f'error: cannot read image {path}: {e}. Give paths of readable image files.') from e
    return out


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
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run `model_name` on image files; return {tap name: (N, C, H, W) tensor} and the model's data config."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from tqdm import tqdm

    import diffbackbone  # noqa: F401  (registers the models)

    kwargs = dict(model_kwargs or {})
    if weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights)
    model = timm.create_model(
        model_name, pretrained=pretrained or bool(weights), features_only=True,
        out_indices=tuple(taps) if taps else None, **kwargs)
    model = model.to(device=device, dtype=_DTYPES[dtype]).eval()
    data_cfg = resolve_data_config({}, model=model)
    if size:
        data_cfg['input_size'] = (3, size, size)
    transform = create_transform(**data_cfg)
    names = [info['name'] for info in model.feature_info.get_dicts()]
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.inference_mode(), tqdm(total=len(images), unit='img', desc=model_name) as bar:
        for start in range(0, len(images), batch_size):
            paths = images[start:start + batch_size]
            x = torch.stack(_load_images(paths, transform)).to(device=device, dtype=_DTYPES[dtype])
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


def _cmd_features(args: argparse.Namespace) -> int:
    images = [Path(p) for p in args.images]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise SystemExit(f'error: no such image file: {", ".join(missing)}')
    from .hub import save_safetensors

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
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


def _cmd_taps(args: argparse.Namespace) -> int:
    import timm

    from .models.taps import list_taps

    with torch.device('meta'):  # no weights, no download
        model = timm.create_model(args.model)
    index = {t.name: i for i, t in enumerate(model.taps)}
    taps = list_taps(args.model) if args.all else sorted(model.taps, key=lambda t: t.seq)
    print(f'{"index":>5}  {"name":<44} {"channels":>8} {"stride":>6}  aliases')
    for tap in taps:
        print(f'{index.get(tap.name, "-"):>5}  {tap.name:<44} {tap.num_chs:>8} {tap.reduction:>6}  {", ".join(tap.aliases)}')
    print('presets: ' + '; '.join(f'{k} = {", ".join(v)}' for k, v in model.presets.items()))
    if not args.all:
        print(f'{len(list_taps(args.model))} taps in all: `diffbackbone taps {args.model} --all` lists every one.')
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    bench_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='diffbackbone', description='Diffusion UNet features as vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract features of images into a safetensors file')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--model', default='cleandift_sd21', help='timm model name (default: cleandift_sd21)')
    p.add_argument('--taps', nargs='+', help='tap names, indices or a preset (default: the stride 8/16/32/64 pyramid)')
    p.add_argument('--out', required=True, help='output .safetensors file (one (N, C, H, W) tensor per tap)')
    p.add_argument('--size', type=int, help='square input size (default: the model pretrained_cfg input_size)')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=sorted(_DTYPES), default='float32')
    p.add_argument('--weights', help='local weights file instead of the Hub (pretrained_cfg_overlay file=...)')
    p.add_argument('--random-weights', action='store_true', help='random weights, no download (for trying things out)')
    p.add_argument('--model-kwargs', help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.add_argument('--pca', metavar='TAP', help='also save a PCA picture of this tap next to --out')
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser('taps', help="list a model's taps (index, name, channels, stride)")
    p.add_argument('model')
    p.add_argument('--all', action='store_true', help='every activation, not only the block outputs')
    p.set_defaults(func=_cmd_taps)

    from .train.cli import add_clean_train_parser

    add_clean_train_parser(sub)

    p = sub.add_parser('bench', help='time our extractor against a plain-diffusers reference (same weights)',
                       add_help=False)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == 'bench':
        args.rest = rest
    elif rest:
        parser.error(f'unrecognized arguments: {" ".join(rest)}')
    from .hub import HubError
    from .models import TapError

    try:
        return args.func(args)
    except (HubError, TapError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
