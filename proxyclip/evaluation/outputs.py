"""What an evaluation or a sweep writes: ``metrics.json`` + ``per_class.csv``, or ``sweep.csv`` +
``sweep_per_class.csv`` + ``sweep.json``, and the sweep's figure.

Every file says which run produced it through the run's identity only (:func:`run_record`: the
encode spec, the selection, and the decode spec of each point), so the summary, a resume and W&B
all read one description.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..files import atomic_write
from .records import order_key
from .runner import GridResult

METRICS = ("mIoU", "aAcc", "mAcc")


def run_record(cfg: Any, seg: Any, selection: Dict[str, Any]) -> Dict[str, Any]:
    """The run's identity and context: ``dataset``, ``encode`` (EncodeSpec.record), ``selection``,
    and the facts that do not change a number (experiment and protocol presets, device, whether weights
    were random)."""
    return {
        "dataset": selection["dataset"],
        "encode": seg.encode_spec.record(),
        "selection": selection,
        "experiment": cfg.get("experiment_name"),
        "protocol": None if cfg.get("protocol") is None else cfg.protocol.get("name"),
        "random_weights": bool(getattr(seg, "random_weights", False)),
        "model_key": seg.key,
        "device": str(cfg.device),
    }


def wandb_config(record: Dict[str, Any], job_type: str, decode: Optional[Dict[str, Any]] = None,
                 axes: Sequence[str] = ()) -> Dict[str, Any]:
    """The W&B run config: the same identity (W&B shows nested fields as ``encode.vfm.norm`` and can
    filter and group on each)."""
    out = {"job": job_type, "dataset": record["dataset"], "experiment": record.get("experiment"),
           "random_weights": record.get("random_weights"), "encode": record["encode"],
           "selection": record["selection"]}
    if decode is not None:
        out["decode"] = decode
    if axes:
        out["sweep_axes"] = list(axes)
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return v


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([_cell(v) for v in r])
    return buf.getvalue()


def write_eval_outputs(run_dir: Path, result: GridResult, record: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics.json`` and ``per_class.csv`` in ``run_dir``. Returns the metrics dict written."""
    m = result.metrics[0]
    out = dict(record)
    out.update(decode=result.points[0].record(), num_images=result.num_images, num_skipped=len(result.skipped),
               skipped=result.skipped, seconds=round(result.seconds, 2), mIoU=m["mIoU"], aAcc=m["aAcc"],
               mAcc=m["mAcc"], num_pixels=m["num_pixels"], per_class=m["per_class"])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "metrics.json", json.dumps(_json_safe(out), indent=2))
    rows = [[i, r["class"], r["IoU"], r["Acc"], r["gt_pixels"], r["pred_pixels"]] for i, r in enumerate(m["per_class"])]
    atomic_write(run_dir / "per_class.csv", csv_text(["index", "class", "IoU", "Acc", "gt_pixels", "pred_pixels"], rows))
    return out


def sweep_axes(result: GridResult) -> List[str]:
    return list(result.values[0]) if result.values else []


def sweep_rows(result: GridResult) -> List[List[Any]]:
    """One row per point: its swept values, then mIoU, aAcc, mAcc."""
    axes = sweep_axes(result)
    return [[v[a] for a in axes] + [m[k] for k in METRICS] for v, m in zip(result.values, result.metrics)]


def best_point(result: GridResult) -> int:
    return max(range(len(result.points)), key=lambda g: -1.0 if math.isnan(result.metrics[g]["mIoU"])
               else result.metrics[g]["mIoU"])


def write_sweep_outputs(run_dir: Path, result: GridResult, record: Dict[str, Any]) -> Dict[str, Any]:
    """``sweep.csv`` (one row a point: the swept keys, mIoU, aAcc, mAcc), ``sweep_per_class.csv``
    (one row a point and class) and ``sweep.json`` (every point's decode spec and metrics, the best)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    axes = sweep_axes(result)
    atomic_write(run_dir / "sweep.csv", csv_text(axes + list(METRICS), sweep_rows(result)))
    long_rows = [[v[a] for a in axes] + [i, r["class"], r["IoU"], r["Acc"]]
                 for v, m in zip(result.values, result.metrics) for i, r in enumerate(m["per_class"])]
    atomic_write(run_dir / "sweep_per_class.csv", csv_text(axes + ["index", "class", "IoU", "Acc"], long_rows))
    best = best_point(result)
    out = dict(record)
    out.update(axes=axes, num_images=result.num_images, num_skipped=len(result.skipped), skipped=result.skipped,
               seconds=round(result.seconds, 2),
               best={"values": result.values[best], "decode": result.points[best].record(),
                     "mIoU": result.metrics[best]["mIoU"]},
               points=[{"values": v, "decode": p.record(), **{k: m[k] for k in METRICS},
                        "IoU": {r["class"]: r["IoU"] for r in m["per_class"]}}
                       for v, p, m in zip(result.values, result.points, result.metrics)])
    atomic_write(run_dir / "sweep.json", json.dumps(_json_safe(out), indent=2))
    return out


def sweep_figure(result: GridResult, metric: str = "mIoU"):
    """The sweep's figure: a heatmap over the first two swept axes (max over any others), a line
    plot for one axis, None without axes."""
    import numpy as np

    from .. import viz

    axes = sweep_axes(result)
    if not axes:
        return None
    def values_of(a: str) -> List[Any]:  # distinct values in order (lists such as dilations by their text)
        seen: Dict[str, Any] = {}
        for v in result.values:
            seen.setdefault(json.dumps(v[a]), v[a])
        return [seen[k] for k in sorted(seen, key=lambda k: order_key(seen[k]))]

    rows = values_of(axes[0])
    cols = values_of(axes[1]) if len(axes) > 1 else [None]
    grid = np.full((len(rows), len(cols)), np.nan)
    for v, m in zip(result.values, result.metrics):
        i = rows.index(v[axes[0]])
        j = cols.index(v[axes[1]]) if len(axes) > 1 else 0
        grid[i, j] = m[metric] if np.isnan(grid[i, j]) else max(grid[i, j], m[metric])
    if len(axes) == 1:
        return viz.plot_sweep_line(grid[:, 0], rows, axes[0], metric=metric)
    return viz.plot_sweep_heatmap(grid, rows, cols, row_name=axes[0], col_name=axes[1], metric=metric)
