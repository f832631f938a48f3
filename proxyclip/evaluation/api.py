"""``evaluate(cfg)`` and ``sweep(cfg)``: what ``proxyclip-eval`` / ``proxyclip-sweep`` run, callable from Python.

    from proxyclip import compose_config
    from proxyclip.evaluation import evaluate
    cfg = compose_config("eval", ["dataset=voc21", "data_root=/datasets", "limit=50"])
    result = evaluate(cfg, run_dir="runs/voc21-50")
    result["mIoU"]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from ..config import hydra_output_dir, to_container
from ..devices import resolve_runtime
from ..data import SegmentationDataset, build_dataset
from .cache import FeatureCache
from .distributed import DistInfo, cleanup, init_distributed
from .runner import (PARAMS, GridResult, describe_run, grid_points, run_grid, select_indices, sweep_rows,
                     write_eval_outputs, write_sweep_outputs)

log = logging.getLogger(__name__)


def _say(info: DistInfo):
    def p(msg: str) -> None:
        if info.is_main:
            print(msg, flush=True)

    return p


def _prepare(cfg: DictConfig, info: DistInfo, seg=None, dataset: Optional[SegmentationDataset] = None):
    if info.backend == "nccl" and str(cfg.device).startswith("cuda"):
        cfg.device = f"cuda:{info.local_rank}"
    if dataset is None:
        dataset = build_dataset(cfg.dataset)  # fail on a bad root before loading any model
    indices = select_indices(len(dataset), cfg.get("limit"), int(cfg.get("limit_seed", 0) or 0))
    dataset = dataset.subset(indices)
    if seg is None:
        from ..pipeline import Segmenter

        seg = Segmenter.from_config(cfg)
    else:
        _check_segmenter_matches(seg, cfg)
    return seg, dataset


def _check_segmenter_matches(seg, cfg: DictConfig) -> None:
    """A Segmenter passed in must encode the way ``cfg`` (with the dataset's protocol) says."""
    fields = [("clip", "name"), ("clip", "pretrained"), ("vfm", "name"), ("weights", "source"), ("weights", "seed"),
              ("method", "short_side"), ("method", "max_long_side"), ("method", "crop"), ("method", "stride")]
    for group, key in fields:
        have, want = seg.cfg[group][key], cfg[group][key]
        if have != want:
            raise ValueError(f"the Segmenter was built with {group}.{key}={have} but this evaluation's config "
                             f"says {want} (the dataset protocol sets method.*); build it from this config")


def _resolve_run_dir(cfg: DictConfig, run_dir: Optional[os.PathLike]) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    if cfg.get("run_dir"):
        return Path(str(cfg.run_dir))
    if hydra_output_dir():
        return Path(hydra_output_dir())
    raise ValueError("no run directory: pass run_dir=... (results and the resumable state are written there)")


def _run(cfg: DictConfig, grid: Any, run_dir: Optional[os.PathLike], seg, dataset, job_type: str,
         info: Optional[DistInfo] = None) -> tuple:
    own_group = info is None
    resolve_runtime(cfg)  # device/precision "auto" -> this machine's values (saved with the run's config)
    info = info or init_distributed(str(cfg.device))
    say = _say(info)
    try:
        seg, dataset = _prepare(cfg, info, seg, dataset)
        out_dir = _resolve_run_dir(cfg, run_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        points = grid_points(seg, grid, cfg.method)
        say(f"{job_type}: {dataset.name}, {len(dataset)} images, {dataset.num_classes} classes, "
            f"{len(points)} hyperparameter point(s), {info.world_size} process(es), device {cfg.device}, "
            f"precision {cfg.precision} -> {out_dir}")
        if getattr(seg, "random_weights", False):
            say("note: random weights; numbers are not comparable to the paper's")
        cache = None
        if cfg.get("cache_dir"):
            cache = FeatureCache(str(cfg.cache_dir), seg, print_fn=say)
        logger = None
        if info.is_main and cfg.get("logger") is not None:
            from ..loggers import build_logger

            logger = build_logger(cfg.logger, to_container(cfg), job_type=job_type)
        try:
            result = run_grid(seg, dataset, points, out_dir, info=info, cache=cache,
                              checkpoint_seconds=float(cfg.get("checkpoint_seconds", 10.0)),
                              progress=bool(cfg.get("progress", True)), logger=logger,
                              log_images=int(cfg.get("log_images", 0) or 0), print_fn=say)
            meta = describe_run(cfg, seg, dataset)
            written = None
            if info.is_main:
                if job_type == "eval":
                    written = write_eval_outputs(out_dir, result, meta)
                    say(f"{dataset.name}: mIoU {written['mIoU']:.2f}  aAcc {written['aAcc']:.2f}  "
                        f"mAcc {written['mAcc']:.2f}  ({result.num_images} images, {result.seconds:.1f} s) "
                        f"-> {out_dir / 'metrics.json'}")
                else:
                    written = write_sweep_outputs(out_dir, result, meta)
                    b = written["best"]
                    say(f"{dataset.name}: best mIoU {b['mIoU']:.2f} at beta={b['beta']} gamma={b['gamma']} "
                        f"logit_scale={b['logit_scale']} prob_thd={b['prob_thd']} -> {out_dir / 'sweep.csv'}")
                if logger is not None:
                    _log_results(logger, job_type, result, written)
            if cache is not None:
                say(f"feature cache: {cache.hits} hits, {cache.misses} misses, {cache.writes} written")
            return result, written
        finally:
            if logger is not None:
                logger.finish()
    finally:
        if own_group:
            cleanup(info)


def _log_results(logger: Any, job_type: str, result: GridResult, written: Dict[str, Any]) -> None:
    if job_type == "eval":
        m = result.metrics[0]
        metrics = {"mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"], "num_images": result.num_images}
        metrics.update({f"IoU/{r['class']}": r["IoU"] for r in m["per_class"]})
        logger.log_metrics(metrics)
        logger.log_table("per_class", ["class", "IoU", "Acc", "gt_pixels", "pred_pixels"],
                         [[r["class"], r["IoU"], r["Acc"], r["gt_pixels"], r["pred_pixels"]] for r in m["per_class"]])
        logger.log_summary({"mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"]})
        return
    logger.log_table("sweep", list(PARAMS) + ["mIoU", "aAcc", "mAcc"], sweep_rows(result))
    for g, (p, m) in enumerate(zip(result.points, result.metrics)):
        logger.log_metrics({**p, "mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"]}, step=g)
    logger.log_summary({"best_mIoU": written["best"]["mIoU"], **{f"best_{k}": written["best"].get(k) for k in PARAMS}})
    fig = sweep_heatmap(result)
    if fig is not None:
        logger.log_figure("mIoU_beta_gamma", fig)


def sweep_heatmap(result: GridResult):
    """A beta x gamma mIoU heatmap (max over the other parameters), or None for a 1-D grid."""
    betas = sorted({p["beta"] for p in result.points})
    gammas = sorted({p["gamma"] for p in result.points})
    if len(betas) < 2 or len(gammas) < 2:
        return None
    import numpy as np

    from ..viz import plot_sweep_heatmap

    grid = np.full((len(betas), len(gammas)), np.nan)
    for p, m in zip(result.points, result.metrics):
        i, j = betas.index(p["beta"]), gammas.index(p["gamma"])
        grid[i, j] = m["mIoU"] if np.isnan(grid[i, j]) else max(grid[i, j], m["mIoU"])
    return plot_sweep_heatmap(grid, betas, gammas, row_name="beta", col_name="gamma", metric="mIoU")


def evaluate(cfg: DictConfig, run_dir: Optional[os.PathLike] = None, seg=None,
             dataset: Optional[SegmentationDataset] = None, info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Evaluate ``cfg.dataset`` with ``cfg.method``'s values; returns what ``metrics.json`` holds.

    seg / dataset: reuse an already built Segmenter / dataset (notebooks, tests).
    Under torchrun, non-zero ranks return None.
    """
    _, written = _run(cfg, None, run_dir, seg, dataset, "eval", info)
    return written


def sweep(cfg: DictConfig, run_dir: Optional[os.PathLike] = None, seg=None,
          dataset: Optional[SegmentationDataset] = None, info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Evaluate the grid ``cfg.sweep`` (lists of beta, gamma, logit_scale, prob_thd) from one encode per image."""
    _, written = _run(cfg, cfg.sweep, run_dir, seg, dataset, "sweep", info)
    return written
