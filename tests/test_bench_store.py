"""The feature-store benchmark: its memory probes see a whole process tree, one real run is measured, ratios add up."""
import json
import sys
import textwrap

import pytest

from diffbackbone.bench import store_speed as bench_store

# A parent holding ~60 MiB that starts a child holding ~200 MiB and waits for it: the largest process is the child,
# the tree holds both at once.
_PARENT = textwrap.dedent('''
    import subprocess, sys
    keep = bytearray(60 << 20)
    child = 'import time; b = bytearray(200 << 20); time.sleep(0.5)'
    subprocess.run([sys.executable, '-c', child], check=True)
    print('done')
''')


def test_measure_command_sees_the_largest_process_and_the_tree():
    out, seconds, maxrss, tree = bench_store.measure_command([sys.executable, '-c', _PARENT], interval=0.02)
    assert out.strip() == 'done' and seconds > 0.5
    assert 200 <= maxrss < 260 + 60  # the child's 200 MiB (plus an interpreter), not parent + child
    assert tree >= 260  # both at once, seen by sampling /proc


def test_measure_command_reports_a_failure():
    with pytest.raises(RuntimeError, match='exit 3'):
        bench_store.measure_command([sys.executable, '-c', 'import sys; print("boom", file=sys.stderr); sys.exit(3)'])


def test_one_features_run_is_measured(tmp_path):
    """The real command on 3 images: the summary line is parsed, the store is complete, memory is measured."""
    bench_store.make_images(tmp_path / 'images', 3, side=48, per_folder=2)
    args = bench_store.parse_args(['--size', '64', '--batch-size', '2', '--workers', '1', '--shard-size', '2',
                                   '--device', 'cpu', '--small', '1', '--large', '3'])
    stats = bench_store._run_features(args, tmp_path / 'images', tmp_path / 'store', 3)
    assert stats.images == 3 and stats.img_per_s > 0 and stats.seconds > 0
    assert 100 < stats.maxrss_mib < 8000 and stats.tree_rss_mib >= 100
    from diffbackbone import FeatureStore

    store = FeatureStore(tmp_path / 'store')
    assert len(store) == 3 and len(list((tmp_path / 'store').glob('shard-*.safetensors'))) == 2  # shards of 2
    assert store[store.paths[0]]['mid'].shape[-2:] == (96, 96)  # the bench's --taps mid --feature-size 96
    assert stats.store_mib == pytest.approx(sum(p.stat().st_size for p in (tmp_path / 'store').glob('*.safetensors'))
                                            / 2 ** 20)


def test_bench_store_ratios(tmp_path, monkeypatch, capsys):
    """Both runs get the same settings and the small/large image counts; ratios and printout follow the runs."""
    calls = []

    def fake_run(args, folder, out, expect):
        images = sorted(p.name for p in folder.rglob('*.jpg'))
        calls.append((folder.name, len(images), images[0], bench_store._features_cmd(args, folder, out)))
        return bench_store.RunStats(expect, 1.0, 10.0 * expect, 500.0 + expect, 600.0 + expect)

    monkeypatch.setattr(bench_store, '_run_features', fake_run)
    result = bench_store.main(['--size', '64', '--batch-size', '2', '--small', '3', '--large', '7', '--image-side',
                               '32', '--model-images', '4', '--device', 'cpu', '--json', str(tmp_path / 'b.json')])
    printed = capsys.readouterr().out
    assert [c[1] for c in calls] == [3, 7] and calls[0][2] == calls[1][2] == 'img00000.jpg'
    (small_cmd, large_cmd) = [c[3] for c in calls]
    assert small_cmd[small_cmd.index('--out') + 2:] == large_cmd[large_cmd.index('--out') + 2:]  # same settings
    assert result['memory_ratio'] == pytest.approx(507 / 503)
    assert result['tree_memory_ratio'] == pytest.approx(607 / 603)
    assert result['model_only_img_per_s'] > 0
    assert result['efficiency'] == pytest.approx(70.0 / result['model_only_img_per_s'])
    assert f'{507 / 503:.3f} (largest process), {607 / 603:.3f} (process tree)' in printed
    assert f'{result["efficiency"]:.3f} (GPU target >= 0.9)' in printed
    assert json.loads((tmp_path / 'b.json').read_text())['large']['images'] == 7


def test_bench_store_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_store.parse_args(['--small', '100', '--large', '100'])
    assert 'must be smaller than --large' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_store.parse_args(['--batch-size', '0'])
    assert 'must be a positive integer' in capsys.readouterr().err


def test_old_module_name_forwards_with_a_warning(monkeypatch):
    """`python -m diffbackbone.bench.store` (the name before `bench/store_speed.py`) still runs, warning once."""
    from diffbackbone.bench import store

    calls = []
    monkeypatch.setattr(bench_store, 'main', lambda argv=None: calls.append(argv) or {})
    with pytest.warns(DeprecationWarning, match='bench.store_speed'):
        assert store.main(['--small', '1']) == {}
    assert calls == [['--small', '1']]
