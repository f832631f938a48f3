"""The evaluation loop against an independent per-image computation; subsets, bad labels, state, summary."""

import csv
import json

import numpy as np
import pytest
import torch
from fixtures_datasets import make_voc
from fixtures_eval import eval_cfg, miou_by_hand
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion

from proxyclip.data import BadLabelError, build_dataset
from proxyclip.evaluation import evaluate, select_indices


def _independent_cm(seg, ds, **params):
    """Predict every image on its own and count with scikit-learn."""
    k = ds.num_classes
    total = np.zeros((k, k), np.int64)
    for i in range(len(ds)):
        pred = seg.predict(str(ds.samples[i].image), ds.class_names, **params)
        _, gt = ds[i]
        keep = gt.numpy() != ds.ignore_index
        total += sk_confusion(gt.numpy()[keep], pred.labels.numpy()[keep], labels=list(range(k)))
    return total


def test_evaluate_equals_independent_per_image_count(tmp_path, eval_segmenter):
    make_voc(tmp_path)
    cfg = eval_cfg("voc21", tmp_path)
    assert cfg.protocol.prob_thd == 0.2  # the VOC21 protocol's threshold reaches the decode
    out = evaluate(cfg, run_dir=tmp_path / "run", seg=eval_segmenter)
    ds = build_dataset(cfg.dataset)
    cm = _independent_cm(eval_segmenter, ds, prob_thd=0.2)
    assert out["num_images"] == 4 and out["decode"]["prob_thd"] == 0.2
    assert out["mIoU"] == pytest.approx(miou_by_hand(cm), abs=1e-9)
    assert out["aAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=1e-9)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["mIoU"] == pytest.approx(out["mIoU"]) and saved["dataset"] == "voc21"
    rows = list(csv.DictReader(open(tmp_path / "run" / "per_class.csv")))
    assert len(rows) == 21 and rows[1]["class"] == "aeroplane"
    assert [int(r["gt_pixels"]) for r in rows] == cm.sum(1).tolist()


def test_reduce_zero_label_dataset_end_to_end(tmp_path, eval_segmenter):
    make_voc(tmp_path)
    cfg = eval_cfg("voc20", tmp_path)
    out = evaluate(cfg, run_dir=tmp_path / "run", seg=eval_segmenter)
    ds = build_dataset(cfg.dataset)
    cm = _independent_cm(eval_segmenter, ds, prob_thd=0.0)
    assert cm.shape == (20, 20) and out["decode"]["prob_thd"] == 0.0
    # background pixels are ignored, not counted as a class
    raw_nonbg = sum(int(((np.array(Image.open(s.label)) != 0) & (np.array(Image.open(s.label)) != 255)).sum())
                    for s in ds.samples)
    assert out["num_pixels"] == cm.sum() == raw_nonbg
    assert out["mIoU"] == pytest.approx(miou_by_hand(cm), abs=1e-9)


def test_limit_is_a_reproducible_subset(tmp_path, eval_segmenter):
    assert select_indices(10, 4, seed=0) == select_indices(10, 4, seed=0)
    assert select_indices(10, 4, seed=0) != select_indices(10, 4, seed=1)
    assert select_indices(10, None) == list(range(10)) and select_indices(3, 5) == [0, 1, 2]
    assert all(len(set(select_indices(50, 7, s))) == 7 for s in range(5))
    make_voc(tmp_path)
    out = evaluate(eval_cfg("voc21", tmp_path, "limit=2", "limit_seed=3"), run_dir=tmp_path / "r", seg=eval_segmenter)
    done = torch.load(tmp_path / "r" / "state" / "rank0-of-1.pt", weights_only=False)["done"]
    ids = sorted(build_dataset(eval_cfg("voc21", tmp_path).dataset).samples[i].id for i in select_indices(4, 2, 3))
    assert out["num_images"] == 2 and sorted(done) == ids


def test_bad_label_is_fatal_by_default_and_skipped_on_request(tmp_path, eval_segmenter):
    expected = make_voc(tmp_path)
    bad = sorted(expected)[2]
    lab = tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{bad}.png"
    arr = np.array(Image.open(lab))
    arr[:2, :2] = 99
    Image.fromarray(arr).save(lab)
    with pytest.raises(BadLabelError, match=f"{bad}.png"):
        evaluate(eval_cfg("voc21", tmp_path), run_dir=tmp_path / "a", seg=eval_segmenter)
    out = evaluate(eval_cfg("voc21", tmp_path, "dataset.bad_labels=skip"), run_dir=tmp_path / "b", seg=eval_segmenter)
    assert out["num_images"] == 3 and out["num_skipped"] == 1
    assert out["skipped"][0]["id"] == bad and "[99]" in out["skipped"][0]["reason"]
    good = build_dataset(eval_cfg("voc21", tmp_path).dataset)
    good = good.subset([i for i, s in enumerate(good.samples) if s.id != bad])
    assert out["mIoU"] == pytest.approx(miou_by_hand(_independent_cm(eval_segmenter, good, prob_thd=0.2)), abs=1e-9)


def test_resume_with_other_settings_is_refused(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=2)
    evaluate(eval_cfg("voc21", tmp_path), run_dir=tmp_path / "run", seg=eval_segmenter)
    with pytest.raises(RuntimeError, match=r"other settings \(decode.knobs.beta: 1.2 then, 1.5 now\).*resume=false"):
        evaluate(eval_cfg("voc21", tmp_path, "method.beta=1.5"), run_dir=tmp_path / "run", seg=eval_segmenter)


def test_segmenter_built_for_another_protocol_is_refused(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=1)
    with pytest.raises(ValueError, match="protocol.crop=64 in the Segmenter, 336 in this config"):
        evaluate(eval_cfg("voc21", tmp_path, "protocol.crop=336"), run_dir=tmp_path / "r", seg=eval_segmenter)


def test_ctrl_c_saves_progress_and_resume_matches(tmp_path, eval_segmenter, monkeypatch):
    make_voc(tmp_path, n=4)
    cfg = eval_cfg("voc20", tmp_path, "checkpoint_seconds=1000")  # only the interrupt itself saves
    full = evaluate(cfg, run_dir=tmp_path / "full", seg=eval_segmenter)
    seg_cls = type(eval_segmenter)
    real_decode = seg_cls.decode_many  # the loop decodes every point of an image in one call
    calls = []

    def decode_then_ctrl_c(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while the third image is being decoded
            raise KeyboardInterrupt
        return real_decode(self, *a, **k)

    monkeypatch.setattr(seg_cls, "decode_many", decode_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, run_dir=tmp_path / "run", seg=eval_segmenter)
    monkeypatch.setattr(seg_cls, "decode_many", real_decode)
    state = torch.load(tmp_path / "run" / "state" / "rank0-of-1.pt", weights_only=False)
    assert len(state["done"]) == 2
    resumed = evaluate(cfg, run_dir=tmp_path / "run", seg=eval_segmenter)
    assert resumed["num_pixels"] == full["num_pixels"] and resumed["mIoU"] == full["mIoU"]
