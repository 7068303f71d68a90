"""`diffbackbone clean-train`: the CleanDIFT recipe on a folder of images (see `diffbackbone.train`)."""
from __future__ import annotations

import argparse
import sys

__all__ = ['add_parser', 'run', 'add_clean_train_parser', 'run_clean_train']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `clean-train` subcommand to `diffbackbone`'s subparsers."""
    from ..cli_args import device, finite_float, non_negative_float, positive_float, positive_int

    p = subparsers.add_parser(
        'clean-train', help='make a diffusion UNet clean (CleanDIFT recipe) on a folder of images',
        description='Fine-tune a clean copy of a Stable Diffusion UNet so that, with projection heads, its features '
                    'on the clean image match the frozen UNet\'s on noisy images (CleanDIFT). Multi-GPU: '
                    'torchrun --nproc_per_node N -m diffbackbone clean-train ...')
    p.add_argument('--base', default='sd21',
                   help='sd21, sd15, one of our model names (test_cleandift for a tiny random model) or a local '
                        'diffusers folder (default: sd21)')
    p.add_argument('--data', required=True, help='folder of images, searched recursively')
    p.add_argument('--out', required=True, help='run folder: checkpoints, log.jsonl and the output .safetensors')
    p.add_argument('--steps', type=positive_int, default=5000, help='optimizer steps (default: 5000)')
    p.add_argument('--batch-size', type=positive_int, default=8, help='images per GPU per micro-batch (default: 8)')
    p.add_argument('--grad-accum', type=positive_int, default=1, help='micro-batches per optimizer step (default: 1)')
    p.add_argument('--lr', type=positive_float, default=1e-5, help='AdamW learning rate (default: 1e-5)')
    p.add_argument('--weight-decay', type=non_negative_float, default=0.0,
                   help='AdamW weight decay (default: 0, as CleanDIFT)')
    p.add_argument('--warmup', type=int, default=2000, help='linear warm-up steps (default: 2000)')
    p.add_argument('--bins', type=int, default=3, help='timestep bins, one teacher timestep per bin (default: 3)')
    p.add_argument('--t-min', type=int, default=1, help='smallest teacher timestep (default: 1)')
    p.add_argument('--t-max', type=int, default=999, help='largest teacher timestep (default: 999)')
    p.add_argument('--taps', nargs='+', default=['cleandift'],
                   help="taps matched by heads: names or a preset (default: cleandift = us1..us10 and mid)")
    p.add_argument('--size', type=positive_int, help='crop size in pixels (default: the model input size, 768 for SD2.1)')
    p.add_argument('--crop-scale', type=finite_float, nargs=2, default=(0.5, 1.0), metavar=('MIN', 'MAX'),
                   help='area range of the random resized crops (default: 0.5 1.0)')
    p.add_argument('--captions', action='store_true',
                   help='condition on sidecar captions (<image>.txt, or .json with "caption"); loads the base\'s text '
                        'encoder. Without it every image gets the empty prompt.')
    p.add_argument('--latent', choices=('sample', 'mode'), default='sample',
                   help='clean latent: a posterior draw (as CleanDIFT) or its mode (default: sample)')
    p.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                   help='bf16 autocast (teacher weights in bf16) or fp32; auto: bf16 on GPUs that have it')
    p.add_argument('--grad-checkpointing', action='store_true', help='recompute student activations in backward')
    p.add_argument('--clip-grad', type=positive_float, help='clip the gradient norm to this value')
    p.add_argument('--workers', type=int, default=4, help='data loader processes per GPU (default: 4)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--save-every', type=int, default=500, help='checkpoint every N steps (default: 500)')
    p.add_argument('--keep', type=int, default=2, help='checkpoints kept (default: 2)')
    p.add_argument('--val-every', type=int, default=250, help='validate every N steps (default: 250)')
    p.add_argument('--val-images', type=int, default=8, help='held-out images for validation (default: 8; 0: none)')
    p.add_argument('--val-data', help='folder of validation images (default: held out from --data)')
    p.add_argument('--resume', nargs='?', const='auto',
                   help='continue a run: the latest checkpoint in --out, or the checkpoint folder given')
    p.add_argument('--random-weights', action='store_true', help='random base weights, no download (trying out)')
    p.add_argument('--device', type=device, help='cpu, cuda, cuda:1 (default: the GPU of this rank, else cpu)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone clean-train`."""
    from .data import DataError
    from .distill import TrainError
    from .trainer import CleanTrainer, TrainConfig

    cfg = TrainConfig(
        data=args.data, out=args.out, base=args.base, taps=args.taps[0] if len(args.taps) == 1 else list(args.taps),
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, bins=args.bins, t_min=args.t_min, t_max=args.t_max,
        size=args.size, crop_scale=tuple(args.crop_scale), captions=args.captions, latent=args.latent,
        precision=args.precision, grad_checkpointing=args.grad_checkpointing, clip_grad=args.clip_grad,
        num_workers=args.workers, seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep,
        val_every=args.val_every, val_images=args.val_images, val_data=args.val_data, resume=args.resume,
        pretrained=not args.random_weights, device=args.device, progress=not args.no_progress)
    try:
        result = CleanTrainer(cfg).train()
    except (TrainError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {result.output}')
    if result.validation:
        print(f'validation (student+heads vs teacher cosine): {result.validation[-1]}')
    return 0


add_clean_train_parser, run_clean_train = add_parser, run  # the names before every command had add_parser and run
