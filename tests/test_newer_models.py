"""Newer models from Meng et al.'s list: Playground v2 (SDXL architecture) and the PixArt family."""
import pytest
import timm
import torch

import diffbackbone  # noqa: F401
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models._base import VAE_TEST
from test_sdxl import _publish_sdxl_repo


def test_pgv2_loads_from_a_playground_layout_repo(fake_hub, hub_cache):
    torch.manual_seed(5)
    source = timm.create_model('test_sdxl')
    _publish_sdxl_repo(fake_hub, 'playgroundai/playground-v2-1024px-aesthetic', source)
    start = len(fake_hub.requests)
    model = timm.create_model('pgv2', pretrained=True, unet_cfg=du._UNET_TEST_SDXL, vae_cfg=du._VAE_TEST_SDXL)
    assert all('playgroundai/playground-v2-1024px-aesthetic' in r[1] or r[1].startswith('/cdn/')
               for r in fake_hub.requests[start:])
    for key, value in source.state_dict().items():
        if key.startswith(('unet.', 'vae.')):
            torch.testing.assert_close(model.state_dict()[key], value.half().float(), msg=key)
    assert model.pretrained_cfg['input_size'] == (3, 1024, 1024) and model.vae.force_upcast
    with torch.device('meta'):
        full = timm.create_model('pgv2')
    assert sum(p.numel() for p in full.unet.parameters()) == pytest.approx(2.567e9, rel=0.01)  # SDXL UNet


# ---- PixArt ------------------------------------------------------------------------------------------------------
from diffusers import AutoencoderKL, PixArtTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from diffbackbone.models import pixart as px  # noqa: E402


@pytest.mark.parametrize('name,cfg', [('pixart_sigma', px._PIXART_SIGMA), ('pixart_alpha', px._PIXART_ALPHA_512)])
def test_pixart_full_size_loads_diffusers_state_dict_strictly(name, cfg):
    with torch.device('meta'):
        model = timm.create_model(name)
        ref = PixArtTransformer2DModel(**cfg)
    assert sum(p.numel() for p in ref.parameters()) == pytest.approx(611e6, rel=0.01)  # PixArt-XL/2: 0.6B
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith('vae.') or k.startswith('prompt_')})
    model.load_state_dict(px.checkpoint_filter_fn(sd, model), strict=True, assign=True)
    assert len(model.taps) == 28 and model.feature_info[0]['reduction'] == 16


def test_pixart_taps_equal_diffusers_forward():
    torch.manual_seed(0)
    model = timm.create_model('test_pixart').eval()
    with torch.no_grad():
        model.prompt_embeds.normal_()
        model.prompt_mask[:, :5] = 1
    ref = PixArtTransformer2DModel(**px._PIXART_TEST).eval()
    ref.load_state_dict({k[len('transformer.'):]: v for k, v in model.state_dict().items()
                         if k.startswith('transformer.')}, strict=False)
    z = torch.randn(2, 4, 12, 16)  # not square
    names = ['vit-block0-out', 'vit-block2-self-q', 'vit-block2-cross-q', 'vit-block3-ffn-inner', 'vit-block3-out']
    got: dict = {}
    hooks = [ref.transformer_blocks[0].register_forward_hook(lambda m, a, o: got.__setitem__(0, o)),
             ref.transformer_blocks[2].attn1.to_q.register_forward_hook(lambda m, a, o: got.__setitem__(1, o)),
             ref.transformer_blocks[2].attn2.to_q.register_forward_hook(lambda m, a, o: got.__setitem__(2, o)),
             ref.transformer_blocks[3].ff.net[0].register_forward_hook(lambda m, a, o: got.__setitem__(3, o)),
             ref.transformer_blocks[3].register_forward_hook(lambda m, a, o: got.__setitem__(4, o))]
    with torch.no_grad():
        ref(z, encoder_hidden_states=model.prompt_embeds.expand(2, -1, -1), timestep=torch.tensor([50, 50]),
            encoder_attention_mask=model.prompt_mask.expand(2, -1), added_cond_kwargs={'resolution': None,
                                                                                        'aspect_ratio': None})
        ours = model.transformer_features(z, model._resolve(names))
    for h in hooks:
        h.remove()
    for i, name in enumerate(names):
        want = got[i].transpose(1, 2).unflatten(2, (6, 8))  # tokens -> NCHW on the 6x8 patch grid
        torch.testing.assert_close(ours[name], want, rtol=1e-5, atol=1e-5, msg=name)


def _tiny_t5_repo(folder, tokenizer='tokenizer', text_encoder='text_encoder'):
    """A T5 text encoder and a SentencePiece tokenizer (`spiece.model`, T5Tokenizer) laid out as PixArt repos ship
    them (FLUX: in `tokenizer_2/`, `text_encoder_2/`)."""
    import json

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    (folder / tokenizer).mkdir(parents=True)
    corpus = folder / 'corpus.txt'
    corpus.write_text('a photo of a room\na photo of a dog\nthe quick brown fox jumps over the lazy dog\n' * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / tokenizer / 'spiece'),
                                   vocab_size=30, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    corpus.unlink()
    (folder / tokenizer / 'tokenizer_config.json').write_text(
        json.dumps({'tokenizer_class': 'T5Tokenizer', 'model_max_length': 8, 'extra_ids': 0}))
    torch.manual_seed(1)
    T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(
        folder / text_encoder)


def test_pixart_loads_through_the_hub_and_caches_the_t5_prompt(fake_hub, hub_cache, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, T5EncoderModel

    torch.manual_seed(2)
    _tiny_t5_repo(tmp_path)
    ref_tr = PixArtTransformer2DModel(**px._PIXART_TEST)
    save_file(ref_tr.state_dict(), tmp_path / 'transformer.safetensors')
    n = len(VAE_TEST['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=VAE_TEST['block_out_channels'], layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n)
    save_file(vae.state_dict(), tmp_path / 'vae.safetensors')
    repo = 'diffbackbone/test-pixart'
    fake_hub.add_file(repo, 'transformer/diffusion_pytorch_model.safetensors', tmp_path / 'transformer.safetensors')
    fake_hub.add_file(repo, 'vae/diffusion_pytorch_model.safetensors', tmp_path / 'vae.safetensors')
    fake_hub.add_folder(repo, tmp_path / 'tokenizer', prefix='tokenizer')
    fake_hub.add_folder(repo, tmp_path / 'text_encoder', prefix='text_encoder')

    model = timm.create_model('test_pixart', pretrained=True, prompt='a dog')
    torch.testing.assert_close(model.transformer.pos_embed.proj.weight, ref_tr.pos_embed.proj.weight)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / 'tokenizer'))
    assert type(tokenizer).__name__ == 'T5Tokenizer'
    encoder = T5EncoderModel.from_pretrained(str(tmp_path / 'text_encoder')).eval()
    inputs = tokenizer('a dog', padding='max_length', max_length=8, truncation=True, return_tensors='pt')
    with torch.no_grad():
        want = encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0]
    torch.testing.assert_close(model.prompt_embeds, want)
    assert model.prompt_mask.tolist() == inputs.attention_mask.float().tolist() and 0 < model.prompt_mask.sum() < 8
    from diffbackbone.models.conditioning import text

    monkeypatch.setattr(text, '_t5_embeds', lambda *a: pytest.fail('the T5 encoder was loaded again'))
    again = timm.create_model('test_pixart', pretrained=True, prompt='a dog', features_only=True)
    torch.testing.assert_close(again.model.prompt_embeds, want)
    with torch.no_grad():
        assert [f.shape for f in again(torch.rand(1, 3, 64, 96) * 2 - 1)] == [(1, 16, 4, 6)] * 4
