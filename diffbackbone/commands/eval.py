"""`diffbackbone eval spair | hpatches | davis | pixel`: evaluations that reproduce published numbers. The subcommands
are declared here; each runs its protocol in `diffbackbone.evals` (imported only when it runs)."""
from __future__ import annotations

import argparse
import importlib

from ..cli_args import add_model_args, add_prompt_arg, model_name, positive_float, positive_int

__all__ = ['HANDLERS', 'add_parser', 'run', 'spair_protocol']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `eval` and its subcommands to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser('eval', help='evaluations reproducing published numbers (spair, hpatches, davis, pixel)')
    evals = p.add_subparsers(dest='eval', required=True)
    for add in (_add_spair, _add_pixel, _add_hpatches, _add_davis):
        add(evals).set_defaults(func=run)
    return p


# eval name -> (module, function) of its handler, imported when it runs
HANDLERS = {name: (f'diffbackbone.evals.{name}', f'run_{name}') for name in ('spair', 'pixel', 'hpatches', 'davis')}


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval NAME`: the protocol's own handler."""
    if args.eval == 'spair' and spair_protocol(args) == 'gdf':  # Meng et al.'s, of a trained head or 'nn'
        from .train import run_eval_head

        return run_eval_head(args)
    module, handler = HANDLERS[args.eval]
    return getattr(importlib.import_module(module), handler)(args)


def spair_protocol(args: argparse.Namespace) -> str:
    """`eval spair`'s protocol: `--protocol`, else gdf with `--head`, else dift; options of the other refused."""
    from ..errors import InputError

    protocol = args.protocol or ('gdf' if args.head else 'dift')
    if protocol == 'dift':
        given = [o for o, v in (('--head', args.head), ('--split', args.split), ('--store', args.store)) if v]
        if given:
            raise InputError(f'{", ".join(given)}: options of --protocol gdf (Meng et al.\'s scoring of a split file), '
                             'not of --protocol dift.')
        return protocol
    given = [o for o, v in (('--captions', args.captions), ('--prompt-template', args.prompt_template),
                            ('--co-pca', args.co_pca), ('--cache', args.cache)) if v]
    if given:
        raise InputError(f'{", ".join(given)}: options of --protocol dift, not of gdf (Meng et al.\'s scoring: their '
                         'fixed prompt, features in --store).')
    if not args.head:
        args.head = 'nn'  # their nearest neighbours on the concatenated taps, no head
    return protocol


def _add_spair(evals: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = evals.add_parser('spair', help="SPair-71k PCK@0.1 (DIFT's zero-shot protocol, or Meng et al.'s)",
                         description="--protocol dift (default): DIFT's eval_spair.py, PairAnnotation/test pairs, "
                                     'images resized to size x size, features upsampled to the original size, cosine '
                                     'argmax; PCK@0.1 of the target bbox and of the target image, per image and per '
                                     "point. --protocol gdf: Meng et al.'s task-corres.py validate on one of their "
                                     'split files: taps at 128 x 128 concatenated, a trained --head or nearest '
                                     'neighbours, points and maps at 512 x 512, PCK@0.1 pooled over the keypoints.')
    p.add_argument('--data', required=True, help='SPair-71k folder (JPEGImages/, PairAnnotation/test/); gdf: its '
                                                 'JPEGImages folder')
    p.add_argument('--protocol', choices=('dift', 'gdf'),
                   help='dift (default) or gdf (Meng et al.\'s scoring; the default with --head)')
    p.add_argument('--model', type=model_name, required=True, help='timm model, e.g. cleandift_sd21 or sd21 (DIFT)')
    p.add_argument('--taps', nargs='+', help='dift: the tap to match with (default: us6); gdf: taps or a preset '
                                             '(default: gdf_practical; a head: its own)')
    p.add_argument('--size', type=positive_int, help="square input size (dift default: 768, as DIFT; gdf: the "
                                                     "model's)")
    p.add_argument('--prompt-template', help='caption per category, e.g. "a photo of a {category}" (DIFT); '
                                             "default: the model's own (empty) prompt")
    p.add_argument('--captions', help="caption per image: DiTF's spair_detailed_captions.json (a JSON object "
                                      '{category + image file name: caption}); source and target each on their own')
    _add_run_options(p, 'write the figures (percent) to this JSON file', "image's features",
                     'only the first N pairs (by file name)')
    p.add_argument('--co-pca', nargs='+', type=positive_int, metavar='D',
                   help='fused models: co-PCA of each SD tap per pair to D dims ("A Tale of Two Features": 256)')
    p.add_argument('--head', help="gdf: a head of `train corres` (or 'nn', the default); model settings from the "
                                  'checkpoint')
    p.add_argument('--split', help="gdf: their split file, e.g. spair_71k_val-360.json")
    p.add_argument('--store', help='gdf: feature store folder of the split\'s images')
    add_model_args(p, batch_size=8)
    return p


def _add_pixel(evals: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = evals.add_parser('pixel', help="label-scarce segmentation mIoU (DDPM-segmentation's protocol, Meng et al.)",
                         description="Meng et al.'s scarce_segmentation (DDPM-segmentation's protocol): features of "
                                     'real/train and real/test into a feature store, taps resized as theirs (nearest '
                                     'to the largest tap, then bilinear to the label size) and concatenated per '
                                     'pixel, an ensemble of 10 pixel MLPs, mIoU over the test '
                                     'images; mean and std over random train/test splits.')
    p.add_argument('--data', required=True, help="dataset in DDPM-segmentation's layout (horse_21/ holding real/train "
                                                 'and real/test: images + same-named .npy label maps)')
    p.add_argument('--store', required=True, help='feature store folder: created, or resumed when it exists')
    p.add_argument('--model', type=model_name, required=True, help='timm model, e.g. sdxl or sd15')
    p.add_argument('--taps', nargs='+', default=['gdf_practical'], help="taps or a preset (default: gdf_practical, "
                                                                        "Meng et al.'s Ours)")
    add_prompt_arg(p, help='caption, e.g. "a photo of a horse" (theirs); default: empty')
    p.add_argument('--timestep', type=int, help="Meng et al.'s t of a noisy model (default: 50; the SD / SDXL UNets "
                                                  "take it as meng_t: UNet timestep 51 on SD1.5)")
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
    p.add_argument('--json', help='write mIoU (percent) per split and class, and the uncertainty per test image, to '
                                  'this JSON file')
    p.add_argument('--pictures', metavar='DIR', help="write DDPM-segmentation's pictures of every test image to "
                   'DIR/seed<S>/: visualizations/ (their colour maps), predictions/ (classes), uncertainty/')
    p.add_argument('--palette', choices=_PIXEL_PALETTES, help="colours of --pictures (default: DDPM-segmentation's of "
                   "the dataset's category, e.g. horse_21, else voc)")
    p.add_argument('--seed', type=int, default=0, help='seed of split k is SEED + k (default: 0)')
    add_model_args(p, batch_size=4)
    return p


# DDPM-segmentation's palettes (evals/pixel_pictures.PALETTES, imported only when `eval pixel` runs) and VOC's
_PIXEL_PALETTES = ('ffhq_34', 'bedroom_28', 'cat_15', 'horse_21', 'ade_bedroom_30', 'celeba_19', 'voc')


def _add_hpatches(evals: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = evals.add_parser('hpatches', help='HPatches homography accuracy at 1/3/5 px (DIFT protocol)',
                         description="DIFT's eval_hpatches.py + eval_homography.py: images resized to size x size, the "
                                     'tap sampled at each keypoint, mutual nearest neighbours, cv2.findHomography; '
                                     'accuracy = pairs whose mean corner error is within 1, 3, 5 px.')
    p.add_argument('--data', required=True, help='hpatches-sequences-release folder (i_*/ and v_*/ sequences)')
    p.add_argument('--keypoints', help="DIFT's superpoint-1k folder (<sequence>-<k>.kp); default: the 1000 strongest "
                                       'Shi-Tomasi corners by OpenCV (not SuperPoint: other figures)')
    _add_dift_model(p, timestep=0)
    p.add_argument('--size', type=positive_int, default=768, help='square input size (default: 768, as DIFT)')
    p.add_argument('--metric', choices=('cosine', 'l2'), default='cosine', help='descriptor distance (default: cosine)')
    p.add_argument('--method', choices=('lmeds', 'ransac'), default='lmeds', help='cv2.findHomography method '
                                                                                  '(default: lmeds)')
    _add_run_options(p, "write the figures (percent) and every pair's corner error to this JSON file",
                     "image's descriptors", 'only the first N sequences (by name)')
    add_model_args(p, batch_size=6)
    return p


def _add_davis(evals: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = evals.add_parser('davis', help='DAVIS-2017 video label propagation, J&F (DIFT / DINO protocol, or DiTF\'s)',
                         description="DIFT's eval_davis.py (DINO's protocol): frames at 480 px short side, the first "
                                     'frame\'s masks propagated by feature affinity from the first and the last '
                                     'frames; J&F as the DAVIS 2017 semi-supervised evaluation computes them. '
                                     "--protocol ditf: DiTF's settings of the same steps.")
    p.add_argument('--data', required=True, help='DAVIS folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)')
    p.add_argument('--split', default='val', help='ImageSets/2017/<split>.txt (default: val)')
    p.add_argument('--sequences', nargs='+', help='only these sequences of the split')
    p.add_argument('--protocol', choices=('dift', 'ditf'), default='dift',
                   help="whose settings are the defaults: dift (DIFT_sd: sd21 us9, t 51, temperature 0.2, top-k 15, "
                        "28 frames, neighbourhood 15) or ditf (DiTF: ditf_flux ditf_davis, t 90, one draw, prompt "
                        "\"a photo of a image\", temperature 0.1, top-k 5, 7 frames, neighbourhood 12); options given "
                        'explicitly win (default: dift)')
    p.add_argument('--model', type=model_name, help="timm model (default: the protocol's, sd21 or ditf_flux)")
    p.add_argument('--taps', nargs='+', help="the tap (default: the protocol's, us9 = DIFT's up_ft_index=2, or "
                                             'ditf_davis)')
    p.add_argument('--timestep', type=int, help="noise timestep of a noisy model (default: the protocol's, 51 or 90); "
                                                'clean and fused models keep their own unless given')
    add_prompt_arg(p, help="caption the model is conditioned on (default: the protocol's: empty, or DiTF's "
                           '"a photo of a image", left out with --random-weights)')
    p.add_argument('--short-side', type=positive_int,
                   help='frames resized to this short side, the long side floored to a multiple of 32 (default: 480)')
    p.add_argument('--temperature', type=positive_float, help='affinity temperature (default: 0.2; ditf 0.1)')
    p.add_argument('--topk', type=positive_int, help='source positions kept per target (default: 15; ditf 5)')
    p.add_argument('--n-last-frames', type=positive_int,
                   help='preceding frames in the context besides the first (default: 28; ditf 7)')
    p.add_argument('--neighborhood', type=int,
                   help='sources within this many feature cells of the target (default: 15; ditf 12; 0: all)')
    p.add_argument('--masks', help='also write the predicted masks as indexed PNGs, <MASKS>/<sequence>/<frame>.png')
    p.add_argument('--same-noise', action='store_true', help='noisy models: one seeded noise draw for every frame '
                   '(default: a seeded draw per frame, noise_seed + frame index, as DIFT and DiTF draw fresh noise per '
                   'frame)')
    _add_run_options(p, 'write J&F (percent), per sequence and object, to this JSON file', "frame's features",
                     'only the first N sequences of the split')
    add_model_args(p, batch_size=8)
    return p


def _add_dift_model(p: argparse.ArgumentParser, timestep: int) -> None:
    """`--model`, `--taps` and `--timestep` of DIFT's HPatches protocol."""
    p.add_argument('--model', type=model_name, default='sd21', help='timm model (default: sd21, DIFT_sd)')
    p.add_argument('--taps', nargs='+', default=['us9'], help="the tap (default: us9, DIFT's up_ft_index=2)")
    p.add_argument('--timestep', type=int, help=f"noise timestep of a noisy model (default: {timestep}, DIFT's); "
                                                'clean and fused models keep their own unless given')


def _add_run_options(p: argparse.ArgumentParser, json_help: str, cached: str, limit_help: str) -> None:
    """`--json`, `--cache` (of each `cached`), `--limit` and `--seed` of the evaluations that cache features."""
    p.add_argument('--json', help=json_help)
    p.add_argument('--cache', help=f'folder caching each {cached}, so an interrupted run resumes')
    p.add_argument('--limit', type=positive_int, help=limit_help)
    p.add_argument('--seed', type=int, default=0, help='seed of --random-weights')
