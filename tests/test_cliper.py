"""CLIPer (proxyclip/zoo/cliper.py) against a float64 reference written from its equations
(tests/naive_cliper.py): the whole decode on the tiny models (whole image and sliding windows,
compensation none and dino), its decision as a naive loop of the official rule, and each pitfall
of the method (the Sinkhorn carry, the threshold write-through, right- vs left-multiplication, the
two LayerNorms, the empty rows)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import naive
import naive_cliper as N
from conftest import tiny_config
from proxyclip import Segmenter, compose_config
from proxyclip.decision import decide
from proxyclip.encoded import Encoded
from proxyclip.methods import get_method
from proxyclip.parts import method_parts
from proxyclip.text import parse_classes
from proxyclip.zoo import cliper as C

CLASSES = ["sky", "person; people", "horse"]
Q2C = [0, 1, 1, 2]
QUERIES = ["sky", "person", "people", "horse"]
# continuous values (no gate, no threshold): the values are pred / max * score, nothing clipped
SMOOTH = {"score_thr": 0.0, "bkg_thre": 0.0, "is_normalize": False}


@pytest.fixture(scope="module")
def segs():
    """Whole image (crop null: one window) and sliding (32-px windows, stride 16: 2 windows of 2x2
    patches on a 32x45 image whose second window is 13 px off a patch multiple)."""
    base = ("method=cliper", "protocol.short_side=32")
    return {"whole": Segmenter.from_config(tiny_config(*base)),
            "sliding": Segmenter.from_config(tiny_config(*base, "protocol.crop=32", "protocol.stride=16")),
            "aligned": Segmenter.from_config(tiny_config(*base, "protocol.crop=32", "protocol.stride=16",
                                                         "protocol.short_side=48")),
            "perturbed": perturb_layer_norms(Segmenter.from_config(tiny_config(*base, "weights.seed=1")))}


def perturb_layer_norms(seg, seed=5):
    """Random weights and biases for every LayerNorm of the vision tower: at initialization they
    are (1, 0), where ln(ln(x)) = ln(x) and the two-LayerNorm pitfall would be invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in seg.clip_model.visual.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return seg


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(3))


def knobs(**changes):
    return naive.knobs_of("cliper", **changes)


def decode(seg, enc, k, classes=CLASSES):
    return seg.decode(enc, classes, **{n: k[n] for n in get_method("cliper").knob_names})


CASES = [
    ("whole", SMOOTH),
    ("whole", {**SMOOTH, "compensation": "dino"}),
    ("whole", {**SMOOTH, "carry_normalization": False, "attention_thr": 0.5}),
    ("whole", {**SMOOTH, "fuse_feature": False, "select_layer": 0}),
    ("whole", {**SMOOTH, "background_class": False, "select_layer": -2, "level_logit_scale": 30.0}),
    ("whole", {}),  # the YAML's (VOC21) values: gate, normalization, bkg_thre
    ("perturbed", SMOOTH),  # LayerNorms that are not the identity-like (1, 0) of an initialized model
    ("sliding", SMOOTH),
    ("sliding", {**SMOOTH, "compensation": "dino", "attention_thr": 0.3}),
    ("aligned", {**SMOOTH, "carry_normalization": False}),
    ("sliding", {"bkg_thre": 0.3, "score_thr": 0.2}),
]


@pytest.mark.parametrize("unit,changes", CASES, ids=[f"{u}-{'-'.join(f'{k}={v}' for k, v in c.items())}"
                                                     for u, c in CASES])
def test_decode_equals_the_reference(segs, image, unit, changes):
    seg = segs[unit]
    enc = seg.encode(image)
    assert (len(enc.windows) > 1) == (unit in ("sliding", "aligned"))
    k = knobs(**changes)
    pred = decode(seg, enc, k)
    ref = N.reference(seg, enc, QUERIES, Q2C, k)
    torch.testing.assert_close(pred.scores.double(), ref["values"], atol=2e-5, rtol=1e-4)
    # the values carry information (not all gated away)
    assert float(ref["values"][1:].amax()) > 0 and float(ref["pred"].std()) > 0


def test_labels_follow_the_official_rule(segs, image):
    """With one name per class, the pipeline's arg-max of the returned values (logit_scale 1,
    prob_thd 0) is the label of step 10's loop, for bkg_thre > 0 and bkg_thre = 0."""
    classes = ["sky", "person", "horse"]
    for unit, changes in (("whole", {}), ("whole", {"bkg_thre": 0.0, "score_thr": 0.2}),
                          ("sliding", {"bkg_thre": 0.5, "is_normalize": True, "score_thr": 0.0})):
        seg = segs[unit]
        enc = seg.encode(image)
        k = knobs(**changes)
        pred = decode(seg, enc, k, classes)
        ref = N.reference(seg, enc, classes, [0, 1, 2], k)
        assert torch.equal(pred.labels, ref["labels"]), (unit, changes)


@pytest.mark.parametrize("bkg,normalize,score_thr", [(0.3, False, 0.4), (0.0, False, 0.4), (0.5, True, 0.0),
                                                     (0.0, True, 0.9)])
def test_decision_values_argmax_is_step_10(bkg, normalize, score_thr):
    g = torch.Generator().manual_seed(int(bkg * 10 + normalize))
    pred = torch.rand(4, 9, 11, generator=g, dtype=torch.float64)
    pred[1, :4] = 0.0  # zeros and exact ties
    pred[2] = pred[3]
    seg_max = torch.rand(4, generator=g, dtype=torch.float64) * 1.5
    seg = seg_max[:, None, None].expand(4, 9, 11).clone()
    k = {"score_thr": score_thr, "bkg_thre": bkg, "is_normalize": normalize}
    for bgc in (True, False):
        labels, values = N.decision(pred, seg, k, bgc)
        got = C.decision_values(pred, seg_max, score_thr, bkg, normalize, bgc)
        torch.testing.assert_close(got, values, atol=1e-12, rtol=1e-10)
        if bgc:
            names = ["background"] + [f"c{i}" for i in range(4)]
            _, pl = decide(got, parse_classes(names), 1.0, 0.0)
            assert torch.equal(pl, labels)


def test_decode_from_a_stored_encode_equals_predict(segs, image, tmp_path):
    seg = segs["sliding"]
    k = knobs(compensation="dino")
    args = {n: k[n] for n in get_method("cliper").knob_names}
    torch.save(seg.encode(image).to_dict(), tmp_path / "enc.pt")
    stored = Encoded.from_dict(torch.load(tmp_path / "enc.pt", weights_only=False))
    torch.testing.assert_close(seg.decode(stored, CLASSES, **args).scores, seg.predict(image, CLASSES, **args).scores)


def test_the_units_are_computed_once_per_encode(segs, image, monkeypatch):
    seg = segs["sliding"]
    enc = seg.encode(image)
    calls = []
    real = C.unit_state
    monkeypatch.setattr(C, "unit_state", lambda clip, xs: calls.append(1) or real(clip, xs))
    for thr in (0.1, 0.4):
        decode(seg, enc, knobs(attention_thr=thr))
    assert len(calls) == 1 + len(enc.windows)  # the whole image and each window, once


# ---------------------------------------------------------------------------------------------- pitfalls
def test_sinkhorn_rounds_carry_across_levels():
    s0 = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    carried = C.level_patterns(s0, 3, carry=True)
    single = C.level_patterns(s0, 3, carry=False)
    for h in range(2):
        s = s0[h]
        for j in range(3):
            s = N.sinkhorn_round(s)
            torch.testing.assert_close(carried[j][h], N.fused(s))  # level j: j + 1 rounds
            torch.testing.assert_close(single[j][h], N.fused(N.sinkhorn_round(s0[h])))
    assert float((carried[2] - single[2]).abs().max()) > 1e-6
    assert torch.equal(s0, s0.clone())  # the caller's S is not touched


def test_the_threshold_writes_through_into_the_averaged_stack():
    g = torch.Generator().manual_seed(1)
    stack = torch.rand(3, 2, 5, generator=g, dtype=torch.float64)
    a_bar = torch.rand(5, 5, generator=g, dtype=torch.float64)
    got = C.aggregate(stack, a_bar, -1, 0.6)
    s = stack[-1].clone()
    for c in range(2):
        m = float(s[c].max())
        for i in range(5):
            if s[c, i] < 0.6 * m:
                s[c, i] = 0.0
    want = torch.zeros(2, 5, dtype=torch.float64)
    for j in range(5):
        for i in range(5):
            want[:, j] += s[:, i] * a_bar[i, j]
    want += (stack[0] + stack[1] + s) / 3
    torch.testing.assert_close(got, want)
    untouched = s @ a_bar + stack.mean(0)  # the mean over the unthresholded stack
    assert float((got - untouched).abs().max()) > 1e-3
    from_left = s @ a_bar.T + (stack[0] + stack[1] + s) / 3
    assert float((got - from_left).abs().max()) > 1e-3  # A-bar from the right, not the left


def test_dino_attention_propagates_from_the_left():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 3, 4, generator=g)
    av = C.dino_attention(feats).double()
    f = feats.flatten(1).T.double()
    f = f / f.norm(dim=1, keepdim=True)
    sv = f @ f.T
    mu = float(sv.mean())
    for i in range(12):
        row = [3 * (float(sv[i, j]) - 1.2 * mu) for j in range(12)]
        kept = [j for j in range(12) if row[j] >= 0] or [i]
        z = sum(torch.tensor(row[j]).exp() for j in kept)
        for j in range(12):
            want = float(torch.tensor(row[j]).exp() / z) if j in kept else 0.0
            assert abs(float(av[i, j]) - want) < 1e-6
    assert float((av - av.T).abs().max()) > 1e-3  # not symmetric: left and right differ
    # every row's own entry is kept (cos 1 >= 1.2 mean here) and rows sum to 1
    torch.testing.assert_close(av.sum(1), torch.ones(12, dtype=torch.float64))


def test_an_empty_row_keeps_its_diagonal_not_nan():
    """S with a token whose row and column are tiny: its row of B is all <= the column means (0/0
    in the official code); here it keeps its diagonal, and every later level stays finite."""
    s = torch.ones(1, 5, 5, dtype=torch.float64)
    s[0, 0, :] = 1e-3
    s[0, :, 0] = 1e-3
    b = 0.5 * (s + s.transpose(-1, -2))
    assert bool(((b - b.mean(-2, keepdim=True)) <= 0)[0, 0].all())  # the NaN case of the official code
    a = C.fused_pattern(s)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a[0, 0], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(a[0], N.fused(s[0]))
    for p in C.level_patterns(s, 4, carry=True):
        assert bool(torch.isfinite(p).all())


def test_levels_before_the_last_get_two_layer_norms(segs, image):
    seg = segs["perturbed"]
    enc = seg.encode(image)
    clip = seg.clip
    xs = [enc.layers["clip.blocks.0.resid_pre"][0], enc.clip_tokens[0]]
    _, values = C.unit_state(clip, xs)
    last = clip.last_block
    d = clip.width

    def v_of(u):
        return (u @ last.attn.in_proj_weight[2 * d:].T + last.attn.in_proj_bias[2 * d:]).double()

    twice = v_of(last.ln_1(clip.block(0).ln_1(xs[0])))
    once = v_of(last.ln_1(xs[0]))
    heads = clip.heads
    got0 = values[0].transpose(0, 1).reshape(xs[0].shape[0], d).double()
    torch.testing.assert_close(got0, twice, atol=1e-5, rtol=1e-5)
    assert float((got0 - once).abs().max()) > 1e-3
    got1 = values[1].transpose(0, 1).reshape(xs[1].shape[0], d).double()
    torch.testing.assert_close(got1, v_of(last.ln_1(xs[1])), atol=1e-5, rtol=1e-5)  # the last level: one
    assert heads == values.shape[1]


def test_window_offsets_on_the_whole_grid(segs, image):
    seg = segs["aligned"]  # 48 x 67 resized: windows 32 px at stride 16, the last 3 px off a multiple
    enc = seg.encode(image)
    x = type("X", (), {"windows": enc.windows, "pad": enc.pad})()
    h, w = enc.resized_size
    pad = N.symmetric_pad(h, w, 16)
    whole = ((h + pad[0] + pad[1]) // 16, (w + pad[2] + pad[3]) // 16)
    offs = C.window_offsets(x, pad, enc.clip_grid, whole, 16)
    assert [o for o in offs if o[0] == 0][:3] == [(0, 0), (0, 1), (0, 2)]
    assert all(0 <= oy <= whole[0] - 2 and 0 <= ox <= whole[1] - 2 for oy, ox in offs)
    assert offs[-1] == (whole[0] - 2, whole[1] - 2)


# ---------------------------------------------------------------------------------------------- config
def test_parts_are_every_blocks_input():
    meth = get_method("cliper")
    k = knobs()
    assert method_parts(meth, k, 12) == tuple(f"clip.blocks.{i}.resid_pre" for i in range(12))
    assert meth.level == "image" and meth.needs_vfm


@pytest.mark.parametrize("change,match", [
    ({"select_layer": 2}, r"cliper select_layer=2: this run has 2 levels .*expected -2..1"),
    ({"fuse_feature": False, "select_layer": -2}, r"select_layer=-2: this run has 1 level \(fuse_feature off\)"),
    ({"compensation": "sd"}, r"compensation must be one of none, dino, got 'sd'"),
    ({"attention_thr": 1.5}, r"attention_thr must be a number >= 0 and <= 1, got 1.5"),
    ({"level_logit_scale": 0}, r"level_logit_scale must be a number > 0"),
])
def test_bad_knob_values_are_one_clear_error(segs, image, change, match):
    seg = segs["whole"]
    with pytest.raises(ValueError, match=match):
        decode(seg, seg.encode(image), knobs(**change))


def test_cliper_voc21_class_file_is_the_official_one():
    from proxyclip.data import read_class_lines

    cl = parse_classes(read_class_lines("cliper/voc21"))
    assert len(cl.class_names) == 21 and cl.query_to_class.count(0) == 25
    assert "person with clothes, people, human" in cl.queries and "bird avian" in cl.queries


def test_a_background_class_without_foreground_is_refused(segs, image):
    seg = segs["whole"]
    with pytest.raises(ValueError, match="background_class=true needs a foreground class"):
        seg.decode(seg.encode(image), ["sky"])


@pytest.mark.parametrize("dataset,crop,knob", [("voc21", 336, {"bkg_thre": 0.6, "is_normalize": True}),
                                               ("context60", 224, {"score_thr": 0.45}),
                                               ("coco_stuff", None, {"level_logit_scale": 50.0}),
                                               ("cityscapes", None, {"attention_thr": 0.35})])
def test_the_protocol_preset_composes_to_its_table(dataset, crop, knob):
    cfg = compose_config("eval", ["data_root=/nonexistent", "protocol=cliper", "method=cliper", f"dataset={dataset}"])
    p = OmegaConf.to_container(cfg.protocol, resolve=True)
    assert (p["crop"], p["stride"], p["prob_thd"], p["logit_scale"], p["area_thd"]) == (crop, 112, 0.0, 1.0, None)
    assert p["short_side"] == (560 if dataset == "cityscapes" else 336)
    table = p["method_knobs"][dataset]
    assert all(table[k] == v for k, v in knob.items())
    assert p["classnames"] == ("cliper/voc21" if dataset == "voc21" else None)
    names = set(get_method("cliper").knob_names)
    assert all(set(t) <= names for t in p["method_knobs"].values())
