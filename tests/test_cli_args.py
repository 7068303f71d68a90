"""CLI argument types and error handling: every bad value is one `error: ...` line, exit 2, no traceback."""
from __future__ import annotations

import pytest
import torch

from diffbackbone import cli
from diffbackbone.hub import HubError
from diffbackbone.images import ImageError
from diffbackbone.models import TapError

SAMPLE = 'diffbackbone/assets/sample.jpg'


def _parse_error(argv: list[str], capsys) -> str:
    """stderr of a command line argparse refuses (exit 2), checked to be an `error:` line without a traceback."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err.strip().splitlines()[-1]


def _features(*extra: str) -> list[str]:
    return ['features', SAMPLE, '--out', 'unused.safetensors', '--random-weights', *extra]


@pytest.mark.parametrize('argv, expected', [
    (['taps', 'nope_model'], "argument model: unknown model 'nope_model'"),
    (['taps', 'resnet50'], "'resnet50' is a timm model but not one of diffbackbone's diffusion models"),
    (_features('--model', 'nope_model'), "argument --model: unknown model 'nope_model'"),
    (_features('--model', 'cleandift_sd2'), 'did you mean cleandift_sd21'),
    (['export', 'run', '--out', 'x', '--model', 'cleandift_sd12'], 'argument --model: unknown model'),
    (['bench', '--model', 'resnet50'], 'argument --model:'),
    (_features('--batch-size', '0'), 'argument --batch-size: must be >= 1, got 0'),
    (_features('--batch-size', '-1'), 'argument --batch-size: must be >= 1, got -1'),
    (_features('--batch-size', 'four'), "argument --batch-size: expected a whole number >= 1, got 'four'"),
    (_features('--size', '0'), 'argument --size: must be >= 1, got 0'),
    (_features('--size', '-1'), 'argument --size: must be >= 1, got -1'),
    (_features('--device', 'gpu0'), "argument --device: unknown device 'gpu0'"),
    (_features('--model-kwargs', '{"timestep": 100'), 'argument --model-kwargs: not valid JSON'),
    (_features('--model-kwargs', '[1, 2]'), 'argument --model-kwargs: must be a JSON object'),
    (['export', 'run', '--out', 'x', '--model-kwargs', '"x"'], 'argument --model-kwargs: must be a JSON object'),
    (['clean-train', '--data', 'd', '--out', 'o', '--batch-size', '0'], 'argument --batch-size: must be >= 1'),
])
def test_bad_argument_is_one_error_line(argv, expected, capsys):
    line = _parse_error(argv, capsys)
    assert 'error: ' in line and expected in line, line


def test_cuda_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for dev in ('cuda', 'cuda:1'):
        line = _parse_error(_features('--device', dev), capsys)
        assert f"argument --device: '{dev}'" in line and 'no cuda device is available' in line and 'cpu' in line


def test_cuda_index_out_of_range(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert cli.device('cuda:1') == 'cuda:1'
    assert "'cuda:2' does not exist: 2 cuda device(s)" in _parse_error(_features('--device', 'cuda:2'), capsys)


def test_good_values_are_parsed():
    args = cli.build_parser().parse_args(_features(
        '--model', 'test_cleandift', '--batch-size', '3', '--size', '64', '--device', 'cpu',
        '--model-kwargs', '{"timestep": 100}'))
    assert (args.model, args.batch_size, args.size, args.device) == ('test_cleandift', 3, 64, 'cpu')
    assert args.model_kwargs == {'timestep': 100}
    # timm's own names, pretrained tags and Hub repos pass through
    for name in ('resnet18', 'cleandift_sd21.compvis', 'hf-hub:org/name'):
        assert cli.model_name(name) == name


def test_taps_command(capsys):
    assert cli.main(['taps', 'test_cleandift']) == 0
    out = capsys.readouterr().out
    assert 'us6' in out and 'presets: ' in out


@pytest.mark.parametrize('error', [HubError('no weights'), TapError('no tap'), ImageError('bad image'),
                                   ValueError('bad value'), PermissionError(13, 'Permission denied', '/x')])
def test_expected_errors_are_one_line(error, monkeypatch, capsys):
    import diffbackbone.taps_cli

    def fail(args):
        raise error

    monkeypatch.setattr(diffbackbone.taps_cli, 'run_taps', fail)
    assert cli.main(['taps', 'test_cleandift']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert str(error).split('\n')[0] in err


def test_unknown_model_kwarg_is_an_error_line(capsys, tmp_path):
    out = tmp_path / 'f.safetensors'
    code = cli.main(['features', SAMPLE, '--out', str(out), '--random-weights', '--model', 'test_cleandift',
                     '--model-kwargs', '{"nope": 1}'])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ') and "'nope'" in err and 'timestep' in err, err
    assert not out.exists()
