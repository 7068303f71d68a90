"""`diffbackbone export`: a fine-tuned model (clean-train run or weights file) as a self-contained timm Hub repo.

The folder has timm's Hub layout, so after `import diffbackbone` anyone loads it by name:

    timm.create_model("hf-hub:org/name", pretrained=True, features_only=True)

* `model.safetensors`: everything the model needs (UNet, VAE encoder, prompt embedding, learned timestep), so
  loading it downloads nothing from the base repo and runs no text encoder;
* `config.json`: written by timm's own `save_config_for_hf` (architecture, `model_args` such as the timestep and
  prompt, `pretrained_cfg` with input size and mean/std);
* `README.md`: a model card with the taps table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError, safe_open

from ..cli_args import json_object, model_name
from ..data.outputs import check_folder
from ..errors import DiffbackboneError
from ..hub import _write_reason, save_safetensors, umask
from ..models._builder import PROMPT_KEY

__all__ = ['ExportError', 'export_model', 'find_weights', 'add_parser', 'run']

_RUN_OUTPUT_HINT = 'a clean-train run folder (with its output .safetensors) or a .safetensors weights file'


class ExportError(DiffbackboneError, ValueError):
    """The source cannot be exported; the message says what to do."""


def find_weights(source: str | Path) -> Path:
    """The weights file of `source`: the file itself, or the output `.safetensors` at the top of a clean-train run."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob('*.safetensors'))
        if len(files) == 1:
            return files[0]
        if not files:
            raise ExportError(f'{path} holds no .safetensors file at its top level: give {_RUN_OUTPUT_HINT} '
                              '(a run writes its output there when it finishes).')
        raise ExportError(f'{path} holds several .safetensors files ({", ".join(f.name for f in files)}): give the '
                          'file to export.')
    raise ExportError(f'{path} does not exist: give {_RUN_OUTPUT_HINT}.')


def _architecture(weights: Path, model: Optional[str]) -> str:
    """`model`, or the architecture recorded in the file's metadata (clean-train outputs record it)."""
    try:
        with safe_open(weights, 'pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ExportError(f'{weights} is not a readable safetensors file ({e}). Give {_RUN_OUTPUT_HINT}.') from e
    recorded = meta.get('diffbackbone.model') or None
    if model and recorded and model != recorded:
        raise ExportError(f'{weights} was trained as {recorded!r} but --model {model!r} was given; drop --model or '
                          'give the matching name.')
    name = model or recorded
    if not name:
        raise ExportError(f'{weights} does not say which architecture it is: give --model (e.g. cleandift_sd21, '
                          'cleandift_sd15, sd21; `diffbackbone taps MODEL` lists a model).')
    return name


def _model_card(model, name: str, repo_id: Optional[str]) -> str:
    taps = '\n'.join(f'| {i} | `{t.name}` | {t.num_chs} | {t.reduction} |' for i, t in enumerate(model.taps))
    load = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME'
    license_ = model.pretrained_cfg.get('license') or 'other'
    return f"""---
library_name: timm
license: {license_}
tags:
- image-feature-extraction
- diffbackbone
- timm
---
# {repo_id or name}

Diffusion backbone exported with [diffbackbone](https://pypi.org/project/diffbackbone/) from architecture `{name}`.
The weights hold everything the model needs (UNet, VAE encoder, prompt embedding{', learned timestep' if model.clean
else ''}), so loading downloads nothing else.{f'''
LoRA fused into the UNet weights: `{model.lora_identity}` (scale {model.lora_scale}).'''
if getattr(model, 'lora_identity', None) else ''}

```python
import timm, diffbackbone
model = timm.create_model("{load}", pretrained=True, features_only=True)  # the stride 8/16/32/64 pyramid
```

Inputs: RGB normalised with mean = std = 0.5 ([-1, 1]), any size of at least 64 px per side.

## Taps (`feature_info`, fine to coarse; select with `out_indices`)

| index | name | channels | stride |
|---|---|---|---|
{taps}
"""


def export_model(source: str | Path, out: str | Path, model: Optional[str] = None, push: Optional[str] = None,
                 overwrite: bool = False, model_kwargs: Optional[dict] = None) -> Path:
    """Write `source` (run folder or weights file) as a timm Hub folder at `out`; with `push`, upload it too.

    Returns the folder. The folder is assembled beside `out` and moved into place when complete.
    """
    import timm

    from .. import models  # noqa: F401  (registers the architectures)

    weights = find_weights(source)
    name = _architecture(weights, model)
    if name not in timm.list_models():
        raise ExportError(f'Unknown architecture {name!r}: give --model with one of the diffbackbone models.')
    # the source (run folder or file) is an input: never written to, never inside a replaced folder
    out = check_folder(out, 'export', [Path(source).expanduser(), weights], overwrite)
    net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                            **(model_kwargs or {}))
    args = dict(model_kwargs or {})
    if getattr(net, 'lora_identity', None):  # fused into the saved weights: never applied again when they load
        for key in ('lora', 'lora_scale'):
            args.pop(key, None)
            getattr(net, '_model_args', {}).pop(key, None)
    if net.clean:
        args['timestep'] = float(net.timestep.detach().float())
    if getattr(net, 'prompt', None):
        args['prompt'] = net.prompt
    state = {k: v for k, v in net.state_dict().items() if not k.startswith('head.') or net.num_classes}

    from timm.models._hub import save_config_for_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        try:
            save_safetensors(state, work / 'model.safetensors', metadata={
                'format': 'pt', 'diffbackbone.model': name, PROMPT_KEY: getattr(net, 'prompt', None) or ''})
            save_config_for_hf(net, str(work / 'config.json'), model_args=args)
            if getattr(net, 'lora_identity', None):  # which LoRA the weights hold (timm ignores keys it does not know)
                config = json.loads((work / 'config.json').read_text())
                config['fused_lora'] = dict(identity=net.lora_identity, scale=net.lora_scale)
                (work / 'config.json').write_text(json.dumps(config, indent=4) + '\n')
            (work / 'README.md').write_text(_model_card(net, name, push))
        except OSError as e:
            raise ExportError(f'Could not write the export {out}: {_write_reason(e.__cause__ or e)}. Nothing was '
                              'written (no partial folder is left); free some space or choose another --out.') from e
        work.chmod(0o777 & ~umask())
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if push:
        push_folder(out, push)
    return out


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload an exported folder to the Hub repo `repo_id` (created if needed), with huggingface_hub."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    from ..hub import HubError, hub_errors

    try:
        with hub_errors(f'the upload to {repo_id!r}', ' Log in first (`hf auth login` or HF_TOKEN) with write access.',
                        repo=repo_id):
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message='Add diffbackbone model')
    except HubError as e:
        network = e.__cause__
        while network is not None and not isinstance(network, (OfflineModeIsEnabled, httpx2.TransportError)):
            network = network.__cause__ or network.__context__
        if network is None:
            raise
        # an upload, not a download: no word of caches or base_repo=
        cause = ('HF_HUB_OFFLINE is set' if constants.is_offline_mode()
                 else f'the Hub ({constants.ENDPOINT}) could not be reached ({type(network).__name__}: {network})')
        raise ExportError(f'Could not push to {repo_id!r}: {cause}. The export is written at {folder}; push it when '
                          f'online with `hf upload {repo_id} {folder}` (or run export again with --push).') from e


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `export` to `diffbackbone`'s subcommands."""
    p = subparsers.add_parser('export', help='write a fine-tuned model as a timm Hub repo (config.json, '
                                              'model.safetensors)',
                              description='Export a clean-train run or weights file in timm\'s Hub layout; afterwards '
                                          'timm.create_model("hf-hub:ORG/NAME", pretrained=True) loads it by name.')
    p.add_argument('source', help='clean-train run folder (its output .safetensors) or a .safetensors weights file')
    p.add_argument('--out', required=True, help='folder to write (must be new or empty, unless --overwrite)')
    p.add_argument('--model', type=model_name,
                   help='architecture, when the file does not record it (e.g. cleandift_sd21)')
    p.add_argument('--push', metavar='ORG/NAME', help='also upload the folder to this Hub repo (created if needed)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out folder')
    p.add_argument('--model-kwargs', type=json_object,
                   help='JSON dict of extra model arguments, e.g. \'{"timestep": 100}\'')
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone export`."""
    out = export_model(args.source, args.out, model=args.model, push=args.push, overwrite=args.overwrite,
                       model_kwargs=args.model_kwargs)
    print(f'wrote {out} (model.safetensors, config.json, README.md)')
    if args.push:
        print(f'pushed to {args.push}: timm.create_model("hf-hub:{args.push}", pretrained=True) loads it')
    return 0
