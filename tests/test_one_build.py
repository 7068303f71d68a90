"""Issue #29: every entry point builds its model once, without a random initialisation when weights are loaded, and
reads each weights file once: `features` (a feature store, with data-loader workers), `train corres`,
`fpn_backbone`, `clean-train` (teacher and student: two models, one read) and the fused model's DINOv2 (mmseg's
backbone: tests/test_mmseg_one_build.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import diffbackbone  # noqa: F401
from diffbackbone import hub
from diffbackbone.models._base import DiffusionBackbone
from golden_taps import fill_weights

pytestmark = pytest.mark.usefixtures('one_thread')

SAMPLE = str(Path(__file__).resolve().parents[1] / 'diffbackbone' / 'assets' / 'sample.jpg')


class Builds:
    """What the code under test built and read. Builds and reads go to a file, so that forked data-loader workers
    would be counted too; random initialisations are kept in this process (their tensors held, so ids stay unique)."""

    def __init__(self, log: Path):
        self.log, self.models, self.random = log, [], {}

    def record(self, kind: str, what: str) -> None:
        with open(self.log, 'a') as f:
            f.write(json.dumps([kind, what]) + '\n')

    def of(self, kind: str) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [w for k, w in map(json.loads, lines) if k == kind]

    def real(self) -> list[str]:
        """The models built in this process that hold weights (not a probe built on the meta device), once every build
        logged (data-loader workers' included) is one of them."""
        assert len(self.of('build')) == len(self.models), 'a model was built in another process'
        return [type(m).__name__ for m in self.models if not all(p.is_meta for p in m.parameters())]

    def randomly_initialised(self, module: torch.nn.Module) -> list[str]:
        """Parameters of `module` that were once filled at random (a random init the loaded weights then overwrote)."""
        return [k for k, p in module.named_parameters() if id(p) in self.random and self.random[id(p)] is p]


@pytest.fixture
def builds(tmp_path, monkeypatch) -> Builds:
    from timm.models.vision_transformer import VisionTransformer

    rec = Builds(tmp_path / 'builds.jsonl')
    for cls in (DiffusionBackbone, VisionTransformer):
        init = cls.__init__

        def counted(self, *args, __init=init, **kwargs):  # a family's __init__ calls its base's once
            rec.record('build', type(self).__name__)
            rec.models.append(self)
            __init(self, *args, **kwargs)

        monkeypatch.setattr(cls, '__init__', counted)
    load = hub.load_safetensors

    def read(path, *args, **kwargs):
        rec.record('read', Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(hub, 'load_safetensors', read)
    for name in ('uniform_', 'normal_'):
        fill = getattr(torch.Tensor, name)

        def random(self, *args, __fill=fill, **kwargs):
            if isinstance(self, torch.nn.Parameter) and not self.is_meta:
                rec.random[id(self)] = self
            return __fill(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, random)
    return rec


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> Path:
    """A whole test_cleandift state dict (VAE and prompt included: nothing is completed from a base repo)."""
    model = timm.create_model('test_cleandift')
    fill_weights(model)
    path = tmp_path_factory.mktemp('one_build') / 'w.safetensors'
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _images(folder: Path, n: int = 4) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.open(SAMPLE).resize((48 + 8 * i, 64)).save(folder / f'{i}.jpg')
    return folder


def test_the_counter_sees_a_double_build(builds, weights):
    """The fixture itself: a random model then loaded (the old way) is one random initialisation, two builds two."""
    model = timm.create_model('test_cleandift')
    model.load_state_dict(hub.load_safetensors(weights, what='w'))
    timm.create_model('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert builds.of('build') == ['DiffusionUNet', 'DiffusionUNet'] and builds.of('read') == ['w.safetensors'] * 2
    assert builds.randomly_initialised(model) and not builds.randomly_initialised(builds.models[1])


def test_features_store_with_workers(builds, weights, tmp_path):
    from diffbackbone.cli import main

    images = _images(tmp_path / 'images')
    assert main(['features', str(images), '--model', 'test_cleandift', '--weights', str(weights), '--taps', 'us6',
                 '--size', '64', '--batch-size', '2', '--workers', '2', '--out', str(tmp_path / 'store')]) == 0
    assert builds.of('build') == ['DiffusionUNet'] and builds.of('read') == ['w.safetensors']
    assert not builds.randomly_initialised(builds.models[0])


def test_fpn_backbone(builds, weights):
    from diffbackbone.torchvision import fpn_backbone

    fpn_backbone('test_cleandift', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert builds.of('build') == ['DiffusionUNet'] and builds.of('read') == ['w.safetensors']
    assert not builds.randomly_initialised(builds.models[0])


def test_train_corres(builds, tmp_path, capsys):
    from diffbackbone import cli
    from test_corres import TINY, _dataset

    data = _dataset(tmp_path / 'JPEGImages')
    assert cli.main(['train', 'corres', '--data', str(data), '--store', str(tmp_path / 'store'), '--out',
                     str(tmp_path / 'run'), '--epochs', '1', '--pairs-per-epoch', '1', '--no-progress', *TINY]) == 0
    # random weights here (the features pass loads nothing); the protocol's timestep for a noisy model is decided by a
    # probe built on the meta device (evals.common.noisy_model: no memory, no weights)
    assert builds.real() == ['DiffusionUNet']


def test_clean_train_from_a_diffusers_folder(builds, tmp_path):
    """Teacher and student: two models, the base UNet read once, neither initialised at random."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffbackbone.models._vae import VAE_TEST
    from diffbackbone.models.diffusion_unet import _UNET_TEST
    from diffbackbone.train import build_models
    from fakehub import save_tiny_clip

    base = tmp_path / 'my-sd'  # a tiny Stable Diffusion in diffusers layout (as test_train's tiny_sd)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_UNET_TEST)
    unet.save_pretrained(base / 'unet')
    vae = {k: v for k, v in VAE_TEST.items() if k != 'scaling_factor'}
    AutoencoderKL(**vae, down_block_types=('DownEncoderBlock2D',) * 4,
                  up_block_types=('UpDecoderBlock2D',) * 4).save_pretrained(base / 'vae')
    save_tiny_clip(base, hidden_size=_UNET_TEST['cross_attention_dim'])
    builds.log.unlink(missing_ok=True)
    builds.random.clear()
    models = build_models(str(base))
    assert builds.of('build') == ['DiffusionUNet', 'DiffusionUNet']
    assert builds.of('read').count('diffusion_pytorch_model.safetensors') == 2  # the UNet once, the VAE once
    for m in (models.teacher, models.student):
        assert not builds.randomly_initialised(m)
    for k, v in unet.state_dict().items():
        assert torch.equal(models.student.unet.state_dict()[k], v) and torch.equal(models.teacher.unet.state_dict()[k], v)
    assert models.student.timestep.item() == 261.0 and models.student.unet.conv_in.weight.data_ptr() != \
        models.teacher.unet.conv_in.weight.data_ptr()


def test_clean_train_cli(builds, tmp_path, capsys):
    from diffbackbone.cli import main

    images = _images(tmp_path / 'images')
    assert main(['clean-train', '--base', 'test_cleandift', '--random-weights', '--data', str(images), '--out',
                 str(tmp_path / 'run'), '--steps', '1', '--size', '64', '--batch-size', '2', '--workers', '2',
                 '--val-images', '0', '--no-progress', '--taps', 'us6']) == 0
    assert builds.of('build') == ['DiffusionUNet', 'DiffusionUNet']  # teacher and student
    student = builds.models[1]
    assert not builds.randomly_initialised(student)  # copied from the teacher, never drawn at random


def test_fused_dinov2_built_without_a_random_init(builds, tmp_path):
    sd, dino = timm.create_model('test_cleandift_dinov2'), timm.create_model('test_vit_dinov2')
    for m, name in ((sd.diffusion, 'sd'), (dino, 'dino')):
        save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()},
                  tmp_path / f'{name}.safetensors')
    builds.log.unlink()
    builds.random.clear()
    new = timm.create_model('test_cleandift_dinov2', pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'sd.safetensors')),
                            dino_kwargs=dict(pretrained_cfg_overlay=dict(file=str(tmp_path / 'dino.safetensors'))))
    assert builds.of('build') == ['DiffusionUNet', 'VisionTransformer']
    assert not builds.randomly_initialised(new.dino) and not builds.randomly_initialised(new.diffusion)
    own = new.dino.state_dict()
    for k, v in dino.state_dict().items():
        if k in own:  # the fused model prunes the blocks after its layer
            assert torch.equal(own[k], v), k
