"""ControlNet conditioning of a UNet backbone (`control='canny' | 'depth'`), as Meng et al.'s
`feature/components/controlnet.py`.

Control images, default ControlNets and depth estimator: docs/models.md#lora-controlnet-and-ddim-inversion; departures
from their `MidasDetector`: docs/fidelity.md#lora-controlnet-and-ddim-inversion.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...errors import DiffbackboneError

__all__ = ['CONTROL_FILE', 'CONTROL_MODES', 'CANNY_REPOS', 'DEPTH_REPOS', 'DEPTH_REPO', 'DEPTH_FILE', 'ControlError',
           'default_control_repo', 'canny_image', 'depth_image', 'build_controlnet', 'build_depth_estimator',
           'check_controlnet']

CONTROL_MODES = ('canny', 'depth')
CANNY_REPOS = {'sd15': 'lllyasviel/sd-controlnet-canny', 'sdxl': 'diffusers/controlnet-canny-sdxl-1.0'}
DEPTH_REPOS = {'sd15': 'lllyasviel/sd-controlnet-depth', 'sdxl': 'diffusers/controlnet-depth-sdxl-1.0'}
CONTROL_FILE = 'diffusion_pytorch_model.safetensors'
DEPTH_REPO = 'Intel/dpt-hybrid-midas'  # the depth estimator (transformers' DPT port of MiDaS v3 DPT-hybrid)
DEPTH_FILE = 'model.safetensors'


class ControlError(DiffbackboneError, ValueError):
    """A ControlNet setting cannot be used with this model; the message says why and what to do."""


def _family(unet_config) -> Optional[str]:
    if getattr(unet_config, 'addition_embed_type', None) == 'text_time':
        return 'sdxl' if unet_config.cross_attention_dim == 2048 else None
    return 'sd15' if unet_config.cross_attention_dim == 768 else None


def default_control_repo(control: str, unet_config) -> str:
    """The ControlNet repo Meng et al. use for `control` with this UNet's architecture."""
    family = _family(unet_config)
    if family is None:
        raise ControlError(f"control={control!r} has a default ControlNet for SD1.5 and SDXL only; give "
                           "control_repo='org/name' with a ControlNet for this model's UNet.")
    return (DEPTH_REPOS if control == 'depth' else CANNY_REPOS)[family]


def canny_image(x: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Control images (B, 3, H, W) in [0, 1] of input images `x` in [-1, 1]: Canny edges of the 8-bit RGB image."""
    try:
        import cv2
    except ImportError as e:
        raise ControlError("control='canny' needs OpenCV: pip install opencv-python-headless.") from e
    rgb = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(im), low, high) for im in rgb])
    return torch.from_numpy(edges).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).to(x.device)


def build_depth_estimator(repo: str):
    """An empty transformers `DPTForDepthEstimation` with the config of `repo` and its `DPTImageProcessor`."""
    import json

    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from ... import hub

    def refuse(why: str) -> ControlError:
        return ControlError(f'{repo!r} is not a DPT depth estimator in the transformers layout ({why}); give '
                            f"depth_repo='org/name' of one (default {DEPTH_REPO!r}).")

    cfg = json.loads(hub.download(repo, 'config.json', what=f'depth estimator config of {repo!r}').read_text())
    if not isinstance(cfg, dict) or cfg.get('model_type') != 'dpt':
        raise refuse(f"config.json model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, not 'dpt'")
    pre = hub.download(repo, 'preprocessor_config.json', what=f'depth estimator preprocessing of {repo!r}')
    try:
        config = DPTConfig.from_dict(cfg)
        processor = DPTImageProcessor.from_dict(json.loads(pre.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise refuse(str(e)) from e
    return DPTForDepthEstimation(config).eval(), processor


@torch.no_grad()
def depth_image(x: torch.Tensor, estimator, processor) -> torch.Tensor:
    """Control images (B, 3, H, W) in [0, 1] of input images `x` in [-1, 1]: the DPT depth map of the 8-bit RGB image,
    resized bicubically to (H, W) and min-max normalised per image (diffusers' depth ControlNet recipe)."""
    rgb = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pixels = processor(images=list(rgb), return_tensors='pt').pixel_values
    param = next(estimator.parameters())
    depth = estimator(pixel_values=pixels.to(param.device, param.dtype)).predicted_depth.float().unsqueeze(1)
    depth = torch.nn.functional.interpolate(depth, size=x.shape[-2:], mode='bicubic', align_corners=False)
    lo, hi = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
    depth = (depth - lo) / (hi - lo).clamp_min(torch.finfo(depth.dtype).tiny)  # a flat map gives zeros, not NaN
    return depth.expand(-1, 3, -1, -1).to(x.device)


def build_controlnet(repo: str):
    """An empty diffusers `ControlNetModel` with the config of `repo` (weights come with the model's checkpoint)."""
    from diffusers import ControlNetModel

    from ... import hub

    path = hub.download(repo, 'config.json', what=f'ControlNet config of {repo!r}')
    return ControlNetModel.from_config(ControlNetModel.load_config(str(path)))


def check_controlnet(controlnet, unet, repo: str) -> None:
    """One error when the ControlNet's residuals cannot fit the UNet (another architecture)."""
    c, u = controlnet.config, unet.config
    keys = ('block_out_channels', 'cross_attention_dim', 'addition_embed_type', 'layers_per_block', 'in_channels')
    diff = [f'{k} {getattr(c, k, None)} vs {getattr(u, k, None)}' for k in keys
            if _norm(getattr(c, k, None)) != _norm(getattr(u, k, None))]
    if diff:
        raise ControlError(f'The ControlNet {repo!r} is for another architecture than this UNet ({"; ".join(diff)}), '
                           'e.g. an SDXL ControlNet on SD1.5. Give a ControlNet trained for this model.')


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
