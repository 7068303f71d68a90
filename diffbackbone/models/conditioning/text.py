"""Prompt text embeddings of Stable Diffusion base repos, computed once and cached on disk (used by the models while
loading weights, and by `diffbackbone.prompts`).

Embeddings are computed as diffusers' pipelines do (`StableDiffusionPipeline.encode_prompt`: the CLIP text encoder's
last hidden state; SDXL: `load_text_encoders` below) in float32 and stored under
`hub.cache_dir()/prompt_embeds/<repo>/<commit>/<name>.safetensors` (local base folders: keyed by a fingerprint of
their text-encoder files and the prompt), so a text encoder is loaded once per prompt, ever, and never at feature time.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ... import hub

__all__ = ['encode_cached', 'encoder_files', 'uncached_encoder_files', 'uncached_prompt_files', 'encode_t5_prompt', 'encode_flux_prompt', 'encode_sd3_prompt', 'encode_hunyuan_prompt',
           'pixart_caption', 'truncation_note', 'warn_truncated', 'PromptTruncatedWarning']

_SD_SUBFOLDERS = ('tokenizer', 'text_encoder')
_SDXL_SUBFOLDERS = ('tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2')


# ---- encoding (SD 1.x / 2.x: one CLIP text encoder) -----------------------------------------------------------------
def _load_clip(source: str, revision: Optional[str], what: str) -> list[tuple[Any, nn.Module]]:
    from transformers import CLIPTextModel, CLIPTokenizer

    with hub.hub_errors(what, repo=source, revision=revision):
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder='tokenizer', revision=revision)
        encoder = CLIPTextModel.from_pretrained(source, subfolder='text_encoder', revision=revision,
                                                dtype=torch.float32)
    return [(tokenizer, encoder.eval())]


def _encode_clip(encoders: list[tuple[Any, nn.Module]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """As diffusers' StableDiffusionPipeline.encode_prompt: padded to 77 tokens, last hidden state, float32."""
    tokenizer, encoder = encoders[0]
    inputs = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors='pt')
    mask = inputs.attention_mask if getattr(encoder.config, 'use_attention_mask', False) else None
    with torch.no_grad():
        out = {'prompt_embeds': encoder(inputs.input_ids, attention_mask=mask)[0].float()}
    return {**out, **truncation_note(prompts, [(tokenizer, tokenizer.model_max_length, 'the CLIP text encoder')])}


# ---- prompts longer than a text encoder's window ---------------------------------------------------------------------
class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than a text encoder's window and was cut, as diffusers' pipelines cut it."""


_TRUNCATION = 'truncation'  # a uint8 tensor (JSON text) kept with cached embeddings, so a cache hit warns as well


def truncation_note(prompts: Sequence[str], windows: Sequence[tuple[Any, int, str]]) -> dict[str, torch.Tensor]:
    """{'truncation': JSON bytes} naming what each (tokenizer, window, encoder name) keeps of a single prompt that is
    longer than the window, or {} when it fits (the pipelines cut such prompts silently)."""
    if len(prompts) != 1:
        return {}
    notes = []
    for tokenizer, window, name in windows:
        n = len(tokenizer(prompts[0], truncation=False, verbose=False).input_ids)
        if n > window:
            kept = tokenizer.decode(tokenizer(prompts[0], truncation=True, max_length=window).input_ids,
                                    skip_special_tokens=True)
            notes.append(dict(encoder=name, window=window, tokens=n, kept=kept))
    if not notes:
        return {}
    return {_TRUNCATION: torch.frombuffer(bytearray(json.dumps(notes).encode()), dtype=torch.uint8).clone()}


def warn_truncated(prompt: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` without the truncation note; warns (`UserWarning`) once per text encoder that cut `prompt`."""
    if _TRUNCATION not in tensors:
        return tensors
    tensors = dict(tensors)
    for n in json.loads(bytes(tensors.pop(_TRUNCATION).tolist()).decode()):
        warnings.warn(f'The prompt {prompt[:40] + "..." if len(prompt) > 40 else prompt!r} has {n["tokens"]} '
                      f'tokens, more than the {n["window"]}-token window of {n["encoder"]}: only {n["kept"]!r} is '
                      'used. Shorten the prompt to keep all of it.', PromptTruncatedWarning, stacklevel=3)
    return tensors


def _joined_notes(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One truncation note holding the notes of several encoders' outputs (each a dict from `truncation_note`)."""
    notes = [n for d in parts if _TRUNCATION in d for n in json.loads(bytes(d[_TRUNCATION].tolist()))]
    if not notes:
        return {}
    return {_TRUNCATION: torch.frombuffer(bytearray(json.dumps(notes).encode()), dtype=torch.uint8).clone()}


class _TextEncoders:
    """The base repo's tokenizer(s) and text encoder(s), loaded on the first cache miss and released by `close`."""

    def __init__(self, sdxl: bool):
        self.sdxl = sdxl
        self.loaded = None

    def __call__(self, source: str, revision: Optional[str], prompts: Sequence[str], what: str) -> dict:
        if self.loaded is None:
            load = load_text_encoders if self.sdxl else _load_clip
            self.loaded = load(source, revision, what)
        if not self.sdxl:
            return _encode_clip(self.loaded, prompts)
        windows = [(tok, tok.model_max_length, f'the SDXL text encoder {i + 1}') for i, (tok, _) in enumerate(self.loaded)]
        return {**_encode_sdxl(self.loaded, prompts), **truncation_note(prompts, windows)}

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded = None
            gc.collect()  # the SD2.1 text encoder is 1.4 GB: give it back now


# ---- cache ----------------------------------------------------------------------------------------------------------
def _fingerprint(*folders: Path) -> str:
    """Key of local folders' contents: paths, sizes and modification times."""
    h = hashlib.sha256()
    for folder in folders:
        h.update(str(folder.resolve()).encode())
        for f in sorted(p for p in folder.rglob('*') if p.is_file()):
            st = f.stat()
            h.update(f'{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:32]


def _prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:32]


def _what(source: str, prompt: str, sdxl: bool) -> str:
    kind = 'SDXL ' if sdxl else ''
    if prompt == '':
        return f'the {kind}empty-prompt text embedding{"s" if sdxl else ""} of {source!r}'
    return f'the {kind}text embedding of the prompt {prompt!r} from {source!r}'


def _local_entry(folder: Path, prompt: str, sdxl: bool) -> Path:
    """Cache path of `prompt`'s embedding from a local base folder (keyed by its text-encoder files)."""
    key = _fingerprint(*(folder / sub for sub in (_SDXL_SUBFOLDERS if sdxl else _SD_SUBFOLDERS)))
    suffix = ('' if prompt == '' else f'-{_prompt_key(prompt)}') + ('-sdxl' if sdxl else '')
    return hub.cache_dir() / 'prompt_embeds' / 'local' / f'{key}{suffix}.safetensors'


def _entry_name(prompt: str, sdxl: bool) -> str:
    """Cache name of `prompt`'s embedding from a Hub base repo."""
    return ('empty_prompt' if prompt == '' else f'prompt_{_prompt_key(prompt)}') + ('_sdxl' if sdxl else '')


def encoder_files(source: str, subfolders: Sequence[str]) -> list[Path]:
    """The weight files of the text encoders in `subfolders` of `source` (a single `model.safetensors`, or the shards
    its index names), fetched but not read; a subfolder with neither is left out (loading it says why)."""
    files: list[Path] = []
    for sub in subfolders:
        what = f'the text encoder {sub}/ of {source!r}'
        try:
            files.append(hub.download(source, f'{sub}/model.safetensors', what=what))
        except hub.HubError:
            with contextlib.suppress(hub.HubError):
                files += list(hub.sharded_safetensors_files(source, f'{sub}/model.safetensors.index.json',
                                                            what=what).values())
    return files


def uncached_encoder_files(source: str, prompt: str, sdxl: bool) -> list[Path]:
    """The text-encoder weight files `encode_cached(source, [prompt], sdxl)` would read: none when the embedding is
    cached (as far as the cache alone tells: `hub.cached_entry`)."""
    folder = hub._local_dir(source)
    cached = _local_entry(folder, prompt, sdxl).is_file() if folder is not None else \
        hub.cached_entry('prompt_embeds', source, _entry_name(prompt, sdxl))
    subs = ('text_encoder', 'text_encoder_2') if sdxl else ('text_encoder',)
    return [] if cached else encoder_files(source, subs)


def encode_cached(source: str, prompts: Sequence[str], sdxl: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{prompt: tensors} for distinct `prompts`, each read from the cache or encoded once and cached."""
    encoders = _TextEncoders(sdxl)
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        folder = hub._local_dir(source)
        if folder is not None:
            subs = _SDXL_SUBFOLDERS if sdxl else _SD_SUBFOLDERS
            for sub in subs:
                if not (folder / sub).is_dir():
                    raise hub.HubError(
                        f'Could not get {_what(source, prompts[0], sdxl)}: {folder / sub} does not exist '
                        f'({"SDXL " if sdxl else ""}diffusers layout expected: {", ".join(subs)}).')
            for prompt in prompts:
                what = _what(source, prompt, sdxl)
                path = _local_entry(folder, prompt, sdxl)
                if path.is_file():
                    with contextlib.suppress(hub.HubError):
                        out[prompt] = warn_truncated(prompt, hub.load_safetensors(path, what=what))
                        continue
                tensors = encoders(str(folder), None, [prompt], what)
                hub.save_safetensors(tensors, path)
                out[prompt] = warn_truncated(prompt, tensors)
            return out
        repo_id, revision = hub.split_repo(source)
        probe = 'text_encoder_2/config.json' if sdxl else 'text_encoder/config.json'
        for prompt in prompts:
            what = _what(source, prompt, sdxl)
            name = _entry_name(prompt, sdxl)
            compute: Callable = lambda commit, meta, p=prompt, w=what: encoders(repo_id, commit, [p], w)  # noqa: E731
            out[prompt] = warn_truncated(
                prompt, hub._cached_per_commit('prompt_embeds', repo_id, revision, probe, name, what, compute))
        return out
    finally:
        encoders.close()


# ---- T5 (PixArt) and CLIP pooled + T5 (FLUX) ------------------------------------------------------------------------
def _cached_or_local(base_repo: str, probe: str, name: str, what: str, prompt: str,
                     encode: Callable[[str, Optional[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`encode(source, revision)` cached per (repo commit, name); a local base folder is encoded on every call."""
    folder = hub._local_dir(base_repo)
    if folder is not None:
        return warn_truncated(prompt, encode(str(folder), None))
    repo_id, revision = hub.split_repo(base_repo)
    return warn_truncated(prompt, hub._cached_per_commit('prompt_embeds', repo_id, revision, probe, name, what,
                                                         lambda commit, meta: encode(repo_id, commit)))


# kind -> (cache name prefix, text-encoder subfolders). 't5-v2': entries cached before captions were pre-processed
# (keyed by the raw prompt) are never read; 'sd3-v2', 'hunyuan-v2': entries cached before they carried the truncation
# note are never read.
_ENTRIES = {'t5': ('t5-v2', ('text_encoder',)), 'flux': ('flux', ('text_encoder', 'text_encoder_2')),
            'sd3': ('sd3-v2', ('text_encoder', 'text_encoder_2', 'text_encoder_3')),
            'hunyuan': ('hunyuan-v2', ('text_encoder', 'text_encoder_2'))}


def _entry(kind: str, prompt: str, *lengths: int) -> str:
    """Cache name of a `kind` embedding (`_ENTRIES`) of `prompt` (PixArt's T5: its caption) at these token lengths."""
    text = pixart_caption(prompt) if kind == 't5' else prompt
    return f'{_ENTRIES[kind][0]}-' + hashlib.sha256('\0'.join([*map(str, lengths), text]).encode()).hexdigest()[:32]


def uncached_prompt_files(kind: str, base_repo: str, prompt: str, *lengths: int) -> list[Path]:
    """The text-encoder weight files that `encode_t5_prompt` ('t5'), `encode_flux_prompt`, `encode_sd3_prompt` or
    `encode_hunyuan_prompt` reads for `prompt` (the same arguments): none when it is cached (`hub.cached_entry`); a
    local base folder is encoded on every call."""
    if hub._local_dir(base_repo) is None and hub.cached_entry('prompt_embeds', base_repo, _entry(kind, prompt, *lengths)):
        return []
    return encoder_files(base_repo, _ENTRIES[kind][1])


def _t5_embeds(source: str, revision: Optional[str], prompt: str, max_tokens: int, what: str,
               tokenizer: str = 'tokenizer', text_encoder: str = 'text_encoder', masked: bool = True,
               name: str = 'the T5 text encoder') -> dict[str, torch.Tensor]:
    """T5 last hidden state (1, max_tokens, D) and token mask, as PixArt's pipelines compute them (attending to the
    prompt's tokens only) or, with `masked=False`, FLUX's (attending to the padding too)."""
    from transformers import AutoTokenizer, T5EncoderModel

    with hub.hub_errors(what, repo=source, revision=revision):
        tok = AutoTokenizer.from_pretrained(source, subfolder=tokenizer, revision=revision)
        encoder = T5EncoderModel.from_pretrained(source, subfolder=text_encoder, revision=revision,
                                                 dtype=torch.float32)
    inputs = tok(prompt, padding='max_length', max_length=max_tokens, truncation=True, add_special_tokens=True,
                 return_tensors='pt')
    with torch.no_grad():
        embeds = encoder.eval()(inputs.input_ids, attention_mask=inputs.attention_mask if masked else None)[0].float()
    del encoder
    gc.collect()  # T5-XXL is 4.7B parameters: give it back now
    return {'prompt_embeds': embeds, 'prompt_mask': inputs.attention_mask.float(),
            **truncation_note([prompt], [(tok, max_tokens, name)])}


def pixart_caption(prompt: str) -> str:
    """The text PixArt's pipelines hand T5: `encode_prompt` runs `_text_preprocessing(prompt, clean_caption=False)`,
    which lower-cases and strips it."""
    return prompt.lower().strip()


def encode_t5_prompt(base_repo: str, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """PixArt's T5 embedding (1, max_tokens, D) and attention mask (1, max_tokens) of `prompt` (lower-cased and
    stripped first, `pixart_caption`), cached per (repo commit, caption) under `cache_dir()/prompt_embeds`; the encoder
    is loaded on a miss only."""
    what = f'the T5 text embedding of {prompt!r} for {base_repo!r}'
    caption = pixart_caption(prompt)
    return _cached_or_local(base_repo, 'text_encoder/config.json', _entry('t5', prompt, max_tokens), what, caption,
                            lambda source, rev: _t5_embeds(source, rev, caption, max_tokens, what))


def encode_flux_prompt(base_repo: str, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """FLUX's conditioning of `prompt` as `FluxPipeline.encode_prompt` computes it: the T5 last hidden state
    `prompt_embeds` (1, max_tokens, 4096) from `text_encoder_2/` and CLIP's pooled output `pooled_prompt_embeds`
    (1, 768) from `text_encoder/`; cached per (repo commit, prompt), encoders loaded on a miss only."""
    what = f'the FLUX text embeddings (CLIP + T5) of {prompt!r} for {base_repo!r}'

    def encode(source: str, revision: Optional[str]) -> dict[str, torch.Tensor]:
        clip = _load_clip(source, revision, what)
        tokenizer, encoder = clip[0]
        ids = tokenizer([prompt], padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors='pt').input_ids
        with torch.no_grad():
            pooled = encoder(ids).pooler_output.float()
        clip_note = truncation_note([prompt], [(tokenizer, tokenizer.model_max_length, 'the CLIP text encoder (pooled)')])
        del clip, encoder
        t5 = _t5_embeds(source, revision, prompt, max_tokens, what, 'tokenizer_2', 'text_encoder_2', masked=False)
        return {'prompt_embeds': t5['prompt_embeds'], 'pooled_prompt_embeds': pooled, **_joined_notes(clip_note, t5)}

    return _cached_or_local(base_repo, 'text_encoder_2/config.json', _entry('flux', prompt, max_tokens), what, prompt,
                            encode)


# ---- CLIP-L + CLIP-G + T5 (Stable Diffusion 3 / 3.5) ----------------------------------------------------------------
def encode_sd3_prompt(base_repo: str, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """SD3's conditioning of `prompt` as `StableDiffusion3Pipeline.encode_prompt` computes it (no classifier-free
    guidance, no clip_skip): the penultimate hidden states of CLIP-L (`text_encoder/`) and CLIP-G (`text_encoder_2/`)
    concatenated, zero-padded to T5's width and followed by T5's last hidden state (`text_encoder_3/`, `max_tokens`
    tokens, no mask): `prompt_embeds` (1, 77 + max_tokens, 4096); both CLIPs' projected pooled outputs concatenated:
    `pooled_prompt_embeds` (1, 2048). Cached per (repo commit, prompt); encoders loaded on a miss only, one at a
    time."""
    what = f'the SD3 text embeddings (CLIP-L + CLIP-G + T5) of {prompt!r} for {base_repo!r}'

    def encode(source: str, revision: Optional[str]) -> dict[str, torch.Tensor]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        hidden, pooled, notes = [], [], []
        for tok_dir, enc_dir, name in (('tokenizer', 'text_encoder', 'the CLIP-L text encoder'),
                                       ('tokenizer_2', 'text_encoder_2', 'the CLIP-G text encoder')):
            with hub.hub_errors(what, repo=source, revision=revision):
                tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=tok_dir, revision=revision)
                encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder=enc_dir, revision=revision,
                                                                      dtype=torch.float32).eval()
            ids = tokenizer([prompt], padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors='pt').input_ids
            with torch.no_grad():
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled.append(out.text_embeds.float())
            notes.append(truncation_note([prompt], [(tokenizer, tokenizer.model_max_length, name)]))
            del encoder, out
        t5 = _t5_embeds(source, revision, prompt, max_tokens, what, 'tokenizer_3', 'text_encoder_3', masked=False)
        t5_embeds = t5['prompt_embeds']
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return {'prompt_embeds': torch.cat([clip, t5_embeds], dim=-2),
                'pooled_prompt_embeds': torch.cat(pooled, dim=-1), **_joined_notes(*notes, t5)}

    return _cached_or_local(base_repo, 'text_encoder_3/config.json', _entry('sd3', prompt, max_tokens), what, prompt,
                            encode)


# ---- bilingual CLIP (BERT) + mT5 (HunyuanDiT) -----------------------------------------------------------------------
def encode_hunyuan_prompt(base_repo: str, prompt: str, max_tokens: int = 77, max_tokens_t5: int = 256
                          ) -> dict[str, torch.Tensor]:
    """HunyuanDiT's conditioning of `prompt` as `HunyuanDiTPipeline.encode_prompt` computes it: the bilingual CLIP
    text encoder's (a BERT, `text_encoder/`) last hidden state and token mask, `prompt_embeds` (1, 77, 1024) and
    `prompt_mask`; mT5's (`text_encoder_2/`) `prompt_embeds_t5` (1, 256, 2048) and `prompt_mask_t5`, both encoders
    attending to the prompt's tokens only. Cached per (repo commit, prompt); encoders loaded on a miss only."""
    what = f'the HunyuanDiT text embeddings (CLIP + mT5) of {prompt!r} for {base_repo!r}'

    def encode(source: str, revision: Optional[str]) -> dict[str, torch.Tensor]:
        from transformers import AutoTokenizer, BertModel

        with hub.hub_errors(what, repo=source, revision=revision):
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder='tokenizer', revision=revision)
            encoder = BertModel.from_pretrained(source, subfolder='text_encoder', revision=revision,
                                                dtype=torch.float32, add_pooling_layer=False).eval()
        inputs = tokenizer(prompt, padding='max_length', max_length=max_tokens, truncation=True,
                           return_attention_mask=True, return_tensors='pt')
        with torch.no_grad():
            embeds = encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0].float()
        del encoder
        clip_note = truncation_note([prompt], [(tokenizer, max_tokens, 'the bilingual CLIP text encoder')])
        t5 = _t5_embeds(source, revision, prompt, max_tokens_t5, what, 'tokenizer_2', 'text_encoder_2', masked=True,
                        name='the mT5 text encoder')
        return {'prompt_embeds': embeds, 'prompt_mask': inputs.attention_mask.float(),
                'prompt_embeds_t5': t5['prompt_embeds'], 'prompt_mask_t5': t5['prompt_mask'],
                **_joined_notes(clip_note, t5)}

    return _cached_or_local(base_repo, 'text_encoder_2/config.json', _entry('hunyuan', prompt, max_tokens, max_tokens_t5),
                            what, prompt, encode)


# --- SDXL: both CLIP text encoders (diffusers StableDiffusionXLPipeline.encode_prompt) ---------------------------
def load_text_encoders(source: str, revision: Optional[str], what: str) -> list[tuple[Any, nn.Module]]:
    """(tokenizer, encoder) of `tokenizer`/`text_encoder` and `tokenizer_2`/`text_encoder_2` of an SDXL repo."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    loaded = []
    for tok_dir, enc_dir, cls in (('tokenizer', 'text_encoder', CLIPTextModel),
                                  ('tokenizer_2', 'text_encoder_2', CLIPTextModelWithProjection)):
        with hub.hub_errors(what, repo=source, revision=revision):
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=tok_dir, revision=revision)
            encoder = cls.from_pretrained(source, subfolder=enc_dir, revision=revision, dtype=torch.float32)
        loaded.append((tokenizer, encoder.eval()))
    return loaded


def _encode_sdxl(encoders: list[tuple[Any, nn.Module]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """`prompt_embeds` (N, 77, D1 + D2) and `pooled_prompt_embeds` (N, P) of `prompts`, float32."""
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors='pt').input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float())
        if hasattr(out, 'text_embeds'):
            pooled = out.text_embeds.float()
    return {'prompt_embeds': torch.cat(hidden, dim=-1), 'pooled_prompt_embeds': pooled}
