"""DiffusionBackbone options, the config checks' errors, and one end-to-end run of `python -m diffbackbone.mmseg`
(train, validate with mIoU, checkpoint, resume, test) on a synthetic dataset in ADE20K layout."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import mmseg_required  # noqa: F401  (a missing mmseg extra fails, not skips)

import timm  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from PIL import Image  # noqa: E402

from diffbackbone import TapError  # noqa: E402
from diffbackbone.mmseg import ConfigError, DiffusionBackbone  # noqa: E402
from diffbackbone.mmseg.tools import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPERNET_ADE = REPO / 'configs_mmseg/upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
FPN_ADE = REPO / 'configs_mmseg/sem_fpn/fpn_cleandift-sd21_4xb4-80k_ade20k-512x512.py'


@pytest.fixture(autouse=True)
def mmseg_scope():
    init_default_scope('mmseg')


def tiny(**kwargs) -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone('test_cleandift', pretrained=False, **kwargs)


def test_backbone_returns_the_taps_asked_for():
    bb = tiny(out_indices=('us6', 'mid'))
    ref = timm.create_model('test_cleandift', features_only=True, out_indices=('us6', 'mid'))
    assert bb.tap_names == ['us6', 'mid'] and bb.strides == [16, 64]
    assert bb.out_channels == ref.feature_info.channels()
    out = bb(torch.randn(2, 3, 64, 128))
    assert isinstance(out, tuple) and len(out) == 2
    assert [o.shape[1] for o in out] == bb.out_channels
    assert [tuple(o.shape[-2:]) for o in out] == [(4, 8), (1, 2)]
    assert all(n.startswith(('model.unet.', 'model.vae.', 'model.timestep')) for n, _ in bb.named_parameters())


def test_default_is_the_pyramid_preset_with_unet_trainable_and_vae_frozen():
    bb = tiny()
    assert bb.tap_names == ['us9', 'us6', 'us3', 'mid'] and bb.strides == [8, 16, 32, 64]
    bb.train()
    assert bb.model.unet.training and not bb.model.vae.training
    assert all(p.requires_grad for p in bb.model.unet.parameters())
    assert not any(p.requires_grad for p in bb.model.vae.parameters())
    assert not bb.model.timestep.requires_grad, 'the learned timestep keeps its trained value'
    sum(o.mean() for o in bb(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in bb.model.unet.parameters())
    assert all(p.grad is None for p in bb.model.vae.parameters())


def test_frozen_backbone_has_no_grads_and_stays_in_eval_mode():
    bb = tiny(frozen=True)
    bb.train()
    assert not bb.model.training and not any(m.training for m in bb.model.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    out = bb(torch.randn(1, 3, 64, 64, requires_grad=True))
    assert not any(o.requires_grad for o in out), 'a frozen backbone runs under no_grad'


@pytest.mark.parametrize('dtype,torch_dtype', [('bfloat16', torch.bfloat16), ('float16', torch.float16)])
def test_backbone_dtype(dtype, torch_dtype):
    x = torch.randn(1, 3, 64, 64)
    ref = tiny(frozen=True)
    bb = tiny(frozen=True, dtype=dtype)
    assert bb.model.unet.conv_in.weight.dtype == torch_dtype
    assert bb.model.timestep.dtype == torch.float32, 'the timestep stays exact'
    out, expected = bb(x), ref(x)
    for o, e in zip(out, expected):
        assert o.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(o.flatten(), e.flatten(), dim=0) > 0.99


def test_pretrained_path_loads_that_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    full = timm.create_model('test_cleandift')
    sd = {k: v.contiguous() for k, v in full.state_dict().items() if not k.startswith('head.')}
    save_file(sd, tmp_path / 'tiny.safetensors')
    bb = DiffusionBackbone('test_cleandift', pretrained=str(tmp_path / 'tiny.safetensors'))
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)


def test_unknown_model_and_tap_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown diffusion model 'cleandift_sd22'.*cleandift_sd21"):
        DiffusionBackbone('cleandift_sd22', pretrained=False)
    with pytest.raises(TapError, match=r"Unknown tap 'us99'"):
        DiffusionBackbone('test_cleandift', pretrained=False, out_indices=('us6', 'us99'))
    with pytest.raises(ValueError, match='dtype must be one of'):
        DiffusionBackbone('test_cleandift', pretrained=False, dtype='half')


@pytest.mark.parametrize('name', ['test_sdxl', 'test_deepfloyd_if', 'test_pixart', 'test_flux', 'test_ditf_flux',
                                  'test_sd3', 'test_hunyuan_dit'])
def test_every_diffusion_family_is_a_backbone(name):
    """Each family diffbackbone registers (UNets, IF, the DiTs) is listed and builds; its maps are timm's."""
    from diffbackbone.mmseg.backbone import diffusion_model_names

    assert name in diffusion_model_names()
    torch.manual_seed(0)
    bb = DiffusionBackbone(name, pretrained=False, frozen=True)
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, features_only=True, out_indices='pyramid').eval()
    assert bb.tap_names == ref.feature_info.get('name') and not any(p.requires_grad for p in bb.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        for got, want in zip(bb(x), ref(x)):
            torch.testing.assert_close(got, want)


def test_fused_models_are_refused_with_the_reason():
    from diffbackbone.mmseg.backbone import diffusion_model_names

    names = diffusion_model_names()
    assert {'cleandift_sd21', 'sd15', 'sdxl', 'deepfloyd_if', 'pixart_sigma', 'flux', 'ditf_flux', 'sd35_medium',
            'hunyuan_dit'} <= set(names)
    assert not [n for n in names if 'dinov2' in n]
    with pytest.raises(ValueError, match=r"'cleandift_sd21_dinov2' cannot be an mmseg backbone: a fused SD \+ DINOv2"):
        DiffusionBackbone('cleandift_sd21_dinov2', pretrained=False)


def _tiny_model_cfg(path: Path) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.update(model_name='test_cleandift', pretrained=False)
    return cfg


def test_mismatched_head_channels_fail_at_build():
    from mmseg.registry import MODELS

    ch = timm.create_model('test_cleandift', features_only=True).feature_info.channels()
    cfg = _tiny_model_cfg(UPERNET_ADE)  # heads still set for SD's 640/1280 channels
    with pytest.raises(ConfigError, match=rf'model\.decode_head\.in_channels=\[640, 1280, 1280, 1280\].*'
                                          rf'us9: {ch[0]} ch, stride 8.*'
                                          rf'Set model\.decode_head\.in_channels=\[{", ".join(map(str, ch))}\]'):
        MODELS.build(cfg.model)
    cfg.model.decode_head.in_channels = ch
    with pytest.raises(ConfigError, match=rf'model\.auxiliary_head\.in_channels=1280 \(in_index=1\).*'
                                          rf'in_channels={ch[1]}\.'):
        MODELS.build(cfg.model)
    cfg.model.auxiliary_head.in_channels = ch[1]
    MODELS.build(cfg.model)

    cfg = _tiny_model_cfg(FPN_ADE)
    with pytest.raises(ConfigError, match=r'model\.neck\.in_channels=\[640, 1280, 1280, 1280\]'):
        MODELS.build(cfg.model)


def test_small_crops_are_rejected_before_training():
    cfg = Config.fromfile(str(UPERNET_ADE))
    from diffbackbone.mmseg.checks import check_image_sizes

    check_image_sizes(cfg, 'train')  # the released config is fine
    cfg.model.data_preprocessor.size = (48, 48)
    cfg.train_dataloader.dataset.pipeline[3].crop_size = (48, 48)
    with pytest.raises(ConfigError, match=r'smaller than 64 px.*model\.data_preprocessor\.size gives 48 px.*'
                                          r'RandomCrop\.crop_size gives 48 px'):
        check_image_sizes(cfg, 'train')
    from mmseg.registry import MODELS

    cfg = _tiny_model_cfg(UPERNET_ADE)  # mmseg's own tools build the model without our config checks
    cfg.model.decode_head.in_channels = timm.create_model('test_cleandift', features_only=True).feature_info.channels()
    cfg.model.auxiliary_head.in_channels = cfg.model.decode_head.in_channels[1]
    cfg.model.data_preprocessor.size = (32, 512)
    with pytest.raises(ConfigError, match=r'model\.data_preprocessor\.size=\(32, 512\) is smaller than the 64 px'):
        MODELS.build(cfg.model)
    cfg = Config.fromfile(str(UPERNET_ADE))
    cfg.test_dataloader.dataset.pipeline[1].scale = (2048, 32)
    with pytest.raises(ConfigError, match=r'test_dataloader\.dataset\.pipeline: Resize\.scale gives 32 px'):
        check_image_sizes(cfg, 'test')


def test_missing_dataset_is_rejected_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative data/ade/... does not exist here
    with pytest.raises(ConfigError, match=r"train_dataloader\.dataset\.data_root points at "
                                          r"'data/ade/ADEChallengeData2016'.*--cfg-options "
                                          r"train_dataloader\.dataset\.data_root="):
        main(['train', str(UPERNET_ADE), '--work-dir', str(tmp_path / 'wd')])
    assert not (tmp_path / 'wd').exists(), 'nothing was built'
    (tmp_path / 'ade').mkdir()
    with pytest.raises(ConfigError, match=r'test_dataloader\.dataset\.data_prefix\.img_path points at '
                                          r'.*images/validation'):
        main(['test', str(UPERNET_ADE), str(UPERNET_ADE), '--cfg-options',
              f'test_dataloader.dataset.data_root={tmp_path / "ade"}'])
    with pytest.raises(FileNotFoundError, match='Checkpoint'):
        main(['test', str(UPERNET_ADE), str(tmp_path / 'missing.pth')])


# --- end to end -------------------------------------------------------------------------------------------------------
def write_ade_like(root: Path, n_train: int = 4, n_val: int = 2) -> None:
    """Images whose colour tells the class (3 classes), labels in ADE20K's png encoding (0 = ignore)."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for split, n, (h, w) in (('training', n_train, (96, 96)), ('validation', n_val, (80, 112))):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(n):
            label = np.zeros((h, w), np.uint8)
            cut = int(rng.integers(w // 4, 3 * w // 4))
            a, b = rng.choice(3, 2, replace=False)
            label[:, :cut], label[:, cut:] = a + 1, b + 1
            label[: h // 8] = 0  # an ignored band
            img = colours[np.maximum(label.astype(int) - 1, 0)] + rng.integers(-20, 20, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / 'images' / split / f'{i:03d}.jpg')
            Image.fromarray(label).save(root / 'annotations' / split / f'{i:03d}.png')


def log_lines(work_dir: Path) -> list[str]:
    logs = sorted(work_dir.glob('*/*.log'))
    assert logs, f'no log in {work_dir}'
    return logs[-1].read_text().splitlines()


def test_train_validate_resume_test_end_to_end(tmp_path, capsys):
    write_ade_like(tmp_path / 'ade')
    channels = timm.create_model('test_cleandift', features_only=True).feature_info.channels()
    # A user's config: the released UPerNet/ADE20K config, shrunk to the tiny backbone and 64 px crops.
    config = tmp_path / 'upernet_tiny_ade.py'
    config.write_text(f"""
_base_ = {str(UPERNET_ADE)!r}
data_root = {str(tmp_path / 'ade')!r}
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(model_name='test_cleandift', pretrained=False),
    decode_head=dict(in_channels={channels}, channels=32),
    auxiliary_head=dict(in_channels={channels[1]}, channels=16))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=4, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
randomness = dict(seed=0)
optim_wrapper = dict(optimizer=dict(lr=1e-3))  # UNet at 1e-4 through the config's lr_mult
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=100)]
""")
    work = tmp_path / 'work'
    runner = main(['train', str(config), '--work-dir', str(work)])
    assert runner.iter == 4
    assert (work / 'iter_2.pth').is_file() and (work / 'iter_4.pth').is_file()
    first = log_lines(work)
    train_lines = [ln for ln in first if 'Iter(train)' in ln]
    assert [re.search(r'\[\s*(\d+)/4\]', ln).group(1) for ln in train_lines] == ['1', '2', '3', '4']
    assert all(re.search(r'loss: \d+\.\d+', ln) for ln in train_lines)
    val_lines = [ln for ln in first if 'Iter(val)' in ln and 'mIoU' in ln]
    assert len(val_lines) == 2 and all(re.search(r'mIoU: \d+\.\d+', ln) for ln in val_lines)

    resumed = main(['train', str(config), '--work-dir', str(work), '--resume',
                    '--cfg-options', 'train_cfg.max_iters=6'])
    assert resumed.iter == 6 and (work / 'iter_6.pth').is_file()
    second = log_lines(work)
    assert any('resumed' in ln.lower() and 'iter: 4' in ln for ln in second), 'resumed from iteration 4'
    steps = [re.search(r'\[\s*(\d+)/6\]', ln).group(1) for ln in second if 'Iter(train)' in ln]
    assert steps == ['5', '6'], 'training went on from the checkpoint instead of starting over'

    losses = [float(re.search(r' loss: (\d+\.\d+)', ln).group(1)) for ln in first + second if 'Iter(train)' in ln]
    assert losses[-1] < losses[0], f'training does not lower the loss: {losses}'

    metrics = main(['test', str(config), str(work / 'iter_6.pth'), '--work-dir', str(tmp_path / 'test')])
    last_val = float(re.search(r'mIoU: (\d+\.\d+)', [ln for ln in second if 'Iter(val)' in ln][-1]).group(1))
    assert metrics['mIoU'] == pytest.approx(last_val, abs=0.01), 'test scores the saved weights as validation did'
    test_log = log_lines(tmp_path / 'test')
    assert any('Load checkpoint from' in ln and 'iter_6.pth' in ln for ln in test_log)
    assert any('Iter(test)' in ln and 'mIoU' in ln for ln in test_log)

    keep = ('Iter(train)', 'Iter(val)', 'Iter(test)', 'resumed', 'Saving checkpoint', 'Load checkpoint')
    with capsys.disabled():
        print('\n--- end-to-end log ---')
        for ln in first + second + test_log:
            if any(k in ln for k in keep):
                print(ln)


def test_multi_model_is_a_backbone():
    """A multi-model backbone (`test_multi`: test_sdxl + test_dift): listed, its `multi` map by default (or any of its
    taps), the maps timm's features_only gives; every member's VAE frozen and in eval mode, their UNets trained; a
    linear head on the `multi` map takes a training step."""
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    from diffbackbone.mmseg.backbone import diffusion_model_names

    assert {'test_multi', 'ours_xl_t', 'multi_diffusion'} <= set(diffusion_model_names())
    torch.manual_seed(0)
    bb = DiffusionBackbone('test_multi', pretrained=False)
    torch.manual_seed(0)
    ref = timm.create_model('test_multi', features_only=True, out_indices=('multi',)).eval()
    assert bb.tap_names == ['multi'] and bb.out_channels == ref.feature_info.channels() and bb.strides == [8]
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    bb.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb(x)[0], ref(x)[0])
    assert DiffusionBackbone('test_multi', pretrained=False, out_indices=('multi', 'test_dift:us9')).strides == [8, 16]

    cfg = Config.fromfile(str(REPO / 'configs_mmseg/linear_probe/linear_cleandift-sd21-frozen-us6_4xb4-20k_voc12aug'
                                     '-512x512.py'))
    ch = bb.out_channels[0]
    cfg.model.backbone.update(model_name='test_multi', pretrained=False, out_indices=None, frozen=False)
    cfg.model.decode_head.update(in_channels=ch, channels=ch, num_classes=3)
    seg = MODELS.build(cfg.model)
    seg.train()
    members = seg.backbone.model.models
    assert all(not m.vae.training and m.unet.training for m in members)
    sample = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
    sample.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 128, 128)))
    loss, _ = seg.parse_losses(seg.loss(x, [sample]))
    loss.backward()
    for m in members:
        assert all(p.grad is None for p in m.vae.parameters())
        assert sum(p.grad is not None for p in m.unet.parameters()) > len(list(m.unet.parameters())) // 2
