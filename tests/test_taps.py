"""Every activation as a tap: shapes promised by feature_info, q/k/v and attention maps against the attention modules
themselves, presets, stable default taps, early stopping."""
import pytest
import timm
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.models._taps import PRESETS, SDXL_PRESETS, TapError, list_taps

MODELS = ('test_cleandift', 'test_sdxl')
SIZE = (64, 128)


def _model(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        model.prompt_embeds.normal_()
    return model


def _image(batch: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, *SIZE) * 2 - 1


@pytest.mark.parametrize('name', MODELS)
def test_every_tap_has_the_promised_channels_and_stride(name):
    model = _model(name)
    names = model.tap_names(all=True)
    assert len(names) == len(set(names)) > 100
    with torch.no_grad():
        maps = model.forward_intermediates(_image(), indices=names, intermediates_only=True)
    taps = {t.name: t for t in model.all_taps}
    for tap_name, m in zip(names, maps):
        tap = taps[tap_name]
        assert m.shape == (1, tap.num_chs, SIZE[0] // tap.reduction, SIZE[1] // tap.reduction), tap_name
        assert torch.isfinite(m).all(), tap_name


@pytest.mark.parametrize('name', MODELS)
def test_features_only_with_extra_taps_extends_feature_info(name):
    x = _image()
    extra = 'up-level1-repeat0-vit-block0-cross-q'
    model = timm.create_model(name, features_only=True, out_indices=(extra, 3, 'mid'))
    base = timm.create_model(name)
    info = model.feature_info
    assert info.get('name') == [extra, base.taps[3].name, 'mid']  # ints index the default taps
    assert info.reduction() == [base.all_taps[[t.name for t in base.all_taps].index(extra)].reduction,
                                base.taps[3].reduction, base.taps[-1].reduction]
    reductions = [d['reduction'] for d in info.info]
    assert reductions == sorted(reductions)
    maps = model(x)
    assert [m.shape[1] for m in maps] == info.channels()
    assert [SIZE[0] // m.shape[2] for m in maps] == info.reduction()


def test_default_taps_keep_names_and_positions():
    # CleanDIFT's taps, in the order of the first release: users select them by index.
    assert timm.create_model('test_cleandift').tap_names() == [
        'us12', 'us11', 'us10', 'us9', 'up-level2-repeat2-vit-out', 'us8', 'us7', 'us6', 'up-level1-repeat2-vit-out',
        'us5', 'us4', 'us3', 'up-level0-repeat2-res-out', 'us2', 'us1', 'mid']


@pytest.mark.parametrize('name', MODELS)
def test_paper_aliases_name_the_same_points(name):
    model = _model(name)
    pairs = [('us3', 'up-level0-upsampler-out'), ('mid', 'mid-out'), ('us6', 'up-level1-upsampler-out')]
    with torch.no_grad():
        for canonical, alias in pairs:
            a, b = model.forward_intermediates(_image(), indices=[canonical], intermediates_only=True)[0], \
                model.forward_intermediates(_image(), indices=[alias], intermediates_only=True)[0]
            assert torch.equal(a, b), (canonical, alias)
    with pytest.raises(TapError, match='diffbackbone taps'):
        model.forward_intermediates(_image(), indices=['up-level1-repeat0-vit-block0-cross-k'])


def _attention_inputs(model) -> tuple[dict, list]:
    """Pre-hooks on every Attention module: name -> (hidden_states, encoder_hidden_states) it was called with."""
    inputs, handles = {}, []
    for path, module in model.named_modules():
        if isinstance(module, Attention):
            def hook(mod, args, kwargs, path=path):
                inputs[path] = (args[0] if args else kwargs['hidden_states'], kwargs.get('encoder_hidden_states'))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return inputs, handles


@pytest.mark.parametrize('name', MODELS)
def test_qkv_taps_equal_the_attention_projections(name):
    model = _model(name)
    taps = [t for t in model.all_taps if t.hook in ('q', 'k', 'v')]
    inputs, handles = _attention_inputs(model)
    with torch.no_grad():
        maps = model.forward_intermediates(_image(), indices=[t.name for t in taps], intermediates_only=True)
    for h in handles:
        h.remove()
    assert {t.hook for t in taps} == {'q', 'k', 'v'} and any('cross' in t.name for t in taps)
    for tap, m in zip(taps, maps):
        attn_path, proj = tap.module.rsplit('.', 1)
        attn = model.get_submodule(attn_path)
        hidden, context = inputs[attn_path]
        source = hidden if proj == 'to_q' or context is None else context
        with torch.no_grad():
            ref = getattr(attn, proj)(source)  # (B * ensemble, HW, C)
        ref = ref.unflatten(0, (-1, model.ensemble)).mean(1)  # noisy models average their draws
        assert ref.shape[1] == m.shape[2] * m.shape[3]
        torch.testing.assert_close(m.flatten(2).transpose(1, 2), ref, rtol=1e-5, atol=1e-5, msg=tap.name)


@pytest.mark.parametrize('name', MODELS)
def test_attention_maps_are_probabilities_of_the_modules_attention(name):
    model = _model(name)
    taps = [t for t in model.all_taps if t.hook.endswith('map')]
    inputs, handles = _attention_inputs(model)
    with torch.no_grad():
        maps = model.forward_intermediates(_image(), indices=[t.name for t in taps], intermediates_only=True)
    for h in handles:
        h.remove()
    for tap, m in zip(taps, maps):
        # cross: over tokens (dim 1) per position; self: over key positions (dims 2, 3) per head
        total = m.sum(1) if tap.hook == 'cross-map' else m.sum((2, 3))
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-4, atol=1e-4, msg=tap.name)
        attn = model.get_submodule(tap.module)
        hidden, context = inputs[tap.module]
        with torch.no_grad():  # full attention probabilities, unchunked
            q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = attn.to_k(hidden if context is None else context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # B, heads, queries, keys
        ref = p.mean(1).transpose(1, 2) if tap.hook == 'cross-map' else p.mean(2)
        ref = ref.unflatten(0, (-1, model.ensemble)).mean(1)  # noisy models average their draws
        torch.testing.assert_close(m.flatten(2), ref, rtol=1e-4, atol=1e-5, msg=tap.name)


def test_module_output_taps_equal_the_modules_outputs():
    """Increments, transformer-block outputs, ffn inner activations, resnet/transformer/sampler outputs."""
    model = _model('test_cleandift')
    taps = [t for t in model.all_taps if t.hook in ('', 'conv', 'tokens') and t.location != 'unet-in']
    store, handles = {}, []
    for tap in taps:
        def hook(mod, args, out, name=tap.name):
            store[name] = out[0] if isinstance(out, tuple) else out
        # the mid block runs part by part: its output is its last resnet's
        module = 'unet.mid_block.resnets.1' if tap.name == 'mid' else tap.module
        handles.append(model.get_submodule(module).register_forward_hook(hook))
    with torch.no_grad():
        maps = model.forward_intermediates(_image(), indices=[t.name for t in taps], intermediates_only=True)
    for h in handles:
        h.remove()
    for tap, m in zip(taps, maps):
        ref = store[tap.name]
        if tap.hook == 'tokens':
            ref = ref.transpose(1, 2).reshape(m.shape)
        assert torch.equal(m, ref), tap.name
    resnet = model.unet.up_blocks[1].resnets[0]  # increment = output minus shortcut (output_scale_factor 1)
    assert resnet.output_scale_factor == 1


def test_attention_stays_on_sdpa(monkeypatch):
    model = _model('test_cleandift')
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        model.forward_intermediates(_image(), indices=['up-level1-repeat0-vit-block0-self-q',
                                                       'up-level1-repeat0-vit-block0-self-map'])
    assert processors == {'AttnProcessor2_0'}
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == processors
    assert len(calls) > 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize('name', MODELS)
def test_presets_resolve(name):
    model = timm.create_model(name)
    presets = SDXL_PRESETS if name == 'test_sdxl' else PRESETS
    assert model.presets is presets
    for preset, names in presets.items():
        taps = model._resolve(preset)
        assert [t.name for t in taps] == [model._resolve([n])[0].name for n in names]
        if preset.startswith('gdf'):
            assert len(taps) in (3, 4)
    if name == 'test_sdxl':
        assert [t.reduction for t in model._resolve('pyramid')] == [8, 16, 32]
        assert model._resolve(['up-level0-repeat0-vit-block7-out'])[0].reduction == 32


def test_down_path_tap_does_not_run_mid_or_up_path():
    model = _model('test_cleandift')
    ran = []
    for module in (model.unet.mid_block, model.unet.up_blocks[0], model.unet.down_blocks[2]):
        module.register_forward_pre_hook(lambda mod, args: ran.append(mod))
    with torch.no_grad():
        out = model.forward_intermediates(_image(), indices=['down-level1-repeat0-vit-block0-self-k'],
                                          intermediates_only=True)
    assert out[0].shape[2:] == (SIZE[0] // 16, SIZE[1] // 16)
    assert not ran
    feat = timm.create_model('test_cleandift', features_only=True, out_indices=['down-level1-downsampler-out'])
    assert feat.model.unet.mid_block is None and len(feat.model.unet.up_blocks) == 0
    assert len(feat.model.unet.down_blocks) == 2 and feat.model.unet.down_blocks[1].downsamplers is not None
    assert feat(_image())[0].shape[1:] == (32, SIZE[0] // 32, SIZE[1] // 32)


def test_pruned_model_matches_full_model_on_mid_and_up_taps():
    names = ['mid-repeat0-res-increment', 'mid-vit-block0-ffn-inner', 'up-level1-repeat1-vit-block0-cross-q']
    model = _model('test_cleandift')
    with torch.no_grad():
        full = model.forward_intermediates(_image(), indices=names, intermediates_only=True)
        feat = timm.create_model('test_cleandift', features_only=True, out_indices=names)
        feat.model.load_state_dict(model.state_dict(), strict=False)  # pruned blocks are gone
        pruned = feat.eval()(_image())
    assert len(feat.model.unet.up_blocks) == 2 and len(feat.model.unet.up_blocks[1].resnets) == 2
    for a, b in zip(full, pruned):
        torch.testing.assert_close(a, b)


def test_list_taps_builds_no_weights():
    taps = list_taps('sdxl')  # full-size SDXL on the meta device
    names = [t.name for t in taps]
    for preset in SDXL_PRESETS['gdf_practical']:
        assert preset in names
    tap = taps[names.index('up-level0-repeat0-vit-block7-out')]
    assert (tap.num_chs, tap.reduction) == (1280, 32)
    assert taps[names.index('up-level1-repeat0-vit-block0-cross-q')].num_chs == 640
    assert taps[names.index('us3')].reduction == 16 and taps[names.index('mid')].reduction == 32
    sd15 = {t.name: t for t in list_taps('sd15')}
    assert (sd15['up-level1-repeat1-vit-block0-cross-q'].num_chs, sd15['up-level1-repeat1-vit-block0-cross-q'].reduction) \
        == (1280, 32)
    assert sd15['up-level3-repeat0-vit-block0-self-map'].num_chs == 8  # heads
    assert sd15['up-level3-repeat0-vit-block0-cross-map'].num_chs == 77  # tokens
    assert sd15['up-level3-repeat0-vit-block0-ffn-inner'].num_chs == 4 * 320
