"""Fused diffusion + DINOv2 backbones ("A Tale of Two Features"): both parts' weights through the fake Hub, the fused
map against a straightforward re-computation of the recipe, co-PCA per pair, the fixed projection, and the commands."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone import cli
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models.fused import FusedBackbone, co_pca_fuse
from diffbackbone.models._taps import TapError
from fakehub import publish_base_repo
from test_pretrained import _tiny_vae


@pytest.fixture(scope='module')
def published(fake_hub, tmp_path_factory):
    """Tiny SD base repo + CleanDIFT-style UNet, and a tiny DINOv2-layout timm ViT as `diffbackbone/test-dinov2`."""
    torch.manual_seed(1)
    tmp = tmp_path_factory.mktemp('fused_weights')
    vae = _tiny_vae()
    unet = UNet2DConditionModel(**du._UNET_TEST)
    publish_base_repo(fake_hub, 'diffbackbone/test-base', vae.state_dict(), cross_attention_dim=32)
    save_file(unet.state_dict(), tmp / 'unet.safetensors')
    fake_hub.add_file('diffbackbone/test-cleandift', 'unet.safetensors', tmp / 'unet.safetensors')
    full = {f'unet_feature_extractor_cleandift.{k}': v for k, v in unet.state_dict().items()}
    full['timestep'] = torch.tensor(261.0)
    save_file(full, tmp / 'full.safetensors')
    fake_hub.add_file('diffbackbone/test-cleandift', 'full.safetensors', tmp / 'full.safetensors')
    dino = timm.create_model('test_vit_dinov2')
    with torch.no_grad():  # layer scale 1e-5 would hide the blocks: make every block matter
        for name, p in dino.named_parameters():
            if name.endswith(('ls1.gamma', 'ls2.gamma')):
                p.fill_(0.5)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, tmp / 'model.safetensors')
    fake_hub.add_file('diffbackbone/test-dinov2', 'model.safetensors', tmp / 'model.safetensors')
    return dict(unet=unet, dino=dino, tmp=tmp)


def _images(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _reference_raw(x, layer=None):
    """Raw maps by separate models: the CleanDIFT taps and timm's DINOv2 tokens (`get_intermediate_layers`)."""
    sd = timm.create_model('test_cleandift', pretrained=True).eval()
    dino = timm.create_model('test_vit_dinov2', pretrained=True, dynamic_img_size=True).eval()
    layer = len(dino.blocks) - 1 if layer is None else layer
    with torch.no_grad():
        us8, us5, us2 = sd.forward_intermediates(x, indices=['us8', 'us5', 'us2'], intermediates_only=True)
        h, w = us8.shape[-2:]
        img = F.interpolate((x + 1) / 2, size=(h * 14, w * 14), mode='bilinear', align_corners=False, antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tokens = dino.get_intermediate_layers((img - mean) / std, n=[layer], reshape=True, norm=False)[0]
    return dict(us8=us8, us5=us5, us2=us2, dino=tokens)


def _tale_fuse(s3, s4, s5, dino):
    """Their `co_pca` tail and fusion, step by step: s5 up to s4, [s4, s5]; up to s3, [s3, s4, s5]; each source
    L2-normalised, concatenated (weights 1, 1)."""
    s45 = torch.cat([s4, F.interpolate(s5, size=s4.shape[-2:], mode='bilinear', align_corners=False)], 1)
    sd = torch.cat([s3, F.interpolate(s45, size=s3.shape[-2:], mode='bilinear', align_corners=False)], 1)
    return torch.cat([sd / sd.norm(dim=1, keepdim=True), dino / dino.norm(dim=1, keepdim=True)], 1)


def _numpy_pca(samples: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA by the eigenvectors of the covariance matrix (not the SVD the model uses)."""
    mean = samples.mean(0)
    c = samples - mean
    vals, vecs = np.linalg.eigh(c.T @ c)
    return mean, vecs[:, np.argsort(vals)[::-1][:d]]


def _gram(f):
    flat = f.reshape(f.shape[0], -1).double()
    return flat.T @ flat


def test_pretrained_downloads_both_parts(published, hub_cache):
    m = timm.create_model('test_cleandift_dinov2', pretrained=True, features_only=True)
    net = m.model
    assert isinstance(net, FusedBackbone)
    torch.testing.assert_close(net.diffusion.unet.conv_in.weight, published['unet'].conv_in.weight)
    torch.testing.assert_close(net.dino.patch_embed.proj.weight, published['dino'].patch_embed.proj.weight)
    assert len(net.dino.blocks) == 3  # pruned after the last block, which is used
    assert m.feature_info.get('name') == ['fused', 'dino', 'us8', 'us5', 'us2']  # every tap, as timm's levels
    assert m.feature_info.channels()[0] == 32 + 32 + 32 + 24 and m.feature_info.reduction() == [16, 16, 16, 32, 64]


def test_fused_map_equals_recipe_recomputed(published, hub_cache):
    x = _images()
    m = timm.create_model('test_cleandift_dinov2', pretrained=True, features_only=True,
                          out_indices=('fused', 'dino', 'us8', 'us5', 'us2')).eval()
    with torch.no_grad():
        fused, dino, us8, us5, us2 = m(x)
    ref = _reference_raw(x)
    for name, got in zip(('dino', 'us8', 'us5', 'us2'), (dino, us8, us5, us2)):
        torch.testing.assert_close(got, ref[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, _tale_fuse(ref['us8'], ref['us5'], ref['us2'], ref['dino']), rtol=1e-4,
                               atol=1e-5)
    assert fused.shape == (2, 120, 8, 8)


def test_weights_layer_and_other_dino(published, hub_cache):
    x = _images(1)
    m = timm.create_model('test_cleandift_dinov2', pretrained=True, sd_weight=0.5, dino_weight=2.0,
                          dino_layer=1).eval()
    with torch.no_grad():
        fused = m.forward_features(x)
    ref = _reference_raw(x, layer=1)
    want = _tale_fuse(ref['us8'], ref['us5'], ref['us2'], ref['dino'])
    want[:, :96] *= 0.5
    want[:, 96:] *= 2.0
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-5)
    assert len(m.dino.blocks) == 2


def test_co_pca_matches_their_steps(published, hub_cache):
    x = _images(2, seed=3)
    ref = _reference_raw(x)
    a = {k: v[0] for k, v in ref.items()}
    b = {k: v[1] for k, v in ref.items()}
    dims = (6, 5, 4)
    fa, fb = co_pca_fuse(a, b, ['us8', 'us5', 'us2'], dims)
    reduced = {}
    for tap, d in zip(('us8', 'us5', 'us2'), dims):
        both = torch.cat([a[tap].flatten(1), b[tap].flatten(1)], 1).T.double().numpy()
        mean, basis = _numpy_pca(both, d)
        proj = torch.from_numpy((both - mean) @ basis).float().T
        n = a[tap].shape[-1] * a[tap].shape[-2]
        reduced[tap] = [proj[:, :n].reshape(d, *a[tap].shape[-2:])[None],
                        proj[:, n:].reshape(d, *b[tap].shape[-2:])[None]]
    for i, got in enumerate((fa, fb)):
        want = _tale_fuse(reduced['us8'][i], reduced['us5'][i], reduced['us2'][i], ref['dino'][i:i + 1])[0]
        assert got.shape == want.shape == (6 + 5 + 4 + 24, 8, 8)
        # component signs are arbitrary: similarities (the only thing matching uses) must agree
        torch.testing.assert_close(_gram(got), _gram(want), rtol=1e-4, atol=1e-4)
    cross = torch.cat([fa.flatten(1), fb.flatten(1)], 1)
    assert torch.isfinite(cross).all()


def test_fixed_projection_fitted_on_a_pair_is_their_co_pca(published, hub_cache):
    x = _images(2, seed=5)
    m = timm.create_model('test_cleandift_dinov2', pretrained=True, sd_dims=(6, 5, 4)).eval()
    with pytest.raises(RuntimeError, match='fit_projection'):
        m(x)
    m.fit_projection(x)
    with torch.no_grad():
        fused = m.forward_features(x)
    ref = _reference_raw(x)
    fa, fb = co_pca_fuse({k: v[0] for k, v in ref.items()}, {k: v[1] for k, v in ref.items()},
                         ['us8', 'us5', 'us2'], (6, 5, 4))
    torch.testing.assert_close(_gram(fused[0]), _gram(fa), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_gram(fused[1]), _gram(fb), rtol=1e-4, atol=1e-4)
    # the projection travels in the state dict
    m2 = timm.create_model('test_cleandift_dinov2', sd_dims=(6, 5, 4)).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2.forward_features(x), fused)


def test_general_form_and_errors(published, hub_cache):
    m = timm.create_model('diffusion_dinov2', diffusion='test_dift', dino='test_vit_dinov2', sd_taps=('us6', 'us3'),
                          features_only=True)
    assert m.feature_info.channels() == [32 + 32 + 24, 24, 32, 32]
    with torch.no_grad():
        assert m(_images(1))[0].shape == (1, 88, 8, 8)
    with pytest.raises(ValueError, match='needs diffusion='):
        timm.create_model('diffusion_dinov2')
    with pytest.raises(TapError, match='no taps'):
        timm.create_model('test_cleandift_dinov2', sd_taps=('us8', 'nope'))
    with pytest.raises(ValueError, match='fine to coarse'):
        timm.create_model('test_cleandift_dinov2', sd_taps=('us2', 'us8'))
    with pytest.raises(ValueError, match='dino_layer'):
        timm.create_model('test_cleandift_dinov2', dino_layer=7)
    with pytest.raises(ValueError, match='not a timm VisionTransformer'):
        timm.create_model('test_cleandift_dinov2', dino='resnet18')
    with pytest.raises(TapError, match='Unknown tap'):
        timm.create_model('test_cleandift_dinov2', features_only=True, out_indices=('us6',))


def _save(path, seed, size=(96, 80)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_match_and_features_commands(published, hub_cache, tmp_path, capsys):
    src, trg = tmp_path / 'a.png', tmp_path / 'b.png'
    _save(src, 0)
    _save(trg, 1)
    for extra in ([], ['--co-pca', '4']):
        rc = cli.main(['match', str(src), str(trg), '--points', '3,4', '50,40', '--model', 'test_cleandift_dinov2',
                       '--taps', 'fused', '--size', '128'] + extra)
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert out.out.count('->') == 2
    rc = cli.main(['match', str(src), str(trg), '--points', '3,4', '--model', 'test_cleandift', '--co-pca', '4',
                   '--random-weights', '--size', '64'])
    assert rc == 2 and 'fused' in capsys.readouterr().err
    store = tmp_path / 'store'
    rc = cli.main(['features', str(src), str(trg), '--model', 'test_cleandift_dinov2', '--taps', 'fused', 'dino',
                   '--size', '128', '--out', str(store)])
    assert rc == 0, capsys.readouterr().err
    from diffbackbone import FeatureStore

    fs = FeatureStore(store)
    assert fs[str(src)]['fused'].shape == (120, 8, 8) and fs[str(src)]['dino'].shape == (24, 8, 8)


def test_eval_spair_with_co_pca(published, hub_cache, tmp_path, capsys):
    from test_spair import _write_pair

    root = tmp_path / 'spair'
    (root / 'JPEGImages' / 'cat').mkdir(parents=True)
    for i in range(3):
        _save(root / 'JPEGImages' / 'cat' / f'{i}.jpg', i, size=(90, 70))
    for i, (s, t) in enumerate([(0, 1), (1, 2), (2, 0)]):
        _write_pair(root, f'{i:06d}-{s}-{t}:cat', 'cat', (f'{s}.jpg', (90, 70)), (f'{t}.jpg', (90, 70)),
                    [[10, 10], [40, 30]], [[12, 11], [41, 33]], [0, 0, 80, 60])
    argv = ['eval', 'spair', '--data', str(root), '--model', 'test_cleandift_dinov2', '--co-pca', '4', '--size', '128',
            '--cache', str(tmp_path / 'cache'), '--json', str(tmp_path / 'r.json')]
    assert cli.main(argv) == 0, capsys.readouterr().err
    first = json.loads((tmp_path / 'r.json').read_text())
    assert first['co_pca'] == [4] and first['num_pairs'] == 3
    out = capsys.readouterr().out
    assert '3 images run' in out
    assert cli.main(argv) == 0  # all from the cache: same figures
    assert '0 images run' in capsys.readouterr().out
    assert json.loads((tmp_path / 'r.json').read_text())['per_point_pck'] == first['per_point_pck']
    rc = cli.main(['eval', 'spair', '--data', str(root), '--model', 'test_cleandift', '--co-pca', '4'])
    assert rc == 2 and 'fused' in capsys.readouterr().err


def test_taps_command_lists_fused_taps(capsys):
    assert cli.main(['taps', 'test_cleandift_dinov2']) == 0
    out = capsys.readouterr().out
    assert 'fused' in out and 'us8' in out and 'raw = dino, us8, us5, us2' in out


def test_memory_check_counts_dinov2_before_reading_anything(published, hub_cache, monkeypatch):
    """One check before either part is read: the SD part (UNet, VAE encoder, text encoder of the uncached empty
    prompt) and the DINOv2 weights together."""
    from diffbackbone import hub
    from diffbackbone.models._vae import encoder_key

    fetch = lambda name: hub.download('diffbackbone/test-base', name, what='w')  # noqa: E731
    sd_part = sum((hub.safetensors_nbytes(published['tmp'] / 'unet.safetensors', torch.float32),
                   hub.safetensors_nbytes(fetch('vae/diffusion_pytorch_model.safetensors'), torch.float32, encoder_key),
                   hub.safetensors_nbytes(fetch('text_encoder/model.safetensors'), torch.float32)))
    dino = hub.safetensors_nbytes(published['tmp'] / 'model.safetensors', torch.float32)
    assert dino > 0
    load = hub.load_safetensors  # the SD part is read first, the DINOv2 (timm's loader) after it
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: pytest.fail('weights read'))
    monkeypatch.setattr(hub, 'available_memory', lambda: sd_part + dino - 1)
    with pytest.raises(hub.HubError, match='with VAE, text encoder and DINOv2 need'):
        timm.create_model('test_cleandift_dinov2', pretrained=True)
    monkeypatch.setattr(hub, 'load_safetensors', load)
    monkeypatch.setattr(hub, 'available_memory', lambda: sd_part + dino)
    timm.create_model('test_cleandift_dinov2', pretrained=True)


def test_dinov2_weights_from_a_url_are_counted_before_reading():
    """timm downloads a URL's weights itself: the memory check counts the float32 state dict of the DINOv2 it builds."""
    from diffbackbone.models.fused import _dino_nbytes

    model = timm.create_model('test_vit_dinov2', num_classes=0)
    want = sum(t.numel() * 4 for t in model.state_dict().values())
    url = dict(pretrained_cfg_overlay=dict(url='http://127.0.0.1:9/dinov2.pth', hf_hub_id=None, file=None))
    assert _dino_nbytes('test_vit_dinov2', url) == want > 0
