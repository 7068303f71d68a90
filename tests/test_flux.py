"""FLUX.1 backbones: sharded weights through the Hub loader, text conditioning against diffusers' FluxImg2ImgPipeline,
the full-size architecture on the meta device (taps against Meng et al.'s one call: test_dit_fidelity.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone.models._builder import check_keys
from diffbackbone import cli, hub
from diffbackbone.models import flux as fx
from fakehub import save_tiny_clip
from test_newer_models import _tiny_t5_repo
from test_prompts import assert_per_image_prompts

REPO = 'diffbackbone/test-flux'
INDEX = 'transformer/diffusion_pytorch_model.safetensors.index.json'


def _save_sharded(state: dict, folder: Path, shards: int = 3) -> list[str]:
    """`state` as diffusers saves a big model: `diffusion_pytorch_model-0000i-of-0000n.safetensors` and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map, names = {}, []
    for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards), start=1):
        name = f'diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors'
        save_file({k: state[k].contiguous() for k in part}, folder / name)
        weight_map.update({k: name for k in part})
        names.append(name)
    (folder / 'diffusion_pytorch_model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': sum(v.numel() * v.element_size() for v in state.values())},
                    'weight_map': weight_map}))
    return names


def _tiny_flux_repo(folder: Path) -> tuple[FluxTransformer2DModel, AutoencoderKL]:
    """A FLUX-layout diffusers folder: sharded transformer, 16-channel VAE without quant_conv, CLIP, T5."""
    torch.manual_seed(3)
    transformer = FluxTransformer2DModel(**fx._FLUX_TEST).eval()
    transformer.save_config(folder / 'transformer')
    _save_sharded(transformer.state_dict(), folder / 'transformer')
    vae_cfg = fx._VAE_TEST_FLUX
    n = len(vae_cfg['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=vae_cfg['block_out_channels'], layers_per_block=1, latent_channels=16,
                        norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n, scaling_factor=vae_cfg['scaling_factor'],
                        shift_factor=vae_cfg['shift_factor'], use_quant_conv=False, use_post_quant_conv=False).eval()
    vae.save_pretrained(folder / 'vae', safe_serialization=True)
    save_tiny_clip(folder, hidden_size=32)
    _tiny_t5_repo(folder, 'tokenizer_2', 'text_encoder_2')
    FlowMatchEulerDiscreteScheduler(**fx._SCHEDULER_DEV).save_config(folder / 'scheduler')
    return transformer, vae


@pytest.fixture(scope='module')
def tiny_repo(tmp_path_factory, fake_hub):
    folder = tmp_path_factory.mktemp('flux')
    transformer, vae = _tiny_flux_repo(folder)
    fake_hub.add_folder(REPO, folder)
    return folder, transformer, vae


def test_sharded_transformer_loads_through_the_hub(tiny_repo, fake_hub, hub_cache):
    folder, transformer, _ = tiny_repo
    start = len(fake_hub.requests)
    model = timm.create_model('test_flux', pretrained=True)
    fetched = [r[1] for r in fake_hub.requests[start:] if 'diffusion_pytorch_model-0000' in r[1] and r[0] == 'GET']
    assert len({p.rsplit('/', 1)[1] for p in fetched}) == 3  # every shard, from the index
    for k, v in transformer.state_dict().items():
        torch.testing.assert_close(model.state_dict()['transformer.' + k], v, rtol=0, atol=0, msg=k)
    assert model.pooled_prompt_embeds.shape == (1, 32) and model.prompt_embeds.shape == (1, 8, 32)


def test_text_conditioning_equals_the_pipelines(tiny_repo, hub_cache):
    """T5 and CLIP pooled embeddings from the Hub repo equal `FluxPipeline.encode_prompt` (the taps against Meng et
    al.'s one transformer call: tests/test_dit_fidelity.py)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    folder, transformer, vae = tiny_repo
    pipe = FluxImg2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / 'scheduler'), vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder / 'text_encoder').eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / 'tokenizer'),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / 'text_encoder_2').eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / 'tokenizer_2'), transformer=transformer)
    model = timm.create_model('test_flux', pretrained=True, prompt='A Dog').eval()
    embeds, pooled, _ = pipe.encode_prompt('A Dog', prompt_2=None, max_sequence_length=8)
    torch.testing.assert_close(model.prompt_embeds, embeds)
    torch.testing.assert_close(model.pooled_prompt_embeds, pooled)


def test_vae_latents_are_shifted_and_scaled_as_the_pipeline(tiny_repo, hub_cache):
    _, _, vae = tiny_repo
    model = timm.create_model('test_flux', pretrained=True).eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(model.vae(x), want, rtol=1e-5, atol=1e-5)
        feats = timm.create_model('test_flux', pretrained=True, features_only=True)(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 4, 6)] * 4


def test_broken_shards_are_named(tiny_repo, fake_hub, hub_cache, tmp_path):
    folder = tmp_path / 'local'
    state = {'a': torch.ones(2), 'b': torch.zeros(3)}
    names = _save_sharded(state, folder, shards=2)
    assert hub.load_sharded_safetensors(str(folder), 'diffusion_pytorch_model.safetensors.index.json',
                                        what='w').keys() == state.keys()
    (folder / names[1]).unlink()
    with pytest.raises(hub.HubError, match=f'{names[1]} does not exist'):
        timm.create_model('test_flux', pretrained=True, pretrained_cfg_overlay=dict(
            file=str(folder / 'diffusion_pytorch_model.safetensors.index.json')))
    save_file({'a': torch.ones(2), 'c': torch.ones(1)}, folder / names[0])
    with pytest.raises(hub.HubError, match=r'does not hold the tensors its index lists \(0 missing .*1 not in the '):
        hub.load_sharded_safetensors(str(folder), 'diffusion_pytorch_model.safetensors.index.json', what='w')
    (folder / 'diffusion_pytorch_model.safetensors.index.json').write_text('{"weight_map": {"a": "../x"}}')
    with pytest.raises(hub.HubError, match='outside its folder'):
        hub.load_sharded_safetensors(str(folder), 'diffusion_pytorch_model.safetensors.index.json', what='w')
    (folder / 'diffusion_pytorch_model.safetensors.index.json').write_text('not json')
    with pytest.raises(hub.HubError, match='is not a sharded-checkpoint index'):
        hub.load_sharded_safetensors(str(folder), 'diffusion_pytorch_model.safetensors.index.json', what='w')


@pytest.mark.parametrize('name,cfg', [('flux', fx._FLUX_DEV), ('flux_schnell', fx._FLUX_SCHNELL)])
def test_full_size_loads_diffusers_state_dict_strictly(name, cfg):
    with torch.device('meta'):
        model = timm.create_model(name)
        ref = FluxTransformer2DModel(**cfg)
    n = sum(p.numel() for p in ref.parameters())
    assert n == pytest.approx(11.9e9, rel=0.005)  # FLUX.1: "a 12 billion parameter rectified flow transformer"
    assert sum(p.numel() for p in model.transformer.parameters()) == n
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith(('vae.', 'prompt_', 'pooled_'))})
    model.load_state_dict(fx.checkpoint_filter_fn(sd, model), strict=True, assign=True)
    assert len(model.taps) == 57 and {f['reduction'] for f in model.feature_info} == {16}
    assert model.prompt_embeds.shape == (1, 512, 4096) and model.vae.encoder.conv_out.out_channels == 32
    del sd['transformer_blocks.0.attn.to_q.weight']
    with pytest.raises(RuntimeError, match='1 missing keys'):  # the builder's key check after the filter
        check_keys(fx.checkpoint_filter_fn(sd, model), model)


def test_taps_follow_meng_et_al_names(capsys):
    assert cli.main(['taps', 'flux', '--all']) == 0
    out = capsys.readouterr().out
    rows = [line.split()[1] for line in out.splitlines()[1:] if line.split()[0] == '-' or line.split()[0].isdigit()]
    assert len(rows) == 19 * 9 + 38 * 7
    assert rows[:9] == [f'vit-block0-{s}' for s in ('q', 'k', 'v', 'cross-map', 'self-map', 'attn-out', 'norm-out',
                                                    'ffn-inner', 'out')]
    assert rows[-7:] == [f'vit-block56-{s}' for s in ('q', 'k', 'v', 'cross-map', 'self-map', 'attn-out', 'out')]
    assert 'vit-block18-ffn-inner' in rows and 'vit-block19-ffn-inner' not in rows


def test_schedule_and_bad_arguments():
    model = timm.create_model('test_flux')  # one transformer call: prunable
    model.prune_intermediate_layers(['vit-block1-out'])
    assert len(model.transformer.transformer_blocks) == 2 and len(model.transformer.single_transformer_blocks) == 0
    assert model.transformer.proj_out is None
    with pytest.raises(ValueError, match='leaves no denoising step'):
        timm.create_model('test_flux', timestep=0)
    with pytest.raises(ValueError, match='num_inference_steps must be a whole number'):
        timm.create_model('test_flux', num_inference_steps=0)
    schnell = timm.create_model('flux_schnell', pretrained=False, transformer_cfg=dict(fx._FLUX_TEST,
                                guidance_embeds=False), vae_cfg=fx._VAE_TEST_FLUX, max_tokens=8)
    _, sigmas = schnell.schedule(64, 64)
    assert sigmas.tolist() == pytest.approx([2 / 28, 1 / 28, 0.0])  # no shift for schnell
    steps20 = timm.create_model('test_flux', num_inference_steps=20)  # 20 * 0.05 = 1 step: the last sigma, 1 / 20
    assert steps20.schedule(128, 128)[1][0].item() == pytest.approx(0.1425, abs=5e-5)


def test_every_tap_has_the_promised_shape_and_the_forward_stops_early():
    torch.manual_seed(0)
    model = timm.create_model('test_flux').eval()
    names = model.tap_names(all=True)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=names, intermediates_only=True)
    taps = {t.name: t for t in model.all_taps}
    for name, m in zip(names, maps):
        assert m.shape == (1, taps[name].num_chs, 4, 6) and torch.isfinite(m).all(), name
    ran = []
    for block in model.transformer.single_transformer_blocks:
        block.register_forward_pre_hook(lambda mod, args: ran.append(mod))
    with torch.no_grad():
        early = model.forward_intermediates(x, indices=['vit-block1-ffn-inner'], intermediates_only=True)[0]
    assert not ran
    torch.testing.assert_close(early, maps[names.index('vit-block1-ffn-inner')])
    feat = timm.create_model('test_flux', features_only=True, out_indices=['vit-block2-q'])
    feat.model.load_state_dict(model.state_dict(), strict=False)  # pruned blocks are gone
    assert len(feat.model.transformer.single_transformer_blocks) == 1
    with torch.no_grad():
        torch.testing.assert_close(feat.eval()(x)[0], maps[names.index('vit-block2-q')])


def test_prompts_are_cached_and_per_image(tiny_repo, hub_cache, monkeypatch):
    from diffbackbone import prompts
    from diffbackbone.models.conditioning import text

    folder, _, _ = tiny_repo
    model = timm.create_model('test_flux', pretrained=True, prompt='a dog').eval()
    monkeypatch.setattr(text, '_t5_embeds', lambda *a, **k: pytest.fail('the T5 encoder was loaded again'))
    monkeypatch.setattr(text, '_load_clip', lambda *a, **k: pytest.fail('the CLIP encoder was loaded again'))
    again = timm.create_model('test_flux', pretrained=True, prompt='a dog')
    torch.testing.assert_close(again.pooled_prompt_embeds, model.pooled_prompt_embeds)
    monkeypatch.undo()
    batch = prompts.encode_prompts(model, ['a photo of a room', 'a dog'])
    assert batch.prompt_embeds.shape == (2, 8, 32) and batch.pooled_prompt_embeds.shape == (2, 32)
    torch.manual_seed(4)
    both = assert_per_image_prompts(model, batch)
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # the helper's images
    with torch.no_grad(), prompts.use_prompts(model, 'a dog'):
        assert not torch.allclose(model.forward_features(x)[0], both[0], atol=1e-4)  # the prompt matters
