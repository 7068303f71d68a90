"""clean-train on tiny random models (CPU, offline): steps run, the loss falls, resume is exact, the output loads."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from diffbackbone.hub import HubError
from diffbackbone.models._base import VAE_TEST
from diffbackbone.models.diffusion_unet import _UNET_TEST
from diffbackbone.train import (
    CleanDistiller,
    CleanTrainer,
    DataError,
    DistillConfig,
    ImageFolder,
    ProjectionHeads,
    TrainConfig,
    TrainError,
    build_models,
    clean_train,
    load_clean_model,
)
from diffbackbone.train.cli import add_clean_train_parser

# Tiny runs: 64 px crops, batch 2, no loader processes, no progress bar.
RUN = dict(base='test_cleandift', pretrained=False, size=64, batch_size=2, num_workers=0, warmup=1, lr=1e-3,
           val_images=2, val_every=2, save_every=2, progress=False)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    """Six readable images of several sizes in nested folders (one captioned), one corrupt and one truncated file."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 96), (64, 64), (100, 70), (72, 120), (90, 90), (66, 80)]):
        folder = root / ('a' if i % 2 else 'b/c')
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f'img{i}.png')
    (root / 'a' / 'img1.txt').write_text('a photo of a cat\n')
    (root / 'broken.jpg').write_bytes(b'this is not a jpeg')
    good = (root / 'b' / 'c' / 'img0.png').read_bytes()
    (root / 'truncated.png').write_bytes(good[:len(good) // 2])
    return root


@pytest.fixture(scope='module')
def full_run(images, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp('full')
    return out, clean_train(str(images), str(out), steps=4, **RUN)


def test_resume_reproduces_the_uninterrupted_run(images, full_run, tmp_path):
    _, full = full_run
    first = clean_train(str(images), str(tmp_path), steps=2, **RUN)
    resumed = clean_train(str(images), str(tmp_path), steps=4, resume='auto', **RUN)
    assert len(full.losses) == 4 and all(np.isfinite(full.losses))
    assert first.losses + resumed.losses == full.losses  # bit-exact
    a, b = load_file(full.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r['val'] for r in map(json.loads, (tmp_path / 'log.jsonl').read_text().splitlines()) if 'val' in r][-1] \
        == full.validation[-1]
    # a checkpoint is refused for other settings, and a used run folder needs --resume
    with pytest.raises(TrainError, match='bins=3 now 2'):
        CleanTrainer(TrainConfig(data=str(images), out=str(tmp_path), steps=6, resume='auto', **dict(RUN, bins=2)))
    with pytest.raises(TrainError, match='already holds checkpoints'):
        CleanTrainer(TrainConfig(data=str(images), out=str(tmp_path), steps=6, **RUN))


def test_run_logs_validates_checkpoints_and_counts_unreadable_images(images, full_run):
    out, result = full_run
    assert sorted(Path(p).name for p in result.skipped_images) == ['broken.jpg', 'truncated.png']
    records = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    steps = [r for r in records if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3, 4]
    assert set(steps[0]['taps']) == {f'us{i}' for i in range(1, 11)} | {'mid'}
    assert steps[-1]['skipped_images'] == 2
    val = [r['val'] for r in records if 'val' in r]
    assert len(val) == 2 and set(val[0]) == {'t=167', 't=500', 't=832', 'mean'}
    assert all(-1 <= v <= 1 for v in val[0].values())
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step-0000002', 'step-0000004']


def test_output_loads_strictly_and_changes_features(full_run):
    _, result = full_run
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    trained = timm.create_model('test_cleandift', pretrained=True, features_only=True, out_indices=('us6', 'us9'),
                                pretrained_cfg_overlay=dict(file=str(result.output))).eval()
    torch.manual_seed(0)  # the trainer's seed: the same random base weights
    base = build_models('test_cleandift', pretrained=False).student.eval()
    with torch.no_grad():
        feats = trained(x)
        base_feats = base.forward_intermediates(x, indices=('us6', 'us9'), intermediates_only=True)
    assert [f.shape for f in feats] == [f.shape for f in base_feats]
    assert all((f - g).abs().max() > 1e-4 for f, g in zip(feats, base_feats))
    sd = load_file(result.output)
    assert float(trained.model.timestep.detach()) == float(sd["timestep"]) != 261.0  # the learned timestep was loaded
    assert any(k.startswith('heads.') for k in sd) and 'prompt_embeds' in sd and any(k.startswith('vae.') for k in sd)

    # the same model through load_clean_model, and noisy-like features from the heads
    other = load_clean_model(result.output, features_only=True, out_indices=('us6', 'us9')).eval()
    heads = ProjectionHeads.from_file(result.output)
    with torch.no_grad():
        assert all(torch.equal(f, g) for f, g in zip(feats, other(x)))
        noisy_like = heads(dict(zip(('us6', 'us9'), feats)), t=100)
        later = heads(dict(zip(('us6', 'us9'), feats)), t=torch.tensor([900, 900]))
    assert noisy_like['us6'].shape == feats[0].shape
    assert not torch.allclose(noisy_like['us6'], later['us6'])  # conditioned on t


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    distiller = CleanDistiller(build_models('test', pretrained=False), DistillConfig(lr=1e-3, warmup=0))
    t = distiller.draw_timesteps(500)
    width = 998 / 3
    for b in range(3):  # one draw inside each stratification bin
        assert ((t[:, b] >= 1 + b * width - 1) & (t[:, b] <= 1 + (b + 1) * width)).all()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    losses = []
    for _ in range(8):
        distiller.generator.manual_seed(0)  # the same timesteps and noise every step
        loss, per_tap = distiller.loss(images)
        loss.backward()
        distiller.optimizer.step()
        distiller.optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert len(per_tap) == 11
    assert losses[-1] < losses[0] - 0.5, losses
    assert float(distiller.student.timestep) != 261.0


def test_distill_config_errors():
    """Bad options fail when the config is made; t_max beyond the base's noise schedule when the distiller is."""
    for bad in (dict(bins=0), dict(t_min=-1), dict(t_min=5, t_max=5)):
        with pytest.raises(TrainError, match=r'Need bins >= 1 and 0 <= t_min < t_max'):
            DistillConfig(**bad)
    with pytest.raises(TrainError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        DistillConfig(precision='fp16')
    with pytest.raises(TrainError, match="latent must be 'sample' or 'mode', got 'mean'"):
        DistillConfig(latent='mean')
    models = build_models('test', pretrained=False)
    models.scheduler = DDPMScheduler(num_train_timesteps=500)
    with pytest.raises(TrainError, match=r't=\[1, 600\]'):
        CleanDistiller(models, DistillConfig(t_max=600))


def test_heads_start_as_identity():
    heads = ProjectionHeads({'us6': 8, 'mid': 16}, width=16, mapping_hidden=32)
    feats = {'us6': torch.randn(3, 8, 4, 5), 'mid': torch.randn(3, 16, 2, 2)}
    out = heads(feats, t=torch.tensor([1, 500, 999]))
    assert all(torch.equal(out[k], feats[k]) for k in feats)
    with pytest.raises(KeyError, match='us9'):
        heads({'us9': torch.randn(1, 8, 2, 2)}, t=1)


def test_unreadable_images_are_replaced_and_reported(images):
    files = sorted(images.rglob('*.jpg')) + sorted(images.rglob('*.png'))
    ds = ImageFolder(files, 64, captions=True)
    sample = ds[0]  # broken.jpg: replaced by the next readable file
    assert sample['image'].shape == (3, 64, 64) and -1 <= sample['image'].min() <= sample['image'].max() <= 1
    assert [Path(p).name for p in sample['skipped']] == ['broken.jpg']
    captions = [ds[i]['caption'] for i in range(len(ds))]
    assert 'a photo of a cat' in captions and '' in captions


def test_bad_input_gives_clear_errors(images, tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'notes.txt').write_text('no images here')
    with pytest.raises(DataError, match='No images found'):
        clean_train(str(empty), str(tmp_path / 'run'), **RUN)
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(TrainError, match='Cannot write to the output folder'):
        clean_train(str(images), str(blocker / 'run'), **RUN)
    with pytest.raises(TrainError, match='Unknown base'):
        clean_train(str(images), str(tmp_path / 'run'), **dict(RUN, base='sd99'))
    with pytest.raises(TrainError, match='batch_size'):
        clean_train(str(images), str(tmp_path / 'run'), **dict(RUN, batch_size=16))
    with pytest.raises(TrainError, match='Need bins >= 1'):  # an option is refused before the base is looked up
        clean_train(str(empty), str(tmp_path / 'run'), **dict(RUN, base='sd99', bins=0))


def test_nan_loss_stops_with_a_checkpoint(images, tmp_path):
    trainer = CleanTrainer(TrainConfig(data=str(images), out=str(tmp_path), steps=3, **RUN))
    unet = trainer.distiller.student.unet
    calls = []

    def poison(module, args, output):  # NaN from the second step on
        calls.append(1)
        return output * float('nan') if len(calls) > 1 else output

    unet.conv_in.register_forward_hook(poison)
    with pytest.raises(TrainError, match='NaN/Inf at step 2') as err:
        trainer.train()
    assert 'step-0000001' in str(err.value)
    assert (tmp_path / 'checkpoints' / 'step-0000001' / 'state.pt').is_file()


def test_cli(images, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_clean_train_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args([
        'clean-train', '--base', 'test_cleandift', '--random-weights', '--data', str(images), '--out', str(tmp_path),
        '--steps', '1', '--size', '64', '--batch-size', '2', '--workers', '0', '--val-images', '0', '--no-progress',
        '--taps', 'us6', 'mid'])
    assert args.func(args) == 0
    assert 'test_cleandift.safetensors' in capsys.readouterr().out
    sd = load_file(tmp_path / 'test_cleandift.safetensors')
    assert {k.split('.')[2] for k in sd if k.startswith('heads.taps.')} == {'us6', 'mid'}
    args = parser.parse_args(['clean-train', '--data', str(tmp_path / 'none'), '--out', str(tmp_path / 'x')])
    assert args.func(args) == 2
    assert 'does not exist' in capsys.readouterr().err


@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion in diffusers layout: unet/, vae/, tokenizer/, text_encoder/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from fakehub import save_tiny_clip

    base = tmp_path_factory.mktemp('my-sd')
    torch.manual_seed(0)
    UNet2DConditionModel(**_UNET_TEST).save_pretrained(base / 'unet')
    vae = {k: v for k, v in VAE_TEST.items() if k != 'scaling_factor'}
    AutoencoderKL(**vae, down_block_types=('DownEncoderBlock2D',) * 4,
                  up_block_types=('UpDecoderBlock2D',) * 4).save_pretrained(base / 'vae')
    save_tiny_clip(base, hidden_size=_UNET_TEST['cross_attention_dim'])
    return base


def test_hub_repo_base(tiny_sd, fake_hub, hub_cache):
    fake_hub.add_folder('someone/my-sd', tiny_sd)
    from_hub, from_folder = build_models('someone/my-sd'), build_models(str(tiny_sd))
    assert from_hub.base_repo == 'someone/my-sd' and from_hub.clean_name is None
    a, b = from_hub.teacher.state_dict(), from_folder.teacher.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['prompt_embeds'], torch.zeros_like(a['prompt_embeds']))  # computed by the text encoder
    with pytest.raises(HubError, match='not found'):
        build_models('someone/missing-sd')


def test_a_base_that_does_not_fit_with_its_student_is_refused_before_reading(tiny_sd, hub_cache, monkeypatch):
    """The memory check before the base UNet is read also counts the student, a copy of the teacher."""
    from diffbackbone import hub

    counted = []
    check = hub.check_fits
    monkeypatch.setattr(hub, 'check_fits', lambda n, what, *a: counted.append((n, what)) or check(n, what, *a))
    models = build_models(str(tiny_sd))
    student = sum(t.numel() * t.element_size() for t in models.student.state_dict().values())
    unet = hub.safetensors_nbytes(tiny_sd / 'unet' / 'diffusion_pytorch_model.safetensors', torch.float32)
    (n, what), = counted
    assert 'the student (a copy of the teacher)' in what and n >= unet + student
    monkeypatch.setattr(hub, 'available_memory', lambda: unet + student - 1)
    monkeypatch.setattr(hub, 'load_safetensors', lambda *a, **k: pytest.fail('weights read'))
    with pytest.raises(HubError, match=r'the student \(a copy of the teacher\) need'):
        build_models(str(tiny_sd))


def test_local_diffusers_folder_with_captions(images, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    base = tiny_sd
    run = dict(RUN, base=str(base), pretrained=True, captions=True, val_images=0, warmup=0)
    trainer = CleanTrainer(TrainConfig(data=str(images), out=str(tmp_path / 'run'), steps=1, **run))
    embeds = trainer.distiller.text_encoder(['a photo of a cat', ''])
    assert embeds.shape == (2, 77, _UNET_TEST['cross_attention_dim']) and not torch.allclose(embeds[0], embeds[1])
    result = trainer.train()
    assert result.output.name == 'clean_unet.safetensors'
    model = load_clean_model(result.output)  # no timm name for a local base: built from the file's metadata
    unet = UNet2DConditionModel.from_pretrained(base / 'unet')
    changed = [k for k, v in unet.state_dict().items() if k in model.unet.state_dict()
               and not torch.equal(v, model.unet.state_dict()[k])]
    assert changed  # trained, starting from the folder's weights
    assert torch.allclose(model.unet.conv_in.weight, unet.conv_in.weight, atol=0.05)  # ... one small step away


def test_torchrun_ddp_two_processes(images, tmp_path):
    """Two CPU processes (gloo): both ranks see the same losses and end with the same weights."""
    script = tmp_path / 'run.py'
    script.write_text(
        'import hashlib, json, sys, torch\n'
        'import torch.distributed as dist\n'
        'torch.set_num_threads(1)\n'
        'from diffbackbone.train import CleanTrainer, TrainConfig\n'
        'trainer = CleanTrainer(TrainConfig(data=sys.argv[1], out=sys.argv[2], steps=2, **json.loads(sys.argv[3])))\n'
        'result = trainer.train()\n'
        'h = hashlib.sha256()\n'
        'for p in trainer.distiller.module.parameters():\n'
        '    h.update(p.detach().numpy().tobytes())\n'
        'with open(f"{sys.argv[2]}/result-rank{dist.get_rank()}.json", "w") as f:\n'
        '    json.dump(dict(losses=result.losses, weights=h.hexdigest()), f)\n')
    run = dict(RUN, batch_size=1, val_images=0)
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
         str(images), str(tmp_path / 'out'), json.dumps(run)],
        check=False, capture_output=True, text=True, timeout=240, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / 'out' / f'result-rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['losses'] == ranks[1]['losses'] and len(ranks[0]['losses']) == 2
    assert ranks[0]['weights'] == ranks[1]['weights']
    assert sorted(p.name for p in (tmp_path / 'out' / 'checkpoints' / 'step-0000002').iterdir()) == [
        'rng-rank0.pt', 'rng-rank1.pt', 'state.pt']
