"""Text prompts: embeddings computed once with the base repo's text encoder(s) and cached per (commit, prompt), the
`prompt=` constructor argument, state-dict round trips, and per-image prompts through every wrapper."""
import json
from pathlib import Path

import pytest
import timm
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from fakehub import save_tiny_clip
from safetensors.torch import save_file

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone import prompts
from diffbackbone.errors import InputError
from diffbackbone.hub import HubError
from diffbackbone.models import diffusion_unet as du
from diffbackbone.models._base import VAE_TEST

DOG, CAT = 'a photo of a dog', 'a photo of a cat'


@pytest.fixture(scope='module')
def tiny_base(fake_hub, tmp_path_factory):
    """A base repo with a tiny CLIP text encoder (hidden 32), tokenizer and VAE, on the Hub and as a local folder."""
    folder = tmp_path_factory.mktemp('tiny_base')
    save_tiny_clip(folder, hidden_size=32)
    cfg = VAE_TEST
    n = len(cfg['block_out_channels'])
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=cfg['block_out_channels'], layers_per_block=cfg['layers_per_block'],
                        latent_channels=4, norm_num_groups=cfg['norm_num_groups'],
                        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n)
    (folder / 'vae').mkdir()
    save_file(vae.state_dict(), folder / 'vae' / 'diffusion_pytorch_model.safetensors')
    save_file(UNet2DConditionModel(**du._UNET_TEST).state_dict(), folder / 'unet.safetensors')
    fake_hub.add_folder('org/tiny-sd', folder)
    return folder


def _reference_embeds(folder: Path, texts) -> torch.Tensor:
    """CLIP text encoding as diffusers' StableDiffusionPipeline.encode_prompt does it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / 'tokenizer')
    encoder = CLIPTextModel.from_pretrained(folder / 'text_encoder', dtype=torch.float32).eval()
    ids = tokenizer(list(texts), padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors='pt').input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def _forbid_text_encoder(monkeypatch):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def fail(*args, **kwargs):
        raise AssertionError('text encoder loaded although the embedding is cached')

    for cls in (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer):
        monkeypatch.setattr(cls, 'from_pretrained', fail)


# ---- encode and cache -----------------------------------------------------------------------------------------------
def test_empty_prompt_embeds_from_hub(fake_hub, hub_cache, tiny_base, monkeypatch):
    embeds = prompts.empty_prompt_embeds('org/tiny-sd')
    assert embeds.shape == (1, 77, 32) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, _reference_embeds(tiny_base, ['']), rtol=0, atol=0)
    commit = fake_hub.commit_of('org/tiny-sd')
    assert (hub_cache.ours / 'prompt_embeds/org/tiny-sd' / commit / 'empty_prompt.safetensors').is_file()

    _forbid_text_encoder(monkeypatch)
    fake_hub.requests.clear()
    assert torch.equal(prompts.empty_prompt_embeds('org/tiny-sd'), embeds)
    assert [m for m, *_ in fake_hub.requests] == ['HEAD']
    assert torch.equal(prompts.empty_prompt_embeds(f'org/tiny-sd@{commit}'), embeds)


def test_encode_prompts_caches_each_prompt(fake_hub, hub_cache, tiny_base, monkeypatch):
    batch = prompts.encode_prompts('org/tiny-sd', [DOG, CAT, DOG])
    assert batch.prompts == (DOG, CAT, DOG) and batch.pooled_prompt_embeds is None
    torch.testing.assert_close(batch.prompt_embeds, _reference_embeds(tiny_base, [DOG, CAT, DOG]), rtol=0, atol=0)
    assert not torch.equal(batch.prompt_embeds[0], batch.prompt_embeds[1])
    commit = fake_hub.commit_of('org/tiny-sd')
    assert len(list((hub_cache.ours / 'prompt_embeds/org/tiny-sd' / commit).glob('prompt_*.safetensors'))) == 2

    _forbid_text_encoder(monkeypatch)
    fake_hub.requests.clear()
    again = prompts.encode_prompts('org/tiny-sd', [CAT, DOG])
    assert torch.equal(again.prompt_embeds, batch.prompt_embeds[[1, 0]])
    assert [m for m, *_ in fake_hub.requests] == ['HEAD', 'HEAD']  # one revision check per prompt, no download


def test_encode_prompts_local_folder(hub_cache, tiny_base, monkeypatch):
    batch = prompts.encode_prompts(str(tiny_base), DOG)  # a single string is one prompt
    assert len(batch) == 1
    torch.testing.assert_close(batch.prompt_embeds, _reference_embeds(tiny_base, [DOG]), rtol=0, atol=0)
    empty = prompts.empty_prompt_embeds(str(tiny_base))
    _forbid_text_encoder(monkeypatch)
    assert torch.equal(prompts.encode_prompts(str(tiny_base), [DOG]).prompt_embeds, batch.prompt_embeds)
    assert torch.equal(prompts.empty_prompt_embeds(str(tiny_base)), empty)


def test_encode_prompts_errors(fake_hub, hub_cache, tmp_path):
    with pytest.raises(HubError, match='empty-prompt text embedding.*not found.*base_repo='):
        prompts.empty_prompt_embeds('nobody/sd')
    with pytest.raises(HubError, match=f"prompt '{DOG}'.*not found"):
        prompts.encode_prompts('nobody/sd', [DOG])
    with pytest.raises(HubError, match='tokenizer does not exist.*diffusers layout'):
        prompts.encode_prompts(str(tmp_path), [DOG])
    with pytest.raises(ValueError, match='No prompts'):
        prompts.encode_prompts('org/tiny-sd', [])
    with pytest.raises(ValueError, match='must be strings'):
        prompts.encode_prompts('org/tiny-sd', [DOG, 3])
    with pytest.raises(TypeError, match='no diffbackbone DiffusionUNet'):
        prompts.encode_prompts(torch.nn.Linear(2, 2), [DOG])


def test_offline_uses_cached_prompts(fake_hub, hub_cache, tiny_base, run_python):
    expected = prompts.encode_prompts('org/tiny-sd', [DOG]).prompt_embeds
    torch.save(expected, hub_cache.ours / 'expected.pt')
    fake_hub.requests.clear()
    result = run_python(f"""
import sys, types, torch
for name, path in (('diffbackbone', 'diffbackbone'), ('diffbackbone.models', 'diffbackbone/models')):
    package = types.ModuleType(name)  # models/conditioning/text.py and hub.py alone: no timm, diffusers or transformers import
    package.__path__ = [path]
    sys.modules[name] = package
from diffbackbone import hub
from diffbackbone.models.conditioning import text
assert torch.equal(text.encode_cached('org/tiny-sd', [{DOG!r}], sdxl=False)[{DOG!r}]['prompt_embeds'],
                   torch.load({str(hub_cache.ours / 'expected.pt')!r}))
try:
    text.encode_cached('org/tiny-sd', [{CAT!r}], sdxl=False)
except hub.HubError as e:
    print(str(e).replace(chr(10), ' '))
assert 'transformers' not in sys.modules, 'a text encoder was imported although the embedding is cached'
""", env=hub_cache.env, offline=True)
    assert result.returncode == 0, result.stderr
    assert 'HF_HUB_OFFLINE is set' in result.stdout and CAT in result.stdout
    assert fake_hub.requests == []


# ---- the model's own prompt -----------------------------------------------------------------------------------------
def _pretrained(tiny_base, base_repo=None, **kwargs):
    return timm.create_model('test_cleandift', pretrained=True, base_repo=base_repo or str(tiny_base), timestep=300.0,
                             pretrained_cfg_overlay=dict(file=str(tiny_base / 'unet.safetensors')), **kwargs).eval()


def test_prompt_argument_and_state_dict_round_trip(fake_hub, hub_cache, tiny_base, tmp_path, monkeypatch):
    dog = _pretrained(tiny_base, base_repo='org/tiny-sd', prompt=DOG)  # VAE and text encoder from the (fake) Hub
    commit = fake_hub.commit_of('org/tiny-sd')
    assert len(list((hub_cache.ours / 'prompt_embeds/org/tiny-sd' / commit).glob('prompt_*.safetensors'))) == 1
    plain = _pretrained(tiny_base)  # from the local folder
    assert dog.prompt == DOG and plain.prompt == ''
    torch.testing.assert_close(dog.prompt_embeds, _reference_embeds(tiny_base, [DOG]), rtol=0, atol=0)
    torch.testing.assert_close(plain.prompt_embeds, _reference_embeds(tiny_base, ['']), rtol=0, atol=0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f_dog, f_plain = dog.forward_features(x), plain.forward_features(x)
    assert not torch.allclose(f_dog, f_plain, atol=1e-4)

    save_file(dog.state_dict(), tmp_path / 'dog.safetensors')  # a state dict: it records no prompt
    with monkeypatch.context() as m:
        _forbid_text_encoder(m)  # the embedding travels in the state dict: nothing is encoded again
        rebuilt = timm.create_model('test_cleandift', prompt=DOG).eval()
        rebuilt.load_state_dict(dog.state_dict())
        unasked = _from_file('org/tiny-sd', tmp_path / 'dog.safetensors')  # no prompt asked: the file's embedding
        same = _from_file('org/tiny-sd', tmp_path / 'dog.safetensors', prompt=DOG)  # checked against DOG's (cached)
    (tmp_path / 'no_text_encoder').mkdir()
    with pytest.raises(InputError, match="prompt='a photo of a cat' was asked.*tokenizer does not exist.*Drop the "
                                         "prompt"):  # the asked prompt cannot be encoded: refused, never the file's
        _from_file(tmp_path / 'no_text_encoder', tmp_path / 'dog.safetensors', prompt=CAT)
    with monkeypatch.context() as m:
        _forbid_text_encoder(m)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.forward_features(x), f_dog, rtol=0, atol=0)
            torch.testing.assert_close(unasked.forward_features(x), f_dog, rtol=0, atol=0)
            torch.testing.assert_close(same.forward_features(x), f_dog, rtol=0, atol=0)
            plain.load_state_dict(dog.state_dict())
            torch.testing.assert_close(plain.forward_features(x), f_dog, rtol=0, atol=0)
    with pytest.warns(UserWarning, match='embedding of another prompt'):  # the asked prompt is encoded and wins
        cat_from_dog = _from_file(tiny_base, tmp_path / 'dog.safetensors', prompt=CAT)
    assert cat_from_dog.prompt == CAT
    torch.testing.assert_close(cat_from_dog.prompt_embeds, _reference_embeds(tiny_base, [CAT]), rtol=0, atol=0)
    with torch.no_grad():
        f_cat = _pretrained(tiny_base, prompt=CAT).forward_features(x)
        torch.testing.assert_close(cat_from_dog.forward_features(x), f_cat, rtol=0, atol=0)
    with pytest.raises(ValueError, match='prompt must be a string'):
        timm.create_model('test_cleandift', prompt=[DOG])


def _from_file(base_repo, path, **kwargs):
    return timm.create_model('test_cleandift', pretrained=True, base_repo=str(base_repo),
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_weights_that_record_their_prompt(hub_cache, tiny_base, tmp_path, monkeypatch):
    """Our writers (export, clean-train) record the prompt of the embedding they hold: asked for that prompt, the
    file is used as it is (no text encoder); unasked, the model takes the file's prompt as its own."""
    dog = _pretrained(tiny_base, prompt=DOG)
    save_file(dog.state_dict(), tmp_path / 'dog.safetensors', metadata={'diffbackbone.prompt': DOG})
    _forbid_text_encoder(monkeypatch)
    again = _from_file(tiny_base, tmp_path / 'dog.safetensors', prompt=DOG)
    assert torch.equal(again.prompt_embeds, dog.prompt_embeds) and again.prompt == DOG
    assert _from_file(tiny_base, tmp_path / 'dog.safetensors').prompt == DOG
    with pytest.raises(InputError, match="made for the prompt 'a photo of a dog'"):
        _from_file(tmp_path, tmp_path / 'dog.safetensors', prompt=CAT)  # no text encoder in tmp_path


# ---- per-image prompts ----------------------------------------------------------------------------------------------
def _with_embedding(model: du.DiffusionUNet, embeds: torch.Tensor) -> du.DiffusionUNet:
    other = timm.create_model('test_dift', ensemble=model.ensemble, noise_seed=model.noise_seed).eval()
    sd = model.state_dict()
    sd['prompt_embeds'] = embeds
    missing, unexpected = other.load_state_dict(sd, strict=False)  # `model` may be pruned after its taps
    assert not unexpected and all(k.startswith(('unet.up_blocks.', 'unet.conv_norm_out.', 'unet.conv_out.'))
                                  for k in missing)  # the up path and the output head after them
    return other


def test_use_prompts_per_image_through_wrappers(hub_cache, tiny_base):
    from diffbackbone.mmseg import DiffusionBackbone

    torch.manual_seed(0)
    getter = timm.create_model('test_dift', ensemble=2, base_repo=str(tiny_base), features_only=True,
                               out_indices=('us6', 'mid')).eval()
    net = prompts.find_diffusion_model(getter)
    assert isinstance(net, du.DiffusionUNet)
    batch = prompts.encode_prompts(getter, [DOG, CAT, ''])
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        own = getter(x)
        with prompts.use_prompts(getter, batch):
            per_image = getter(x)
        # image i with prompt i equals a model whose own prompt is prompt i (each of its noisy copies conditioned)
        for i in range(3):
            ref = _with_embedding(net, batch.prompt_embeds[i:i + 1])
            expected = ref.forward_intermediates(x[i:i + 1], indices=['us6', 'mid'], intermediates_only=True)
            for got, exp in zip(per_image, expected):
                torch.testing.assert_close(got[i:i + 1], exp, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(per_image[0][0], per_image[0][1], atol=1e-4)
        torch.testing.assert_close(getter(x)[0], own[0], rtol=0, atol=0)  # outside the block: the model's own prompt
        with prompts.use_prompts(getter, [DOG]):  # one prompt broadcasts to every image
            broadcast = getter(x)[0]
        torch.testing.assert_close(broadcast[0], per_image[0][0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match='2 prompts for a batch of 3 images'):
            with prompts.use_prompts(getter, [DOG, CAT]):
                getter(x)

    backbone = DiffusionBackbone('test_dift', pretrained=False, out_indices=('us6',), frozen=True,
                                 model_kwargs=dict(ensemble=2, base_repo=str(tiny_base)))
    backbone.model.load_state_dict(net.state_dict())
    with prompts.use_prompts(backbone, batch):
        out = backbone(x)[0]
    torch.testing.assert_close(out, per_image[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='do not fit this model'):
        with prompts.use_prompts(backbone, prompts.PromptBatch(('x',), torch.zeros(1, 77, 16))):
            pass


def _sdxl_folder(folder: Path) -> Path:
    """Tokenizers and text encoders of a tiny SDXL-layout repo (hidden 16 + 16, pooled 16)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    save_tiny_clip(folder, hidden_size=16, seed=0)
    save_tiny_clip(folder / 'second', hidden_size=16, seed=1)
    (folder / 'second' / 'tokenizer').rename(folder / 'tokenizer_2')
    config = CLIPTextConfig.from_pretrained(folder / 'second' / 'text_encoder')
    torch.manual_seed(2)
    CLIPTextModelWithProjection(config).eval().save_pretrained(folder / 'text_encoder_2')
    return folder


def test_sdxl_prompts(hub_cache, tmp_path, monkeypatch):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = _sdxl_folder(tmp_path / 'sdxl')
    model = timm.create_model('test_sdxl', ensemble=1, base_repo=str(folder)).eval()
    batch = prompts.encode_prompts(model, [DOG, CAT])
    hidden = []
    for tok, enc, cls in (('tokenizer', 'text_encoder', CLIPTextModel),
                          ('tokenizer_2', 'text_encoder_2', CLIPTextModelWithProjection)):
        ids = CLIPTokenizer.from_pretrained(folder / tok)([DOG, CAT], padding='max_length', max_length=77,
                                                          return_tensors='pt').input_ids
        with torch.no_grad():
            out = cls.from_pretrained(folder / enc).eval()(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    torch.testing.assert_close(batch.prompt_embeds, torch.cat(hidden, -1), rtol=0, atol=0)
    torch.testing.assert_close(batch.pooled_prompt_embeds, out.text_embeds)  # encoded one by one
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        with prompts.use_prompts(model, batch):
            both = model.forward_features(x)
        model.prompt_embeds.copy_(batch.prompt_embeds[1:])
        model.pooled_prompt_embeds.copy_(batch.pooled_prompt_embeds[1:])
        cat = model.forward_features(x[1:])
    torch.testing.assert_close(both[1:], cat, rtol=1e-5, atol=1e-5)
    _forbid_text_encoder(monkeypatch)
    assert torch.equal(prompts.encode_prompts(model, [CAT]).pooled_prompt_embeds, batch.pooled_prompt_embeds[1:])
    with pytest.raises(ValueError, match='without pooled'):
        with prompts.use_prompts(model, prompts.PromptBatch(('x',), batch.prompt_embeds[:1])):
            pass


def test_cli_features_prompt(hub_cache, tiny_base, tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from diffbackbone.cli import main

    image = tmp_path / 'img.png'
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(image)
    common = ['features', str(image), '--model', 'test_cleandift', '--taps', 'us6', '--size', '64',
              '--weights', str(tiny_base / 'unet.safetensors'),
              '--model-kwargs', json.dumps(dict(base_repo=str(tiny_base), timestep=300.0))]
    assert main(common + ['--out', str(tmp_path / 'dog.safetensors'), '--prompt', DOG]) == 0
    assert main(common + ['--out', str(tmp_path / 'plain.safetensors')]) == 0
    with safe_open(tmp_path / 'dog.safetensors', 'pt') as f, safe_open(tmp_path / 'plain.safetensors', 'pt') as g:
        dog, plain = f.get_tensor('us6'), g.get_tensor('us6')
    model = _pretrained(tiny_base, prompt=DOG)
    from diffbackbone.data.images import load_image
    with torch.no_grad():
        expected = model.forward_intermediates(load_image(image, 64)[None], indices=['us6'], intermediates_only=True)[0]
    torch.testing.assert_close(dog, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dog, plain, atol=1e-4)


def assert_per_image_prompts(model, batch) -> torch.Tensor:
    """Two images under `use_prompts(model, batch)` give what each gives alone with its prompt in the model's buffers;
    returns the batched features."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        with prompts.use_prompts(model, batch):
            both = model.forward_features(x)
        singles = []
        for i in range(2):
            for name, value in batch.buffers().items():
                getattr(model, name).copy_(value[i:i + 1])
            singles.append(model.forward_features(x[i:i + 1]))
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-5, atol=1e-5)
    return both


def test_use_prompts_pixart(hub_cache, tmp_path):
    from test_newer_models import _tiny_t5_repo

    _tiny_t5_repo(tmp_path)
    model = timm.create_model('test_pixart', base_repo=str(tmp_path), ensemble=2).eval()
    batch = prompts.encode_prompts(model, ['a photo of a room', 'a dog'])
    assert batch.prompt_embeds.shape == (2, 8, 32)
    assert batch.prompt_mask[1, 0] == 1 and batch.prompt_mask[1, -1] == 0  # the short prompt is padded, masked
    assert_per_image_prompts(model, batch)
    with pytest.raises(ValueError, match='without prompt_mask'):
        with prompts.use_prompts(model, prompts.PromptBatch(('x',), batch.prompt_embeds[:1])):
            pass


def test_features_and_match_never_take_another_prompts_embedding(hub_cache, tiny_base, tmp_path, capsys):
    """`--prompt` with `--weights` holding another prompt's embedding: encoded (and the features are the prompt's), or
    one `error:` line when it cannot be encoded; never the file's embedding under the asked prompt's name."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from diffbackbone.cli import main
    from diffbackbone.data.extract import load_extractor
    from diffbackbone.data.images import load_image

    save_file(_pretrained(tiny_base, prompt=DOG).state_dict(), tmp_path / 'dog.safetensors')
    img = tmp_path / 'a.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    (tmp_path / 'empty').mkdir()
    common = ['--model', 'test_cleandift', '--weights', str(tmp_path / 'dog.safetensors'), '--prompt', CAT,
              '--model-kwargs', json.dumps(dict(base_repo=str(tmp_path / 'empty'), timestep=300.0))]
    for args in (['features', str(img), '--size', '64', '--taps', 'mid', '--out', str(tmp_path / 'f.safetensors')],
                 ['match', str(img), str(img), '--points', '5,5', '--size', '64', '--out', str(tmp_path / 'm.png')]):
        assert main([*args, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: ') and f"prompt={CAT!r}" in err[0], err
    assert not list(tmp_path.glob('f*.safetensors')) and not (tmp_path / 'm.png').exists()
    base = ['--model-kwargs', json.dumps(dict(base_repo=str(tiny_base), timestep=300.0))]
    out = tmp_path / 'cat.safetensors'
    assert main(['features', str(img), '--size', '64', '--taps', 'mid', '--out', str(out), *common[:6], *base]) == 0
    assert 'embedding of another prompt' in capsys.readouterr().err
    cat = load_extractor('test_cleandift', ['mid'], weights=str(tiny_base / 'unet.safetensors'),
                         model_kwargs=dict(prompt=CAT, base_repo=str(tiny_base), timestep=300.0))
    with torch.no_grad():
        expected = cat(load_image(str(img), 64)[None])[0]
    torch.testing.assert_close(load_file(out)['mid'], expected, rtol=0, atol=0)
