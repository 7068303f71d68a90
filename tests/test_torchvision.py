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
