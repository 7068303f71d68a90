"""Pretrained weights through the real download code, served by the fake Hub: UNet file, VAE and text encoder from the
base repo, learned timestep by range read, cache, offline mode, overrides and errors."""
import json

import numpy as np

import pytest
import timm
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone.hub import HubError
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models._base import VAE_TEST
from fakehub import publish_base_repo

TIMESTEP = 312.75


def _tiny_vae() -> AutoencoderKL:
    cfg = VAE_TEST
    n = len(cfg['block_out_channels'])
    return AutoencoderKL(block_out_channels=cfg['block_out_channels'], layers_per_block=cfg['layers_per_block'],
                         latent_channels=4, norm_num_groups=cfg['norm_num_groups'],
                         down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n)


@pytest.fixture(scope='module')
def published(fake_hub, tmp_path_factory):
    """Publish a tiny base repo (VAE, text encoder, noisy UNet) and a CleanDIFT-style repo (UNet-only file + _full)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp('weights')
    vae = _tiny_vae()
    base_unet = UNet2DConditionModel(**du._UNET_TEST)
    clean_unet = UNet2DConditionModel(**du._UNET_TEST)
    publish_base_repo(fake_hub, 'diffbackbone/test-base', vae.state_dict(), cross_attention_dim=32)
    base_file = tmp / 'base_unet.safetensors'
    save_file(base_unet.state_dict(), base_file)
    fake_hub.add_file('diffbackbone/test-base', 'unet/diffusion_pytorch_model.safetensors', base_file)
    clean_sd = {k: v.half() for k, v in clean_unet.state_dict().items()}  # CleanDIFT ships half precision
    save_file(clean_sd, tmp / 'unet.safetensors')
    fake_hub.add_file('diffbackbone/test-cleandift', 'unet.safetensors', tmp / 'unet.safetensors')
    full = {f'unet_feature_extractor_cleandift.{k}': v for k, v in clean_sd.items()}
    full.update({f'unet_feature_extractor_base.{k}': v.half() for k, v in base_unet.state_dict().items()})
    full['timestep'] = torch.tensor(TIMESTEP)
    save_file(full, tmp / 'full.safetensors')
    fake_hub.add_file('diffbackbone/test-cleandift', 'full.safetensors', tmp / 'full.safetensors')
    return dict(vae=vae, base_unet=base_unet, clean_sd=clean_sd, tmp=tmp, full_size=(tmp / 'full.safetensors').stat().st_size)


def test_clean_model_loads_every_part(published, fake_hub, hub_cache):
    before = fake_hub.bytes_sent('full.safetensors')
    model = timm.create_model('test_cleandift', pretrained=True)
    sd = model.state_dict()
    for k, v in published['clean_sd'].items():
        if not k.startswith(('conv_out', 'conv_norm_out')):
            torch.testing.assert_close(sd['unet.' + k], v.float(), rtol=0, atol=0)
    for k, v in published['vae'].state_dict().items():
        if k.startswith(('encoder.', 'quant_conv.')):
            torch.testing.assert_close(sd['vae.' + k], v, rtol=0, atol=0)
    assert model.timestep.item() == TIMESTEP
    assert model.prompt_embeds.abs().sum() > 0 and model.prompt_embeds.shape == (1, 77, 32)
    # the learned timestep came from the header and the tensor's own bytes by range reads, not the whole _full file
    header = 8 + int.from_bytes((published['tmp'] / 'full.safetensors').read_bytes()[:8], 'little')
    assert 0 < fake_hub.bytes_sent('full.safetensors') - before <= header + 64 < published['full_size'] / 10


def test_features_only_and_classifier_load(published, hub_cache):
    feats = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6', 'mid'))
    assert feats.feature_info.channels() == [32, 32]
    assert feats.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
    clf = timm.create_model('test_cleandift', pretrained=True, num_classes=5)
    assert clf(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 5)
    torch.testing.assert_close(clf.unet.conv_in.weight, published['clean_sd']['conv_in.weight'].float())


def test_noisy_model_loads_base_unet(published, hub_cache):
    model = timm.create_model('test_dift', pretrained=True, timestep=100, ensemble=3)
    torch.testing.assert_close(model.unet.conv_in.weight, published['base_unet'].conv_in.weight, rtol=0, atol=0)
    assert model.timestep.item() == 100 and model.ensemble == 3


def test_offline_mode_uses_cache(published, hub_cache, run_python):
    code = """
        import timm, torch, diffbackbone
        m = timm.create_model('test_cleandift', pretrained=True, features_only=True)
        print('OK', m.model.timestep.item() if hasattr(m, 'model') else '', len(m(torch.zeros(1, 3, 64, 64))))
    """
    cold = run_python(code, env=hub_cache.env, offline=True)
    assert cold.returncode != 0
    assert 'HF_HUB_OFFLINE' in cold.stderr or 'offline' in cold.stderr.lower()
    online = run_python(code, env=hub_cache.env)
    assert online.returncode == 0, online.stderr
    warm = run_python(code, env=hub_cache.env, offline=True)
    assert warm.returncode == 0, warm.stderr
    assert 'OK' in warm.stdout


def test_deleted_repo_error_names_override(published, fake_hub, hub_cache):
    with pytest.raises(HubError, match='pretrained_cfg_overlay|base_repo'):
        timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='gone/deleted-repo'))
    with pytest.raises(HubError, match='base_repo|override'):
        timm.create_model('test_cleandift', pretrained=True, base_repo='stabilityai/stable-diffusion-2-1')


def test_local_file_and_local_base_folder(published, hub_cache, tmp_path):
    base_dir = tmp_path / 'base'
    from fakehub import save_tiny_clip
    save_tiny_clip(base_dir)
    (base_dir / 'vae').mkdir()
    save_file(published['vae'].state_dict(), base_dir / 'vae' / 'diffusion_pytorch_model.safetensors')
    model = timm.create_model(
        'test_cleandift', pretrained=True, base_repo=str(base_dir), timestep=200.0,
        pretrained_cfg_overlay=dict(file=str(published['tmp'] / 'unet.safetensors')))
    assert model.timestep.item() == 200.0
    torch.testing.assert_close(model.unet.conv_in.weight, published['clean_sd']['conv_in.weight'].float())
    # CleanDIFT's whole training module as a local file: UNet and learned timestep taken from it
    model = timm.create_model('test_cleandift', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(published['tmp'] / 'full.safetensors')))
    assert model.timestep.item() == TIMESTEP


def test_pinned_revision(published, fake_hub, hub_cache, tmp_path):
    other = UNet2DConditionModel(**du._UNET_TEST)
    save_file(other.state_dict(), tmp_path / 'unet.safetensors')
    fake_hub.add_file('diffbackbone/test-cleandift', 'unet.safetensors', tmp_path / 'unet.safetensors', revision='v2')
    pinned = timm.create_model('test_cleandift', pretrained=True,
                               pretrained_cfg_overlay=dict(hf_hub_id='diffbackbone/test-cleandift@v2'))
    torch.testing.assert_close(pinned.unet.conv_in.weight, other.conv_in.weight, rtol=0, atol=0)
    main = timm.create_model('test_cleandift', pretrained=True)
    assert not torch.equal(main.unet.conv_in.weight, other.conv_in.weight)


def test_wrong_architecture_checkpoint_is_refused(published, hub_cache, tmp_path):
    sd = {k: v for k, v in published['clean_sd'].items() if not k.startswith('mid_block')}
    save_file(sd, tmp_path / 'broken.safetensors')
    with pytest.raises(RuntimeError, match='missing keys'):
        timm.create_model('test_cleandift', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'broken.safetensors')))


def test_corrupted_local_file_error(published, hub_cache, tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes((published['tmp'] / 'unet.safetensors').read_bytes()[:5000])
    with pytest.raises(HubError, match='bad.safetensors'):
        timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))


def test_cli_features_end_to_end(published, hub_cache, tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from diffbackbone.cli import main

    images = []
    for i in range(3):
        path = tmp_path / f'img{i}.png'
        Image.fromarray((torch.rand(96, 96, 3) * 255).byte().numpy()).save(path)
        images.append(str(path))
    out = tmp_path / 'feats.safetensors'
    assert main(['features', *images, '--model', 'test_cleandift', '--taps', 'us6', 'mid', '--size', '128',
                 '--batch-size', '2', '--out', str(out), '--pca', 'us6']) == 0
    with safe_open(out, 'pt') as f:
        assert f.get_tensor('us6').shape == (3, 32, 8, 8)
        assert f.get_tensor('mid').shape == (3, 32, 2, 2)
        assert json.loads(f.metadata()['images']) == images
    # the saved features are the model's features
    model = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6',)).eval()
    x = torch.stack([torch.from_numpy(np.array(
        Image.open(p).convert('RGB').resize((128, 128), Image.BICUBIC))).permute(2, 0, 1).float() / 127.5 - 1
        for p in images])
    with safe_open(out, 'pt') as f, torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(f.get_tensor('us6').flatten(), model(x)[0].flatten(), dim=0)
    assert cos > 0.99
    assert (tmp_path / 'feats_pca_us6.png').is_file()


def test_cli_errors(published, hub_cache, tmp_path, capsys):
    from diffbackbone.cli import main

    assert main(['features', 'diffbackbone/assets/sample.jpg', '--model', 'test_cleandift', '--taps', 'us99',
                 '--out', str(tmp_path / 'x.safetensors')]) == 2
    assert 'Unknown tap' in capsys.readouterr().err
    assert not (tmp_path / 'x.safetensors').exists()
    assert main(['features', 'missing.jpg', '--model', 'test_cleandift', '--out', str(tmp_path / 'y.safetensors')]) == 2
    assert 'missing.jpg: no such file' in capsys.readouterr().err


def test_truncated_cached_unet_is_removed_and_fetched_again(published, fake_hub, hub_cache):
    """The UNet file goes through the same loader as the VAE: a cut cached blob heals on the next call."""
    timm.create_model('test_cleandift', pretrained=True)
    blobs = [p for p in hub_cache.hf.glob('models--diffbackbone--test-cleandift/blobs/*') if p.stat().st_size > 10000]
    assert len(blobs) == 1
    blobs[0].write_bytes(blobs[0].read_bytes()[:blobs[0].stat().st_size // 2])
    with pytest.raises(HubError, match='deleted from the cache'):
        timm.create_model('test_cleandift', pretrained=True)
    assert not blobs[0].exists()
    model = timm.create_model('test_cleandift', pretrained=True)  # downloaded again
    torch.testing.assert_close(model.unet.conv_in.weight, published['clean_sd']['conv_in.weight'].float())
    assert model.pretrained_cfg.get('state_dict') is None  # no second copy of the weights kept alive


@pytest.mark.parametrize('kind', ['missing', 'folder', 'text'])
def test_bad_weights_file_is_a_clear_error(published, hub_cache, tmp_path, kind):
    path = tmp_path / 'w.safetensors'
    if kind == 'folder':
        path.mkdir()
    elif kind == 'text':
        path.write_text('not weights')
    with pytest.raises(HubError, match='w.safetensors'):
        timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if kind == 'text':
        assert path.read_text() == 'not weights'  # a user's file is never deleted
