"""How far CleanDIFT's bfloat16 depth differs from our float32 depth (README, "Depth"): `python tools/depth_bf16.py`.

Their notebooks run everything in bfloat16: the depth bins `linspace(0.1, 10, 256)` become bf16 buffers, the probe
runs in bf16, and the learned timestep parameter is rounded to bf16 (254.25 -> 254). This script measures, with the
tiny random-weight `test_cleandift` (no download) on the sample image:

1. the bins themselves: the largest difference between the bf16 and float32 bin centres;
2. the probe in bf16 (bf16 bins) against float32 on the *same* float32 features (random probe weights, scaled so the
   bin distribution is as peaked as a trained probe's);
3. the whole predictor (model + probe) in bf16 against float32, with the timestep 254.25 that bf16 rounds to 254.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffbackbone  # noqa: F401  (registers the models)
from diffbackbone.depth import MAX_DEPTH, MIN_DEPTH, N_BINS, DepthPredictor, DepthProbe
from diffbackbone.data.images import open_image, to_tensor


def main() -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--seeds', type=int, default=3, help='random probes tried')
    p.add_argument('--logit-scale', type=float, default=8.0, help='probe weights scale (peakedness of the bins)')
    args = p.parse_args()

    bins32 = torch.linspace(MIN_DEPTH, MAX_DEPTH, N_BINS)
    bins16 = bins32.to(torch.bfloat16)
    print(f'bins: largest |bf16 - fp32| = {(bins16.float() - bins32).abs().max():.4f} m')

    image = to_tensor(open_image(Path(diffbackbone.__file__).parent / 'assets' / 'sample.jpg'))[None]
    torch.manual_seed(0)
    backbone = timm.create_model('test_cleandift', timestep=254.25).eval()
    x = torch.nn.functional.interpolate(image, size=(args.size,) * 2, mode='bilinear', align_corners=False)
    with torch.no_grad():
        feat = backbone.forward_intermediates(x, indices=['us6'], intermediates_only=True)[0]
    worst_probe = worst_all = 0.0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        probe = DepthProbe(feat.shape[1]).eval()
        with torch.no_grad():
            probe.conv_depth.weight.mul_(args.logit_scale)
            d32 = probe(feat)
            d16 = probe.to(torch.bfloat16)(feat.to(torch.bfloat16)).float()
            rel = ((d16 - d32).abs() / d32).max().item()
            worst_probe = max(worst_probe, rel)
            probe.float()
            full32 = DepthPredictor(backbone, probe, size=args.size).eval()
            out32 = full32.low_res(image)
            model16 = timm.create_model('test_cleandift', timestep=254.25).eval()
            model16.load_state_dict(backbone.state_dict())
            model16.timestep.data.fill_(model16.timestep.detach().bfloat16().float().item())  # theirs: 254.25 -> 254
            full16 = DepthPredictor(model16, DepthProbe(feat.shape[1]), size=args.size).to(torch.bfloat16).eval()
            full16.probe.load_state_dict(probe.state_dict())
            out16 = full16.low_res(image.to(torch.bfloat16)).float()
            rel_all = ((out16 - out32).abs() / out32).max().item()
            worst_all = max(worst_all, rel_all)
        print(f'probe seed {seed}: depth {d32.min():.3f}..{d32.max():.3f} m; bf16 probe on the same features: largest '
              f'relative difference {100 * rel:.2f} %; whole predictor in bf16 (timestep '
              f'{full16.backbone.timestep.item():g}): {100 * rel_all:.2f} %')
    print(f'largest relative depth difference: {100 * worst_probe:.2f} % (bf16 probe, same features), '
          f'{100 * worst_all:.2f} % (everything in bf16)')


if __name__ == '__main__':
    main()
