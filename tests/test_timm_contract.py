"""The timm model contract on the registered models, and clear errors for bad input."""
import pytest
import timm
import torch
from diffusers import UNet2DConditionModel

import diffbackbone  # noqa: F401
from diffbackbone import TapError
from diffbackbone.models import diffusion_unet as du

X = torch.rand(2, 3, 128, 128) * 2 - 1


def test_registered_models():
    names = timm.list_models()
    for name in ('cleandift_sd21', 'cleandift_sd15', 'sd21', 'sd15', 'test_cleandift', 'test_dift'):
        assert name in names
    assert timm.list_pretrained('cleandift_sd21*') == ['cleandift_sd21.compvis']


@pytest.mark.parametrize('name,size', [('cleandift_sd21', 768), ('cleandift_sd15', 512), ('sd21', 768), ('sd15', 512)])
def test_pretrained_cfg_complete(name, size):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert cfg['input_size'] == (3, size, size)
    assert cfg['mean'] == cfg['std'] == (0.5, 0.5, 0.5)  # [0, 1] -> [-1, 1]
    assert cfg['pool_size'] == (size // 16, size // 16)
    assert cfg['first_conv'] == 'vae.encoder.conv_in' and cfg['classifier'] == 'head.fc'
    assert cfg['license'] and cfg['paper_ids'] and '/' in cfg['hf_hub_id']


@pytest.mark.parametrize('name,unet_cfg', [('cleandift_sd21', du._UNET_SD21), ('cleandift_sd15', du._UNET_SD15)])
def test_full_size_architecture_loads_diffusers_state_dict_strictly(name, unet_cfg):
    with torch.device('meta'):
        model = timm.create_model(name)
        ref = UNet2DConditionModel(**unet_cfg)
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    assert len(sd) > 600
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith('vae.') or k == 'prompt_embeds'})
    sd['timestep'] = torch.tensor(261.0, device='meta')
    filtered = du.checkpoint_filter_fn(sd, model)
    model.load_state_dict(filtered, strict=True, assign=True)
    assert model.prompt_embeds.shape[-1] == unet_cfg['cross_attention_dim']
    assert sum(p.numel() for p in model.unet.parameters()) > 8e8


def test_forward_features_head_and_classifier():
    model = timm.create_model('test_cleandift', num_classes=7).eval()
    feats = model.forward_features(X)
    assert feats.shape == (2, model.num_features, 8, 8)  # head tap us6 at stride 16
    assert model(X).shape == (2, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3, 'max')
    assert model(X).shape == (2, 3)
    model.reset_classifier(0)
    assert model(X).shape == (2, model.num_features)


def test_features_only_by_name_equals_by_index():
    by_name = timm.create_model('test_cleandift', features_only=True, out_indices=('us6', 'mid', 'us10'))
    names = by_name.model.tap_names()
    by_index = timm.create_model('test_cleandift', features_only=True,
                                 out_indices=tuple(names.index(n) for n in ('us6', 'mid', 'us10')))
    by_index.load_state_dict(by_name.state_dict())
    assert [d['name'] for d in by_name.feature_info.get_dicts()] == ['us6', 'mid', 'us10']
    assert by_name.feature_info.reduction() == [16, 64, 8]
    with torch.no_grad():
        for a, b in zip(by_name.eval()(X), by_index.eval()(X)):
            torch.testing.assert_close(a, b)


def test_default_pyramid_and_presets():
    model = timm.create_model('test_cleandift', features_only=True)
    assert model.feature_info.reduction() == [8, 16, 32, 64]
    assert [d['name'] for d in model.feature_info.get_dicts()] == ['us9', 'us6', 'us3', 'mid']
    all_taps = timm.create_model('test_cleandift', features_only=True, out_indices='cleandift')
    assert len(all_taps(X)) == 11


def test_pruning_stops_after_deepest_tap():
    full = timm.create_model('test_cleandift')
    us6 = timm.create_model('test_cleandift', features_only=True, out_indices=('us6',))
    mid = timm.create_model('test_cleandift', features_only=True, out_indices=('mid',))
    assert len(us6.model.unet.up_blocks) == 2 and len(mid.model.unet.up_blocks) == 0
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(mid) < n(us6) < n(full)
    # within a block: us10 keeps only the first layer of the last up block
    us10 = timm.create_model('test_cleandift', features_only=True, out_indices=('us10',))
    assert len(us10.model.unet.up_blocks[3].resnets) == 1
    with pytest.raises(TapError, match='pruned'):
        us6.model.forward_intermediates(X, indices=['us9'], intermediates_only=True)


def test_gradients_reach_every_parameter():
    model = timm.create_model('test_cleandift', features_only=True, out_indices=(0, 'mid'))  # us12: the whole UNet
    sum(f.square().mean() for f in model(X)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert model.model.timestep.grad is not None and model.model.timestep.grad != 0
    clf = timm.create_model('test_cleandift', num_classes=4)
    clf(X).sum().backward()
    assert not [n for n, p in clf.named_parameters() if p.grad is None]


def test_grad_checkpointing_same_result():
    model = timm.create_model('test_cleandift', features_only=True, out_indices=('us6',))
    x = X.clone()
    out = model(x)[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.model.set_grad_checkpointing(True)
    out2 = model(x)[0]
    out2.square().mean().backward()
    torch.testing.assert_close(out, out2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_any_size_and_batch():
    model = timm.create_model('test_cleandift', features_only=True).eval()
    with torch.no_grad():
        for h, w in [(64, 64), (72, 136), (200, 96)]:
            feats = model(torch.rand(3, 3, h, w) * 2 - 1)
            assert [f.shape[0] for f in feats] == [3] * 4
            assert feats[0].shape[-2:] == (-(-h // 8), -(-w // 8))


def test_in_chans():
    model = timm.create_model('test_cleandift', in_chans=1, features_only=True)
    assert model(torch.rand(1, 1, 64, 64)).__len__() == 4


@pytest.mark.parametrize('x,match', [
    (torch.rand(1, 4, 128, 128), 'channels|RGB'),
    (torch.rand(1, 3, 32, 128), 'at least 64'),
    (torch.full((1, 3, 64, 64), float('nan')), 'NaN'),
    (torch.rand(3, 128, 128), 'shape'),
])
def test_bad_input_errors(x, match):
    model = timm.create_model('test_cleandift', features_only=True)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_tap_and_model_errors():
    with pytest.raises(TapError, match="Unknown tap 'us99'.*us6"):
        timm.create_model('test_cleandift', features_only=True, out_indices=('us99',))
    with pytest.raises(TapError, match='out of range'):
        timm.create_model('test_cleandift', features_only=True, out_indices=(100,))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('cleandift_sd99')
    with pytest.raises(ValueError, match='ensemble'):
        timm.create_model('test_cleandift', ensemble=4)
    with pytest.raises(ValueError, match='timestep'):
        timm.create_model('test_dift', timestep=1000)


def test_cast_keeps_learned_timestep_in_float32():
    model = timm.create_model('test_cleandift', timestep=261.3).to(torch.bfloat16)
    assert model.unet.conv_in.weight.dtype == torch.bfloat16
    assert model.timestep.dtype == torch.float32 and abs(model.timestep.item() - 261.3) < 1e-4


def test_forward_intermediates_indices_follow_timm():
    """None = every feature_info tap, int n = the last n, a sequence = those (timm's `feature_take_indices`)."""
    from timm.models._features import feature_take_indices

    model = timm.create_model('test_cleandift').eval()
    n = len(model.feature_info)
    with torch.no_grad():
        _, everything = model.forward_intermediates(X)
        last3 = model.forward_intermediates(X, indices=3, intermediates_only=True)
        picked = model.forward_intermediates(X, indices=[0, -1], intermediates_only=True)
    assert len(everything) == n == 16
    assert [f.shape[1] for f in everything] == [i['num_chs'] for i in model.feature_info]
    assert [X.shape[-1] // f.shape[-1] for f in everything] == [i['reduction'] for i in model.feature_info]
    want, _ = feature_take_indices(n, 3)
    assert all(torch.equal(a, everything[i]) for a, i in zip(last3, want))
    assert torch.equal(picked[0], everything[0]) and torch.equal(picked[1], everything[-1])
    # features_only keeps its default: the stride 8/16/32/64 pyramid, not all 16 taps
    feats = timm.create_model('test_cleandift', features_only=True)
    assert [i['name'] for i in feats.feature_info.get_dicts()] == ['us9', 'us6', 'us3', 'mid']
    assert feats.feature_info.reduction() == [8, 16, 32, 64]


@pytest.mark.parametrize('indices', [(), [], (1.5,), 1.5, (True,)])
def test_bad_out_indices_name_the_argument(indices):
    with pytest.raises(TapError, match='out_indices'):
        timm.create_model('test_cleandift', features_only=True, out_indices=indices)
    model = timm.create_model('test_cleandift')
    with pytest.raises(TapError, match='indices'):
        model.forward_intermediates(X, indices=indices)
