"""The benchmark runs end to end on CPU at a tiny size, checks equality first, and catches a wrong backbone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffbackbone.bench import speed as bench
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


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(_TINY + ['--json', '/nonexistent-dir/b.json'])
    assert 'its folder does not exist' in capsys.readouterr().err
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


def test_bench_profile_and_json(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    out = bench.main(_TINY + ['--taps', 'pyramid', '--iters', '1', '--profile', '--json', str(path)])
    printed = capsys.readouterr().out
    assert 'where time goes, test_cleandift' in printed and 'top operators, ours' in printed
    saved = json.loads(path.read_text())
    assert saved['rows'] == out['rows'] and saved['args']['taps'] == ['pyramid']
    assert not list(tmp_path.glob('*.tmp'))
    prof = saved['profiles']['test_cleandift']
    ours, ref = prof['block_ms']['ours'], prof['block_ms']['reference']
    # both run the same VAE blocks; ours stops after us9 (up_blocks.2), the reference runs the whole UNet
    for block in ('vae.encoder.down_blocks.0', 'vae.encoder.mid_block', 'unet.down_blocks.0', 'unet.up_blocks.2'):
        assert sum(ours['blocks'][block].values()) > 0 and sum(ref['blocks'][block].values()) > 0
    assert ours['blocks']['vae.encoder.mid_block']['attention'] > 0
    assert 'unet.up_blocks.3' in ref['blocks'] and 'unet.up_blocks.3' not in ours['blocks']
    for p in (ours, ref):
        blocks = sum(sum(row.values()) for row in p['blocks'].values())
        assert blocks < p['total_ms'] and p['glue_ms'] == pytest.approx(p['total_ms'] - blocks)
    assert 'convolution' in prof['operators']['ours'] and 'Self CPU' in prof['operators']['ours']


def test_gpu_bench_script_runs_its_cases_tiny_on_cpu(tmp_path):
    """tools/gpu_bench.sh is what a GPU session runs; here its bench and train cases run at a tiny size on CPU."""
    env = dict(os.environ, DEVICE='cpu', SIZE='128', BATCH='2', DTYPE='fp32', MODEL='test_cleandift', ARCH='test',
               COMPILE='', ITERS='1', WARMUP='1', PY=sys.executable, WHEELS=str(tmp_path / 'no-wheels'))
    script = Path(__file__).parents[1] / 'tools' / 'gpu_bench.sh'
    done = subprocess.run(['bash', str(script), str(tmp_path), 'us6', 'eager', 'train'], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / 'us6.json').read_text())
    assert result['args']['taps'] == ['us6'] and result['args']['channels_last']
    assert result['rows'][0]['vs_ref'] > 0 and '== train' in done.stdout
    assert json.loads((tmp_path / 'eager.json').read_text())['args']['compile'] is None
    assert '"steps_per_s"' in (tmp_path / 'train.txt').read_text()
    bad = subprocess.run(['bash', str(script), str(tmp_path), 'fastest'], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown case 'fastest'" in bad.stderr


@pytest.mark.parametrize('taps', [('us6', 'mid'), 'cleandift'])
def test_clean_model_traces_as_one_graph(taps):
    """torch.compile sees the whole clean extractor (VAE + UNet up to the deepest tap) as one graph, no breaks."""
    import timm
    model = optimize(timm.create_model('test_cleandift', features_only=True, out_indices=taps), channels_last=True)
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.rand(2, 3, 128, 128) * 2 - 1)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
