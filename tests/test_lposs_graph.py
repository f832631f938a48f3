"""proxyclip.zoo.lposs.graph_of: LPOSS's patch graph of an Encoded (notebook 08 draws a patch's
neighbours from it), against the float64 kNN graph of tests/naive_lposs.py built by hand."""

import pytest
import torch

import naive  # noqa: F401  (imports naive_lposs after itself: their circular import needs this order)
import naive_lposs
from proxyclip.zoo.lposs import graph_of


def test_graph_of_is_the_graph_lposs_propagates_over(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    knobs = dict(k=5, gamma=3.0, sigma=0.01, pix_dist_pow=1.0)
    w, grid = graph_of(enc, **knobs)
    n_win, c, gh, gw = enc.vfm_features.shape
    assert grid == (gh, gw) and w.shape == (n_win * gh * gw,) * 2
    feats, locs = [], []  # by hand: every window's patches, row-major, centres in resized-image pixels
    top, bottom, left, right = enc.pad
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        py, px = (y2 - y1 + top + bottom) / gh, (x2 - x1 + left + right) / gw
        for a in range(gh):
            for b in range(gw):
                v = enc.vfm_features[i, :, a, b].double()
                feats.append(v / v.norm())
                locs.append((y1 - top + py / 2 + a * py, x1 - left + px / 2 + b * px))
    ref = naive_lposs.knn_graph(torch.stack(feats), locs, **knobs)
    torch.testing.assert_close(w.double(), ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w, w.T) and (w.diagonal() == 0).all()
    # every patch's row holds at least its k - 1 other nearest patches (W = A + A^T, diagonal removed)
    assert ((w > 0).sum(1) >= knobs["k"] - 1).all()
    with pytest.raises(ValueError, match=r"lposs: k=999 neighbours, but this image has 32 patches"):
        graph_of(enc, **{**knobs, "k": 999})
