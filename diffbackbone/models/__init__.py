"""Model families (one file each) over shared infrastructure (`_base`, `_builder`, `_options`, `_taps`, `_vae`);
importing this package registers them with timm."""
from ._base import DiffusionBackbone
from ._options import (
    ControlConfig, HeadConfig, Img2ImgNoiseConfig, InputConfig, LoraConfig, NoiseConfig, PromptConfig, SourceConfig,
    UNetNoiseConfig, UNetSourceConfig,
)
from ._taps import PRESETS, Tap, TapError
from ._vae import VAEEncoder
from .deepfloyd_if import DeepFloydIF
from .diffusion_unet import MIN_INPUT_SIZE, DiffusionUNet
from .ditf import DiTFFlux
from .flux import FluxBackbone
from .fused import FusedBackbone, FusionConfig
from .hunyuan import HunyuanDiTBackbone
from .multi import MemberConfig, MultiBackbone
from .pixart import PixArtBackbone
from .sd3 import SD3Backbone

__all__ = [
    'DiffusionBackbone', 'DeepFloydIF', 'DiffusionUNet', 'DiTFFlux', 'FluxBackbone', 'FusedBackbone',
    'HunyuanDiTBackbone', 'MultiBackbone', 'PixArtBackbone', 'SD3Backbone', 'VAEEncoder', 'MIN_INPUT_SIZE', 'PRESETS', 'Tap', 'TapError',
    'NoiseConfig', 'Img2ImgNoiseConfig', 'UNetNoiseConfig', 'PromptConfig', 'SourceConfig', 'UNetSourceConfig',
    'HeadConfig', 'InputConfig', 'LoraConfig', 'ControlConfig', 'FusionConfig', 'MemberConfig',
]
