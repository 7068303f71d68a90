"""How far one pass is from "A Tale of Two Features"' sliding window, and a latent draw from their posterior mean, on
the fused descriptors (issue #27), with tiny random-weight models (`tests/golden_taps.fill_weights`): the paper's SD
settings (`sd15_dinov2`'s) on test_dift + test_vit_dinov2 at 240 px with 128-px windows (their 960 px and 512-px windows,
scaled to the tiny models' native size). For each variant against the sliding window: the relative L2 difference of
the fused maps (no reduction), and after their per-pair co-PCA (8 dims per SD tap) the share of source positions whose
nearest target position (cosine) is the same.

    PYTHONPATH=. python tools/fused_slide.py
"""
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import diffbackbone  # noqa: E402,F401
from diffbackbone.models import fused  # noqa: E402
from golden_taps import fill_weights, images  # noqa: E402

SIDE, WINDOW, DIMS = 240, 128, 8


def model(**kwargs) -> fused.FusedBackbone:
    net = timm.create_model('diffusion_dinov2', diffusion='test_dift', dino='test_vit_dinov2',
                            **{**fused._TALE_SD_NOISE, 'slide_window': WINDOW, **kwargs}).eval()
    fill_weights(net)
    return net


def descriptors(net: fused.FusedBackbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused maps (B, C, h, w), their co-PCA fusion of the pair (2, C', h, w))."""
    names = ['fused', 'dino', 'us8', 'us5', 'us2']
    with torch.no_grad():
        maps = dict(zip(names, net.forward_intermediates(x, indices=names, intermediates_only=True)))
    a, b = fused.pair_co_pca({k: v[0] for k, v in maps.items() if k != 'fused'},
                             {k: v[1] for k, v in maps.items() if k != 'fused'}, [DIMS])
    return maps['fused'], torch.stack([a, b])


def nearest(pair: torch.Tensor) -> torch.Tensor:
    a, b = (F.normalize(p.flatten(1), dim=0) for p in pair)
    return (a.T @ b).argmax(1)


def main() -> None:
    torch.set_num_threads(2)
    x = images(SIDE)
    ref_fused, ref_pair = descriptors(model(), x)
    print(f'against their sliding window and posterior mean, 2 images of {SIDE} px, windows of {WINDOW} px:')
    sd = ref_fused.shape[1] - timm.create_model('test_vit_dinov2').embed_dim  # the SD half of the fused channels
    for label, kwargs in (('one pass (slide=False)', dict(slide=False)),
                          ("a posterior draw (latent='sample'), sliding", dict(latent='sample'))):
        got_fused, got_pair = descriptors(model(**kwargs), x)
        rel = [((g - r).norm() / r.norm()).item() for g, r in zip(got_fused, ref_fused)]
        rel_sd = [((g[:sd] - r[:sd]).norm() / r[:sd].norm()).item() for g, r in zip(got_fused, ref_fused)]
        same = (nearest(got_pair) == nearest(ref_pair)).sum().item()
        print(f'{label}: fused maps differ by {rel[0]:.2f} / {rel[1]:.2f} (relative L2; SD half {rel_sd[0]:.2f} / '
              f'{rel_sd[1]:.2f}); after co-PCA {same} of {ref_pair[0, 0].numel()} nearest neighbours agree')


if __name__ == '__main__':
    main()
