"""Recorded taps of every tiny model: the refactor guard (`tests/test_golden_taps.py`).

Weights are filled from a seeded generator in sorted key order, so a recording depends on the state-dict keys and
shapes only, not on the order in which a constructor builds its modules. Each map is kept as a digest: its sum,
absolute sum and 8 fixed random projections (float64), plus the sha256 of its bytes.

Record again (only for a deliberate change of features, say which in the commit):
    .venv/bin/python tests/golden_taps.py
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / 'data' / 'golden_taps.json'

# (case name, model name, create_model kwargs, input side). Every registered tiny diffusion model at its defaults,
# then the options that change the pass (noise, latents, maps, schedule shift, timestep).
CASES: list[tuple[str, str, dict, int]] = [
    ('test_cleandift', 'test_cleandift', {}, 128),
    ('test_cleandift-t500', 'test_cleandift', dict(timestep=500), 128),
    ('test_dift', 'test_dift', {}, 128),
    ('test_dift-mode-e3-t100', 'test_dift', dict(latent='mode', ensemble=3, timestep=100), 128),
    ('test_dift-ddim_inversion', 'test_dift', dict(noise='ddim_inversion', inversion_steps=10, timestep=200), 128),
    ('test_sdxl', 'test_sdxl', {}, 128),
    ('test_deepfloyd_if', 'test_deepfloyd_if', {}, 64),
    ('test_pixart', 'test_pixart', {}, 128),
    ('test_pixart-full', 'test_pixart', dict(attn_maps='full'), 64),
    ('test_flux', 'test_flux', {}, 128),
    ('test_flux-input-e2', 'test_flux', dict(shift_size='input', ensemble=2, latent='mode'), 128),
    ('test_ditf_flux', 'test_ditf_flux', {}, 128),
    ('test_sd3', 'test_sd3', {}, 128),
    ('test_hunyuan_dit', 'test_hunyuan_dit', {}, 128),
    ('test_cleandift_dinov2', 'test_cleandift_dinov2', {}, 128),
]


# Keys a model gained after its recording, filled after all the others so that the recorded taps keep their weights:
# the UNet's output head, kept since the `unet-out` tap (a model that had it before, DDIM inversion's, fills it in
# sorted order as it did).
ADDED_LATER = ('unet.conv_norm_out.', 'unet.conv_out.')


def fill_weights(model: torch.nn.Module, seed: int = 0, later: tuple[str, ...] = ()) -> None:
    """Overwrite every floating-point entry of the state dict from one seeded generator, in sorted key order (keys
    holding one of `later` after the others)."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    new = {}
    for k in sorted(sd, key=lambda k: (any(p in k for p in later), k)):
        v = sd[k]
        if not v.is_floating_point() or v.ndim == 0:  # integer buffers; scalars such as a learned timestep
            continue
        r = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        if v.ndim == 1 and k.endswith('weight'):  # norm scales near 1
            new[k] = (1 + 0.1 * r).to(v.dtype)
        else:
            new[k] = (0.1 * r).to(v.dtype)
    model.load_state_dict(new, strict=False)


def images(side: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, side, side, generator=gen) * 2 - 1


def run_case(model_name: str, kwargs: dict, side: int) -> dict[str, torch.Tensor]:
    """Every tap of the model (the fused models: their `feature_info`) for two fixed images."""
    import timm

    import diffbackbone  # noqa: F401 (registers the models)

    model = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    fill_weights(model, later=() if kwargs.get('noise') == 'ddim_inversion' else ADDED_LATER)
    names = model.tap_names(all=True)
    with torch.no_grad():
        maps = model.forward_intermediates(images(side), indices=names, intermediates_only=True)
    return dict(zip(names, maps))


def digest(t: torch.Tensor) -> dict:
    t = t.detach().float().contiguous()
    flat = t.flatten().double()
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(8, flat.numel(), generator=gen, dtype=torch.float64) @ flat
    return dict(shape=list(t.shape), sum=flat.sum().item(), abs=flat.abs().sum().item(), proj=proj.tolist(),
                sha256=hashlib.sha256(t.numpy().tobytes()).hexdigest())


def record() -> dict:
    torch.set_num_threads(1)
    out = {}
    for case, name, kwargs, side in CASES:
        out[case] = {tap: digest(m) for tap, m in run_case(name, kwargs, side).items()}
        print(f'{case}: {len(out[case])} taps')
    return out


if __name__ == '__main__':
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record(), indent=0))
    print(f'wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)')
