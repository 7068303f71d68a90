"""Every tap equals the activation of a plain diffusers UNet at the same point (hooks), clean and noisy recipes."""
import pytest
import timm
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models._builder import load_weights
from diffbackbone.models._base import VAE_SD, VAE_TEST


def _reference_models(model: du.DiffusionUNet, vae_cfg: dict):
    """A plain diffusers UNet and AutoencoderKL holding the backbone's weights (decoder and output head random)."""
    unet = UNet2DConditionModel(**model.unet.config).eval()
    missing, unexpected = unet.load_state_dict({k[5:]: v for k, v in model.state_dict().items() if k.startswith('unet.')},
                                               strict=False)
    assert not unexpected and all(k.startswith(('conv_norm_out', 'conv_out')) for k in missing)
    vae = AutoencoderKL(
        block_out_channels=vae_cfg['block_out_channels'], layers_per_block=vae_cfg['layers_per_block'],
        latent_channels=vae_cfg['latent_channels'], norm_num_groups=vae_cfg['norm_num_groups'],
        down_block_types=('DownEncoderBlock2D',) * len(vae_cfg['block_out_channels']),
        up_block_types=('UpDecoderBlock2D',) * len(vae_cfg['block_out_channels'])).eval()
    missing, unexpected = vae.load_state_dict({k[4:]: v for k, v in model.state_dict().items() if k.startswith('vae.')},
                                              strict=False)
    assert not unexpected and all(k.startswith(('decoder', 'post_quant_conv')) for k in missing)
    return unet, vae


def _hooked_taps(unet: UNet2DConditionModel, model: du.DiffusionUNet) -> tuple[dict, list]:
    """Forward hooks on the diffusers modules each tap names; returns the store (name -> list of outputs)."""
    store: dict[str, list] = {}
    handles = []
    for tap in model.taps:
        module = unet.get_submodule(tap.module.removeprefix('unet.'))

        def hook(mod, args, out, name=tap.name):
            store.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)
        handles.append(module.register_forward_hook(hook))
    return store, handles


def _check_clean(variant: str, size: tuple[int, int], vae_cfg: dict, atol: float):
    torch.manual_seed(0)
    model = timm.create_model(variant).eval()
    with torch.no_grad():
        model.timestep.fill_(273.5)
        model.prompt_embeds.normal_()
    unet, vae = _reference_models(model, vae_cfg)
    x = torch.rand(2, 3, *size) * 2 - 1
    store, handles = _hooked_taps(unet, model)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=list(range(len(model.taps))), intermediates_only=True)
        latent = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        unet(latent, torch.full((2,), 273.5), encoder_hidden_states=model.prompt_embeds.expand(2, -1, -1))
    for h in handles:
        h.remove()
    for tap, got in zip(model.taps, ours):
        ref = store[tap.name][0]
        assert got.shape == ref.shape, tap.name
        assert got.shape[1] == tap.num_chs
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < atol, f'{variant} tap {tap.name}: relative error {err}'


def test_clean_taps_equal_diffusers_tiny():
    _check_clean('test_cleandift', (128, 128), VAE_TEST, atol=1e-5)


def test_clean_taps_equal_diffusers_non_multiple_of_64():
    # Odd latent sizes go through the upsample_size path of diffusers' forward.
    _check_clean('test_cleandift', (136, 200), VAE_TEST, atol=1e-5)


def test_clean_taps_equal_cleandift_extractor_full_sd21_with_caption(hub_cache, tmp_path):
    """CleanDIFT's get_features(x, caption): the caption through the pipeline's encode_prompt, then the UNet; full-size
    SD2.1 UNet and VAE (random weights, fp32, small input) and a CLIP text encoder of SD2.1's width (tiny, random)."""
    from diffusers import StableDiffusionPipeline
    from fakehub import save_tiny_clip
    from transformers import CLIPTextModel, CLIPTokenizer

    caption = 'A photo of a dog'
    save_tiny_clip(tmp_path, hidden_size=1024)
    torch.manual_seed(0)
    model = timm.create_model('cleandift_sd21', prompt=caption, base_repo=str(tmp_path)).eval()
    with torch.no_grad():
        model.timestep.fill_(273.5)
    sd = model.state_dict()
    del sd['prompt_embeds']  # as in CleanDIFT's UNet-only file: the caption's embedding is computed while loading
    load_weights(model, sd, du.checkpoint_filter_fn)  # the builder's completion computes the caption's embedding
    unet, vae = _reference_models(model, VAE_SD)
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=CLIPTextModel.from_pretrained(tmp_path / 'text_encoder').eval(),
        tokenizer=CLIPTokenizer.from_pretrained(tmp_path / 'tokenizer'), scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    store, handles = _hooked_taps(unet, model)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices='cleandift', intermediates_only=True)
        ctx = pipe.encode_prompt([caption] * 2, device='cpu', num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
        latent = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        unet(latent, torch.full((2,), 273.5), encoder_hidden_states=ctx)
    for h in handles:
        h.remove()
    assert not torch.allclose(ctx[0], pipe.encode_prompt('', 'cpu', 1, False)[0][0])  # the caption matters
    names = [t.name for t in model._resolve('cleandift')]
    assert len(names) == 11
    for name, got in zip(names, ours):
        ref = store[name][0]
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, f'tap {name}: relative error {err}'


def test_noisy_taps_equal_dift_recipe():
    """DIFT: latent draw from the posterior, DDIM add_noise at t, empty prompt, ensemble averaged."""
    torch.manual_seed(0)
    seed, ensemble, t = 7, 3, 261
    model = timm.create_model('test_dift', ensemble=ensemble, noise_seed=seed, timestep=t).eval()
    with torch.no_grad():
        model.prompt_embeds.normal_()
    unet, vae = _reference_models(model, VAE_TEST)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=list(range(len(model.taps))), intermediates_only=True)
        posterior = vae.encode(x).latent_dist
        # the same draws the model documents: latent eps from seed+1, noise from seed, shared by the batch's images
        eps = torch.randn((ensemble, 4, 16, 16), generator=torch.Generator().manual_seed(seed + 1))
        noise = torch.randn((ensemble, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                  clip_sample=False, set_alpha_to_one=False)
        feats = []
        for b in range(2):
            latents = (posterior.mean[b] + posterior.std[b] * eps) * vae.config.scaling_factor
            noisy = scheduler.add_noise(latents, noise, torch.tensor(t))
            store, handles = _hooked_taps(unet, model)
            unet(noisy, t, encoder_hidden_states=model.prompt_embeds.expand(ensemble, -1, -1))
            for h in handles:
                h.remove()
            feats.append({k: v[0].mean(0) for k, v in store.items()})
    for tap, got in zip(model.taps, ours):
        ref = torch.stack([f[tap.name] for f in feats])
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, f'tap {tap.name}: relative error {err}'


def test_features_reproducible_and_batch_independent():
    model = timm.create_model('test_dift', ensemble=2).eval()
    x = torch.rand(3, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        a = model.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
        b = model.forward_intermediates(x[1:2], indices=['us6'], intermediates_only=True)[0]
        c = model.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
        other = timm.create_model('test_dift', ensemble=2, noise_seed=1).eval()
        other.load_state_dict(model.state_dict())
        d = other.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(a[1:2], b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, d), 'another noise seed must change noisy features'


def test_clean_model_is_deterministic_without_seed():
    model = timm.create_model('test_cleandift').eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        a = model.forward_features(x)
        torch.manual_seed(123)
        b = model.forward_features(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_weights_match_fp32(dtype):
    model = timm.create_model('test_cleandift', features_only=True).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        half = model.to(dtype)(x.to(dtype))
    for r, h in zip(ref, half):
        assert h.dtype == dtype
        cos = torch.nn.functional.cosine_similarity(r.flatten(), h.float().flatten(), dim=0)
        assert cos > 0.99


def test_autocast_matches_fp32():
    model = timm.create_model('test_cleandift', features_only=True, out_indices=('us6',)).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)[0]
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.float().flatten(), dim=0) > 0.99
