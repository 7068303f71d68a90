"""Reliability of outputs and of the remaining silent errors (issue 23): no input is ever overwritten, `--overwrite`
replaces only diffbackbone's own outputs, unwritable or foreign destinations are refused before any model loads, a
full disk leaves one line and nothing half-written; prompts that are not applied or are cut say so; bad boxes,
depth inputs, crop scales and sizes are refused."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fakehub import save_tiny_clip
from PIL import Image
from safetensors import SafetensorError

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.data import outputs
from diffbackbone.cli import main

_DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _img(path: Path, size=(96, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is built: the checks must come first."""
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError('a model was built before the outputs were checked')

    monkeypatch.setattr(timm, 'create_model', refuse)


def _err(capsys) -> str:
    full = capsys.readouterr().err
    err = full.split('\r')[-1].splitlines()[-1] + '\n'  # the last line, after a progress bar if any
    assert err.startswith('error: ') and 'Traceback' not in full, full
    return err


# ---- the shared check ------------------------------------------------------------------------------------------------
def test_an_input_is_never_an_output_through_links(tmp_path):
    img = _img(tmp_path / 'a.png')
    (tmp_path / 'link.png').symlink_to(img)
    os.link(img, tmp_path / 'hard.png')
    for out in (img, tmp_path / 'link.png', tmp_path / 'hard.png', tmp_path / 'sub' / '..' / 'a.png'):
        with pytest.raises(outputs.OutputError, match='is one of the inputs'):
            outputs.check_file(out, [img], overwrite=True)
    data = tmp_path / 'data'
    (data / 'ann').mkdir(parents=True)
    (data / 'ann' / 'x.json').write_text('{}')
    with pytest.raises(outputs.OutputError, match='inside the input folder'):
        outputs.check_file(data / 'ann' / 'x.json', [data])
    outputs.check_file(data / 'new.json', [data])  # a new file beside the data is fine
    for folder, word in ((data, 'is the input'), (tmp_path, 'holds the input')):
        with pytest.raises(outputs.OutputError, match=word):
            outputs.check_folder(folder, 'export', [data], overwrite=True)


def test_only_our_marked_outputs_count_as_ours(tmp_path):
    pic = Image.new('RGB', (8, 6))
    for name in ('a.png', 'a.jpg', 'a.webp'):
        outputs.save_picture(pic, tmp_path / name, 'test')
        pic.save(tmp_path / f'plain-{name}')
        assert outputs.is_ours(tmp_path / name) and not outputs.is_ours(tmp_path / f'plain-{name}')
    outputs.write_json(tmp_path / 'r.json', {'x': 1}, 'test')
    (tmp_path / 'other.json').write_text('{"x": 1}')
    assert outputs.is_ours(tmp_path / 'r.json') and not outputs.is_ours(tmp_path / 'other.json')
    np.save(tmp_path / 'a.npy', np.zeros((6, 8), np.float32))  # beside our a.png, of its size
    np.save(tmp_path / 'plain-a.npy', np.zeros((6, 8), np.float32))  # beside a picture of someone else
    assert outputs.is_ours(tmp_path / 'a.npy') and not outputs.is_ours(tmp_path / 'plain-a.npy')


def test_unwritable_destination_is_refused(tmp_path):
    with pytest.raises(outputs.OutputError, match='Cannot write to /proc'):
        outputs.check_file('/proc/results.json', option='--json')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(outputs.OutputError, match='is a file, not a folder'):
        outputs.check_file(tmp_path / 'file' / 'out.png')


# ---- every command -------------------------------------------------------------------------------------------------
def test_match_never_writes_over_an_input_or_a_foreign_file(tmp_path, capsys, no_model):
    src, trg = _img(tmp_path / 'src.png'), _img(tmp_path / 'trg.jpg')
    before = src.read_bytes()
    base = ['match', str(src), str(trg), '--points', '1,1', '--model', 'test_cleandift', '--random-weights']
    assert main(base + ['--out', str(src)]) == 2
    assert 'is one of the inputs' in _err(capsys) and src.read_bytes() == before
    mine = _img(tmp_path / 'mine.png')
    assert main(base + ['--out', str(mine)]) == 2
    assert 'not written by diffbackbone' in _err(capsys)
    assert main(base + ['--out', '/proc/m.png']) == 2
    assert 'Cannot write to /proc' in _err(capsys)
    assert main(base + ['--json', str(trg.with_suffix('.json')), '--out', str(trg)]) == 2
    assert 'is one of the inputs' in _err(capsys)


def test_match_states_prompt_and_coordinates(tmp_path, capsys):
    src, trg = _img(tmp_path / 'src.png'), _img(tmp_path / 'trg.jpg', (64, 72))
    out, js = tmp_path / 'm.png', tmp_path / 'm.json'
    argv = ['match', str(src), str(trg), '--points', '3,4', '--model', 'test_cleandift', '--random-weights',
            '--size', '64', '--out', str(out), '--json', str(js)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prompt: ''" in printed and 'A photo of a dog' in printed and '(x, y)' in printed
    data = json.loads(js.read_text())
    assert data['coordinates'].startswith('(x, y)') and data['points'] == [[3.0, 4.0]] and data['prompt'] == ''
    assert outputs.is_ours(out) and outputs.is_ours(js)
    assert main(argv) == 0  # our own outputs are replaced on a second run


def test_depth_never_overwrites_an_input_named_like_its_output(tmp_path, capsys, no_model):
    room, room_depth = _img(tmp_path / 'room.png'), _img(tmp_path / 'room_depth.png')
    before = room_depth.read_bytes()
    assert main(['depth', str(room), str(room_depth), '--out', str(tmp_path), '--random-weights']) == 2
    err = _err(capsys)
    assert 'room_depth.png is one of the inputs' in err and room_depth.read_bytes() == before
    other = tmp_path / 'out'
    _img(other / 'room_depth.png')  # someone's picture where our output would go
    assert main(['depth', str(room), '--out', str(other), '--random-weights']) == 2
    assert 'not written by diffbackbone' in _err(capsys)


def test_eval_spair_json_never_overwrites_the_dataset(tmp_path, capsys, monkeypatch):
    from test_spair import _write_pair

    from diffbackbone.evals import spair

    root = tmp_path / 'SPair-71k'
    _write_pair(root, '000001-a-b:cat', 'cat', ('a.jpg', (30, 15)), ('b.jpg', (50, 40)), src_kps=[[1, 1]],
                trg_kps=[[2, 2]], bbox=[5, 3, 25, 33])
    ann = root / 'PairAnnotation' / 'test' / '000001-a-b:cat.json'
    before = ann.read_text()
    ran = []
    monkeypatch.setattr(spair, 'evaluate', lambda *a, **k: ran.append(1))
    base = ['eval', 'spair', '--data', str(root), '--model', 'test_cleandift', '--random-weights', '--size', '64']
    assert main(base + ['--json', str(ann)]) == 2
    assert 'inside the input folder' in _err(capsys) and ann.read_text() == before
    assert main(base + ['--json', '/proc/spair.json']) == 2
    assert 'Cannot write to /proc' in _err(capsys)
    assert main(base + ['--cache', str(root)]) == 2
    assert 'is the input' in _err(capsys)
    assert not ran


def test_eval_spair_refuses_an_inverted_box(tmp_path, capsys):
    from test_spair import _write_pair

    root = tmp_path / 'SPair-71k'
    _write_pair(root, 'p', 'cat', ('a.jpg', (60, 60)), ('b.jpg', (60, 60)), src_kps=[[1, 1]], trg_kps=[[2, 2]],
                bbox=[50, 50, 10, 60])
    assert main(['eval', 'spair', '--data', str(root), '--model', 'test_cleandift', '--random-weights']) == 2
    err = _err(capsys)
    assert 'p.json' in err and 'trg_bndbox' in err and 'x2 >= x1' in err


def test_bench_json_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
    from diffbackbone.bench import speed as bench

    monkeypatch.setattr(bench, 'run', lambda args: pytest.fail('the benchmark ran'))
    (tmp_path / 'notes.json').write_text('{"mine": 1}')
    for path, message in (('/proc/b.json', 'Cannot write to /proc'), (tmp_path / 'notes.json', 'not written by')):
        with pytest.raises(SystemExit) as e:
            bench.main(['--model', 'test_cleandift', '--json', str(path)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_export_never_replaces_the_run_or_a_foreign_folder(tmp_path, capsys):
    from test_export import _clean_train_output

    run = tmp_path / 'run'
    weights = _clean_train_output(run)
    (run / 'log.jsonl').write_text('{"step": 1}\n')
    (run / 'checkpoints').mkdir()
    kept = sorted(p.name for p in run.iterdir())
    for out, message in ((run, 'is the input'), (tmp_path, 'holds the input'),
                         (run / 'checkpoints', 'inside the input folder')):
        assert main(['export', str(run), '--out', str(out), '--overwrite']) == 2
        assert message in _err(capsys)
        assert sorted(p.name for p in run.iterdir()) == kept and weights.is_file()
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'config.json').write_text('{"mine": true}')
    assert main(['export', str(run), '--out', str(foreign), '--overwrite']) == 2
    assert 'not an export of diffbackbone' in _err(capsys) and (foreign / 'config.json').is_file()
    out = tmp_path / 'export'
    assert main(['export', str(run), '--out', str(out)]) == 0
    assert main(['export', str(run), '--out', str(out), '--overwrite']) == 0  # our own export is replaced


def test_features_store_keeps_a_foreign_index(tmp_path, capsys, no_model):
    img = _img(tmp_path / 'img' / 'a.png')
    store = tmp_path / 'store'
    store.mkdir()
    (store / 'index.json').write_text('{"images": ["mine"]}')
    for extra in ([], ['--overwrite']):
        assert main(['features', str(img), '--model', 'test_cleandift', '--random-weights', '--out', str(store),
                     *extra]) == 2
        assert 'did not write' in _err(capsys)
        assert (store / 'index.json').read_text() == '{"images": ["mine"]}'


def test_inspect_replaces_only_its_own_sheets_index_and_json(tmp_path, capsys):
    img = _img(tmp_path / 'a.png')
    out, js = tmp_path / 'out' / 's.png', tmp_path / 'out' / 's.json'
    argv = ['inspect', str(img), '--model', 'test_cleandift', '--random-weights', '--taps', 'us6', 'us9', 'mid',
            '--per-sheet', '2', '--tile', '16', '--size', '64', '--device', 'cpu', '--out', str(out), '--json', str(js)]
    assert main(argv) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ['s-1.png', 's-2.png', 's-index.json', 's.json']
    assert all(outputs.is_ours(out.parent / name) for name in written)
    assert main(argv) == 2 and 'add --overwrite' in _err(capsys)
    assert main(argv + ['--overwrite']) == 0  # our own sheets, index and statistics are replaced
    capsys.readouterr()
    (out.parent / 's-index.json').write_text('{"mine": 1}')
    assert main(argv + ['--overwrite']) == 2 and 'not written by diffbackbone' in _err(capsys)
    assert (out.parent / 's-index.json').read_text() == '{"mine": 1}'
    assert main(['inspect', str(img), '--model', 'test_cleandift', '--random-weights', '--out', str(img),
                 '--overwrite']) == 2
    assert 'one of the input images' in _err(capsys)


def test_eval_hpatches_json_never_overwrites_the_dataset_or_a_foreign_file(tmp_path, capsys, monkeypatch):
    from diffbackbone.evals import hpatches

    monkeypatch.setattr(hpatches, 'evaluate', lambda *a, **k: pytest.fail('the evaluation ran'))
    root, kps = tmp_path / 'hpatches', tmp_path / 'kps'
    (root / 'i_a').mkdir(parents=True)
    (root / 'i_a' / 'H_1_2').write_text('1 0 0\n0 1 0\n0 0 1\n')
    (kps / 'i_a').mkdir(parents=True)
    (kps / 'i_a' / '1.txt').write_text('1 1\n')
    foreign = tmp_path / 'notes.json'
    foreign.write_text('{"mine": 1}')
    base = ['eval', 'hpatches', '--data', str(root), '--keypoints', str(kps), '--model', 'test_dift',
            '--random-weights']
    for path, message in ((root / 'i_a' / 'H_1_2', 'inside the input folder'), (kps, 'inside the input folder'),
                          (foreign, 'not written by diffbackbone'), ('/proc/h.json', 'Cannot write to /proc')):
        assert main(base + ['--json', str(path)]) == 2
        assert message in _err(capsys)
    assert main(base + ['--cache', str(root)]) == 2 and 'is the input' in _err(capsys)
    assert foreign.read_text() == '{"mine": 1}' and (root / 'i_a' / 'H_1_2').read_text().startswith('1 0 0')
    ours = tmp_path / 'ours.json'
    outputs.write_json(ours, {'x': 1}, 'eval hpatches')
    assert main(base + ['--json', str(ours)]) == 2  # past the output check: the (broken) data is what is refused
    err = _err(capsys)
    assert '--json' not in err and str(root) in err


def test_eval_davis_outputs_replace_only_our_own(tmp_path, capsys, monkeypatch):
    import diffbackbone.correspondence as corr
    from test_davis import ColourModel, _write_sequence

    data = tmp_path / 'DAVIS'
    _write_sequence(data, 'still', [((30, 220, 40), (40, 30), (0, 0), 30)], frames=3)
    (data / 'ImageSets' / '2017').mkdir(parents=True)
    (data / 'ImageSets' / '2017' / 'val.txt').write_text('still\n')
    ann = data / 'Annotations' / '480p' / 'still' / '00000.png'
    before = ann.read_bytes()
    built = []
    monkeypatch.setattr(corr, 'load_tap_model', lambda *a, **k: built.append(1) or ColourModel())
    base = ['eval', 'davis', '--data', str(data), '--random-weights', '--short-side', '64']
    foreign = tmp_path / 'notes.json'
    foreign.write_text('{"mine": 1}')
    for extra, message in ((['--json', str(ann)], 'inside the input folder'),
                           (['--json', str(foreign)], 'not written by diffbackbone'),
                           (['--masks', str(data)], 'is the input'),
                           (['--masks', str(data / 'Annotations')], 'inside the input folder'),
                           (['--masks', str(tmp_path / 'm'), '--cache', str(tmp_path / 'm' / 'c')], 'overlap')):
        assert main(base + extra) == 2
        assert message in _err(capsys)
    assert ann.read_bytes() == before and foreign.read_text() == '{"mine": 1}' and not built
    masks, js = tmp_path / 'masks', tmp_path / 'r.json'
    argv = base + ['--json', str(js), '--masks', str(masks)]
    assert main(argv) == 0 and main(argv) == 0  # the second run replaces our own masks and results
    assert outputs.is_ours(js) and all(outputs.is_ours(p) for p in (masks / 'still').iterdir())
    capsys.readouterr()
    (masks / 'still' / 'notes.txt').write_text('mine')
    assert main(argv) == 2 and 'notes.txt, not written by diffbackbone' in _err(capsys)
    assert (masks / 'still' / 'notes.txt').read_text() == 'mine'


def test_features_store_of_writer_unique_shards_resumes_and_is_replaced(tmp_path, capsys):
    """The store's own files (`shard-r<rank>-<writer id>-<n>`, `.lock`, index format 2) count as ours: a store resumes
    with or without its index, `--overwrite` replaces it, and a foreign file named like a shard is still refused."""
    img = _img(tmp_path / 'img' / 'a.png')
    store = tmp_path / 'store'
    argv = ['features', str(img), '--model', 'test_cleandift', '--random-weights', '--size', '64', '--taps', 'us6',
            '--out', str(store)]
    assert main(argv) == 0
    shard = next(store.glob('shard-r000-*-000000.safetensors'))
    assert outputs.is_ours(store / 'index.json') and outputs.is_ours(shard)
    assert main(argv) == 0 and '1 of these images are stored already' in capsys.readouterr().out
    (store / 'index.json').unlink()  # killed before the index was written: shards and the lock only
    assert main(argv) == 0 and '1 of these images are stored already' in capsys.readouterr().out
    assert main(argv + ['--overwrite']) == 0
    capsys.readouterr()
    (store / 'shard-r001-0badc0de-000000.safetensors').write_bytes(b'mine')
    assert main(argv + ['--overwrite']) == 2 and 'not written by diffbackbone' in _err(capsys)
    assert (store / 'shard-r001-0badc0de-000000.safetensors').read_bytes() == b'mine'


# ---- a full disk -----------------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(monkeypatch):
    """safetensors writes part of the file, then fails as on a full disk."""
    from diffbackbone import hub

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b'partial')
        raise SafetensorError(_DISK_FULL)

    monkeypatch.setattr(hub, 'save_file', save_file)


def test_disk_full_single_file_is_one_line_and_leaves_nothing(tmp_path, capsys, full_disk):
    img = _img(tmp_path / 'a.png')
    out = tmp_path / 'out' / 'f.safetensors'
    assert main(['features', str(img), '--model', 'test_cleandift', '--random-weights', '--size', '64', '--taps',
                 'mid', '--out', str(out)]) == 2
    err = _err(capsys)
    assert str(out) in err and 'No space left on device' in err
    assert list(out.parent.iterdir()) == []


def test_disk_full_export_is_one_line_and_leaves_nothing(tmp_path, capsys, full_disk):
    from test_export import _clean_train_output

    weights = _clean_train_output(tmp_path / 'run')
    out = tmp_path / 'exports' / 'mine'
    assert main(['export', str(weights), '--out', str(out)]) == 2
    err = _err(capsys)
    assert str(out) in err and 'No space left on device' in err
    assert list(out.parent.iterdir()) == []


def test_export_push_offline_speaks_of_the_upload(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    from test_export import _clean_train_output

    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_TOKEN', 'hf_fake')
    weights = _clean_train_output(tmp_path / 'run')
    out = tmp_path / 'exp'
    assert main(['export', str(weights), '--out', str(out), '--push', 'someone/x']) == 2
    err = _err(capsys)
    assert 'push' in err and 'someone/x' in err and str(out) in err
    assert 'base_repo' not in err and 'download' not in err.lower() and 'cache' not in err
    assert (out / 'model.safetensors').is_file()  # the export itself is kept


# ---- prompts -------------------------------------------------------------------------------------------------------
def test_prompt_with_random_weights_is_never_applied_silently():
    import timm

    x = torch.rand(1, 3, 64, 64) * 2 - 1
    model = timm.create_model('test_cleandift', prompt='a photo of a dog').eval()
    with pytest.raises(ValueError, match='never computed'):
        model(x)
    getter = timm.create_model('test_cleandift', prompt='a photo of a dog', features_only=True).eval()
    with pytest.raises(ValueError, match='never computed'):
        getter(x)
    sd = model.state_dict()
    sd['prompt_embeds'] = torch.randn_like(sd['prompt_embeds'])
    model.load_state_dict(sd)  # a state dict that holds the embedding applies the prompt
    with torch.no_grad():
        model(x)
    timm.create_model('test_cleandift', prompt='').eval()(x)  # the empty prompt is what random weights hold


@pytest.mark.parametrize('command', ['features', 'match'])
def test_prompt_with_random_weights_cli_one_line(command, tmp_path, capsys):
    img = _img(tmp_path / 'a.png')
    args = ([str(img), '--out', str(tmp_path / 'f.safetensors')] if command == 'features'
            else [str(img), str(img), '--points', '1,1'])
    with pytest.raises(SystemExit) as e:
        main([command, *args, '--model', 'test_cleandift', '--random-weights', '--prompt', 'a photo of a dog'])
    assert e.value.code == 2 and '--prompt needs pretrained weights' in capsys.readouterr().err


def test_long_prompt_warns_naming_the_kept_part(tmp_path, hub_cache, capsys):
    from diffbackbone.prompts import encode_prompts

    base = tmp_path / 'base'
    save_tiny_clip(base)
    prompt = ' '.join(['cat'] * 50 + ['dog'] * 50)  # 100 tokens + start and end: over the 77-token window
    kept = ' '.join(['cat'] * 50 + ['dog'] * 25)
    for _ in range(2):  # computed, then from the cache: both warn
        with pytest.warns(UserWarning, match='77-token window') as record:
            encode_prompts(str(base), [prompt])
        assert repr(kept) in str(record[0].message) and '102 tokens' in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        encode_prompts(str(base), ['cat dog'])  # short prompts: no warning


def test_prompt_and_seed_types(tmp_path):
    import timm

    from diffbackbone.prompts import encode_prompts

    model = timm.create_model('test_cleandift')
    with pytest.raises(TypeError, match='prompts must be a string or a list'):
        encode_prompts(model, None)
    with pytest.raises(TypeError, match='noise_seed must be a whole number'):
        timm.create_model('test_dift', noise_seed='abc')


# ---- depth inputs, crops, sizes, taps ------------------------------------------------------------------------------
def test_predict_depth_checks_its_inputs():
    from diffbackbone.depth import DepthPredictor, DepthProbe, predict_depth

    class Backbone(torch.nn.Module):
        def forward_intermediates(self, x, indices, intermediates_only):
            return [x[:, :1].expand(-1, 4, -1, -1)[:, :, ::16, ::16]]

    predictor = DepthPredictor(Backbone(), DepthProbe(4), size=64)
    ok = torch.rand(3, 40, 50) * 2 - 1
    assert predict_depth(predictor, [ok])[0].shape == (40, 50)
    cases = [([ok * 127.5 + 127.5], ValueError, 'outside \\[-1, 1\\]'),
             ([torch.randint(0, 65535, (3, 8, 8)).float()], ValueError, 'outside \\[-1, 1\\]'),
             ([ok[0]], ValueError, 'not \\(3, H, W\\)'),
             ([Image.new('RGB', (8, 8))], TypeError, 'not a tensor'),
             (Image.new('RGB', (8, 8)), TypeError, 'must be a list'),
             ([(ok * 127.5 + 127.5).byte()], ValueError, 'not floating point')]
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            predict_depth(predictor, images)
    with pytest.raises(ValueError, match='batch_size must be'):
        predict_depth(predictor, [ok], batch_size=0)


def test_clean_train_checks_crop_scale_and_size(tmp_path, capsys):
    data = tmp_path / 'data'
    for i in range(3):
        _img(data / f'{i}.png')
    base = ['clean-train', '--base', 'test_cleandift', '--random-weights', '--data', str(data), '--steps', '1',
            '--batch-size', '1', '--val-images', '0', '--workers', '0', '--no-progress', '--device', 'cpu']
    assert main(base + ['--out', str(tmp_path / 'r1'), '--crop-scale', '0', '0', '--size', '64']) == 2
    assert '0 < MIN <= MAX <= 1' in capsys.readouterr().err
    assert main(base + ['--out', str(tmp_path / 'r2'), '--size', '1']) == 2
    err = capsys.readouterr().err
    assert '--size 1' in err and 'at least 64' in err and 'Traceback' not in err


def test_size_that_cannot_fit_is_refused_before_the_model(tmp_path, capsys, no_model):
    img = _img(tmp_path / 'a.png')
    assert main(['features', str(img), '--model', 'test_cleandift', '--random-weights', '--size', '100000',
                 '--out', str(tmp_path / 'f.safetensors')]) == 2
    err = _err(capsys)
    assert '--size 100000' in err and 'free on cpu' in err


def test_taps_given_as_indices(tmp_path, capsys):
    img = _img(tmp_path / 'a.png')
    out = tmp_path / 'f.safetensors'
    assert main(['features', str(img), '--model', 'test_cleandift', '--random-weights', '--size', '64', '--taps', '7',
                 '--out', str(out)]) == 0
    assert 'us6:' in capsys.readouterr().out  # index 7 of `diffbackbone taps test_cleandift`


def test_cli_prints_a_cut_prompt_as_one_warning_line(capsys, monkeypatch):
    import diffbackbone.commands.match as match_command
    from diffbackbone.models.conditioning.text import PromptTruncatedWarning

    def handler(args):
        warnings.warn("The prompt 'cat cat' has 102 tokens, more than the 77-token window of the CLIP text encoder: "
                      "only 'cat' is used.", PromptTruncatedWarning)
        return 0

    monkeypatch.setattr(match_command, 'run', handler)
    assert main(['match', 'a.png', 'b.png', '--points', '1,1']) == 0
    assert capsys.readouterr().err == ("warning: The prompt 'cat cat' has 102 tokens, more than the 77-token window of "
                                       "the CLIP text encoder: only 'cat' is used.\n")


# ---- issue 30 ------------------------------------------------------------------------------------------------------
def _linked_data(tmp_path):
    """d/imgs/sub and d/link -> imgs/sub: `d/link/..` is d/imgs for the kernel, d for text."""
    d = tmp_path / 'd'
    (d / 'imgs' / 'sub').mkdir(parents=True)
    (d / 'link').symlink_to('imgs/sub')
    return d


def test_an_input_is_never_an_output_through_a_linked_folder_and_dotdot(tmp_path, capsys, monkeypatch):
    import diffbackbone.data.extract as features
    import diffbackbone.correspondence as corr

    for module, name in ((corr, 'match_images'), (features, 'load_extractor')):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail('a model was loaded'))

    d = _linked_data(tmp_path)
    src, trg = d / 'imgs' / 'src.png', _img(tmp_path / 'B.png')
    outputs.save_picture(Image.new('RGB', (32, 32)), src, 'match')  # written by an earlier `match`: ours, an input
    before = src.read_bytes()
    with pytest.raises(outputs.OutputError, match='is one of the inputs'):
        outputs.check_file(d / 'link' / '..' / 'src.png', [src], overwrite=True)
    assert main(['match', str(src), str(trg), '--points', '5,5', '--model', 'test_cleandift', '--random-weights',
                 '--out', str(d / 'link' / '..' / 'src.png')]) == 2
    assert 'is one of the inputs' in _err(capsys) and src.read_bytes() == before
    sheet = d / 'imgs' / 'sheet.png'
    outputs.save_picture(Image.new('RGB', (32, 32)), sheet, 'inspect')
    assert main(['inspect', str(sheet), '--model', 'test_cleandift', '--random-weights', '--taps', 'mid',
                 '--out', str(d / 'link' / '..' / 'sheet.png'), '--overwrite']) == 2
    assert 'one of the input images' in _err(capsys) and outputs.is_ours(sheet)
    outputs.check_file(d / 'link' / '..' / 'new.png', [src])  # a new file there is fine


def test_eval_davis_masks_replace_only_masks_of_eval_davis(tmp_path, capsys, monkeypatch):
    import diffbackbone.correspondence as corr
    from test_davis import ColourModel, _write_sequence

    data = tmp_path / 'DAVIS'
    _write_sequence(data, 'still', [((30, 220, 40), (40, 30), (0, 0), 30)], frames=3)
    (data / 'ImageSets' / '2017').mkdir(parents=True)
    (data / 'ImageSets' / '2017' / 'val.txt').write_text('still\n')
    monkeypatch.setattr(corr, 'load_tap_model', lambda *a, **k: ColourModel())
    masks = tmp_path / 'masks'
    outputs.save_picture(Image.new('RGB', (8, 8)), masks / 'still' / 'sheet.png', 'inspect')  # ours, not a mask
    argv = ['eval', 'davis', '--data', str(data), '--random-weights', '--short-side', '64', '--masks', str(masks)]
    assert main(argv) == 2
    assert 'sheet.png' in _err(capsys) and (masks / 'still' / 'sheet.png').is_file()
    assert outputs.is_ours(masks / 'still' / 'sheet.png', 'inspect')
    assert not outputs.is_ours(masks / 'still' / 'sheet.png', 'eval davis')
    (masks / 'still' / 'sheet.png').unlink()
    assert main(argv) == 0 and main(argv) == 0  # its own masks are replaced
    assert all(outputs.is_ours(p, 'eval davis') for p in (masks / 'still').iterdir())


def test_outputs_of_one_command_are_distinct(tmp_path):
    a, store = tmp_path / 'a.png', tmp_path / 'S'
    for files, folders, message in (({'--out': a, '--json': tmp_path / 'sub' / '..' / 'a.png'}, {}, 'same file'),
                                    ({'--json': store / 'index.json'}, {'--store': store}, 'inside --store'),
                                    ({'--json': store}, {'--cache': store}, 'inside --cache'),
                                    ({}, {'--masks': store, '--cache': store / 'c'}, 'overlap')):
        with pytest.raises(outputs.OutputError, match=message):
            outputs.check_distinct_outputs(files, folders)
    outputs.check_distinct_outputs({'--out': a, '--json': tmp_path / 'a.json', '--none': None}, {'--store': store})


def test_one_file_named_twice_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import diffbackbone.data.extract as features
    import diffbackbone.correspondence as corr
    from test_pixel import ARGS, _write_dataset

    from diffbackbone.evals import pixel

    for module, name in ((corr, 'match_images'), (features, 'load_extractor'), (pixel, '_extract')):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail('the work started'))
    img, out = _img(tmp_path / 'img.png'), tmp_path / 'o.png'
    inspect = ['inspect', str(img), '--model', 'test_cleandift', '--random-weights', '--out', str(out)]
    for extra in (['--taps', 'mid', '--json', str(tmp_path / 'sub' / '..' / 'o.png')],
                  ['--taps', 'us6', 'us9', 'mid', '--per-sheet', '2', '--json', str(tmp_path / 'o-index.json')]):
        assert main(inspect + extra) == 2
        assert '--json' in _err(capsys)
    assert main(['match', str(img), str(img), '--points', '1,1', '--model', 'test_cleandift', '--random-weights',
                 '--out', str(out), '--json', str(out)]) == 2
    assert 'same file' in _err(capsys)
    data, store = _write_dataset(tmp_path / 'blocks_3', 1, 1), tmp_path / 'S'
    assert main(['eval', 'pixel', '--data', str(data), '--store', str(store), '--json', str(store / 'index.json'),
                 *ARGS]) == 2
    assert 'inside --store' in _err(capsys)
    assert not out.exists() and not store.exists()


def test_outputs_that_would_break_the_data_or_be_lost_are_refused_up_front(tmp_path, capsys, monkeypatch):
    import diffbackbone.correspondence as corr
    from test_davis import _write_sequence
    from test_spair import _write_pair

    from diffbackbone.evals import hpatches, spair

    monkeypatch.setattr(hpatches, 'evaluate', lambda *a, **k: pytest.fail('the evaluation ran'))
    monkeypatch.setattr(spair, 'evaluate', lambda *a, **k: pytest.fail('the evaluation ran'))
    monkeypatch.setattr(corr, 'load_tap_model', lambda *a, **k: pytest.fail('a model was built'))
    root, kps = tmp_path / 'hpatches', tmp_path / 'kps'
    (root / 'i_a').mkdir(parents=True)
    (root / 'i_a' / 'H_1_2').write_text('1 0 0\n0 1 0\n0 0 1\n')
    (kps / 'i_a').mkdir(parents=True)
    assert main(['eval', 'hpatches', '--data', str(root), '--keypoints', str(kps), '--model', 'test_dift',
                 '--random-weights', '--cache', str(root / 'cache')]) == 2  # a new folder: the next run's sequence
    assert 'inside the input folder' in _err(capsys) and not (root / 'cache').exists()
    data = tmp_path / 'DAVIS'
    _write_sequence(data, 'still', [((30, 220, 40), (40, 30), (0, 0), 30)], frames=3)
    (data / 'ImageSets' / '2017').mkdir(parents=True)
    davis = ['eval', 'davis', '--data', str(data), '--random-weights', '--short-side', '64']
    (data / 'ImageSets' / '2017' / 'val.txt').write_text('../480p/still\n')
    assert main(davis) == 2 and "'../480p/still' is not a sequence name" in _err(capsys)
    (data / 'ImageSets' / '2017' / 'val.txt').write_text('still\n')
    masks = tmp_path / 'masks'
    assert main(davis + ['--masks', str(masks), '--json', str(masks / 'still')]) == 2
    assert 'inside --masks' in _err(capsys)
    spair_root = tmp_path / 'SPair-71k'
    _write_pair(spair_root, 'p', 'cat', ('a.jpg', (30, 15)), ('b.jpg', (50, 40)), src_kps=[[1, 1]], trg_kps=[[2, 2]],
                bbox=[5, 3, 25, 33])
    x = tmp_path / 'x'
    assert main(['eval', 'spair', '--data', str(spair_root), '--model', 'test_cleandift', '--random-weights',
                 '--json', str(x), '--cache', str(x)]) == 2
    assert 'inside --cache' in _err(capsys) and not x.exists()
