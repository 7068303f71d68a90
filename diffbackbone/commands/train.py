"""`diffbackbone train corres`: Meng et al.'s trained semantic correspondence on SPair-71k (see
`diffbackbone.train.corres`). `diffbackbone clean-train` stays its own command."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import add_model_args, add_prompt_arg, model_name, non_negative_float, positive_float, positive_int

__all__ = ['add_parser', 'run', 'add_split_args', 'corres_features', 'run_eval_head']

SPLITS = dict(train='spair_71k_train.json', val='spair_71k_val-360.json', test='spair_71k_test-6.json')


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `train` and its subcommand `corres` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser('train', help='train task heads on diffusion features (corres: SPair-71k, Meng et al.)')
    p.set_defaults(func=run)  # a group (a task is required); every parser's handler is this module's `run`
    tasks = p.add_subparsers(dest='task', required=True)
    c = tasks.add_parser(
        'corres', help="Meng et al.'s trained semantic correspondence (conv head or nearest neighbours)",
        description="Meng et al.'s correspondence/task-corres.py: every tap resized to 128 x 128 and concatenated; "
                    '--algorithm nn: nearest neighbours, no training; conv: a 3x3 conv head trained with the CLIP '
                    'loss over keypoints (AdamW 5e-4, 2 epochs of at most 5000 pairs, validation every 500 steps). '
                    'Features come from a feature store, so each image runs through the model once.')
    add_split_args(c)
    c.add_argument('--algorithm', choices=('conv', 'nn'), default='conv',
                   help='conv: train the head (default); nn: nearest neighbours on the features, no training')
    c.add_argument('--out', help='run folder: checkpoint_step_N.pt, best.pt, last.pt, log.jsonl (required for conv)')
    c.add_argument('--train-split', help=f'training pairs (default: --data/{SPLITS["train"]})')
    c.add_argument('--epochs', type=positive_int, default=2, help='epochs (default: 2)')
    c.add_argument('--pairs-per-epoch', type=positive_int, default=5000,
                   help='pairs drawn per epoch by a seeded permutation (default: 5000)')
    c.add_argument('--lr', type=positive_float, default=5e-4, help='AdamW learning rate (default: 5e-4)')
    c.add_argument('--weight-decay', type=non_negative_float, default=0.01, help='AdamW weight decay (default: 0.01)')
    c.add_argument('--val-every', type=positive_int, default=500, help='checkpoint and validate every N steps '
                                                                       '(default: 500)')
    c.add_argument('--resume', action='store_true', help='continue from the latest checkpoint in --out')
    c.add_argument('--no-progress', action='store_true', help='no progress bar')
    c.set_defaults(func=run)
    return p


def add_split_args(p: argparse.ArgumentParser) -> None:
    """The options `train corres` shares with `eval spair --head`: data, split, store, model, taps, size."""
    p.add_argument('--data', required=True, help='the SPair-71k JPEGImages folder (their --dataset_path), holding '
                                                 "their split files spair_71k_*.json (Diffusion Hyperfeatures')")
    p.add_argument('--val-split', help=f'validation pairs (default: --data/{SPLITS["val"]})')
    p.add_argument('--limit-val', type=positive_int, help='only the first N validation pairs')
    p.add_argument('--store', required=True, help='feature store folder: created, or resumed when it exists')
    p.add_argument('--model', type=model_name, default='sd15', help='sd15, sdxl, ours_xl_t, ... (default: sd15)')
    p.add_argument('--taps', nargs='+', help='taps or a preset (default: gdf_practical; multi-model backbones: '
                                             'every member tap)')
    p.add_argument('--size', type=positive_int, help="square input size (default: the model's, 512 sd15, 1024 sdxl)")
    p.add_argument('--timestep', type=int, help="noise timestep of a noisy model (default: 50, theirs)")
    add_prompt_arg(p, help="caption (default: their fixed prompt naming the 18 SPair classes; with --random-weights "
                           'none)')
    p.add_argument('--workers', type=int, help='image decoding processes of the extraction')
    p.add_argument('--seed', type=int, default=0, help='seed of the head and of the pair order (default: 0)')
    add_model_args(p, batch_size=4)


def _model_kwargs(args: argparse.Namespace) -> dict:
    from ..evals.common import eval_model_kwargs
    from ..models.multi import GDF_PROMPT, is_multi_model

    kwargs = eval_model_kwargs(args, default_timestep=50)
    if 'prompt' not in kwargs and not args.random_weights and not is_multi_model(args.model):
        kwargs['prompt'] = GDF_PROMPT  # the multi models set it for their members
    return kwargs


def corres_features(args: argparse.Namespace, pairs: list) -> tuple[object, list[str], dict]:
    """Every image of `pairs` into the feature store (resumable), then (StoreMaps, taps, meta): what a head is for."""
    from ..data.extract import ExtractJob, extract_features
    from ..data.store import FeatureStore
    from ..models.multi import MEMBERS_PRESET, is_multi_model
    from ..train.corres import StoreMaps

    multi = is_multi_model(args.model)
    taps = args.taps or ([MEMBERS_PRESET] if multi else ['gdf_practical'])
    kwargs = _model_kwargs(args)
    images = sorted({str((Path(args.data) / n).resolve()) for p in pairs for n in (p.src, p.trg)})
    extract_features(ExtractJob(
        images=images, out=args.store, model=args.model, taps=taps, size=args.size, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, weights=args.weights, random_weights=args.random_weights,
        model_kwargs=kwargs, workers=args.workers, on_error='fail', store_dtype='float16'))
    store = FeatureStore(args.store)
    names = list(store.taps)
    dim = sum(int(store.config['shapes'][t][0]) for t in names)
    meta = dict(model=args.model, taps=names, dim=dim, multi=multi, model_kwargs=kwargs, weights=args.weights,
                random_weights=bool(args.random_weights), size=args.size)
    return StoreMaps(store, Path(args.data), names, args.device), names, meta


def _check_outputs(args: argparse.Namespace, out: str | None, json_file: str | None = None) -> None:
    from ..data.outputs import check_distinct_outputs, check_file, check_folder

    check_distinct_outputs({'--json': json_file}, {'--out': out, '--store': args.store})
    inputs = [args.data] + [f for f in (getattr(args, 'train_split', None), getattr(args, 'val_split', None),
                                        getattr(args, 'split', None), getattr(args, 'head', None)) if f and f != 'nn']
    check_folder(args.store, 'store', inputs, option='--store')
    if out:
        check_folder(out, 'folder', inputs + [args.store], option='--out')
    if json_file:
        check_file(json_file, inputs + [args.store], option='--json')


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone train corres`."""
    import numpy as np
    import torch

    from ..train.corres import CorresConfig, CorresError, CorresHead, load_split, train_corres, validate

    if args.algorithm == 'conv' and not args.out:
        raise CorresError('--algorithm conv needs --out (the run folder of checkpoints and the trained head).')
    if args.resume and not args.out:
        raise CorresError('--resume needs --out (the run folder to continue).')
    _check_outputs(args, args.out)
    data = Path(args.data)
    val = load_split(args.val_split or data / SPLITS['val'], data, args.limit_val)  # checked before any model
    train = load_split(args.train_split or data / SPLITS['train'], data) if args.algorithm == 'conv' else []
    maps, taps, meta = corres_features(args, train + val)
    dim = meta['dim']
    if args.algorithm == 'nn':
        result = validate(CorresHead(dim, None), maps, val, progress=not args.no_progress)
        print(f'{args.model} nn ({dim} channels): PCK@0.1 img {result["pck_img"]:.2f}, bbox {result["pck_bbox"]:.2f} '
              f'({result["pairs"]} pairs, {result["points"]} points)')
        return 0
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    head = CorresHead(dim, dim // 2 if meta['multi'] else dim).to(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CorresConfig(epochs=args.epochs, pairs_per_epoch=args.pairs_per_epoch, lr=args.lr,
                       weight_decay=args.weight_decay, val_every=args.val_every, seed=args.seed)
    result = train_corres(head, maps, train, val, cfg, out, meta, resume=args.resume, progress=not args.no_progress)
    best = result['best']
    print(f'best validation PCK@0.1: img {best["pck_img"]:.2f}, bbox {best["pck_bbox"]:.2f} (step {best["step"]}); '
          f'wrote {out / "last.pt"}' + (f' and {out / "best.pt"}' if best['step'] is not None else ''))
    return 0


def run_eval_head(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval spair --head CKPT`: their `validate` of a trained head (or `--head nn`) on a split
    file; the model, taps, size and model arguments are the checkpoint's."""
    from ..data.outputs import write_json
    from ..train.corres import CorresError, CorresHead, load_head, load_split, validate

    if args.split is None or args.store is None:
        raise CorresError('--head needs --split FILE (one of their spair_71k_*.json) and --store DIR (the feature '
                          'store of those images).')
    _check_outputs(args, None, args.json)
    head, meta = (None, None) if args.head == 'nn' else load_head(args.head)
    if meta is not None:
        meta = meta['meta']
        if meta['model'] != args.model:
            raise CorresError(f'{args.head} is a head for {meta["model"]}, not --model {args.model}.')
    pairs = load_split(args.split, args.data, args.limit)
    if meta:  # a head: the taps and size it was trained on; nearest neighbours: --taps, --size as given
        args.taps, args.size = meta['taps'], meta['size']
    args.timestep, args.workers, args.val_split = None, None, args.split
    args.model_kwargs = dict(meta['model_kwargs']) if meta else args.model_kwargs
    args.prompt = None
    if meta:
        args.weights, args.random_weights = meta['weights'], meta['random_weights']
    maps, taps, got = corres_features(args, pairs)
    if head is None:
        head = CorresHead(got['dim'], None)
    elif taps != meta['taps'] or got['dim'] != head.dim:
        raise CorresError(f'{args.head} was trained on taps {meta["taps"]} ({head.dim} channels); the store has '
                          f'{taps} ({got["dim"]}).')
    result = validate(head.to(args.device), maps, pairs, progress=True)
    print(f'{args.model} head {args.head}: PCK@0.1 img {result["pck_img"]:.2f}, bbox {result["pck_bbox"]:.2f} '
          f'({result["pairs"]} pairs, {result["points"]} points; {Path(args.split).name})')
    if args.json:
        write_json(args.json, dict(result, model=args.model, head=str(args.head), split=str(args.split),
                                   protocol='gdf', taps=taps, size=args.size, model_kwargs=got['model_kwargs']),
                   'eval spair')
        print(f'wrote {args.json}')
    return 0
