"""HunyuanDiT: the full-size architecture on the meta device, a tiny repo through the fake Hub, text conditioning, noise
and taps against a re-implementation of Meng et al.'s patched HunyuanDiTPipeline call with diffusers' own pieces."""
from pathlib import Path

import pytest
import timm
import torch
from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel

import diffbackbone  # noqa: F401
from diffbackbone.models._builder import check_keys
from diffbackbone.models import hunyuan as hy
from test_newer_models import _tiny_t5_repo

REPO = 'diffbackbone/test-hunyuan'


def _tiny_bert(folder: Path) -> None:
    """A tiny BERT and its WordPiece tokenizer in `tokenizer/`, `text_encoder/` (HunyuanDiT's bilingual CLIP)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    (folder / 'tokenizer').mkdir(parents=True)
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'photo', 'of', 'dog', 'room', 'the', 'cat']
    (folder / 'tokenizer' / 'vocab.txt').write_text('\n'.join(words) + '\n')
    BertTokenizer(str(folder / 'tokenizer' / 'vocab.txt')).save_pretrained(folder / 'tokenizer')
    torch.manual_seed(7)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).eval().save_pretrained(folder / 'text_encoder')


@pytest.fixture(scope='module')
def tiny_repo(tmp_path_factory, fake_hub):
    folder = tmp_path_factory.mktemp('hunyuan')
    torch.manual_seed(3)
    transformer = HunyuanDiT2DModel(**hy._HUNYUAN_TEST).eval()
    transformer.save_pretrained(folder / 'transformer', safe_serialization=True)
    cfg = hy._VAE_TEST_HUNYUAN
    n = len(cfg['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=cfg['block_out_channels'], layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n, scaling_factor=cfg['scaling_factor']).eval()
    vae.save_pretrained(folder / 'vae', safe_serialization=True)
    _tiny_bert(folder)
    _tiny_t5_repo(folder, 'tokenizer_2', 'text_encoder_2')
    DDPMScheduler(**hy._SCHEDULER_HUNYUAN).save_config(folder / 'scheduler')
    for sub in ('transformer', 'vae', 'tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2', 'scheduler'):
        fake_hub.add_folder(REPO, folder / sub, prefix=sub)
    return folder, transformer, vae


def test_full_size_loads_diffusers_state_dict_strictly():
    with torch.device('meta'):
        model = timm.create_model('hunyuan_dit')
        ref = HunyuanDiT2DModel(**hy._HUNYUAN_DIT)
    assert sum(p.numel() for p in ref.parameters()) == pytest.approx(1.5e9, rel=0.015)  # DiT-g/2: "1.5B"
    sd = {k: torch.empty_like(v, device='meta') for k, v in ref.state_dict().items()}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith(('vae.', 'prompt_'))})
    model.load_state_dict(hy.checkpoint_filter_fn(sd, model), strict=True, assign=True)
    assert len(model.taps) == 40 and {f['reduction'] for f in model.feature_info} == {16}
    assert model.prompt_embeds.shape == (1, 77, 1024) and model.prompt_embeds_t5.shape == (1, 256, 2048)
    names = model.tap_names(all=True)
    assert len(names) == 40 * 8 and names[:8] == [f'vit-block0-{s}' for s in (
        'self-q', 'self-k', 'self-v', 'self-map', 'cross-q', 'cross-map', 'ffn-inner', 'out')]
    info = {t.name: t for t in model.all_taps}
    assert info['vit-block0-self-map'].num_chs == 16 and info['vit-block0-cross-map'].num_chs == 77 + 256
    assert timm.create_model('test_hunyuan_dit').timestep.item() == 21  # 50 leading steps cut to 2: t = 21, 1
    del sd['blocks.0.attn1.to_q.weight']
    with pytest.raises(RuntimeError, match='1 missing keys'):  # the builder's key check after the filter
        check_keys(hy.checkpoint_filter_fn(sd, model), model)


def test_text_noise_and_taps_equal_their_pipeline_call(tiny_repo, hub_cache):
    """Meng et al.'s patched HunyuanDiTPipeline, re-implemented with diffusers' pipeline pieces: its prompt encoding,
    its img2img timesteps (SDXL's get_timesteps) and noise, its size/style conditioning and rotary embedding, one
    transformer call with hooks."""
    from diffusers import HunyuanDiTPipeline
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
    from transformers import AutoTokenizer, BertModel, BertTokenizer, T5EncoderModel

    folder, transformer, vae = tiny_repo
    scheduler = DDPMScheduler.from_pretrained(folder / 'scheduler')
    pipe = HunyuanDiTPipeline(
        vae=vae, text_encoder=BertModel.from_pretrained(folder / 'text_encoder', add_pooling_layer=False).eval(),
        tokenizer=BertTokenizer.from_pretrained(folder / 'tokenizer'), transformer=transformer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=T5EncoderModel.from_pretrained(folder / 'text_encoder_2').eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / 'tokenizer_2'))
    model = timm.create_model('test_hunyuan_dit', pretrained=True, prompt='a dog').eval()

    enc = [pipe.encode_prompt('a dog', device='cpu', dtype=torch.float32, do_classifier_free_guidance=False,
                              max_sequence_length=8, text_encoder_index=i) for i in (0, 1)]
    torch.testing.assert_close(model.prompt_embeds, enc[0][0])
    torch.testing.assert_close(model.prompt_mask, enc[0][2].float())
    torch.testing.assert_close(model.prompt_embeds_t5, enc[1][0])
    torch.testing.assert_close(model.prompt_mask_t5, enc[1][2].float())
    assert 0 < model.prompt_mask.sum() < 8

    scheduler.set_timesteps(50)
    t_start = 50 - min(int(50 * 0.05), 50)  # their get_timesteps
    t = scheduler.timesteps[t_start]
    assert model.timestep.item() == t.item()
    a = scheduler.alphas_cumprod[t]
    assert model.noise_scales == pytest.approx((a.sqrt().item(), (1 - a).sqrt().item()))
    z = scheduler.add_noise(torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12), t.expand(2))

    grid = (4, 6)
    rope = get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads,
                                   get_resize_crop_region_for_grid(grid, 512 // 8 // 2), grid, output_type='pt')
    names = {'vit-block0-self-q': (0, 'attn1.to_q'), 'vit-block1-cross-q': (1, 'attn2.to_q'),
             'vit-block2-out': (2, ''), 'vit-block4-self-v': (4, 'attn1.to_v'), 'vit-block5-ffn-inner': (5, 'ff.net.0'),
             'vit-block5-out': (5, '')}
    recorded = {}

    def keep(name, out):
        recorded[name] = out

    hooks = [(transformer.blocks[k].get_submodule(p) if p else transformer.blocks[k]).register_forward_hook(
        lambda m, a, o, n=name: keep(n, o)) for name, (k, p) in names.items()]
    with torch.no_grad():
        transformer(z, t.expand(2).float(), encoder_hidden_states=enc[0][0].repeat(2, 1, 1),
                    text_embedding_mask=enc[0][2].repeat(2, 1), encoder_hidden_states_t5=enc[1][0].repeat(2, 1, 1),
                    text_embedding_mask_t5=enc[1][2].repeat(2, 1),
                    image_meta_size=torch.tensor([[1024.0, 1024, 1024, 1024, 0, 0]]).repeat(2, 1),
                    style=torch.zeros(2, dtype=torch.long), image_rotary_emb=rope, return_dict=False)
        ours = model.transformer_features(z, model._resolve(list(names)))
    for h in hooks:
        h.remove()
    for name, want in recorded.items():
        torch.testing.assert_close(ours[name], want.transpose(1, 2).unflatten(2, grid), rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_long_prompts_warn_for_each_encoder_that_cuts_them(tiny_repo):
    import warnings

    from diffbackbone.models.conditioning.text import PromptTruncatedWarning, encode_hunyuan_prompt

    folder = str(tiny_repo[0])
    prompt = 'a photo of the cat the dog the room'  # 9 words + [CLS] and [SEP]
    with pytest.warns(PromptTruncatedWarning) as record:
        encode_hunyuan_prompt(folder, prompt, 8, 512)
    (msg,) = [str(r.message) for r in record]
    assert '11 tokens, more than the 8-token window of the bilingual CLIP text encoder' in msg
    assert repr('a photo of the cat the') in msg
    with pytest.warns(PromptTruncatedWarning) as record:
        encode_hunyuan_prompt(folder, prompt, 77, 4)
    (msg,) = [str(r.message) for r in record]
    assert '4-token window of the mT5 text encoder' in msg
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        encode_hunyuan_prompt(folder, prompt, 77, 512)


def test_features_prompts_cached_and_errors(tiny_repo, hub_cache, monkeypatch):
    from diffbackbone.models.conditioning import text

    model = timm.create_model('test_hunyuan_dit', pretrained=True)
    monkeypatch.setattr(text, '_t5_embeds', lambda *a, **k: pytest.fail('the mT5 encoder was loaded again'))
    feat = timm.create_model('test_hunyuan_dit', pretrained=True, features_only=True, out_indices=['vit-block4-out'])
    torch.testing.assert_close(feat.model.prompt_embeds_t5, model.prompt_embeds_t5)
    assert len(feat.model.transformer.blocks) == 5  # pruned after the deepest tap
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        (got,) = feat.eval()(x)
        full = model.eval().forward_intermediates(x, indices=['vit-block4-out'], intermediates_only=True)[0]
    torch.testing.assert_close(got, full)  # the long skip into block 4 comes from block 1 either way
    model._prompt_override = (model.prompt_embeds, model.prompt_mask)
    with pytest.raises(ValueError, match='Per-image prompts'):
        model(x)
    with pytest.raises(ValueError, match='leaves no denoising step'):
        timm.create_model('test_hunyuan_dit', timestep=10)


class _TheirStoreProcessor:
    """Meng et al.'s `HunyuanAttnStoreProcessor` (feature/components/attention.py), re-implemented: q and k normed,
    the rotary embedding on q (and on k in self-attention), probabilities softmax(q k^T / sqrt(d)) kept whole."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        b = hidden_states.shape[0]
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb)
            if not attn.is_cross_attention:
                k = apply_rotary_emb(k, image_rotary_emb)
        p = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        self.store[self.name] = p
        out = (p @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize('attn_maps', ['reduced', 'full'])
def test_attention_maps_equal_their_store_processor(attn_maps):
    """`-self-map` / `-cross-map` (issue #27.6) against their processor on diffusers' transformer: whole with
    attn_maps='full', else reduced as PixArt's (self: mean over queries per head; cross: mean over heads)."""
    from golden_taps import fill_weights

    model = timm.create_model('test_hunyuan_dit', attn_maps=attn_maps).eval()
    fill_weights(model, seed=4)
    model.prompt_mask.copy_(torch.tensor([[1.0] * 5 + [0.0] * 3]))
    model.prompt_mask_t5.copy_(torch.tensor([[1.0] * 6 + [0.0] * 2]))
    ref = HunyuanDiT2DModel(**hy._HUNYUAN_TEST).eval()
    missing, unexpected = ref.load_state_dict(
        {k[12:]: v for k, v in model.state_dict().items() if k.startswith('transformer.')}, strict=False)
    assert not unexpected and all(k.startswith(('norm_out', 'proj_out')) for k in missing)
    store = {}
    for k in (0, 3, 5):
        for a, kind in (('attn1', 'self'), ('attn2', 'cross')):
            getattr(ref.blocks[k], a).set_processor(_TheirStoreProcessor(store, f'vit-block{k}-{kind}-map'))
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    grid = (4, 6)
    n = 2
    with torch.no_grad():
        ref(z, model.timestep.expand(n), encoder_hidden_states=model.prompt_embeds.repeat(n, 1, 1),
            text_embedding_mask=model.prompt_mask.repeat(n, 1),
            encoder_hidden_states_t5=model.prompt_embeds_t5.repeat(n, 1, 1),
            text_embedding_mask_t5=model.prompt_mask_t5.repeat(n, 1), image_meta_size=model.image_meta_size.repeat(n, 1),
            style=torch.zeros(n, dtype=torch.long), image_rotary_emb=model.rotary(grid, z.device), return_dict=False)
        ours = model.transformer_features(z, model._resolve(list(store)))
    assert store['vit-block0-cross-map'].shape == (2, 2, 24, 16)  # CLIP's 8 tokens, then mT5's 8
    for name, p in store.items():
        want = p if attn_maps == 'full' else p.mean(1).transpose(1, 2) if 'cross' in name else p.mean(2)
        if attn_maps != 'full':
            want = want.unflatten(2, grid)
        torch.testing.assert_close(ours[name], want, rtol=1e-4, atol=1e-6, msg=name)
