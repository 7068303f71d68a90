"""How far a multi-model backbone's member input is from Meng et al.'s (issue #28): theirs loads the image once per
model at that model's size (`diffusion_feature.py`: `Image.resize((img_size, img_size))`, Pillow's bicubic, then 8-bit
to [-1, 1]); ours gets one input tensor (our loader: the same bicubic resize, to 1024 for `ours_xl_t`) and resizes it
for a member of another size (`multi.py`: bicubic, antialiased, in float; bilinear before). Measured on the sample image: the 512-px
input of the SD1.5 member, and the effect on its `ours_xl_t` taps (the tiny random-weight `test_dift` with
`tests/golden_taps.fill_weights`, t = 50, each tap resized to the 128 x 128 grid as the multi model does), as
relative RMS; the 1024-px members' inputs are compared too.

    PYTHONPATH=. python tools/multi_resize.py
"""
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from diffbackbone.data.images import load_image, open_image, to_tensor  # noqa: E402
from diffbackbone.models.multi import _SD15_AMALGAMATION, UP_CROSS_STRIDES  # noqa: E402
from golden_taps import fill_weights  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()


def main() -> None:
    torch.set_num_threads(2)
    sample = ROOT / 'diffbackbone' / 'assets' / 'sample.jpg'
    full = load_image(sample, 1024)[None]  # the multi model's input
    theirs_1024 = to_tensor(open_image(sample).resize((1024, 1024)))[None]
    ours = F.interpolate(full, size=(512, 512), mode='bicubic', align_corners=False, antialias=True)
    theirs = to_tensor(open_image(sample).resize((512, 512)))[None]
    print(f'1024-px members: input max |diff| {(full - theirs_1024).abs().max():.2e}')
    linear = F.interpolate(full, size=(512, 512), mode='bilinear', align_corners=False, antialias=True)
    print(f'512-px member: input relative RMS {rel(theirs, ours):.2e}, max |diff| {(theirs - ours).abs().max():.3f} '
          f'(of [-1, 1]); bilinear antialiased (before): {rel(theirs, linear):.2e} (sample image '
          f'{open_image(sample).size[0]} x {open_image(sample).size[1]})')
    with tempfile.TemporaryDirectory() as tmp:  # other image sizes: the sample resized (Lanczos) and saved as PNG
        for w, h in ((800, 600), (1600, 1200), (333, 500)):
            path = Path(tmp) / f'{w}x{h}.png'
            open_image(sample).resize((w, h), Image.LANCZOS).save(path)
            full_wh, theirs_wh = load_image(path, 1024)[None], to_tensor(open_image(path).resize((512, 512)))[None]
            got = {mode: rel(theirs_wh, F.interpolate(full_wh, size=(512, 512), mode=mode, align_corners=False,
                                                      antialias=True)) for mode in ('bicubic', 'bilinear')}
            print(f'512-px member, a {w} x {h} image: input relative RMS {got["bicubic"]:.2e} (bilinear: '
                  f'{got["bilinear"]:.2e})')
    model = timm.create_model('test_dift', timestep=50).eval()
    fill_weights(model)
    cross = [t.name for t in model.all_taps if t.name.startswith('up-') and t.name.endswith('-cross-map')
             and t.reduction in UP_CROSS_STRIDES]
    taps = list(_SD15_AMALGAMATION) + cross
    with torch.no_grad():
        a = model.forward_intermediates(theirs, indices=taps, intermediates_only=True)
        b = model.forward_intermediates(ours, indices=taps, intermediates_only=True)
    grid = [rel(F.interpolate(x, (128, 128), mode='bilinear'), F.interpolate(y, (128, 128), mode='bilinear'))
            for x, y in zip(a, b)]
    print('test_dift taps at 512 px (their input vs ours), relative RMS on the 128 grid: '
          + ', '.join(f'{r:.2e}' for r in grid[:len(_SD15_AMALGAMATION)])
          + f'; cross-attention maps {min(grid[len(_SD15_AMALGAMATION):]):.2e} to {max(grid[len(_SD15_AMALGAMATION):]):.2e}')


if __name__ == '__main__':
    main()
