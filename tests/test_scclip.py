"""SC-CLIP (proxyclip/zoo/scclip.py, docs/methods.md): its own LOF against a hand loop and against
scikit-learn's (they differ), the repair on a non-square grid by hand, the whole method against the
float64 reference (tests/naive_scclip.py) on random tokens, the tiny CLIP and ViT-B/16 (random
weights, one 224 window), and each pitfall: S_mid unthresholded vs S_pre thresholded, the fusion
over blocks 3..9 (0-indexed outputs), the layer indices, a block index out of range."""

import copy

import pytest
import torch
import torch.nn.functional as F

import naive
import naive_scclip as ns
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.last_block import BlockInputs
from proxyclip.methods import METHODS
from proxyclip.parts import resid_pre
from proxyclip.zoo import scclip as sc

CLASSES = ["sky", "person; people", "horse"]
DEFAULTS = naive.knobs_of("scclip")


def _tokens(n=196, d=48, seed=0, planted=(5, 77, 150)):
    """Random tokens with a few planted far ones (outliers of any detector)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g)
    for i in planted:
        t[i] += 4.0 * torch.randn(d, generator=g)
    return t


# ---------------------------------------------------------------------------------------------- outliers
def test_lof_equals_the_hand_loop_and_is_not_scikit_learns():
    from sklearn.neighbors import LocalOutlierFactor

    differ = 0
    for seed in range(3):
        p = _tokens(seed=seed)
        ours = set(sc.outlier_tokens(p).nonzero().flatten().tolist())
        assert ours == ns.lof_outliers(p)  # the hand loop: squared distances, own k-distance, float32 quantile
        assert len(ours) == 196 - 1 - int(0.95 * 195) == 10  # contamination 0.05, strict >
        assert {5, 77, 150} <= ours
        torch.testing.assert_close(sc.local_outlier_factor(p), torch.tensor(ns.lof_values(p), dtype=torch.float64))
        lof = LocalOutlierFactor(n_neighbors=30, contamination=0.05)
        theirs = set((lof.fit_predict(p.double().numpy()) == -1).nonzero()[0].tolist())
        differ += theirs != ours
    assert differ > 0  # scikit-learn's LOF (Euclidean, the neighbour's k-distance, its own offset) differs


def test_outliers_batched_and_for_notebooks():
    p = torch.stack([_tokens(seed=s) for s in range(2)])
    batched = sc.outlier_tokens(p)
    assert batched.shape == (2, 196) and batched.dtype == torch.bool
    assert torch.equal(batched[1], sc.outlier_tokens(p[1]))


def test_norm_detector_is_the_ten_largest_norms():
    p = _tokens(planted=())
    ours = set(sc.norm_outliers(p).nonzero().flatten().tolist())
    norms = [float(r.norm()) for r in p]
    assert ours == set(sorted(range(196), key=lambda i: -norms[i])[:10]) == ns.norm_outliers(p)


def test_identical_tokens_have_no_outlier_and_stay():
    p = torch.ones(2, 12, 8)
    mask = sc.outlier_tokens(p)
    assert not mask.any() and ns.lof_outliers(p[0]) == set()
    assert torch.equal(sc.repair(p, mask, (3, 4)), p)


# ---------------------------------------------------------------------------------------------- repair
def test_repair_on_a_non_square_grid_by_hand():
    """3 x 5 grid, token i has value i; outliers 0, 6, 7, 14. Token i is at row i div 5, column
    i mod 5 (i div gh = i div 3 would put 7 at (2, 1): SC-CLIP's bug on non-square windows)."""
    f = torch.arange(15, dtype=torch.float32).reshape(1, 15, 1)
    mask = torch.zeros(1, 15, dtype=torch.bool)
    mask[0, [0, 6, 7, 14]] = True
    out = sc.repair(f, mask, (3, 5))[0, :, 0]
    expected = torch.arange(15, dtype=torch.float32)
    expected[0] = (1 + 5) / 2  # (0,0): neighbours 1, 5 (6 is an outlier)
    expected[6] = (1 + 2 + 5 + 10 + 11 + 12) / 6  # (1,1): 0 and 7 are outliers
    expected[7] = (1 + 2 + 3 + 8 + 11 + 12 + 13) / 7  # (1,2): 6 is an outlier
    expected[14] = (8 + 9 + 13) / 3  # (2,4): a corner
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.double(), ns.repair(f[0].double(), {0, 6, 7, 14}, (3, 5))[:, 0])
    # the transposed grid (5 x 3) is another set of neighbours: the grid's width matters
    assert not torch.allclose(sc.repair(f, mask, (5, 3))[0, :, 0], out)


def test_an_outlier_without_valid_neighbour_stays():
    f = torch.tensor([[[1.0], [2.0], [7.0]]])
    mask = torch.tensor([[True, True, False]])
    out = sc.repair(f, mask, (1, 3))
    assert out[0, :, 0].tolist() == [1.0, 7.0, 7.0]  # token 0's only neighbour is an outlier: kept


# ---------------------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("outliers", ["lof", "norm"])
def test_random_tokens_on_a_non_square_grid_equal_the_reference(tiny_segmenter, outliers):
    """6 x 8 patches (48 tokens: the LOF has its 30 neighbours), planted outliers, tiny CLIP."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 49, 64, generator=g) + 0.8 * torch.randn(1, 1, 64, generator=g)  # cosines ~ 0.4
    tokens[:, 1 + torch.tensor([4, 20, 41])] *= 6.0
    s = ns.cosine(tokens[0, 1:].double())
    assert 0.2 < float((s >= 0.4).double().mean()) < 0.8  # the 0.4 threshold keeps some entries, not all
    x = BlockInputs(tiny_segmenter.clip, tokens, (6, 8), None, {}, (0, 2), lambda n, t: t)
    knobs = naive.tiny_knobs("scclip", outliers=outliers)
    out = sc.scclip_block(x, **{k: knobs[k] for k in METHODS["scclip"].knob_names})
    assert out.cls is False and tuple(out.grid) == (6, 8) and out.tokens.shape == (2, 48, 64)
    for i in range(2):
        ref, _, _ = ns.reference(tiny_segmenter.clip_model, {1: tokens[i]}, (6, 8), knobs)
        torch.testing.assert_close(out.tokens[i].double(), ref, atol=2e-5, rtol=1e-5)
    if outliers == "lof":
        found = sc.outlier_tokens(tokens[:, 1:])
        assert found[:, [4, 20, 41]].all() and int(found[0].sum()) == 48 - 1 - int(0.95 * 47)


@pytest.fixture(scope="module")
def vitb():
    """ViT-B/16 with random weights, one 224 window: the encode of a Segmenter configured scclip
    (``plain``), the same with every block output kept (``enc``), and the reference's Z (N, D) at
    the defaults. The image is smooth (gradients plus noise): with random weights a noise image
    gives near-orthogonal tokens, where the 0.4 thresholds would keep only the diagonal."""
    seg = Segmenter.from_config(tiny_config("clip=vit_b16", "weights=random", "method=scclip",
                                            "protocol.short_side=224", "protocol.crop=224", "protocol.stride=224"))
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    img = (torch.stack([yy, xx, (yy + xx) / 2]) + 0.3 * torch.rand(3, 224, 224, generator=g)).clamp(0, 1)
    plain = seg.encode(img)
    enc = seg.encode(img, keep=[resid_pre(i) for i in range(1, 12)])
    layers = {**naive.window_layers(enc, 0), 11: enc.clip_tokens[0]}
    z, _, _ = ns.reference(seg.clip_model, layers, (14, 14), DEFAULTS)
    return seg, plain, enc, layers, z


def _head(model, z):
    visual = copy.deepcopy(model.visual).double()
    with torch.no_grad():
        e = F.normalize(visual.ln_post(z) @ visual.proj, dim=-1)
    return e.T.reshape(e.shape[1], 14, 14)


def test_vit_b16_equals_the_reference_and_keeps_blocks_4_to_10(vitb):
    seg, plain, enc, layers, z = vitb
    assert sorted(plain.layers) == sorted(resid_pre(i) for i in range(4, 11))  # outputs of blocks 3..9 (+ 8)
    torch.testing.assert_close(plain.layers[resid_pre(9)], enc.layers[resid_pre(9)])
    for i in (4, 9):  # S_post (block 3's output) and S_mid (block 8's): entries on both sides of 0.4
        kept = float((ns.cosine(layers[i][1:].double()) >= 0.4).double().mean())
        assert 0.2 < kept < 0.9, (i, kept)
    pred, cache = seg.run_with_cache(plain, CLASSES, names=["clip.last_block_output", "clip.dense", "scclip.outliers",
                                                            "scclip.prior"])
    torch.testing.assert_close(cache["clip.last_block_output"][0].double(), z, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cache["clip.dense"][0].double(), _head(seg.clip_model, z), atol=2e-5, rtol=1e-5)
    found = ns.lof_outliers(layers[11][1:])
    assert cache["scclip.outliers"].shape == (1, 14, 14) and len(found) == 10
    assert set(cache["scclip.outliers"][0].flatten().nonzero().flatten().tolist()) == found
    # the prior is the softmax of the *unthresholded* S_mid of the repaired output of block 8
    s_mid = ns.cosine(ns.repair(layers[9].double()[1:], found, (14, 14)))
    torch.testing.assert_close(cache["scclip.prior"][0].double(), ns.prior(s_mid), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(pred.scores).all()


def _block_output(seg, enc, **knobs):
    _, cache = seg.run_with_cache(enc, CLASSES, names=["clip.last_block_output"], **knobs)
    return cache["clip.last_block_output"][0].double()


def test_the_prior_comes_from_s_mid_not_s_pre(vitb):
    seg, plain, enc, layers, z = vitb
    wrong, _, _ = ns.reference(seg.clip_model, layers, (14, 14), DEFAULTS, prior_from="s_pre")
    assert (wrong - z).abs().max() > 1e-2  # 400 x the method's distance to the right one
    torch.testing.assert_close(_block_output(seg, enc), z, atol=1e-4, rtol=1e-5)


def test_the_fusion_sums_the_outputs_of_blocks_3_to_9(vitb):
    """multi 3..10 (exclusive) = x_4..x_10 in the paper's 1-indexed words; not 2..9, not 3..10."""
    seg, plain, enc, layers, z = vitb
    for fusion in (range(2, 10), range(3, 11)):
        wrong, _, _ = ns.reference(seg.clip_model, layers, (14, 14), DEFAULTS, fusion=fusion)
        assert (wrong - z).abs().max() > 1e-1
    torch.testing.assert_close(_block_output(seg, enc), z, atol=1e-4, rtol=1e-5)
    by_hand = sum(layers[i].double() for i in (4, 5, 6, 7, 8, 9, 10))  # tokens entering blocks 4..10
    assert torch.equal(sum(layers[i + 1].double() for i in range(3, 10)), by_hand)


@pytest.mark.parametrize("knob,value", [("pre_adjust", 5), ("post_adjust", 7), ("multi_start", 1),
                                        ("multi_end", 11), ("res_cls", 0.0), ("outliers", "norm")])
def test_each_knob_on_vit_b16_gives_the_reference(vitb, knob, value):
    seg, plain, enc, layers, z = vitb
    ref, _, _ = ns.reference(seg.clip_model, layers, (14, 14), {**DEFAULTS, knob: value})
    torch.testing.assert_close(_block_output(seg, enc, **{knob: value}), ref, atol=1e-4, rtol=1e-5)
    assert (ref - z).abs().max() > 1e-2


def test_the_lof_is_computed_once_per_encode(vitb, monkeypatch):
    seg = vitb[0]
    enc = seg.encode(torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(5)))
    calls = []
    real = sc.outlier_tokens
    monkeypatch.setattr(sc, "outlier_tokens", lambda t: calls.append(1) or real(t))
    a = seg.decode(enc, CLASSES)
    b = seg.decode(enc, CLASSES, res_cls=0.1)
    assert len(calls) == 1 and not torch.equal(a.scores, b.scores)


# ---------------------------------------------------------------------------------------------- bad input
def test_a_block_index_out_of_range_is_one_clear_error(vitb):
    seg, enc = vitb[0], vitb[2]
    cases = [({"pre_adjust": 11}, r"^pre_adjust=\[11\]: block 11 is out of range; this CLIP has blocks 0..11 "
                                  r"\(0-indexed, the last one excluded\)$"),
             ({"multi_end": 12}, r"^multi_end=12: .*multi_end must be in 4..11"),
             ({"multi_start": 6, "multi_end": 6}, r"^multi_end=6: ")]
    for knobs, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            seg.decode(enc, CLASSES, **knobs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^pre_adjust=\[8\]: block 8 is out of range; this CLIP has blocks 0..1"):
        Segmenter.from_config(tiny_config("method=scclip"))  # the defaults name blocks the tiny CLIP lacks
