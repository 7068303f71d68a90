"""`unet-out` (issue #27.5): the UNet's output head as Meng et al.'s patched `UNet2DConditionModel.forward` records it
(`sample` after conv_norm_out -> conv_act -> conv_out, their 'out'), recomputed with diffusers' own UNet forward."""
import pytest
import timm
import torch
from diffusers import UNet2DConditionModel

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.errors import DiffbackboneError
from diffbackbone.models._builder import load_weights
from diffbackbone.models.diffusion_unet import checkpoint_filter_fn
from golden_taps import fill_weights


def _model(name: str, **kw):
    model = timm.create_model(name, pretrained=False, **kw).eval()
    fill_weights(model, seed=3)
    return model


def _reference(model) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**model.unet.config).eval()
    unet.load_state_dict({k[5:]: v for k, v in model.state_dict().items() if k.startswith('unet.')}, strict=True)
    return unet


@pytest.mark.parametrize('name,side', [('test_dift', 128), ('test_sdxl', 128), ('test_deepfloyd_if', 64)])
def test_unet_out_is_the_unet_output(name, side):
    model = _model(name, ensemble=2)
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=['unet-out'], intermediates_only=True)[0]
        z = model.encode(x)  # the noised latents (or pixels) of both draws, as the pass gets them
        n = z.shape[0]
        cond = dict(encoder_hidden_states=model.prompt_embeds.expand(n, -1, -1))
        if model.sdxl:
            cond['added_cond_kwargs'] = dict(text_embeds=model.pooled_prompt_embeds.expand(n, -1),
                                             time_ids=model.add_time_ids.expand(n, -1))
        out = _reference(model)(z, model.timestep, **cond).sample
    want = out.unflatten(0, (-1, 2)).mean(1)
    assert got.shape == want.shape == (2, model.unet.config.out_channels, *want.shape[2:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_head_is_pruned_unless_asked_for_and_old_state_dicts_load():
    model = _model('test_dift')
    sd = model.state_dict()
    assert 'unet.conv_out.weight' in sd  # the real UNet checkpoints hold it: kept, not filtered
    assert checkpoint_filter_fn({k[5:]: v for k, v in sd.items() if k.startswith('unet.')}, model).keys() \
        >= {'unet.conv_out.weight', 'unet.conv_norm_out.bias'}
    feats = timm.create_model('test_dift', features_only=True, out_indices=('us6',))
    assert feats.model.unet.conv_out is None and 'unet.conv_out.weight' not in feats.model.state_dict()
    with_out = timm.create_model('test_dift', features_only=True, out_indices=('us6', 'unet-out'))
    assert with_out.model.unet.conv_out is not None and with_out.feature_info.channels() == [32, 4]
    # a state dict of ours saved before the head was kept loads; unet-out then says why it is missing
    old = {k: v for k, v in sd.items() if not k.startswith(('unet.conv_out.', 'unet.conv_norm_out.'))}
    fresh = load_weights(timm.create_model('test_dift').eval(), old, checkpoint_filter_fn)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0],
                                   model.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0])
        with pytest.raises(DiffbackboneError, match='output head'):
            fresh.forward_intermediates(x, indices=['unet-out'], intermediates_only=True)
