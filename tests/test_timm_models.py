"""timm's per-model checks on every tiny model this package registers (issue #30.10).

Written here after the assertions of timm's own `tests/test_models.py`: forward, backward, default cfgs (spatial models;
transformers that return tokens get timm's non-spatial variant), features_only, forward_intermediates and features_only
through timm's 'getter' wrapper. Inputs are sized as timm sizes them (`_input_size`): the pretrained cfg's
`input_size`, or its `min_input_size` where the test's target size is smaller.
"""
import math

import pytest
import timm
import torch
from timm.models import FeatureInfo, VisionTransformer, model_entrypoint

import diffbackbone  # noqa: F401  (registers the models)

TINY = sorted(n for n in timm.list_models('test_*') if model_entrypoint(n).__module__.startswith('diffbackbone.'))
FWD_TARGET, BWD_TARGET, FEAT_TARGET = 384, 128, 96  # timm's TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_FFEAT_SIZE


def _input_size(name: str, target: int) -> tuple[int, ...]:
    """timm's `_get_input_size`: the cfg's input size, else its minimum (or the size clipped) above `target`."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg.fixed_input_size or max(cfg.input_size) <= target:
        return cfg.input_size
    return cfg.min_input_size or tuple(min(s, target) for s in cfg.input_size)


def _inputs(name: str, target: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *_input_size(name, target)), generator=gen).clamp(-1, 1)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _check_maps(maps, channels, reductions, x: torch.Tensor) -> None:
    """timm's check of feature maps against `feature_info`: channels, at most ceil(size / reduction) + 1 positions."""
    assert len(maps) == len(channels) >= 3  # timm: at least 3 default feature levels
    assert reductions == sorted(reductions)  # fine to coarse
    for c, r, m in zip(channels, reductions, maps):
        assert m.shape[:2] == (x.shape[0], c)
        assert m.shape[2] <= math.ceil(x.shape[2] / r) + 1 and m.shape[3] <= math.ceil(x.shape[3] / r) + 1
        assert torch.isfinite(m).all()


def test_every_tiny_model_is_covered():
    assert len(TINY) == 12
    assert {'test_cleandift', 'test_cleandift_dinov2', 'test_dinov2', 'test_ditf_flux', 'test_multi'} <= set(TINY)


@pytest.mark.parametrize('name', TINY)
def test_model_forward(name):
    model = _create(name).eval()
    x = _inputs(name, FWD_TARGET)
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1 and torch.isfinite(out).all()
        model.set_grad_checkpointing()  # supported by every model here: the output does not change
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', TINY)
def test_model_backward(name):
    model = _create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(_inputs(name, BWD_TARGET, batch=2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'No gradient for {missing[:5]}'
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert out.shape == (2, 42) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', TINY)
def test_model_default_cfgs(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert {'input_size', 'mean', 'std', 'first_conv', 'classifier', 'crop_pct', 'interpolation'} <= set(cfg)
    x = _inputs(name, max(cfg['input_size']))  # timm: the cfg's own input size (up to 448)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        if isinstance(model, VisionTransformer):  # timm's non-spatial variant: tokens (B, N, C)
            assert feats.shape[-1] == model.num_features
        else:
            assert feats.shape[1] == model.num_features and feats.shape[2:] == cfg['pool_size']
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape
        if not isinstance(model, VisionTransformer):
            model.reset_classifier(0, '')  # no pooling: the unpooled map
            assert model(x).shape[2:] == cfg['pool_size']
            unpooled = _create(name, num_classes=0, global_pool='').eval()
            assert unpooled(x).shape[2:] == cfg['pool_size']
    # the cfg's module names: a classifier's layer (with classes) and the first convolution hold weights
    state = _create(name, num_classes=3).state_dict()
    for key in ('classifier', 'first_conv'):
        for module in (cfg[key],) if isinstance(cfg[key], str) else cfg[key]:
            assert module + '.weight' in state, f'{key} {module!r} is not a module with weights'


@pytest.mark.parametrize('name', TINY)
def test_model_forward_features(name):
    """features_only with the model's default out_indices."""
    model = _create(name, features_only=True).eval()
    x = _inputs(name, FEAT_TARGET)
    with torch.no_grad():
        maps = model(x)
    _check_maps(maps, model.feature_info.channels(), model.feature_info.reduction(), x)


@pytest.mark.parametrize('name', TINY)
def test_model_forward_intermediates_features(name):
    """features_only through timm's 'getter' wrapper (prune, then `forward_intermediates`), asked for by name."""
    model = _create(name, features_only=True, feature_cls='getter').eval()
    x = _inputs(name, FEAT_TARGET)
    with torch.no_grad():
        maps = model(x)
    _check_maps(maps, model.feature_info.channels(), model.feature_info.reduction(), x)


@pytest.mark.parametrize('name', TINY)
def test_model_forward_intermediates(name):
    model = _create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _inputs(name, FEAT_TARGET)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt='NCHW')
        _check_maps(maps, info.channels(), info.reduction(), x)
        torch.testing.assert_close(model.forward_features(x), final)
        last = model.forward_intermediates(x, indices=2, intermediates_only=True)  # an int: the last n
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x)
    assert len(last) == 2 and all(torch.equal(a, b) for a, b in zip(last, maps[-2:]))
    assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[-1])
    torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)
