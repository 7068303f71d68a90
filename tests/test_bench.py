"""The benchmark runs end to end on CPU at a tiny size, checks equality first, and catches a wrong backbone."""
import pytest
import torch

from diffbackbone import bench
from diffbackbone.models.fast import optimize

_TINY = ['--model', 'test_cleandift', '--size', '128', '--batch', '2', '--iters', '2', '--warmup', '1',
         '--dtype', 'fp32', '--device', 'cpu']


def test_bench_tiny_cpu_prints_both_rows(capsys):
    out = bench.main(_TINY + ['--taps', 'pyramid', '--noisy-ensemble', '2', '--peak-tflops', '1'])
    printed = capsys.readouterr().out
    names = [r['extractor'] for r in out['rows']]
    assert names[0].startswith('ours') and names[1].startswith('reference')
    assert names[2].startswith('ours test_dift E=2') and names[3] == 'DIFT reference E=2'
    for name in names:
        assert name in printed
    assert 'features equal: 8 tap maps' in printed
    # the equality check compared every pyramid tap of both models
    assert sorted(c['tap'] for c in out['checks']) == sorted(
        ['us9', 'us6', 'us3', 'mid'] + [f'test_dift:{t}' for t in ('us9', 'us6', 'us3', 'mid')])
    assert all(c['rel_err'] < 1e-3 and c['cosine'] > 0.999 for c in out['checks'])
    for row in out['rows']:
        assert row['ms_per_img'] > 0 and row['peak_mem_mib'] > 0 and row['gflop_per_img'] > 0
        assert row['mfu'] == pytest.approx(row['gflop_per_img'] * 1e9 * row['img_per_s'] / 1e12)
    assert out['rows'][0]['vs_ref'] == pytest.approx(out['rows'][1]['ms_per_img'] / out['rows'][0]['ms_per_img'])
    # the DIFT reference encodes every image `ensemble` times; ours encodes once
    assert out['rows'][3]['gflop_per_img'] > out['rows'][2]['gflop_per_img']


def test_bench_detects_a_mismatch(monkeypatch):
    class Perturbed(bench.Reference):
        def __init__(self, model):
            super().__init__(model)
            with torch.no_grad():
                w = self.unet.up_blocks[0].resnets[0].conv1.weight
                w.add_(torch.randn_like(w) * w.std())

    monkeypatch.setattr(bench, 'Reference', Perturbed)
    with pytest.raises(bench.FeatureMismatch, match='us1'):
        bench.main(_TINY + ['--taps', 'us1', 'us6'])


def test_bench_rejects_taps_inside_a_layer():
    with pytest.raises(ValueError, match='inside a layer'):
        bench.main(_TINY + ['--taps', 'up-level1-repeat0-vit-block0-cross-q'])


def test_optimize_keeps_features():
    import timm
    model = timm.create_model('test_cleandift', features_only=True, out_indices=('us6', 'mid')).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        ref = model(x)
    fast = optimize(model, channels_last=True)
    assert not any(p.requires_grad for p in fast.parameters())
    assert fast.model.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fast(x)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='compile must be'):
        optimize(model, compile='fastest')
