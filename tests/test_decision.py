"""The chunked decision (proxyclip/decision.py) against the exhaustive computation: the full (Q, H, W)
scores, softmax(logit_scale x scores) over all queries, max over each class's queries, first argmax,
threshold (written out here). The full scores themselves are checked against the per-window path
written out independently (every window upsampled to its padded size and cut, summed on a canvas,
divided by the per-pixel count, resized to the image) to float rounding."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proxyclip.decision import WindowScores, decide, decide_chunked
from proxyclip.text import ClassList
from proxyclip.windows import slide_windows, symmetric_padding

CLASSES = ["sky", "person; people", "horse"]


def naive_full(low, boxes, pad, resized, image_size):
    """Today's pipeline, one window and one query map at a time (the maps' bits do not depend on
    their neighbours in the batch; see decision._upsample)."""
    top, bottom, left, right = pad
    wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
    q = low.shape[1]
    canvas = torch.zeros((q, *resized))
    count = torch.zeros(resized)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        s = F.interpolate(low[i][:, None], size=(wh + top + bottom, ww + left + right), mode="bilinear",
                          align_corners=False)[:, 0, top:top + wh, left:left + ww]
        canvas[:, y1:y2, x1:x2] += s
        count[y1:y2, x1:x2] += 1
    merged = canvas / count
    if tuple(resized) != tuple(image_size):
        merged = F.interpolate(merged[:, None], size=image_size, mode="bilinear", align_corners=False)[:, 0]
    return merged


def naive_decide(scores, q2c, k, logit_scale, prob_thd):
    p = torch.softmax(logit_scale * scores, dim=0)
    probs = torch.stack([p[[q for q, c in enumerate(q2c) if c == j]].amax(0) for j in range(k)])
    best, labels = probs.max(0)
    labels[best < prob_thd] = 0
    return probs, labels


def split_threshold(best):
    """A threshold between the 10% and 90% quantiles of the winner's probability, in the widest gap between two pixels' values
    there (a threshold within float rounding of a pixel's value is decided by rounding: see decision.py)."""
    v = best.flatten().sort().values
    lo, hi = len(v) // 10, len(v) - 1 - len(v) // 10
    if v[hi] - v[lo] < 1e-4:  # saturated (all ~1): any gap
        lo, hi = 0, len(v) - 1
    i = lo + int((v[lo + 1:hi + 1] - v[lo:hi]).argmax())
    assert v[i + 1] - v[i] > 1e-5
    return float((v[i] + v[i + 1]) / 2)


# (resized size, image size, crop, stride, pad multiple): square, non-square, smaller than a window,
# a resize back to the image, padded windows
LAYOUTS = [((24, 24), (24, 24), 16, 8, 1), ((20, 37), (31, 50), 16, 6, 4), ((9, 13), (9, 13), 16, 8, 1),
           ((18, 30), (25, 41), 12, 12, 8), ((14, 22), (11, 17), 10, 3, 3)]


def random_case(seed, layout):
    rng = random.Random(seed)
    resized, image_size, crop, stride, mult = layout
    boxes = slide_windows(*resized, crop, stride)
    wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
    pad = symmetric_padding(wh, ww, mult)
    g = torch.Generator().manual_seed(seed)
    k = rng.randint(2, 9)
    q2c = list(range(k)) + [rng.randrange(k) for _ in range(rng.randint(0, 6))]  # synonyms, not contiguous
    rng.shuffle(q2c)
    q = len(q2c)
    h, w = max(1, (wh + pad[0] + pad[1]) // 4), max(1, (ww + pad[2] + pad[3]) // 4)
    low = torch.randn((len(boxes), q, h, w), generator=g) * rng.choice([0.05, 0.3, 1.0])
    # near-ties: exact copies of another query's maps (tie across classes and chunks) and 1e-5 nudges
    for _ in range(rng.randint(0, 3)):
        a, b = rng.randrange(q), rng.randrange(q)
        low[:, a] = low[:, b] + rng.choice([0.0, 0.0, 1e-5, -1e-5])
    names = [f"c{j}" for j in range(k)]
    cl = ClassList(names, [f"q{i}" for i in range(q)], q2c)
    return WindowScores(low, boxes, pad, resized, image_size), cl


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0][0]}x{l[0][1]}->{l[1][0]}x{l[1][1]}")
def test_labels_equal_the_exhaustive_computation(layout):
    mismatched = 0
    for seed in range(12):
        ws, cl = random_case(seed, layout)
        full = naive_full(ws.low, ws.windows, ws.pad, ws.resized_size, ws.image_size)
        canonical = ws.full()
        torch.testing.assert_close(canonical, full, atol=2e-6 * float(ws.low.abs().max()), rtol=0)  # float rounding
        assert torch.equal(ws.full(list(range(len(canonical)))[::-1]), canonical.flip(0))  # any chunk: same bits
        k = len(cl.class_names)
        for logit_scale in (40.0, 7.5):
            probs, _ = naive_decide(full, cl.query_to_class, k, logit_scale, 0.0)
            thd = split_threshold(probs.amax(0))
            points = [(logit_scale, 0.0), (logit_scale, thd)]
            for budget in (1, 3 * ws.bytes_per_query(), 10**9):  # one query per chunk .. all at once
                got = decide_chunked(ws, cl, points, budget_bytes=budget)
                for (ls, t), (labels, best) in zip(points, got):
                    want_probs, want = naive_decide(canonical, cl.query_to_class, k, ls, t)
                    mismatched += int((labels != want).sum())
                    torch.testing.assert_close(best, want_probs.amax(0), atol=1e-6, rtol=1e-5)
    assert mismatched == 0


def test_tie_rule_first_class_wins_across_chunks():
    """Equal maps: the lowest class index wins, whether the tied classes share a chunk or not."""
    boxes = slide_windows(8, 8, 8, 8)
    base = torch.randn(1, 1, 4, 4)
    low = torch.cat([base - 1.0, base, base - 0.5, base, base], dim=1)  # classes 1, 3, 4 tie for the max
    ws = WindowScores(low, boxes, (0, 0, 0, 0), (8, 8), (8, 8))
    cl = ClassList([f"c{i}" for i in range(5)], [f"q{i}" for i in range(5)], list(range(5)))
    for budget in (1, 2 * ws.bytes_per_query(), 10**9):
        (labels, best), = decide_chunked(ws, cl, [(40.0, 0.0)], budget_bytes=budget)
        assert (labels == 1).all()
        torch.testing.assert_close(best, torch.full((8, 8), 1 / (3 + np.exp(-20) + np.exp(-40))))
    # synonyms: the tie is decided by class index, not by the query's position
    cl = ClassList(["a", "b"], [f"q{i}" for i in range(5)], [1, 0, 1, 1, 0])
    (labels, _), = decide_chunked(ws, cl, [(40.0, 0.0)], budget_bytes=1)
    assert (labels == 0).all()  # class 0 owns query 1 (a max); class 1 owns query 3 (an equal max)
    _, want = decide(naive_full(low, boxes, (0, 0, 0, 0), (8, 8), (8, 8)), cl, 40.0, 0.0)
    assert (want == 0).all()


def test_one_chunk_never_holds_all_queries():
    """The budget bounds the full-resolution chunk: no chunk brings more queries to full resolution."""
    boxes = slide_windows(30, 40, 16, 8)
    ws = WindowScores(torch.randn(len(boxes), 50, 4, 4), boxes, (0, 0, 0, 0), (30, 40), (30, 40))
    cl = ClassList([f"c{i}" for i in range(50)], [f"q{i}" for i in range(50)], list(range(50)))
    seen = []
    full = ws.full
    ws.full = lambda rows=None: seen.append(len(rows)) or full(rows)
    decide_chunked(ws, cl, [(40.0, 0.0)], budget_bytes=7 * ws.bytes_per_query())
    assert max(seen) == 7 and sum(seen) == 50


def test_decode_keeps_low_resolution_scores_and_materializes_on_demand(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    pred = tiny_segmenter.decode(enc, CLASSES, prob_thd=0.3)
    assert not pred.materialized and pred.best_prob.shape == pred.labels.shape
    one = pred.class_scores("person; people")  # one class, without the others
    assert not pred.materialized
    full, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["scores.image"], prob_thd=0.3)
    assert full.materialized  # a cache on scores.image: the exhaustive path
    torch.testing.assert_close(pred.scores, cache["scores.image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(pred.probs, full.probs, atol=1e-6, rtol=0)
    assert torch.equal(pred.labels, full.labels)
    torch.testing.assert_close(pred.best_prob, full.probs.amax(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one, cache["scores.image"][1:3].amax(0), atol=1e-6, rtol=0)
    assert torch.equal(pred.class_scores(1), pred.class_scores("people"))
    with pytest.raises(KeyError, match="neither a class nor a query"):
        pred.class_scores("zebra")


def test_hooks_on_scores_still_fire_and_act(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    seen = []
    pred = tiny_segmenter.run_with_hooks(enc, CLASSES, {"scores.refined": lambda t, h: seen.append(t.shape) or -t})
    assert seen == [(4, *enc.image_size)]
    flipped = torch.softmax(-40.0 * tiny_segmenter.decode(enc, CLASSES).scores, 0)
    torch.testing.assert_close(pred.probs[0], flipped[0], atol=1e-6, rtol=0)


def _exhaustive_cm(seg, ds, logit_scale, prob_thd):
    """Per image: full scores through a cache (the exhaustive path), today's decide, an sklearn count."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    k = ds.num_classes
    total = np.zeros((k, k), np.int64)
    for i in range(len(ds)):
        _, cache = seg.run_with_cache(str(ds.samples[i].image), ds.class_names, names=["scores.image"])
        labels = naive_decide(cache["scores.image"], parse(ds.class_names).query_to_class, k, logit_scale,
                              prob_thd)[1]
        _, gt = ds[i]
        keep = gt.numpy() != ds.ignore_index
        total += sk_confusion(gt.numpy()[keep], labels.numpy()[keep], labels=list(range(k)))
    return total


def parse(names):
    from proxyclip.text import parse_classes

    return parse_classes(names)


def test_evaluation_metrics_unchanged_on_the_fixture_dataset(tmp_path, eval_segmenter):
    from fixtures_datasets import make_voc
    from fixtures_eval import eval_cfg, miou_by_hand

    from proxyclip.data import build_dataset
    from proxyclip.evaluation import evaluate

    make_voc(tmp_path, n=3)
    cfg = eval_cfg("voc21", tmp_path)
    out = evaluate(cfg, run_dir=tmp_path / "run", seg=eval_segmenter)
    cm = _exhaustive_cm(eval_segmenter, build_dataset(cfg.dataset), float(cfg.method.logit_scale),
                        float(cfg.protocol.prob_thd))
    assert cfg.protocol.prob_thd > 0 and out["num_images"] == 3
    assert out["mIoU"] == pytest.approx(miou_by_hand(cm), abs=1e-9)
    assert out["aAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=1e-9)


def test_decision_sweep_runs_the_last_block_once_per_image(tmp_path, eval_segmenter, monkeypatch):
    """A 2 x 2 (logit_scale x prob_thd) sweep: one dense-embedding pass per image (not per point), and
    each point equals its own evaluation."""
    from fixtures_datasets import make_voc
    from fixtures_eval import eval_cfg

    from proxyclip.evaluation import evaluate, sweep

    make_voc(tmp_path, n=2)
    calls = []
    from proxyclip import pipeline

    real = pipeline.method_output  # the method's last block for one batch of windows
    monkeypatch.setattr(pipeline, "method_output",
                        lambda seg, enc, a, b, spec, text: calls.append((float(enc.image.sum()), a))
                        or real(seg, enc, a, b, spec, text))
    cfg = eval_cfg("voc21", tmp_path, "sweep.logit_scale=[20.0,40.0]", "sweep.prob_thd=[0.0,0.3]",
                   config_name="sweep")
    out = sweep(cfg, run_dir=tmp_path / "sweep", seg=eval_segmenter)
    images = len({e for e, _ in calls})
    assert images == 2 and len(calls) == len(set(calls))  # each window batch of each image once
    assert len(out["points"]) == 4
    monkeypatch.undo()
    for p in out["points"]:
        ls, thd = p["values"]["logit_scale"], p["values"]["prob_thd"]
        single = evaluate(eval_cfg("voc21", tmp_path, f"method.logit_scale={ls}", f"protocol.prob_thd={thd}"),
                          run_dir=tmp_path / f"e{ls}_{thd}", seg=eval_segmenter)
        assert p["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
        assert p["decode"] == single["decode"]


# ----------------------------------------------------------------------------------------------
# SCLIP's area rule (docs/protocol.md): a foreground class labelled on at most area_thd x the
# foreground-labelled pixels gets probability 0; argmax again; then prob_thd.

def naive_class_probs(scores, q2c, k, logit_scale):
    """Per pixel, in float64: softmax over the queries, max over each class's queries (lists)."""
    s = scores.double()
    _, h, w = s.shape
    probs = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            logits = [logit_scale * float(s[q, y, x]) for q in range(len(q2c))]
            m = max(logits)
            e = [np.exp(v - m) for v in logits]
            z = sum(e)
            probs[y][x] = [max(e[q] / z for q in range(len(q2c)) if q2c[q] == j) for j in range(k)]
    return probs


def naive_rule(probs, k, prob_thd, area_thd):
    """The rule written out pixel by pixel: first argmax, areas of the foreground classes, removal,
    argmax again, threshold. Returns the labels, which classes are kept, and the first argmax."""
    h, w = len(probs), len(probs[0])
    first = [[max(range(k), key=lambda j: (probs[y][x][j], -j)) for x in range(w)] for y in range(h)]  # first max
    area = [sum(first[y][x] == j for y in range(h) for x in range(w)) for j in range(k)]
    foreground = sum(area[1:])
    keep = [True] + [area[j] > area_thd * foreground for j in range(1, k)]
    labels = torch.zeros((h, w), dtype=torch.long)
    for y in range(h):
        for x in range(w):
            p = [probs[y][x][j] if keep[j] else 0.0 for j in range(k)]
            j = max(range(k), key=lambda i: (p[i], -i))
            labels[y, x] = 0 if p[j] < prob_thd else j
    return labels, keep, torch.tensor(first)


def naive_area_decide(scores, q2c, k, logit_scale, prob_thd, area_thd):
    return naive_rule(naive_class_probs(scores, q2c, k, logit_scale), k, prob_thd, area_thd)


def hand_case():
    """4 x 4, three classes (0 background), probabilities given directly (scores = log p, scale 1).
    The first argmax: class 1 on 14 pixels, class 2 on two (a at (0, 3), b at (3, 0)), none background.
    Pixel a's next best is class 1 (another object), pixel b's is the background."""
    p = torch.tensor([0.1, 0.8, 0.1]).repeat(4, 4, 1)
    p[0, 3] = torch.tensor([0.20, 0.35, 0.45])  # a
    p[3, 0] = torch.tensor([0.30, 0.25, 0.45])  # b
    return p.permute(2, 0, 1).log(), ClassList(["bg", "one", "two"], ["bg", "one", "two"], [0, 1, 2])


@pytest.mark.parametrize("area_thd,prob_thd,a,b", [
    (0.125, 0.0, 1, 0),   # 2 <= 0.125 x 16: class 2 removed; a -> class 1, b -> background
    (0.13, 0.0, 1, 0),
    (0.125, 0.36, 0, 0),  # then prob_thd: a's class-1 probability 0.35 < 0.36 -> background
    (0.125, 0.3, 1, 0),
    (0.12, 0.0, 2, 2),    # 2 > 0.12 x 16 = 1.92: class 2 kept, nothing changes
    (None, 0.0, 2, 2),    # rule off
])
def test_area_rule_hand_worked(area_thd, prob_thd, a, b):
    scores, cl = hand_case()
    want = torch.ones((4, 4), dtype=torch.long)
    want[0, 3], want[3, 0] = a, b
    probs, labels = decide(scores, cl, 1.0, prob_thd, area_thd)
    assert torch.equal(labels, want)
    if area_thd is not None and area_thd >= 0.125:
        assert (probs[2] == 0).all() and torch.allclose(probs[:2], scores.exp()[:2])  # zeroed, not renormalized
    ws = WindowScores(scores[None], [(0, 4, 0, 4)], (0, 0, 0, 0), (4, 4), (4, 4))
    for budget in (1, 10**9):
        (got, best), = decide_chunked(ws, cl, [(1.0, prob_thd, area_thd)], budget_bytes=budget)
        assert torch.equal(got, want)
        if area_thd is not None and area_thd >= 0.125:  # a's winner is now class 1, with its own probability
            assert abs(float(best[0, 3]) - 0.35) < 1e-6 and abs(float(best[3, 0]) - 0.30) < 1e-6


def test_area_rule_counts_foreground_pixels_not_the_image():
    """12 background pixels, class 1 on 3, class 2 on 1: 1 <= 0.25 x 4 removes class 2, although it
    covers 1/16 of the image; class 1 (3 > 1) stays."""
    p = torch.tensor([0.6, 0.2, 0.2]).repeat(4, 4, 1)
    for yx in ((0, 0), (0, 1), (0, 2)):
        p[yx] = torch.tensor([0.2, 0.6, 0.2])
    p[3, 3] = torch.tensor([0.1, 0.4, 0.5])
    scores, cl = p.permute(2, 0, 1).log(), ClassList(["bg", "one", "two"], ["bg", "one", "two"], [0, 1, 2])
    _, labels = decide(scores, cl, 1.0, 0.0, 0.25)
    assert int(labels[3, 3]) == 1 and int((labels == 1).sum()) == 4 and int((labels == 0).sum()) == 12
    _, labels = decide(scores, cl, 1.0, 0.0, 0.2)  # 1 > 0.2 x 4: kept
    assert int(labels[3, 3]) == 2


def test_area_rule_equals_a_naive_loop_on_random_maps():
    """Random maps (synonyms, a few windows, small classes made by a negative bias): decide and
    decide_chunked (every budget) equal the loop; some cases remove a class whose pixels go to
    another foreground class."""
    moved_to_object = removed_cases = 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        resized, image_size, crop, stride, mult = LAYOUTS[seed % len(LAYOUTS)]
        boxes = slide_windows(*resized, crop, stride)
        wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
        pad = symmetric_padding(wh, ww, mult)
        k = rng.randint(3, 7)
        q2c = list(range(k)) + [rng.randrange(k) for _ in range(rng.randint(0, 4))]
        if len(q2c) > k:  # synonyms, in any order (one query a class: a class list's order, as parse_classes)
            rng.shuffle(q2c)
        h, w = max(1, (wh + pad[0] + pad[1]) // 4), max(1, (ww + pad[2] + pad[3]) // 4)
        low = torch.randn((len(boxes), len(q2c), h, w), generator=g) * 0.3
        low -= torch.tensor([rng.choice([0.0, 0.0, 0.3, 0.6]) for _ in q2c]).view(1, -1, 1, 1)
        ws = WindowScores(low, boxes, pad, resized, image_size)
        cl = ClassList([f"c{j}" for j in range(k)], [f"q{i}" for i in range(len(q2c))], q2c)
        canonical = ws.full()
        for logit_scale, area_thd in ((10.0, 0.1), (40.0, 0.2), (65.0, 0.3)):
            probs = naive_class_probs(canonical, q2c, k, logit_scale)
            want, keep, first = naive_rule(probs, k, 0.0, area_thd)
            removed = [j for j in range(1, k) if not keep[j] and bool((first == j).any())]
            removed_cases += bool(removed)
            moved_to_object += int(sum(((first == j) & (want > 0)).sum() for j in removed)) > 0
            best = torch.softmax(logit_scale * canonical, 0).max(0).values
            thd = split_threshold(best)
            want_thd, _, _ = naive_rule(probs, k, thd, area_thd)
            _, exhaustive = decide(canonical, cl, logit_scale, 0.0, area_thd)
            assert torch.equal(exhaustive, want)
            _, exhaustive_thd = decide(canonical, cl, logit_scale, thd, area_thd)
            assert torch.equal(exhaustive_thd, want_thd)
            points = [(logit_scale, 0.0, area_thd), (logit_scale, thd, area_thd), (logit_scale, 0.0)]
            for budget in (1, 3 * ws.bytes_per_query(), 10**9):
                got = decide_chunked(ws, cl, points, budget_bytes=budget)
                assert torch.equal(got[0][0], want) and torch.equal(got[1][0], want_thd)
                assert torch.equal(got[2][0], decide(canonical, cl, logit_scale, 0.0)[1])  # rule off: untouched
    assert removed_cases >= 8 and moved_to_object >= 5, (removed_cases, moved_to_object)  # 12 and 10 of 18


def test_area_rule_reaches_the_decode(tmp_path):
    """protocol.area_thd in the config: the DecodeSpec carries it and both decision paths apply it."""
    from conftest import tiny_config

    from proxyclip import Segmenter

    cfg = tiny_config("protocol.area_thd=0.3", "weights.seed=3")
    seg = Segmenter.from_config(cfg)
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    classes = ["sky", "person; people", "horse", "dog", "tree"]
    pred = seg.predict(img, classes, logit_scale=200.0)
    assert pred.spec.area_thd == 0.3 and seg.decode_spec().record()["area_thd"] == 0.3
    cl = pred.classes
    want, keep, first = naive_area_decide(pred.scores, cl.query_to_class, len(cl.class_names), 200.0,
                                          pred.spec.prob_thd, 0.3)
    assert any(not keep[j] and bool((first == j).any()) for j in range(1, len(keep)))  # the rule bites here
    assert torch.equal(pred.labels, want)
    refined = seg.predict(img, classes, logit_scale=200.0, postprocess={"name": "pamr", "steps": 0})  # exhaustive
    assert torch.equal(refined.labels, want)


def test_area_thd_off_leaves_the_decode_identity_as_it_was():
    """A spec without the rule has no area_thd in its record (keys of earlier runs unchanged); with
    it, the record, the flat fields and the key carry it."""
    from proxyclip.specs import DecodeSpec

    off = DecodeSpec("clip", (("residual", True), ("ffn", True)), (("name", "none"),), 40.0, 0.0, "abc")
    on = DecodeSpec("clip", (("residual", True), ("ffn", True)), (("name", "none"),), 40.0, 0.0, "abc", 0.1)
    assert "area_thd" not in off.record() and off.flat()["area_thd"] is None
    assert on.record()["area_thd"] == 0.1 == on.flat()["area_thd"] and on.key() != off.key()
    assert DecodeSpec.from_record(on.record()) == on and DecodeSpec.from_record(off.record()) == off
