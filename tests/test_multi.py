"""Multi-model backbones (`diffbackbone/models/multi.py`): Meng et al.'s concatenation of several models' taps, checked
against the members run by hand, through timm's API (`features_only`, `forward_intermediates`)."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import diffbackbone  # noqa: F401 (registers the models)
from diffbackbone.errors import InputError
from diffbackbone.models._taps import TapError
from diffbackbone.models.multi import MULTI_TAP, is_multi_model


def _images(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _by_hand(x):
    """Their AggregationNetwork.forward on our tiny members: each model on the image at its size (ours: resized
    bicubically, see docs/fidelity.md), every tap `F.interpolate(f, (16, 16), mode='bilinear')`, the up-path
    cross-attention maps averaged per size, concatenated."""
    torch.manual_seed(0)
    xl = timm.create_model('test_sdxl', timestep=50).eval()
    sd = timm.create_model('test_dift', timestep=50).eval()
    taps_sd = ['up-level1-repeat1-vit-block0-cross-q', 'up-level2-repeat1-vit-block0-cross-q', 'us9',
               'up-level3-repeat0-vit-block0-self-k']
    cross = {16: [f'up-level2-repeat{j}-vit-block0-cross-map' for j in range(3)],
             8: [f'up-level3-repeat{j}-vit-block0-cross-map' for j in range(3)]}
    with torch.no_grad():
        a = xl.forward_intermediates(x, indices=['gdf_practical'], intermediates_only=True)
        small = F.interpolate(x, size=(64, 64), mode='bicubic', align_corners=False, antialias=True)
        b = sd.forward_intermediates(small, indices=taps_sd + cross[16] + cross[8], intermediates_only=True)
    maps = a + b[:4] + [torch.stack(b[4:7]).mean(0), torch.stack(b[7:10]).mean(0)]
    return torch.cat([F.interpolate(m, (16, 16), mode='bilinear') for m in maps], 1)


def test_concatenation_equals_members_run_by_hand():
    x = _images()
    torch.manual_seed(0)
    model = timm.create_model('test_multi').eval()
    assert is_multi_model('test_multi') and is_multi_model('ours_xl_t') and not is_multi_model('test_dift')
    with torch.no_grad():
        out = model.forward_features(x)
    ref = _by_hand(x)
    assert out.shape == ref.shape == (2, model.num_features, 16, 16)
    torch.testing.assert_close(out, ref)


def test_timm_feature_api():
    x = _images(1)
    torch.manual_seed(0)
    feats = timm.create_model('test_multi', features_only=True,
                              out_indices=(MULTI_TAP, 'test_dift:up-cross-s8', 'test_sdxl:up-level0-repeat0-vit-block5-out'))
    info = feats.feature_info.get_dicts()
    assert [i['name'] for i in info][0] == MULTI_TAP and feats.feature_info.channels()[1] == 77
    reductions = [i['reduction'] for i in timm.create_model('test_multi').feature_info]
    assert reductions == sorted(reductions)  # timm: strides never fall
    with torch.no_grad():
        maps = feats(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(info[0]['num_chs'], 16, 16), (77, 8, 8), (32, 4, 4)]
    model = timm.create_model('test_multi').eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[MULTI_TAP, 1])
    assert final.shape == inter[0].shape and len(inter) == 2


def test_general_form_and_errors():
    x = _images(1, 64)
    model = timm.create_model('multi_diffusion', members=[dict(model='test_dift', taps=['us6']),
                                                         dict(model='test_dift', taps=['us9'], size=96)],
                              grid=(8, 8), img_size=64).eval()
    assert MULTI_TAP in model.tap_names() and 'test_dift#2:us9' in model.tap_names()
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 64, 8, 8)
    with pytest.raises(InputError, match='needs members'):
        timm.create_model('multi_diffusion')
    with pytest.raises(InputError, match='Unknown member field'):
        timm.create_model('multi_diffusion', members=[dict(model='test_dift', tap='us6')])
    with pytest.raises(TapError):
        timm.create_model('multi_diffusion', members=[dict(model='test_dift', taps=['nope'])])
    with pytest.raises(TapError, match='Unknown tap'):
        model.forward_intermediates(x, indices=['nope'])


def test_ours_xl_t_has_their_channels():
    """Built on the meta device: their config_sdxl (3840) + config_full_15 (3034: four taps and 2 x 77 cross-attention
    maps) + config_full_pgv2 (1280) feature_len, 8154."""
    with torch.device('meta'):
        model = timm.create_model('ours_xl_t')
    chans = {i['name']: i['num_chs'] for i in model.feature_info}
    assert model.num_features == chans[MULTI_TAP] == 8154
    assert sum(c for n, c in chans.items() if n.startswith('sdxl:')) == 3840
    assert sum(c for n, c in chans.items() if n.startswith('sd15:')) == 3034
    assert sum(c for n, c in chans.items() if n.startswith('pgv2:')) == 1280


def test_sizes_and_grid_follow_the_input():
    """Members' sizes and the grid are for the default input and scale with it: every map keeps its feature_info
    stride (timm's check: at most ceil(side / reduction) + 1 positions); at the default size nothing changes."""
    torch.manual_seed(0)
    model = timm.create_model('test_multi').eval()
    x = _images(1, 256)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    for info, m in zip(model.feature_info, maps):
        assert m.shape[1] == info['num_chs'] and m.shape[2] <= -(-256 // info['reduction']) + 1, info['name']
    assert maps[model.tap_names().index(MULTI_TAP)].shape[-2:] == (32, 32)


def test_features_only_default_is_every_tap():
    """`timm.create_model('test_multi', features_only=True)`: every tap, in feature_info's order, the maps the plain
    model gives (the `multi` map its forward_features)."""
    x = _images(1)
    torch.manual_seed(0)
    feats = timm.create_model('test_multi', features_only=True).eval()
    torch.manual_seed(0)
    model = timm.create_model('test_multi').eval()
    assert feats.feature_info.get('name') == model.tap_names() and len(model.tap_names()) == 11
    with torch.no_grad():
        got, want = feats(x), model.forward_intermediates(x, intermediates_only=True)
        multi = model.forward_features(x)
    assert len(got) == len(want) == 11
    for g, w, info in zip(got, want, feats.feature_info.get_dicts()):
        torch.testing.assert_close(g, w)
        assert g.shape[1] == info['num_chs'] and g.shape[-1] == 128 // info['reduction'], info['name']
    torch.testing.assert_close(got[model.tap_names().index(MULTI_TAP)], multi)


def test_features_made_with_bilinear_member_inputs_are_not_reused():
    """Member inputs are now resized bicubically: the family's features revision keys caches and stores apart."""
    from diffbackbone.models._builder import features_revision

    assert features_revision('test_multi') == features_revision('ours_xl_t') == {'features_revision': 2}
    assert features_revision('test_dift') == {}


def test_members_read_only_the_blocks_their_taps_need(tmp_path, monkeypatch):
    """Each member is pruned to its taps before its weights are read (`prune_to`); the features are those of whole
    members loaded and then pruned."""
    from safetensors.torch import load_file, save_file

    from diffbackbone import hub
    from diffbackbone.models.multi import _SD15_AMALGAMATION

    torch.manual_seed(1)
    files = []
    for i, name in enumerate(('test_sdxl', 'test_dift')):
        whole = timm.create_model(name, timestep=50)
        files.append(tmp_path / f'{i}.safetensors')
        save_file({k: v.detach().clone().contiguous() for k, v in whole.state_dict().items()}, files[-1])
    members = [dict(model='test_sdxl', taps='gdf_practical', size=128,
                    kwargs=dict(pretrained_cfg_overlay=dict(file=str(files[0])))),
               dict(model='test_dift', taps=_SD15_AMALGAMATION, size=64, up_cross=True,
                    kwargs=dict(pretrained_cfg_overlay=dict(file=str(files[1]))))]
    read = {}
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda path, **k: read.setdefault(Path(path).name, load(path, **k)))
    new = timm.create_model('test_multi', pretrained=True, members=members).eval()
    ref = timm.create_model('test_multi').eval()
    for member, path in zip(ref.models, files):
        member.load_state_dict({k: v for k, v in load_file(path).items() if k in member.state_dict()})
    for member, path in zip(new.models, files):
        every = set(load_file(path))
        assert set(read[path.name]) == every & set(member.state_dict())
    assert len(read[files[0].name]) < len(load_file(files[0]))  # SDXL's blocks after its deepest tap: never read
    x = _images()
    with torch.no_grad():
        assert torch.equal(new.forward_features(x), ref.forward_features(x))


def test_members_that_do_not_fit_together_are_refused_before_any_is_read(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from diffbackbone import hub
    from diffbackbone.models.multi import _SD15_AMALGAMATION

    files, kept = [], 0
    ref = timm.create_model('test_multi')
    for i, (name, member) in enumerate(zip(('test_sdxl', 'test_dift'), ref.models)):
        files.append(tmp_path / f'{i}.safetensors')
        save_file({k: v.detach().clone().contiguous() for k, v in timm.create_model(name).state_dict().items()},
                  files[-1])
        kept += sum(t.numel() * t.element_size() for t in member.state_dict().values())
    members = [dict(model='test_sdxl', taps='gdf_practical', size=128,
                    kwargs=dict(pretrained_cfg_overlay=dict(file=str(files[0])))),
               dict(model='test_dift', taps=_SD15_AMALGAMATION, size=64, up_cross=True,
                    kwargs=dict(pretrained_cfg_overlay=dict(file=str(files[1]))))]
    load = hub.load_safetensors
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: pytest.fail('weights read'))
    monkeypatch.setattr(hub, 'available_memory', lambda: kept - 1)
    with pytest.raises(hub.HubError, match='with the other members need'):
        timm.create_model('test_multi', pretrained=True, members=members)
    monkeypatch.setattr(hub, 'load_safetensors', load)
    monkeypatch.setattr(hub, 'available_memory', lambda: kept)
    timm.create_model('test_multi', pretrained=True, members=members)
