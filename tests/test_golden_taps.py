"""Every tiny model's taps equal their recording (`tests/golden_taps.py`): a refactor changes no feature."""
from __future__ import annotations

import json
import math

import pytest
import torch

from golden_taps import CASES, GOLDEN, digest, fill_weights, run_case

_RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize('case,name,kwargs,side', CASES, ids=[c[0] for c in CASES])
def test_taps_match_recording(case, name, kwargs, side):
    want = _RECORDED[case]
    got = {tap: digest(m) for tap, m in run_case(name, kwargs, side).items()}
    assert list(got) == list(want), 'the tap names or their order changed'
    exact = sum(got[t]['sha256'] == want[t]['sha256'] for t in want)
    for tap, w in want.items():
        g = got[tap]
        assert g['shape'] == w['shape'], tap
        for key in ('sum', 'abs'):
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-6 * max(1.0, w['abs'])), (tap, key)
        scale = max(1e-6, max(abs(p) for p in w['proj']))
        assert max(abs(a - b) for a, b in zip(g['proj'], w['proj'])) <= 1e-5 * scale, tap
    # Bit-identical on the machine that recorded; another CPU may round differently within the tolerance above.
    print(f'{case}: {exact}/{len(want)} taps bit-identical')


def test_digest_sees_a_one_ulp_change():
    x = torch.randn(2, 8, 4, 4)
    y = x.clone()
    y[0, 0, 0, 0] = torch.nextafter(y[0, 0, 0, 0], torch.tensor(10.0))
    assert digest(x)['sha256'] != digest(y)['sha256']


def test_fill_weights_ignores_construction_order():
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.manual_seed(5)
    b[0].reset_parameters()
    fill_weights(a), fill_weights(b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
