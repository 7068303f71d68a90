"""ControlNet conditioning of a UNet backbone (`control='canny'`), as Meng et al.'s `feature/components/controlnet.py`.

Their extractor turns the input image into a control image (Canny edges: `cv2.Canny(image, 100, 200)` on the resized
RGB image, stacked to three channels, scaled to [0, 1] by diffusers' `VaeImageProcessor(do_normalize=False)`), runs
diffusers' `ControlNetModel` on the same (noised) latent, timestep and prompt as the UNet (`conditioning_scale=1`,
no guess mode) and adds its residuals to the UNet: one per skip connection of the down path and one to the mid
block's output. The ControlNets they use: `lllyasviel/sd-controlnet-canny` (SD1.5) and
`diffusers/controlnet-canny-sdxl-1.0` (SDXL); `control_repo=` picks another one in the diffusers layout.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ['CONTROL_FILE', 'CONTROL_MODES', 'CANNY_REPOS', 'ControlError', 'default_control_repo', 'canny_image', 'build_controlnet',
           'check_controlnet']

CONTROL_MODES = ('canny',)
CANNY_REPOS = {'sd15': 'lllyasviel/sd-controlnet-canny', 'sdxl': 'diffusers/controlnet-canny-sdxl-1.0'}
CONTROL_FILE = 'diffusion_pytorch_model.safetensors'


class ControlError(ValueError):
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
    return CANNY_REPOS[family]


def canny_image(x: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Control images (B, 3, H, W) in [0, 1] of input images `x` in [-1, 1]: Canny edges of the 8-bit RGB image."""
    try:
        import cv2
    except ImportError as e:
        raise ControlError("control='canny' needs OpenCV: pip install opencv-python-headless.") from e
    rgb = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(im), low, high) for im in rgb])
    return torch.from_numpy(edges).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).to(x.device)


def build_controlnet(repo: str):
    """An empty diffusers `ControlNetModel` with the config of `repo` (weights come with the model's checkpoint)."""
    from diffusers import ControlNetModel

    from .. import hub

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
