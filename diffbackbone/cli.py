"""Command line: `diffbackbone features IMAGE... --model cleandift_sd21 --out feats.safetensors`.

Subcommands:
    features  extract tap maps of images (files, folders, globs, @lists) into a resumable feature store folder
              (`diffbackbone.FeatureStore`; torchrun for several GPUs), or into one safetensors file (one tensor per
              tap, images stacked), optionally with a PCA picture of one tap.
    taps      list a model's taps with channels and strides.
    inspect   a picture (PCA / k-means) and statistics of every requested tap over a few images.
    depth     metric depth of images with CleanDIFT's published depth probe (see `diffbackbone.depth`).
    clean-train  fine-tune a UNet with the CleanDIFT recipe (see `diffbackbone.train`).
    export    write a fine-tuned model as a timm Hub repo, loadable with `hf-hub:ORG/NAME`.
    bench     time our extractor against a plain-diffusers reference (see `diffbackbone.bench`).
    match     zero-shot correspondence of points between two images (see `diffbackbone.correspondence`).
    eval      evaluations that reproduce published numbers (see `diffbackbone.evals`): `eval spair` (SPair-71k PCK),
              `eval hpatches` (HPatches homography accuracy), `eval davis` (DAVIS-2017 label propagation J&F),
              `eval pixel` (label-scarce segmentation mIoU).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from .cli_args import (add_model_args, diffusion_model_name, finite_float, json_object, model_name, point,
                       positive_float, positive_int)

__all__ = ['main', 'build_parser']


def _lazy(module: str, handler: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler imported only when the subcommand runs (keeps `--help` fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f'.{module}', __package__), handler)(args)

    run.target = (module, handler)  # checked by tests/test_layout.py
    return run


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.speed import main as bench_main

    bench_main(args.rest)
    return 0


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """`features` options of the dataset-scale pipeline (diffbackbone/data/pipeline.py, diffbackbone/data/store.py)."""
    p.add_argument('--workers', type=int, help='image decoding processes (default: from the CPU count)')
    p.add_argument('--on-error', choices=('skip', 'fail'), help='unreadable images: skip and list them (store '
                   'default) or stop (single-file default)')
    p.add_argument('--store-dtype', choices=('float16', 'bfloat16', 'float32'),
                   help='dtype of stored maps (default: float16 in a store, float32 in a single file)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--feature-pool', type=positive_int, metavar='R', help='average-pool stored maps by R (Meng et al.)')
    g.add_argument('--feature-size', type=positive_int, metavar='N', help='resize stored maps to N x N (bilinear)')
    p.add_argument('--shard-size', type=positive_int, metavar='N', help='images per store shard (default: about 256 MB)')
    p.add_argument('--compile', nargs='?', const='default', help='torch.compile the model (optional mode)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='diffbackbone', description='Diffusion UNet features as vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract features of images into a feature store folder or a safetensors file')
    p.add_argument('images', nargs='+', help='image files, folders (recursive), quoted globs, @list.txt')
    p.add_argument('--model', type=model_name, default='cleandift_sd21', help='timm model name (default: cleandift_sd21)')
    p.add_argument('--taps', nargs='+', help='tap names, indices or a preset (default: the stride 8/16/32/64 pyramid)')
    p.add_argument('--out', required=True, help='feature store folder (resumable), or a .safetensors file for a few '
                   'images (one (N, C, H, W) tensor per tap)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out file or feature store')
    p.add_argument('--size', type=positive_int, help='square input size (default: the model pretrained_cfg input_size)')
    p.add_argument('--resize', choices=('stretch', 'pad', 'crop'), default='stretch',
                   help='stretch: whole image to size x size, as DIFT/CleanDIFT (default); pad: keep the aspect ratio, '
                        'pad with the mean colour; crop: short side to size, centre crop (drops the rest)')
    add_model_args(p, batch_size=4)
    p.add_argument('--pca', metavar='TAP', help='also save a PCA picture of this tap next to --out')
    p.add_argument('--prompt', help='caption the UNet is conditioned on, e.g. "a photo of a dog" (default: empty)')
    _add_store_options(p)
    p.set_defaults(func=_lazy('commands.features', 'run_features'))

    p = sub.add_parser('depth', help="metric depth with CleanDIFT's published NYUv2 depth probe (us6, cleandift_sd21)",
                       description="CleanDIFT's depth probe as their DepthPred.predict runs it; writes "
                                   '<stem>_depth.npy (metres, float32, input size) and <stem>_depth.png per image.')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--out', default='.', help='output folder (default: the current folder)')
    p.add_argument('--probe', help='probe .safetensors file, folder, or Hub repo "org/name[:file]" (default: '
                                   'CompVis/cleandift cleandift_sd21_depth_probe.safetensors)')
    p.add_argument('--model', type=model_name, default='cleandift_sd21', help='timm model (default: cleandift_sd21)')
    p.add_argument('--tap', default='us6', help='tap the probe reads (default: us6)')
    p.add_argument('--size', type=positive_int, default=768, help='square size images are resized to (default: 768)')
    p.add_argument('--prompt', default='A photo of a room', help='caption (default: "A photo of a room", CleanDIFT\'s)')
    add_model_args(p, batch_size=4)
    p.set_defaults(func=_lazy('depth', 'run_depth'))

    p = sub.add_parser('taps', help="list a model's taps (index, name, channels, stride)")
    p.add_argument('model', type=diffusion_model_name, help="one of diffbackbone's models, e.g. cleandift_sd21")
    p.add_argument('--all', action='store_true', help='every activation, not only the block outputs')
    p.set_defaults(func=_lazy('commands.taps', 'run_taps'))

    p = sub.add_parser('inspect', help="a picture of each tap's activations over a few images (PCA or k-means), "
                       'with statistics', description="Meng et al.'s qualitative look at every activation: one pass of "
                       "all images to the deepest tap; per tap the first three principal components (fitted jointly "
                       'over the images) as colours, a row per image; several sheets and an index for many taps.')
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
    p.add_argument('--prompt', help='caption the model is conditioned on (default: empty)')
    p.add_argument('--tokens', nargs='+', type=int, metavar='I', help="for each selected '*cross-map' tap, also a grey "
                   'heat map per prompt token index I (0: the start token; CLIP: the words from 1), scaled jointly '
                   'over the images')
    p.add_argument('--max-images', type=positive_int, default=16, help=argparse.SUPPRESS)
    add_model_args(p)
    p.set_defaults(func=_lazy('commands.inspect', 'run_inspect'))

    p = sub.add_parser('export', help='write a fine-tuned model as a timm Hub repo (config.json, model.safetensors)',
                       description='Export a clean-train run or weights file in timm\'s Hub layout; afterwards '
                                   'timm.create_model("hf-hub:ORG/NAME", pretrained=True) loads it by name.')
    p.add_argument('source', help='clean-train run folder (its output .safetensors) or a .safetensors weights file')
    p.add_argument('--out', required=True, help='folder to write (must be new or empty, unless --overwrite)')
    p.add_argument('--model', type=model_name, help='architecture, when the file does not record it (e.g. cleandift_sd21)')
    p.add_argument('--push', metavar='ORG/NAME', help='also upload the folder to this Hub repo (created if needed)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out folder')
    p.add_argument('--model-kwargs', type=json_object,
                   help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.set_defaults(func=_lazy('commands.export', 'run_export'))

    from .train.cli import add_clean_train_parser

    add_clean_train_parser(sub)

    p = sub.add_parser('match', help='match points of a source image onto a target image (zero-shot correspondence)',
                       description="CleanDIFT's correspondence protocol: both images resized to the model's size, "
                                   'one tap upsampled to each original size, cosine argmax over the target.')
    p.add_argument('src', help='source image')
    p.add_argument('trg', help='target image')
    p.add_argument('--points', nargs='+', required=True, type=point, metavar='X,Y',
                   help='source points as (x, y) pixels of the original source image, x to the right, y down '
                        '(CleanDIFT\'s notebook lists (y, x) rows)')
    p.add_argument('--model', type=model_name, default='cleandift_sd21', help='timm model (default: cleandift_sd21)')
    p.add_argument('--taps', default='us6', help='the tap to match with (default: us6)')
    p.add_argument('--prompt', help='caption to condition the UNet on (default: empty, the model\'s own prompt; '
                                    'CleanDIFT\'s notebook uses "A photo of a dog")')
    p.add_argument('--size', type=positive_int, help='square input size (default: the model input_size)')
    p.add_argument('--out', help='picture: source points, each similarity map, matches on the target')
    p.add_argument('--json', help='also write the points and matches, as (x, y) pixels, to this JSON file')
    p.add_argument('--co-pca', nargs='+', type=positive_int, metavar='D',
                   help='fused models (cleandift_sd21_dinov2, ...): reduce each SD tap to D dims by a PCA fitted on '
                        'the two images together, as "A Tale of Two Features" (theirs: 256); --taps is then unused')
    add_model_args(p)
    p.set_defaults(func=_lazy('correspondence', 'run_match'))

    p = sub.add_parser('eval', help='evaluations reproducing published numbers (spair, hpatches, davis, pixel)')
    evals = p.add_subparsers(dest='eval', required=True)
    p = evals.add_parser('spair', help='SPair-71k zero-shot PCK@0.1 (DIFT protocol)',
                         description="DIFT's eval_spair.py protocol: PairAnnotation/test pairs, images resized to "
                                     'size x size, features upsampled to the original size, cosine argmax; PCK@0.1 '
                                     'of the target bbox and of the target image, per image and per point.')
    p.add_argument('--data', required=True, help='SPair-71k folder (JPEGImages/, PairAnnotation/test/)')
    p.add_argument('--model', type=model_name, required=True, help='timm model, e.g. cleandift_sd21 or sd21 (DIFT)')
    p.add_argument('--taps', nargs='+', default=['us6'], help='the tap to match with (default: us6)')
    p.add_argument('--size', type=positive_int, default=768, help='square input size (default: 768, as DIFT)')
    p.add_argument('--prompt-template', help='caption per image, e.g. "a photo of a {category}" (DIFT); '
                                             "default: the model's own (empty) prompt")
    p.add_argument('--json', help='write the figures (percent) to this JSON file')
    p.add_argument('--cache', help='folder caching each image\'s features, so an interrupted run resumes')
    p.add_argument('--limit', type=positive_int, help='only the first N pairs (by file name)')
    p.add_argument('--seed', type=int, default=0, help='seed of --random-weights')
    p.add_argument('--co-pca', nargs='+', type=positive_int, metavar='D',
                   help='fused models: co-PCA of each SD tap per pair to D dims ("A Tale of Two Features": 256)')
    add_model_args(p, batch_size=8)
    p.set_defaults(func=_lazy('evals.spair', 'run_spair'))

    p = evals.add_parser('pixel', help="label-scarce segmentation mIoU (DDPM-segmentation's protocol, Meng et al.)",
                         description="Meng et al.'s scarce_segmentation (DDPM-segmentation's protocol): features of "
                                     'real/train and real/test into a feature store, taps upsampled to the label size '
                                     'and concatenated per pixel, an ensemble of 10 pixel MLPs, mIoU over the test '
                                     'images; mean and std over random train/test splits.')
    p.add_argument('--data', required=True, help="dataset in DDPM-segmentation's layout (horse_21/ holding real/train "
                                                 'and real/test: images + same-named .npy label maps)')
    p.add_argument('--store', required=True, help='feature store folder: created, or resumed when it exists')
    p.add_argument('--model', type=model_name, required=True, help='timm model, e.g. sdxl or sd15')
    p.add_argument('--taps', nargs='+', default=['gdf_practical'], help="taps or a preset (default: gdf_practical, "
                                                                        "Meng et al.'s Ours)")
    p.add_argument('--prompt', help='caption, e.g. "a photo of a horse" (theirs); default: empty')
    p.add_argument('--timestep', type=int, help="noise timestep of a noisy model (default: 50, Meng et al.'s)")
    p.add_argument('--size', type=positive_int, help="square input size (default: the model's, 512 sd15, 1024 sdxl)")
    p.add_argument('--classes', type=positive_int, help='number of classes (default: DDPM-segmentation\'s for a '
                                                        'known category such as horse_21, else the largest label + 1)')
    p.add_argument('--label-size', type=positive_int, default=256, help='labels and features at N x N (default: 256)')
    p.add_argument('--splits', type=positive_int, default=5, help='random train/test splits (default: 5)')
    p.add_argument('--keep-split', action='store_true', help='use the folders\' own train/test split in every run')
    p.add_argument('--ensemble', type=positive_int, default=10, help='pixel MLPs per run (default: 10)')
    p.add_argument('--epochs', type=positive_int, default=100, help='at most this many epochs (default: 100)')
    p.add_argument('--pixel-batch', type=positive_int, default=64, help='pixels per MLP batch (default: 64)')
    p.add_argument('--max-train', type=positive_int, default=50, help='at most N training images (default: 50)')
    p.add_argument('--max-test', type=positive_int, default=650, help='at most N test images (default: 650)')
    p.add_argument('--memory-gb', type=positive_float, default=4.0, help='training maps held at once (native size, '
                   'float16); beyond it an epoch visits the images in groups (default: 4)')
    p.add_argument('--workers', type=int, help='image decoding processes of the extraction')
    p.add_argument('--json', help='write mIoU (percent) per split and class to this JSON file')
    p.add_argument('--seed', type=int, default=0, help='seed of split k is SEED + k (default: 0)')
    add_model_args(p, batch_size=4)
    p.set_defaults(func=_lazy('evals.pixel', 'run_pixel'))

    p = evals.add_parser('hpatches', help='HPatches homography accuracy at 1/3/5 px (DIFT protocol)',
                         description="DIFT's eval_hpatches.py + eval_homography.py: images resized to size x size, the "
                                     'tap sampled at each keypoint, mutual nearest neighbours, cv2.findHomography; '
                                     'accuracy = pairs whose mean corner error is within 1, 3, 5 px.')
    p.add_argument('--data', required=True, help='hpatches-sequences-release folder (i_*/ and v_*/ sequences)')
    p.add_argument('--keypoints', help="DIFT's superpoint-1k folder (<sequence>-<k>.kp); default: the 1000 strongest "
                                       'Shi-Tomasi corners by OpenCV (not SuperPoint: other figures)')
    p.add_argument('--model', type=model_name, default='sd21', help='timm model (default: sd21, DIFT_sd)')
    p.add_argument('--taps', nargs='+', default=['us9'], help="the tap (default: us9, DIFT's up_ft_index=2)")
    p.add_argument('--timestep', type=int, help="noise timestep of a noisy model (default: 0, DIFT's); clean and "
                                                'fused models keep their own unless given')
    p.add_argument('--size', type=positive_int, default=768, help='square input size (default: 768, as DIFT)')
    p.add_argument('--metric', choices=('cosine', 'l2'), default='cosine', help='descriptor distance (default: cosine)')
    p.add_argument('--method', choices=('lmeds', 'ransac'), default='lmeds', help='cv2.findHomography method '
                                                                                  '(default: lmeds)')
    p.add_argument('--json', help='write the figures (percent) and every pair\'s corner error to this JSON file')
    p.add_argument('--cache', help="folder caching each image's descriptors, so an interrupted run resumes")
    p.add_argument('--limit', type=positive_int, help='only the first N sequences (by name)')
    p.add_argument('--seed', type=int, default=0, help='seed of --random-weights')
    add_model_args(p, batch_size=6)
    p.set_defaults(func=_lazy('evals.hpatches', 'run_hpatches'))

    p = evals.add_parser('davis', help='DAVIS-2017 video label propagation, J&F (DIFT / DINO protocol)',
                         description="DIFT's eval_davis.py (DINO's protocol): frames at 480 px short side, the first "
                                     'frame\'s masks propagated by feature affinity from the first and the last '
                                     'frames; J&F as the DAVIS 2017 semi-supervised evaluation computes them.')
    p.add_argument('--data', required=True, help='DAVIS folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)')
    p.add_argument('--split', default='val', help='ImageSets/2017/<split>.txt (default: val)')
    p.add_argument('--sequences', nargs='+', help='only these sequences of the split')
    p.add_argument('--model', type=model_name, default='sd21', help='timm model (default: sd21, DIFT_sd)')
    p.add_argument('--taps', nargs='+', default=['us9'], help="the tap (default: us9, DIFT's up_ft_index=2)")
    p.add_argument('--timestep', type=int, help="noise timestep of a noisy model (default: 51, DIFT's); clean and "
                                                'fused models keep their own unless given')
    p.add_argument('--short-side', type=positive_int, default=480,
                   help='frames resized to this short side, the long side floored to a multiple of 32 (default: 480)')
    p.add_argument('--temperature', type=finite_float, default=0.2, help='affinity temperature (default: 0.2)')
    p.add_argument('--topk', type=positive_int, default=15, help='source positions kept per target (default: 15)')
    p.add_argument('--n-last-frames', type=positive_int, default=28,
                   help='preceding frames in the context besides the first (default: 28)')
    p.add_argument('--neighborhood', type=int, default=15,
                   help='sources within this many feature cells of the target (default: 15; 0: all)')
    p.add_argument('--masks', help='also write the predicted masks as indexed PNGs, <MASKS>/<sequence>/<frame>.png')
    p.add_argument('--json', help='write J&F (percent), per sequence and object, to this JSON file')
    p.add_argument('--cache', help="folder caching each frame's features, so an interrupted run resumes")
    p.add_argument('--limit', type=positive_int, help='only the first N sequences of the split')
    p.add_argument('--seed', type=int, default=0, help='seed of --random-weights')
    add_model_args(p, batch_size=8)
    p.set_defaults(func=_lazy('evals.davis', 'run_davis'))

    p = sub.add_parser('bench', help='time our extractor against a plain-diffusers reference (same weights)',
                       add_help=False)
    p.set_defaults(func=_cmd_bench)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .models.text import PromptTruncatedWarning

    if issubclass(category, PromptTruncatedWarning):
        print('warning: ' + ' '.join(str(message).splitlines()), file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == 'bench':
        args.rest = rest
    elif rest:
        parser.error(f'unrecognized arguments: {" ".join(rest)}')
    if args.command in ('features', 'match') and args.prompt and args.random_weights:
        parser.error('--prompt needs pretrained weights: its text embedding is computed while they load, so with '
                     '--random-weights it would be recorded but not applied. Drop --prompt or --random-weights.')
    from .hub import HubError
    from .models import TapError

    try:
        if getattr(args, 'prompt', None) is not None and args.command == 'features':  # passed as model kwarg `prompt`
            args.model_kwargs = {**(args.model_kwargs or {}), 'prompt': args.prompt}
        with warnings.catch_warnings():  # our warnings (a prompt cut to the text encoder's window) as one line each
            warnings.showwarning = _show_warning
            return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (HubError, TapError, ValueError, OSError) as e:  # ImageError, ExportError, ... are ValueErrors
        print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)  # one line (Hub errors add their cause)
        return 2


if __name__ == '__main__':
    sys.exit(main())
