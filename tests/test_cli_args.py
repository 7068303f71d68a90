"""CLI argument types and error handling: every bad value is one `error: ...` line, exit 2, no traceback."""
from __future__ import annotations

import pytest
import torch

from diffbackbone import cli, cli_args
from diffbackbone.hub import HubError
from diffbackbone.data.images import ImageError
from diffbackbone.errors import InputError
from diffbackbone.hub import WriteError
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


# `features`' own flags are covered in test_reliability.py; these are the other subcommands' and the shared types'.
@pytest.mark.parametrize('argv, expected', [
    (['taps', 'nope_model'], "argument model: unknown model 'nope_model'"),
    (['taps', 'cleandift_sd2'], 'Did you mean cleandift_sd21'),
    (['taps', 'resnet50'], "'resnet50' is a timm model but not a diffusion model of diffbackbone"),
    (['export', 'run', '--out', 'x', '--model', 'cleandift_sd12'], 'argument --model: unknown model'),
    (['export', 'run', '--out', 'x', '--model-kwargs', '"x"'], 'argument --model-kwargs: must be a JSON object'),
    (['bench', '--model', 'resnet50'], 'argument --model:'),
    (_features('--model', 'resnet18'), "'resnet18' is a timm model but not a diffusion model of diffbackbone"),
    (_features('--model', 'test_vit_dinov2'),
     "'test_vit_dinov2' is a timm model but not a diffusion model of diffbackbone"),
    (['inspect', SAMPLE, '--model', 'test_vit_dinov2'], "'test_vit_dinov2' is a timm model but not a diffusion model"),
    (['taps', 'test_vit_dinov2'], "'test_vit_dinov2' is a timm model but not a diffusion model of diffbackbone"),
    (['bench', '--device', 'gpu0'], "argument --device: invalid device 'gpu0'"),
    (['clean-train', '--data', 'd', '--out', 'o', '--batch-size', '0'], 'argument --batch-size: must be at least 1'),
    (['clean-train', '--data', 'd', '--out', 'o', '--size', '-1'], 'argument --size: must be at least 1'),
    (['clean-train', '--data', 'd', '--out', 'o', '--steps', 'many'], "argument --steps: 'many' is not a whole"),
    (['clean-train', '--data', 'd', '--out', 'o', '--device', 'gpu0'], "argument --device: invalid device 'gpu0'"),
])
def test_bad_argument_is_one_error_line(argv, expected, capsys):
    line = _parse_error(argv, capsys)
    assert 'error: ' in line and expected in line, line


def test_cuda_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # also on a GPU machine
    for dev in ('cuda', 'cuda:1'):
        line = _parse_error(_features('--device', dev), capsys)
        assert f"argument --device: '{dev}'" in line and 'no CUDA GPU' in line and '--device cpu' in line


def test_cuda_index_out_of_range(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert cli_args.device('cuda:1') == 'cuda:1'
    assert "'cuda:2': only 2 CUDA GPU(s)" in _parse_error(_features('--device', 'cuda:2'), capsys)


def test_good_values_are_parsed():
    args = cli.build_parser().parse_args(_features(
        '--model', 'test_cleandift', '--batch-size', '3', '--size', '64', '--device', 'cpu',
        '--model-kwargs', '{"timestep": 100}'))
    assert (args.model, args.batch_size, args.size, args.device) == ('test_cleandift', 3, 64, 'cpu')
    assert args.model_kwargs == {'timestep': 100}
    # timm's own names, pretrained tags and Hub repos pass through
    for name in ('resnet18', 'cleandift_sd21.compvis', 'hf-hub:org/name'):
        assert cli_args.model_name(name) == name
    # features: our models (fused ones too) and exported ones; plain timm models are refused (see above)
    for name in ('test_cleandift_dinov2', 'cleandift_sd21.compvis', 'hf-hub:org/name', 'local-dir:/x'):
        assert cli_args.feature_model_name(name) == name


def test_taps_command(capsys):
    assert cli.main(['taps', 'test_cleandift']) == 0
    out = capsys.readouterr().out
    assert 'us6' in out and 'presets: ' in out


@pytest.mark.parametrize('error', [HubError('no weights\n[HTTPError: 404]'), TapError('no tap'), ImageError('bad image'),
                                   InputError('bad value'), WriteError(13, 'Permission denied', '/x')])
def test_expected_errors_are_one_line(error, monkeypatch, capsys):
    import diffbackbone.commands.taps

    def fail(args):
        raise error

    monkeypatch.setattr(diffbackbone.commands.taps, 'run', fail)
    assert cli.main(['taps', 'test_cleandift']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert str(error).split('\n')[-1] in err


@pytest.mark.parametrize('error', [RuntimeError('a bug'), ValueError('a bug'), KeyError('a bug'),
                                   PermissionError(13, 'Permission denied', '/x')])
def test_other_errors_are_bugs_with_a_traceback(error, monkeypatch):
    """Only the package's own errors (DiffbackboneError) become an `error:` line: anything else propagates from
    cli.main with its traceback, not hidden behind exit 2."""
    import diffbackbone.commands.taps

    def fail(args):
        raise error

    monkeypatch.setattr(diffbackbone.commands.taps, 'run', fail)
    with pytest.raises(type(error)) as info:
        cli.main(['taps', 'test_cleandift'])
    assert info.value is error and info.traceback[-1].name == 'fail'


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import diffbackbone.commands.taps

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffbackbone.commands.taps, 'run', interrupt)
    assert cli.main(['taps', 'test_cleandift']) == 130
    err = capsys.readouterr().err
    assert err.startswith('interrupted: ') and err.count('\n') == 1


# ---- --prompt: declared once (cli_args.add_prompt_arg), resolved once (cli_args.model_kwargs) ------------------------
class _Resolved(InputError):
    pass


def _prompt_commands(tmp_path) -> dict[str, list[str]]:
    from PIL import Image

    img = str(tmp_path / 'a.png')
    Image.new('RGB', (32, 32)).save(img)
    data = tmp_path / 'data'
    data.mkdir()
    common = ['--model', 'test_cleandift', '--prompt', 'a photo of a cat']
    return {
        'features': ['features', img, '--out', str(tmp_path / 'f.safetensors'), *common],
        'inspect': ['inspect', img, '--out', str(tmp_path / 'i.png'), *common],
        'match': ['match', img, img, '--points', '1,1', *common],
        'depth': ['depth', img, '--out', str(tmp_path / 'depth'), *common],
        'eval pixel': ['eval', 'pixel', '--data', str(data), '--store', str(tmp_path / 'store'), *common],
    }


@pytest.mark.parametrize('command', ['features', 'inspect', 'match', 'depth', 'eval pixel'])
def test_every_model_command_resolves_the_prompt_in_one_function(command, tmp_path, monkeypatch, capsys):
    """Each command that builds a model takes its model arguments from `cli_args.model_kwargs`, which resolves
    `--prompt` (and refuses it with --random-weights); replaced here, it is the one that answers."""
    import diffbackbone.evals.pixel

    seen = []

    def resolve(args):
        seen.append(args.prompt)
        raise _Resolved('resolved by cli_args.model_kwargs')

    monkeypatch.setattr(cli_args, 'model_kwargs', resolve)
    monkeypatch.setattr(diffbackbone.evals.pixel, 'load_pixel_dataset', lambda *a, **k: None)
    assert cli.main(_prompt_commands(tmp_path)[command]) == 2
    assert seen == ['a photo of a cat'] and 'resolved by cli_args.model_kwargs' in capsys.readouterr().err


def test_model_kwargs_applies_the_prompt_and_refuses_random_weights():
    parser = cli.build_parser()
    args = parser.parse_args(['match', 'a.png', 'b.png', '--points', '1,1', '--prompt', 'a dog', '--model-kwargs',
                              '{"timestep": 100, "prompt": "a cat"}'])
    assert cli_args.model_kwargs(args) == {'timestep': 100, 'prompt': 'a dog'}
    args.prompt = None
    assert cli_args.model_kwargs(args) == {'timestep': 100, 'prompt': 'a cat'}
    args.prompt, args.random_weights = 'a dog', True
    with pytest.raises(InputError, match='--prompt needs pretrained weights'):
        cli_args.model_kwargs(args)
    depth = parser.parse_args(['depth', 'a.png', '--random-weights'])  # the depth predictor encodes its caption itself
    assert cli_args.model_kwargs(depth) == {'prompt': 'A photo of a room'}


def test_weights_of_another_architecture_are_one_error_line(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    full = {k: v.contiguous() for k, v in timm.create_model('test_cleandift').state_dict().items()}  # no Hub needed
    cut = tmp_path / 'cut.safetensors'
    save_file({k: v for k, v in full.items() if 'mid_block' not in k}, cut)
    reshaped = tmp_path / 'reshaped.safetensors'
    save_file({**full, 'unet.conv_in.weight': torch.zeros(8, 4, 3, 3)}, reshaped)
    out = tmp_path / 'f.safetensors'
    for weights, expected in ((cut, 'missing keys'), (reshaped, "1 of other shapes ['unet.conv_in.weight (8, 4, 3, 3)")):
        assert cli.main(['features', SAMPLE, '--model', 'test_cleandift', '--out', str(out), '--size', '64',
                         '--weights', str(weights)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: Could not use the weights '{weights}' for test_cleandift: Checkpoint does not "
                              'match') and expected in err and err.count('\n') == 1, err
    with pytest.raises(HubError, match='other shapes'):  # a RuntimeError, as timm raises for bad checkpoints
        timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(reshaped)))
    assert not out.exists()


@pytest.mark.parametrize('argv, expected', [
    (['eval', 'pixel', '--data', 'd', '--store', 's', '--model', 'test_dift', '--memory-gb', 'inf'],
     "argument --memory-gb: 'inf' is not a finite number"),
    (['eval', 'pixel', '--data', 'd', '--store', 's', '--model', 'test_dift', '--memory-gb', 'nan'],
     "argument --memory-gb: 'nan' is not a finite number"),
    (['eval', 'pixel', '--data', 'd', '--store', 's', '--model', 'test_dift', '--memory-gb', '0'],
     'argument --memory-gb: must be positive, got 0'),
    (['eval', 'davis', '--data', 'd', '--temperature=-inf'], "argument --temperature: '-inf' is not a finite"),
    (['clean-train', '--data', 'd', '--out', 'o', '--lr', 'nan'], "argument --lr: 'nan' is not a finite number"),
    (['clean-train', '--data', 'd', '--out', 'o', '--weight-decay', '-1'], 'argument --weight-decay: must be 0 or'),
    (['clean-train', '--data', 'd', '--out', 'o', '--crop-scale', 'nan', '1'], "argument --crop-scale: 'nan' is"),
    (['clean-train', '--data', 'd', '--out', 'o', '--clip-grad', 'inf'], "argument --clip-grad: 'inf' is not"),
    (['bench', '--peak-tflops', 'x'], "argument --peak-tflops: 'x' is not a number"),
    (['bench', '--timestep', 'inf'], "argument --timestep: 'inf' is not a finite number"),
])
def test_float_options_are_finite_numbers(argv, expected, capsys):
    line = _parse_error(argv, capsys)
    assert 'error: ' in line and expected in line, line


def test_every_float_option_has_a_checked_type():
    import pathlib
    import re

    loose = [f'{p}: {line.strip()}' for p in pathlib.Path('diffbackbone').rglob('*.py')
             for line in p.read_text().splitlines() if re.search(r'type=float\b', line)]
    assert not loose, loose
