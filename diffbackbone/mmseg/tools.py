"""`python -m diffbackbone.mmseg train|test`: mmseg's tools/train.py and tools/test.py as thin wrappers of mmengine's
Runner, with diffbackbone's config checks run before anything is built.

Multi-GPU / multi-node: ``torchrun --nproc-per-node 4 -m diffbackbone.mmseg train CONFIG --launcher pytorch``.
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
from typing import Optional, Sequence, Union

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from ..cli_args import non_negative_float
from ..errors import InputError
from .checks import check_config, check_head_channels

__all__ = ['load_config', 'build_runner', 'train', 'test', 'main']


def load_config(
        config: str,
        work_dir: Optional[str] = None,
        cfg_options: Optional[dict] = None,
        launcher: str = 'none',
) -> Config:
    """Read a config, apply `--cfg-options`, pick the work dir as mmseg does (CLI > config > ./work_dirs/<name>)."""
    if not osp.isfile(config):
        raise FileNotFoundError(f'Config file {config!r} does not exist.')
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def build_runner(cfg: Config, mode: str) -> Runner:
    """Check the config, build the Runner (and with it the model), then check the model's heads."""
    check_config(cfg, mode)
    if 'runner_type' in cfg:
        from mmseg.registry import RUNNERS
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if hasattr(model, 'backbone'):  # segmentors other than DiffusionEncoderDecoder are checked here
        check_head_channels(model)
    return runner


def train(
        config: str,
        work_dir: Optional[str] = None,
        cfg_options: Optional[dict] = None,
        resume: Optional[str] = None,
        amp: bool = False,
        launcher: str = 'none',
) -> Runner:
    """Train as mmseg's tools/train.py does.

    Args:
        config: config file.
        work_dir: where logs and checkpoints go.
        cfg_options: overrides merged into the config.
        resume: 'auto' resumes from the latest checkpoint in the work dir; a path resumes from that checkpoint.
        amp: automatic mixed precision (AmpOptimWrapper, dynamic loss scale).
        launcher: 'none', 'pytorch' (torchrun), 'slurm' or 'mpi'.
    """
    cfg = load_config(config, work_dir, cfg_options, launcher)
    if amp:
        kind = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if kind == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in the config.', logger='current', level=logging.WARNING)
        elif kind != 'OptimWrapper':
            raise InputError(f'--amp needs optim_wrapper.type OptimWrapper, but the config has {kind}.')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if resume == 'auto':
        cfg.resume = True
    elif resume:
        if not osp.isfile(resume):
            raise FileNotFoundError(f'Checkpoint to resume from {resume!r} does not exist.')
        cfg.resume = True
        cfg.load_from = resume
    runner = build_runner(cfg, 'train')
    runner.train()
    return runner


def test(
        config: str,
        checkpoint: str,
        work_dir: Optional[str] = None,
        cfg_options: Optional[dict] = None,
        out: Optional[str] = None,
        show: bool = False,
        show_dir: Optional[str] = None,
        wait_time: float = 2,
        tta: bool = False,
        launcher: str = 'none',
) -> dict:
    """Evaluate a checkpoint as mmseg's tools/test.py does; returns the metrics."""
    if not osp.isfile(checkpoint) and '://' not in checkpoint:
        raise FileNotFoundError(f'Checkpoint {checkpoint!r} does not exist.')
    cfg = load_config(config, work_dir, cfg_options, launcher)
    cfg.load_from = checkpoint
    if show or show_dir:
        vis = cfg.default_hooks.get('visualization')
        if vis is None:
            raise InputError("--show/--show-dir need default_hooks.visualization=dict(type='SegVisualizationHook').")
        vis['draw'] = True
        if show:
            vis['show'] = True
            vis['wait_time'] = wait_time
        if show_dir:
            cfg.visualizer['save_dir'] = show_dir
    if tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if out is not None:
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
    runner = build_runner(cfg, 'test')
    return runner.test()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m diffbackbone.mmseg', description='Train / test MMSegmentation models with diffusion backbones.')
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('config', help='config file')
    common.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs, e.g. train_dataloader.batch_size=2 '
             'model.backbone.dtype=bfloat16 (lists: key="[a,b]"; no spaces)')
    common.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher: pytorch for torchrun')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    common.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)

    p = sub.add_parser('train', parents=[common], help='train a segmentor')
    p.add_argument('--work-dir', help='folder for logs and checkpoints (default ./work_dirs/<config name>)')
    p.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                   help='resume from the latest checkpoint in the work dir, or from CHECKPOINT')
    p.add_argument('--amp', action='store_true', help='automatic mixed precision training')

    p = sub.add_parser('test', parents=[common], help='evaluate a checkpoint')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='folder for the metrics json and logs')
    p.add_argument('--out', help='folder to save predictions for offline evaluation')
    p.add_argument('--show', action='store_true', help='show predictions')
    p.add_argument('--show-dir', help='folder to save painted predictions (under work_dir/timestamp)')
    p.add_argument('--wait-time', type=non_negative_float, default=2, help='seconds between shown images')
    p.add_argument('--tta', action='store_true', help='test-time augmentation (the config\'s tta_pipeline)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Union[Runner, dict]:
    """Command line entry; returns the trained Runner (train) or the metrics (test)."""
    args = _parser().parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if args.command == 'train':
        return train(args.config, args.work_dir, args.cfg_options, args.resume, args.amp, args.launcher)
    return test(args.config, args.checkpoint, args.work_dir, args.cfg_options, args.out, args.show, args.show_dir,
                args.wait_time, args.tta, args.launcher)
