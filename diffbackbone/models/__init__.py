"""Model definitions; importing this package registers them with timm."""
from .backbone import VAEEncoder
from .diffusion_unet import DiffusionUNet, MIN_INPUT_SIZE
from .flux import FluxBackbone
from .ditf import DiTFFlux
from .fused import FusedBackbone
from .pixart import PixArtBackbone
from .taps import PRESETS, Tap, TapError

__all__ = ['DiffusionUNet', 'DiTFFlux', 'FluxBackbone', 'FusedBackbone', 'PixArtBackbone', 'VAEEncoder', 'MIN_INPUT_SIZE', 'PRESETS', 'Tap', 'TapError']
