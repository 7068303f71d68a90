"""How far Meng et al.'s float16 UNet is from our float32 one on `eval pixel`'s features (issue #27.4), on tiny
random-weight models (`tests/golden_taps.fill_weights`): gdf_practical taps at meng_t=50, each resampled as their
pixel task does (nearest to the largest tap, then bilinear to 256), relative RMS difference float16 vs float32.

    PYTHONPATH=. python tools/pixel_fp16.py
"""
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import diffbackbone  # noqa: E402,F401
from golden_taps import fill_weights, images  # noqa: E402


def resampled(maps: list[torch.Tensor], size: int = 256) -> list[torch.Tensor]:
    largest = max(m.shape[-1] for m in maps)
    return [F.interpolate(F.interpolate(m, largest).float(), (size, size), mode='bilinear') for m in maps]


def main() -> None:
    torch.set_num_threads(4)
    for name in ('test_dift', 'test_sdxl'):
        model = timm.create_model(name, meng_t=50).eval()
        fill_weights(model)
        x = images(128)
        names = model.tap_names(all=True)
        taps = list(model.presets['gdf_practical'])
        assert all(t in names or any(t in a.aliases for a in model.all_taps) for t in taps)
        with torch.no_grad():
            fp32 = resampled(model.forward_intermediates(x, indices=taps, intermediates_only=True))
            half = model.half()
            fp16 = resampled(half.forward_intermediates(x.half(), indices=taps, intermediates_only=True))
        rel = [((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item() for a, b in zip(fp32, fp16)]
        print(f'{name} gdf_practical, float16 vs float32 UNet, relative RMS per tap: '
              + ', '.join(f'{r:.2e}' for r in rel))


if __name__ == '__main__':
    main()
