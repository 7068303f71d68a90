"""ControlNet conditioning (`control='canny'`): every tap against diffusers' ControlNetModel residuals added to
diffusers' UNet (Meng et al.'s controlnet.py steps), the ControlNet served by the fake Hub; mismatches refused."""
import cv2
import numpy as np
import pytest
import timm
import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone.data.images import load_image
from diffbackbone.models import diffusion_unet as du
from test_inversion import _diffusers_weights

REPOS = {'test_dift': 'diffbackbone/test-controlnet', 'test_sdxl': 'diffbackbone/test-controlnet-sdxl'}


@pytest.fixture(scope='module')
def controlnets(tmp_path_factory, fake_hub):
    """Tiny ControlNets made from tiny UNets of each layout (random, non-zero zero-convs), saved as diffusers does."""
    out = {}
    for name, cfg in (('test_dift', du._UNET_TEST), ('test_sdxl', du._UNET_TEST_SDXL)):
        torch.manual_seed(11)
        cn = ControlNetModel.from_unet(UNet2DConditionModel(**cfg), conditioning_embedding_out_channels=(8, 16, 16, 16))
        with torch.no_grad():
            for p in cn.parameters():
                if (p == 0).all():
                    p.normal_(0, 0.05)  # the zero convolutions of an untrained ControlNet would add nothing
        folder = tmp_path_factory.mktemp(name)
        cn.save_pretrained(folder, safe_serialization=True)
        fake_hub.add_folder(REPOS[name], folder)
        out[name] = cn.eval()
    return out


@pytest.mark.parametrize('name', list(REPOS))
def test_controlled_taps_equal_diffusers_controlnet_residuals(name, controlnets, hub_cache, tmp_path):
    unet, vae, sd, cond, path = _diffusers_weights(name, tmp_path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), ensemble=1,
                              latent='mode', timestep=200, control='canny', control_repo=REPOS[name]).eval()
    images = []
    for i in range(2):  # shapes with edges for Canny to find
        a = np.full((128, 128, 3), 30 + 100 * i, np.uint8)
        a[32:96, 40 - 8 * i:90] = (220, 60 + 50 * i, 20)
        images.append(tmp_path / f'{i}.png')
        Image.fromarray(a).save(images[-1])
    x = torch.stack([load_image(p, 128) for p in images])
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=list(range(len(model.taps))), intermediates_only=True)
        # the reference: their steps with diffusers' modules
        control = []
        for p in images:
            edges = cv2.Canny(np.array(Image.open(p).convert('RGB')), 100, 200)
            control.append(torch.from_numpy(np.stack([edges] * 3)).float() / 255)
        control = torch.stack(control)
        assert control.sum() > 100  # edges were found: the control image carries information
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(0))  # the model's seed-0 draw
        z = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear').add_noise(
            z, noise.expand_as(z), torch.tensor(200))
        ctx = sd['prompt_embeds'].expand(2, -1, -1)
        ref_cond = {k: {n: v.expand(2, -1) for n, v in c.items()} for k, c in cond.items()}
        down, mid = controlnets[name](z, 200, encoder_hidden_states=ctx, controlnet_cond=control, conditioning_scale=1,
                                      guess_mode=False, return_dict=False, **ref_cond)
        store, handles = {}, []
        for tap in model.taps:
            def hook(mod, args, out, name=tap.name):
                store.setdefault(name, out[0] if isinstance(out, tuple) else out)
            handles.append(unet.get_submodule(tap.module.removeprefix('unet.')).register_forward_hook(hook))
        unet(z, 200, encoder_hidden_states=ctx, down_block_additional_residuals=down,
             mid_block_additional_residual=mid, **ref_cond)
        for h in handles:
            h.remove()
        plain = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), ensemble=1,
                                  latent='mode', timestep=200).eval()
        uncontrolled = plain.forward_intermediates(x, indices=['us9'], intermediates_only=True)[0]
    for tap, got in zip(model.taps, ours):
        err = (got - store[tap.name]).abs().max().item() / store[tap.name].abs().max().item()
        assert err < 1e-4, f'{name} tap {tap.name}: relative error {err}'
    assert not torch.allclose(uncontrolled, ours[[t.name for t in model.taps].index('us9')], atol=1e-3)


def test_controlnet_of_another_architecture_and_bad_values_are_refused(controlnets, hub_cache):
    with pytest.raises(ValueError, match='another architecture'):
        timm.create_model('test_dift', control='canny', control_repo=REPOS['test_sdxl'])
    with pytest.raises(ValueError, match='default ControlNet for SD1.5 and SDXL only'):
        timm.create_model('test_dift', control='canny')
    with pytest.raises(ValueError, match='control must be one of'):
        timm.create_model('test_dift', control='depth')
    with pytest.raises(ValueError, match="control_repo needs control='canny'"):
        timm.create_model('test_dift', control_repo=REPOS['test_dift'])
    with torch.device('meta'):
        for model, repo in (('sd15', 'lllyasviel/sd-controlnet-canny'), ('sdxl', 'diffusers/controlnet-canny-sdxl-1.0')):
            with pytest.raises(Exception, match=repo):  # their default repo is the one asked for (not on the fake Hub)
                timm.create_model(model, control='canny')
