"""Newer models from Meng et al.'s list: Playground v2 (SDXL architecture) and the PixArt family."""
import pytest
import timm
import torch

import diffbackbone  # noqa: F401
from diffbackbone.models import diffusion_unet as du
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
