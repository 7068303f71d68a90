"""Cold start: time and peak memory from `import` to the first feature, ours against the reference loader, each run
in a fresh process, paired (issue #29). Protocol, weights layout and measured numbers: docs/speed.md#cold-start.

    python -m diffbackbone.bench.coldstart cleandift_sd21 --make-weights /tmp/cold [--dtype bfloat16] [--runs 3]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import InputError

__all__ = ['main', 'make_weights']

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_MODELS = ('cleandift_sd21', 'cleandift_sd15', 'sd21', 'sd15', 'test_cleandift', 'test_dift')
# CLIP text encoders of the base repos, by the UNet's cross-attention width (transformers CLIPTextConfig values)
_CLIP = {
    1024: dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act='gelu', projection_dim=512, vocab_size=49408),  # SD2.x: OpenCLIP ViT-H/14
    768: dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act='quick_gelu', projection_dim=768, vocab_size=49408),  # SD1.x: CLIP ViT-L/14
}
_TIMESTEP = 261.0


# ---- random weights in the real repos' layout --------------------------------------------------------------------
def _architecture(model_name: str) -> tuple[dict, dict, bool]:
    """(diffusers UNet config, AutoencoderKL config, clean) of a registered UNet model, built on the meta device."""
    import timm

    from .. import models  # noqa: F401  (registers the models)

    if model_name not in _MODELS:
        raise InputError(f'The cold-start benchmark covers {", ".join(_MODELS)}; got {model_name!r}.')
    with torch.device('meta'):
        model = timm.create_model(model_name)
    enc = model.vae.encoder
    vae = dict(block_out_channels=[b.resnets[0].out_channels for b in enc.down_blocks],
               layers_per_block=len(enc.down_blocks[0].resnets), latent_channels=model.vae.quant_conv.out_channels // 2,
               norm_num_groups=enc.conv_norm_out.num_groups, scaling_factor=model.vae.scaling_factor,
               down_block_types=['DownEncoderBlock2D'] * len(enc.down_blocks),
               up_block_types=['UpDecoderBlock2D'] * len(enc.down_blocks), sample_size=768)
    return {k: v for k, v in model.unet.config.items() if not k.startswith('_')}, vae, model.clean


def _random(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict of `module` (built on the meta device): N(0, 0.02), scales of norms 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.ndim == 1 and k.endswith('weight'):
            out[k] = torch.ones(v.shape, dtype=dtype)
        else:
            out[k] = torch.empty(v.shape, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(dtype)
    return out


def _write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer in the base repos' files (vocab.json, merges.txt; a small vocabulary: the empty prompt needs
    only the special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in 'abcdefghijklmnopqrstuvwxyz':
        vocab[ch], vocab[f'{ch}</w>'] = len(vocab), len(vocab) + 1
    special = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>',
               'unk_token': '<|endoftext|>'}
    (folder / 'vocab.json').write_text(json.dumps(vocab))
    (folder / 'merges.txt').write_text('#version: 0.2\n')
    (folder / 'special_tokens_map.json').write_text(json.dumps(special))
    (folder / 'tokenizer_config.json').write_text(json.dumps(
        {**special, 'model_max_length': 77, 'do_lower_case': True, 'tokenizer_class': 'CLIPTokenizer'}))


_STRIDE = 64  # the SD 1.x / 2.x models' input stride: the VAE's 8 times the UNet's three downsamplings
_MARK = '.diffbackbone-coldstart'  # written first in a folder of benchmark weights: its files are ours to rewrite


def _weights_folder(folder: str | Path) -> Path:
    """The `--make-weights` folder, made and marked as ours: a new or empty folder, or one this benchmark made (a run
    killed while writing is written again); a folder holding anything else is refused, never written into."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise InputError(f'{folder} is not a folder. Give a new or empty folder for the benchmark\'s weights.')
    ours = (folder / _MARK).is_file() or any(folder.glob('.complete-*'))  # (earlier versions wrote no mark)
    if folder.is_dir() and any(folder.iterdir()) and not ours:
        raise InputError(f'{folder} holds files the benchmark did not write, which it never overwrites. Give a new or '
                         'empty folder for the benchmark\'s weights.')
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _MARK).touch()
    except OSError as e:
        raise InputError(f'cannot write to {folder} ({e.strerror or e}). Give a folder you can write to.') from None
    return folder


def make_weights(model_name: str, folder: str | Path) -> dict:
    """Write random weights of `model_name` in the real repos' layout under `folder` (once) and return where they
    are: {'base': base repo folder, 'unet_file': the checkpoint our model loads, 'timestep_source', 'clean'}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..hub import save_safetensors, write_text_atomic  # atomic: a killed run leaves no half file

    folder = _weights_folder(folder)
    base, clean_dir = folder / 'base', folder / 'cleandift'
    unet_cfg, vae_cfg, clean = _architecture(model_name)
    spec = dict(base=str(base), clean=clean, timestep_source=f'{clean_dir}:{model_name}_full.safetensors' if clean
                else None, unet_file=str(clean_dir / f'{model_name}_unet.safetensors') if clean
                else str(base / 'unet' / 'diffusion_pytorch_model.safetensors'))
    done = folder / f'.complete-{model_name}'
    if done.is_file():
        return spec
    print(f'writing random {model_name} weights to {folder} (once) ...', file=sys.stderr, flush=True)
    with torch.device('meta'):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        dim = unet_cfg['cross_attention_dim']
        clip = CLIPTextConfig(**_CLIP.get(dim, dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                                                    num_attention_heads=2, projection_dim=dim, vocab_size=1000)),
                              max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        text = CLIPTextModel(clip)
    unet.save_config(base / 'unet')
    if clean:
        clean_dir.mkdir(parents=True, exist_ok=True)
        unet_file = clean_dir / f'{model_name}_unet.safetensors'
        save_safetensors(_random(unet, torch.float16, 0), unet_file)  # float16, as CleanDIFT's
        save_safetensors({'timestep': torch.tensor(_TIMESTEP)}, clean_dir / f'{model_name}_full.safetensors')
    else:
        save_safetensors(_random(unet, torch.float32, 0), base / 'unet' / 'diffusion_pytorch_model.safetensors')
    vae.save_config(base / 'vae')
    save_safetensors(_random(vae, torch.float32, 1), base / 'vae' / 'diffusion_pytorch_model.safetensors')
    clip.architectures = ['CLIPTextModel']
    clip.save_pretrained(base / 'text_encoder')
    save_safetensors(_random(text, torch.float32, 2), base / 'text_encoder' / 'model.safetensors',
                     metadata={'format': 'pt'})
    _write_tokenizer(base / 'tokenizer')
    (base / 'model_index.json').write_text(json.dumps({'_class_name': 'StableDiffusionPipeline'}))
    write_text_atomic(done, json.dumps(spec))
    return spec


def _hub_spec(model_name: str) -> dict:
    """The files of the model's own Hub repos (from the Hub cache when HF_HUB_OFFLINE is set)."""
    import timm

    from .. import hub, models  # noqa: F401

    _, _, clean = _architecture(model_name)
    with torch.device('meta'):
        model = timm.create_model(model_name)
    cfg = model.pretrained_cfg
    unet_file = hub.download(cfg['hf_hub_id'], cfg['hf_hub_filename'], what=f'weights of {model_name}')
    return dict(base=model.base_repo, clean=clean, timestep_source=None, unet_file=str(unet_file), hub=True)


# ---- one run (in a fresh process) ---------------------------------------------------------------------------------

_PHASES = ('imports', 'load', 'feature')


def _run(kind: str, args: argparse.Namespace, spec: dict) -> tuple[float, int, dict[str, float], int]:
    """(wall seconds, peak RSS bytes, seconds per phase, RSS bytes once imported) of one run of `kind` in a fresh
    process."""
    cmd = [sys.executable, str(Path(__file__).with_name('coldstart_child.py')), kind, json.dumps(spec), args.dtype,
           str(args.size), str(_TIMESTEP), args.model, *args.taps]
    env = {**os.environ, 'HF_HUB_DISABLE_PROGRESS_BARS': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get('PYTHONPATH')]))}
    start, t0 = time.perf_counter(), time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        why = f'killed by signal {-out.returncode} (SIGKILL: out of memory?)' if out.returncode < 0 \
            else f'exit status {out.returncode}'
        raise RuntimeError(f'the {kind} run failed ({why}):\n{out.stderr[-3000:]}')
    report = json.loads(out.stdout.strip().splitlines()[-1])
    marks = [t0, *(report[p] for p in _PHASES)]
    return wall, report['peak_rss'], {p: b - a for p, a, b in zip(_PHASES, marks, marks[1:])}, report['rss_imports']


def _weights_bytes(model_name: str, dtype: torch.dtype) -> int:
    """Bytes of the UNet and VAE encoder our model holds, in `dtype` (SDXL's VAE would stay float32)."""
    import timm

    from .. import models  # noqa: F401

    with torch.device('meta'):
        model = timm.create_model(model_name, dtype=dtype)
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k.startswith(('unet.', 'vae.')))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog='python -m diffbackbone.bench.coldstart', description=__doc__.split('\n')[0])
    p.add_argument('model', choices=tuple(_MODELS), metavar='MODEL', help=f'one of {", ".join(_MODELS)}')
    p.add_argument('--make-weights', metavar='DIR', help='write (once) and use random full-size weights in DIR')
    p.add_argument('--dtype', choices=tuple(_DTYPES), default='float32')
    p.add_argument('--runs', type=int, default=3, help='timed runs of each loader')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs of each loader first')
    p.add_argument('--size', type=int, default=256, help='image side in pixels')
    p.add_argument('--taps', nargs='+', default=['us6'], help='our out_indices')
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error('--runs must be at least 1')
    if args.warmup < 0:
        p.error('--warmup must be 0 or more')
    if args.size < _STRIDE or args.size % _STRIDE:
        p.error(f'--size must be a multiple of {_STRIDE} px (the VAE and the UNet\'s deepest level), got {args.size}')
    if args.make_weights:
        try:
            _weights_folder(args.make_weights)
        except (InputError, OSError) as e:
            p.error(f'--make-weights: {e}')
    spec = make_weights(args.model, args.make_weights) if args.make_weights else _hub_spec(args.model)
    for _ in range(args.warmup):  # page cache, our prompt-embedding cache
        for kind in ('ours', 'reference'):
            _run(kind, args, spec)
    results: dict[str, list[tuple[float, int, dict[str, float], int]]] = {'ours': [], 'reference': []}
    for i in range(args.runs):  # paired, alternating which goes first
        for kind in (('ours', 'reference') if i % 2 == 0 else ('reference', 'ours')):
            results[kind].append(_run(kind, args, spec))
    wall = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    rss = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    above = {k: statistics.median(r[1] - r[3] for r in v) for k, v in results.items()}  # what loading adds
    phase = {k: {p: statistics.median(r[2][p] for r in v) for p in _PHASES} for k, v in results.items()}
    first = {k: statistics.median(sum(r[2].values()) for r in v) for k, v in results.items()}  # start to feature
    after = {k: statistics.median(r[2]['load'] + r[2]['feature'] for r in v) for k, v in results.items()}
    weights = _weights_bytes(args.model, _DTYPES[args.dtype])
    threads = torch.get_num_threads()
    print(f'cold start of {args.model}: {args.dtype}, {args.size} px, batch 1, CPU ({threads} threads), '
          f'{args.runs} runs each in fresh processes, paired, after {args.warmup} warm-up run(s) each')
    print(f'weights: UNet + VAE encoder {weights / 1e9:.2f} GB in {args.dtype} '
          f'({"random, in " + str(Path(spec["base"]).parent) if args.make_weights else "from the Hub cache"})')
    print(f'{"":22}{"to first feature":>18}{"process (+ exit)":>18}{"peak RSS":>12}')
    for kind in ('ours', 'reference'):
        print(f'{kind:22}{first[kind]:>16.2f} s{wall[kind]:>16.2f} s{rss[kind] / 1e9:>9.2f} GB')
    print(f'{"ours / reference":22}{first["ours"] / first["reference"]:>18.2f}{wall["ours"] / wall["reference"]:>18.2f}'
          f'{rss["ours"] / rss["reference"]:>12.2f}')
    print(f'{"peak RSS / weights":22}{"ours " + format(rss["ours"] / weights, ".2f"):>24}'
          f'{"reference " + format(rss["reference"] / weights, ".2f"):>22}')
    print(f'{"above the imports / weights":28}{"ours " + format(above["ours"] / weights, ".2f"):>18}'
          f'{"reference " + format(above["reference"] / weights, ".2f"):>22}   (peak RSS minus the RSS once imported: '
          f'ours {above["ours"] / 1e9:.2f} GB, reference {above["reference"] / 1e9:.2f} GB)')
    print('median seconds per phase: start + imports, load (build + weights), first feature')
    for kind in ('ours', 'reference'):
        print(f'{kind:22}' + ''.join(f'{p} {phase[kind][p]:.2f}  ' for p in _PHASES))
    load = {k: phase[k]['load'] for k in phase}
    print(f'{"ours / reference":22}load {load["ours"] / load["reference"]:.2f}  '
          f'load + first feature {after["ours"] / after["reference"]:.2f}')


if __name__ == '__main__':
    main()
