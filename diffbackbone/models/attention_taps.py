"""Recording activations inside diffusers' transformer and resnet blocks during one forward pass.

Forward hooks are put on exactly the modules whose outputs were asked for (the q / k / v projections, the feed-forward's
first layer, transformer blocks, resnet conv2) for the duration of one pass, and removed after it. The attention
processor is never replaced: diffusers keeps running its own (PyTorch SDPA by default), so recording q/k/v costs
nothing. A recorded activation is the module's own output tensor, turned into NCHW by a view (no copy). Attention maps,
which SDPA never materialises, are computed from the recorded query and key only when asked for, in chunks of queries.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .taps import Tap

__all__ = ['ActivationRecorder', 'attention_map']

_MAP_CHUNK = 1024  # queries per chunk of attention probabilities (bounds the memory of a map to chunk x keys x heads)


def attention_map(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, cross: bool) -> torch.Tensor:
    """Attention probabilities of a diffusers `Attention`, reduced to a map over query positions.

    Args:
        attn: the attention module (heads, scale, optional per-head norms).
        query: its query projection, (B, N, heads * d).
        key: its key projection, (B, M, heads * d).
        cross: cross-attention (keys are prompt tokens) rather than self-attention (keys are positions).

    Returns:
        cross: (B, M, N), the attention of each query over the tokens, averaged over heads (sums to one over M).
        self: (B, heads, N), per head the attention each key receives, averaged over queries (sums to one over N).
    """
    heads = attn.heads
    q = query.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    k = key.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    if getattr(attn, 'norm_q', None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, 'norm_k', None) is not None:
        k = attn.norm_k(k)
    k_t = k.transpose(-1, -2) * attn.scale
    n = q.shape[2]
    if cross:
        parts = [torch.softmax(q[:, :, s:s + _MAP_CHUNK] @ k_t, dim=-1).mean(1) for s in range(0, n, _MAP_CHUNK)]
        return torch.cat(parts, dim=1).transpose(1, 2).to(query.dtype)
    received = sum(torch.softmax(q[:, :, s:s + _MAP_CHUNK] @ k_t, dim=-1).sum(2) for s in range(0, n, _MAP_CHUNK))
    return (received / n).to(query.dtype)


def _nchw(tokens: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) view."""
    return tokens.transpose(1, 2).unflatten(2, tuple(size))


def _transformer_of(module: str) -> str:
    """Path of the transformer holding a module path `....transformer_blocks.k....` (FLUX: also
    `single_transformer_blocks`; HunyuanDiT: `blocks`)."""
    parts = re.split(r'\.(?:single_)?(?:transformer_)?blocks\.', module, maxsplit=1)  # HunyuanDiT: `blocks`
    if len(parts) == 1:  # DeepFloyd IF: a plain Attention in a UNet block, `....attentions.j.to_q`
        parts = re.split(r'(?<=\.attentions\.\d)\.', module, maxsplit=1)
    if len(parts) == 1:
        raise ValueError(f'{module} is not inside a diffusers transformer.')
    return parts[0]


class ActivationRecorder:
    """Context manager recording the given taps (those with a `hook`) of `root` during the forward passes inside it.

    `drain()` hands out the (location, NCHW map) pairs recorded since the last call, in recording order.
    """

    def __init__(self, root: nn.Module, taps: Sequence[Tap]):
        self.root = root
        self.taps = [t for t in taps if t.hook]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, torch.Size] = {}  # transformer path -> (H, W) of its input
        self._qk: dict[tuple[str, str], torch.Tensor] = {}  # (attention path, 'q'|'k') -> projection, for maps

    def _module(self, path: str) -> nn.Module:
        return self.root.get_submodule(path)

    def __enter__(self) -> 'ActivationRecorder':
        transformers = set()
        for tap in self.taps:
            if tap.hook != 'conv':
                transformers.add(_transformer_of(tap.module))
            if tap.hook == 'conv':
                self._hook(tap.module, self._store_conv(tap.location))
            elif tap.hook in ('tokens', 'q', 'k', 'v', 'tokens@0', 'tokens@1'):
                pick = int(tap.hook[-1]) if '@' in tap.hook else None
                self._hook(tap.module, self._store_tokens(tap.location, _transformer_of(tap.module), pick))
            elif tap.hook == 'input':
                self._handles.append(self._module(tap.module).register_forward_pre_hook(
                    self._store_input(tap.location, _transformer_of(tap.module))))
            elif tap.hook in ('self-map', 'cross-map'):
                for p in ('q', 'k'):
                    self._hook(f'{tap.module}.to_{p}', self._keep(tap.module, p))
                self._hook(tap.module, self._store_map(tap.location, tap.module, tap.hook == 'cross-map'))
            else:
                raise ValueError(f'Unknown hook kind {tap.hook!r} of tap {tap.name}.')
        for path in transformers:
            self._handles.append(self._module(path).register_forward_pre_hook(self._size_of(path)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._qk.clear()

    def set_size(self, transformer: str, size: tuple[int, int]) -> None:
        """The token grid (H, W) of `transformer` when its own forward (whose input gives it) is not called."""
        self._sizes[transformer] = torch.Size(size)

    def drain(self) -> Iterator[tuple[str, torch.Tensor]]:
        out, self._out = self._out, {}
        yield from out.items()

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _hook(self, path: str, fn) -> None:
        self._handles.append(self._module(path).register_forward_hook(fn))

    def _size_of(self, path: str):
        def hook(module, args):
            self._sizes[path] = args[0].shape[-2:]
        return hook

    def _store_conv(self, location: str):
        def hook(module, args, out):
            self._out[location] = out
        return hook

    def _image_tokens(self, tokens: torch.Tensor, transformer: str) -> torch.Tensor:
        """NCHW map of the image tokens: the last H*W of the sequence (FLUX's joint blocks put the text first)."""
        size = self._sizes[transformer]
        return _nchw(tokens[:, tokens.shape[1] - size.numel():], size)

    def _store_tokens(self, location: str, transformer: str, pick: Optional[int] = None):
        def hook(module, args, out):
            if pick is not None and isinstance(out, tuple):  # (image, text) of FLUX attention, (text, image) of blocks
                out = out[pick]
            self._out[location] = self._image_tokens(out, transformer)
        return hook

    def _store_input(self, location: str, transformer: str):
        def hook(module, args):
            self._out[location] = self._image_tokens(args[0], transformer)
        return hook

    def _keep(self, attn: str, which: str):
        def hook(module, args, out):
            self._qk[attn, which] = out
        return hook

    def _store_map(self, location: str, attn: str, cross: bool):
        transformer = _transformer_of(attn)

        def hook(module, args, out):
            q, k = self._qk.pop((attn, 'q')), self._qk.pop((attn, 'k'))
            m = attention_map(module, q, k, cross)
            self._out[location] = m.unflatten(2, tuple(self._sizes[transformer]))
        return hook
