"""Recording activations inside diffusers' transformer and resnet blocks during one forward pass.

Forward hooks on exactly the modules asked for, for one pass; diffusers' own attention processor keeps running.
Attention maps are computed from the recorded query and key only when asked for (`MAP_REDUCTIONS`). Details and the
map reductions: docs/models.md#attention-maps.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from ._taps import Tap

__all__ = ['ActivationRecorder', 'attention_map', 'attention_maps', 'MAP_HOOKS', 'MAP_REDUCTIONS', 'map_shapes']

_MAP_CHUNK = 1024  # queries per chunk of attention probabilities (bounds the memory of a map to chunk x keys x heads)
MAP_HOOKS = ('self-map', 'cross-map', 'joint-self-map', 'joint-cross-map')
# What each kind of map tap holds: (reduced shape, how it is reduced, full shape); N = H * W image tokens.
MAP_REDUCTIONS: dict[str, tuple[str, str, str]] = {
    'self-map': ('(B, heads, H, W)', 'per head, the attention each key position receives, mean over all N queries '
                 '(sums to one over keys)', '(B, heads, N, N)'),
    'cross-map': ('(B, tokens, H, W)', 'per query position, its attention over the prompt tokens (padding masked to '
                  'zero where the model masks it), mean over heads (sums to one over tokens)', '(B, heads, N, tokens)'),
    'joint-self-map': ('(B, heads, H, W)', 'image-query rows, image-key columns of the joint (prompt + image) softmax, '
                       'not renormalised; per head, mean over the N queries', '(B, heads, N, N)'),
    'joint-cross-map': ('(B, tokens, H, W)', 'image-query rows, prompt-key columns of the joint softmax, not '
                        'renormalised; per query position, mean over heads', '(B, heads, N, tokens)'),
}


def attention_maps(query: torch.Tensor, key: torch.Tensor, scale: float, parts: dict[str, tuple[int, int]],
                   bias: Optional[torch.Tensor] = None, full: bool = False) -> dict[str, torch.Tensor]:
    """Attention probabilities softmax(q k^T * scale + bias) over all keys, cut into key ranges and reduced.

    Args:
        query: (B, heads, N, d), as the attention uses it (norms, rotary embedding applied).
        key: (B, heads, M, d).
        scale: logit scale.
        parts: {kind: (start, stop)} key ranges to return; kind 'cross' (keys are prompt tokens) or 'self' (keys are
            the N query positions).
        bias: additive logit bias broadcastable to (B, heads, N, M) (masked keys: a large negative number).
        full: keep the probabilities of each range, (B, heads, N, stop - start), instead of reducing them.

    Returns:
        {kind: map}, float32. Reduced: 'cross' (B, stop - start, N), the mean over heads of each query's probabilities;
        'self' (B, heads, stop - start), per head the mean over queries.
    """
    q, k_t = query.float(), key.float().transpose(-1, -2) * scale
    n = q.shape[2]
    bias = None if bias is None else bias.float()
    pieces: dict[str, list[torch.Tensor]] = {kind: [] for kind in parts}
    for s in range(0, n, _MAP_CHUNK):
        logits = q[:, :, s:s + _MAP_CHUNK] @ k_t
        if bias is not None:
            logits = logits + (bias[:, :, s:s + _MAP_CHUNK] if bias.ndim == 4 and bias.shape[2] == n else bias)
        p = torch.softmax(logits, dim=-1)
        for kind, (a, b) in parts.items():
            part = p[..., a:b]
            if full:
                pieces[kind].append(part)
            elif kind == 'cross':
                pieces[kind].append(part.mean(1))
            else:
                pieces[kind].append(part.sum(2))
    out = {}
    for kind, chunks in pieces.items():
        if full:
            out[kind] = torch.cat(chunks, dim=2)
        elif kind == 'cross':
            out[kind] = torch.cat(chunks, dim=1).transpose(1, 2)
        else:
            out[kind] = sum(chunks) / n
    return out


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads * d) -> (B, heads, S, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def attention_map(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, cross: bool,
                  mask: Optional[torch.Tensor] = None, full: bool = False,
                  rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Attention probabilities of a diffusers `Attention` (UNet, PixArt), reduced to a map over query positions.

    Args:
        attn: the attention module (heads, scale, optional per-head norms).
        query: its query projection, (B, N, heads * d).
        key: its key projection, (B, M, heads * d).
        cross: cross-attention (keys are prompt tokens) rather than self-attention (keys are positions).
        mask: the `attention_mask` the module was called with: an additive bias (B, 1 | N, M) as diffusers'
            transformers pass it (PixArt: (1 - prompt mask) * -10000), applied as `Attention.get_attention_scores`.
        full: return the unreduced probabilities (B, heads, N, M).
        rope: the `image_rotary_emb` (cos, sin) the module was called with (HunyuanDiT), applied after the norms as
            `HunyuanAttnProcessor2_0` does: to the query, and to the key in self-attention.

    Returns:
        (B, heads, N, M) with `full`; else cross: (B, M, N), the attention of each query over the tokens averaged over
        heads; self: (B, heads, N), per head the attention each key receives, averaged over queries.
    """
    q, k = _heads_first(query, attn.heads).float(), _heads_first(key, attn.heads).float()
    if getattr(attn, 'norm_q', None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, 'norm_k', None) is not None:
        k = attn.norm_k(k)
    if rope is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(q, rope)
        if not cross:
            k = apply_rotary_emb(k, rope)
    bias = None
    if mask is not None:
        if mask.ndim != 3 or mask.shape[-1] != k.shape[2]:
            raise InputError(f'Attention mask of shape {tuple(mask.shape)} does not fit {k.shape[2]} keys: expected '
                             'the additive bias (B, 1 or queries, keys) diffusers transformers pass.')
        bias = mask.unsqueeze(1)
    kind = 'cross' if cross else 'self'
    return attention_maps(q, k, attn.scale, {kind: (0, k.shape[2])}, bias, full)[kind].to(query.dtype)


def map_shapes(hook: str, heads: int, tokens: int, grid: tuple[int, int], full: bool) -> tuple[int, ...]:
    """Shape (without the batch) of a map tap's tensor: `hook` one of `MAP_HOOKS`, on an image of `grid` tokens."""
    n = grid[0] * grid[1]
    cross = hook.endswith('cross-map')
    if full:
        return (heads, n, tokens if cross else n)
    return (tokens if cross else heads, *grid)


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
        raise InputError(f'{module} is not inside a diffusers transformer.')
    return parts[0]


class ActivationRecorder:
    """Context manager recording the given taps (those with a `hook`) of `root` during the forward passes inside it.

    `drain()` hands out the (location, map) pairs recorded since the last call, in recording order. Attention maps are
    reduced as `MAP_REDUCTIONS` says, or kept whole with `full_maps`.
    """

    def __init__(self, root: nn.Module, taps: Sequence[Tap], full_maps: bool = False):
        self.root = root
        self.taps = [t for t in taps if t.hook]
        self.full_maps = full_maps
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, torch.Size] = {}  # transformer path -> (H, W) of its input
        self._qk: dict[tuple[str, str], torch.Tensor] = {}  # (attention path, projection) -> its output, for maps

    def _module(self, path: str) -> nn.Module:
        return self.root.get_submodule(path)

    def __enter__(self) -> 'ActivationRecorder':
        transformers = set()
        maps: dict[str, dict[str, str]] = {}  # attention path -> {map hook: location}
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
            elif tap.hook in MAP_HOOKS:
                maps.setdefault(tap.module, {})[tap.hook] = tap.location
            else:
                raise InputError(f'Unknown hook kind {tap.hook!r} of tap {tap.name}.')
        for attn, wanted in maps.items():  # one probability computation per attention, whichever maps it gives
            module = self._module(attn)
            joint = any(h.startswith('joint') for h in wanted)
            projections = ['to_q', 'to_k']
            if joint and getattr(module, 'added_kv_proj_dim', None) is not None:
                projections.append('add_k_proj')  # the prompt tokens' keys of a FLUX double block
            for p in projections:
                self._hook(f'{attn}.{p}', self._keep(attn, p))
            store = self._store_joint_maps if joint else self._store_map
            self._handles.append(module.register_forward_hook(store(attn, wanted), with_kwargs=True))
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

    def _as_map(self, m: torch.Tensor, transformer: str) -> torch.Tensor:
        """A reduced map (B, C, N) on the token grid; full maps stay (B, heads, N, keys)."""
        return m if self.full_maps else m.unflatten(2, tuple(self._sizes[transformer]))

    def _store_map(self, attn: str, wanted: dict[str, str]):
        """UNet / PixArt / HunyuanDiT attention: self- or cross-attention of the module's own query and key."""
        transformer = _transformer_of(attn)

        def hook(module, args, kwargs, out):
            q, k = self._qk.pop((attn, 'to_q')), self._qk.pop((attn, 'to_k'))
            mask = kwargs.get('attention_mask', args[2] if len(args) > 2 else None)
            rope = kwargs.get('image_rotary_emb')
            for h, location in wanted.items():
                m = attention_map(module, q, k, h == 'cross-map', mask, self.full_maps, rope)
                self._out[location] = self._as_map(m, transformer)
        return hook

    def _store_joint_maps(self, attn: str, wanted: dict[str, str]):
        """FLUX attention: the image queries' rows of the joint softmax over prompt and image keys (the prompt first),
        with the RMS norms and the rotary embedding as `FluxAttnProcessor` applies them."""
        from diffusers.models.embeddings import apply_rotary_emb

        transformer = _transformer_of(attn)

        def hook(module, args, kwargs, out):
            n = self._sizes[transformer].numel()
            q, k = self._qk.pop((attn, 'to_q')), self._qk.pop((attn, 'to_k'))  # (B, S, heads * d)
            dtype = q.dtype
            q = module.norm_q(q.unflatten(-1, (-1, module.head_dim)))
            k = module.norm_k(k.unflatten(-1, (-1, module.head_dim)))
            if (attn, 'add_k_proj') in self._qk:  # double block: prompt keys apart, image tokens only in q / k
                k_txt = module.norm_added_k(self._qk.pop((attn, 'add_k_proj')).unflatten(-1, (-1, module.head_dim)))
                k = torch.cat([k_txt, k], dim=1)
            rope = kwargs.get('image_rotary_emb')
            if rope is not None:
                k = apply_rotary_emb(k, rope, sequence_dim=1)
                q = apply_rotary_emb(q[:, -n:], tuple(r[-n:] for r in rope), sequence_dim=1)
            else:
                q = q[:, -n:]
            text = k.shape[1] - n
            parts = {'cross': (0, text), 'self': (text, text + n)}
            maps = attention_maps(q.transpose(1, 2), k.transpose(1, 2), module.head_dim ** -0.5,
                                  {h.split('-')[1]: parts[h.split('-')[1]] for h in wanted}, full=self.full_maps)
            for h, location in wanted.items():
                self._out[location] = self._as_map(maps[h.split('-')[1]].to(dtype), transformer)
        return hook
