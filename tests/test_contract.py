"""The model contract (issue #26): one abstract base, options as objects, filters that only map keys, one img2img step."""
from __future__ import annotations

import importlib
import inspect
from types import SimpleNamespace

import pytest
import timm
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusionXLImg2ImgPipeline

import diffbackbone  # noqa: F401 (registers the models)
from diffbackbone.errors import DiffbackboneError, InputError
from diffbackbone.models import DiffusionBackbone, FusedBackbone, HeadConfig, LoraConfig, MultiBackbone, NoiseConfig
from diffbackbone.models._builder import group_kwargs
from diffbackbone.models._options import img2img_start

TINY = ['test_cleandift', 'test_dift', 'test_sdxl', 'test_deepfloyd_if', 'test_pixart', 'test_flux', 'test_ditf_flux',
        'test_sd3', 'test_hunyuan_dit']


def _family_classes() -> set[type]:
    """The class of every model this package registers (its entry point's module defines it)."""
    classes = set()
    for name in timm.list_models():
        module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
        if not module.__name__.startswith('diffbackbone.'):
            continue
        classes |= {obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
                    and obj.__module__ == module.__name__}
    return classes


def test_every_family_class_takes_at_most_12_parameters():
    classes = _family_classes()
    assert len(classes) >= 8
    sizes = {c.__name__: len(inspect.signature(c.__init__).parameters) - 1 for c in classes}
    assert max(sizes.values()) <= 12, sizes


def test_families_derive_from_the_contract_and_it_is_enforced():
    for cls in _family_classes() - {FusedBackbone, MultiBackbone}:  # compositions of the families
        assert issubclass(cls, DiffusionBackbone), cls
    assert DiffusionBackbone.__abstractmethods__ >= {'denoiser', 'prompt_tensors', 'noise_level', '_check_size',
                                                     '_denoiser_features', 'prune_intermediate_layers'}

    class Incomplete(DiffusionBackbone):  # a family that forgot its denoiser call
        denoiser = property(lambda self: None)

    with pytest.raises(TypeError, match='abstract'):
        Incomplete(None, NoiseConfig(), None, None, None)


@pytest.mark.parametrize('name', TINY + ['test_cleandift_dinov2', 'test_multi'])
def test_checkpoint_filter_fn_only_maps_keys(name, hub_cache, monkeypatch):
    """Offline, with an empty cache: the filter returns the model's own state dict as it is and changes nothing."""
    from diffbackbone import hub

    model = timm.create_model(name, pretrained=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hub, 'download', lambda *a, **k: pytest.fail('the filter downloaded'))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    out = module.checkpoint_filter_fn(dict(model.state_dict()), model)
    assert out.keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and out[k] is v or torch.equal(out[k], v), k
    assert not list(hub_cache.hf.rglob('*')) and not list(hub_cache.ours.rglob('*'))


def test_flat_arguments_become_option_objects_with_the_family_defaults():
    from diffbackbone.models import DiffusionUNet, FluxBackbone

    args = group_kwargs(FluxBackbone, dict(transformer_cfg={}, vae_cfg={}, scheduler_cfg={}, timestep=100,
                                           num_classes=3, prompt='a cat'))
    assert args['noise_cfg'].num_inference_steps == 28 and args['noise_cfg'].timestep == 100  # FLUX's 28, kept
    assert args['head_cfg'] == HeadConfig(num_classes=3) and args['prompt_cfg'].prompt == 'a cat'
    assert group_kwargs(DiffusionUNet, dict(unet_cfg={}, vae_cfg={}))['head_cfg'].head_tap == 'us6'
    with pytest.raises(InputError, match='Unknown model argument.*num_inference_steps'):
        group_kwargs(DiffusionUNet, dict(unet_cfg={}, vae_cfg={}, num_inference_steps=3))
    with pytest.raises(InputError, match='not both'):
        group_kwargs(DiffusionUNet, dict(unet_cfg={}, vae_cfg={}, head_cfg=HeadConfig(), num_classes=2))


@pytest.mark.parametrize('bad', [dict(lora_scale=float('nan')), dict(lora_scale=1e30), dict(control='canny',
                                 control_scale=float('nan')), dict(ensemble=0), dict(noise_seed=-1),
                                 dict(latent='x'), dict(timestep=float('inf')), dict(drop_rate=float('nan'))])
def test_bad_options_are_one_error(bad):
    with pytest.raises(DiffbackboneError):
        timm.create_model('test_dift', pretrained=False, **bad)
    assert LoraConfig(lora='org/x', lora_scale=0.5).lora_scale == 0.5


def _pipeline_start(pipeline: type, steps: int, t: int) -> int:
    scheduler = SimpleNamespace(timesteps=torch.arange(steps), order=1)
    timesteps, _ = pipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, t / 1000, 'cpu')
    return steps - len(timesteps)


@pytest.mark.parametrize('steps', [28, 50, 100])
def test_img2img_start_is_the_pipelines_arithmetic(steps):
    for t in range(1, 1000):  # every t
        for pipeline, whole in ((StableDiffusion3Img2ImgPipeline, False), (StableDiffusionXLImg2ImgPipeline, True)):
            want = _pipeline_start(pipeline, steps, t)
            if want == steps:  # the pipeline would not denoise at all: refused
                with pytest.raises(InputError, match='leaves no denoising step'):
                    img2img_start(steps, t, whole)
            else:
                assert img2img_start(steps, t, whole) == want, (pipeline.__name__, t)


def test_hunyuan_and_sd3_run_at_the_pipelines_timestep():
    """t=580 at 50 steps: SDXL's img2img arithmetic (Meng et al.'s HunyuanDiT pipeline) starts at timestep 541."""
    hy = timm.create_model('test_hunyuan_dit', pretrained=False, timestep=580)
    from diffbackbone.models.hunyuan import _SCHEDULER_HUNYUAN
    from diffbackbone.models.sd3 import _SCHEDULER_SD3

    scheduler = DDPMScheduler(**_SCHEDULER_HUNYUAN)
    scheduler.set_timesteps(50)
    want = scheduler.timesteps[_pipeline_start(StableDiffusionXLImg2ImgPipeline, 50, 580)]
    assert float(hy.timestep) == float(want) == 541.0
    sd3 = timm.create_model('test_sd3', pretrained=False, timestep=580)
    fm = FlowMatchEulerDiscreteScheduler(**_SCHEDULER_SD3)
    fm.set_timesteps(50)
    assert float(sd3.timestep) == float(fm.timesteps[_pipeline_start(StableDiffusion3Img2ImgPipeline, 50, 580)])
