"""LoRA fused into the UNet (`lora=`, `lora_scale=`): every tap against diffusers' pipeline.load_lora_weights on the
same tiny weights, the LoRA served by the fake Hub or read from a file, its identity recorded; a LoRA of another
architecture refused."""
import hashlib
import json

import pytest
import timm
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

import diffbackbone  # noqa: F401
from diffbackbone import cli
from diffbackbone.models import diffusion_unet as du
from test_inversion import _diffusers_weights

REPO = 'diffbackbone/test-lora'


def _save_lora(unet_cfg: dict, folder, seed: int) -> None:
    """A random (non-zero) rank-4 LoRA on the attention projections of a tiny UNet, saved as diffusers saves one."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)


@pytest.fixture(scope='module')
def lora_files(tmp_path_factory, fake_hub):
    root = tmp_path_factory.mktemp('lora')
    _save_lora(du._UNET_TEST, root / 'sd', seed=5)
    _save_lora(du._UNET_TEST_SDXL, root / 'sdxl', seed=6)
    fake_hub.add_folder(REPO, root / 'sd')
    return root


def _reference(unet, vae, sd, lora_dir, scale, x, taps):
    """Taps of diffusers' own pipeline after `load_lora_weights` (LoRA layers unfused, adapter weight `scale`)."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir), weight_name='pytorch_lora_weights.safetensors', adapter_name='ref')
    pipe.set_adapters(['ref'], adapter_weights=[scale])
    store, handles = {}, []
    for tap in taps:
        def hook(mod, args, out, name=tap.name):
            store.setdefault(name, out[0] if isinstance(out, tuple) else out)
        handles.append(pipe.unet.get_submodule(tap.module.removeprefix('unet.')).register_forward_hook(hook))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        pipe.unet(z, 300, encoder_hidden_states=sd['prompt_embeds'].expand(x.shape[0], -1, -1))
    for h in handles:
        h.remove()
    return store


@pytest.mark.parametrize('source,scale', [('hub', 1.0), ('file', 0.5)])
def test_fused_lora_taps_equal_diffusers_load_lora_weights(source, scale, lora_files, fake_hub, hub_cache, tmp_path):
    unet, vae, sd, _, path = _diffusers_weights('test_dift', tmp_path)
    sd['timestep'] = torch.tensor(300.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    lora = REPO if source == 'hub' else str(lora_files / 'sd' / 'pytorch_lora_weights.safetensors')
    model = timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              lora=lora, lora_scale=scale).eval()
    if source == 'hub':
        assert model.lora_identity == f'{REPO}@{fake_hub.commit_of(REPO)}:pytorch_lora_weights.safetensors'
    else:
        assert model.lora_identity == 'sha256:' + hashlib.sha256(open(lora, 'rb').read()).hexdigest()
    assert not any('lora' in k for k in model.state_dict())  # fused: plain weights, no LoRA layers in the forward
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=list(range(len(model.taps))), intermediates_only=True)
    base = {k[5:]: v for k, v in model.state_dict().items() if k.startswith('unet.')}
    assert any(not torch.equal(base[k], v) for k, v in unet.state_dict().items() if k in base)  # the LoRA changed it
    ref = _reference(unet, vae, sd, lora_files / 'sd', scale, x, model.taps)
    for tap, got in zip(model.taps, ours):
        err = (got - ref[tap.name]).abs().max().item() / ref[tap.name].abs().max().item()
        assert err < 1e-4, f'tap {tap.name}: relative error {err}'


def test_lora_of_another_architecture_and_bad_values_are_refused(lora_files, tmp_path):
    *_, path = _diffusers_weights('test_dift', tmp_path)
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), ensemble=1)
    with pytest.raises(ValueError, match='another architecture'):
        timm.create_model('test_dift', lora=str(lora_files / 'sdxl' / 'pytorch_lora_weights.safetensors'), **kw)
    with pytest.raises(ValueError, match='does not exist'):
        timm.create_model('test_dift', lora=str(tmp_path / 'missing.safetensors'), **kw)
    not_lora = tmp_path / 'plain.safetensors'
    save_file({'weight': torch.zeros(2)}, not_lora)
    with pytest.raises(ValueError, match='not a LoRA'):
        timm.create_model('test_dift', lora=str(not_lora), **kw)
    with pytest.raises(ValueError, match='pretrained=True'):
        timm.create_model('test_dift', lora=str(not_lora))
    with pytest.raises(ValueError, match='lora_scale must be a number'):
        timm.create_model('test_dift', lora_scale='high')


def test_feature_store_records_the_lora_identity(lora_files, fake_hub, hub_cache, tmp_path, capsys):
    *_, path = _diffusers_weights('test_dift', tmp_path)
    image = tmp_path / 'a.png'
    Image.new('RGB', (128, 128), (90, 20, 200)).save(image)
    store = tmp_path / 'store'
    args = ['features', str(image), '--model', 'test_dift', '--weights', str(path), '--taps', 'us6', '--out', str(store),
            '--workers', '0', '--device', 'cpu', '--model-kwargs', json.dumps({'lora': REPO, 'ensemble': 1})]
    assert cli.main(args) == 0
    config = json.loads((store / 'index.json').read_text())['config']
    assert config['lora'] == f'{REPO}@{fake_hub.commit_of(REPO)}:pytorch_lora_weights.safetensors'
    capsys.readouterr()
    bad = ['features', str(image), '--model', 'test_dift', '--weights', str(path), '--taps', 'us6', '--out',
           str(tmp_path / 'other'), '--device', 'cpu', '--model-kwargs',
           json.dumps({'lora': str(lora_files / 'sdxl' / 'pytorch_lora_weights.safetensors'), 'ensemble': 1})]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'another architecture' in err[0]


def test_a_changed_lora_gets_another_eval_cache(lora_files, fake_hub, hub_cache, tmp_path):
    """The SPair / HPatches / DAVIS caches are keyed by the LoRA's identity (file hash, Hub commit), not its name: a
    LoRA file changed in place never reads the features of the old one."""
    import argparse

    from diffbackbone.evals.common import feature_cache
    from diffbackbone.evals.feature_cache import FeatureCache
    from diffbackbone.evals.spair import spair_cache

    lora = tmp_path / 'mine.safetensors'
    lora.write_bytes((lora_files / 'sd' / 'pytorch_lora_weights.safetensors').read_bytes())
    args = argparse.Namespace(cache=str(tmp_path / 'cache'), model='test_dift', weights=None, random_weights=True,
                              seed=0, dtype='float32', size=128, prompt_template=None)

    def keys(kwargs):
        return feature_cache(args, 'us9', kwargs, protocol='hpatches').key, spair_cache(args, 'us6', kwargs).key

    kwargs = {'lora': str(lora), 'lora_scale': 0.5}
    first = keys(kwargs)
    assert keys(kwargs) == first  # the same file: the same folders (a resumed run reads them)
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert json.loads((tmp_path / 'cache' / first[0] / 'config.json').read_text())['lora'] == f'sha256:{digest}'
    tensors = load_file(lora)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, lora)  # same path, same name in --model-kwargs, other weights
    changed = keys(kwargs)
    assert changed[0] != first[0] and changed[1] != first[1]
    hub = keys({'lora': REPO})
    assert json.loads((tmp_path / 'cache' / hub[0] / 'config.json').read_text())['lora'] == \
        f'{REPO}@{fake_hub.commit_of(REPO)}:pytorch_lora_weights.safetensors'
    # without a LoRA the key is what it was before LoRA identities were added (existing caches stay valid)
    plain = FeatureCache(tmp_path / 'c2', dict(model='test_dift', weights=None, random_weights=0, tap='us9',
                                               dtype='float32', model_kwargs={}, protocol='hpatches'))
    assert feature_cache(args, 'us9', {}, protocol='hpatches').key == plain.key


def test_export_records_the_fused_lora(lora_files, tmp_path):
    from diffbackbone.commands.export import export_model

    *_, weights = _diffusers_weights('test_dift', tmp_path)
    lora = lora_files / 'sd' / 'pytorch_lora_weights.safetensors'
    out = export_model(weights, tmp_path / 'export', model='test_dift', model_kwargs={'lora': str(lora),
                                                                                      'lora_scale': 0.75})
    config = json.loads((out / 'config.json').read_text())
    assert config['fused_lora'] == {'identity': 'sha256:' + hashlib.sha256(lora.read_bytes()).hexdigest(),
                                    'scale': 0.75}
    assert 'lora' not in config['model_args']  # fused into the weights: never applied again on load
    plain = export_model(weights, tmp_path / 'plain', model='test_dift')
    assert 'fused_lora' not in json.loads((plain / 'config.json').read_text())


def test_a_lora_that_is_not_a_safetensors_file_is_named_and_never_deleted(tmp_path):
    *_, weights = _diffusers_weights('test_dift', tmp_path)
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), ensemble=1)
    jpeg = tmp_path / 'mine.safetensors'
    Image.new('RGB', (16, 16)).save(jpeg, format='JPEG')  # the user's own file, not a LoRA
    with pytest.raises(ValueError) as e:
        timm.create_model('test_dift', lora=str(jpeg), **kw)
    message = str(e.value)
    assert str(jpeg) in message and 'not a safetensors file' in message, message
    assert 'Delete' not in message and 'deleted' not in message and str(weights) not in message, message
    assert jpeg.is_file() and weights.is_file()


def test_a_broken_local_file_outside_the_cache_is_never_said_to_be_deleted():
    from safetensors import SafetensorError

    from diffbackbone.hub import HubError, hub_errors

    with pytest.raises(HubError) as e, hub_errors('weights of x', filename='/home/me/w.safetensors'):
        raise SafetensorError('Error while deserializing header: header too large')
    assert 'w.safetensors' in str(e.value) and 'Delete' not in str(e.value)
