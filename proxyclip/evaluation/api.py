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
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from ..config import hydra_output_dir
from ..devices import resolve_runtime
from ..data import SegmentationDataset, build_dataset
from ..specs import EncodeSpec, differing
from .cache import FeatureCache
from .distributed import DistInfo, cleanup, init_distributed
from .grid import grid_axes, grid_points, sweepable
from .outputs import (METRICS, best_point, run_record, sweep_axes, sweep_figure, sweep_rows, wandb_config,
                      write_eval_outputs, write_sweep_outputs)
from .runner import GridResult, run_grid, select_indices, selection_record

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
        check_segmenter_matches(seg, cfg)
    return seg, dataset


def check_segmenter_matches(seg, cfg: DictConfig) -> None:
    """A Segmenter passed in must encode exactly as ``cfg`` (with the dataset's protocol) says:
    its encode spec equals the one ``cfg`` gives, field by field."""
    want = EncodeSpec.from_config(cfg, random_weights=seg.random_weights, uses_vfm=seg.vfm is not None)
    diff = differing(seg.encode_spec.record(), want.record())
    if diff:
        detail = "; ".join(f"{k}={a!r} in the Segmenter, {b!r} in this config" for k, (a, b) in diff.items())
        raise ValueError(f"the Segmenter was built with other encode settings ({detail}); build it from this config")


def _resolve_run_dir(cfg: DictConfig, run_dir: Optional[os.PathLike]) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    if cfg.get("run_dir"):
        return Path(str(cfg.run_dir))
    if hydra_output_dir():
        return Path(hydra_output_dir())
    raise ValueError("no run directory: pass run_dir=... (results and the resumable state are written there)")


class _Job:
    """One evaluation loop over a dataset for a grid of decode points; subclasses say which points
    and what to write. ``run`` builds the models and the dataset, runs the grid, writes, logs."""

    kind = "eval"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def axes(self, seg) -> Dict[str, List[Any]]:
        return {}

    def write(self, out_dir: Path, result: GridResult, record: Dict[str, Any], say) -> Dict[str, Any]:
        raise NotImplementedError

    def log(self, logger: Any, result: GridResult, written: Dict[str, Any]) -> None:
        raise NotImplementedError

    def run(self, run_dir: Optional[os.PathLike], seg, dataset, info: Optional[DistInfo]) -> tuple:
        cfg, own_group = self.cfg, info is None
        resolve_runtime(cfg)  # device/precision "auto" -> this machine's values (saved with the run's config)
        info = info or init_distributed(str(cfg.device))
        say = _say(info)
        try:
            seg, dataset = _prepare(cfg, info, seg, dataset)
            axes = self.axes(seg)  # checked against the method's knobs before any image is read
            points = grid_points(cfg, axes, dataset.class_names)  # this run's config, not the Segmenter's
            out_dir = _resolve_run_dir(cfg, run_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            say(f"{self.kind}: {dataset.name}, {len(dataset)} images, {dataset.num_classes} classes, "
                f"{len(points)} decode point(s), {info.world_size} process(es), device {cfg.device}, "
                f"precision {cfg.precision} -> {out_dir}")
            if getattr(seg, "random_weights", False):
                say("note: random weights; numbers are not comparable to the paper's")
            cache = FeatureCache(str(cfg.cache_dir), seg, print_fn=say) if cfg.get("cache_dir") else None
            selection = selection_record(dataset, cfg)
            record = run_record(cfg, seg, selection)
            logger = None
            if info.is_main and cfg.get("logger") is not None:
                from ..loggers import build_logger

                decode = points[0][1].record() if self.kind == "eval" else None
                logger = build_logger(cfg.logger, wandb_config(record, self.kind, decode, list(axes)),
                                      job_type=self.kind)
            try:
                result = run_grid(seg, dataset, [spec for _, spec in points], out_dir, selection=selection,
                                  resume=bool(cfg.get("resume", True)), info=info, cache=cache,
                                  checkpoint_seconds=float(cfg.get("checkpoint_seconds", 10.0)),
                                  progress=bool(cfg.get("progress", True)), logger=logger,
                                  log_images=int(cfg.get("log_images", 0) or 0), print_fn=say,
                                  num_workers=cfg.get("num_workers"))
                result.values = [values for values, _ in points]
                written = None
                if info.is_main:
                    written = self.write(out_dir, result, record, say)
                    if logger is not None:
                        self.log(logger, result, written)
                if cache is not None:
                    say(f"feature cache: {cache.hits} hits, {cache.misses} misses, {cache.writes} written")
                return result, written
            finally:
                if logger is not None:
                    logger.finish()
        finally:
            if own_group:
                cleanup(info)


class EvalJob(_Job):
    """``proxyclip-eval``: the configured decode, one confusion matrix."""

    kind = "eval"

    def write(self, out_dir, result, record, say):
        written = write_eval_outputs(out_dir, result, record)
        say(f"{result_name(record)}: mIoU {written['mIoU']:.2f}  aAcc {written['aAcc']:.2f}  mAcc {written['mAcc']:.2f}  "
            f"({result.num_images} images, {result.seconds:.1f} s) -> {out_dir / 'metrics.json'}")
        return written

    def log(self, logger, result, written):
        m = result.metrics[0]
        metrics = {k: m[k] for k in METRICS}
        logger.log_metrics({**metrics, "num_images": result.num_images,
                            **{f"IoU/{r['class']}": r["IoU"] for r in m["per_class"]}})
        logger.log_table("per_class", ["class", "IoU", "Acc", "gt_pixels", "pred_pixels"],
                         [[r["class"], r["IoU"], r["Acc"], r["gt_pixels"], r["pred_pixels"]] for r in m["per_class"]])
        logger.log_summary(metrics)


class SweepJob(_Job):
    """``proxyclip-sweep``: the product of ``cfg.sweep``'s axes (any declared knob), one encode per image."""

    kind = "sweep"

    def axes(self, seg):
        method, post = str(self.cfg.method.name), str(self.cfg.postprocess.name)
        axes = grid_axes(self.cfg.get("sweep"), method, post)
        if not axes:
            raise ValueError(f"nothing to sweep: give sweep.<knob>=[v1,v2,...] for a knob of method {method}: "
                             f"{', '.join(sweepable(method, post))}")
        return axes

    def write(self, out_dir, result, record, say):
        written = write_sweep_outputs(out_dir, result, record)
        b = written["best"]
        at = " ".join(f"{k}={v}" for k, v in b["values"].items())
        say(f"{result_name(record)}: best mIoU {b['mIoU']:.2f} at {at} -> {out_dir / 'sweep.csv'}")
        return written

    def log(self, logger, result, written):
        axes = sweep_axes(result)
        logger.log_table("sweep", axes + list(METRICS), sweep_rows(result))
        for g, (v, m) in enumerate(zip(result.values, result.metrics)):
            logger.log_metrics({**v, **{k: m[k] for k in METRICS}}, step=g)
        best = best_point(result)
        logger.log_summary({"best_mIoU": result.metrics[best]["mIoU"],
                            **{f"best_{k}": v for k, v in result.values[best].items()}})
        fig = sweep_figure(result)
        if fig is not None:
            logger.log_figure("mIoU_" + "_".join(a.replace(".", "_") for a in axes[:2]), fig)


def result_name(record: Dict[str, Any]) -> str:
    return str(record["dataset"])


def evaluate(cfg: DictConfig, run_dir: Optional[os.PathLike] = None, seg=None,
             dataset: Optional[SegmentationDataset] = None, info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Evaluate ``cfg.dataset`` with the configured decode; returns what ``metrics.json`` holds.

    seg / dataset: reuse an already built Segmenter / dataset (notebooks, tests).
    Under torchrun, non-zero ranks return None.
    """
    return EvalJob(cfg).run(run_dir, seg, dataset, info)[1]


def sweep(cfg: DictConfig, run_dir: Optional[os.PathLike] = None, seg=None,
          dataset: Optional[SegmentationDataset] = None, info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Evaluate the grid ``cfg.sweep`` (``{knob: [values]}``, any declared knob) from one encode per image."""
    return SweepJob(cfg).run(run_dir, seg, dataset, info)[1]
