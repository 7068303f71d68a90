"""How far DiTF's bfloat16 DAVIS affinity differs from our float32 one (docs/fidelity.md, DiTF):
`python tools/ditf_davis_bf16.py`.

Their `eval_davis.py` computes the propagation's affinity on bfloat16 features (normalisation, `bmm`, `exp` in bf16,
then `.float()` before the top-k); ours is float32. This script runs `label_video` with DiTF's settings (temperature
0.1, top-k 5, 7 previous frames, neighbourhood 12) twice on the same synthetic features, 12 related frames of
30 x 52 (a 480p frame at stride 16), once with their bf16 affinity, and prints the share of labels that differ.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffbackbone.evals import davis


def bf16_propagate(target: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, temperature: float, topk: int,
                   neighborhood: int) -> torch.Tensor:
    """Their label_propagation with bf16 features: the affinity in bf16, then float32 as theirs."""
    n, c, h, w = sources.shape
    tgt = F.normalize(target.bfloat16().reshape(c, -1).T, dim=1)
    src = F.normalize(sources.bfloat16().reshape(n, c, -1), dim=1)
    aff = torch.exp(torch.bmm(tgt[None].repeat(n, 1, 1), src) / temperature)
    ys, xs = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    near = ((ys[:, None] - ys[None]).abs() <= neighborhood) & ((xs[:, None] - xs[None]).abs() <= neighborhood)
    aff = (aff * near[None]).float().transpose(2, 1).reshape(-1, h * w)
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(0, keepdim=True)
    segs = masks.float().reshape(n, masks.shape[1], -1).transpose(2, 1).reshape(-1, masks.shape[1]).T
    return (segs @ aff).reshape(-1, h, w)


def main() -> None:
    proto, real = davis.PROTOCOLS['ditf'], davis.propagate
    diffs = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(64, 30, 52, generator=g)
        feats = [base + 0.7 * torch.randn(64, 30, 52, generator=g) for _ in range(12)]
        first = np.zeros((480, 832), np.uint8)
        first[40:300, 100:400], first[200:460, 500:800] = 1, 2
        args = (first, (832, 480), (832, 480), proto.temperature, proto.topk, proto.n_last_frames, proto.neighborhood)
        ours = list(davis.label_video(iter(feats), *args))
        davis.propagate = bf16_propagate
        try:
            theirs = list(davis.label_video(iter(feats), *args))
        finally:
            davis.propagate = real
        diffs.append(np.mean([np.mean(a != b) for a, b in zip(ours, theirs)]))
    print('labels differing, per seed (%):', ' '.join(f'{100 * d:.2f}' for d in diffs))


if __name__ == '__main__':
    main()
