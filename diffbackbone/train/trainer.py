"""The clean-train run: data, steps with gradient accumulation, logging, validation, checkpoints, exact resume, output.

Layout of `out/`: `log.jsonl` (one line per step: loss, per-tap losses, lr, learned timestep; one per validation),
`checkpoints/step-0000500/` (`state.pt`: trainable weights, optimizer, schedule, step, data position;
`rng-rank{r}.pt`: each rank's random states), and the result `<cleandift_base>.safetensors`.
Multi-GPU: launch with `torchrun --nproc_per_node N -m diffbackbone clean-train ...`; each rank takes its share of
every epoch (DistributedSampler) and gradients are averaged by DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from ..hub import save_safetensors
from torch.utils.data import DataLoader

from .data import ImageFolder, ResumableSampler, collate, find_images, split_files
from .distill import CaptionEncoder, CleanDistiller, DistillConfig, TrainError, build_models

__all__ = ['CleanTrainer', 'TrainConfig', 'TrainResult', 'clean_train']

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ('base', 'taps', 'batch_size', 'grad_accum', 'bins', 't_min', 't_max', 'size', 'crop_scale', 'captions',
                'latent', 'seed', 'head_kwargs', 'val_images', 'val_data')


@dataclass
class TrainConfig:
    """Settings of a clean-train run (the CLI flags of `diffbackbone clean-train`)."""
    data: str
    out: str
    base: str = 'sd21'
    taps: str | list = DistillConfig.taps
    steps: int = 5000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = DistillConfig.lr
    weight_decay: float = DistillConfig.weight_decay
    warmup: int = DistillConfig.warmup
    bins: int = DistillConfig.bins
    t_min: int = DistillConfig.t_min
    t_max: int = DistillConfig.t_max
    size: int | None = None  # default: the model's input size (768 for SD2.1, 512 for SD1.5)
    crop_scale: tuple = (0.5, 1.0)
    captions: bool = False
    latent: str = DistillConfig.latent
    precision: str = 'auto'  # 'bf16' autocast on GPUs that support it, else 'fp32'
    grad_checkpointing: bool = DistillConfig.grad_checkpointing
    clip_grad: float | None = None
    num_workers: int = 4
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    val_every: int = 250
    val_images: int = 8
    val_data: str | None = None
    resume: str | None = None  # 'auto' (latest checkpoint in out/) or a checkpoint folder
    pretrained: bool = True  # False: random base weights (tests, benchmarks)
    device: str | None = None
    head_kwargs: dict = field(default_factory=dict)
    progress: bool = True


@dataclass
class TrainResult:
    """What a run produced: the output file and this session's per-step losses and validation numbers."""
    output: Path | None
    losses: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    skipped_images: list = field(default_factory=list)


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises torch.distributed from torchrun's environment when WORLD_SIZE > 1."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0'))


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write-test-{uuid.uuid4().hex[:8]}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise TrainError(f'Cannot write to the output folder {out}: {e.strerror or e}. Choose a writable --out.') from e


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob('step-*') if p.is_dir() and (p / 'state.pt').is_file()]
    return sorted(found, key=lambda p: int(p.name.split('-')[1]))


class CleanTrainer:
    """One clean-train run; `train()` runs it to `steps` and writes the output file."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, local_rank = _init_distributed()
        cuda = torch.cuda.is_available()
        self.device = torch.device(cfg.device or (f'cuda:{local_rank}' if cuda else 'cpu'))
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        precision = cfg.precision
        if precision == 'auto':
            precision = 'bf16' if self.device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'fp32'
        for name in ('steps', 'batch_size', 'grad_accum', 'save_every', 'val_every'):
            if getattr(cfg, name) < 1:
                raise TrainError(f'{name} must be >= 1, got {getattr(cfg, name)}.')
        scale = tuple(cfg.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise TrainError(f'crop_scale (--crop-scale MIN MAX) is the range of crop areas as fractions of the image: '
                             f'it needs 0 < MIN <= MAX <= 1, got {" ".join(map(str, scale))} (CleanDIFT: 0.5 1.0).')

        config = DistillConfig(  # checked before any data is read or model loaded
            taps=cfg.taps, bins=cfg.bins, t_min=cfg.t_min, t_max=cfg.t_max, lr=cfg.lr, weight_decay=cfg.weight_decay,
            warmup=cfg.warmup, precision=precision, grad_checkpointing=cfg.grad_checkpointing, latent=cfg.latent,
            seed=cfg.seed, head_kwargs=cfg.head_kwargs)
        self.out = Path(cfg.out).expanduser()
        if self.rank == 0:
            _check_writable(self.out)
        self.ckpt_root = self.out / 'checkpoints'
        resume_from = self._find_resume()

        files = find_images(cfg.data)
        need = cfg.batch_size * self.world
        if cfg.val_data:
            train_files, val_files = files, find_images(cfg.val_data)[:cfg.val_images]
        else:
            n_val = max(0, min(cfg.val_images, len(files) - need))
            train_files, val_files = split_files(files, n_val, cfg.seed)
        if len(train_files) < need:
            raise TrainError(f'{len(train_files)} training images under {cfg.data}, but one step needs batch_size x '
                             f'GPUs = {need}. Add images or lower --batch-size.')

        torch.manual_seed(cfg.seed)  # random (test) bases: the same weights on every rank and in every run
        models = build_models(cfg.base, pretrained=cfg.pretrained)
        size = cfg.size or _input_size(models.student)
        try:  # the model's own size rule, as `features` applies it, before any data is read
            models.student._check_size((size, size))
        except ValueError as e:
            raise TrainError(f'--size {size}: {e}') from None
        text = CaptionEncoder(models.base_repo, self.device) if cfg.captions else None
        self.distiller = CleanDistiller(models, config, device=self.device, rank=self.rank, text_encoder=text)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.distiller.ddp = DistributedDataParallel(
                self.distiller.module, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                forward_sync_buffers=False)  # buffers are constants, equal on every rank

        self.dataset = ImageFolder(train_files, size, train=True, seed=cfg.seed, scale=tuple(cfg.crop_scale),
                                   captions=cfg.captions)
        self.sampler = ResumableSampler(self.dataset, self.rank, self.world, cfg.seed)
        self.val_batches, self.skipped = self._load_val(val_files, size)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.output_name = f'{models.clean_name or "clean_unet"}.safetensors'
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    # --- setup ----------------------------------------------------------------------------------------------------
    def _find_resume(self) -> Path | None:
        existing = _checkpoints(self.ckpt_root) if self.ckpt_root.is_dir() else []
        if self.cfg.resume is None:
            if existing:
                raise TrainError(f'{self.out} already holds checkpoints (latest {existing[-1].name}). Pass --resume to '
                                 'continue that run, or choose an empty --out.')
            return None
        if self.cfg.resume == 'auto':
            return existing[-1] if existing else None
        path = Path(self.cfg.resume).expanduser()
        if not (path / 'state.pt').is_file():
            raise TrainError(f'{path} is not a clean-train checkpoint (no state.pt). Give a folder '
                             f'{self.ckpt_root}/step-NNNNNNN or --resume auto.')
        return path

    def _load_val(self, files: Sequence[Path], size: int) -> tuple[list[torch.Tensor], set[str]]:
        if not files:
            return [], set()
        ds = ImageFolder(files, size, train=False)
        images = {str(p): ds.read(p) for p in files}
        skipped = {p for p, x in images.items() if x is None}
        kept = [x for x in images.values() if x is not None]
        if not kept:
            return [], skipped
        return list(torch.stack(kept).split(self.cfg.batch_size)), skipped

    # --- data -----------------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch, starting at the current data position."""
        while True:
            self.sampler.set_state(self.epoch, self.batch_in_epoch * self.cfg.batch_size)
            self.dataset.epoch = self.epoch
            loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler, drop_last=True,
                                num_workers=self.cfg.num_workers, collate_fn=collate,
                                pin_memory=self.device.type == 'cuda',
                                generator=torch.Generator().manual_seed(self.cfg.seed))
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = dict(generator=self.distiller.generator.get_state(), torch=torch.get_rng_state(),
                     python=random.getstate())
        if self.device.type == 'cuda':
            state['cuda'] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """Write `checkpoints/step-NNNNNNN` atomically (all ranks take part); keep the newest `keep_checkpoints`."""
        final = self.ckpt_root / f'step-{self.step:07d}'
        tmp = self.ckpt_root / f'.tmp-{final.name}'
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            _barrier(self.world)
            torch.save(rng or self._rng_state(), tmp / f'rng-rank{self.rank}.pt')
            _barrier(self.world)
            if self.rank == 0:
                d = self.distiller
                torch.save(dict(
                    trainable=d.trainable_state(), optimizer=d.optimizer.state_dict(),
                    lr_schedule=d.lr_schedule.state_dict(), step=self.step, epoch=self.epoch,
                    batch_in_epoch=self.batch_in_epoch, world_size=self.world, skipped=sorted(self.skipped),
                    config=_plain(asdict(self.cfg))), tmp / 'state.pt')
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in _checkpoints(self.ckpt_root)[:-max(1, self.cfg.keep_checkpoints)]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise TrainError(f'Could not write checkpoint {final}: {e}. Free disk space or fix permissions.') from e
        _barrier(self.world)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / 'state.pt', map_location='cpu', weights_only=True)
        saved = state['config']
        now = _plain(asdict(self.cfg))
        differ = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if differ:
            raise TrainError(f'Cannot resume {path}: it was trained with different settings '
                             f'({", ".join(f"{k}={saved.get(k)!r} now {now.get(k)!r}" for k in differ)}). '
                             'Use the same settings, or start anew in another --out.')
        if state['world_size'] != self.world:
            raise TrainError(f'{path} was written by {state["world_size"]} processes, this run has {self.world}: exact '
                             'resume needs the same number of GPUs.')
        d = self.distiller
        d.load_trainable_state(state['trainable'])
        d.optimizer.load_state_dict(state['optimizer'])
        d.lr_schedule.load_state_dict(state['lr_schedule'])
        for group in d.optimizer.param_groups:  # a changed --lr applies from here on
            group['initial_lr'] = self.cfg.lr
        d.lr_schedule.base_lrs = [self.cfg.lr] * len(d.optimizer.param_groups)
        self.step, self.epoch, self.batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']
        self.skipped |= set(state['skipped'])
        rng = torch.load(path / f'rng-rank{self.rank}.pt', map_location='cpu', weights_only=True)
        d.generator.set_state(rng['generator'])
        torch.set_rng_state(rng['torch'])
        random.setstate(rng['python'])
        if 'cuda' in rng and self.device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'], self.device)

    # --- the run --------------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')

    def _mean_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def train(self) -> TrainResult:
        """Run up to `steps` optimizer steps (from the resumed step), then write the output file."""
        from tqdm import tqdm

        cfg, d = self.cfg, self.distiller
        result = TrainResult(output=None)
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, unit='step', desc='clean-train',
                   disable=not cfg.progress or self.rank != 0)
        last_saved = self.step
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            at_start = (self.epoch, self.batch_in_epoch, self._rng_state())
            sums, per_tap_sums = torch.zeros((), device=self.device), {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                self.skipped.update(batch['skipped'])
                sync = d.ddp is None or micro == cfg.grad_accum - 1
                with (d.ddp.no_sync() if not sync else contextlib.nullcontext()):
                    loss, per_tap = d.loss(batch['images'], batch['captions'] if cfg.captions else None)
                    checked = self._mean_across_ranks(loss.detach())
                    if not torch.isfinite(checked):
                        self._fail_non_finite(at_start, per_tap)
                    (loss / cfg.grad_accum).backward()
                sums += checked
                for k, v in per_tap.items():
                    per_tap_sums[k] = per_tap_sums.get(k, 0.0) + v.detach()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(d.trainable, cfg.clip_grad)
            lr = d.optimizer.param_groups[0]['lr']
            d.optimizer.step()
            d.lr_schedule.step()
            d.optimizer.zero_grad(set_to_none=True)
            self.step += 1

            loss_value = float(sums) / cfg.grad_accum
            result.losses.append(loss_value)
            self._log(dict(step=self.step, loss=loss_value, lr=lr, timestep=float(d.student.timestep.detach()),
                           taps={k: round(float(v) / cfg.grad_accum, 6) for k, v in per_tap_sums.items()},
                           epoch=self.epoch, skipped_images=len(self.skipped),
                           seconds=round(time.perf_counter() - t0, 4)))
            bar.update(1)
            bar.set_postfix(loss=f'{loss_value:.4f}', t=f"{float(d.student.timestep.detach()):.1f}")
            if self.val_batches and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                result.validation.append(self.validate())
                bar.set_postfix(loss=f'{loss_value:.4f}', val=f'{result.validation[-1]["mean"]:.4f}')
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
                last_saved = self.step
        bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        result.output = self.write_output()
        result.skipped_images = sorted(self.skipped)
        if self.skipped and self.rank == 0:
            print(f'clean-train: skipped {len(self.skipped)} unreadable image(s), e.g. {sorted(self.skipped)[0]}')
        return result

    def validate(self) -> dict:
        """Student+heads vs teacher cosine per timestep bin on the held-out images (rank 0), logged."""
        val = [self.distiller.validate(self.val_batches) if self.rank == 0 else None]
        if self.rank == 0:
            self._log(dict(step=self.step, val=val[0]))
        if self.world > 1:
            dist.broadcast_object_list(val, src=0)
        return val[0]

    def _fail_non_finite(self, at_start: tuple, per_tap: dict) -> None:
        self.epoch, self.batch_in_epoch, rng = at_start
        self.distiller.optimizer.zero_grad(set_to_none=True)
        path = self.save_checkpoint(rng)
        bad = [k for k, v in per_tap.items() if not torch.isfinite(v)]
        raise TrainError(
            f'The loss became NaN/Inf at step {self.step + 1} (taps {", ".join(bad) or "on another rank"}). The state '
            f'before this step is saved in {path}. Resume from it with a lower --lr, --precision bf16 instead of fp16, '
            'or --clip-grad, and check the images.')

    def write_output(self) -> Path:
        """The safetensors file timm loads (whole student + heads), written atomically by rank 0."""
        path = self.out / self.output_name
        if self.rank == 0:
            tensors, meta = self.distiller.output_state()
            meta['diffbackbone.steps'] = str(self.step)
            try:
                save_safetensors(tensors, path, metadata=meta)
            except OSError as e:
                raise TrainError(f'Could not write {path}: {e}. Free disk space or fix permissions.') from e
        _barrier(self.world)
        return path


def _plain(obj):
    """Config values as plain lists/dicts (what a checkpoint stores and compares)."""
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _input_size(model) -> int:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if 'input_size' in cfg:
        return int(cfg['input_size'][-1])
    return int(model.unet.config.sample_size) * model.vae.reduction


def clean_train(data: str, out: str, base: str = 'sd21', **kwargs) -> TrainResult:
    """Run clean-train (see `TrainConfig` for the settings); returns the output path and the losses."""
    return CleanTrainer(TrainConfig(data=data, out=out, base=base, **kwargs)).train()

