"""Diffusion backbones inside torchvision's detectors (tiny random-weight model, synthetic boxes)."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet

from diffbackbone.torchvision import fpn_backbone

SIZE = 128


def _targets(n: int, masks: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]]) + i
        t = dict(boxes=boxes, labels=torch.tensor([1, 2]))
        if masks:
            m = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                m[k, y1:y2, x1:x2] = 1
            t['masks'] = m
        out.append(t)
    return out


def _detector(cls, backbone, **kw):
    return cls(backbone, num_classes=3, image_mean=backbone.image_mean, image_std=backbone.image_std,
               min_size=SIZE, max_size=SIZE, **kw)


def test_backbone_contract():
    backbone = fpn_backbone('test_cleandift', out_channels=32).eval()
    assert backbone.out_channels == 32
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, SIZE, SIZE) * 2 - 1)
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [v.shape[-1] for v in out.values()] == [SIZE // s for s in (8, 16, 32, 64, 128)]
    assert all(v.shape[:2] == (2, 32) for v in out.values())
    # frozen by default: only the FPN trains
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith('fpn.') for n in trainable)


def test_trainable_blocks_and_vae_frozen():
    backbone = fpn_backbone('test_cleandift', out_channels=16, trainable=2)
    names = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert any('unet.up_blocks' in n for n in names)
    assert not any('.vae.' in n or 'time_embedding' in n or n.endswith('timestep') for n in names)
    with pytest.raises(ValueError, match='trainable must be'):
        fpn_backbone('test_cleandift', trainable=99)


@pytest.mark.parametrize('cls,masks', [(FasterRCNN, False), (MaskRCNN, True)])
def test_rcnn_train_step_and_eval(cls, masks):
    torch.manual_seed(0)
    detector = _detector(cls, fpn_backbone('test_cleandift', out_channels=32, trainable=1))
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    detector.train()
    losses = detector(images, _targets(2, masks))
    assert {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'} <= set(losses)
    if masks:
        assert 'loss_mask' in losses
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01)
    up = next(p for n, p in detector.backbone.named_parameters() if p.requires_grad and 'up_blocks' in n)
    before = up.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, up)  # gradients reach the trainable UNet blocks
    detector.eval()
    with torch.no_grad():
        preds = detector(images)
    assert len(preds) == 2 and {'boxes', 'labels', 'scores'} <= set(preds[0])
    if masks:
        assert 'masks' in preds[0]


def test_retinanet_and_keypoint_rcnn_take_it():
    images = [torch.rand(3, SIZE, SIZE)]
    for det in (_detector(RetinaNet, fpn_backbone('test_cleandift', out_channels=16)),
                _detector(KeypointRCNN, fpn_backbone('test_cleandift', out_channels=16), num_keypoints=3)):
        det.eval()
        with torch.no_grad():
            assert len(det(images)) == 1


# ---- diffusion transformers: one stride, ViTDet's simple feature pyramid -------------------------------------------
from diffbackbone.torchvision import SimpleFeaturePyramid  # noqa: E402


def test_simple_pyramid_levels_follow_vitdet():
    fpn = SimpleFeaturePyramid(16, out_channels=8, in_stride=16)
    x = torch.randn(2, 16, 6, 4)
    from collections import OrderedDict

    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    fpn.extra_blocks = LastLevelMaxPool()
    out = fpn(OrderedDict([('0', x)]))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)]
    # stride 4: two deconvolutions halving the channels (LN + GELU between); stride 32: max pooling
    deconvs = [m for m in fpn.stages[0] if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(d.in_channels, d.out_channels) for d in deconvs] == [(16, 8), (8, 4)]
    assert isinstance(fpn.stages[3][0], torch.nn.MaxPool2d) and isinstance(fpn.stages[2][0], torch.nn.Conv2d)


def test_dit_takes_the_simple_pyramid_and_trains_faster_rcnn():
    torch.manual_seed(0)
    backbone = fpn_backbone('test_pixart', out_channels=16)
    assert backbone.neck == 'simple' and isinstance(backbone.fpn, SimpleFeaturePyramid)
    assert backbone.inputs == [3]  # the deepest 'pyramid' tap: the last block
    with torch.no_grad():
        out = backbone.eval()(torch.rand(1, 3, SIZE, SIZE) * 2 - 1)
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [v.shape[-1] for v in out.values()] == [SIZE // s for s in (4, 8, 16, 32, 64)]
    detector = _detector(FasterRCNN, backbone)
    detector.train()
    losses = detector([torch.rand(3, SIZE, SIZE) for _ in range(2)], _targets(2))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith('fpn.') for n in grads)
    for level in range(4):  # every level of the pyramid gets a gradient
        g = [v for n, v in grads.items() if n.startswith(f'fpn.stages.{level}.')]
        assert g and all(v is not None and v.abs().sum() > 0 for v in g), level


def test_dit_trainable_blocks_get_gradients_and_concatenated_taps():
    torch.manual_seed(0)
    backbone = fpn_backbone('test_pixart', out_channels=16, trainable=1, taps=['vit-block1-out', 'vit-block2-out'])
    assert backbone.fpn.stages[2][0].in_channels == 32  # two 16-channel taps concatenated
    names = {n for n, p in backbone.named_parameters() if p.requires_grad and not n.startswith('fpn.')}
    assert names and all('transformer_blocks.2.' in n for n in names)  # blocks after the deepest tap were pruned
    detector = _detector(FasterRCNN, backbone).train()
    sum(detector([torch.rand(3, SIZE, SIZE)], _targets(1)).values()).backward()
    block = dict(backbone.named_parameters())
    assert all(block[n].grad is not None and block[n].grad.abs().sum() > 0 for n in names if n.endswith('weight'))
    flux = fpn_backbone('test_flux', out_channels=8, trainable=2, num_inference_steps=20)  # one pass: pruned
    assert flux.neck == 'simple' and flux.inputs == [3]
    names = {n.split('.')[4] for n, p in flux.named_parameters() if p.requires_grad and not n.startswith('fpn.')}
    assert names == {'1', '2'}  # the last two single-stream blocks (2 double + 3 single)
    mmdit = fpn_backbone('test_sd3', out_channels=8, trainable=1)
    assert mmdit.neck == 'simple' and {n.split('.')[4] for n, p in mmdit.named_parameters()
                                       if p.requires_grad and not n.startswith('fpn.')} == {'3'}
    hunyuan = fpn_backbone('test_hunyuan_dit', out_channels=8, trainable=2)
    assert {n.split('.')[4] for n, p in hunyuan.named_parameters()
            if p.requires_grad and not n.startswith('fpn.')} == {'4', '5'}  # transformer.blocks
    with pytest.raises(ValueError, match='taps of one stride'):
        fpn_backbone('test_cleandift', neck='simple')
    with pytest.raises(ValueError, match='neck must be one of'):
        fpn_backbone('test_pixart', neck='vitdet')


def test_unet_takes_the_simple_pyramid_on_one_tap():
    backbone = fpn_backbone('test_cleandift', out_channels=8, taps=['us6'])
    assert backbone.neck == 'simple'
    with torch.no_grad():
        out = backbone.eval()(torch.rand(1, 3, SIZE, SIZE) * 2 - 1)
    assert [v.shape[-1] for v in out.values()] == [SIZE // s for s in (4, 8, 16, 32, 64)]


def test_multi_model_backbone():
    """A multi-model backbone (`test_multi`): by default its `multi` map (one stride, 8) through ViTDet's simple
    pyramid, equal to the model's own map; `trainable` trains the last blocks of every member; a FasterRCNN step."""
    import timm

    from diffbackbone.models.multi import MULTI_TAP

    torch.manual_seed(0)
    backbone = fpn_backbone('test_multi', out_channels=16).eval()
    assert backbone.neck == 'simple' and backbone.body.feature_info.get('name') == [MULTI_TAP]
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    torch.manual_seed(0)
    ref = timm.create_model('test_multi').eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone.body(x)[0], ref.forward_features(x))
        out = backbone(x)
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [v.shape[-1] for v in out.values()] == [SIZE // s for s in (4, 8, 16, 32, 64)]
    with pytest.raises(ValueError, match='of each member'):
        fpn_backbone('test_multi', trainable=99)
    detector = _detector(FasterRCNN, fpn_backbone('test_multi', out_channels=16, trainable=1))
    names = {n for n, p in detector.backbone.named_parameters() if p.requires_grad}
    assert {n.split('.')[3] for n in names if n.startswith('body.model.models.')} == {'0', '1'}  # both members
    assert not any('.vae.' in n for n in names)
    detector.train()
    losses = detector([torch.rand(3, SIZE, SIZE)], _targets(1))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
