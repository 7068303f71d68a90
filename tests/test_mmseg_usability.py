"""MMSegmentation usability (#10): a short optimizer log with unchanged parameter groups, the test pipeline's 64 px
minimum found before training, and `DiffusionEncoderDecoder` named where plain `EncoderDecoder` users fail."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import mmseg_required  # noqa: F401  (a missing mmseg extra fails, not skips)

import timm  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from diffbackbone.mmseg import ConfigError, check_head_channels  # noqa: E402
from diffbackbone.mmseg.checks import check_image_sizes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPERNET_ADE = REPO / 'configs_mmseg/upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'


@pytest.fixture(autouse=True)
def mmseg_scope():
    init_default_scope('mmseg')


def _tiny_cfg(**backbone) -> Config:
    cfg = Config.fromfile(str(UPERNET_ADE))
    ch = timm.create_model('test_cleandift', features_only=True).feature_info.channels()
    cfg.model.backbone.update(model_name='test_cleandift', pretrained=False, **backbone)
    cfg.model.decode_head.update(in_channels=ch, channels=16)
    cfg.model.auxiliary_head.update(in_channels=ch[1], channels=8)
    return cfg


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()


def _build_optimizer(model, optim_cfg: dict, constructor: str):
    logger = MMLogger.get_instance(f'optim-{constructor}-{id(model)}', log_level='INFO')  # the current logger now
    lines = _Lines()
    logger.addHandler(lines)
    try:
        wrapper = build_optim_wrapper(model, dict(optim_cfg, constructor=constructor))
    finally:
        logger.removeHandler(lines)
    return wrapper.optimizer.param_groups, lines.lines


@pytest.mark.parametrize('frozen', [False, True], ids=['lr_mult', 'frozen'])
def test_optimizer_log_is_a_summary_and_groups_are_unchanged(frozen):
    from mmseg.registry import MODELS

    cfg = _tiny_cfg(frozen=frozen)
    assert cfg.optim_wrapper.constructor == 'DiffusionOptimWrapperConstructor'  # the released schedules use it
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ref_groups, ref_log = _build_optimizer(model, cfg.optim_wrapper, 'DefaultOptimWrapperConstructor')
    groups, log = _build_optimizer(model, cfg.optim_wrapper, 'DiffusionOptimWrapperConstructor')

    # the same optimisation: the same tensors in the same order, each with the same options
    assert len(groups) == len(ref_groups) > 10
    for ours, ref in zip(groups, ref_groups):
        assert [id(p) for p in ours['params']] == [id(p) for p in ref['params']]
        assert {k: v for k, v in ours.items() if k != 'params'} == {k: v for k, v in ref.items() if k != 'params'}
    unet = {id(p) for p in model.backbone.model.unet.parameters()}
    lrs = sorted({g['lr'] for g in groups if id(g['params'][0]) in unet})
    assert lrs == ([] if frozen else [pytest.approx(8e-6)])

    # mmengine: a line per option of every UNet parameter, or a warning per frozen parameter; ours: a summary
    per_parameter = 'requires_grad=False' if frozen else 'paramwise_options --'
    assert sum(per_parameter in ln for ln in ref_log) > 50
    assert not any('paramwise_options --' in ln or ' is skipped since' in ln for ln in log)
    assert len(log) <= 12, log
    summary = '\n'.join(log)
    assert 'frozen (requires_grad=False, not optimised)' in summary and 'backbone.model.vae' in summary
    if not frozen:
        assert 'lr=8e-06, lr_mult=0.1, weight_decay=0.001' in summary and 'backbone.model.unet' in summary


def test_small_test_resize_is_found_before_training(tmp_path):
    config = tmp_path / 'small_test_resize.py'
    config.write_text(f"""
_base_ = {str(UPERNET_ADE)!r}
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 48), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
""")
    cfg = Config.fromfile(str(config))
    for mode in ('train', 'test'):
        with pytest.raises(ConfigError, match=r'smaller than 64 px.*test_pipeline \(\w+_dataloader\.dataset\.pipeline\): '
                                              r'Resize\.scale gives 48 px'):
            check_image_sizes(cfg, mode)
    # a training run without validation still checks the test loader: the run would otherwise fail at its end
    cfg.val_cfg = None
    with pytest.raises(ConfigError, match=r'test_pipeline \(test_dataloader\.dataset\.pipeline\)'):
        check_image_sizes(cfg, 'train')
    check_image_sizes(Config.fromfile(str(UPERNET_ADE)), 'train')  # the released config passes


def test_small_test_images_name_the_test_pipeline():
    from mmseg.registry import MODELS

    model = MODELS.build(_tiny_cfg().model).eval()
    metas = [dict(img_shape=(48, 96), ori_shape=(48, 96), pad_shape=(48, 96))]
    with pytest.raises(ConfigError, match=r'Test images reach the model at \(48, 96\) px.*test_pipeline'):
        model.inference(torch.zeros(1, 3, 48, 96), metas)
    metas = [dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96))]
    with torch.no_grad():
        assert model.inference(torch.zeros(1, 3, 64, 96), metas).shape[-2:] == (64, 96)


def test_plain_encoder_decoder_errors_point_to_ours():
    from mmseg.registry import MODELS

    cfg = _tiny_cfg()
    cfg.model.type = 'EncoderDecoder'
    cfg.model.decode_head.in_channels = [640, 1280, 1280, 1280]
    model = MODELS.build(cfg.model)  # mmseg builds it; the mismatch would surface at the first step
    with pytest.raises(ConfigError, match=r"decode_head\.in_channels=\[640, 1280, 1280, 1280\].*"
                                          r"model\.type='DiffusionEncoderDecoder'"):
        check_head_channels(model)
    cfg.model.type = 'DiffusionEncoderDecoder'
    with pytest.raises(ConfigError) as info:
        MODELS.build(cfg.model)
    assert 'DiffusionEncoderDecoder' not in str(info.value)  # already the right type: no advice to switch
