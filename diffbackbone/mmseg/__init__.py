"""MMSegmentation plugin: importing it registers `DiffusionBackbone` and `DiffusionEncoderDecoder` with mmseg.

In a config: ``custom_imports = dict(imports=['diffbackbone.mmseg'], allow_failed_imports=False)``.
Train / test: ``python -m diffbackbone.mmseg train CONFIG`` and ``python -m diffbackbone.mmseg test CONFIG CKPT``.
"""
try:
    import mmseg  # noqa: F401  (mmseg checks its mmcv version on import)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f'diffbackbone.mmseg needs MMSegmentation 1.2.2 and full mmcv 2.1.0 ({e}). Install them with '
        '`bash tools/build_mmcv.sh python && pip install "diffbackbone[mmseg]"`.') from e

from .backbone import DiffusionBackbone, DiffusionEncoderDecoder
from .checks import ConfigError, check_config, check_head_channels
from .compat import allow_mmengine_checkpoints
from .optim import DiffusionOptimWrapperConstructor

allow_mmengine_checkpoints()

__all__ = [
    'DiffusionBackbone', 'DiffusionEncoderDecoder', 'DiffusionOptimWrapperConstructor', 'ConfigError', 'check_config',
    'check_head_channels',
]
