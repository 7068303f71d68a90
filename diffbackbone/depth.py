"""CleanDIFT's published depth probe: metric depth from `us6` of the clean SD2.1 model (the command `diffbackbone
depth` is commands/depth.py).

CleanDIFT (Stracke et al., CVPR 2025, github CompVis/cleandift): their `DepthPred.predict` (`src/depth.py`,
`configs/sd21_depth_prober.yaml`) step by step, and our one difference (posterior mode): docs/tasks.md#depth-cleandifts-probe."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hub
from .data.outputs import save_picture
from .errors import DiffbackboneError, InputError, InputTypeError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ['DepthProbe', 'DepthPredictor', 'DepthError', 'load_probe', 'load_depth_predictor', 'predict_depth',
           'colorize', 'save_depth', 'PROBE_REPO', 'PROBE_FILE', 'CAPTION']

PROBE_REPO = 'CompVis/cleandift'
PROBE_FILE = 'cleandift_sd21_depth_probe.safetensors'
CAPTION = 'A photo of a room'
SIZE = 768
N_BINS, MIN_DEPTH, MAX_DEPTH = 256, 0.1, 10.0
EPS = 0.1  # added to the relu'd logits before normalising (AdaBins' "linear" normalisation)


class DepthError(DiffbackboneError, ValueError):
    """A probe file or depth request cannot be used; the message says which and what to do."""


class DepthProbe(nn.Module):
    """Linear depth probe: 1x1 conv to `n_bins` logits, relu + eps, normalised, expectation over uniform bins (m)."""

    def __init__(self, channels: int = 1280, n_bins: int = N_BINS, min_depth: float = MIN_DEPTH,
                 max_depth: float = MAX_DEPTH):
        super().__init__()
        self.conv_depth = nn.Conv2d(channels, n_bins, kernel_size=1)
        self.register_buffer('bins', torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 1, h, w) depth in metres."""
        logit = torch.relu(self.conv_depth(feat)) + EPS
        prob = logit / logit.sum(dim=1, keepdim=True)
        return torch.einsum('bkhw,k->bhw', prob, self.bins.to(prob.dtype)).unsqueeze(1)


def resolve_probe(spec: Optional[str] = None) -> Path:
    """Path of the probe file: None = CleanDIFT's from the Hub; else a local file, a local folder holding
    `PROBE_FILE`, or a Hub repo `'org/name[@revision][:file.safetensors]'`."""
    what = 'the CleanDIFT depth probe'
    if spec is None:
        return hub.download(PROBE_REPO, PROBE_FILE, what=what)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return hub.download(str(path), PROBE_FILE, what=what)
    if spec.startswith(('/', './', '../', '~')) or (spec.endswith('.safetensors') and ':' not in spec):
        raise DepthError(f'--probe {spec}: no such file. Give an existing .safetensors file, a folder holding '
                         f'{PROBE_FILE}, or a Hub repo "org/name[:file]".')
    repo, _, filename = spec.partition(':')
    return hub.download(repo, filename or PROBE_FILE, what=f'the depth probe {filename or PROBE_FILE!r}')


def load_probe(path: Union[str, Path], channels: Optional[int] = None) -> DepthProbe:
    """A `DepthProbe` from a safetensors state dict of a `Conv2d(C, n_bins, 1)` (`weight`, `bias`; a `conv_depth.`
    prefix is accepted); with `channels`, the probe must take that many feature channels."""
    path = Path(path)
    sd = hub.load_safetensors(path, what=f'the depth probe {path}')
    sd = {k.removeprefix('conv_depth.'): v for k, v in sd.items()}
    weight, bias = sd.get('weight'), sd.get('bias')
    if (set(sd) != {'weight', 'bias'} or weight.ndim != 4 or weight.shape[2:] != (1, 1)
            or bias.shape != weight.shape[:1]):
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        raise DepthError(f'{path} is not a depth probe: expected the state dict of a Conv2d(C, bins, 1) (weight '
                         f'(bins, C, 1, 1), bias (bins,)), got {shapes}. Give CleanDIFT\'s {PROBE_FILE} or a probe '
                         'of that form.')
    n_bins, in_chs = weight.shape[:2]
    if channels is not None and in_chs != channels:
        raise DepthError(f'{path} takes {in_chs}-channel features but the tap gives {channels}: use a probe trained '
                         'on this tap (CleanDIFT\'s takes us6 of cleandift_sd21, 1280 channels) or another --tap.')
    probe = DepthProbe(in_chs, n_bins)
    probe.conv_depth.load_state_dict({'weight': weight.float(), 'bias': bias.float()})
    return probe.eval()


class DepthPredictor(nn.Module):
    """Backbone tap + depth probe, as CleanDIFT's `DepthPred.predict` followed by the resize back to the input."""

    def __init__(self, backbone: nn.Module, probe: DepthProbe, tap: str = 'us6', size: int = SIZE):
        super().__init__()
        self.backbone = backbone
        self.probe = probe
        self.tap = tap
        self.size = size

    def low_res(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 1, h, w) depth at the tap's resolution (input resized to `size`)."""
        x = F.interpolate(x, size=(self.size, self.size), mode='bilinear', align_corners=False)
        w = self.probe.conv_depth.weight
        feat = self.backbone.forward_intermediates(x.to(w.dtype), indices=[self.tap], intermediates_only=True)[0]
        return self.probe(feat.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 1, H, W) metric depth (metres), float32."""
        return F.interpolate(self.low_res(x).float(), size=x.shape[-2:], mode='bilinear', align_corners=False)


def load_depth_predictor(
        model: str = 'cleandift_sd21',
        probe: Optional[str] = None,
        tap: str = 'us6',
        size: int = SIZE,
        prompt: str = CAPTION,
        weights: Optional[str] = None,
        pretrained: bool = True,
        model_kwargs: Optional[dict] = None,
        device: Union[str, torch.device] = 'cpu',
        dtype: torch.dtype = torch.float32,
) -> DepthPredictor:
    """CleanDIFT's depth predictor: `model` (pruned after `tap`) conditioned on `prompt`, and the probe `probe`
    (see `resolve_probe`; default CleanDIFT's from the Hub). The probe file is checked before the model is built."""
    import timm

    from . import models  # noqa: F401  (registers the architectures)
    from .models._base import PromptReencodedWarning
    from .prompts import encode_prompts

    if size < 64:
        raise DepthError(f'--size must be at least 64 px, got {size}.')
    probe_path = resolve_probe(probe)
    load_probe(probe_path)  # a broken probe fails before any UNet is downloaded
    pretrained = pretrained or bool(weights)
    kwargs = dict(model_kwargs or {})
    kwargs.pop('prompt', None)
    if pretrained:  # random weights take no prompt argument: the caption is encoded below
        kwargs['prompt'] = prompt
    if weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights)
    with warnings.catch_warnings():  # the caption replaces any embedding in the weights, as said below
        warnings.simplefilter('ignore', PromptReencodedWarning)
        getter = timm.create_model(model, pretrained=pretrained, features_only=True, out_indices=(tap,), **kwargs)
    net = getter.model
    channels = getter.feature_info.channels()[0]
    depth_probe = load_probe(probe_path, channels=channels)
    with torch.no_grad():  # the caption's embedding, also when the weights file carried another prompt's
        for name, value in encode_prompts(net, [prompt]).buffers().items():
            getattr(net, name).copy_(value)
    net.prompt = prompt
    predictor = DepthPredictor(net, depth_probe, tap=getter.feature_info.get('name')[0], size=size)
    return predictor.to(device=device, dtype=dtype).eval()


def _check_images(images: Union[torch.Tensor, Sequence[torch.Tensor]], batch_size: int) -> list[torch.Tensor]:
    """The images of `predict_depth` as a list of (3, H, W) float tensors in [-1, 1], or a clear error."""
    how = ('give (3, H, W) tensors in [-1, 1], e.g. diffbackbone.images.to_tensor(PIL image) or '
           'x.float() / 127.5 - 1 for 0..255 values')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f'batch_size must be a whole number >= 1, got {batch_size!r}.')
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            raise InputError(f'images is one (3, H, W) tensor {tuple(images.shape)}: pass a list of images, or a '
                             '(N, 3, H, W) batch.')
        if images.ndim != 4:
            raise InputError(f'images must be an (N, 3, H, W) batch or a list of (3, H, W) tensors, got a tensor of '
                             f'shape {tuple(images.shape)}: {how}.')
    elif not isinstance(images, (list, tuple)):
        raise InputTypeError(f'images must be a list of (3, H, W) tensors or an (N, 3, H, W) tensor, got '
                        f'{type(images).__name__}: {how}.')
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, torch.Tensor):
            raise InputTypeError(f'image {i} is a {type(im).__name__}, not a tensor: {how}.')
        if im.ndim != 3 or im.shape[0] != 3:
            raise InputError(f'image {i} has shape {tuple(im.shape)}, not (3, H, W): {how} (grey (H, W) images: '
                             'im.expand(3, -1, -1)).')
        if not im.is_floating_point():
            raise InputError(f'image {i} is {im.dtype}, not floating point in [-1, 1]: {how}.')
        lo, hi = im.min().item(), im.max().item()
        if not (lo >= -1.1 and hi <= 1.1):  # bicubic resizing overshoots a little; 0..255 or 0..65535 do not fit
            raise InputError(f'image {i} has values in [{lo:g}, {hi:g}], outside [-1, 1]: {how} (0..65535: '
                             'x / 32767.5 - 1).')
    return out


@torch.no_grad()
def predict_depth(predictor: DepthPredictor, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                  batch_size: int = 4) -> list[torch.Tensor]:
    """Metric depth (H, W) float32 on the CPU for each image ((3, H, W) in [-1, 1]; sizes may differ)."""
    device = next(predictor.parameters()).device
    out: list[torch.Tensor] = []
    images = _check_images(images, batch_size)
    for start in range(0, len(images), batch_size):
        chunk = [im.to(device=device, dtype=torch.float32)[None] for im in images[start:start + batch_size]]
        x = torch.cat([F.interpolate(im, size=(predictor.size,) * 2, mode='bilinear', align_corners=False)
                       for im in chunk])
        low = predictor.low_res(x).float()  # resizing to `size` again is the identity
        for i, im in enumerate(chunk):
            depth = F.interpolate(low[i:i + 1], size=im.shape[-2:], mode='bilinear', align_corners=False)
            out.append(depth[0, 0].cpu())
    return out


def colorize(depth: torch.Tensor) -> 'Image.Image':
    """An RGB picture of (H, W) depth: disparity (1 / depth) scaled to its 1-99 % range, turbo colours (near red)."""
    from PIL import Image

    disp = 1.0 / depth.double().clamp_min(1e-6)
    lo, hi = torch.quantile(disp.flatten(), torch.tensor([0.01, 0.99], dtype=disp.dtype))
    x = ((disp - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    # Polynomial fit of the turbo colour map (Google, 2019).
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    rgb = (torch.stack([r, g, b], -1).clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(rgb, 'RGB')


def save_depth(depth: torch.Tensor, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write `<stem>_depth.png` (`colorize`) and `<stem>_depth.npy` (metres, float32) into `folder`; returns both."""
    npy, png = folder / f'{stem}_depth.npy', folder / f'{stem}_depth.png'
    save_picture(colorize(depth), png, 'depth')  # first: the .npy is recognised as ours by its picture
    with hub.atomic_path(npy) as tmp, open(tmp, 'wb') as f:
        np.save(f, depth.numpy().astype(np.float32))
    return npy, png
