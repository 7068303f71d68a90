"""Meng et al.'s t (issue #27.3): their `extract(t=...)` sets the pipeline's scheduler to 1000 steps and cuts it with the
img2img pipeline's own `get_timesteps(1000, t / 1000)`; the UNet runs at the first step kept. Re-implemented here with
diffusers' pipelines and schedulers built from the repos' scheduler configs as their `models.py` loads them."""
import types

import pytest
import timm
import torch
from diffusers import (
    EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline,
)

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.errors import DiffbackboneError
from diffbackbone.models import diffusion_unet as du
from golden_taps import fill_weights

# scheduler/scheduler_config.json of the repos (stable-diffusion-v1-5, stable-diffusion-2-1-base, SDXL base 1.0)
_PNDM_SD = dict(beta_end=0.012, beta_schedule='scaled_linear', beta_start=0.00085, num_train_timesteps=1000,
                set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False)
_EULER_SDXL = dict(beta_end=0.012, beta_schedule='scaled_linear', beta_start=0.00085, clip_sample=False,
                   interpolation_type='linear', num_train_timesteps=1000, prediction_type='epsilon',
                   sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                   timestep_spacing='leading', trained_betas=None, use_karras_sigmas=False)
THEIRS = {  # our model: (their pipeline class, their scheduler as models.py builds it)
    'sd15': (StableDiffusionImg2ImgPipeline, lambda: PNDMScheduler.from_config(_PNDM_SD)),
    'sd21': (StableDiffusionImg2ImgPipeline, lambda: EulerDiscreteScheduler.from_config(
        dict(_PNDM_SD, prediction_type='epsilon'))),  # their '2-1': Euler loaded from 2.1-base's PNDM config
    'sdxl': (StableDiffusionXLImg2ImgPipeline, lambda: EulerDiscreteScheduler.from_config(_EULER_SDXL)),
}


def their_unet_timestep(model: str, t: int) -> int:
    pipe_cls, scheduler = THEIRS[model]
    pipe = types.SimpleNamespace(scheduler=scheduler())
    pipe.scheduler.set_timesteps(1000, device='cpu')
    timesteps, _ = pipe_cls.get_timesteps(pipe, 1000, t / 1000, 'cpu')
    return int(timesteps[:1].item())


def test_their_t_50_is_51_49_50():
    assert [their_unet_timestep(m, 50) for m in ('sd15', 'sd21', 'sdxl')] == [51, 49, 50]


@pytest.mark.parametrize('model', ['sd15', 'sd21', 'sdxl', 'pgv2'])
def test_meng_t_gives_their_unet_timestep_for_every_t(model):
    ref = 'sdxl' if model == 'pgv2' else model
    sched = {'sd15': du._MENG_SD15, 'sd21': du._MENG_SD21, 'sdxl': du._MENG_SDXL, 'pgv2': du._MENG_SDXL}[model]
    assert [du.meng_unet_timestep(t, sched) for t in range(1, 1000)] == [their_unet_timestep(ref, t)
                                                                          for t in range(1, 1000)]
    for t in (1, 50, 580, 999):  # the models built with it
        with torch.device('meta'):
            ours = timm.create_model(model, meng_t=t)
        assert ours.noise_cfg.timestep == their_unet_timestep(ref, t) and ours.meng_timestep == t


def test_meng_t_features_are_those_of_the_unet_timestep_and_errors():
    a = timm.create_model('test_dift', meng_t=50).eval()
    b = timm.create_model('test_dift', timestep=51).eval()
    fill_weights(a), fill_weights(b)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert timm.create_model('test_sdxl', meng_t=50).timestep.item() == 50
    for kw, match in [(dict(meng_t=50, timestep=50), 'not both'), (dict(meng_t=0), 'meng_t'),
                      (dict(meng_t=50.5), 'meng_t')]:
        with pytest.raises(DiffbackboneError, match=match):
            timm.create_model('test_dift', **kw)
    with pytest.raises(DiffbackboneError, match='noisy SD'):
        timm.create_model('test_cleandift', meng_t=50)
