"""Dataset-level sweeps: every grid point equals its own evaluation; the feature cache is exact and safe."""

import csv

import naive
import numpy as np
import pytest
import torch
from fixtures_datasets import make_voc
from fixtures_eval import eval_cfg

from proxyclip import Segmenter
from proxyclip.data import build_dataset
from proxyclip.evaluation import FeatureCache, evaluate, sweep
from proxyclip.knobs import SWITCHES
from proxyclip.methods import METHODS
from proxyclip.resolve import configured_parts


def test_sweep_points_equal_separate_evaluations(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=3)
    cfg = eval_cfg("voc20", tmp_path, "sweep.beta=[1.0,1.4]", "sweep.gamma=[2.0,3.0]", "sweep.prob_thd=[]",
                   config_name="sweep")
    out = sweep(cfg, run_dir=tmp_path / "sweep", seg=eval_segmenter)
    assert out["axes"] == ["beta", "gamma"]
    pairs = [(p["values"]["beta"], p["values"]["gamma"]) for p in out["points"]]
    assert pairs == [(1.0, 2.0), (1.0, 3.0), (1.4, 2.0), (1.4, 3.0)]
    for (beta, gamma), p in zip(pairs, out["points"]):
        single = evaluate(eval_cfg("voc20", tmp_path, f"method.beta={beta}", f"method.gamma={gamma}"),
                          run_dir=tmp_path / f"e{beta}_{gamma}", seg=eval_segmenter)
        assert p["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
        assert p["decode"] == single["decode"]  # the same identity, field by field
        assert p["IoU"]["aeroplane"] == pytest.approx(single["per_class"][0]["IoU"], nan_ok=True)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert list(rows[0]) == ["beta", "gamma", "mIoU", "aAcc", "mAcc"]  # the swept keys, then the metrics
    assert [(float(r["beta"]), float(r["gamma"])) for r in rows] == pairs
    assert float(rows[2]["mIoU"]) == pytest.approx(out["points"][2]["mIoU"], abs=1e-4)
    long_rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep_per_class.csv")))
    assert len(long_rows) == 4 * 20 and long_rows[0]["class"] == "aeroplane"
    assert max(p["mIoU"] for p in out["points"]) == out["best"]["mIoU"]


def _two_values(knob, default):
    """The method's value and another valid one of the same knob."""
    if knob.kind == "bool":
        return [default, not default]
    if knob.kind == "int":
        return [default, default + 1]
    if knob.kind == "choice":
        return [default, next(c for c in knob.choices if c != default)]
    other = default * 1.5 if default else 0.5
    return [default, default / 2 if knob.high is not None and other >= knob.high else other]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_sweep_of_every_method_equals_separate_evaluations(method, tmp_path, eval_segmenter):
    """Every registered method, on one of its own knobs (a switch for methods without): the sweep's
    points equal separate evaluations at those values, point for point."""
    images = make_voc(tmp_path, n=2)
    tiny = naive.tiny_overrides(method)  # knob values that fit the tiny 2-block CLIP (ResCLIP, SC-CLIP, GEM)
    fixed = set(naive.TINY_KNOBS.get(method, {})) | set(naive.TINY_FIXED.get(method, ()))
    knob = ([k for k in METHODS[method].knobs if k.name not in fixed] or list(SWITCHES))[0]
    readout = METHODS[method].vfm_feature  # a method reading another VFM readout (CASS: keys)
    m = (f"method={method}",) + ((f"vfm.feature={readout}",) if readout else ()) + tuple(tiny)
    if METHODS[method].needs_masks:  # a method reading mask proposals (CorrCLIP): one label-map file an image
        (tmp_path / "masks").mkdir()
        for sid, (_, lab) in images.items():
            np.savez(tmp_path / "masks" / f"{sid}.npz", instance_mask=(np.arange(lab.size).reshape(lab.shape)
                                                                       // 700).astype(np.int32))
        m += ("masks=file", f"masks.dir={tmp_path / 'masks'}")
    base = eval_cfg("voc21", tmp_path, *m)
    # one that keeps its parts or makes a per-image part of its own (masks, Trident's SAM part), or the
    # shared one (for a method reading another readout: same models)
    own = configured_parts(base) or METHODS[method].needs_masks or METHODS[method].needs_sam
    seg = Segmenter.from_config(base) if own else eval_segmenter.for_method(method)
    values = _two_values(knob, base.method[knob.name])
    literal = "[" + ",".join(str(v).lower() for v in values) + "]"
    out = sweep(eval_cfg("voc21", tmp_path, *m, f"sweep.{knob.name}={literal}", config_name="sweep"),
                run_dir=tmp_path / "sweep", seg=seg)
    assert out["axes"] == [knob.name] and [p["values"][knob.name] for p in out["points"]] == values
    for v, p in zip(values, out["points"]):
        single = evaluate(eval_cfg("voc21", tmp_path, *m, f"method.{knob.name}={str(v).lower()}"),
                          run_dir=tmp_path / f"e{v}", seg=seg)
        assert p["decode"] == single["decode"] and p["decode"]["knobs"][knob.name] == v
        assert p["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
        assert p["IoU"] == pytest.approx({r["class"]: r["IoU"] for r in single["per_class"]}, nan_ok=True, abs=1e-12)


def test_a_postprocess_setting_sweeps(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=2)
    out = sweep(eval_cfg("voc21", tmp_path, "method=naclip", "postprocess=pamr", "sweep.postprocess.steps=[0,2]",
                         "sweep.postprocess.dilations=[[1],[2,4]]", config_name="sweep"),
                run_dir=tmp_path / "sweep", seg=eval_segmenter)
    assert out["axes"] == ["postprocess.steps", "postprocess.dilations"] and len(out["points"]) == 4
    for p in out["points"]:
        steps, dil = p["values"]["postprocess.steps"], p["values"]["postprocess.dilations"]
        single = evaluate(eval_cfg("voc21", tmp_path, "method=naclip", "postprocess=pamr", f"postprocess.steps={steps}",
                                   f"postprocess.dilations=[{','.join(map(str, dil))}]"),
                          run_dir=tmp_path / f"e{steps}{dil}", seg=eval_segmenter)
        assert p["decode"]["postprocess"] == {"name": "pamr", "steps": steps, "dilations": dil}
        assert p["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
    with_steps = {p["values"]["postprocess.steps"] for p in out["points"]}
    assert with_steps == {0, 2}


@pytest.mark.parametrize("grid, message", [
    (["method=naclip", "sweep.beta=[1.0]"], r"sweep.beta is not a knob of method naclip.*gaussian_std"),
    (["method=naclip"], r"nothing to sweep.*naclip: residual, ffn, gaussian_std, logit_scale, prob_thd"),
    (["sweep.gamma=[0.0]"], r"sweep.gamma must be a number > 0, got 0.0"),
    (["sweep.postprocess.steps=[2]"], r"sweep.postprocess.steps is not a knob of method proxyclip \(postprocess=none\)"),
])
def test_a_bad_sweep_fails_before_any_image(grid, message, tmp_path, eval_segmenter, monkeypatch):
    make_voc(tmp_path, n=1)
    monkeypatch.setattr(type(eval_segmenter), "encode", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match=message):
        sweep(eval_cfg("voc21", tmp_path, *grid, config_name="sweep"), run_dir=tmp_path / "s", seg=eval_segmenter)


def test_sweep_encodes_each_image_once(tmp_path, eval_segmenter, monkeypatch):
    make_voc(tmp_path, n=3)
    calls = []
    real = type(eval_segmenter).encode
    monkeypatch.setattr(type(eval_segmenter), "encode", lambda self, im, **kw: calls.append(1) or real(self, im, **kw))
    cfg = eval_cfg("voc21", tmp_path, "sweep.beta=[1.0,1.2,1.4]", "sweep.gamma=[2,3,4,5]", config_name="sweep")
    out = sweep(cfg, run_dir=tmp_path / "s", seg=eval_segmenter)
    assert len(out["points"]) == 12 and len(calls) == 3


def test_feature_cache_is_exact_and_reused(tmp_path, eval_segmenter, capsys):
    make_voc(tmp_path, n=3)
    args = ["sweep.beta=[1.0,1.4]", "sweep.gamma=[3.0]", f"cache_dir={tmp_path / 'cache'}"]
    first = sweep(eval_cfg("voc21", tmp_path, *args, config_name="sweep"), run_dir=tmp_path / "a", seg=eval_segmenter)
    printed = capsys.readouterr().out
    assert "feature cache" in printed and "for the 3 images still to encode" in printed and "free)" in printed
    entries = sorted((tmp_path / "cache" / eval_segmenter.clip_key).rglob("*.pt"))
    vfm_entries = sorted((tmp_path / "cache" / eval_segmenter.vfm_key).rglob("*.pt"))
    assert len(entries) == 3 and len(vfm_entries) == 3 and not list((tmp_path / "cache").rglob(".tmp-*"))
    # a half-written file from an interrupted run is never read back, a corrupt entry is recomputed
    (entries[0].parent / ".tmp-abc.pt").write_bytes(b"partial")
    entries[1].write_bytes(b"garbage")

    def no_encode(self, image, reuse=None):
        raise AssertionError("encode called although cached")

    cache = FeatureCache(tmp_path / "cache", eval_segmenter)
    images = [s.image for s in build_dataset(eval_cfg("voc21", tmp_path).dataset).samples]
    hits = [cache.get(p) is not None for p in images]
    assert hits.count(True) == 2  # the garbage entry is a miss (and removed)
    second = sweep(eval_cfg("voc21", tmp_path, *args, config_name="sweep"), run_dir=tmp_path / "b", seg=eval_segmenter)
    assert [p["mIoU"] for p in second["points"]] == [p["mIoU"] for p in first["points"]]
    # third run: everything cached, so the backbones are never needed
    import proxyclip.pipeline as pl

    orig = pl.Segmenter.encode
    pl.Segmenter.encode = no_encode
    try:
        third = sweep(eval_cfg("voc21", tmp_path, *args, config_name="sweep"), run_dir=tmp_path / "c",
                      seg=eval_segmenter)
    finally:
        pl.Segmenter.encode = orig
    assert [p["mIoU"] for p in third["points"]] == [p["mIoU"] for p in first["points"]]


def test_cached_encoded_decodes_bit_identically(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=1)
    img = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000000.jpg"
    cache = FeatureCache(tmp_path / "c", eval_segmenter, print_fn=lambda s: None)
    enc = eval_segmenter.encode(str(img))
    cache.put(img, enc, remaining=1)
    back = cache.get(img)
    assert torch.equal(back.image, enc.image) and torch.equal(back.clip_tokens, enc.clip_tokens)
    assert torch.equal(back.vfm_features, enc.vfm_features)
    a = eval_segmenter.decode(enc, ["sky", "cat; kitten"]).scores
    b = eval_segmenter.decode(back, ["sky", "cat; kitten"]).scores
    assert torch.equal(a, b)


def test_cache_stops_writing_when_the_estimate_does_not_fit(tmp_path, eval_segmenter, monkeypatch):
    import shutil
    from collections import namedtuple

    make_voc(tmp_path, n=1)
    img = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000000.jpg"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    said = []
    cache = FeatureCache(tmp_path / "c", eval_segmenter, print_fn=said.append)
    enc = eval_segmenter.encode(str(img))
    cache.put(img, enc, remaining=5000)
    assert not cache.writing and "does not fit" in said[-1]
    n = len(list((tmp_path / "c").rglob("*.pt")))
    cache.put(tmp_path / "VOCdevkit/VOC2012/JPEGImages/2012_999999.jpg", enc)
    assert len(list((tmp_path / "c").rglob("*.pt"))) == n


def test_another_vfm_reuses_every_cached_clip_part(tmp_path, eval_segmenter):
    """The parts are cached separately: a sweep with another VFM (here: another layer of it) encodes
    only its VFM part; the CLIP part comes from the cache and decodes the same as a fresh encode."""
    make_voc(tmp_path, n=2)
    images = [s.image for s in build_dataset(eval_cfg("voc21", tmp_path).dataset).samples]
    first = FeatureCache(tmp_path / "c", eval_segmenter, print_fn=lambda s: None)
    for p in images:
        first.get_or_encode(p, lambda reuse, p=p: eval_segmenter.encode(str(p), reuse=reuse))
    other = eval_segmenter.with_vfm(eval_segmenter.cfg.vfm.name, layer=0)
    assert other.clip_key == eval_segmenter.clip_key and other.vfm_key != eval_segmenter.vfm_key
    runs = {"clip": 0, "vfm": 0}
    clip_fn, vfm_fn = other.clip.encode_tokens, other.vfm.features
    other.clip.encode_tokens = lambda x, keep=(): runs.__setitem__("clip", runs["clip"] + 1) or clip_fn(x, keep)
    other.vfm.features = lambda x: runs.__setitem__("vfm", runs["vfm"] + 1) or vfm_fn(x)
    try:
        cache = FeatureCache(tmp_path / "c", other, print_fn=lambda s: None)
        encs = [cache.get_or_encode(p, lambda reuse, p=p: other.encode(str(p), reuse=reuse)) for p in images]
    finally:
        del other.clip.encode_tokens, other.vfm.features
    assert runs["clip"] == 0 and runs["vfm"] > 0 and cache.writes == 2  # only the VFM parts were written
    assert len(list((tmp_path / "c" / other.vfm_key).rglob("*.pt"))) == 2
    for p, enc in zip(images, encs):
        fresh = other.encode(str(p))
        assert torch.equal(other.decode(enc, ["sky", "cat"]).scores, other.decode(fresh, ["sky", "cat"]).scores)
    again = FeatureCache(tmp_path / "c", other, print_fn=lambda s: None)
    assert all(again.get(p) is not None for p in images)


def _result(values, mious):
    from proxyclip.evaluation import GridResult
    from proxyclip.resolve import decode_spec
    from conftest import tiny_config

    spec = decode_spec(tiny_config())
    k = 2
    res = GridResult(points=[spec] * len(values), cm=torch.zeros(len(values), k, k, dtype=torch.int64),
                     class_names=["a", "b"], num_images=1, values=values)
    for m, v in zip(res.metrics, mious):
        m["mIoU"] = v
    return res


def test_sweep_figure_is_a_heatmap_of_the_first_two_axes_max_over_the_rest():
    from proxyclip.evaluation import sweep_figure

    values, mious = [], []
    for a in (True, False):
        for b in (3.0, 5.0, 7.0):
            for c in (0, 10):
                values.append({"residual": a, "gaussian_std": b, "postprocess.steps": c})
                mious.append(100 * int(a) + b + c)  # the max over steps is at c = 10
    fig = sweep_figure(_result(values, mious))
    grid = fig.axes[0].images[0].get_array()
    expected = [[100 * int(a) + b + 10 for b in (3.0, 5.0, 7.0)] for a in (False, True)]  # rows sorted: False, True
    assert grid.tolist() == expected
    assert fig.axes[0].get_ylabel() == "residual" and fig.axes[0].get_xlabel() == "gaussian_std"


def test_sweep_figure_of_one_axis_is_a_line():
    from proxyclip.evaluation import sweep_figure

    fig = sweep_figure(_result([{"prob_thd": 0.0}, {"prob_thd": 0.2}, {"prob_thd": 0.1}], [5.0, 7.0, 6.0]))
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0.0, 0.1, 0.2] and list(line.get_ydata()) == [5.0, 6.0, 7.0]
    assert fig.axes[0].get_xlabel() == "prob_thd"
    assert sweep_figure(_result([{}], [1.0])) is None
