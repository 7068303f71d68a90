"""DDIM inversion as the noising (`noise='ddim_inversion'`): every tap against diffusers' own UNet driven by
diffusers' DDIMInverseScheduler by hand (Meng et al.'s ddim_inversion.py loop), weights loaded from a diffusers file."""
import pytest
import timm
import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, UNet2DConditionModel
from safetensors.torch import save_file

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.models import _base as backbone, diffusion_unet as du
from diffbackbone.models.conditioning.inversion import inversion_timesteps

CASES = {'test_dift': (du._UNET_TEST, backbone.VAE_TEST), 'test_sdxl': (du._UNET_TEST_SDXL, du._VAE_TEST_SDXL)}


def _diffusers_weights(name: str, tmp_path, seed: int = 0):
    """A diffusers UNet (with its output head) and VAE of the tiny layout, and our checkpoint file made of them."""
    unet_cfg, vae_cfg = CASES[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg).eval()
    n = len(vae_cfg['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=vae_cfg['block_out_channels'], layers_per_block=vae_cfg['layers_per_block'],
                        latent_channels=4, norm_num_groups=vae_cfg['norm_num_groups'],
                        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
                        scaling_factor=vae_cfg['scaling_factor']).eval()
    sd = {'unet.' + k: v for k, v in unet.state_dict().items()}
    sd.update(backbone.vae_keys(vae.state_dict()))
    sd['prompt_embeds'] = torch.randn(1, 77, unet_cfg['cross_attention_dim'])
    cond = {}
    if unet_cfg.get('addition_embed_type') == 'text_time':
        sd['pooled_prompt_embeds'] = torch.randn(1, unet_cfg['projection_class_embeddings_input_dim']
                                                 - 6 * unet_cfg['addition_time_embed_dim'])
        cond = dict(added_cond_kwargs=dict(text_embeds=sd['pooled_prompt_embeds'],
                                           time_ids=torch.tensor([[1024., 1024, 0, 0, 1024, 1024]])))
    path = tmp_path / f'{name}.safetensors'
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return unet, vae, sd, cond, path


@pytest.mark.parametrize('name', list(CASES))
def test_inverted_taps_equal_diffusers_inverse_scheduler(name, tmp_path):
    steps, t_feat = 20, 151
    unet, vae, sd, cond, path = _diffusers_weights(name, tmp_path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              noise='ddim_inversion', inversion_steps=steps, timestep=t_feat).eval()
    assert model.ensemble == 1 and model.latent == 'mode'
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    taps = list(range(len(model.taps)))
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=taps, intermediates_only=True)
        # the reference: diffusers' modules and scheduler, the loop of Meng et al.'s ddim_inversion.py
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        sched = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(steps)
        ctx = sd['prompt_embeds'].expand(2, -1, -1)
        ref_cond = {k: {n: v.expand(2, -1) for n, v in c.items()} for k, c in cond.items()}
        walked = []
        for t in sched.timesteps[1:]:
            eps = unet(z, t, encoder_hidden_states=ctx, **ref_cond).sample
            z = sched.step(eps, t, z).prev_sample
            walked.append(int(t))
            if t >= t_feat:
                break
        store, handles = {}, []
        for tap in model.taps:
            def hook(mod, args, out, name=tap.name):
                store.setdefault(name, out[0] if isinstance(out, tuple) else out)
            handles.append(unet.get_submodule(tap.module.removeprefix('unet.')).register_forward_hook(hook))
        unet(z, t_feat, encoder_hidden_states=ctx, **ref_cond)
        for h in handles:
            h.remove()
    assert walked == inversion_timesteps(backbone.SCHEDULER_SD, steps, t_feat) == [51, 101, 151]
    for tap, got in zip(model.taps, ours):
        ref = store[tap.name]
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, f'{name} tap {tap.name}: relative error {err}'


def test_inversion_is_deterministic_keeps_the_whole_unet_and_checks_its_settings(tmp_path):
    *_, path = _diffusers_weights('test_dift', tmp_path)
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), noise='ddim_inversion', inversion_steps=10)
    full = timm.create_model('test_dift', **kw).eval()
    pruned = timm.create_model('test_dift', features_only=True, out_indices=('us6',), **kw).eval()
    assert pruned.model.unet.conv_out is not None and len(pruned.model.unet.up_blocks) == 4  # the inversion needs all
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        a = full.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
        torch.testing.assert_close(full.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0], a,
                                   rtol=0, atol=0)
        torch.testing.assert_close(pruned(x)[0], a)
        noisy = timm.create_model('test_dift', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  ensemble=1).eval()  # the same file loads into a DDPM model, its output head kept
        assert noisy.unet.conv_out is not None  # the unet-out tap (issue #27.5)
        assert not torch.allclose(noisy.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0], a)
    for bad, match in [(dict(ensemble=4), 'ensemble must be 1'), (dict(inversion_steps=1), 'inversion_steps'),
                       (dict(noise='ddim'), 'noise must be one of')]:
        with pytest.raises(ValueError, match=match):
            timm.create_model('test_dift', **{'noise': 'ddim_inversion', **bad})
    with pytest.raises(ValueError, match='clean model takes no noise'):
        timm.create_model('test_cleandift', noise='ddim_inversion')
