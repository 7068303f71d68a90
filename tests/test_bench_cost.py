"""`python -m diffbackbone.bench.cost`: FLOPs on the meta device and the bf16 activation peak, on tiny layouts."""
import pytest

from diffbackbone.bench import cost as bench_cost


@pytest.mark.parametrize('name', ['test_flux', 'test_pixart'])
def test_cost_lines(name, capsys):
    gflop, params = bench_cost.count(name, 64)
    assert gflop > 0 and params > 0
    assert bench_cost.count(name, 128)[0] > 3 * gflop  # 4x the tokens
    assert bench_cost.main(['memory', name, '--size', '64']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f'{name} 64px pyramid: ') and 'activation peak (CPU, batch 1, bf16)' in line


@pytest.mark.parametrize('argv,message', [
    (['memory', 'test_cleandift'], 'memory measures the diffusion transformers'),
    (['flops', 'test_flux', '--size', '40'], 'test_flux at 40 px: Image sides must be multiples of 16'),
    (['flops', 'nope'], "unknown model 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cost.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and 'Traceback' not in err
