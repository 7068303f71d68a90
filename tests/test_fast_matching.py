"""`eval spair`'s batched matching (`UpsampledTarget`, `sample_points`, `evaluate(fast=True)`) against the reference
path that builds the upsampled maps: the same PCK on planted sets, the same matches wherever the reference's best
pixel is not a tie to float rounding, and the benchmark's own check."""
import pytest
import torch

from diffbackbone.correspondence import (UpsampledTarget, normalised_map, point_features, sample_points,
                                         similarity_argmax)
from diffbackbone.evals import spair
from diffbackbone.evals.spair_data import load_pairs
from test_spair import planted, small  # noqa: F401  (fixtures)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def test_planted_pairs_same_scores(planted):  # noqa: F811  (pytest fixtures)
    root, feats = planted
    pairs = load_pairs(root)
    fn = lambda cat, names: {n: feats[n] for n in names}  # noqa: E731
    fast, ref = spair.evaluate(pairs, fn, fast=True), spair.evaluate(pairs, fn, fast=False)
    assert fast.pairs == ref.pairs
    assert fast.summary() == pytest.approx(spair.evaluate(pairs, fn).summary())


def test_same_matches_as_reference_except_float_ties():
    g = torch.Generator().manual_seed(0)
    compared = differing = 0
    for _ in range(30):
        c = int(torch.randint(3, 40, (1,), generator=g))
        h, w = (int(v) for v in torch.randint(3, 10, (2,), generator=g))
        size = tuple(int(v) for v in torch.randint(20, 70, (2,), generator=g))
        src, trg = torch.randn(c, h + 1, w + 2, generator=g), torch.randn(c, h, w, generator=g)
        pts = [(int(torch.randint(0, size[0], (1,), generator=g)), int(torch.randint(0, size[1], (1,), generator=g)))
               for _ in range(8)]
        ref_vecs = point_features(src, pts, size)
        vecs = sample_points(src, pts, size)
        torch.testing.assert_close(vecs, ref_vecs, rtol=1e-5, atol=1e-5)
        sims, ref = similarity_argmax(ref_vecs, normalised_map(trg, size), size)
        target = UpsampledTarget(trg, size)
        torch.testing.assert_close(target.similarity(vecs), sims, rtol=1e-4, atol=1e-4)
        got = target.argmax(vecs, chunk=3)
        for k in range(len(pts)):
            compared += 1
            if not torch.equal(got[k], ref[k]):
                differing += 1
                (x, y), (rx, ry) = got[k].tolist(), ref[k].tolist()
                assert sims[k, ry, rx] - sims[k, y, x] <= 1e-6  # a tie in the reference itself
    assert compared == 240 and differing < compared // 5


def test_fast_path_same_pck_on_random_pairs(small):  # noqa: F811  (pytest fixtures)
    """The CLI's features are random here: same PCK by both paths (ties do not move a match across a threshold)."""
    g = torch.Generator().manual_seed(3)
    pairs = load_pairs(small)
    feats = {n: torch.randn(16, 6, 5, generator=g) for n in ('a.jpg', 'b.jpg', 'c.jpg', 'd.jpg')}
    fn = lambda cat, names: {n: feats[n] for n in names}  # noqa: E731
    assert spair.evaluate(pairs, fn, fast=True).pairs == spair.evaluate(pairs, fn, fast=False).pairs


def test_bench_match_runs(capsys):
    from diffbackbone.bench import match

    assert match.main(['--pairs', '3', '--channels', '32', '--map', '12', '--keypoints', '5', '--repeat', '1']) == 0
    out = capsys.readouterr().out
    assert 'reference' in out and 'batched' in out and 'x faster' in out and 'same PCK counts in 3/3' in out
