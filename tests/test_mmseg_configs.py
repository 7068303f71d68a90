"""Every config in configs_mmseg/ loads, builds with its real backbone (on the meta device: shapes only, no weights),
passes the head/backbone channel check, and trains one step with the backbone swapped to the tiny test model."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

import mmseg_required  # noqa: F401  (a missing mmseg extra fails, not skips)

import timm  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / 'configs_mmseg').rglob('*.py') if '_base_' not in p.parts)
NAMES = [str(p.relative_to(REPO / 'configs_mmseg')) for p in CONFIGS]


def load(path: Path) -> Config:
    cfg = Config.fromfile(str(path))  # also imports diffbackbone.mmseg through custom_imports
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    return cfg


def test_config_set_is_complete():
    names = {p.name for p in CONFIGS}
    for head in ('upernet', 'fpn'):
        for model in ('cleandift-sd21', 'cleandift-sd15'):
            assert f'{head}_{model}_4xb4-80k_ade20k-512x512.py' in names
            assert f'{head}_{model}_4xb2-80k_cityscapes-512x1024.py' in names
            assert f'{head}_{model}_4xb4-40k_voc12aug-512x512.py' in names
        for model in ('sd21', 'sd15'):
            assert f'{head}_{model}_4xb4-80k_ade20k-512x512.py' in names
    assert any(n.startswith('linear_cleandift-sd21-frozen') and 'voc12aug' in n for n in names)
    readme = (REPO / 'configs_mmseg' / 'README.md').read_text()
    for name in names:
        assert name in readme, f'{name} missing from configs_mmseg/README.md'


@pytest.mark.parametrize('path', CONFIGS, ids=NAMES)
def test_config_builds_with_real_backbone(path):
    from mmseg.registry import MODELS

    from diffbackbone.mmseg import DiffusionBackbone, DiffusionEncoderDecoder

    cfg = load(path)
    bb = cfg.model.backbone
    assert bb.type == 'DiffusionBackbone' and bb.pretrained is True, 'released configs load the published weights'
    assert cfg.model.data_preprocessor.mean == [127.5] * 3 and cfg.model.data_preprocessor.std == [127.5] * 3
    assert tuple(cfg.model.data_preprocessor.size) == tuple(cfg.crop_size)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.pretrained = False
    with torch.device('meta'):
        seg = MODELS.build(model_cfg)  # DiffusionEncoderDecoder raises if a head does not fit the backbone
    assert isinstance(seg, DiffusionEncoderDecoder) and isinstance(seg.backbone, DiffusionBackbone)
    with torch.device('meta'):  # the channels straight from timm
        ref = timm.create_model(bb.model_name, features_only=True, out_indices=bb.get('out_indices', 'pyramid'),
                                **(bb.get('model_kwargs') or {}))
    channels = ref.feature_info.channels()
    assert seg.backbone.out_channels == channels
    consumer = model_cfg.neck if model_cfg.get('neck') else model_cfg.decode_head
    idx = consumer.get('in_index', list(range(len(channels))))
    expected = [channels[i] for i in idx] if isinstance(idx, (list, tuple)) else channels[idx]
    assert consumer.in_channels == expected
    # Shapes only: the config's own neck and heads run on maps shaped as the real backbone's outputs for one crop.
    crop = tuple(cfg.crop_size)
    seg.eval()
    feats = [torch.empty(1, c, -(-crop[0] // s), -(-crop[1] // s), device='meta')
             for c, s in zip(seg.backbone.out_channels, seg.backbone.strides)]
    with torch.no_grad():
        x = seg.neck(feats) if seg.with_neck else feats
        logits = seg.decode_head(x)
        if seg.with_auxiliary_head:
            seg.auxiliary_head(x)
    stride = min(seg.backbone.strides)
    if seg.with_neck and model_cfg.neck.get('scales'):  # mmseg's MultiLevelNeck resamples a one-stride backbone
        stride = int(stride / max(model_cfg.neck.scales))
    assert tuple(logits.shape) == (1, cfg.model.decode_head.num_classes, crop[0] // stride, crop[1] // stride)


def tiny_config(cfg: Config) -> Config:
    """The config's model with the backbone swapped to the tiny model of its family (`test_cleandift`,
    `test_pixart`) and in_channels taken from its feature_info."""
    model = copy.deepcopy(cfg.model)
    bb = model.backbone
    tiny_name = 'test_pixart' if 'pixart' in bb.model_name else 'test_cleandift'
    bb.model_name, bb.pretrained, bb.model_kwargs = tiny_name, False, None
    tiny = timm.create_model(tiny_name, features_only=True, out_indices=bb.get('out_indices', 'pyramid'))
    channels = tiny.feature_info.channels()
    if model.get('neck'):
        model.neck.in_channels = channels
        return model
    for name in ('decode_head', 'auxiliary_head'):
        head = model.get(name)
        if not head:
            continue
        idx = head.in_index
        head.in_channels = [channels[i] for i in idx] if isinstance(idx, (list, tuple)) else channels[idx]
        if head.get('num_convs') == 0:  # a linear head keeps channels == in_channels
            head.channels = head.in_channels
    return model


@pytest.mark.parametrize('path', CONFIGS, ids=NAMES)
def test_config_trains_a_step_with_tiny_backbone(path):
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = load(path)
    seg = revert_sync_batchnorm(MODELS.build(tiny_config(cfg)))
    seg.init_weights()
    seg.train()
    num_classes = cfg.model.decode_head.num_classes
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, 64, 96)))
        samples.append(s)
    optim = build_optim_wrapper(seg, cfg.optim_wrapper)
    losses = seg.loss(torch.randn(2, 3, 64, 96), samples)
    loss, _ = seg.parse_losses(losses)
    assert torch.isfinite(loss)
    optim.backward(loss)

    bb = seg.backbone
    assert all(p.grad is None for p in bb.model.vae.parameters()), 'the VAE stays frozen'
    body = getattr(bb.model, 'unet', None) or bb.model.transformer  # the denoiser: UNet or transformer
    unet_grads = [p.grad for p in body.parameters()]
    if cfg.model.backbone.get('frozen'):
        assert not bb.model.training and all(g is None for g in unet_grads)
    else:
        unused = [n for n, p in body.named_parameters() if p.grad is None]
        if unused:  # taps inside a block leave its later sublayers idle: multi-GPU training must know
            assert cfg.get('find_unused_parameters') is True, (
                f'{len(unused)} UNet parameters get no gradient ({unused[:3]}...): set find_unused_parameters = True '
                'in the config, or DistributedDataParallel fails')
        assert len(unused) < len(unet_grads) // 2
        groups = {id(p): g for g in optim.optimizer.param_groups for p in g['params']}
        base_lr = cfg.optim_wrapper.optimizer.lr
        unet_lr = groups[id(next(body.parameters()))]['lr']
        head_lr = groups[id(next(seg.decode_head.parameters()))]['lr']
        assert unet_lr == pytest.approx(0.1 * base_lr) and head_lr == pytest.approx(base_lr)
        first = next(body.parameters())
        before = first.detach().clone()
        optim.step()
        assert not torch.equal(before, first), 'the optimizer updates the UNet / transformer'
    seg.eval()
    with torch.no_grad():
        pred = seg.predict(torch.randn(1, 3, 64, 96), samples[:1])
    assert pred[0].pred_sem_seg.data.shape == (1, 64, 96)
