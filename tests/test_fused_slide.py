"""The sliding window and the SD pass of "A Tale of Two Features" (#27): the fused models against their steps re-done
here from sd-dino's ODISE (`FeatureExtractorBackbone.slide_forward` with `raw=True`, `LdmExtractor.forward` with
`decoder_only=True`) on plain diffusers modules holding the same tiny weights."""
import itertools
from typing import Optional

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

import diffbackbone  # noqa: F401
from diffbackbone import cli
from diffbackbone.models import fused
from diffbackbone.models._vae import VAE_TEST
from diffbackbone.models.fused import FusedBackbone, window_starts
from golden_taps import fill_weights

TAPS = ('us8', 'us5', 'us2')  # their s3, s4, s5: LDM output blocks 8, 5, 2
WINDOW = 128  # the tiny models' native size, as 512 is SD's: 240 px is their 960 px scaled (offsets 0 and 112)


def _tale_sd(**kwargs) -> FusedBackbone:
    """Tiny noisy SD (test_dift) + tiny DINOv2 with the paper's SD settings (those of `sd15_dinov2`), seeded weights."""
    model = timm.create_model('diffusion_dinov2', diffusion='test_dift', dino='test_vit_dinov2',
                              **{**fused._TALE_SD_NOISE, 'slide_window': WINDOW, **kwargs}).eval()
    fill_weights(model)
    return model


@pytest.fixture(scope='module')
def model() -> FusedBackbone:
    return _tale_sd()


def _diffusers_parts(model: FusedBackbone) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """Plain diffusers VAE and UNet holding the fused model's diffusion weights (VAE decoder and UNet head random)."""
    net = model.diffusion
    unet = UNet2DConditionModel(**net.unet.config).eval()
    missing, unexpected = unet.load_state_dict({k[5:]: v for k, v in net.state_dict().items() if k.startswith('unet.')},
                                               strict=False)
    assert not unexpected and all(k.startswith(('conv_norm_out', 'conv_out')) for k in missing)
    n = len(VAE_TEST['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=VAE_TEST['block_out_channels'], latent_channels=4,
                        layers_per_block=VAE_TEST['layers_per_block'], norm_num_groups=VAE_TEST['norm_num_groups'],
                        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n).eval()
    missing, unexpected = vae.load_state_dict({k[4:]: v for k, v in net.state_dict().items() if k.startswith('vae.')},
                                              strict=False)
    assert not unexpected and all(k.startswith(('decoder', 'post_quant_conv')) for k in missing)
    return vae, unet


def _their_crop_features(vae, unet, context, crop: torch.Tensor, t: int = 100) -> dict[str, torch.Tensor]:
    """ODISE's `LdmExtractor.forward` on one crop, sd-dino's settings: the posterior mean times the scale factor; their
    `shared_noise` (randn(1, 4, latent size), CPU generator seeded 42) expanded to the batch; `q_sample` with the
    "ldm_linear" betas (float64); the UNet at t with the empty prompt; `decoder_only`: h before the skip is concatenated
    at output blocks 2, 5, 8 (= diffusers' third resnet of up blocks 0, 1, 2)."""
    latent = vae.encode(crop).latent_dist.mean * 0.18215
    noise = torch.randn(1, 4, *latent.shape[2:], generator=torch.Generator().manual_seed(42)).expand_as(latent)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    noisy = (torch.tensor(np.sqrt(ac[t])).float() * latent + torch.tensor(np.sqrt(1.0 - ac[t])).float() * noise)
    got = {}
    handles = []
    for name, block in zip(('s5', 's4', 's3'), unet.up_blocks[:3]):
        width = block.resnets[1].out_channels  # h; the rest of the resnet's input is the skip

        def pre_hook(mod, args, name=name, width=width):
            got[name] = args[0][:, :width]
        handles.append(block.resnets[2].register_forward_pre_hook(pre_hook))
    unet(noisy, torch.full((crop.shape[0],), t), encoder_hidden_states=context.expand(crop.shape[0], -1, -1))
    for h in handles:
        h.remove()
    return got


def _their_slide(x: torch.Tensor, crop_fn, strides: dict[str, int], crop: int = WINDOW,
                 step: Optional[int] = None) -> dict[str, torch.Tensor]:
    """ODISE's `slide_forward` (slide_training=True, raw=True), step by step; `step` replaces their stride (the
    window side) to check our `slide_stride`."""
    b, _, h_img, w_img = x.shape
    short_side = min(crop, min(x.shape[-2:]))
    h_crop = w_crop = h_stride = w_stride = short_side
    if step is not None:
        h_stride = w_stride = step
    out, count = {}, {}
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            for k, f in crop_fn(x[:, :, y1:y2, x1:x2]).items():
                s = strides[k]
                if k not in out:
                    out[k] = torch.zeros(b, f.shape[1], h_img // s, w_img // s)
                    count[k] = torch.zeros_like(out[k])
                out[k][:, :, y1 // s:y2 // s, x1 // s:x2 // s] += f
                count[k][..., y1 // s:y2 // s, x1 // s:x2 // s] += 1
    assert all((c > 0).all() for c in count.values())
    return {k: out[k] / count[k] for k in out}


def _their_fused(model: FusedBackbone, x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Their fusion of the raw maps: s5 up to s4, [s4, s5] up to s3, [s3, ...]; DINOv2 block tokens at the s3 grid x 14
    (no final norm); each source L2-normalised, concatenated."""
    s3, s4, s5 = sd['s3'], sd['s4'], sd['s5']
    s45 = torch.cat([s4, F.interpolate(s5, size=s4.shape[-2:], mode='bilinear', align_corners=False)], 1)
    stack = torch.cat([s3, F.interpolate(s45, size=s3.shape[-2:], mode='bilinear', align_corners=False)], 1)
    h, w = s3.shape[-2:]
    img = F.interpolate((x + 1) / 2, size=(h * 14, w * 14), mode='bilinear', align_corners=False, antialias=True)
    img = (img - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    dino = model.dino.get_intermediate_layers(img, n=[model.dino_layer], reshape=True, norm=False)[0]
    return torch.cat([stack / stack.norm(dim=1, keepdim=True), dino / dino.norm(dim=1, keepdim=True)], 1)


def _images(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize('size, step', [((240, 240), None), ((192, 256), None), ((256, 256), 64)])
def test_fused_descriptors_equal_their_sliding_window(model, size, step):
    """Their 2 x 2 windows at offsets 0 and 112 (960 / 512 scaled: placed at offset // stride, overlaps averaged), a
    wide image (windows 0 / 64 down, 0 / 128 across), and our `slide_stride` (3 x 3 windows); the posterior mean and
    their seed-42 noise in each window."""
    x = _images(*size)
    if step is not None:
        model = _tale_sd(slide_stride=step)
    vae, unet = _diffusers_parts(model)
    strides = dict(s3=16, s4=32, s5=64)
    with torch.no_grad():
        theirs = _their_slide(x, lambda c: _their_crop_features(vae, unet, model.diffusion.prompt_embeds, c), strides,
                              step=step)
        want = _their_fused(model, x, theirs)
        got = model.forward_intermediates(x, indices=['fused', *TAPS], intermediates_only=True)
    for name, ours in zip(('s3', 's4', 's5'), got[1:]):
        assert ours.shape == theirs[name].shape
        torch.testing.assert_close(ours, theirs[name], rtol=1e-5, atol=1e-5)
    assert got[0].shape == want.shape == (2, 32 * 3 + 24, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    if size == (240, 240):  # each part of their SD pass matters at this tolerance
        for other in (dict(noise_seed=0), dict(latent='sample'), dict(timestep=99), dict(slide=False)):
            with torch.no_grad():
                moved = _tale_sd(**other).forward_intermediates(x, indices=['us8'], intermediates_only=True)[0]
            assert moved.shape != theirs['s3'].shape or (moved - theirs['s3']).abs().max() > 1e-3, other


def test_window_starts_are_their_clamped_grid():
    for size, window, stride in itertools.product(range(1, 40), range(1, 40), range(1, 40)):
        if window > size or stride > window:
            continue
        grids = max(size - window + stride - 1, 0) // stride + 1
        theirs = [max(min(i * stride + window, size) - window, 0) for i in range(grids)]
        assert window_starts(size, window, stride) == theirs, (size, window, stride)
    assert window_starts(960, 512, 512) == [0, 448]


def test_one_pass_option_and_single_window(model):
    """`slide=False` is one pass over the whole image; an image the window covers whole is one pass too (the tiny
    fused model at 128 px, as its golden taps were recorded)."""
    x = _images(240, 240, n=1, seed=1)
    one = _tale_sd(slide=False)
    with torch.no_grad():
        whole = model.diffusion.forward_intermediates(x, indices=list(TAPS), intermediates_only=True)
        for a, b in zip(one.forward_intermediates(x, indices=list(TAPS), intermediates_only=True), whole):
            assert torch.equal(a, b)
        assert one.forward_features(x).shape[-2:] == (15, 15)
        small = _images(WINDOW, WINDOW, n=1)
        assert torch.equal(model.forward_features(small), one.forward_features(small))


def test_presets_take_their_sd_pass(monkeypatch):
    """The paper's SD presets: t=100, one draw, posterior mean, their seed (arguments given still win); the fused
    models slide 512-px windows unless told `slide=False`."""
    seen = {}
    monkeypatch.setattr(fused, '_create_fused', lambda variant, pretrained=False, **kw: seen.__setitem__(variant, kw))
    for name in ('sd15_dinov2', 'sd21_dinov2', 'cleandift_sd21_dinov2', 'cleandift_sd15_dinov2'):
        getattr(fused, name)()
    for name in ('sd15_dinov2', 'sd21_dinov2'):
        assert {k: seen[name][k] for k in ('timestep', 'ensemble', 'latent', 'noise_seed')} == dict(
            timestep=100, ensemble=1, latent='mode', noise_seed=42)
    assert 'latent' not in seen['cleandift_sd21_dinov2']  # clean: the posterior mode already, no noise
    assert not any('slide' in kw for kw in seen.values())  # the class default: their window
    fused.sd15_dinov2(latent='sample', slide=False)
    assert seen['sd15_dinov2']['latent'] == 'sample' and seen['sd15_dinov2']['slide'] is False
    assert fused.WindowConfig() == fused.WindowConfig(slide=True, slide_window=512, slide_stride=None)


def test_window_errors(model, tmp_path, capsys):
    from diffbackbone.errors import InputError

    with pytest.raises(InputError, match='does not tile'):  # 96 px windows cut the stride-64 map of us2
        with torch.no_grad():
            _tale_sd(slide_window=96).forward_features(_images(240, 240, n=1))
    for bad in (dict(slide='yes'), dict(slide_window=0), dict(slide_stride=2.5), dict(slide_stride=513)):
        with pytest.raises(InputError, match=next(iter(bad))):
            fused.WindowConfig(**bad)
    from PIL import Image

    for i in range(2):
        Image.new('RGB', (64, 48), (40 * i, 90, 20)).save(tmp_path / f'{i}.png')
    rc = cli.main(['match', str(tmp_path / '0.png'), str(tmp_path / '1.png'), '--points', '3,4', '--model',
                   'test_cleandift_dinov2', '--random-weights', '--size', '128', '--model-kwargs',
                   '{"slide_window": 0}'])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('error:') == 1 and 'slide_window' in err


def test_caches_and_stores_of_one_pass_fused_features_are_not_reused(tmp_path, capsys):
    """The fused features changed (sliding window): an eval cache or a store made before is not read as theirs."""
    import argparse
    import json

    from PIL import Image

    from diffbackbone.evals.common import feature_cache
    from diffbackbone.evals.feature_cache import FeatureCache

    args = argparse.Namespace(cache=str(tmp_path / 'cache'), model='test_cleandift_dinov2', weights=None,
                              random_weights=True, seed=0, dtype='float32')
    cache = feature_cache(args, 'fused', {})
    assert cache.config['features_revision'] == 2
    before = FeatureCache(args.cache, {k: v for k, v in cache.config.items() if k != 'features_revision'})
    assert before.folder != cache.folder
    args.model = 'test_cleandift'  # other families keep their keys
    assert 'features_revision' not in feature_cache(args, 'us6', {}).config

    data = tmp_path / 'data'
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / 'a.png')
    store = tmp_path / 'store'
    run = ['features', str(data), '--model', 'test_cleandift_dinov2', '--random-weights', '--size', '128',
           '--workers', '1', '--out', str(store)]
    assert cli.main(run) == 0
    index = json.loads((store / 'index.json').read_text())
    assert index['config']['features_revision'] == 2
    del index['config']['features_revision']  # as a store written before the sliding window
    (store / 'index.json').write_text(json.dumps(index))
    capsys.readouterr()
    assert cli.main(run) == 2
    assert 'features_revision: stored None, asked 2' in capsys.readouterr().err
