"""The CleanDIFT objective: a clean student UNet plus projection heads matched to a frozen noisy teacher.

Per image, the teacher sees the latent noised (DDPM schedule) at `bins` timesteps drawn stratified over
[t_min, t_max], one per bin; the student sees the clean latent once, at its learned timestep, and the heads map its
features at every tap to the teacher's at each drawn t. Loss: negative cosine similarity over channels, averaged over
positions, images and timesteps, summed over taps. The VAE and the text conditioning are frozen and shared.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import nn

from ..errors import DiffbackboneError
from ..models._base import SCHEDULER_SD
from ..models._builder import PROMPT_KEY, assign_weights, check_memory, empty_weights, load_weights
from ..models._options import Options
from ..models.diffusion_unet import DiffusionUNet, checkpoint_filter_fn
from .heads import ProjectionHeads

__all__ = [
    'BASES',
    'BaseModels',
    'CaptionEncoder',
    'CleanDistiller',
    'CleanStudent',
    'DistillConfig',
    'TrainError',
    'build_models',
    'resolve',
    'tap_features',
]

# --base name -> (noisy teacher, clean student) timm models of ours.
BASES = {
    'sd21': ('sd21', 'cleandift_sd21'),
    'sd15': ('sd15', 'cleandift_sd15'),
    'test': ('test_dift', 'test_cleandift'),
}
_ALIASES = {name: base for base, pair in BASES.items() for name in pair}


class TrainError(DiffbackboneError, RuntimeError):
    """Training cannot go on; the message says what was wrong and what to do."""


@dataclass
class BaseModels:
    """Teacher and student built from one base, and how to load the result."""
    teacher: DiffusionUNet
    student: DiffusionUNet
    base_repo: str  # where the text encoder lives (captions)
    clean_name: str | None  # timm model that loads the output file, None for a local diffusers folder
    unet_cfg: dict = field(default_factory=dict)
    vae_cfg: dict = field(default_factory=dict)
    scheduler: DDPMScheduler = field(default_factory=lambda: DDPMScheduler(**SCHEDULER_SD))


_STUDENT = 'the student (a copy of the teacher)'


def _nbytes(model: nn.Module) -> int:
    """Bytes of a model's state dict (its parameters may be on the meta device)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _copy_weights(teacher: DiffusionUNet, student: DiffusionUNet) -> None:
    """Give a student built inside `empty_weights` copies of the teacher's weights (its learned timestep: its own
    initial value), without initialising it at random first."""
    own, given = student.state_dict(), teacher.state_dict()
    missing, unexpected = sorted(own.keys() - given.keys() - {'timestep'}), sorted(given.keys() - own.keys())
    if missing or unexpected:
        raise TrainError(f'Teacher and student differ: missing {missing[:5]}, unexpected {unexpected[:5]}.')
    weights = {k: v.detach().clone() for k, v in given.items()}
    weights['timestep'] = torch.tensor(student._timestep_given)
    assign_weights(student, weights)


# Files of a diffusers Stable Diffusion repo that training needs.
_REPO_FILES = ['unet/config.json', 'unet/diffusion_pytorch_model.safetensors', 'vae/config.json',
               'vae/diffusion_pytorch_model.safetensors', 'scheduler/*', 'tokenizer/*', 'text_encoder/*']


def _hub_snapshot(repo: str) -> Path:
    """Local copy (HF cache) of the files of Hub repo 'org/name[@revision]' that training needs."""
    from huggingface_hub import snapshot_download

    from .. import hub

    repo_id, revision = hub.split_repo(repo)
    with hub.hub_errors(f'the base model {repo!r}', repo=repo_id, revision=revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_REPO_FILES))


def _diffusers_folder(folder: Path, pretrained: bool, base_repo: str | None = None) -> BaseModels:
    """Teacher and student from a diffusers folder with unet/ and vae/ (and tokenizer/, text_encoder/)."""
    where = base_repo or folder
    for sub in ('unet', 'vae'):
        if not (folder / sub / 'config.json').is_file():
            raise TrainError(f'{where} is not a diffusers Stable Diffusion model: {sub}/config.json is missing. Give '
                             'a folder or Hub repo with unet/, vae/, tokenizer/ and text_encoder/, or sd21 / sd15.')
    unet_cfg = UNet2DConditionModel.extract_init_dict(UNet2DConditionModel.load_config(folder / 'unet'))[0]
    vae_all = AutoencoderKL.load_config(folder / 'vae')
    vae_cfg = {k: vae_all[k] for k in ('block_out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups',
                                       'scaling_factor') if k in vae_all}
    vae_cfg['block_out_channels'] = tuple(vae_cfg['block_out_channels'])
    kwargs = dict(unet_cfg=unet_cfg, vae_cfg=vae_cfg, base_repo=base_repo or str(folder))
    if pretrained:
        weights = folder / 'unet' / 'diffusion_pytorch_model.safetensors'
        if not weights.is_file():
            raise TrainError(f'{weights} is missing: save the UNet with safe_serialization=True (safetensors).')
        from .. import hub

        with empty_weights():  # the checkpoint's tensors are assigned: no random initialisation first
            teacher = DiffusionUNet.from_kwargs(clean=False, **kwargs)
        what = f'weights of the base UNet {weights}'
        with hub.weights_to_come(_STUDENT, _nbytes(teacher)):  # one check before anything is read
            check_memory(teacher, checkpoint_filter_fn(hub.safetensors_meta(weights, dtype=torch.float32), teacher),
                         hub.safetensors_nbytes(weights, torch.float32), what, torch.float32)
        load_weights(teacher, hub.load_safetensors(weights, what=what), checkpoint_filter_fn)
    else:
        teacher = DiffusionUNet.from_kwargs(clean=False, **kwargs)
    with empty_weights():
        student = DiffusionUNet.from_kwargs(clean=True, **kwargs)
    _copy_weights(teacher, student)
    scheduler = DDPMScheduler(**SCHEDULER_SD)
    if (folder / 'scheduler' / 'scheduler_config.json').is_file():
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / 'scheduler'))
    return BaseModels(teacher, student, base_repo or str(folder), None, unet_cfg, vae_cfg, scheduler)


def build_models(base: str, pretrained: bool = True) -> BaseModels:
    """Frozen noisy teacher and trainable clean student with the same UNet weights.

    Args:
        base: 'sd21', 'sd15', one of our timm model names (e.g. 'test_cleandift'), a local diffusers folder, or a
            Hub repo 'org/name[@revision]' in diffusers layout (a fine-tuned Stable Diffusion 1.x / 2.x).
        pretrained: load the base weights (Hub or folder); False gives random weights (tests, benchmarks).
    """
    import timm

    folder = Path(base).expanduser()
    if folder.is_dir():
        return _diffusers_folder(folder, pretrained)
    key = _ALIASES.get(base, base)
    if key not in BASES:
        looks_local = base.startswith(('/', '.', '~')) or os.path.isabs(base)
        if base.count('/') == 1 and not looks_local:
            return _diffusers_folder(_hub_snapshot(base), pretrained, base_repo=base)
        raise TrainError(f'Unknown base {base!r}: give one of {", ".join(BASES)} (or a model name '
                         f'{", ".join(_ALIASES)}), an existing local diffusers folder, or a Hub repo "org/name".')
    noisy, clean = BASES[key]
    from .. import hub

    with torch.device('meta'):
        copy = _nbytes(timm.create_model(clean)) if pretrained else 0
    with hub.weights_to_come(_STUDENT, copy):  # the teacher's memory check counts the copy made after it
        teacher = timm.create_model(noisy, pretrained=pretrained, ensemble=1)
    with empty_weights():  # the teacher's weights are copied in
        student = timm.create_model(clean, pretrained=False)
    _copy_weights(teacher, student)
    return BaseModels(teacher, student, teacher.base_repo, clean, dict(teacher.unet.config), {})


@contextlib.contextmanager
def _prompt(model: DiffusionUNet, ctx: torch.Tensor | None) -> Iterator[None]:
    """Run `model` with per-latent text embeddings `ctx` (N, 77, D) instead of its empty-prompt buffer."""
    if ctx is None:
        yield
        return
    saved = model.prompt_embeds
    model.prompt_embeds = ctx
    try:
        yield
    finally:
        model.prompt_embeds = saved


def resolve(model: DiffusionUNet, taps: str | Sequence[str]) -> list:
    """The model's `Tap`s for names, aliases or a preset name (e.g. 'cleandift')."""
    return model._resolve(taps if isinstance(taps, str) else list(taps))


def tap_features(model: DiffusionUNet, z: torch.Tensor, taps: Sequence, timestep: torch.Tensor | None = None,
                 ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{tap name: map} of the UNet of `model` on latents `z` for `Tap`s `taps` (stops after the deepest one)."""
    with _prompt(model, ctx):
        out = model.unet_features(z, taps, timestep=timestep)
    return {t.name: out[t.name] for t in taps}


def freeze_unused(model: DiffusionUNet, taps: Sequence) -> None:
    """Freeze the student parameters that `taps` do not depend on (layers after the deepest tap), found by one small
    backward pass; the output file keeps them unchanged. DDP needs every trainable parameter to get a gradient."""
    z = torch.zeros(1, model.unet.config.in_channels, 8, 8, device=model.timestep.device)
    feats = tap_features(model, z, taps)
    torch.stack([f.float().mean() for f in feats.values()]).sum().backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)


class CleanStudent(nn.Module):
    """Clean UNet + projection heads: head outputs for every (image, drawn timestep) pair. DDP wraps this."""

    def __init__(self, model: DiffusionUNet, heads: ProjectionHeads, taps: Sequence):
        super().__init__()
        self.model = model
        self.heads = heads
        self.taps = list(taps)

    def forward(self, z0: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """z0: (B, 4, h, w) clean latents; t: (B, bins) teacher timesteps; ctx: (B, 77, D) or None."""
        feats = tap_features(self.model, z0, self.taps, ctx=ctx)
        bins = t.shape[1]
        return self.heads({k: v.repeat_interleave(bins, 0) for k, v in feats.items()}, t.flatten())


def neg_cosine(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tap: minus the cosine similarity over channels, averaged over everything else (float32)."""
    return {k: -F.cosine_similarity(student[k].float(), teacher[k].float(), dim=1).mean() for k in teacher}


@dataclass(frozen=True)
class DistillConfig(Options):
    """What a clean-train run learns and how: taps, timestep draws, optimizer and schedule, numerics.

    Args:
        taps: the student's taps matched to the teacher's (names, aliases or a preset name).
        bins: timesteps drawn per image, one in each of `bins` equal bins of [t_min, t_max].
        t_min, t_max: the range the teacher's timesteps are drawn from.
        lr, weight_decay: AdamW's.
        warmup: steps of linear learning-rate warm-up.
        precision: 'fp32' or 'bf16' (autocast; the frozen teacher is stored in bf16).
        grad_checkpointing: recompute the student's activations in the backward pass.
        latent: 'sample' (a posterior draw) or 'mode' (the posterior mode).
        seed: seed of the heads' initialisation and of the timestep and noise draws.
        head_kwargs: keyword arguments of `ProjectionHeads`.
    """
    taps: str | Sequence[str] = 'cleandift'
    bins: int = 3
    t_min: int = 1
    t_max: int = 999
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: int = 2000
    precision: str = 'fp32'
    grad_checkpointing: bool = False
    latent: str = 'sample'
    seed: int = 0
    head_kwargs: dict | None = None

    def __post_init__(self) -> None:
        self.check_timesteps()
        if self.precision not in ('fp32', 'bf16'):
            raise TrainError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}.")
        if self.latent not in ('sample', 'mode'):
            raise TrainError(f"latent must be 'sample' or 'mode', got {self.latent!r}.")

    def check_timesteps(self, last: float = math.inf) -> None:
        """bins >= 1 and 0 <= t_min < t_max <= `last` (the scheduler's last timestep, checked by the distiller)."""
        if self.bins < 1 or not 0 <= self.t_min < self.t_max <= last:
            raise TrainError(f'Need bins >= 1 and 0 <= t_min < t_max <= 999, got bins={self.bins}, '
                             f't=[{self.t_min}, {self.t_max}].')


class CleanDistiller:
    """Models, heads, optimizer and schedule of a clean-train run, and its loss; no data or file handling.

    Args:
        models: the teacher and student (`build_models`).
        config: the run's options (default: CleanDIFT's).
        device: where the models train.
        rank: this process's rank (its own timestep and noise draws).
        text_encoder: encodes captions; None: every image gets the empty prompt.
    """

    def __init__(
            self,
            models: BaseModels,
            config: DistillConfig | None = None,
            device: str | torch.device = 'cpu',
            rank: int = 0,
            text_encoder: CaptionEncoder | None = None,
    ):
        config = DistillConfig() if config is None else config
        config.check_timesteps(models.scheduler.config.num_train_timesteps - 1)
        self.config = config
        self.device = torch.device(device)
        self.bins, self.t_min, self.t_max = config.bins, config.t_min, config.t_max
        self.precision, self.latent = config.precision, config.latent
        self.scheduler = models.scheduler
        self.text_encoder = text_encoder
        self.models = models
        teacher, student = models.teacher, models.student
        self.student_taps = resolve(student, config.taps)
        self.taps = [t.name for t in self.student_taps]

        teacher.prune_intermediate_layers(self.taps)
        self.teacher_taps = resolve(teacher, self.taps)
        teacher.requires_grad_(False).eval()
        if config.precision == 'bf16':
            teacher.to(torch.bfloat16)  # frozen: its weights need no fp32 master copy
        teacher.to(self.device)
        student.to(self.device)
        student.vae.requires_grad_(False)
        freeze_unused(student, self.student_taps)
        student.set_grad_checkpointing(config.grad_checkpointing)
        torch.manual_seed(config.seed)  # same head initialisation on every rank
        self.heads = ProjectionHeads({t.name: t.num_chs for t in self.student_taps}, **(config.head_kwargs or {}))
        self.module = CleanStudent(student, self.heads, self.student_taps).to(self.device).train()
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_schedule = get_constant_schedule_with_warmup(self.optimizer, num_warmup_steps=config.warmup)
        self.ddp: nn.Module | None = None  # set by the trainer under torch.distributed
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1_000_003 * rank)

    @property
    def student(self) -> DiffusionUNet:
        return self.models.student

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16')

    def draw_timesteps(self, n: int) -> torch.Tensor:
        """(n, bins) integer timesteps, one uniform draw inside each of `bins` equal bins of [t_min, t_max]."""
        width = (self.t_max - self.t_min) / self.bins
        u = torch.rand(n, self.bins, generator=self.generator, device=self.device)
        offsets = torch.arange(self.bins, device=self.device) * width
        return (self.t_min + offsets + u * width).long().clamp(self.t_min, self.t_max)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: Sequence[str] | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clean latents (posterior draw or mode) and text embeddings (None without captions)."""
        vae = self.models.teacher.vae
        with self.autocast():
            posterior = vae.posterior(images.to(self.device))
        if self.latent == 'mode':
            z0 = posterior.mode()
        else:
            eps = torch.randn(posterior.mean.shape, generator=generator or self.generator, device=self.device)
            z0 = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        z0 = (z0 * vae.scaling_factor).float()
        ctx = self.text_encoder(captions) if self.text_encoder is not None and captions is not None else None
        return z0, ctx

    @torch.no_grad()
    def teacher_features(self, z0: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Teacher maps for every (image, timestep) pair, image-major: (B * bins, C, H, W)."""
        bins = t.shape[1]
        z = z0.repeat_interleave(bins, 0)
        noise = torch.randn(z.shape, generator=generator or self.generator, device=self.device)
        zt = self.scheduler.add_noise(z, noise, t.flatten())
        with self.autocast():
            return tap_features(self.models.teacher, zt.to(next(self.models.teacher.unet.parameters()).dtype),
                                self.teacher_taps, timestep=t.flatten(),
                                ctx=None if ctx is None else ctx.repeat_interleave(bins, 0))

    def loss(self, images: torch.Tensor, captions: Sequence[str] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss and per-tap losses of one micro-batch (the student part keeps its graph)."""
        z0, ctx = self.encode(images, captions)
        t = self.draw_timesteps(z0.shape[0])
        target = self.teacher_features(z0, t, ctx)
        with self.autocast():
            pred = (self.ddp or self.module)(z0, t, ctx)
        per_tap = neg_cosine(pred, target)
        return torch.stack(list(per_tap.values())).sum(), per_tap

    @torch.no_grad()
    def validate(self, batches: Sequence[torch.Tensor], seed: int = 1234) -> dict[str, float]:
        """Cosine similarity of student+heads to teacher, per timestep bin (at its centre), averaged over taps and
        images; fixed noise, so numbers are comparable across steps."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        width = (self.t_max - self.t_min) / self.bins
        centres = [int(self.t_min + (b + 0.5) * width) for b in range(self.bins)]
        sums, count = torch.zeros(self.bins), 0
        self.module.eval()
        try:
            for images in batches:
                z0, _ = self.encode(images, generator=gen)
                t = torch.tensor(centres, device=self.device).expand(z0.shape[0], -1)
                target = self.teacher_features(z0, t, None, generator=gen)
                with self.autocast():
                    pred = self.module(z0, t)
                cos = torch.stack([F.cosine_similarity(pred[k].float(), target[k].float(), dim=1).flatten(1).mean(1)
                                   for k in self.taps]).mean(0)  # (B * bins,)
                sums += cos.view(-1, self.bins).sum(0).cpu()
                count += z0.shape[0]
        finally:
            self.module.train()
        per_bin = {f't={c}': round(float(s / count), 6) for c, s in zip(centres, sums)}
        return dict(per_bin, mean=round(float(sums.sum() / (count * self.bins)), 6))

    # --- weights and state -----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Student tensors that training changes (UNet, timestep) and the heads, under `student.` / `heads.`."""
        sd = {f'student.{k}': v for k, v in self.student.state_dict().items()
              if k.startswith('unet.') or k == 'timestep'}
        sd.update({f'heads.{k}': v for k, v in self.heads.state_dict().items()})
        return sd

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        student = {k[len('student.'):]: v for k, v in sd.items() if k.startswith('student.')}
        heads = {k[len('heads.'):]: v for k, v in sd.items() if k.startswith('heads.')}
        missing, unexpected = self.student.load_state_dict(student, strict=False)
        missing = [k for k in missing if k.startswith('unet.') or k == 'timestep']
        if missing or unexpected:
            raise TrainError(f'Checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}.')
        self.heads.load_state_dict(heads, strict=True)

    def output_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata of the output file: the whole student (unet., vae., prompt_embeds, timestep) and
        the heads under `heads.`."""
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.student.state_dict().items()
                   if not k.startswith('head.')}
        tensors.update({f'heads.{k}': v.detach().float().cpu().contiguous()
                        for k, v in self.heads.state_dict().items()})
        meta = dict(self.heads.metadata())
        meta['diffbackbone.model'] = self.models.clean_name or ''
        meta['diffbackbone.base_repo'] = self.models.base_repo or ''
        meta['diffbackbone.unet_cfg'] = json.dumps(_jsonable(self.models.unet_cfg))
        meta['diffbackbone.vae_cfg'] = json.dumps(_jsonable(self.models.vae_cfg))
        meta['diffbackbone.taps'] = json.dumps(self.taps)
        meta[PROMPT_KEY] = self.student.prompt  # what its prompt_embeds were made for
        return tensors, meta


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not str(k).startswith('_')}


class CaptionEncoder:
    """Frozen CLIP text encoder of the base repo: captions -> (B, 77, D) embeddings, as diffusers encodes prompts."""

    def __init__(self, base_repo: str, device: str | torch.device = 'cpu'):
        from transformers import CLIPTextModel, CLIPTokenizer

        from .. import hub

        folder = Path(base_repo).expanduser()
        source, revision = (str(folder), None) if folder.is_dir() else hub.split_repo(base_repo)
        with hub.hub_errors(f'the text encoder of {base_repo!r} (needed by --captions)', repo=source,
                            revision=revision):
            self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder='tokenizer', revision=revision)
            self.encoder = CLIPTextModel.from_pretrained(source, subfolder='text_encoder', revision=revision)
        self.encoder.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(list(captions), padding='max_length', max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors='pt').to(self.device)
        mask = inputs.attention_mask if getattr(self.encoder.config, 'use_attention_mask', False) else None
        return self.encoder(inputs.input_ids, attention_mask=mask)[0].float()
