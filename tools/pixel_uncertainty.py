"""How far `eval pixel`'s uncertainty and labels, computed in chunks of 8192 pixels, are from DDPM-segmentation's
`predict_labels` run on the whole image at once (`tests/test_pixel_pictures._their_predict_labels`): 10 disagreeing
random pixel MLPs, 21 classes, 512 channels, a 256 x 256 label map, CPU.

    PYTHONPATH=. python tools/pixel_uncertainty.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from diffbackbone.evals import pixel  # noqa: E402
from test_pixel_pictures import _members, _their_predict_labels  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    size, dim, classes = 256, 512, 21
    maps = torch.randn(1, size, size, dim, generator=torch.Generator().manual_seed(0))
    members = _members(classes, dim, n=10)
    ours = pixel.predict_image(members, [maps], pixel.PixelSampler([(dim, size, size)], size))
    labels, top_k, js = _their_predict_labels(members, maps.reshape(-1, dim), (size, size))
    diff = (torch.from_numpy(ours.uncertainty).ravel() - js).abs()
    print(f'uncertainty max |diff| {diff.max():.2e} (mean uncertainty {js.mean():.3f}), score |diff| '
          f'{abs(ours.score - float(top_k)):.2e}, labels differing {(torch.from_numpy(ours.labels) != labels).sum()} '
          f'of {size * size}')


if __name__ == '__main__':
    main()
