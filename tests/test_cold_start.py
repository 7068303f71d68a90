"""Cold start (issue #29): pretrained models are built with empty (meta) parameters and the checkpoint's tensors are
assigned; features are bit-identical to building with random weights and loading into them; `dtype=` loads in that
dtype; weights that cannot fit are refused before they are read; the benchmark runs end to end."""
import itertools
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import diffbackbone  # noqa: F401
from diffbackbone import hub
from diffbackbone.bench import coldstart
from diffbackbone.errors import InputError
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models._builder import assign_weights, empty_weights
from fakehub import publish_base_repo
from golden_taps import fill_weights, images
from test_pretrained import _tiny_vae

pytestmark = pytest.mark.usefixtures('one_thread')

BASE, CLEAN = 'diffbackbone/cold-base', 'diffbackbone/cold-cleandift'  # repos of their own: other modules publish theirs
TIMESTEP = 255.25
# every diffusion family at its defaults (the fused model: below)
FAMILIES = [('test_cleandift', 128), ('test_dift', 128), ('test_sdxl', 128), ('test_deepfloyd_if', 64),
            ('test_pixart', 128), ('test_flux', 128), ('test_ditf_flux', 128), ('test_sd3', 128),
            ('test_hunyuan_dit', 128)]


def _meta(model: torch.nn.Module) -> list[str]:
    return [k for k, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)


def _taps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.forward_intermediates(x, indices=model.tap_names(all=True), intermediates_only=True)


@pytest.fixture(scope='module')
def published(fake_hub, tmp_path_factory):
    """A tiny base repo (VAE, text encoder) and a CleanDIFT-style repo: a float16 UNet-only file and `full` with the
    learned timestep."""
    torch.manual_seed(7)
    tmp = tmp_path_factory.mktemp('cold_weights')
    publish_base_repo(fake_hub, BASE, _tiny_vae().state_dict(), cross_attention_dim=32)
    unet = {k: v.half() for k, v in UNet2DConditionModel(**du._UNET_TEST).state_dict().items()}
    save_file(unet, tmp / 'unet.safetensors')
    fake_hub.add_file(CLEAN, 'unet.safetensors', tmp / 'unet.safetensors')
    save_file({'timestep': torch.tensor(TIMESTEP)}, tmp / 'full.safetensors')
    fake_hub.add_file(CLEAN, 'full.safetensors', tmp / 'full.safetensors')
    return dict(tmp=tmp, kwargs=dict(base_repo=BASE, timestep_source=f'{CLEAN}:full.safetensors',
                                     pretrained_cfg_overlay=dict(hf_hub_id=CLEAN)))


@pytest.mark.parametrize('name,side', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_loads_bit_identically_with_no_meta_tensor_left(name, side, tmp_path):
    old = timm.create_model(name).eval()  # random initialisation, as with pretrained=False
    fill_weights(old)
    _save(old, tmp_path / 'w.safetensors')
    new = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    new.eval()
    assert not _meta(new)
    buffers = dict(new.named_buffers())  # the non-persistent ones too (noise-schedule steps, size ids, positions)
    for key, value in old.named_buffers():
        assert torch.equal(buffers[key], value), key
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    for a, b in zip(_taps(old, images(side)), _taps(new, images(side))):
        assert torch.equal(a, b)


def test_fused_model_has_no_meta_tensor(tmp_path):
    old = timm.create_model('test_cleandift_dinov2')
    _save(old.diffusion, tmp_path / 'sd.safetensors')
    _save(timm.create_model('test_vit_dinov2'), tmp_path / 'dino.safetensors')  # whole: the fused model prunes its own
    new = timm.create_model('test_cleandift_dinov2', pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'sd.safetensors')),
                            dino_kwargs=dict(pretrained_cfg_overlay=dict(file=str(tmp_path / 'dino.safetensors'))))
    assert not _meta(new)
    assert torch.equal(new.dino_mean, old.dino_mean) and torch.equal(new.diffusion.unet.conv_in.weight,
                                                                     old.diffusion.unet.conv_in.weight)


def test_hub_load_equals_random_init_then_load_state_dict(published, hub_cache):
    """The whole path (float16 UNet file, VAE and prompt from the base repo, timestep by range read) against the old
    way: random initialisation, then `load_state_dict` of the same mapped and completed state dict."""
    new = timm.create_model('test_cleandift', pretrained=True, **published['kwargs']).eval()
    torch.manual_seed(0)
    old = timm.create_model('test_cleandift', base_repo=BASE, timestep_source=f'{CLEAN}:full.safetensors').eval()
    sd = du.checkpoint_filter_fn(load_file(published['tmp'] / 'unet.safetensors'), old)
    old.load_state_dict({**sd, **old.complete_weights(sd)})
    assert new.timestep.item() == TIMESTEP and new.timestep.dtype == torch.float32
    assert new.unet.conv_in.weight.dtype == torch.float32 and not _meta(new)
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    x = images(128)
    for a, b in zip(_taps(old, x), _taps(new, x)):
        assert torch.equal(a, b)
    # features_only and a new classifier: the classifier is initialised, the rest loaded
    feats = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6',),
                              **published['kwargs'])
    assert torch.equal(feats(x)[0], new.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0])
    clf = timm.create_model('test_cleandift', pretrained=True, num_classes=3, **published['kwargs'])
    assert not _meta(clf) and clf.head.fc.weight.abs().sum() > 0 and clf(x).shape == (2, 3)


def test_dtype_at_load(published, hub_cache, monkeypatch):
    read = []
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: read.append(k.get('dtype')) or load(*a, **k))
    new = timm.create_model('test_cleandift', pretrained=True, dtype='bfloat16', **published['kwargs']).eval()
    assert read and set(read) == {torch.bfloat16}  # UNet and VAE read in bfloat16: no float32 copy on the way
    dtypes = {t.dtype for k, t in new.state_dict().items() if t.is_floating_point() and k != 'timestep'}
    assert dtypes == {torch.bfloat16} and new.timestep.dtype == torch.float32 and new.timestep.item() == TIMESTEP
    old = timm.create_model('test_cleandift', pretrained=True, **published['kwargs']).eval().to(torch.bfloat16)
    x = images(128).bfloat16()
    assert torch.equal(new.forward_features(x), old.forward_features(x))
    assert timm.create_model('test_cleandift', dtype=torch.float16).unet.conv_in.weight.dtype == torch.float16
    with pytest.raises(InputError, match='dtype must be one of'):
        timm.create_model('test_cleandift', dtype='int8')


def test_sdxl_vae_stays_float32_at_load(tmp_path):
    old = timm.create_model('test_sdxl')
    fill_weights(old)
    _save(old, tmp_path / 'w.safetensors')
    new = timm.create_model('test_sdxl', pretrained=True, dtype=torch.float16,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    assert new.unet.conv_in.weight.dtype == torch.float16
    assert {p.dtype for p in new.vae.parameters()} == {torch.float32}
    assert torch.equal(new.vae.encoder.conv_in.weight, old.vae.encoder.conv_in.weight)  # never rounded to float16
    z = new.vae(images(64).half())
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_extractor_loads_in_the_cli_dtype(tmp_path, monkeypatch):
    from diffbackbone.data.extract import load_extractor

    old = timm.create_model('test_cleandift')
    _save(old, tmp_path / 'w.safetensors')
    read = []
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: read.append(k.get('dtype')) or load(*a, **k))
    model = load_extractor('test_cleandift', ['us6'], 'cpu', 'bfloat16', weights=str(tmp_path / 'w.safetensors'))
    assert read == [torch.bfloat16] and model.model.unet.conv_in.weight.dtype == torch.bfloat16


def test_weights_that_do_not_fit_are_refused_before_reading(tmp_path, monkeypatch, capsys):
    old = timm.create_model('test_cleandift')
    path = tmp_path / 'w.safetensors'
    _save(old, path)
    nbytes = hub.safetensors_nbytes(path)
    assert nbytes == sum(t.numel() * t.element_size() for t in load_file(path).values())
    scalars = sum(t.numel() * t.element_size() for t in load_file(path).values() if t.ndim == 0)
    assert hub.safetensors_nbytes(path, torch.bfloat16) == (nbytes - scalars) // 2 + scalars
    monkeypatch.setattr(hub, 'available_memory', lambda: nbytes - 1)
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: pytest.fail('weights read'))
    with pytest.raises(hub.HubError, match=r'need 0\.0 GiB in float32 but only .* available: load them in bfloat16'):
        timm.create_model('test_cleandift', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    # a sharded checkpoint: every shard is counted before any is read
    folder = tmp_path / 'sharded'
    folder.mkdir()
    sd = load_file(path)
    keys = sorted(sd)
    index = {'weight_map': {k: f'part-{i % 2}.safetensors' for i, k in enumerate(keys)}}
    for i in range(2):
        save_file({k: sd[k] for j, k in enumerate(keys) if j % 2 == i}, folder / f'part-{i}.safetensors')
    (folder / 'w.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(hub.HubError, match='GiB of memory is available'):
        timm.create_model('test_cleandift', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
            file=str(folder / 'w.safetensors.index.json')))
    # the CLI prints it as one `error:` line
    from diffbackbone.cli import main

    monkeypatch.setattr(hub, 'available_memory', lambda: 1024)

    assert main(['features', 'diffbackbone/assets/sample.jpg', '--model', 'test_cleandift', '--weights', str(path),
                 '--out', str(tmp_path / 'f.safetensors')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and 'GiB' in err and len(err.splitlines()) == 1


def test_empty_weights_and_assign():
    with empty_weights():
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        m.register_buffer('steps', torch.arange(3))  # buffers are built as usual
    assert all(p.is_meta for p in m.parameters()) and torch.equal(m.steps, torch.arange(3))
    w = torch.randn(4, 3, dtype=torch.float16)
    assign_weights(m, {'0.weight': w, '0.bias': torch.zeros(4)})
    assert m[0].weight.dtype == torch.float32 and torch.equal(m[0].weight, w.float())
    assert torch.equal(m[1].weight, torch.ones(4)) and not _meta(m)  # not in the state dict: initialised


def test_benchmark_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, '-m', 'diffbackbone.bench.coldstart', 'test_cleandift', '--make-weights', str(tmp_path / 'w'),
         '--runs', '1', '--warmup', '0', '--size', '64'], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith('ours ') for line in lines) and any(line.startswith('reference ') for line in lines)
    ratio = [line for line in lines if line.startswith('ours / reference')]
    assert len(ratio) == 2 and len(ratio[0].split()) == 6 and 'load' in ratio[1], out.stdout
    assert 'to first feature' in out.stdout and 'process (+ exit)' in out.stdout and 'peak RSS' in out.stdout
    above = next(line for line in lines if line.startswith('above the imports / weights')).split()
    assert float(above[6]) > 0 and float(above[8]) > 0, out.stdout  # ours X, reference Y
    phases = [line for line in lines if line.startswith(('ours  ', 'reference ')) and 'imports' in line]
    assert len(phases) == 2 and all('load' in line and 'feature' in line for line in phases), out.stdout
    # the reference run imports nothing of ours (nor timm): each side pays its own imports only
    spec = coldstart.make_weights('test_cleandift', tmp_path / 'w')
    child = Path(coldstart.__file__).with_name('coldstart_child.py')
    ref = subprocess.run([sys.executable, '-X', 'importtime', str(child), 'reference', json.dumps(spec), 'float32',
                          '64', '261', 'test_cleandift', 'us6'], capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert ref.returncode == 0, ref.stderr[-2000:]
    imported = {line.split('|')[-1].strip().split('.')[0] for line in ref.stderr.splitlines() if '|' in line}
    assert 'diffusers' in imported and not imported & {'diffbackbone', 'timm'}
    assert json.loads(ref.stdout.splitlines()[-1])['feature'] > 0


def test_reader_equals_load_file_then_cast(tmp_path, monkeypatch):
    """`load_safetensors` reads every tensor into memory of its own (64-byte aligned), converted as `.to(dtype)`
    would, in chunks that need not hold whole tensors; `keep`, scalars and integers stay as stored; `select` reads
    only what it accepts."""
    gen = torch.Generator().manual_seed(0)
    sd = {'a.w': torch.randn(7, 5, generator=gen).half(), 'b.w': torch.randn(33, generator=gen).bfloat16(),
          'c.w': torch.randn(3, 4, generator=gen), 'keep.w': torch.randn(6, generator=gen).half(),
          'steps': torch.arange(9), 'mask': torch.tensor([True, False, True]), 't': torch.tensor(261.5),
          'empty': torch.zeros(0, 3)}
    path = tmp_path / 'w.safetensors'
    save_file(sd, path)
    monkeypatch.setattr(hub, '_CHUNK', 10)  # 5 float16 or 2 float32 elements at a time
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        got = hub.load_safetensors(path, what='w', dtype=dtype, keep=('keep.',))
        assert got.keys() == load_file(path).keys()
        for k, v in load_file(path).items():
            want = v.to(dtype) if dtype and v.is_floating_point() and v.ndim and not k.startswith('keep.') else v
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), (dtype, k)
            assert got[k].data_ptr() % 64 == 0 or not got[k].numel()
    assert hub.load_safetensors(path, what='w', select=lambda k: k.endswith('.w')).keys() == \
        {'a.w', 'b.w', 'c.w', 'keep.w'}
    # every float16 and bfloat16 value, to the other 16-bit type: the same as `.to(dtype)` (a NaN stays a NaN)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    save_file({'h': bits.view(torch.float16), 'b': bits.clone().view(torch.bfloat16)}, path)
    for key, dtype in (('h', torch.bfloat16), ('b', torch.float16)):
        got, want = hub.load_safetensors(path, what='w', dtype=dtype)[key], bits.view(load_file(path)[key].dtype).to(dtype)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()]), key


def test_vae_decoder_is_not_read(published, hub_cache, monkeypatch):
    read = []
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: read.append(out := load(*a, **k)) or out)
    timm.create_model('test_cleandift', pretrained=True, **published['kwargs'])
    vae = [sd for sd in read if any(k.startswith('encoder.') for k in sd)]
    assert len(vae) == 1 and all(k.startswith(('encoder.', 'quant_conv.')) for k in vae[0])


def test_memory_check_counts_the_vae_before_reading_anything(published, hub_cache, monkeypatch):
    """One check before any read: the UNet file in float32 and the base repo's VAE encoder (not its decoder)."""
    from diffbackbone.models._vae import encoder_key

    unet = hub.safetensors_nbytes(published['tmp'] / 'unet.safetensors', torch.float32)
    vae = hub.download(BASE, 'vae/diffusion_pytorch_model.safetensors', what='VAE')
    encoder = hub.safetensors_nbytes(vae, torch.float32, encoder_key)
    assert 0 < encoder < hub.safetensors_nbytes(vae, torch.float32)
    text = hub.safetensors_nbytes(hub.download(BASE, 'text_encoder/model.safetensors', what='CLIP'), torch.float32)
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: pytest.fail('weights read'))
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + encoder + text - 1)  # + the uncached empty prompt's
    with pytest.raises(hub.HubError, match='weights of test_cleandift with VAE and text encoder need'):
        timm.create_model('test_cleandift', pretrained=True, **published['kwargs'])
    monkeypatch.setattr(hub, 'load_safetensors', load)
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + encoder + text)
    timm.create_model('test_cleandift', pretrained=True, **published['kwargs'])


def test_memory_check_counts_the_text_encoder_of_an_uncached_prompt(published, hub_cache, monkeypatch):
    """A prompt whose embedding is not cached loads the text encoder (float32) once: counted; once cached, not."""
    from diffbackbone.models._vae import encoder_key

    unet = hub.safetensors_nbytes(published['tmp'] / 'unet.safetensors', torch.float32)
    vae = hub.download(BASE, 'vae/diffusion_pytorch_model.safetensors', what='VAE')
    encoder = hub.safetensors_nbytes(vae, torch.float32, encoder_key)
    text = hub.safetensors_nbytes(hub.download(BASE, 'text_encoder/model.safetensors', what='CLIP'), torch.float32)
    assert text > 0
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + encoder + text - 1)
    with pytest.raises(hub.HubError, match='weights of test_cleandift with VAE and text encoder need'):
        timm.create_model('test_cleandift', pretrained=True, prompt='a cat', **published['kwargs'])
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + encoder + text)
    timm.create_model('test_cleandift', pretrained=True, prompt='a cat', **published['kwargs'])
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + encoder)  # the embedding is cached now
    timm.create_model('test_cleandift', pretrained=True, prompt='a cat', **published['kwargs'])


def _reads(monkeypatch) -> list[tuple[Path, dict]]:
    read = []
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda path, **k: read.append((Path(path), out := load(path, **k)))
                        or out)
    return read


def test_features_only_reads_only_the_blocks_it_keeps(published, hub_cache, monkeypatch):
    """`features_only` prunes before the weights are read: the UNet file's tensors of dropped blocks are never read
    nor counted in the memory check, and the features equal the whole model's."""
    x = images(128)
    whole = timm.create_model('test_cleandift', pretrained=True, num_classes=0, **published['kwargs']).eval()
    with torch.no_grad():
        want = whole.forward_intermediates(x, indices=['us3'], intermediates_only=True)[0]
    counted = []
    check = hub.check_fits
    monkeypatch.setattr(hub, 'check_fits', lambda n, *a: counted.append(n) or check(n, *a))
    timm.create_model('test_cleandift', pretrained=True, num_classes=0, **published['kwargs'])
    read = _reads(monkeypatch)
    feats = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us3',),
                              **published['kwargs'])
    unet_file = published['tmp'] / 'unet.safetensors'
    got = [sd for path, sd in read if path.name == unet_file.name]
    assert len(got) == 1
    every = set(load_file(unet_file))
    kept = {k.removeprefix('unet.') for k in feats.model.state_dict()}
    dropped = every - kept
    assert set(got[0]) == every & kept and len(dropped) > len(every) // 3
    assert all(k.startswith(('up_blocks.1.', 'up_blocks.2.', 'up_blocks.3.', 'up_blocks.0.upsamplers.',
                             'conv_norm_out.', 'conv_out.')) for k in dropped)
    assert counted[0] - counted[1] == hub.safetensors_nbytes(unet_file, torch.float32, dropped.__contains__) > 0
    with torch.no_grad():
        assert torch.equal(feats(x)[0], want)
    assert not _meta(feats)


def test_a_sharded_transformer_reads_no_shard_of_dropped_blocks(tmp_path, monkeypatch):
    old = timm.create_model('test_pixart').eval()
    fill_weights(old)
    sd = {k: v.detach().clone().contiguous() for k, v in old.state_dict().items()}
    late = {k for k in sd if k.startswith(('transformer.transformer_blocks.2.', 'transformer.transformer_blocks.3.'))}
    assert late
    save_file({k: sd[k] for k in late}, tmp_path / 'late.safetensors')
    save_file({k: v for k, v in sd.items() if k not in late}, tmp_path / 'early.safetensors')
    index = tmp_path / 'w.safetensors.index.json'
    index.write_text(json.dumps({'weight_map': {k: 'late.safetensors' if k in late else 'early.safetensors'
                                                for k in sd}}))
    read = _reads(monkeypatch)
    feats = timm.create_model('test_pixart', pretrained=True, features_only=True, out_indices=('vit-block1-out',),
                              pretrained_cfg_overlay=dict(file=str(index)))
    shards = {path.name: sd for path, sd in read}
    assert shards['late.safetensors'] == {} and set(shards['early.safetensors']) == sd.keys() - late
    x = images(128)
    with torch.no_grad():
        assert torch.equal(feats(x)[0], old.forward_intermediates(x, indices=['vit-block1-out'],
                                                                  intermediates_only=True)[0])
    (tmp_path / 'late.safetensors').write_bytes(b'broken')  # a dropped block's shard is still checked
    with pytest.raises(hub.HubError, match='late.safetensors'):
        timm.create_model('test_pixart', pretrained=True, features_only=True, out_indices=('vit-block1-out',),
                          pretrained_cfg_overlay=dict(file=str(index)))


def test_pruning_before_loading_keeps_the_checks_and_the_selection(tmp_path):
    old = timm.create_model('test_cleandift').eval()
    fill_weights(old)
    sd = {k: v.detach().clone().contiguous() for k, v in old.state_dict().items()}
    path = tmp_path / 'w.safetensors'
    save_file({k: v for k, v in sd.items() if not k.startswith('unet.conv_out.')}, path)
    with pytest.raises(hub.HubError, match=r"missing keys \['unet.conv_out.bias', 'unet.conv_out.weight'\]"):
        timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us3',),
                          pretrained_cfg_overlay=dict(file=str(path)))
    # an index beside a tap outside feature_info (which moves the indices): the taps of the unpruned way
    save_file(sd, path)
    names = old.tap_names()
    sel = (names.index('us3'), 'down-level1-repeat0-res-out')
    new = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=sel,
                            pretrained_cfg_overlay=dict(file=str(path)))
    ref = timm.create_model('test_cleandift', features_only=True, out_indices=sel)
    ref.model.load_state_dict({k: v for k, v in sd.items() if k in ref.model.state_dict()})
    assert new.feature_info.module_name() == ref.feature_info.module_name()
    x = images(128)
    with torch.no_grad():
        for a, b in zip(new(x), ref(x)):
            assert torch.equal(a, b)


def test_benchmark_refuses_bad_input_before_writing(tmp_path, capsys):
    """One argparse `error:` line, exit 2, and nothing written: a folder holding files the benchmark did not write
    (a user's real base repo) is never written into; a file; a size the UNet cannot take."""
    foreign = tmp_path / 'models'
    (foreign / 'base').mkdir(parents=True)
    (foreign / 'base' / 'model_index.json').write_text('mine')
    afile = tmp_path / 'f.txt'
    afile.write_text('x')
    for argv, message in ((['--make-weights', str(foreign)], 'did not write'), (['--make-weights', str(afile)],
                          'is not a folder'), (['--make-weights', str(tmp_path / 'new'), '--size', '100'],
                          'multiple of 64'), (['--warmup', '-1'], '--warmup')):
        with pytest.raises(SystemExit) as e:
            coldstart.main(['test_cleandift', *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith('python -m diffbackbone.bench.coldstart: error:') \
            and message in err[-1] and 'Traceback' not in '\n'.join(err), argv
    assert sorted(p.name for p in foreign.rglob('*')) == ['base', 'model_index.json']
    assert (foreign / 'base' / 'model_index.json').read_text() == 'mine' and afile.read_text() == 'x'
    assert not (tmp_path / 'new').exists()
