"""`diffbackbone.record(pipe, ...)`: our taps of a user's own diffusers pipeline at chosen denoiser calls (Meng et al.'s
background extraction, `generate_with_extraction.py`), checked against forward hooks placed by hand on the same tiny
pipelines (real diffusers `StableDiffusionPipeline` and `PixArtSigmaPipeline`), and `diffbackbone generate`."""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel,
    StableDiffusionPipeline, UNet2DConditionModel,
)

import diffbackbone
from diffbackbone.errors import InputError
from diffbackbone.models import diffusion_unet as du, pixart as px
from diffbackbone.models._vae import SCHEDULER_SD, VAE_TEST
from diffbackbone.models.record import pipeline_taps
from fakehub import save_tiny_clip

pytestmark = pytest.mark.usefixtures('one_thread')

STEPS, CALLS = 3, [1, 3]


def _vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    n = len(VAE_TEST['block_out_channels'])
    return AutoencoderKL(block_out_channels=VAE_TEST['block_out_channels'], layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, **kwargs,
                         down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n).eval()


@pytest.fixture(scope='module')
def sd_pipe(tmp_path_factory) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion pipeline as a user builds one: CLIP tokenizer and text encoder, VAE, UNet, DDIM."""
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    te, tok = save_tiny_clip(tmp_path_factory.mktemp('clip'))
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel.from_pretrained(te).eval(), tokenizer=CLIPTokenizer.from_pretrained(tok),
        unet=UNet2DConditionModel(**du._UNET_TEST).eval(),
        scheduler=DDIMScheduler(**SCHEDULER_SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_sd(pipe) -> torch.Tensor:
    return pipe('a cat', num_inference_steps=STEPS, height=64, width=64, output_type='pt',
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope='module')
def pixart_pipe() -> PixArtSigmaPipeline:
    """A tiny PixArt-Sigma pipeline run on precomputed T5 embeddings (no text encoder), as the pipeline allows."""
    torch.manual_seed(0)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(),
                               transformer=PixArtTransformer2DModel(**px._PIXART_TEST).eval(),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pixart(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    embeds, neg = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])  # padding tokens: their attention is masked
    return pipe(negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]), num_inference_steps=STEPS,
                height=64, width=64, output_type='pt', generator=torch.Generator().manual_seed(0),
                use_resolution_binning=False).images


# --- the reference: forward hooks placed by hand, on every call ------------------------------------------------------
class HandHooks:
    """Forward hooks placed by hand; `maps[name]` lists what each denoiser call gave (computed here from the modules'
    own inputs and outputs, by the definitions in `_taps.py`, with none of our recording code)."""

    def __init__(self):
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self.grid: dict[str, tuple[int, int]] = {}

    def add(self, name: str, module, fn, pre: bool = False) -> None:
        def hook(m, args, out=None):
            self.maps.setdefault(name, []).append(fn(args, out))
        self.handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    def track_grid(self, key: str, module, grid) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, args, kwargs: self.grid.__setitem__(
            key, grid(args, kwargs)), with_kwargs=True))

    def keep(self, key: str, module) -> None:
        """The last output of `module` (a projection a map is computed from)."""
        self.handles.append(module.register_forward_hook(lambda m, a, o: self.grid.__setitem__(key, o)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def nchw(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], *grid)


def probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, (B, heads, N, M), as diffusers' `Attention.get_attention_scores`."""
    q = q.float().unflatten(-1, (heads, -1)).transpose(1, 2)
    k = k.float().unflatten(-1, (heads, -1)).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(logits if bias is None else logits + bias[:, None], dim=-1)


def attention_taps(hooks: HandHooks, block, point: str, grid_key: str, mask_key: str = None) -> None:
    """Hand hooks of one transformer block: cross-q, self-map (mean over queries), cross-map (mean over heads),
    ffn-inner, block output."""
    g = lambda: hooks.grid[grid_key]  # noqa: E731
    a1, a2 = block.attn1, block.attn2
    hooks.keep(f'{point}.q1', a1.to_q)
    hooks.keep(f'{point}.k1', a1.to_k)
    hooks.keep(f'{point}.q2', a2.to_q)
    hooks.keep(f'{point}.k2', a2.to_k)
    hooks.add(f'{point}-cross-q', a2.to_q, lambda a, o: nchw(o, g()))
    hooks.add(f'{point}-self-map', a1, lambda a, o: probabilities(
        hooks.grid[f'{point}.q1'], hooks.grid[f'{point}.k1'], a1.heads).mean(2).unflatten(2, g()))
    bias = (lambda: (1 - hooks.grid[mask_key].float()) * -10000.0) if mask_key else (lambda: None)
    hooks.add(f'{point}-cross-map', a2, lambda a, o: probabilities(
        hooks.grid[f'{point}.q2'], hooks.grid[f'{point}.k2'], a2.heads, bias()).mean(1).transpose(1, 2).unflatten(2, g()))
    hooks.add(f'{point}-ffn-inner', block.ff.net[0], lambda a, o: nchw(o, g()))
    hooks.add(f'{point}-out', block, lambda a, o: nchw(o, g()))


def _check(rec, hooks: HandHooks, names, exact) -> None:
    assert sorted(rec.features) == sorted(names)
    for name in names:
        assert sorted(rec.features[name]) == CALLS, name  # only the chosen calls are kept
        assert len(hooks.maps[name]) == STEPS
        for call in CALLS:
            got, want = rec.features[name][call], hooks.maps[name][call - 1]
            assert got.shape[0] == 2, name  # both classifier-free guidance halves, as the pipeline ran them
            if name in exact:
                assert torch.equal(got, want), name
            else:  # maps: softmax of q k^T in another operation order
                torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6, msg=name)


def test_unet_taps_equal_hand_hooks_and_image_unchanged(sd_pipe):
    unet = sd_pipe.unet
    up = unet.up_blocks[1]
    hooks = HandHooks()
    hooks.track_grid('up1.2', up.attentions[1], lambda a, kw: tuple(a[0].shape[-2:]))
    point = 'up-level1-repeat1-vit-block0'
    attention_taps(hooks, up.attentions[1].transformer_blocks[0], point, 'up1.2')
    first = lambda a, o: o[0] if isinstance(o, tuple) else o.sample  # noqa: E731
    hooks.add('unet-in', unet.conv_in, lambda a, o: a[0], pre=True)
    hooks.add('unet-out', unet.conv_out, lambda a, o: o)
    hooks.add('down-level0-repeat0-res-increment', unet.down_blocks[0].resnets[0].conv2, lambda a, o: o)
    hooks.add('up-level1-repeat1-res-out', up.resnets[1], lambda a, o: o)
    hooks.add('up-level1-repeat1-vit-out', up.attentions[1], first)
    hooks.add('up-level2-upsampler-out', unet.up_blocks[2].upsamplers[0], lambda a, o: o)
    hooks.add('mid', unet.mid_block, lambda a, o: o)
    names = [*(f'{point}-{s}' for s in ('cross-q', 'self-map', 'cross-map', 'ffn-inner', 'out')), 'unet-in', 'unet-out',
             'down-level0-repeat0-res-increment', 'up-level1-repeat1-res-out', 'up-level1-repeat1-vit-out',
             'up-level2-upsampler-out', 'mid']
    try:
        with diffbackbone.record(sd_pipe, names, calls=CALLS) as rec:
            image = _run_sd(sd_pipe)
    finally:
        hooks.remove()
    maps = {f'{point}-self-map', f'{point}-cross-map'}
    _check(rec, hooks, names, exact=set(names) - maps)
    assert rec.features[f'{point}-cross-map'][1].shape == (2, 77, 2, 2)  # one channel per CLIP token
    assert torch.equal(image, _run_sd(sd_pipe))  # recording changed nothing in the generation
    assert not unet._forward_hooks and not unet._forward_pre_hooks  # and left no hook behind


def test_pixart_taps_equal_hand_hooks_and_image_unchanged(pixart_pipe):
    tr = pixart_pipe.transformer
    hooks = HandHooks()
    hooks.track_grid('grid', tr, lambda a, kw: (a[0].shape[-2] // 2, a[0].shape[-1] // 2))
    hooks.handles.append(tr.register_forward_pre_hook(
        lambda m, a, kw: hooks.grid.__setitem__('mask', kw['encoder_attention_mask'][:, None]), with_kwargs=True))
    attention_taps(hooks, tr.transformer_blocks[2], 'vit-block2', 'grid', mask_key='mask')
    hooks.add('vit-block0-self-q', tr.transformer_blocks[0].attn1.to_q, lambda a, o: nchw(o, hooks.grid['grid']))
    names = [f'vit-block2-{s}' for s in ('cross-q', 'self-map', 'cross-map', 'ffn-inner', 'out')] + ['vit-block0-self-q']
    try:
        with diffbackbone.record(pixart_pipe, names, calls=CALLS) as rec:
            image = _run_pixart(pixart_pipe)
    finally:
        hooks.remove()
    _check(rec, hooks, names, exact=set(names) - {'vit-block2-self-map', 'vit-block2-cross-map'})
    cross = rec.features['vit-block2-cross-map'][3]
    assert cross.shape == (2, 8, 4, 4) and cross[0, 1:].abs().max() == 0  # the negative prompt's padding: masked
    assert torch.equal(image, _run_pixart(pixart_pipe))


def test_tap_tables_are_the_backbones(sd_pipe, pixart_pipe):
    """Names, channels, strides and modules of the pipeline's taps are those of our backbone of that family."""
    def table(taps):
        return [(t.name, t.location, t.aliases, t.num_chs, t.reduction, t.module, t.hook) for t in taps]

    unet_model = timm.create_model('test_dift', pretrained=False)
    all_taps, default, _ = pipeline_taps(sd_pipe)
    assert table(all_taps) == table(sorted(unet_model.all_taps, key=lambda t: t.seq))
    assert table(default) == table(unet_model.taps)
    pixart_model = timm.create_model('test_pixart', pretrained=False)
    all_taps, default, presets = pipeline_taps(pixart_pipe)
    ours = [t if t.hook != 'cross-map' else t.__class__(**{**t.__dict__, 'num_chs': 300}) for t in pixart_model.all_taps]
    assert table(all_taps) == table(ours)  # cross-maps: the Sigma pipeline's 300 prompt tokens (the tiny model's 8)
    assert table(default) == table(pixart_model.taps) and presets == pixart_model.presets


def test_presets_indices_and_device(sd_pipe):
    with diffbackbone.record(sd_pipe, 'pyramid', calls=2, device='cpu') as rec:
        _run_sd(sd_pipe)
    assert list(rec.features) == ['us9', 'us6', 'us3', 'mid'] and rec.count == STEPS
    assert all(list(v) == [2] for v in rec.features.values())
    with diffbackbone.record(sd_pipe, [0], calls=[1]) as rec:  # an index of the default taps, as out_indices
        _run_sd(sd_pipe)
    assert list(rec.features) == [rec.taps[0].name]


@pytest.mark.parametrize('calls, match', [
    ([], 'list of denoiser calls'), ([0, 2], 'whole number >= 1'), ([2, 2], 'twice'), ('1', 'list of denoiser'),
    ([1.5], 'whole number'),
])
def test_bad_calls(sd_pipe, calls, match):
    with pytest.raises(InputError, match=match):
        diffbackbone.record(sd_pipe, 'us6', calls=calls)


def test_calls_beyond_the_run(sd_pipe):
    with pytest.raises(InputError, match=r'calls \[4, 9\] were asked for.*3 times.*from 1 to 3') as e:
        with diffbackbone.record(sd_pipe, 'us6', calls=[1, 4, 9]) as rec:
            _run_sd(sd_pipe)
    assert '\n' not in str(e.value) and rec.features == {}  # nothing kept
    assert not sd_pipe.unet._forward_hooks and not sd_pipe.unet._forward_pre_hooks


def test_unknown_pipeline_and_tap(sd_pipe):
    class Other:
        unet = torch.nn.Conv2d(4, 4, 1)

    with pytest.raises(InputError, match='Other has a denoiser diffbackbone has no taps for .unet=Conv2d'):
        diffbackbone.record(Other(), 'us6', calls=[1])
    with pytest.raises(InputError, match='no pipe.unet or pipe.transformer'):
        diffbackbone.record(object(), 'us6', calls=[1])
    with pytest.raises(diffbackbone.TapError, match='Unknown tap'):
        diffbackbone.record(sd_pipe, 'no-such-tap', calls=[1])


# --- diffbackbone generate ----------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def base_repo(fake_hub, tmp_path_factory):
    """The tiny SD base repo `test_dift` loads: its UNet, the whole VAE (decoder included), CLIP."""
    from safetensors.torch import save_file

    from fakehub import publish_base_repo

    torch.manual_seed(0)
    publish_base_repo(fake_hub, 'diffbackbone/test-base', _vae().state_dict(), cross_attention_dim=32)
    unet = tmp_path_factory.mktemp('unet') / 'unet.safetensors'
    save_file(UNet2DConditionModel(**du._UNET_TEST).state_dict(), unet)
    fake_hub.add_file('diffbackbone/test-base', 'unet/diffusion_pytorch_model.safetensors', unet)


def _generate(out, *extra) -> int:
    from diffbackbone.cli import main

    return main(['generate', '--model', 'test_dift', '--prompt', 'a cat', '--taps', 'us6', 'mid',
                 'up-level1-repeat1-vit-block0-cross-map', '--steps', '2', '--size', '64', '--out', str(out),
                 '--store-dtype', 'float32', *extra])


def test_generate_writes_a_store_that_reads_back(base_repo, hub_cache, tmp_path, capsys):
    from PIL import Image

    from diffbackbone.models.record import build_pipeline

    out = tmp_path / 'synthetic'
    assert _generate(out, '--calls', '1', '3', '--images', '2') == 0
    store = diffbackbone.FeatureStore(out)
    paths = [str(out / 'images' / f'{i:05d}.png') for i in range(2)]
    assert sorted(store.paths) == paths
    assert store.taps == [f'{t}@{c}' for t in ('us6', 'mid', 'up-level1-repeat1-vit-block0-cross-map') for c in (1, 3)]
    # what was stored is what recording the model's own pipeline gives, and the picture is that run's
    model = timm.create_model('test_dift', pretrained=True)
    pipe = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cond = model.encode_prompts(['a cat', ''])
    for i, path in enumerate(paths):
        with diffbackbone.record(pipe, ['us6', 'mid', 'up-level1-repeat1-vit-block0-cross-map'], calls=[1, 3]) as rec:
            image = pipe(prompt_embeds=cond['a cat']['prompt_embeds'], negative_prompt_embeds=cond['']['prompt_embeds'],
                         num_inference_steps=2, height=64, width=64,
                         generator=torch.Generator().manual_seed(i)).images[0]
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
        got = store[path]
        for name, per_call in rec.features.items():
            for call, m in per_call.items():
                assert torch.equal(got[f'{name}@{call}'], m), (name, call)
    assert got['us6@3'].shape == (2, 32, 4, 4)  # both guidance halves
    # the PNDM scheduler calls the UNet once more than it has steps: 3 calls for 2 steps
    assert '2 images with 6 maps each (2 new; 3 UNet calls per image)' in capsys.readouterr().out
    # resumable, growable: a third picture is the only one generated
    before = (out / 'images' / '00000.png').stat().st_mtime_ns
    assert _generate(out, '--calls', '1', '3', '--images', '3') == 0
    assert '3 images with 6 maps each (1 new;' in capsys.readouterr().out
    assert (out / 'images' / '00000.png').stat().st_mtime_ns == before and len(diffbackbone.FeatureStore(out)) == 3


@pytest.mark.parametrize('extra, message', [
    (['--calls', '1', '4'], r'calls \[4\] are beyond the run.s 3 denoiser calls.*PNDMScheduler, --steps 2: 3 UNet calls'),
    (['--calls', '1', '--model', 'test_pixart'], 'generate builds the text-to-image pipeline of the latent UNet'),
    (['--calls', '1', '--size', '72'], 'multiple of 64 px'),
    (['--calls', '1', '--taps', 'nope'], "Unknown tap 'nope'"),
])
def test_generate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / 'synthetic'
    assert _generate(out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and re.search(message, err), err
    assert not out.exists()


def test_flux_grid_from_position_ids(tmp_path):
    """FLUX's transformer sees packed tokens and keyword arguments only: the token grid comes from its position ids."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffbackbone.models import flux

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**flux._FLUX_TEST).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**flux._SCHEDULER_DEV), vae=_vae(16, shift_factor=0.1159),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    hooks = HandHooks()
    grid = (4, 6)  # a 64 x 96 picture: 8 x 12 latents, 2 x 2 packed
    hooks.add('vit-block1-out', tr.transformer_blocks[1], lambda a, o: nchw(o[1], grid))
    hooks.add('vit-block3-q', tr.single_transformer_blocks[1].attn.to_q, lambda a, o: nchw(o[:, -24:], grid))
    g = torch.Generator().manual_seed(1)
    run = lambda: pipe(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(  # noqa: E731
        1, 32, generator=g), num_inference_steps=STEPS, height=64, width=96, output_type='pt',
        generator=torch.Generator().manual_seed(0)).images
    try:
        with diffbackbone.record(pipe, ['vit-block1-out', 'vit-block3-q'], calls=CALLS) as rec:
            run()
    finally:
        hooks.remove()
    for name in ('vit-block1-out', 'vit-block3-q'):
        for call in CALLS:
            got = rec.features[name][call]
            assert got.shape == (1, 16, 4, 6) and torch.equal(got, hooks.maps[name][call - 1]), name  # no guidance
