"""SDXL: conditioning equal to diffusers' SDXL UNet, VAE kept out of float16, loading from an SDXL-layout repo on the
fake Hub with both text encoders' empty-prompt embeddings computed once and cached."""
import json
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from diffusers import UNet2DConditionModel
from fakehub import save_tiny_clip
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models.conditioning import text as text_mod


def test_sdxl_taps_equal_diffusers_sdxl_unet():
    torch.manual_seed(0)
    model = timm.create_model('test_sdxl', ensemble=1).eval()
    with torch.no_grad():
        model.prompt_embeds.normal_()
        model.pooled_prompt_embeds.normal_()
    unet = UNet2DConditionModel(**model.unet.config).eval()
    unet.load_state_dict({k[5:]: v for k, v in model.state_dict().items() if k.startswith('unet.')}, strict=False)
    store = {}
    unet.up_blocks[0].upsamplers[0].register_forward_hook(lambda m, a, o: store.setdefault('us3', o))
    unet.mid_block.register_forward_hook(lambda m, a, o: store.setdefault('mid', o))
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ours = dict(model._iter_unet(z, deepest=10 ** 6))
        unet(z, model.timestep.expand(2), encoder_hidden_states=model.prompt_embeds.expand(2, -1, -1),
             added_cond_kwargs=dict(text_embeds=model.pooled_prompt_embeds.expand(2, -1),
                                    time_ids=torch.tensor([[1024., 1024, 0, 0, 1024, 1024]]).expand(2, -1)))
    torch.testing.assert_close(ours['up-level0-upsampler-out'], store['us3'], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours['mid-repeat1-res-out'], store['mid'], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the size conditioning matters
        model.add_time_ids.fill_(64)
        other = dict(model._iter_unet(z, deepest=10 ** 6))
    assert not torch.allclose(other['mid-repeat1-res-out'], ours['mid-repeat1-res-out'])


def test_sdxl_architecture_and_strides():
    with torch.device('meta'):
        model = timm.create_model('sdxl')
    cfg = model.unet.config
    assert cfg.transformer_layers_per_block == (1, 2, 10) and cfg.addition_embed_type == 'text_time'
    assert model.prompt_embeds.shape == (1, 77, 2048) and model.pooled_prompt_embeds.shape == (1, 1280)
    assert model.vae.scaling_factor == 0.13025 and model.vae.force_upcast
    assert model.feature_info[model.head_tap]['name'] == 'us3'
    pyramid = model._resolve('pyramid')
    assert [(t.name, t.num_chs, t.reduction) for t in pyramid] == [('us6', 640, 8), ('us3', 1280, 16), ('mid', 1280, 32)]


def test_vae_stays_float32_when_the_model_is_halved():
    model = timm.create_model('test_sdxl').half()
    assert model.vae.quant_conv.weight.dtype == torch.float32
    assert model.unet.conv_in.weight.dtype == torch.float16
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = model.vae(x.half())
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def _publish_sdxl_repo(hub, repo_id: str, model: du.DiffusionUNet) -> None:
    """A tiny SDXL-layout repo: two tokenizers and text encoders, fp16 unet/ and vae/ variant files."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_tiny_clip(tmp, hidden_size=16, seed=0)
        with tempfile.TemporaryDirectory() as tmp2:
            save_tiny_clip(tmp2, hidden_size=16, seed=1)
            (tmp / 'tokenizer_2').mkdir()
            for f in (Path(tmp2) / 'tokenizer').iterdir():
                (tmp / 'tokenizer_2' / f.name).write_bytes(f.read_bytes())
            config = CLIPTextConfig.from_pretrained(Path(tmp2) / 'text_encoder')
        torch.manual_seed(2)
        CLIPTextModelWithProjection(config).eval().save_pretrained(tmp / 'text_encoder_2')
        sd = model.state_dict()
        (tmp / 'unet').mkdir()
        save_file({k[5:]: v.half().contiguous() for k, v in sd.items() if k.startswith('unet.')},
                  tmp / 'unet' / 'diffusion_pytorch_model.fp16.safetensors')
        (tmp / 'vae').mkdir()
        save_file({k[4:]: v.half().contiguous() for k, v in sd.items() if k.startswith('vae.')},
                  tmp / 'vae' / 'diffusion_pytorch_model.fp16.safetensors')
        (tmp / 'model_index.json').write_text(json.dumps({'_class_name': 'StableDiffusionXLPipeline'}))
        hub.add_folder(repo_id, tmp)
    return None


def _reference_embeds(hub_repo_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = []
    for tok, enc, cls in (('tokenizer', 'text_encoder', CLIPTextModel),
                          ('tokenizer_2', 'text_encoder_2', CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(hub_repo_dir, subfolder=tok)
        encoder = cls.from_pretrained(hub_repo_dir, subfolder=enc).eval()
        ids = tokenizer('', padding='max_length', max_length=77, return_tensors='pt').input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, -1), out.text_embeds


def test_sdxl_loads_from_an_sdxl_layout_repo(fake_hub, hub_cache, monkeypatch):
    torch.manual_seed(3)
    source = timm.create_model('test_sdxl')
    # `sdxl` itself, with the tiny architecture, from the real repo id served by the fake Hub
    repo = 'stabilityai/stable-diffusion-xl-base-1.0'
    _publish_sdxl_repo(fake_hub, repo, source)
    kwargs = dict(unet_cfg=du._UNET_TEST_SDXL, vae_cfg=du._VAE_TEST_SDXL)
    model = timm.create_model('sdxl', pretrained=True, **kwargs)
    for key, value in source.state_dict().items():
        if key.startswith(('unet.', 'vae.')):
            torch.testing.assert_close(model.state_dict()[key], value.half().float(), msg=key)
    assert model.prompt_embeds.shape == (1, 77, 32) and model.pooled_prompt_embeds.shape == (1, 16)
    from huggingface_hub import snapshot_download
    prompt, pooled = _reference_embeds(snapshot_download(repo))
    torch.testing.assert_close(model.prompt_embeds, prompt)
    torch.testing.assert_close(model.pooled_prompt_embeds, pooled)
    assert not torch.equal(pooled, torch.zeros_like(pooled))
    # the second time comes from the cache: no text encoder is loaded
    monkeypatch.setattr(text_mod, '_encode_sdxl', lambda *a: pytest.fail('text encoders loaded again'))
    again = timm.create_model('sdxl', pretrained=True, **kwargs)
    torch.testing.assert_close(again.prompt_embeds, prompt)
    feats = timm.create_model('sdxl', pretrained=True, features_only=True, out_indices='gdf_practical',
                              ensemble=1, **kwargs)(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert [f.shape[1] for f in feats] == [32, 32, 32, 32]


def test_sdxl_default_pyramid_uses_its_own_levels():
    model = timm.create_model('test_sdxl', features_only=True)
    assert model.feature_info.reduction() == [8, 16, 32]
    assert [d['name'] for d in model.feature_info.get_dicts()] == ['us6', 'us3', 'mid']
