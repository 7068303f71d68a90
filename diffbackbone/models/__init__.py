"""Model definitions; importing this package registers them with timm."""
from ._base import VAEEncoder
from .diffusion_unet import DiffusionUNet, MIN_INPUT_SIZE
from .deepfloyd_if import DeepFloydIF
from .flux import FluxBackbone
from .ditf import DiTFFlux
from .fused import FusedBackbone
from .hunyuan import HunyuanDiTBackbone
from .pixart import PixArtBackbone
from .sd3 import SD3Backbone
from ._taps import PRESETS, Tap, TapError

__all__ = ['DeepFloydIF', 'DiffusionUNet', 'DiTFFlux', 'FluxBackbone', 'FusedBackbone', 'HunyuanDiTBackbone', 'PixArtBackbone',
           'SD3Backbone', 'VAEEncoder', 'MIN_INPUT_SIZE', 'PRESETS', 'Tap', 'TapError']
