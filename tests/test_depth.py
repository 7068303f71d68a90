"""CleanDIFT's depth probe: the probe's maths against a hand-written computation, the CLI end to end with a tiny model
and a tiny probe served by the fake Hub, and bad inputs."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from fakehub import save_tiny_clip
from PIL import Image
from safetensors.torch import load_file, save_file

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone import depth
from diffbackbone.cli import main
from diffbackbone.models._base import VAE_TEST

BINS = np.linspace(0.1, 10.0, 256)


def _hand_depth(feat: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(C, h, w) features -> (h, w) depth, written out position by position in float64."""
    c, h, w = feat.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            logits = weight @ feat[:, y, x] + bias
            q = np.maximum(logits, 0.0) + 0.1  # relu first, then + 0.1
            out[y, x] = float((q / q.sum()) @ BINS)
    return out


def _planted_probe(channels: int, k: int) -> dict[str, torch.Tensor]:
    """All logits -5 except bin k (+1000), whatever the features."""
    bias = torch.full((256,), -5.0)
    bias[k] = 1000.0
    return {'weight': torch.zeros(256, channels, 1, 1), 'bias': bias}


def _planted_depth(k: int) -> float:
    q = np.full(256, 0.1)  # relu(-5) + 0.1
    q[k] = 1000.1
    return float((q / q.sum()) @ BINS)


def test_probe_math_matches_hand_computation(tmp_path):
    torch.manual_seed(0)
    feat = torch.randn(2, 8, 3, 4)
    weight, bias = torch.randn(256, 8, 1, 1), torch.randn(256)
    save_file({'weight': weight, 'bias': bias}, tmp_path / 'probe.safetensors')
    probe = depth.load_probe(tmp_path / 'probe.safetensors', channels=8)
    with torch.no_grad():
        got = probe(feat)
    assert got.shape == (2, 1, 3, 4)
    for b in range(2):
        expected = _hand_depth(feat[b].double().numpy(), weight[:, :, 0, 0].double().numpy(), bias.double().numpy())
        np.testing.assert_allclose(got[b, 0].numpy(), expected, rtol=1e-5)
    # a probe that puts (nearly) all mass on bin 200 gives that bin's depth, the other bins weighted by eps alone
    save_file(_planted_probe(8, 200), tmp_path / 'planted.safetensors')
    with torch.no_grad():
        planted = depth.load_probe(tmp_path / 'planted.safetensors')(feat)
    np.testing.assert_allclose(planted.numpy(), _planted_depth(200), rtol=1e-6)
    assert abs(_planted_depth(200) - BINS[200]) < 0.1


@pytest.fixture(scope='module')
def tiny_depth(fake_hub, tmp_path_factory):
    """A tiny clean model's weights file, a local base folder (text encoder, VAE) and images of two sizes."""
    tmp = tmp_path_factory.mktemp('depth')
    base = tmp / 'base'
    save_tiny_clip(base, hidden_size=32)
    torch.manual_seed(0)
    cfg = VAE_TEST
    n = len(cfg['block_out_channels'])
    vae = AutoencoderKL(block_out_channels=cfg['block_out_channels'], layers_per_block=cfg['layers_per_block'],
                        latent_channels=4, norm_num_groups=cfg['norm_num_groups'],
                        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n)
    (base / 'vae').mkdir()
    save_file(vae.state_dict(), base / 'vae' / 'diffusion_pytorch_model.safetensors')
    model = timm.create_model('test_cleandift', base_repo=str(base), timestep=250.0)
    save_file(model.state_dict(), tmp / 'weights.safetensors')  # its prompt embedding is zeros: not the caption's
    images = []
    for name, (w, h) in (('room.png', (80, 64)), ('hall.jpg', (64, 96))):
        Image.fromarray((torch.rand(h, w, 3) * 255).byte().numpy()).save(tmp / name)
        images.append(tmp / name)
    args = ['--model', 'test_cleandift', '--weights', str(tmp / 'weights.safetensors'), '--size', '128',
            '--model-kwargs', json.dumps(dict(base_repo=str(base)))]
    return dict(tmp=tmp, base=base, images=images, args=args)


def test_cli_depth_end_to_end(tiny_depth, fake_hub, hub_cache, tmp_path, capsys):
    # CleanDIFT's probe file name on its repo (served by the fake Hub), planted on bin 40
    save_file(_planted_probe(32, 40), tmp_path / 'planted.safetensors')
    fake_hub.add_file(depth.PROBE_REPO, depth.PROBE_FILE, tmp_path / 'planted.safetensors')
    out = tmp_path / 'out'
    assert main(['depth', *map(str, tiny_depth['images']), '--out', str(out), *tiny_depth['args']]) == 0
    for path in tiny_depth['images']:
        d = np.load(out / f'{path.stem}_depth.npy')
        w, h = Image.open(path).size
        assert d.shape == (h, w) and d.dtype == np.float32
        np.testing.assert_allclose(d, _planted_depth(40), rtol=1e-5)
        assert Image.open(out / f'{path.stem}_depth.png').size == (w, h)
    assert 'room.png: depth' in capsys.readouterr().out
    assert not list(out.glob('.*tmp'))


def test_cli_depth_follows_cleandift_predict(tiny_depth, hub_cache, tmp_path):
    """A random probe: the written depth equals CleanDIFT's recipe computed by hand (caption encoded with the CLIP
    text encoder directly, bilinear resizes with align_corners=False, relu + 0.1 normalisation)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffbackbone.data.images import load_image

    torch.manual_seed(1)
    weight, bias = torch.randn(256, 32, 1, 1) * 0.5, torch.randn(256)
    save_file({'weight': weight, 'bias': bias}, tmp_path / 'probe.safetensors')
    out = tmp_path / 'out'
    image = tiny_depth['images'][1]
    assert main(['depth', str(image), '--out', str(out), '--probe', str(tmp_path / 'probe.safetensors'),
                 *tiny_depth['args']]) == 0
    got = np.load(out / f'{image.stem}_depth.npy')

    base = tiny_depth['base']
    ids = CLIPTokenizer.from_pretrained(base / 'tokenizer')('A photo of a room', padding='max_length', max_length=77,
                                                            truncation=True, return_tensors='pt').input_ids
    model = timm.create_model('test_cleandift', base_repo=str(base)).eval()
    model.load_state_dict(load_file(tiny_depth['tmp'] / 'weights.safetensors'))
    with torch.no_grad():
        model.prompt_embeds.copy_(CLIPTextModel.from_pretrained(base / 'text_encoder').eval()(ids)[0])
        x = load_image(image)[None]  # native size, [-1, 1]
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(128, 128), mode='bilinear', align_corners=False)
        feat = model.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
        low = _hand_depth(feat[0].double().numpy(), weight[:, :, 0, 0].double().numpy(), bias.double().numpy())
        expected = F.interpolate(torch.from_numpy(low)[None, None], size=(h, w), mode='bilinear', align_corners=False)
    np.testing.assert_allclose(got, expected[0, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert got.std() > 1e-4  # not a constant map


def test_cli_depth_bad_inputs(tiny_depth, hub_cache, tmp_path, capsys):
    out = tmp_path / 'out'
    image = str(tiny_depth['images'][0])
    save_file({'weight': torch.zeros(256, 16, 1, 1), 'bias': torch.zeros(256)}, tmp_path / 'narrow.safetensors')
    save_file({'weight': torch.zeros(256, 32)}, tmp_path / 'flat.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    cases = [
        (['--probe', str(tmp_path / 'narrow.safetensors')], 'narrow.safetensors takes 16-channel features'),
        (['--probe', str(tmp_path / 'flat.safetensors')], 'flat.safetensors is not a depth probe'),
        (['--probe', str(tmp_path / 'junk.safetensors')], 'junk.safetensors'),
        (['--probe', str(tmp_path / 'missing.safetensors')], 'missing.safetensors: no such file'),
        (['--probe', 'nobody/probes'], 'nobody/probes'),
    ]
    for extra, message in cases:
        assert main(['depth', image, '--out', str(out), *tiny_depth['args'], *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err, (extra, err)
    save_file({'weight': torch.zeros(256, 32, 1, 1), 'bias': torch.zeros(256)}, tmp_path / 'ok.safetensors')
    assert main(['depth', image, '--out', str(out), *tiny_depth['args'], '--probe', str(tmp_path / 'ok.safetensors'),
                 '--tap', 'us99']) == 2
    assert 'us99' in capsys.readouterr().err
    assert main(['depth', str(tmp_path / 'nope.png'), '--out', str(out), *tiny_depth['args']]) == 2
    assert 'nope.png: no such file' in capsys.readouterr().err
    assert not out.exists()  # nothing written for a failed run
