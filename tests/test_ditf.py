"""DiTF's FLUX features: the modulated, channel-discarded block inputs against a re-computation of their method with
diffusers' own FLUX transformer forward (hooks), on tiny random weights."""
import pytest
import timm
import torch
import torch.nn as nn
from diffusers import FluxPipeline

import diffbackbone  # noqa: F401
from diffbackbone.models.ditf import DiTFFlux


def _their_features(m: DiTFFlux, x: torch.Tensor, block: int, t: int, guidance: float, channels) -> torch.Tensor:
    """Their steps: latent noised linearly to sigma = t/1000, one transformer call, the single block's input image
    tokens averaged over the draws, channels zeroed, LayerNorm (no affine), (1 + scale) * x + shift of that block."""
    tr = m.transformer
    n_double = len(tr.transformer_blocks)
    e = m.ensemble
    with torch.no_grad():
        z = m.vae(x)  # posterior mode, shifted and scaled
        b, c, h, w = z.shape
        noise = torch.randn((e, c, h, w), generator=torch.Generator().manual_seed(m.noise_seed))
        sigma = t / 1000
        zt = ((1 - sigma) * z.repeat_interleave(e, 0) + sigma * noise.repeat(b, 1, 1, 1))
        packed = FluxPipeline._pack_latents(zt, b * e, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b * e, h // 2, w // 2, 'cpu', zt.dtype)
        seen = {}
        target = tr.single_transformer_blocks[block - n_double]

        def grab(module, args, kwargs):
            seen['tokens'] = kwargs['hidden_states'].clone()
            seen['temb'] = kwargs['temb'].clone()

        handle = target.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            tr(hidden_states=packed, timestep=torch.full((b * e,), sigma), guidance=torch.full((b * e,), guidance),
               pooled_projections=m.pooled_prompt_embeds.expand(b * e, -1),
               encoder_hidden_states=m.prompt_embeds.expand(b * e, -1, -1),
               txt_ids=torch.zeros(m.prompt_embeds.shape[1], 3), img_ids=img_ids, return_dict=False)
        finally:
            handle.remove()
        tokens = seen['tokens'].unflatten(0, (b, e)).mean(1)  # (b, N, C)
        tokens[..., list(channels)] = 0.0
        tokens = nn.LayerNorm(tokens.shape[-1], elementwise_affine=False, eps=1e-6)(tokens)
        shift, scale, _ = target.norm.linear(nn.functional.silu(seen['temb'])).chunk(3, dim=1)
        shift, scale = shift[::e], scale[::e]
        feat = (1 + scale[:, None]) * tokens + shift[:, None]
        return feat.transpose(1, 2).reshape(b, -1, h // 2, w // 2)


@pytest.mark.parametrize('channels', [(3,), ()])
def test_modulated_taps_equal_their_method(channels):
    torch.manual_seed(0)
    m = timm.create_model('test_ditf_flux', latent='mode', massive_channels=channels, timestep=260).eval()
    with torch.no_grad():  # make the prompt buffers and the time embedding matter
        m.prompt_embeds.normal_()
        m.pooled_prompt_embeds.normal_()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        got3, got4 = m.forward_intermediates(x, indices=['vit-block3-in-mod', 'vit-block4-in-mod'],
                                             intermediates_only=True)
    for block, got in ((3, got3), (4, got4)):
        want = _their_features(m, x, block, 260, 3.5, channels)
        assert got.shape == want.shape == (2, 16, 4, 6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_preset_pruning_and_discard_matters():
    torch.manual_seed(0)
    m = timm.create_model('test_ditf_flux', features_only=True)  # default: every modulated block (3 levels, as timm)
    assert m.feature_info.get('name') == ['vit-block2-in-mod', 'vit-block3-in-mod', 'vit-block4-in-mod']
    assert timm.create_model('test_ditf_flux', features_only=True, out_indices='ditf').feature_info.get('name') == \
        ['vit-block4-in-mod']
    assert len(m.model.transformer.single_transformer_blocks) == 3  # block 4 is the last one: its AdaLN is needed
    pruned = timm.create_model('test_ditf_flux', features_only=True, out_indices=('vit-block3-in-mod',))
    assert len(pruned.model.transformer.single_transformer_blocks) == 2
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.manual_seed(1)
    a = timm.create_model('test_ditf_flux', latent='mode').eval()
    b = timm.create_model('test_ditf_flux', latent='mode', massive_channels=()).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        fa = a.forward_intermediates(x, indices=['vit-block4-in-mod'], intermediates_only=True)[0]
        fb = b.forward_intermediates(x, indices=['vit-block4-in-mod'], intermediates_only=True)[0]
    assert not torch.allclose(fa, fb)


def test_full_size_settings_are_theirs():
    with torch.device('meta'):  # 12B parameters: shapes only
        m = timm.create_model('ditf_flux')
    assert m.presets['ditf'] == ('vit-block28-in-mod',) and m.presets['ditf_davis'] == ('vit-block24-in-mod',)
    assert (m.massive_channels, m.guidance, m.ensemble, m.ditf_timestep) == ((154, 1446), 3.5, 8, 260)
    assert m.pretrained_cfg['input_size'] == (3, 640, 640)
    from diffbackbone.models.ditf import PRESET_SETTINGS  # eval_spair.sh / eval_davis.sh + Featurizer4Eval's caption
    assert PRESET_SETTINGS == {'ditf': dict(timestep=260, ensemble=8),
                               'ditf_davis': dict(timestep=90, ensemble=1, prompt='a photo of a image')}


def test_bad_arguments():
    with pytest.raises(ValueError, match='outside the 16 channels'):
        timm.create_model('test_ditf_flux', massive_channels=(16,))
    with pytest.raises(ValueError, match='at least 1'):
        timm.create_model('test_ditf_flux', timestep=0)
    with pytest.raises(ValueError, match='timestep'):
        timm.create_model('test_ditf_flux', timestep=2000)
