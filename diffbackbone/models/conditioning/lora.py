"""LoRA weights fused into a UNet backbone (`lora=`, `lora_scale=`), loaded by diffusers' own LoRA loaders (peft).

Meng et al. load a LoRA into their pipeline with `pipe.load_lora_weights(repo, weight_name=file)` (their
`offline_lora` option). Here the same diffusers code reads the file (diffusers' and kohya's key layouts), injects the
peft LoRA layers into the UNet, fuses them into the base weights at `lora_scale` (`fuse_lora`) and removes the layers
(`unload_lora`): the forward costs nothing extra and the fused weights are what the state dict holds.

Only the UNet is changed. A LoRA that also trains the text encoder(s) is refused: the prompt embeddings are computed
from the base repo's text encoders and cached. The LoRA's identity (`org/name@commit:file`, or the SHA-256 of a local
file) is kept as the model's `lora_identity` and recorded with the features it makes (feature store settings).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ...errors import DiffbackboneError

__all__ = ['LORA_FILE', 'LoraError', 'resolve_lora', 'fuse_lora', 'lora_spec']

LORA_FILE = 'pytorch_lora_weights.safetensors'  # the file diffusers' training scripts write and its loaders look for


class LoraError(DiffbackboneError, ValueError):
    """A LoRA cannot be used with this model; the message says why and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def resolve_lora(spec: str) -> tuple[Path, str]:
    """The local file of a LoRA and its identity.

    `spec`: a `.safetensors` file, or a Hub repo `org/name[@revision][:file.safetensors]` (default file
    `pytorch_lora_weights.safetensors`), or a local diffusers folder holding that file.
    """
    from ... import hub

    path = Path(spec).expanduser()
    if spec.endswith('.safetensors') and (path.is_file() or path.is_absolute() or spec.startswith('.')):
        if not path.is_file():
            raise LoraError(f'LoRA file {path} does not exist. Give a .safetensors LoRA file or a Hub repo '
                            "'org/name[:file.safetensors]'.")
        return path, f'sha256:{_sha256(path)}'
    repo, _, filename = spec.partition(':')
    filename = filename or LORA_FILE
    local = hub._local_dir(repo)
    path = hub.download(repo, filename, what=f'LoRA {spec!r}')
    if local is not None:
        return path, f'sha256:{_sha256(path)}'
    repo_id, _ = hub.split_repo(repo)
    commit = path.parent.name if path.parent.parent.name == 'snapshots' else None
    return path, f'{repo_id}@{commit}:{filename}' if commit else f'sha256:{_sha256(path)}'


def fuse_lora(unet: nn.Module, spec: str, scale: float = 1.0, sdxl: bool = False) -> str:
    """Load the LoRA `spec` into the diffusers `unet` with diffusers' loaders, fuse it at `scale`, drop the LoRA
    layers; return the LoRA's identity. One clear `LoraError` if it does not fit the UNet."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import USE_PEFT_BACKEND
    from diffusers.utils import logging as dlogging

    if not USE_PEFT_BACKEND:
        raise LoraError('LoRA needs the peft package (pip install "peft>=0.17"), which diffusers uses to load LoRAs.')
    path, identity = resolve_lora(spec)
    loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    try:
        state_dict, alphas, metadata = loader.lora_state_dict(str(path.parent), weight_name=path.name,
                                                              local_files_only=True, return_lora_metadata=True)
    except Exception as e:  # diffusers raises a mix of types for unreadable files
        from ...hub import broken_safetensors

        raise LoraError(broken_safetensors(path, f'the LoRA {spec!r}', e)
                        or f'Could not read the LoRA {spec!r} ({path}): {e}') from e
    if not state_dict or not all('lora' in k for k in state_dict):
        raise LoraError(f'{spec!r} is not a LoRA file (its tensor names hold no "lora"). Give a diffusers or kohya '
                        'LoRA .safetensors.')
    text = sorted(k for k in state_dict if k.startswith(('text_encoder', 'lora_te')))
    if text:
        raise LoraError(f'The LoRA {spec!r} also changes the text encoder ({len(text)} tensors, e.g. {text[0]}); only '
                        'UNet LoRAs are supported (prompt embeddings come from the base text encoders, cached).')
    expected = {k.split('.lora')[0] for k in state_dict if '.lora' in k}
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its warning lists every unmatched key; the check below says it in one line
    try:
        loader.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, adapter_name='diffbackbone',
                                   metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as e:
        _unload(unet)
        raise LoraError(f'The LoRA {spec!r} does not fit this UNet ({" ".join(str(e).split())[:300]}). Is it for '
                        'another architecture (SD1.5 / SD2.1 / SDXL)? Give a LoRA trained on this model.') from e
    finally:
        dlogging.set_verbosity(verbosity)
    injected = sum(1 for m in unet.modules() if hasattr(m, 'lora_A') and 'diffbackbone' in getattr(m, 'lora_A', {}))
    if injected == 0 or injected < len(expected):
        _unload(unet)
        raise LoraError(f'The LoRA {spec!r} names {len(expected)} layers but only {injected} exist in this UNet: it is '
                        'for another architecture (SD1.5 / SD2.1 / SDXL). Give a LoRA trained on this model.')
    with torch.no_grad():
        unet.fuse_lora(lora_scale=float(scale), adapter_names=['diffbackbone'])
    _unload(unet)
    return identity


def _unload(unet: nn.Module) -> None:
    """Remove the peft LoRA layers (after fusing, the base weights keep the LoRA)."""
    if getattr(unet, '_hf_peft_config_loaded', False):
        unet.unload_lora()


def lora_spec(lora: Optional[str], lora_scale: float) -> tuple[Optional[str], float]:
    """Checked `lora` / `lora_scale` model arguments."""
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise LoraError(f"lora must be a Hub repo 'org/name[:file.safetensors]' or a .safetensors file, got {lora!r}.")
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale) \
            or abs(lora_scale) > 100:
        raise LoraError(f'lora_scale must be a number (finite, in [-100, 100]), got {lora_scale!r}.')
    return lora, float(lora_scale)
