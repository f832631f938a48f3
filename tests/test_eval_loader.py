"""The evaluation loop's read-ahead DataLoader: with workers it counts exactly what the in-process
reading counts (matrices, resume, skipped labels, order)."""

import numpy as np
import pytest
import torch
from fixtures_datasets import make_voc
from fixtures_eval import eval_cfg
from PIL import Image

from proxyclip.data import build_dataset
from proxyclip.evaluation.grid import grid_points
from proxyclip.evaluation.runner import _reader, default_num_workers, run_grid


def _run(seg, cfg, run_dir, num_workers, before_count=None):
    ds = build_dataset(cfg.dataset)
    points = [spec for _, spec in grid_points(cfg, {}, ds.class_names)]
    return ds, run_grid(seg, ds, points, run_dir, checkpoint_seconds=0, progress=False, print_fn=lambda m: None,
                        before_count=before_count, num_workers=num_workers)


def _done(run_dir):
    return torch.load(run_dir / "state" / "rank0-of-1.pt", weights_only=False)["done"]


def test_workers_count_the_same_matrices_in_the_same_order(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=5)
    cfg = eval_cfg("voc21", tmp_path)
    ds, alone = _run(eval_segmenter, cfg, tmp_path / "w0", 0)
    _, ahead = _run(eval_segmenter, cfg, tmp_path / "w2", 2)
    assert alone.num_images == ahead.num_images == 5
    assert alone.cm.sum() > 0 and torch.equal(alone.cm, ahead.cm)
    ids = [s.id for s in ds.samples]
    assert _done(tmp_path / "w0") == ids and _done(tmp_path / "w2") == ids


def test_reader_yields_exactly_todo_in_its_order(tmp_path):
    make_voc(tmp_path, n=5)
    ds = build_dataset(eval_cfg("voc21", tmp_path).dataset)
    todo = [3, 0, 4, 1]  # not sorted: the order is the sampler's, not the dataset's
    loader = _reader(ds, todo, 2)
    assert loader.num_workers == 2
    got = list(loader)
    assert [i for i, _, _ in got] == todo
    for i, image, label in got:  # what the workers read is what reading in-process gives
        assert np.array_equal(np.asarray(image), np.asarray(ds.load_image(i)))
        assert torch.equal(label, ds.load_label(i))


def test_interrupted_run_with_workers_resumes_to_the_uninterrupted_result(tmp_path, eval_segmenter):
    make_voc(tmp_path, n=5)
    cfg = eval_cfg("voc21", tmp_path)
    ds, full = _run(eval_segmenter, cfg, tmp_path / "full", 0)
    seen = []

    def ctrl_c_after_two(counted):
        seen.append(counted)
        if counted >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(eval_segmenter, cfg, tmp_path / "run", 2, before_count=ctrl_c_after_two)
    assert seen == [0, 1, 2]  # called once per image, before it is counted
    assert _done(tmp_path / "run") == [s.id for s in ds.samples[:2]]
    resumed_counts = []
    _, resumed = _run(eval_segmenter, cfg, tmp_path / "run", 2, before_count=resumed_counts.append)
    assert resumed_counts == [0, 1, 2]  # only the three images left are read and counted
    assert torch.equal(resumed.cm, full.cm) and resumed.num_images == full.num_images
    assert _done(tmp_path / "run") == [s.id for s in ds.samples]


def test_bad_labels_skip_with_workers_lists_the_same_images(tmp_path, eval_segmenter):
    expected = make_voc(tmp_path, n=4)
    bad = sorted(expected)[1]
    lab = tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{bad}.png"
    arr = np.array(Image.open(lab))
    arr[:2, :2] = 99
    Image.fromarray(arr).save(lab)
    cfg = eval_cfg("voc21", tmp_path, "dataset.bad_labels=skip")
    _, alone = _run(eval_segmenter, cfg, tmp_path / "w0", 0)
    _, ahead = _run(eval_segmenter, cfg, tmp_path / "w2", 2)
    assert [s["id"] for s in alone.skipped] == [bad] and ahead.skipped == alone.skipped
    assert "[99]" in ahead.skipped[0]["reason"] and f"{bad}.png" in ahead.skipped[0]["reason"]
    assert torch.equal(alone.cm, ahead.cm) and ahead.num_images == 3
    with pytest.raises(Exception, match=f"{bad}.png") as err:  # the default: the worker's error, raised as is
        _run(eval_segmenter, eval_cfg("voc21", tmp_path), tmp_path / "err", 2)
    assert type(err.value).__name__ == "BadLabelError" and "\n" not in str(err.value)


def test_default_workers_leave_a_core_for_the_models(monkeypatch):
    for cores, want in [(1, 0), (2, 1), (3, 2), (16, 4), (None, 0)]:
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert default_num_workers() == want


def test_sigterm_with_workers_saves_and_shuts_the_workers_down(tmp_path, eval_segmenter):
    import multiprocessing
    import os
    import signal

    make_voc(tmp_path, n=5)
    cfg = eval_cfg("voc21", tmp_path, "checkpoint_seconds=1000")  # only the interrupt saves
    alive = []

    def term_after_two(counted):
        if counted == 2:
            alive.append(len(multiprocessing.active_children()))
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption: the loop's handler stops it

    with pytest.raises(KeyboardInterrupt):
        _run(eval_segmenter, cfg, tmp_path / "run", 2, before_count=term_after_two)
    assert alive == [2] and multiprocessing.active_children() == []  # the workers ran, and are gone
    assert _done(tmp_path / "run") == [s.id for s in build_dataset(cfg.dataset).samples[:2]]
