"""The evaluation loop: one encode per image, one decode per hyperparameter point, confusion matrices.

A plain evaluation is a grid of one point (the config's ``method`` values); a sweep is a
grid of many. Either way each image is encoded once (or read from the feature cache) and
decoded once per point, and each point accumulates its own ``(K, K)`` confusion matrix over
the dataset. The loop is

- resumable: the matrices and the list of counted images are saved together, atomically
  (:mod:`.state`); a restart in the same run directory skips the counted images;
- distributed: under ``torchrun`` each process takes every ``world_size``-th image and the
  matrices are summed at the end (:mod:`.distributed`).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..data import BadLabelError, SegmentationDataset
from ..metrics import confusion_matrix, metrics_from_confusion
from ..files import atomic_write
from .cache import FeatureCache
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, shard
from .state import RunState, digest

log = logging.getLogger(__name__)

PARAMS = ("beta", "gamma", "logit_scale", "prob_thd")  # the sweepable ones (beta, gamma: proxyclip's)


def select_indices(n: int, limit: Optional[int], seed: int = 0) -> List[int]:
    """All ``n`` indices, or a reproducible random subset of ``limit`` of them (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return sorted(random.Random(seed).sample(range(n), int(limit)))


def grid_points(seg, grid: Optional[Any] = None, method: Optional[Any] = None) -> List[Dict[str, float]]:
    """Hyperparameter points: the product of ``grid``'s lists.

    An empty or missing list means the value in ``method`` (the run's ``cfg.method``, which
    carries the dataset's protocol, e.g. its prob_thd), else the Segmenter's own config. Each point
    holds every setting of its decode (method, switches, knobs; ``Segmenter.resolve_params``).
    """
    axes = []
    for name in PARAMS:
        values = list(getattr(grid, name, None) or []) if grid is not None else []
        if not values and method is not None and name in method:
            values = [float(method[name])]
        axes.append(values or [None])
    points = []
    for combo in itertools.product(*axes):
        points.append(seg.resolve_params(**dict(zip(PARAMS, combo))))
    return points


@dataclass
class GridResult:
    points: List[Dict[str, float]]
    cm: torch.Tensor  # (G, K, K) summed over processes
    class_names: List[str]  # display names (class 0 "background" where it is the background)
    num_images: int  # images counted (all processes)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    metrics: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if not self.metrics:
            self.metrics = [metrics_from_confusion(self.cm[g], self.class_names) for g in range(len(self.points))]


class _Stop(Exception):
    pass


def run_grid(
    seg,
    dataset: SegmentationDataset,
    points: Sequence[Dict[str, float]],
    run_dir: os.PathLike,
    *,
    info: DistInfo = DistInfo(),
    cache: Optional[FeatureCache] = None,
    checkpoint_seconds: float = 10.0,
    progress: bool = True,
    logger: Any = None,
    log_images: int = 0,
    print_fn: Callable[[str], None] = print,
    before_count: Optional[Callable[[int], None]] = None,
) -> GridResult:
    """Evaluate every point of ``points`` on ``dataset`` (already subset), resumably and sharded.

    ``before_count(n)``: called after each image is decoded and before it is counted, with the
    number of images this process counted so far (tests inject faults there).
    Returns the matrices summed over all processes (every process gets the same result).
    """
    t0 = time.time()
    points = [dict(p) for p in points]
    k = dataset.num_classes
    state = RunState(Path(run_dir), info.rank, info.world_size, _fingerprint(seg, dataset, points),
                     (len(points), k, k))
    if state.load():
        print_fn(f"resuming {state.path}: {len(state.done)} images already counted"
                 + (f", plus {len(state.foreign_done)} by an earlier attempt with another number of processes"
                    if state.foreign_done else ""))
    mine = shard(range(len(dataset)), info)
    todo = [i for i in mine if not state.is_done(dataset.samples[i].id)]
    loop = _Loop(seg, dataset, points, state, cache=cache, checkpoint_seconds=checkpoint_seconds, logger=logger,
                 log_images=log_images if info.is_main else 0, print_fn=print_fn, before_count=before_count)
    bar = _progress_bar(dataset, info, total=len(mine), initial=len(mine) - len(todo)) if progress else None
    loop.run(todo, bar)
    return _gather(state, dataset, points, info, seconds=time.time() - t0)


def _fingerprint(seg, dataset: SegmentationDataset, points: List[Dict[str, float]]) -> Dict[str, Any]:
    """What a saved state must match to be resumed: same images, classes, protocol, model and points."""
    return {
        "dataset": dataset.name,
        "num_samples": len(dataset),
        "samples": digest([s.id for s in dataset.samples]),
        "classes": digest(dataset.class_names),
        "reduce_zero_label": dataset.reduce_zero_label,
        "ignore_index": dataset.ignore_index,
        "model": seg.key,
        "points": digest(points),
    }


def _progress_bar(dataset: SegmentationDataset, info: DistInfo, total: int, initial: int):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True,
                desc=f"{dataset.name}" + (f" [rank 0/{info.world_size}]" if info.enabled else ""))


class _Loop:
    """This process's images: encode once, decode per point, count, save the state now and then."""

    def __init__(self, seg, dataset: SegmentationDataset, points: List[Dict[str, float]], state: RunState, *,
                 cache: Optional[FeatureCache], checkpoint_seconds: float, logger: Any, log_images: int,
                 print_fn: Callable[[str], None], before_count: Optional[Callable[[int], None]]):
        self.seg, self.dataset, self.points, self.state = seg, dataset, points, state
        self.cache, self.checkpoint_seconds = cache, checkpoint_seconds
        self.logger, self.log_images, self.print_fn = logger, log_images, print_fn
        self.before_count = before_count
        self.logged = self.counted = 0
        self.last_save = time.time()
        self.dirty = False

    def run(self, todo: Sequence[int], bar) -> None:
        def on_term(signum, frame):  # SLURM preemption / kill: save what is counted, then stop
            raise _Stop()

        old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
        try:
            for n_left, i in zip(range(len(todo), 0, -1), todo):
                self.image(i, n_left)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"mIoU {metrics_from_confusion(self.state.cm[0])['mIoU']:.2f}")
        except (KeyboardInterrupt, _Stop):
            self.save_if_dirty()
            self.print_fn(f"interrupted: {len(self.state.done)} images counted and saved in {self.state.path}; "
                          f"run the same command with the same run directory to continue")
            raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        self.save_if_dirty()

    def image(self, i: int, n_left: int) -> None:
        ds, sample = self.dataset, self.dataset.samples[i]
        image = ds.load_image(i)
        try:
            label = ds.load_label(i, expected_size=image.size)
        except BadLabelError as e:
            if ds.bad_labels != "skip":
                raise
            self.print_fn(f"skipping {sample.id}: {e}")
            self.state.add(sample.id, skipped=str(e))
            self.dirty = True
            return
        if self.cache is not None:
            enc = self.cache.get_or_encode(sample.image, lambda reuse: self.seg.encode(image, reuse=reuse),
                                             remaining=n_left)
        else:
            enc = self.seg.encode(image)
        k = ds.num_classes
        cm_img = torch.zeros((len(self.points), k, k), dtype=torch.int64)
        for g, p in enumerate(self.points):
            pred = self.seg.decode(enc, ds.class_names, **p)
            cm_img[g] = confusion_matrix(pred.labels.cpu(), label, k, ds.ignore_index)
            if g == 0 and self.logger is not None and self.logged < self.log_images:
                self.logger.log_segmentation(f"{ds.name}/{sample.id}", image, pred.labels.cpu(), label,
                                             ds.display_names, ignore_index=ds.ignore_index)
                self.logged += 1
        if self.before_count is not None:
            self.before_count(self.counted)
        self.state.add(sample.id, cm_img)
        self.counted += 1
        self.dirty = True
        if self.checkpoint_seconds <= 0 or time.time() - self.last_save >= self.checkpoint_seconds:
            self.state.save()
            self.last_save, self.dirty = time.time(), False

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.state.save()
            self.dirty = False


def _gather(state: RunState, dataset: SegmentationDataset, points: List[Dict[str, float]], info: DistInfo,
            seconds: float) -> GridResult:
    """Sum the matrices over processes; check that every selected image was counted or skipped once."""
    barrier(info)
    # every process read the same earlier-attempt files: add them once, after the sum
    cm = all_reduce_sum(state.cm, info) + state.foreign_cm
    gathered = all_gather_objects((len(state.done), state.skipped), info)
    counted = sum(n for n, _ in gathered) + len(state.foreign_done)
    skipped = [s for _, sk in gathered for s in sk] + state.foreign_skipped
    if counted != len(dataset):
        raise RuntimeError(f"{counted} images accounted for, but the dataset selection has {len(dataset)}")
    return GridResult(points=points, cm=cm, class_names=list(dataset.display_names),
                      num_images=counted - len(skipped), skipped=skipped, seconds=seconds)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# outputs


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v)
                    for v in r])
    return buf.getvalue()


def describe_run(cfg: Any, seg: Any, dataset: SegmentationDataset) -> Dict[str, Any]:
    """What a results file needs to say which model and protocol produced it (the summary reads this)."""
    m = cfg.method
    return {
        "dataset": dataset.name,
        "method": str(m.name),
        "postprocess": str(cfg.postprocess.name) if "postprocess" in cfg else "none",
        "clip": f"{cfg.clip.name}/{cfg.clip.pretrained}",
        "vfm": str(cfg.vfm.name) if getattr(seg, "vfm", None) is not None else "none",  # none: the method uses none
        "vfm_layer": int(cfg.vfm.layer),
        "vfm_feature": str(cfg.vfm.feature),
        "vfm_norm": bool(cfg.vfm.norm),
        "weights": str(cfg.weights.source) + ("" if str(cfg.weights.source) != "random" else f"(seed {cfg.weights.seed})"),
        "random_weights": bool(getattr(seg, "random_weights", False)),
        "model_key": seg.key,
        "device": str(cfg.device),
        "precision": str(cfg.precision),
        "protocol": {k: _plain(m[k]) for k in ("short_side", "max_long_side", "crop", "stride")},
        "limit": cfg.get("limit"),
        "limit_seed": cfg.get("limit_seed"),
        "experiment": cfg.get("experiment_name"),
    }


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def write_eval_outputs(run_dir: Path, result: GridResult, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics.json`` and ``per_class.csv`` in ``run_dir``. Returns the metrics dict written."""
    m = result.metrics[0]
    out = dict(meta)
    out.update(params=result.points[0], num_images=result.num_images, num_skipped=len(result.skipped),
               skipped=result.skipped, seconds=round(result.seconds, 2), mIoU=m["mIoU"], aAcc=m["aAcc"],
               mAcc=m["mAcc"], num_pixels=m["num_pixels"], per_class=m["per_class"])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "metrics.json", json.dumps(_json_safe(out), indent=2))
    rows = [[i, r["class"], r["IoU"], r["Acc"], r["gt_pixels"], r["pred_pixels"]] for i, r in enumerate(m["per_class"])]
    atomic_write(run_dir / "per_class.csv", _csv_text(["index", "class", "IoU", "Acc", "gt_pixels", "pred_pixels"], rows))
    return out


def sweep_rows(result: GridResult) -> List[List[Any]]:
    return [[p.get(k) for k in PARAMS] + [m["mIoU"], m["aAcc"], m["mAcc"]] for p, m in zip(result.points, result.metrics)]


def write_sweep_outputs(run_dir: Path, result: GridResult, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``sweep.csv`` (one row a point), ``sweep_per_class.csv`` (one row a point and class), ``sweep.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = list(PARAMS) + ["mIoU", "aAcc", "mAcc"]
    atomic_write(run_dir / "sweep.csv", _csv_text(header, sweep_rows(result)))
    long_rows = []
    for p, m in zip(result.points, result.metrics):
        for i, r in enumerate(m["per_class"]):
            long_rows.append([p[k] for k in PARAMS] + [i, r["class"], r["IoU"], r["Acc"]])
    atomic_write(run_dir / "sweep_per_class.csv", _csv_text(list(PARAMS) + ["index", "class", "IoU", "Acc"], long_rows))
    best = max(range(len(result.points)), key=lambda g: -1.0 if math.isnan(result.metrics[g]["mIoU"])
               else result.metrics[g]["mIoU"])
    out = dict(meta)
    out.update(num_images=result.num_images, num_skipped=len(result.skipped), skipped=result.skipped,
               seconds=round(result.seconds, 2), best={**result.points[best], "mIoU": result.metrics[best]["mIoU"]},
               points=[{**p, "mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"],
                        "IoU": {r["class"]: r["IoU"] for r in m["per_class"]}}
                       for p, m in zip(result.points, result.metrics)])
    atomic_write(run_dir / "sweep.json", json.dumps(_json_safe(out), indent=2))
    return out
