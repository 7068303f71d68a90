"""DeepFloyd IF stage I: the full-size architecture on the meta device, a tiny repo through the fake Hub, the prompt,
pixel-space noise and taps against diffusers' own IFImg2ImgPipeline run as Meng et al. run it (its first UNet call)."""
import numpy as np
import pytest
import timm

from diffbackbone.models._builder import check_keys
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone.models import deepfloyd_if as dif
from diffbackbone.models.diffusion_unet import checkpoint_filter_fn
from test_newer_models import _tiny_t5_repo

REPO = 'diffbackbone/test-if'


class _FirstCallDone(Exception):
    """Raised after the pipeline's first UNet call: Meng et al. keep that call's activations only."""


@pytest.fixture(scope='module')
def tiny_repo(tmp_path_factory, fake_hub):
    folder = tmp_path_factory.mktemp('if')
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**dif._IF_TEST).eval()
    unet.save_pretrained(folder / 'unet', safe_serialization=True, variant='fp16')
    _tiny_t5_repo(folder)
    DDPMScheduler(**dif._SCHEDULER_IF).save_config(folder / 'scheduler')
    for sub in ('unet', 'tokenizer', 'text_encoder', 'scheduler'):
        fake_hub.add_folder(REPO, folder / sub, prefix=sub)
    return folder, unet


def test_full_size_loads_diffusers_state_dict_strictly():
    with torch.device('meta'):
        model = timm.create_model('deepfloyd_if')
        ref = UNet2DConditionModel(**dif._IF_I_L)
    assert sum(p.numel() for p in ref.parameters()) == pytest.approx(0.9e9, rel=0.05)  # "IF-I-L: 900M"
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    assert 'encoder_hid_proj.weight' in sd and 'add_embedding.pool.q_proj.weight' in sd
    assert 'down_blocks.1.attentions.0.add_k_proj.weight' in sd and 'up_blocks.0.upsamplers.0.conv2.weight' in sd
    sd['prompt_embeds'] = model.prompt_embeds
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True, assign=True)
    assert model.vae is None and model.prompt_embeds.shape == (1, 77, 4096)
    assert model.meng_timestep == 50 and timm.create_model('test_deepfloyd_if').timestep.item() == 49
    assert timm.create_model('test_deepfloyd_if', timestep=261).timestep.item() == 260
    names = {n for t in model.all_taps for n in (t.name, *t.aliases)}  # Meng et al.'s names are all accepted
    assert len(model.all_taps) == 163  # unet-out included
    for name in ('unet-in', 'down-level0-downsampler-increment', 'down-level1-repeat2-vit-block0-cross-q',
                 'mid-vit-block0-cross-v', 'mid-vit-out', 'up-level0-upsampler-out', 'up-level3-repeat3-res-out'):
        assert name in names, name
    info = {f['name']: f for f in model.feature_info}
    assert info['us16']['reduction'] == 1 and info['mid']['reduction'] == 8 and info['mid']['num_chs'] == 1280
    del sd['down_blocks.1.attentions.0.to_q.weight']
    with pytest.raises(RuntimeError, match='1 missing keys'):  # the builder's key check after the filter
        check_keys(checkpoint_filter_fn(sd, model), model)


_TAPS = {  # tap: (module path in the UNet, what the hook keeps)
    'unet-after-conv-in': ('conv_in', 'out'),
    'down-level0-repeat1-res-increment': ('down_blocks.0.resnets.1.conv2', 'out'),
    'down-level0-downsampler-increment': ('down_blocks.0.downsamplers.0.conv2', 'out'),
    'down-level0-downsampler-out': ('down_blocks.0.downsamplers.0', 'out'),
    'down-level1-repeat0-vit-block0-cross-q': ('down_blocks.1.attentions.0.to_q', 'tokens'),
    'down-level2-repeat2-vit-out': ('down_blocks.2.attentions.2', 'out'),
    'mid-vit-block0-cross-k': ('mid_block.attentions.0.to_k', 'tokens'),
    'mid': ('mid_block', 'out'),
    'up-level0-repeat2-vit-block0-cross-v': ('up_blocks.0.attentions.2.to_v', 'tokens'),
    'up-level1-upsampler-increment': ('up_blocks.1.upsamplers.0.conv2', 'out'),
    'up-level1-upsampler-out': ('up_blocks.1.upsamplers.0', 'out'),
    'up-level3-repeat3-res-out': ('up_blocks.3.resnets.3', 'out'),
}


def test_prompt_noise_and_taps_equal_diffusers_img2img(tiny_repo, hub_cache):
    """The tiny model from the Hub against IFImg2ImgPipeline run as Meng et al. run it: 1000 steps cut by strength
    0.05, no guidance, their prompt preprocessing (clean_caption=False); the taps of its FIRST UNet call, the image
    noised with the same seeded draw."""
    from diffusers import IFImg2ImgPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    folder, unet = tiny_repo
    pipe = IFImg2ImgPipeline(tokenizer=AutoTokenizer.from_pretrained(folder / 'tokenizer'),
                             text_encoder=T5EncoderModel.from_pretrained(folder / 'text_encoder').eval(), unet=unet,
                             scheduler=DDPMScheduler.from_pretrained(folder / 'scheduler'), safety_checker=None,
                             feature_extractor=None, watermarker=None, requires_safety_checker=False)
    prompt = '  A Photo of a DOG '
    model = timm.create_model('test_deepfloyd_if', pretrained=True, prompt=prompt).eval()
    embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False)
    assert embeds.shape == (1, 77, 32)
    torch.testing.assert_close(model.prompt_embeds, embeds)
    # IF lower-cases and strips the prompt: the raw text would tokenize otherwise
    assert pipe.tokenizer(prompt).input_ids != pipe.tokenizer('a photo of a dog').input_ids
    torch.testing.assert_close(model.prompt_tensors('a photo of a dog')['prompt_embeds'], embeds)

    calls, recorded = [], {}

    def first_call(module, args, kwargs):
        if calls:
            raise _FirstCallDone
        calls.append((args, kwargs))

    def keep(name, value):
        recorded.setdefault(name, value)  # the first call's only

    hooks = [pipe.unet.register_forward_pre_hook(first_call, with_kwargs=True)]
    for name, (path, kind) in _TAPS.items():
        hooks.append(pipe.unet.get_submodule(path).register_forward_hook(
            lambda m, a, o, n=name: keep(n, o)))
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    with torch.no_grad(), pytest.raises(_FirstCallDone):
        pipe('  A Photo of a DOG ', image=image, strength=0.05, num_inference_steps=1000, guidance_scale=1.0,
             clean_caption=False, output_type='pt', generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    (sample, t), kwargs = calls[0]
    assert int(t) == 49 == model.timestep.item()
    torch.testing.assert_close(kwargs['encoder_hidden_states'], model.prompt_embeds)

    x = pipe.preprocess_image(image)  # [-1, 1], as the model takes images
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), sample)  # pixel-space noise: add_noise at t=49, same draw
        ours = dict(zip(_TAPS, model.forward_intermediates(x, indices=list(_TAPS), intermediates_only=True)))
    for name, (path, kind) in _TAPS.items():
        want = recorded[name]
        if kind == 'tokens':
            want = want.transpose(1, 2).unflatten(2, ours[name].shape[-2:])
        torch.testing.assert_close(ours[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_prompts_cached_pruned_features_and_per_image_prompts(tiny_repo, hub_cache, monkeypatch):
    from diffbackbone import prompts
    from diffbackbone.models.conditioning import text
    from test_prompts import assert_per_image_prompts

    model = timm.create_model('test_deepfloyd_if', pretrained=True).eval()
    monkeypatch.setattr(text, '_t5_embeds', lambda *a, **k: pytest.fail('the T5 encoder was loaded again'))
    feat = timm.create_model('test_deepfloyd_if', pretrained=True, features_only=True,
                             out_indices=['down-level2-repeat0-vit-block0-cross-q', 'pyramid'])
    torch.testing.assert_close(feat.model.prompt_embeds, model.prompt_embeds)
    assert [i['reduction'] for i in feat.feature_info.get_dicts()] == [4, 1, 2, 4, 8]  # in the order asked for
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        got = feat.eval()(x)
        names = [i['name'] for i in feat.feature_info.get_dicts()]
        full = model.forward_intermediates(x, indices=names, intermediates_only=True)
    for a, b in zip(got, full):
        torch.testing.assert_close(a, b)
    monkeypatch.undo()
    small = timm.create_model('test_deepfloyd_if', pretrained=True, features_only=True,
                              out_indices=['down-level1-repeat1-vit-block0-cross-k'])
    assert small.model.unet.mid_block is None and len(small.model.unet.down_blocks) == 2  # pruned after the tap
    batch = prompts.encode_prompts(model, ['a photo of a room', 'A Dog'])  # per-image prompts, preprocessed
    torch.testing.assert_close(batch.prompt_embeds[1:], prompts.encode_prompts(model, ['a dog']).prompt_embeds)
    assert_per_image_prompts(model, batch)


def test_long_prompt_warns_naming_the_kept_part(tiny_repo, hub_cache):
    """IF's T5 keeps 77 tokens (`IFPipeline.encode_prompt`): a longer prompt warns, computed and from the cache."""
    import warnings

    from diffbackbone.models.conditioning.text import PromptTruncatedWarning

    model = timm.create_model('test_deepfloyd_if', pretrained=True)
    long = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 10)
    for _ in range(2):
        with pytest.warns(PromptTruncatedWarning) as record:
            model.prompt_tensors(long)
        (msg,) = [str(r.message) for r in record]
        assert '451 tokens, more than the 77-token window of the T5 text encoder' in msg
        assert "only 'the quick brown fox" in msg  # IF's preprocessing lower-cases before T5
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model.prompt_tensors('A Dog')


def test_bad_arguments_and_sizes():
    with pytest.raises(ValueError, match='leaves no denoising step'):
        timm.create_model('test_deepfloyd_if', timestep=0)
    with pytest.raises(ValueError, match='in_chans=1'):
        timm.create_model('test_deepfloyd_if', in_chans=1)
    model = timm.create_model('test_deepfloyd_if')
    with pytest.raises(ValueError, match='multiples of 8'):
        model(torch.zeros(1, 3, 64, 60))
    with pytest.raises(ValueError, match='floating point'):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_cost_counts_pixel_space():
    from diffbackbone.bench import cost as bench_cost

    gflop, params = bench_cost.count('test_deepfloyd_if', 32)
    assert gflop > 0 and params > 0
    assert bench_cost.count('test_deepfloyd_if', 64)[0] > 3 * gflop  # 4x the pixels
