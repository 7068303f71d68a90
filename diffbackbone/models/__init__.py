"""Model definitions; importing this package registers them with timm."""
from .backbone import VAEEncoder
from .diffusion_unet import DiffusionUNet, MIN_INPUT_SIZE
from .flux import FluxBackbone
from .ditf import DiTFFlux
from .fused import FusedBackbone
from .hunyuan import HunyuanDiTBackbone
from .pixart import PixArtBackbone
from .sd3 import SD3Backbone
from .taps import PRESETS, Tap, TapError

__all__ = ['DiffusionUNet', 'DiTFFlux', 'FluxBackbone', 'FusedBackbone', 'HunyuanDiTBackbone', 'PixArtBackbone',
           'SD3Backbone', 'VAEEncoder', 'MIN_INPUT_SIZE', 'PRESETS', 'Tap', 'TapError']
