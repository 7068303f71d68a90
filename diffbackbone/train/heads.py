"""Point-wise projection heads conditioned on the diffusion timestep, as in CleanDIFT's training.

One head per tap maps the clean student's features onto what the noisy teacher computes at timestep t. A head is a
stack of residual SwiGLU feed-forward blocks applied at every position; each block's RMS norm is scaled by a
projection of a time code (Fourier features of t / 999 -> linear -> small mapping net). The output projections and
the norm modulations start at zero, so an untrained head is the identity.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ['HEADS_METADATA_KEY', 'HEADS_PREFIX', 'FeedForward', 'MappingNet', 'ProjectionHeads']

HEADS_PREFIX = 'heads.'  # key prefix of the heads in a clean-train output file
HEADS_METADATA_KEY = 'diffbackbone.heads'  # safetensors metadata entry with the heads' constructor arguments


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise the last dim in float32 and multiply by `scale`."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale.float()).to(x.dtype)


class FeedForward(nn.Module):
    """Residual SwiGLU block; its RMS norm scale is 1 + a linear map of the condition (when one is given)."""

    def __init__(self, dim: int, hidden: int, cond_dim: int | None = None):
        super().__init__()
        self.norm_scale = nn.Parameter(torch.ones(dim)) if cond_dim is None else None
        self.norm_cond = nn.Linear(cond_dim, dim, bias=False) if cond_dim is not None else None
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down.weight)
        if self.norm_cond is not None:
            nn.init.zeros_(self.norm_cond.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, dim); cond: (N, cond_dim)."""
        scale = self.norm_scale if self.norm_cond is None else 1 + self.norm_cond(cond)[:, None, :]
        h, gate = self.up(rms_norm(x, scale)).chunk(2, dim=-1)
        return x + self.down(h * F.silu(gate))


class MappingNet(nn.Module):
    """Time code mapping: RMS norm, residual feed-forward blocks, RMS norm."""

    def __init__(self, width: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([FeedForward(width, hidden) for _ in range(depth)])
        self.in_scale = nn.Parameter(torch.ones(width))
        self.out_scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.in_scale)[:, None, :]
        for block in self.blocks:
            x = block(x)
        return rms_norm(x[:, 0], self.out_scale)


class Head(nn.Module):
    """Feed-forward stack applied at every position of an NCHW map."""

    def __init__(self, dim: int, hidden: int, cond_dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([FeedForward(dim, hidden, cond_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            y = block(y, cond)
        return y.transpose(1, 2).reshape(n, c, h, w)


class ProjectionHeads(nn.Module):
    """Per-tap heads mapping clean features to noisy-teacher features at timestep t.

    Example, features "as the noisy model would see them at t = 100" from a clean-train output file::

        model = timm.create_model('cleandift_sd21', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                  features_only=True, out_indices=('us6', 'us9'))
        heads = ProjectionHeads.from_file(path)
        names = [info['name'] for info in model.feature_info.get_dicts()]
        noisy_like = heads(dict(zip(names, model(images))), t=100)  # {'us6': ..., 'us9': ...}
    """

    def __init__(
            self,
            channels: Mapping[str, int],
            depth: int = 3,
            expansion: float = 1.0,
            width: int = 256,
            mapping_hidden: int = 768,
            mapping_depth: int = 2,
            t_max: int = 999,
            fourier_std: float = 1.0,
    ):
        """
        Args:
            channels: tap name -> channels, one head per tap.
            depth: feed-forward blocks per head.
            expansion: hidden width of a head block relative to its channels.
            width: width of the time code.
            mapping_hidden: hidden width of the mapping net.
            mapping_depth: blocks of the mapping net.
            t_max: timestep mapped to 1 before the Fourier features.
            fourier_std: standard deviation of the Fourier frequencies.
        """
        super().__init__()
        if width % 2:
            raise InputError(f'width must be even (cos and sin halves), got {width}.')
        self.config = dict(channels=dict(channels), depth=depth, expansion=expansion, width=width,
                           mapping_hidden=mapping_hidden, mapping_depth=mapping_depth, t_max=t_max,
                           fourier_std=fourier_std)
        self.t_max = t_max
        self.register_buffer('fourier', torch.randn(width // 2, 1) * fourier_std)  # persistent: part of the heads
        self.time_in = nn.Linear(width, width, bias=False)
        self.mapping = MappingNet(width, mapping_hidden, mapping_depth)
        self.taps = nn.ModuleDict({
            name: Head(c, max(1, round(c * expansion)), width, depth) for name, c in channels.items()})

    def time_code(self, t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
        """(n, width) condition for timesteps `t` (a number or n values)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.shape[0] != n:
            raise InputError(f'Got {t.shape[0]} timesteps for a batch of {n}: give one per image or a single one.')
        f = 2 * math.pi * (t[:, None] / self.t_max) @ self.fourier.float().T
        return self.mapping(self.time_in(torch.cat([f.cos(), f.sin()], dim=-1).to(self.time_in.weight.dtype)))

    def forward(self, features: Mapping[str, torch.Tensor], t: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """Project `features` ({tap name: (N, C, H, W)}) to what the noisy teacher would give at timestep(s) `t`."""
        unknown = [k for k in features if k not in self.taps]
        if unknown:
            raise KeyError(f'No projection head for taps {unknown}; these heads cover {list(self.taps)}.')
        if not features:
            return {}
        first = next(iter(features.values()))
        cond = self.time_code(t, first.shape[0], first.device)
        return {name: self.taps[name](x, cond.to(x.dtype)) for name, x in features.items()}

    def metadata(self) -> dict[str, str]:
        """safetensors metadata entry from which `from_file` rebuilds these heads."""
        return {HEADS_METADATA_KEY: json.dumps(self.config)}

    @classmethod
    def from_file(cls, path: str | Path, map_location: str = 'cpu') -> ProjectionHeads:
        """Heads stored in a `clean-train` output file (keys under `heads.`, config in the file's metadata)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'{path} does not exist: give the .safetensors file written by clean-train.')
        with safe_open(path, 'pt', device=map_location) as f:
            meta = f.metadata() or {}
            if HEADS_METADATA_KEY not in meta:
                raise InputError(f'{path} holds no projection heads (no {HEADS_METADATA_KEY!r} metadata): only files '
                                 'written by `diffbackbone clean-train` have them.')
            config = json.loads(meta[HEADS_METADATA_KEY])
            state = {k[len(HEADS_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(HEADS_PREFIX)}
        heads = cls(**config)
        heads.load_state_dict(state, strict=True)
        return heads.eval()
