"""Stable Diffusion 3.5 Medium: the full-size architecture on the meta device, a tiny repo through the fake Hub, text
conditioning, noise and taps against diffusers' own StableDiffusion3Img2ImgPipeline (its first transformer call)."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image

import diffbackbone  # noqa: F401
from diffbackbone.models._builder import check_keys
from diffbackbone.models import sd3
from fakehub import save_tiny_clip
from test_newer_models import _tiny_t5_repo

REPO = 'diffbackbone/test-sd3'


def _tiny_sd3_repo(folder: Path) -> tuple[SD3Transformer2DModel, AutoencoderKL]:
    """An SD3-layout diffusers folder: transformer, 16-channel VAE without quant_conv, CLIP-L, CLIP-G, T5."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(**sd3._SD3_TEST).eval()
    transformer.save_pretrained(folder / 'transformer', safe_serialization=True)
    cfg = sd3._VAE_TEST_SD3
    n = len(cfg['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=cfg['block_out_channels'], layers_per_block=1, latent_channels=16,
                        norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n, scaling_factor=cfg['scaling_factor'],
                        shift_factor=cfg['shift_factor'], use_quant_conv=False, use_post_quant_conv=False).eval()
    vae.save_pretrained(folder / 'vae', safe_serialization=True)
    for i, (tok, enc) in enumerate((('tokenizer', 'text_encoder'), ('tokenizer_2', 'text_encoder_2'))):
        tmp = folder / f'clip{i}'
        save_tiny_clip(tmp, hidden_size=16, seed=i)
        (tmp / 'tokenizer').rename(folder / tok)
        torch.manual_seed(10 + i)
        CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tmp / 'text_encoder')).eval().save_pretrained(
            folder / enc)
    _tiny_t5_repo(folder, 'tokenizer_3', 'text_encoder_3')
    FlowMatchEulerDiscreteScheduler(**sd3._SCHEDULER_SD3).save_config(folder / 'scheduler')
    return transformer, vae


@pytest.fixture(scope='module')
def tiny_repo(tmp_path_factory, fake_hub):
    folder = tmp_path_factory.mktemp('sd3')
    transformer, vae = _tiny_sd3_repo(folder)
    for sub in ('transformer', 'vae', 'tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2', 'tokenizer_3',
                'text_encoder_3', 'scheduler'):
        fake_hub.add_folder(REPO, folder / sub, prefix=sub)
    return folder, transformer, vae


def test_full_size_loads_diffusers_state_dict_strictly():
    with torch.device('meta'):
        model = timm.create_model('sd35_medium')
        ref = SD3Transformer2DModel(**sd3._SD35_MEDIUM)
    # "2.5 billion parameters": 2.24B weights + the 384 x 384 position table the checkpoint stores (226M)
    n = sum(p.numel() for p in ref.parameters()) + ref.pos_embed.pos_embed.numel()
    assert n == pytest.approx(2.47e9, rel=0.005)
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    assert 'pos_embed.pos_embed' in sd and 'transformer_blocks.12.attn2.to_q.weight' in sd
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith(('vae.', 'prompt_', 'pooled_'))})
    model.load_state_dict(sd3.checkpoint_filter_fn(sd, model), strict=True, assign=True)
    assert len(model.taps) == 24 and {f['reduction'] for f in model.feature_info} == {16}
    assert model.prompt_embeds.shape == (1, 77 + 256, 4096) and model.pooled_prompt_embeds.shape == (1, 2048)
    assert model.vae.encoder.conv_out.out_channels == 32 and model.max_side == 384 * 16
    names = model.tap_names(all=True)
    assert len(names) == 13 * 11 + 11 * 7
    assert names[:11] == [f'vit-block0-{s}' for s in ('q', 'k', 'v', 'attn-out', 'attn2-q', 'attn2-k', 'attn2-v',
                                                       'attn2-out', 'norm-out', 'ffn-inner', 'out')]
    assert 'vit-block12-attn2-q' in names and 'vit-block13-attn2-q' not in names
    del sd['transformer_blocks.0.attn.to_q.weight']
    with pytest.raises(RuntimeError, match='1 missing keys'):  # the builder's key check after the filter
        check_keys(sd3.checkpoint_filter_fn(sd, model), model)


def test_text_noise_and_taps_equal_diffusers_img2img(tiny_repo, hub_cache):
    """The tiny model from the Hub against StableDiffusion3Img2ImgPipeline run as Meng et al. run FLUX's (strength
    0.05, the pipeline's 50 steps, no guidance): same text conditioning, sigma and timestep, and the taps of the
    pipeline's FIRST transformer call."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    folder, transformer, vae = tiny_repo
    pipe = StableDiffusion3Img2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / 'scheduler'), vae=vae,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / 'text_encoder').eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / 'tokenizer'),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / 'text_encoder_2').eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / 'tokenizer_2'),
        text_encoder_3=T5EncoderModel.from_pretrained(folder / 'text_encoder_3').eval(),
        tokenizer_3=AutoTokenizer.from_pretrained(folder / 'tokenizer_3'), transformer=transformer)
    model = timm.create_model('test_sd3', pretrained=True, prompt='a dog').eval()

    embeds, _, pooled, _ = pipe.encode_prompt('a dog', None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)
    assert embeds.shape == (1, 85, 32)
    torch.testing.assert_close(model.prompt_embeds, embeds)
    torch.testing.assert_close(model.pooled_prompt_embeds, pooled)

    names = {'vit-block0-q': (0, 'attn.to_q', 'out'), 'vit-block0-attn2-k': (0, 'attn2.to_k', 'out'),
             'vit-block1-attn2-out': (1, 'attn2.to_out.0', 'out'), 'vit-block1-norm-out': (1, 'ff', 'in'),
             'vit-block1-out': (1, '', 'out1'), 'vit-block3-v': (3, 'attn.to_v', 'out'),
             'vit-block3-attn-out': (3, 'attn.to_out.0', 'out'), 'vit-block3-ffn-inner': (3, 'ff.net.0', 'out'),
             'vit-block3-out': (3, '', 'out1')}
    calls, recorded = [], {}

    def keep(name: str, value: torch.Tensor) -> None:  # the first call's only (a hook returning a value replaces it)
        recorded.setdefault(name, value)

    hooks = [pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)]
    for name, (k, path, kind) in names.items():
        block = pipe.transformer.transformer_blocks[k]
        module = block.get_submodule(path) if path else block
        if kind == 'in':
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: keep(n, a[0])))
        else:
            pick = (lambda o: o[1]) if kind == 'out1' else (lambda o: o)
            hooks.append(module.register_forward_hook(lambda m, a, o, n=name, p=pick: keep(n, p(o))))
    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    with torch.no_grad():
        pipe('a dog', image=image, height=64, width=96, strength=0.05, guidance_scale=1.0, max_sequence_length=8,
             output_type='latent', generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()

    assert len(calls) == 3  # the pipeline goes on denoising; Meng et al.'s patched loop returns after the first call
    first = calls[0]
    torch.testing.assert_close(model.timestep.expand(1), first['timestep'].float())
    sigma = pipe.scheduler.sigmas[pipe.scheduler.begin_index].item()
    assert model.noise_scales == pytest.approx((1 - sigma, sigma)) and sigma == pytest.approx(first['timestep'] / 1000)
    with torch.no_grad():
        ours = model.transformer_features(first['hidden_states'], model._resolve(list(names)))
    for name, want in recorded.items():
        want = want[:, -24:].transpose(1, 2).unflatten(2, (4, 6))  # image tokens on the 4x6 patch grid
        torch.testing.assert_close(ours[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_latents_prompts_cached_and_features(tiny_repo, hub_cache, monkeypatch):
    from diffbackbone import prompts
    from diffbackbone.models.conditioning import text
    from test_prompts import assert_per_image_prompts

    _, _, vae = tiny_repo
    model = timm.create_model('test_sd3', pretrained=True).eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(model.vae(x), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(text, '_t5_embeds', lambda *a, **k: pytest.fail('the T5 encoder was loaded again'))
    feat = timm.create_model('test_sd3', pretrained=True, features_only=True, out_indices=['vit-block1-attn2-q'])
    torch.testing.assert_close(feat.model.prompt_embeds, model.prompt_embeds)
    assert len(feat.model.transformer.transformer_blocks) == 2  # pruned after the deepest tap
    with torch.no_grad():
        (got,) = feat.eval()(x)
        full = model.forward_intermediates(x, indices=['vit-block1-attn2-q'], intermediates_only=True)[0]
    assert got.shape == (2, 16, 4, 6)
    torch.testing.assert_close(got, full)
    monkeypatch.undo()
    batch = prompts.encode_prompts(model, ['a photo of a room', 'a dog'])  # per-image prompts
    assert batch.prompt_embeds.shape == (2, 85, 32) and batch.pooled_prompt_embeds.shape == (2, 32)
    assert_per_image_prompts(model, batch)


def test_long_prompts_warn_for_each_encoder_that_cuts_them(tiny_repo, hub_cache):
    """CLIP-L and CLIP-G keep 77 tokens, T5 `max_tokens`: each that cuts the prompt says so, from the cache too."""
    import warnings

    from diffbackbone.models.conditioning.text import PromptTruncatedWarning, encode_sd3_prompt

    folder = str(tiny_repo[0])
    long = ' '.join(['cat'] * 50 + ['dog'] * 50)  # 102 CLIP tokens
    with pytest.warns(PromptTruncatedWarning) as record:
        encode_sd3_prompt(folder, long, 4096)  # T5's window is wide enough here
    msgs = [str(r.message) for r in record]
    assert len(msgs) == 2 and 'the CLIP-L text encoder' in msgs[0] and 'the CLIP-G text encoder' in msgs[1]
    assert all('77-token window' in m and repr(' '.join(['cat'] * 50 + ['dog'] * 25)) in m for m in msgs)
    for _ in range(2):  # computed, then from the cache: both warn
        with pytest.warns(PromptTruncatedWarning) as record:
            encode_sd3_prompt(REPO, 'a photo of a dog', 4)
        assert [str(r.message).split('window of ')[1].split(':')[0] for r in record] == ['the T5 text encoder']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        encode_sd3_prompt(folder, 'a dog', 64)


def test_bad_arguments_and_sizes():
    with pytest.raises(ValueError, match='leaves no denoising step'):
        timm.create_model('test_sd3', timestep=0)
    with pytest.raises(ValueError, match='num_inference_steps must be a whole number'):
        timm.create_model('test_sd3', num_inference_steps=0)
    model = timm.create_model('test_sd3')
    with pytest.raises(ValueError, match='at most 256 px'):
        model(torch.zeros(1, 3, 64, 272))
    with pytest.raises(ValueError, match='multiples of 16'):
        model(torch.zeros(1, 3, 64, 72))
