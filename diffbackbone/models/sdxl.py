"""SDXL's text conditioning for image features: a prompt through both text encoders.

As diffusers' StableDiffusionXLPipeline.encode_prompt does: the penultimate hidden state of CLIP ViT-L
(`text_encoder`, 768) concatenated with the penultimate hidden state of OpenCLIP ViT-bigG (`text_encoder_2`, 1280)
gives the (N, 77, 2048) context; the pooled embedding is `text_encoder_2`'s projected `text_embeds` (N, 1280).
`diffbackbone.prompts` caches the result per (repo commit, prompt), so the 1.4 GB of text encoders are loaded once
per prompt, ever.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn

from .. import hub

__all__ = ['load_text_encoders']


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


def _encode(encoders: list[tuple[Any, nn.Module]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
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
