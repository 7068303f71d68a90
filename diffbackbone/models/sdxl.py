"""SDXL's text conditioning for image features: the empty prompt through both text encoders, computed once and cached.

As diffusers' StableDiffusionXLPipeline.encode_prompt does for the prompt "": the penultimate hidden state of CLIP
ViT-L (`text_encoder`, 768) concatenated with the penultimate hidden state of OpenCLIP ViT-bigG (`text_encoder_2`,
1280) gives the (1, 77, 2048) context; the pooled embedding is `text_encoder_2`'s projected `text_embeds` (1, 1280).
The result is cached like `hub.empty_prompt_embeds` (per repo commit, or per local folder contents), so the 1.4 GB of
text encoders are loaded once, ever.
"""
from __future__ import annotations

import contextlib
import gc

import torch

from .. import hub

__all__ = ['empty_prompt_embeds_sdxl']

_SUBFOLDERS = ('tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2')


def _encode(source: str, revision: str | None, what: str) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    hidden, pooled = [], None
    for tok_dir, enc_dir, cls in (('tokenizer', 'text_encoder', CLIPTextModel),
                                  ('tokenizer_2', 'text_encoder_2', CLIPTextModelWithProjection)):
        with hub.hub_errors(what, repo=source, revision=revision):
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=tok_dir, revision=revision)
            encoder = cls.from_pretrained(source, subfolder=enc_dir, revision=revision, dtype=torch.float32).eval()
        ids = tokenizer('', padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors='pt').input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float())
        if cls is CLIPTextModelWithProjection:
            pooled = out.text_embeds.float()
        del encoder, out
        gc.collect()
    return {'prompt_embeds': torch.cat(hidden, dim=-1), 'pooled_prompt_embeds': pooled}


def empty_prompt_embeds_sdxl(base_repo: str) -> dict[str, torch.Tensor]:
    """`prompt_embeds` (1, 77, D1 + D2) and `pooled_prompt_embeds` (1, P) of "" for an SDXL repo in diffusers layout.

    `base_repo` is `'org/name[@revision]'` or a local folder with tokenizer/, text_encoder/, tokenizer_2/ and
    text_encoder_2/. Cached under `hub.cache_dir()/prompt_embeds/`, also usable offline.
    """
    what = f'the SDXL empty-prompt text embeddings of {base_repo!r}'
    folder = hub._local_dir(base_repo)
    if folder is not None:
        for sub in _SUBFOLDERS:
            if not (folder / sub).is_dir():
                raise hub.HubError(f'Could not get {what}: {folder / sub} does not exist (SDXL diffusers layout '
                                   f'expected: {", ".join(_SUBFOLDERS)}).')
        key = hub._fingerprint(*(folder / sub for sub in _SUBFOLDERS))
        path = hub.cache_dir() / 'prompt_embeds' / 'local' / f'{key}-sdxl.safetensors'
        if path.is_file():
            with contextlib.suppress(hub.HubError):
                return hub.load_safetensors(path, what=what)
        tensors = _encode(str(folder), None, what)
        hub.save_safetensors(tensors, path)
        return tensors
    repo_id, revision = hub.split_repo(base_repo)
    return hub._cached_per_commit('prompt_embeds', repo_id, revision, 'text_encoder_2/config.json',
                                  'empty_prompt_sdxl', what, lambda commit, meta: _encode(repo_id, commit, what))
