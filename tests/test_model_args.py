"""Model inputs of another dtype than the weights (#10): a clear error, or, for SDXL whose VAE computes in float32,
features in the UNet's precision."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import diffbackbone  # noqa: F401


def _features(model, x):
    with torch.no_grad():
        return model.forward_intermediates(x, indices=('us6',), intermediates_only=True)[0].float()


@pytest.mark.parametrize('weights, inputs', [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_sdxl_in_half_precision_matches_float32(weights, inputs):
    torch.manual_seed(0)
    model = timm.create_model('test_sdxl').eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    reference = _features(model, x)
    half = copy.deepcopy(model).to(weights)
    assert half.vae.quant_conv.weight.dtype == (torch.float32 if weights == torch.float16 else weights)
    out = _features(half, x.to(inputs))  # the VAE computes in float32 for float16: latents go back to the UNet's dtype
    cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cos > 0.99, cos


def test_other_models_name_both_dtypes():
    model = timm.create_model('test_cleandift').eval().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r'float32 differs from the model weights. dtype torch.bfloat16.*autocast'):
        model(torch.zeros(1, 3, 64, 64))
