"""ControlNet conditioning (`control='canny' | 'depth'`): every tap against diffusers' ControlNetModel residuals added
to diffusers' UNet (Meng et al.'s controlnet.py steps) on a control image computed here (Canny edges; the DPT depth map
as diffusers' depth ControlNet docs make it), ControlNets and the depth estimator served by the fake Hub; mismatches
refused."""
import cv2
import numpy as np
import pytest
import timm
import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

import diffbackbone  # noqa: F401
from diffbackbone.data.images import load_image
from diffbackbone.models import diffusion_unet as du
from test_inversion import _diffusers_weights

REPOS = {'test_dift': 'diffbackbone/test-controlnet', 'test_sdxl': 'diffbackbone/test-controlnet-sdxl'}
DPT_REPO = 'diffbackbone/test-dpt'


@pytest.fixture(scope='module')
def dpt_folder(tmp_path_factory, fake_hub):
    """A tiny random DPT depth estimator and its image processor, saved by transformers and served by the fake Hub."""
    torch.manual_seed(5)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 16],
                    fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    folder = tmp_path_factory.mktemp('dpt')
    DPTForDepthEstimation(cfg).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={'height': 32, 'width': 32}, keep_aspect_ratio=False, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(folder)
    fake_hub.add_folder(DPT_REPO, folder)
    return folder


def _depth_reference(folder, images):
    """diffusers' depth ControlNet recipe with transformers' own loaders: DPT depth, bicubic to the image size, min-max
    per image, three channels."""
    processor, dpt = DPTImageProcessor.from_pretrained(folder), DPTForDepthEstimation.from_pretrained(folder).eval()
    pil = [Image.open(p).convert('RGB') for p in images]
    depth = dpt(**processor(images=pil, return_tensors='pt')).predicted_depth.unsqueeze(1)
    depth = torch.nn.functional.interpolate(depth, size=pil[0].size[::-1], mode='bicubic', align_corners=False)
    lo, hi = torch.amin(depth, dim=[1, 2, 3], keepdim=True), torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    return torch.cat([(depth - lo) / (hi - lo)] * 3, dim=1)


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


@pytest.mark.parametrize('control', ['canny', 'depth'])
@pytest.mark.parametrize('name', list(REPOS))
def test_controlled_taps_equal_diffusers_controlnet_residuals(name, control, controlnets, dpt_folder, hub_cache,
                                                              tmp_path):
    unet, vae, sd, cond, path = _diffusers_weights(name, tmp_path)
    extra = dict(depth_repo=DPT_REPO) if control == 'depth' else {}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), ensemble=1,
                              latent='mode', timestep=200, control=control, control_repo=REPOS[name], **extra).eval()
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
        if control == 'canny':
            image = []
            for p in images:
                edges = cv2.Canny(np.array(Image.open(p).convert('RGB')), 100, 200)
                image.append(torch.from_numpy(np.stack([edges] * 3)).float() / 255)
            image = torch.stack(image)
            assert image.sum() > 100  # edges were found: the control image carries information
        else:
            image = _depth_reference(dpt_folder, images)
            assert image.shape == (2, 3, 128, 128) and (image.flatten(1).std(1) > 0.05).all()  # a depth map, not flat
            assert not torch.allclose(image[0], image[1], atol=0.05)  # of each image
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(0))  # the model's seed-0 draw
        z = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear').add_noise(
            z, noise.expand_as(z), torch.tensor(200))
        ctx = sd['prompt_embeds'].expand(2, -1, -1)
        ref_cond = {k: {n: v.expand(2, -1) for n, v in c.items()} for k, c in cond.items()}
        down, mid = controlnets[name](z, 200, encoder_hidden_states=ctx, controlnet_cond=image, conditioning_scale=1,
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
        assert err < 1e-4, f'{name} {control} tap {tap.name}: relative error {err}'
    assert not torch.allclose(uncontrolled, ours[[t.name for t in model.taps].index('us9')], atol=1e-3)


def test_controlnet_of_another_architecture_and_bad_values_are_refused(controlnets, dpt_folder, hub_cache):
    with pytest.raises(ValueError, match='another architecture'):
        timm.create_model('test_dift', control='canny', control_repo=REPOS['test_sdxl'])
    with pytest.raises(ValueError, match='default ControlNet for SD1.5 and SDXL only'):
        timm.create_model('test_dift', control='canny')
    with pytest.raises(ValueError, match='control must be one of'):
        timm.create_model('test_dift', control='segmentation')
    with pytest.raises(ValueError, match="depth_repo needs control='depth'"):
        timm.create_model('test_dift', control='canny', control_repo=REPOS['test_dift'], depth_repo=DPT_REPO)
    with pytest.raises(ValueError, match='another architecture'):
        timm.create_model('test_dift', control='depth', control_repo=REPOS['test_sdxl'], depth_repo=DPT_REPO)
    with pytest.raises(ValueError, match='not a DPT depth estimator'):  # a ControlNet given as the depth estimator
        timm.create_model('test_dift', control='depth', control_repo=REPOS['test_dift'], depth_repo=REPOS['test_dift'])
    with pytest.raises(Exception, match='Intel/dpt-hybrid-midas'):  # the default estimator (not on the fake Hub)
        timm.create_model('test_dift', control='depth', control_repo=REPOS['test_dift'])
    with pytest.raises(ValueError, match="control_repo needs control='canny'"):
        timm.create_model('test_dift', control_repo=REPOS['test_dift'])
    with torch.device('meta'):
        for model, control, repo in (('sd15', 'canny', 'lllyasviel/sd-controlnet-canny'),
                                     ('sdxl', 'canny', 'diffusers/controlnet-canny-sdxl-1.0'),
                                     ('sd15', 'depth', 'lllyasviel/sd-controlnet-depth'),
                                     ('sdxl', 'depth', 'diffusers/controlnet-depth-sdxl-1.0')):
            with pytest.raises(Exception, match=repo):  # their default repo is the one asked for (not on the fake Hub)
                timm.create_model(model, control=control)
