"""`diffbackbone export`: a fine-tuned model as a timm Hub repo, loaded back by `hf-hub:` name through the fake Hub."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone.cli import main
from test_pretrained import published  # noqa: F401  (the tiny base repo on the fake Hub)

X = torch.rand(2, 3, 128, 128) * 2 - 1


def _clean_train_output(folder, timestep=123.25, model='test_cleandift'):
    """A file as clean-train writes it: the whole student (unet., vae., prompt_embeds, timestep), heads, metadata."""
    torch.manual_seed(0)
    student = timm.create_model('test_cleandift', timestep=timestep)
    with torch.no_grad():
        student.prompt_embeds.normal_()
    tensors = {k: v for k, v in student.state_dict().items() if not k.startswith('head.')}
    tensors['heads.us6.proj.weight'] = torch.randn(4, 4)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'test_cleandift.safetensors'
    save_file(tensors, path, metadata={'diffbackbone.model': model} if model else None)
    return path


def test_export_round_trip_through_the_hub(fake_hub, hub_cache, tmp_path):
    run, out = tmp_path / 'run', tmp_path / 'export'
    weights = _clean_train_output(run)
    assert main(['export', str(run), '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'test_cleandift'
    assert cfg['model_args']['timestep'] == 123.25
    assert cfg['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5] and 'hf_hub_id' not in cfg['pretrained_cfg']
    assert '| 7 | `us6` | 32 | 16 |' in (out / 'README.md').read_text()

    fake_hub.add_folder('someone/my-clean-unet', out)
    start = len(fake_hub.requests)
    loaded = timm.create_model('hf-hub:someone/my-clean-unet', pretrained=True, features_only=True).eval()
    asked = [r[1] for r in fake_hub.requests[start:]]
    assert asked and all('someone/my-clean-unet' in p or p.startswith('/cdn/') for p in asked), asked
    assert loaded.model.timestep.item() == 123.25
    exported = timm.create_model('test_cleandift', pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(weights))).eval()
    with torch.no_grad():
        for a, b in zip(loaded(X), exported(X)):
            assert torch.equal(a, b)


def test_export_push_uploads_a_loadable_repo(fake_hub, hub_cache, tmp_path):
    weights = _clean_train_output(tmp_path / 'run', timestep=77.5)
    assert main(['export', str(weights), '--out', str(tmp_path / 'out'), '--push', 'someone/pushed']) == 0
    assert sorted(fake_hub.commits[fake_hub.commit_of('someone/pushed')]) == ['README.md', 'config.json',
                                                                               'model.safetensors']
    loaded = timm.create_model('hf-hub:someone/pushed', pretrained=True).eval()
    assert loaded.timestep.item() == 77.5
    exported = timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(X), exported.eval().forward_features(X))


def test_export_bad_input(tmp_path, capsys):
    assert main(['export', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    weights = _clean_train_output(tmp_path / 'anon', model=None)
    assert main(['export', str(weights), '--out', str(tmp_path / 'o')]) == 2
    assert '--model' in capsys.readouterr().err
    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'keep.txt').write_text('mine')
    assert main(['export', str(weights), '--model', 'test_cleandift', '--out', str(busy)]) == 2
    assert 'not empty' in capsys.readouterr().err and (busy / 'keep.txt').read_text() == 'mine'
    not_st = tmp_path / 'notes.safetensors'
    not_st.write_text('hello')
    assert main(['export', str(not_st), '--out', str(tmp_path / 'o2')]) == 2
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'o2').exists()


def test_export_flux_round_trip(fake_hub, hub_cache, tmp_path):
    """A fine-tuned diffusion transformer (tiny FLUX, its prompt embeddings included) exports and loads back."""
    torch.manual_seed(1)
    net = timm.create_model('test_flux', timestep=30)
    with torch.no_grad():
        net.prompt_embeds.normal_()
        net.pooled_prompt_embeds.normal_()
    weights = tmp_path / 'flux.safetensors'
    save_file({k: v for k, v in net.state_dict().items() if not k.startswith('head.')}, weights)
    out = tmp_path / 'export'
    assert main(['export', str(weights), '--model', 'test_flux', '--out', str(out),
                 '--model-kwargs', '{"timestep": 30}']) == 0
    assert json.loads((out / 'config.json').read_text())['model_args']['timestep'] == 30
    fake_hub.add_folder('someone/my-flux', out)
    loaded = timm.create_model('hf-hub:someone/my-flux', pretrained=True, features_only=True).eval()
    assert loaded.model.t_start == 27  # timestep 30 of 28 steps: one pass
    with torch.no_grad():
        for a, b in zip(loaded(X), timm.create_model('test_flux', pretrained=True, timestep=30, features_only=True,
                                                     pretrained_cfg_overlay=dict(file=str(weights))).eval()(X)):
            assert torch.equal(a, b)


def test_an_export_records_its_prompt_and_loads_without_a_text_encoder(fake_hub, published, hub_cache, tmp_path,
                                                                       monkeypatch):
    """The export's weights record the prompt of their embedding (`diffbackbone.prompt`): loaded by name (config.json
    passes that prompt), nothing is encoded again; asked for another prompt, it is encoded."""
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    dog = 'a photo of a dog'
    run, out = tmp_path / 'run', tmp_path / 'export'
    _clean_train_output(run)
    assert main(['export', str(run), '--out', str(out), '--model-kwargs', json.dumps(dict(prompt=dog))]) == 0
    with safe_open(out / 'model.safetensors', 'pt') as f:
        assert f.metadata()['diffbackbone.prompt'] == dog
    assert json.loads((out / 'config.json').read_text())['model_args']['prompt'] == dog
    fake_hub.add_folder('someone/dog-unet', out)
    with monkeypatch.context() as m:
        for cls in (CLIPTextModel, CLIPTokenizer):
            m.setattr(cls, 'from_pretrained', lambda *a, **k: pytest.fail('text encoder loaded'))
        loaded = timm.create_model('hf-hub:someone/dog-unet', pretrained=True).eval()
    assert loaded.prompt == dog
    with pytest.warns(UserWarning, match='embedding of another prompt'):
        cat = timm.create_model('hf-hub:someone/dog-unet', pretrained=True, prompt='a photo of a cat').eval()
    assert not torch.equal(cat.prompt_embeds, loaded.prompt_embeds)
