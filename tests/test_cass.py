"""CASS (proxyclip/zoo/cass.py, docs/methods.md): the whole method against the float64 reference
written from its spec (tests/naive.py), on random tokens, on the tiny model and on ViT-B/16 + DINO
ViT-B/8 with random weights; each pitfall of the published code with a test that fails if it is got
wrong (the swapped head indices, keys not queries, the diagonal zeroed before the range mapping, one
query adjusted per cluster, the global min-max of the VFM keys); bad input."""

import copy
import itertools
from dataclasses import replace
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import naive
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.backbones import ClipBackbone
from proxyclip.last_block import BlockInputs
from proxyclip.zoo import cass

CLASSES = ["sky", "person; people", "horse"]
KNOBS = dict(global_weight=0.25, mean_vector_weight=0.04, h_threshold=0.09, eigenscaling=True, gaussian_std=5.0,
             k_eigen=20, rank=10, scale_factor=10.0, svd="randomized")


@pytest.fixture(scope="module")
def cass_segmenter():
    return Segmenter.from_config(tiny_config("method=cass", "vfm.feature=k"))


def _inputs(clip, seed=3, text=True, vfm_heads=None, points=None):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 1 + 20, 64, generator=g)  # a 4x5 grid
    feats = torch.randn(2, 8, 6, 7, generator=g) + 0.2  # keys of 2 heads of 4 on a 6x7 grid (resized to 4x5)
    t = F.normalize(torch.randn(4, 64, generator=g), dim=-1) if text else None
    rec = points if points is not None else {}

    def point(name, x):
        rec[name] = x
        return x

    x = BlockInputs(clip, tokens, (4, 5), feats, {}, (0, 2), point, text=t, vfm_heads=vfm_heads)
    return x, tokens, feats, t


# ---------------------------------------------------------------------------------------------- the whole method
@pytest.mark.parametrize("changes", [{}, dict(svd="exact", eigenscaling=False), dict(h_threshold=2.0, k_eigen=3),
                                     dict(global_weight=0.0, mean_vector_weight=0.5, rank=2, gaussian_std=1.0)])
def test_random_tokens_equal_the_reference(tiny_segmenter, changes):
    points = {}
    x, tokens, feats, text = _inputs(tiny_segmenter.clip, points=points)
    knobs = {**KNOBS, **changes}
    out = cass.cass_scores(x, **knobs)
    assert out.scores.shape == (2, 4, 4, 5)
    for i in range(2):
        ref = naive.own_result(tiny_segmenter.clip_model, tokens[i], (4, 5), feats[i], "cass",
                              {**knobs, "residual": False, "ffn": False}, text, {k: v[i] for k, v in points.items()})
        torch.testing.assert_close(out.scores[i].double(), ref["scores"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(points["attention.pattern"][i].double(), ref["pattern"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(points["cass.prior"][i].double(), ref["prior"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(points["cass.text"][i].double(), ref["text"], atol=1e-5, rtol=1e-5)


def test_the_tiny_model_equals_the_reference(cass_segmenter, rand_image):
    seg = cass_segmenter
    assert seg.vfm.heads == seg.clip.heads == 2  # the tiny VFM's keys split into CLIP's 2 heads
    enc = seg.encode(rand_image)
    assert len(enc.windows) > 1
    pred, cache = seg.run_with_cache(enc, CLASSES)
    knobs = naive.knobs_of("cass")
    torch.testing.assert_close(pred.scores.double(), naive.scores(seg, enc, pred.queries, "cass", knobs, cache),
                               atol=2e-5, rtol=1e-5)
    assert cache["cass.text"].shape[:2] == (len(enc.windows), 4)  # clustered over the 4 query names, not 3 classes
    # the memoized parts are reused: a decode from them equals one that computes them afresh, bit for bit
    assert any(k[0].startswith("cass.spectra") for k in enc.memo)
    assert torch.equal(seg.decode(enc, CLASSES).scores, seg.decode(replace(enc, memo={}), CLASSES).scores)


@pytest.mark.slow
def test_vit_b16_with_dino_b8_random_weights_equals_the_reference():
    """ViT-B/16 and DINO ViT-B/8 (12 heads each, random weights), one 112-px window. The spec's
    warning: with random weights the matching cost is often separable (every permutation costs the
    same), so the reference follows the decode's permutation after checking it is one of its optima.
    The text embeddings are the decode's (other tests compare those with open_clip's)."""
    seg = Segmenter.from_config(tiny_config("clip=vit_b16", "vfm=dino_vitb8", "vfm.feature=k", "method=cass",
                                            "protocol.short_side=112", "protocol.crop=112", "protocol.stride=112"))
    assert seg.vfm.heads == seg.clip.heads == 12
    img = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(2))
    enc = seg.encode(img)
    assert enc.vfm_features.shape == (1, 768, 14, 14) and enc.clip_grid == (7, 7)
    pred, cache = seg.run_with_cache(enc, ["sky", "horse"])
    ref = naive.own_result(seg.clip_model, enc.clip_tokens[0], enc.clip_grid, enc.vfm_features[0], "cass",
                          naive.knobs_of("cass"), cache["text.embeddings"].double(), naive.window_choices(cache, 0))
    torch.testing.assert_close(cache["clip.dense"][0].double(), ref["dense"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cache["scores.window"][0].double(), naive.upsample_window(ref["scores"], enc.windows[0],
                                                                                         enc.pad), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- pitfalls
def test_the_fused_graph_uses_the_swapped_indices():
    """CLIP head i fuses VFM head c[i] with w = 1 - cost[i, c[i]] (the published swap); with a 3-cycle
    the other reading (VFM head i into CLIP head c[i]) pairs other heads."""
    g = torch.Generator().manual_seed(0)
    n, h = 5, 3
    a = torch.randn(1, h, n, n, generator=g, dtype=torch.float64)
    mats = torch.randn(1, h, n, n, generator=g, dtype=torch.float64)
    factors = cass.low_rank(mats, 1.0, 3, "exact")
    cost = torch.tensor([[[0.9, 0.2, 0.7], [0.6, 0.8, 0.1], [0.3, 0.5, 0.4]]], dtype=torch.float64)
    cols = torch.tensor([[1, 2, 0]])
    m = cass.fused_graphs(a, factors, cols, cost, eigenscaling=False, scale_factor=10.0)

    def by_hand(clip_head, vfm_head, w):
        u, s, v = (f[0, vfm_head] for f in factors)
        low = u @ torch.diag(s) @ v.T
        low.fill_diagonal_(0.0)
        ai = a[0, clip_head]
        d = (low - low.min()) / (low.max() - low.min()) * (ai.max() - ai.min()) + ai.min()
        return (10 * w * d + ai) / (10 * w + 1)

    for i in range(h):
        torch.testing.assert_close(m[0, i], by_hand(i, int(cols[0, i]), 1 - float(cost[0, i, cols[0, i]])))
    unswapped = {int(cols[0, r]): by_hand(int(cols[0, r]), r, 1 - float(cost[0, r, cols[0, r]])) for r in range(h)}
    assert all(not torch.allclose(m[0, j], unswapped[j]) for j in range(h))


def test_the_matching_maximizes_the_spectral_distance():
    flat, peaked = [1.0, 1.0], [9.0, 1.0]  # p = (0.5, 0.5) vs (0.9, 0.1): distance 0.8; like with like: 0
    lam_vfm = F.normalize(torch.tensor([[flat, peaked]], dtype=torch.float64), dim=-1)
    lam_clip = F.normalize(torch.tensor([[flat, peaked]], dtype=torch.float64), dim=-1)
    cost = cass.spectral_cost(lam_vfm, lam_clip)
    torch.testing.assert_close(cost, torch.tensor([[[1.0, 0.2], [0.2, 1.0]]], dtype=torch.float64))
    assert cass.match_heads(cost).tolist() == [[1, 0]]  # flat with peaked: the most distant pairs


def test_a_separable_cost_makes_every_permutation_optimal():
    """cost[i, j] = a_i + b_j: every assignment costs the same (the spec's random-weights case), so the
    matching is decided by rounding; the references follow the decode's recorded choice (cass.assignment)
    after checking that it is one of their optima."""
    a, b = torch.tensor([0.3, 0.1, 0.7], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.05], dtype=torch.float64)
    cost = (a[:, None] + b[None, :]).double()
    totals = {sum(float(cost[i, p[i]]) for i in range(3)) for p in itertools.permutations(range(3))}
    assert max(totals) - min(totals) < 1e-12
    cols = cass.match_heads(cost[None])[0]
    assert sorted(cols.tolist()) == [0, 1, 2]


def test_keys_not_queries(tiny_segmenter):
    """CLIP's side reads keys: with the prior off (w_g = alpha = 0) the scores do not depend on W_q
    (only the window's CLS, i.e. the prior, does) and do depend on W_k."""
    def scores_with(part):
        model = copy.deepcopy(tiny_segmenter.clip_model)
        w = model.visual.transformer.resblocks[-1].attn.in_proj_weight
        d = w.shape[1]
        with torch.no_grad():
            if part is not None:
                w[part * d:(part + 1) * d] = torch.randn(d, d, generator=torch.Generator().manual_seed(5)) * 0.2
        x = _inputs(ClipBackbone(model, tiny_segmenter.clip.tokenizer))[0]
        return cass.cass_scores(x, **{**KNOBS, "global_weight": 0.0, "mean_vector_weight": 0.0}).scores

    base = scores_with(None)
    torch.testing.assert_close(scores_with(0), base)  # W_q replaced: the same
    assert not torch.allclose(scores_with(1), base, atol=1e-4)  # W_k replaced: different


def test_the_diagonal_is_zeroed_before_the_range_mapping():
    low = torch.tensor([[5.0, 1.0, 2.0], [1.0, 3.0, 0.5], [2.0, 0.5, 4.0]], dtype=torch.float64)
    factors = cass.low_rank(torch.linalg.cholesky(low)[None, None], 1.0, 3, "exact")  # G = L L^T = low
    a = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2], [0.5, 0.2, 1.0]], dtype=torch.float64)[None, None]
    cost = torch.tensor([[[0.75]]], dtype=torch.float64)  # w = 0.25
    m = cass.fused_graphs(a, factors, torch.tensor([[0]]), cost, eigenscaling=False, scale_factor=10.0)
    zeroed = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 0.0]], dtype=torch.float64)
    d = zeroed / 2.0  # onto [min A, max A] = [0, 1]
    torch.testing.assert_close(m[0, 0], (2.5 * d + a[0, 0]) / 3.5)
    mapped_first = (low - 0.5) / 4.5
    mapped_first.fill_diagonal_(0.0)
    assert not torch.allclose(m[0, 0], (2.5 * mapped_first + a[0, 0]) / 3.5)


def test_only_one_query_per_cluster_is_adjusted():
    t0 = F.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]), dim=0)
    t1 = F.normalize(torch.tensor([1.0, 0.05, 0.0, 0.0]), dim=0)  # the same cluster as t0
    t2 = torch.tensor([0.0, 0.0, 1.0, 0.0])
    text = torch.stack([t0, t1, t2])
    labels = cass.query_clusters(text, 0.1)
    assert labels[0] == labels[1] != labels[2]
    assert cass.query_clusters(text, 0.0).tolist() == [0, 1, 2] and len(set(cass.query_clusters(text, 3.0))) == 1
    prior = torch.tensor([[0.2, 0.5, 0.1]])  # i* = 1 in {0, 1}; 2 alone
    dense = F.normalize(torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0],
                                       [0.0, 0.0, 1.0, 1.0], [0.2, 0.0, 0.0, 1.0]]]), dim=-1)
    out = cass.adjust_text(text, labels, prior, dense, alpha=0.3)[0]
    assert torch.equal(out[0], t0)  # not the cluster's best by the prior: unchanged
    # t1's two best patches: 0 (cos 0.74) and 1 (0.67); t2's: 2 and 3
    for row, t, (p, q) in ((1, t1, (0, 1)), (2, t2, (2, 3))):
        m = F.normalize((dense[0, p] + dense[0, q]) / 2, dim=0)
        torch.testing.assert_close(out[row], F.normalize(0.7 * t + 0.3 * m, dim=0))


def test_vfm_keys_are_min_max_mapped_globally_onto_clips_key_range():
    feats = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.5], [1.0, 1.5]]]])  # (1, C=2, 2, 2)
    k = torch.tensor([-1.0, 3.0, 0.0, 2.0]).view(1, 1, 4, 1)  # CLIP keys' range [-1, 3]
    kd = cass.vfm_keys_on_grid(feats, (2, 2), k, heads=1)  # (1, 1, N=4, 2)
    expected = (feats[0].flatten(1).T.double() - 0.0) / 3.0 * 4.0 - 1.0  # one min and max over everything
    torch.testing.assert_close(kd[0, 0], expected)
    assert float(kd[..., 1].min()) > -1.0  # the narrow channel does not fill the range on its own


def test_eigenscaling_spectra_and_the_seeded_low_rank():
    torch.testing.assert_close(cass.eigenscale(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.5, 2.5, 4.5]))
    g = torch.Generator().manual_seed(1)
    for n, d in ((30, 4), (3, 6)):  # N > d (the d x d shortcut, zero tail) and N < d
        keys = torch.randn(2, 2, n, d, generator=g)
        lam = cass.top_spectra(keys, 0.5, 8)
        for b, h in itertools.product(range(2), range(2)):
            full = torch.linalg.eigvalsh(0.5 * keys[b, h].double() @ keys[b, h].double().T).flip(0)[:min(8, n)]
            torch.testing.assert_close(lam[b, h], full / full.norm(), atol=1e-12, rtol=1e-9)
    keys = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)  # two graphs G = 0.5 K K^T of rank 6
    graphs = 0.5 * keys @ keys.transpose(-1, -2)
    state = torch.random.get_rng_state()
    u1, s1, v1 = cass.low_rank(keys, 0.5, 4, "randomized")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    for i in range(2):  # = torch.svd_lowrank on the formed graph, its sketch drawn from seed 42
        torch.manual_seed(42)
        u, s, v = torch.svd_lowrank(graphs[i], q=4, niter=2)
        torch.testing.assert_close(u1[i] @ torch.diag(s1[i]) @ v1[i].T, u @ torch.diag(s) @ v.T, atol=1e-10, rtol=1e-9)
    torch.random.set_rng_state(state)
    u2, s2, v2 = cass.low_rank(keys, 0.5, 4, "randomized")
    assert torch.equal(s1, s2) and torch.equal(u1, u2)  # seeded: the same every time
    ue, se, ve = cass.low_rank(keys, 0.5, 4, "exact")
    torch.testing.assert_close(se, torch.linalg.svdvals(graphs)[:, :4])
    assert not torch.allclose(s1, se, atol=1e-9)  # two power iterations are not the exact SVD


# ---------------------------------------------------------------------------------------------- bad input
def test_vfm_features_that_are_not_keys_are_refused(tiny_segmenter, rand_image):
    with pytest.raises(ValueError, match=r"^method cass reads the VFM's attention keys per head \(vfm.feature=k\).*"
                                         r"vfm.feature=tokens"):
        Segmenter.from_config(tiny_config("method=cass"))
    with pytest.raises(ValueError, match="vfm.feature=q.*build it with vfm.feature=k"):
        Segmenter.from_config(tiny_config("method=cass", "vfm.feature=q"))
    enc = tiny_segmenter.encode(rand_image)  # ProxyCLIP's tokens
    with pytest.raises(ValueError, match=r"vfm.feature=k.*seg.for_method\('cass'\)"):
        tiny_segmenter.decode(enc, CLASSES, method="cass")
    other = tiny_segmenter.for_method("cass")  # the same models, the VFM read as keys
    assert other.vfm.model is tiny_segmenter.vfm.model and other.vfm.feature == "k"
    assert torch.isfinite(other.decode(other.encode(rand_image, reuse=enc), CLASSES, method="cass").scores).all()


def test_heads_that_differ_are_refused(tiny_segmenter, rand_image):
    seg = Segmenter.from_config(tiny_config("method=cass", "vfm.feature=k", "vfm.timm_kwargs.num_heads=4"))
    assert seg.vfm.heads == 4
    with pytest.raises(ValueError, match="the VFM's keys have 4 heads and CLIP's last block 2"):
        seg.predict(rand_image, CLASSES)
    x = _inputs(tiny_segmenter.clip, vfm_heads=3)[0]
    with pytest.raises(ValueError, match="3 heads"):
        cass.cass_scores(x, **KNOBS)
    x = _inputs(tiny_segmenter.clip)[0]
    x.vfm_features = x.vfm_features[:, :7]
    with pytest.raises(ValueError, match="7 key channels do not split into CLIP's 2 heads"):
        cass.cass_scores(x, **KNOBS)


def test_no_text_and_no_scipy_are_one_line_errors(tiny_segmenter, monkeypatch):
    with pytest.raises(ValueError, match="decode it with classes"):
        cass.cass_scores(_inputs(tiny_segmenter.clip, text=False)[0], **KNOBS)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"^method=cass needs scipy .*pip install 'proxyclip\[inside\]'$"):
        cass.cass_scores(_inputs(tiny_segmenter.clip)[0], **KNOBS)


def test_the_neighbourhood_prior_is_nonzero_only_where_expected():
    """Omega over the patches only (CLS dropped): the reference's Gaussian at one hand-computed entry."""
    omega = cass.gaussian_neighbourhood((2, 3), 2.0)[1:, 1:]
    assert math.isclose(float(omega[0, 5]), math.exp(-(1 + 4) / 8), rel_tol=1e-6)
