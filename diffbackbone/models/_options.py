"""Options every diffusion backbone shares, as small objects validated once (diffusers / peft pass such configs whole).

A family's constructor takes these objects; `timm.create_model` keeps taking the flat keyword arguments (`timestep=`,
`prompt=`, `lora=`, ...), which `_builder` groups into them by field name.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ..errors import InputError, InputTypeError
from .conditioning.control import CONTROL_MODES
from .conditioning.lora import lora_spec

__all__ = [
    'Options', 'NoiseConfig', 'Img2ImgNoiseConfig', 'UNetNoiseConfig', 'PromptConfig', 'SourceConfig',
    'UNetSourceConfig', 'HeadConfig', 'InputConfig', 'LoraConfig', 'ControlConfig', 'whole_number',
    'finite_number', 'check_timestep', 'img2img_start', 'NUM_TRAIN_TIMESTEPS', 'NOISE_MODES',
]

NUM_TRAIN_TIMESTEPS = 1000
NOISE_MODES = ('ddpm', 'ddim_inversion')


def whole_number(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None, what: str = '') -> int:
    """`value` as an int in [minimum, maximum]; bools and floats are refused."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and (maximum is None or value <= maximum):
        return value
    span = f'>= {minimum}' if maximum is None else f'in [{minimum}, {maximum}]'
    raise InputError(f'{name} must be a whole number {span}{f" ({what})" if what else ""}, got {value!r}.')


def finite_number(name: str, value: Any, minimum: float = -math.inf, maximum: float = math.inf) -> float:
    """`value` as a finite float in [minimum, maximum] (NaN and infinities are refused)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x) or not minimum <= x <= maximum:
        span = '' if (minimum, maximum) == (-math.inf, math.inf) else f' in [{minimum}, {maximum}]'
        raise InputError(f'{name} must be a finite number{span}, got {value!r}.')
    return x


def check_timestep(timestep: Any, whole: bool) -> float:
    """A diffusion timestep in [0, 999]; noisy models index the noise schedule, so theirs must be a whole number."""
    n = NUM_TRAIN_TIMESTEPS
    try:
        t = float(timestep)
    except (TypeError, ValueError):
        t = float('nan')
    if not 0 <= t <= n - 1 or isinstance(timestep, bool):  # also rejects NaN
        raise InputError(f'timestep must be a number in [0, {n - 1}], got {timestep!r}.')
    if whole and t != int(t):
        raise InputError(f'timestep of a noisy model indexes the {n}-step noise schedule and must be a whole number, '
                         f'got {timestep!r}. Use {round(t)}.')
    return t


def img2img_start(num_inference_steps: int, t: int, whole_steps_kept: bool = False) -> int:
    """First step an image-to-image pipeline keeps for strength t / 1000, with the pipelines' own arithmetic
    (`get_timesteps`; the float order matters: 50 * (580 / 1000) is 28.999...).

    SD3's and FLUX's pipelines round the start (`int(steps - steps * strength)`); SDXL's img2img, which Meng et al.'s
    HunyuanDiT pipeline copies, rounds the steps kept (`steps - int(steps * strength)`): `whole_steps_kept`.
    """
    strength = t / 1000
    if whole_steps_kept:
        start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    else:
        start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
    if start >= num_inference_steps:
        raise InputError(f'timestep={t} with num_inference_steps={num_inference_steps} leaves no denoising step '
                         '(strength t / 1000 times the steps must be above 0): raise the timestep.')
    return start


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the option objects (`_builder.group_kwargs` builds them from flat keyword arguments by field name)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))



@dataclasses.dataclass(frozen=True)
class NoiseConfig(Options):
    """How images become the denoiser's input: the latent, the timestep, and the seeded noise draws averaged.

    Args:
        timestep: the diffusion timestep (family default when None; clean models: overrides the learned one).
        ensemble: noise draws averaged per image (one batched pass).
        noise_seed: seed of the noise and latent draws, so features are reproducible.
        latent: 'mode' (posterior mode) or 'sample' (a seeded posterior draw); None: the family's default.
    """
    timestep: Optional[float] = None
    ensemble: int = 1
    noise_seed: int = 0
    latent: Optional[str] = None

    def __post_init__(self) -> None:
        whole_number('ensemble', self.ensemble, what='noise draws averaged per image')
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or self.noise_seed < 0:
            raise InputTypeError(f'noise_seed must be a whole number >= 0 (the seed of the noise and latent draws), '
                                 f'got {self.noise_seed!r}.')
        if self.latent not in (None, 'mode', 'sample'):
            raise InputError(f"latent must be 'mode' or 'sample', got {self.latent!r}.")
        if self.timestep is not None:
            check_timestep(self.timestep, whole=False)

    def resolved(self, clean: bool, latent: str) -> 'NoiseConfig':
        """These options for a clean or noisy model, `latent` filling the default; the timestep checked for it."""
        if clean and self.ensemble != 1:
            raise InputError('Clean models take no noise: ensemble must be 1. Use a noisy model (sd21, sd15) to '
                             'ensemble.')
        timestep = None if self.timestep is None else check_timestep(self.timestep, whole=not clean)
        return dataclasses.replace(self, latent=self.latent or latent, timestep=timestep)


@dataclasses.dataclass(frozen=True)
class Img2ImgNoiseConfig(NoiseConfig):
    """Noise as an image-to-image pipeline adds it (Meng et al.'s diffusion transformers): strength t / 1000 cuts a
    schedule of `num_inference_steps` and the one denoiser call runs at the first step kept."""
    num_inference_steps: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        whole_number('num_inference_steps', self.num_inference_steps)

    def start(self, whole_steps_kept: bool = False, default_t: int = 50) -> tuple[int, int]:
        """(Meng et al.'s t, the first step kept of the cut schedule; see `img2img_start`)."""
        t = default_t if self.timestep is None else int(check_timestep(self.timestep, whole=True))
        return t, img2img_start(self.num_inference_steps, t, whole_steps_kept)


@dataclasses.dataclass(frozen=True)
class UNetNoiseConfig(NoiseConfig):
    """A UNet's noise: seeded DDPM noise at the timestep, or Meng et al.'s deterministic DDIM inversion to it.

    Args:
        noise: 'ddpm' or 'ddim_inversion' (the whole UNet walks the clean latent up the DDIM schedule).
        inversion_steps: DDIM steps of the whole schedule the inversion walks (theirs: 100).
        meng_t: Meng et al.'s t instead of `timestep`: the img2img strength t / 1000 over the 1000 steps of the
            scheduler their pipeline uses for the model; the UNet runs at the first step kept (SD1.5: t + 1).
    """
    noise: str = 'ddpm'
    inversion_steps: int = 100
    meng_t: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.meng_t is not None:
            whole_number('meng_t', self.meng_t, 1, NUM_TRAIN_TIMESTEPS - 1, "Meng et al.'s t: strength t / 1000")
            if self.timestep is not None:
                raise InputError(f'Give timestep (the UNet\'s own) or meng_t (Meng et al.\'s numbering), not both: got '
                                 f'timestep={self.timestep!r}, meng_t={self.meng_t!r}.')
        if self.noise not in NOISE_MODES:
            raise InputError(f'noise must be one of {", ".join(NOISE_MODES)}, got {self.noise!r}.')
        if self.inverted:
            whole_number('inversion_steps', self.inversion_steps, 2, 1000)
            if self.ensemble != 1:
                raise InputError(f'DDIM inversion is deterministic: ensemble must be 1 (got {self.ensemble}); there '
                                 'are no noise draws to average.')

    @property
    def inverted(self) -> bool:
        return self.noise == 'ddim_inversion'

    def resolved(self, clean: bool, latent: str) -> 'UNetNoiseConfig':
        if clean and self.inverted:
            raise InputError("noise='ddim_inversion' is for the noisy models (sd15, sd21, sdxl, ...); a clean model "
                             'takes no noise.')
        return super().resolved(clean, 'mode' if self.inverted else latent)


@dataclasses.dataclass(frozen=True)
class PromptConfig(Options):
    """The caption the denoiser is conditioned on (None: the empty prompt). Its embedding is computed with the base
    repo's text encoder(s) when pretrained weights load (cached on disk), unless the checkpoint holds it already."""
    prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InputError(f'prompt must be a string (or None for the empty prompt), got '
                             f'{type(self.prompt).__name__}.')

    @property
    def text(self) -> str:
        return self.prompt or ''


@dataclasses.dataclass(frozen=True)
class SourceConfig(Options):
    """Where the parts a denoiser-only checkpoint lacks come from when the model is completed.

    Args:
        base_repo: Hub repo ("org/name[@rev]") or local diffusers folder with vae/, text_encoder/, tokenizer/.
        vae_file: the VAE weights in `base_repo`.
    """
    base_repo: Optional[str] = None
    vae_file: str = 'vae/diffusion_pytorch_model.safetensors'


@dataclasses.dataclass(frozen=True)
class UNetSourceConfig(SourceConfig):
    """A UNet's sources; `timestep_source` ("org/name[@rev]:file.safetensors") holds a clean model's learned timestep.
    """
    timestep_source: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class HeadConfig(Options):
    """The timm classifier head: `num_classes` (0: none), its pooling and dropout, and the tap it reads (None: the
    family's default)."""
    num_classes: int = 0
    global_pool: str = 'avg'
    drop_rate: float = 0.
    head_tap: Optional[str] = None

    def __post_init__(self) -> None:
        whole_number('num_classes', self.num_classes, minimum=0)
        finite_number('drop_rate', self.drop_rate, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class InputConfig(Options):
    """Input images: their channel count, and whether each batch is checked (shape, dtype, finiteness: one device
    sync per call)."""
    in_chans: int = 3
    check_inputs: bool = True

    def __post_init__(self) -> None:
        whole_number('in_chans', self.in_chans)


@dataclasses.dataclass(frozen=True)
class LoraConfig(Options):
    """A LoRA fused into the UNet when pretrained weights load (`conditioning/lora.py`): a Hub repo
    'org/name[@rev][:file.safetensors]' or a local .safetensors file, at weight `lora_scale`."""
    lora: Optional[str] = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        lora, scale = lora_spec(self.lora, self.lora_scale)  # the one check of a LoRA spec and its scale
        object.__setattr__(self, 'lora', lora)
        object.__setattr__(self, 'lora_scale', scale)


@dataclasses.dataclass(frozen=True)
class ControlConfig(Options):
    """A ControlNet conditioning the UNet on the input's Canny edges or DPT depth (`conditioning/control.py`).

    Args:
        control: 'canny' | 'depth' | None.
        control_repo: the ControlNet (diffusers layout) instead of Meng et al.'s default for the architecture.
        control_scale: the ControlNet's `conditioning_scale`.
        depth_repo: control='depth': the DPT depth estimator (default Intel/dpt-hybrid-midas).
    """
    control: Optional[str] = None
    control_repo: Optional[str] = None
    control_scale: float = 1.0
    depth_repo: Optional[str] = None

    def __post_init__(self) -> None:
        if self.control is not None and self.control not in CONTROL_MODES:
            raise InputError(f'control must be one of {", ".join(CONTROL_MODES)} (or None), got {self.control!r}.')
        if self.control_repo is not None and self.control is None:
            raise InputError("control_repo needs control='canny' or 'depth' (how the control image is made from the "
                             'input).')
        if self.depth_repo is not None and self.control != 'depth':
            raise InputError(f"depth_repo needs control='depth' (got control={self.control!r}): it is the depth "
                             "estimator that makes the depth ControlNet's control image.")
        object.__setattr__(self, 'control_scale', finite_number('control_scale', self.control_scale, -100.0, 100.0))
