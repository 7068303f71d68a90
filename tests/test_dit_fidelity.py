"""PixArt and FLUX taps against Meng et al.'s extraction (github Darkbblue/generic-diffusion-feature), re-implemented
here from their steps on stock diffusers with the same tiny random weights, noise and prompt:

* FLUX: their `FluxImg2ImgPipeline` copy returns right after the first transformer call, called with
  `strength = t / 1000`, guidance 1 and no height / width (so the image is resized to 1024 x 1024); their
  `FluxAttnStoreProcessor` materialises the joint softmax and keeps its image-query rows over the prompt keys
  (`-cross-map`) and over the image keys (`-self-map`).
* PixArt: their `AttnStoreProcessor` runs the attention with `Attention.prepare_attention_mask` and
  `get_attention_scores` (the prompt mask as a -10000 bias) and keeps the probabilities; prompts come from the
  pipeline's `encode_prompt` (lower-cased and stripped).

Their maps are (B, heads, N, keys); ours are reduced as documented (`attention_taps.MAP_REDUCTIONS`) unless
`attn_maps='full'`, which must equal theirs as they are.
"""
import functools
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import (
    AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline,
    PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone import cli, prompts
from diffbackbone.models import pixart as px
from diffbackbone.models._base import VAE_TEST
from test_flux import _tiny_flux_repo
from test_newer_models import _tiny_t5_repo


class _Stop(Exception):
    """Their pipeline's `return` after the first transformer call."""


# ---- FLUX ------------------------------------------------------------------------------------------------------------
class TheirFluxAttention:
    """Meng et al.'s `FluxAttnStoreProcessor`, step by step: q / k / v of the image tokens, the joint attention with
    explicit probabilities, its image-query rows over the prompt keys and over the image keys, the attention output."""

    def __init__(self, store: dict, block: str, text_len: int):
        self.store, self.block, self.text_len = store, block, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b, n_txt = hidden_states.shape[0], self.text_len
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        img = slice(None) if encoder_hidden_states is not None else slice(n_txt, None)  # single: text comes first
        for name, t in (('q', q), ('k', k), ('v', v)):
            self.store[f'{self.block}-{name}'] = t[:, img]

        def heads(t):
            return t.view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)

        q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # B, heads, S, S
        self.store[f'{self.block}-cross-map'] = probs[:, :, n_txt:, :n_txt]
        self.store[f'{self.block}-self-map'] = probs[:, :, n_txt:, n_txt:]
        out = (probs @ v).transpose(1, 2).reshape(b, -1, attn.heads * attn.head_dim)
        if encoder_hidden_states is not None:
            ctx, out = out[:, :n_txt], attn.to_out[1](attn.to_out[0](out[:, n_txt:]))
            self.store[f'{self.block}-attn-out'] = out
            return out, attn.to_add_out(ctx)
        self.store[f'{self.block}-attn-out'] = out[:, n_txt:]
        return out


def _their_flux_features(pipe: FluxImg2ImgPipeline, image: Image.Image, prompt: str, text_len: int,
                         call_only: bool = False, **size) -> tuple[dict, dict, dict]:
    """Their extraction: the pipeline at strength 0.05, guidance 1, returning after the first transformer call (with
    `call_only`, before it runs: only its arguments are wanted). Returns (their features, that call's kwargs, the
    blocks' image-token outputs)."""
    tr, store, call, outputs = pipe.transformer, {}, {}, {}

    def record_call(module, args, kwargs):
        call.update(kwargs)
        if call_only:
            raise _Stop

    def stop(module, args, out):
        raise _Stop

    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    hooks = [tr.register_forward_pre_hook(record_call, with_kwargs=True), tr.register_forward_hook(stop)]
    for k, block in enumerate(blocks):
        name = f'vit-block{k}'
        block.attn.set_processor(TheirFluxAttention(store, name, text_len))
        if k < len(tr.transformer_blocks):  # their double block records its norm-out twice: as -norm-out and -out
            hooks.append(block.ff.register_forward_pre_hook(
                lambda m, a, n=name: store.update({f'{n}-norm-out': a[0], f'{n}-out': a[0]})))
            hooks.append(block.ff.net[0].register_forward_hook(
                lambda m, a, o, n=name: store.__setitem__(f'{n}-ffn-inner', o)))
        else:
            hooks.append(block.register_forward_hook(lambda m, a, o, n=name: store.__setitem__(f'{n}-out', o[1])))
        hooks.append(block.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(n, o[1])))
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            pipe(prompt, image=image, strength=0.05, num_inference_steps=28, guidance_scale=1.0,
                 max_sequence_length=text_len, generator=torch.Generator().manual_seed(0), **size)
    finally:
        for h in hooks:
            h.remove()
        tr.set_attn_processor(FluxAttnProcessor())
    return store, call, outputs


def _their_map_reduced(m: torch.Tensor, name: str, grid) -> torch.Tensor:
    """The documented reduction of their (B, heads, N, keys) map."""
    if name.endswith('cross-map'):
        return m.mean(1).transpose(1, 2).unflatten(2, grid)
    return m.mean(2).unflatten(2, grid)


def _nchw(tokens: torch.Tensor, grid) -> torch.Tensor:
    """Their FeatureStore's `b (h w) c -> b c h w`."""
    return tokens.transpose(1, 2).unflatten(2, grid)


@pytest.fixture(scope='module')
def flux_pipe(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    folder = tmp_path_factory.mktemp('flux_fidelity')
    transformer, vae = _tiny_flux_repo(folder)
    pipe = FluxImg2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / 'scheduler'), vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder / 'text_encoder').eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / 'tokenizer'),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / 'text_encoder_2').eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / 'tokenizer_2'), transformer=transformer)
    return folder, pipe


def _flux_model(folder: Path, pipe, prompt: str, **kwargs):
    model = timm.create_model('test_flux', base_repo=str(folder), **kwargs).eval()
    model.transformer.load_state_dict(pipe.transformer.state_dict())  # the latents come from their pipeline
    with torch.no_grad():
        for name, value in model.prompt_tensors(prompt).items():
            getattr(model, name).copy_(value)
    return model


def _image(h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))


def test_flux_call_at_1024_px_has_our_noise_level(flux_pipe, hub_cache):
    """Their call as they make it (no height / width: the image is resized to 1024 x 1024) runs at our timestep and
    noise level, whatever our input's size."""
    folder, pipe = flux_pipe
    model = timm.create_model('test_flux', base_repo=str(folder))
    _, call, _ = _their_flux_features(pipe, _image(48, 80), 'a dog', text_len=8, call_only=True)
    assert call['hidden_states'].shape[1] == 64 * 64  # 1024 px: 64 x 64 tokens
    for latent in ((6, 10), (8, 12), (128, 128)):
        timesteps, sigmas = model.schedule(*latent)
        torch.testing.assert_close(call['timestep'], timesteps[:1] / 1000)
        assert call['timestep'].item() == pytest.approx(sigmas[0].item())  # flow matching: t / 1000 is the sigma
        assert model.noise_level(torch.zeros(1, 16, *latent)) == pytest.approx((1 - sigmas[0].item(),
                                                                                  sigmas[0].item()))


def test_flux_taps_equal_their_one_call(flux_pipe, hub_cache):
    """Every tap kind, reduced and full maps, on the latents of their one call (a 64 x 96 image with height / width
    given, which `shift_size='input'` follows); their double-block `-out` is our `-norm-out`, ours the block output."""
    folder, pipe = flux_pipe
    model = _flux_model(folder, pipe, 'a photo of a dog', shift_size='input')
    full = _flux_model(folder, pipe, 'a photo of a dog', shift_size='input', attn_maps='full')
    theirs, call, outputs = _their_flux_features(pipe, _image(64, 96), 'a photo of a dog', text_len=8, height=64,
                                                 width=96)
    torch.testing.assert_close(call['timestep'], model.schedule(8, 12)[0][:1] / 1000)
    assert call['timestep'] != timm.create_model('test_flux').schedule(8, 12)[0][0] / 1000  # not the 1024-px level
    names = model.tap_names(all=True)
    maps = [n for n in names if n.endswith('map')]
    with torch.no_grad():
        ours = model.features_from_packed(call['hidden_states'], 8, 12, model._resolve(names))
        unreduced = full.features_from_packed(call['hidden_states'], 8, 12, full._resolve(maps))
    assert set(ours) == set(names) and len(names) == 2 * 9 + 3 * 7
    grid = (4, 6)
    for name in names:
        if name in maps:
            want = _their_map_reduced(theirs[name], name, grid)
            torch.testing.assert_close(unreduced[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
        elif name.endswith('-out') and not name.endswith(('attn-out', 'norm-out')):
            want = _nchw(outputs[name[:-4]], grid)  # the block's output (the documented departure for double blocks)
        else:
            want = _nchw(theirs[name], grid)
        torch.testing.assert_close(ours[name], want, rtol=1e-4, atol=1e-5, msg=name)
    for k in (0, 1):  # what their double blocks call -out is our -norm-out
        torch.testing.assert_close(ours[f'vit-block{k}-norm-out'], _nchw(theirs[f'vit-block{k}-out'], grid))
    # one softmax over prompt and image keys: on average a query's mass on the prompt plus on the image is one
    total = ours['vit-block3-cross-map'].sum(1).mean() + ours['vit-block3-self-map'].sum((2, 3)).mean()
    torch.testing.assert_close(total, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert unreduced['vit-block0-self-map'].shape == (1, 2, 24, 24)
    assert unreduced['vit-block4-cross-map'].shape == (1, 2, 24, 8)
    assert {t.name: t for t in full.all_taps}['vit-block0-cross-map'].num_chs == 2  # heads: a full map's dim 1


def test_flux_noise_level_does_not_depend_on_the_input_size():
    with torch.device('meta'):
        dev, schnell = timm.create_model('flux'), timm.create_model('flux_schnell')
        follow = timm.create_model('flux', shift_size='input')
    for model, sigma in ((dev, 0.1955), (schnell, 0.0714)):  # 512 and 1024 px images: 64 and 128 latent sides
        assert model.schedule(64, 64)[1][0].item() == model.schedule(128, 128)[1][0].item() == pytest.approx(
            sigma, abs=5e-5)
    assert follow.schedule(128, 128)[1][0].item() == dev.schedule(128, 128)[1][0].item()
    assert follow.schedule(64, 64)[1][0].item() == pytest.approx(0.1262, abs=5e-5)  # 512 px, shifted for 512 px
    with pytest.raises(ValueError, match='shift_size must be'):
        timm.create_model('test_flux', shift_size=8)
    with pytest.raises(ValueError, match="attn_maps must be 'reduced'"):
        timm.create_model('test_flux', attn_maps='mean')


# ---- PixArt ---------------------------------------------------------------------------------------------------------
class TheirPixArtAttention:
    """Meng et al.'s `AttnStoreProcessor` (diffusers' `AttnProcessor` with the probabilities kept): the mask through
    `prepare_attention_mask`, the scores through `get_attention_scores`."""

    def __init__(self, store: dict, block: str):
        self.store, self.block = store, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        b, m = context.shape[:2]
        mask = attn.prepare_attention_mask(attention_mask, m, b)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        pre = f'{self.block}-{"cross" if cross else "self"}'
        self.store[f'{pre}-q'] = q
        if not cross:  # they drop cross-k and cross-v
            self.store[f'{pre}-k'], self.store[f'{pre}-v'] = k, v
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), mask)
        self.store[f'{pre}-map'] = probs.reshape(b, attn.heads, *probs.shape[1:])
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(v)))
        return attn.to_out[1](attn.to_out[0](out))


PIXART_REPO = 'diffbackbone/test-pixart-fidelity'


@pytest.fixture(scope='module')
def pixart_repo(tmp_path_factory, fake_hub):
    """A tiny PixArt repo (transformer, VAE, T5 and its tokenizer) on the fake Hub, so prompts are cached per commit."""
    folder = tmp_path_factory.mktemp('pixart_fidelity')
    _tiny_t5_repo(folder)
    torch.manual_seed(5)
    transformer = PixArtTransformer2DModel(**px._PIXART_TEST).eval()
    n = len(VAE_TEST['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=VAE_TEST['block_out_channels'], layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n).eval()
    save_file(transformer.state_dict(), folder / 'transformer.safetensors')
    save_file(vae.state_dict(), folder / 'vae.safetensors')
    for part in ('transformer', 'vae'):
        fake_hub.add_file(PIXART_REPO, f'{part}/diffusion_pytorch_model.safetensors', folder / f'{part}.safetensors')
    fake_hub.add_folder(PIXART_REPO, folder / 'tokenizer', prefix='tokenizer')
    fake_hub.add_folder(PIXART_REPO, folder / 'text_encoder', prefix='text_encoder')
    return folder, transformer, vae


@functools.lru_cache(maxsize=1)
def _t5(folder: Path):
    from transformers import AutoTokenizer, T5EncoderModel

    return AutoTokenizer.from_pretrained(folder / 'tokenizer'), T5EncoderModel.from_pretrained(folder / 'text_encoder')


def _pipeline(cls, folder: Path, transformer, vae):
    tokenizer, text_encoder = _t5(folder)
    return cls(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae, transformer=transformer,
               scheduler=DPMSolverMultistepScheduler())


def _pixart_model(transformer, prompt: str, **kwargs):
    """Our model from the Hub repo: the transformer's weights, the prompt's embedding (encoded once per caption)."""
    model = timm.create_model('test_pixart', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=PIXART_REPO),
                              base_repo=PIXART_REPO, prompt=prompt, **kwargs).eval()
    torch.testing.assert_close(model.transformer.pos_embed.proj.weight, transformer.pos_embed.proj.weight)
    return model


def _their_pixart_features(transformer, z, embeds, mask, timestep) -> dict:
    """Their call: the transformer with the prompt mask and their processors on every attention."""
    store, hooks = {}, []
    for k, block in enumerate(transformer.transformer_blocks):
        block.attn1.set_processor(TheirPixArtAttention(store, f'vit-block{k}'))
        block.attn2.set_processor(TheirPixArtAttention(store, f'vit-block{k}'))
        hooks.append(block.register_forward_hook(lambda m, a, o, k=k: store.__setitem__(f'vit-block{k}-out', o)))
        hooks.append(block.ff.net[0].register_forward_hook(
            lambda m, a, o, k=k: store.__setitem__(f'vit-block{k}-ffn-inner', o)))
    try:
        with torch.no_grad():
            transformer(z, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                        timestep=timestep.expand(z.shape[0]),
                        added_cond_kwargs={'resolution': None, 'aspect_ratio': None})
    finally:
        for h in hooks:
            h.remove()
        transformer.set_attn_processor(AttnProcessor2_0())
    return store


@pytest.mark.parametrize('prompt', ['A Dog ', ''])
def test_pixart_taps_equal_their_extraction(pixart_repo, hub_cache, prompt):
    """Every PixArt tap, maps masked: with the empty prompt all of the cross-attention lands on `</s>`."""
    folder, transformer, vae = pixart_repo
    pipe = _pipeline(PixArtSigmaPipeline, folder, transformer, vae)
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=8)
    model = _pixart_model(transformer, prompt)
    torch.testing.assert_close(model.prompt_embeds, embeds)
    assert model.prompt_mask.tolist() == mask.float().tolist()
    z = torch.randn(2, 4, 8, 8)
    theirs = _their_pixart_features(transformer, z, embeds.expand(2, -1, -1), mask.expand(2, -1), model.timestep)
    names = model.tap_names(all=True)
    with torch.no_grad():
        ours = model.transformer_features(z, model._resolve(names))
    assert set(ours) == set(theirs) == set(names)
    for name in names:
        want = _their_map_reduced(theirs[name], name, (4, 4)) if name.endswith('map') else _nchw(theirs[name], (4, 4))
        torch.testing.assert_close(ours[name], want, rtol=1e-4, atol=1e-5, msg=name)
    padding = ~mask[0].bool()
    assert padding.any() and (ours['vit-block2-cross-map'][:, padding] == 0).all()
    if prompt == '':  # one real token, </s>
        torch.testing.assert_close(ours['vit-block2-cross-map'][:, 0], torch.ones(2, 4, 4))

    full = _pixart_model(transformer, prompt, attn_maps='full')
    maps = [n for n in names if n.endswith('map')]
    with torch.no_grad():
        unreduced = full.transformer_features(z, full._resolve(maps))
    for name in maps:
        torch.testing.assert_close(unreduced[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert unreduced['vit-block0-self-map'].shape == (2, 2, 16, 16)
    assert unreduced['vit-block0-cross-map'].shape == (2, 2, 16, 8)


def test_pixart_prompts_are_lower_cased_and_stripped_everywhere(pixart_repo, hub_cache):
    """As the pipelines' `encode_prompt` (`_text_preprocessing`, clean_caption=False), for alpha and Sigma, in
    `prompt=`, `encode_prompts` and per-image prompts."""
    folder, transformer, vae = pixart_repo
    model = _pixart_model(transformer, 'A photo of a Dog')
    lower = model.prompt_tensors('a photo of a dog')
    torch.testing.assert_close(model.prompt_embeds, lower['prompt_embeds'], rtol=0, atol=0)
    for cls in (PixArtSigmaPipeline, PixArtAlphaPipeline):
        embeds, mask, _, _ = _pipeline(cls, folder, transformer, vae).encode_prompt(
            '  A photo of a Dog ', do_classifier_free_guidance=False, max_sequence_length=8)
        torch.testing.assert_close(model.prompt_embeds, embeds)
        assert model.prompt_mask.tolist() == mask.float().tolist()
    assert not torch.allclose(model.prompt_tensors('A Dog')['prompt_embeds'],  # a short one: 8 tokens here
                              model.prompt_tensors('a room')['prompt_embeds'])
    batch = prompts.encode_prompts(model, ['A Dog', ' a dog', 'A Room', 'A photo of a Dog'])
    torch.testing.assert_close(batch.prompt_embeds[0], batch.prompt_embeds[1], rtol=0, atol=0)
    torch.testing.assert_close(batch.prompt_embeds[3:], model.prompt_embeds, rtol=0, atol=0)
    assert batch.prompt_mask[0].sum() < 8 and not torch.allclose(batch.prompt_embeds[0], batch.prompt_embeds[2])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        with prompts.use_prompts(model, ['A DOG ', 'A Room']):
            upper = model.forward_features(x)
        with prompts.use_prompts(model, ['a dog', 'a room']):
            torch.testing.assert_close(model.forward_features(x), upper, rtol=0, atol=0)
        with prompts.use_prompts(model, ['a room', 'a dog']):
            assert not torch.allclose(model.forward_features(x), upper)


def test_pixart_prompt_cache_written_before_lower_casing_is_not_read(pixart_repo, hub_cache):
    """The cache key is versioned: an entry keyed by the raw prompt (what was cached before captions were
    pre-processed) is never read for that prompt; captions that pre-process alike share one entry."""
    _, transformer, _ = pixart_repo
    want = _pixart_model(transformer, 'a photo of a dog').prompt_embeds
    written = list((hub_cache.ours / 'prompt_embeds').rglob('t5-*.safetensors'))
    assert len(written) == 1 and written[0].name.startswith('t5-v2-')
    old_key = hashlib.sha256('8\0A photo of a Dog'.encode()).hexdigest()[:32]  # the key before versioning
    save_file({'prompt_embeds': torch.full_like(want, 7.0), 'prompt_mask': torch.ones(1, 8)},
              written[0].parent / f't5-{old_key}.safetensors')
    written[0].unlink()
    torch.testing.assert_close(_pixart_model(transformer, 'A photo of a Dog').prompt_embeds, want, rtol=0, atol=0)
    assert written[0].is_file()  # encoded again, under the caption's key
    torch.testing.assert_close(_pixart_model(transformer, ' a photo of a dog').prompt_embeds, want, rtol=0, atol=0)
    assert len(list((hub_cache.ours / 'prompt_embeds').rglob('t5-v2-*.safetensors'))) == 1


def test_taps_all_documents_each_map_reduction(capsys):
    for name, heads, mib in (('flux', 24, 1536), ('pixart_sigma', 16, 1024)):
        assert cli.main(['taps', name, '--all']) == 0
        out = capsys.readouterr().out
        notes = out[out.index('attention maps'):]
        assert 'attn_maps="full"' in notes and '*-self-map (' in notes and '*-cross-map (' in notes
        assert '(B, heads, N, N)' in notes and '(B, heads, N, tokens)' in notes and f'{mib} MiB' in notes
        assert heads * 4096 * 4096 * 4 == mib * 2 ** 20  # 1024 px: 64 x 64 tokens, float32
        assert ('not renormalised' in notes) == (name == 'flux')  # FLUX: parts of one joint softmax
    assert cli.main(['taps', 'flux']) == 0
    assert 'attention maps' not in capsys.readouterr().out  # the maps are listed (and explained) with --all


@pytest.mark.parametrize('name, config', [('test_pixart', px._PIXART_TEST), ('test_sd3', None)])
def test_pyramid_of_fewer_than_four_blocks_takes_each_block_once(name, config):
    """`pyramid` = four evenly spaced blocks; with fewer blocks, each one once (not a preset naming a block twice,
    which `features_only` refuses)."""
    from diffbackbone.models import sd3

    config = config or sd3._SD3_TEST
    for n, want in ((1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (8, [1, 3, 5, 7]), (28, [6, 13, 20, 27])):
        with torch.device('meta'):
            model = timm.create_model(name, transformer_cfg=dict(config, num_layers=n))
        assert model.presets['pyramid'] == tuple(f'vit-block{k}-out' for k in want)
    torch.manual_seed(0)
    feat = timm.create_model(name, transformer_cfg=dict(config, num_layers=2), features_only=True).eval()
    assert [i['name'] for i in feat.feature_info.get_dicts()] == ['vit-block0-out', 'vit-block1-out']
    with torch.no_grad():
        assert [tuple(f.shape[-2:]) for f in feat(torch.rand(1, 3, 64, 64) * 2 - 1)] == [(4, 4), (4, 4)]
