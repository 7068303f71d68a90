"""diffbackbone: diffusion-model features as timm backbones (UNets, diffusion transformers, IF, SD + DINOv2).

Importing the package registers the models with timm: ``timm.create_model("cleandift_sd21", pretrained=True,
features_only=True)``.
"""
from .models import MIN_INPUT_SIZE, PRESETS, DiffusionUNet, TapError
from .data.store import FeatureStore
from .models.record import Recording, record

__version__ = '0.1.0'
__all__ = ['DiffusionUNet', 'TapError', 'PRESETS', 'MIN_INPUT_SIZE', 'FeatureStore', 'record', 'Recording', '__version__']
