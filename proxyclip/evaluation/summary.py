"""The paper-style table: one row per method/backbone, one column per dataset, plus the average.

Reads every ``metrics.json`` below the given folders (e.g. a ``proxyclip-eval -m`` multirun
folder, or several), groups results by (method, CLIP, VFM, weights, hyperparameters, subset),
and writes ``summary.md`` and ``summary.csv``. The average is over the columns shown; a row
missing a dataset gets its average over the datasets it has, marked with ``*``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# column order of REFERENCE.md section 7
PAPER_DATASETS: Tuple[str, ...] = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                   "cityscapes", "ade20k")
HEADERS = {"voc21": "VOC21", "context60": "PC60", "coco_object": "Object", "voc20": "VOC20", "context59": "PC59",
           "coco_stuff": "Stuff", "cityscapes": "City", "ade20k": "ADE", "context459": "PC459", "ade847": "ADE847"}
# published mIoU, REFERENCE.md section 7 (no post-processing)
PUBLISHED: Dict[str, Tuple[float, ...]] = {
    "CLIP ViT-B/16 (vanilla) [paper]": (16.4, 8.4, 5.6, 41.9, 9.2, 4.4, 5.0, 2.9),
    "SCLIP B/16 [paper]": (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1),
    "NACLIP B/16 [paper]": (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4),
    "ProxyCLIP B/16 + DINO B/8 [paper]": (61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2),
    "ProxyCLIP L/14 + DINO B/8 [paper]": (60.6, 34.5, 39.2, 83.2, 37.7, 25.6, 40.1, 22.6),
    "ProxyCLIP H/14 (LAION) + DINO B/8 [paper]": (65.0, 35.4, 38.6, 83.3, 39.6, 26.8, 42.0, 24.2),
}


def collect(paths: Iterable[Path]) -> List[dict]:
    """Every ``metrics.json`` below ``paths`` (files or folders), newest last."""
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(p.rglob("metrics.json"))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (give proxyclip-eval run or multirun folders)")
    records = []
    for f in sorted(set(files), key=lambda q: q.stat().st_mtime):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not a metrics.json written by proxyclip-eval ({e})") from e
        if "dataset" not in r or "mIoU" not in r:
            raise ValueError(f"{f}: missing 'dataset' or 'mIoU'; not a metrics.json written by proxyclip-eval")
        r["_path"] = str(f)
        records.append(r)
    return records


def _row_key(r: dict) -> tuple:
    p = r.get("params", {})
    return (r.get("method", "?"), r.get("clip", "?"), r.get("vfm", "?"), r.get("weights", "?"),
            p.get("beta"), p.get("gamma"), p.get("logit_scale"), r.get("limit"), r.get("limit_seed"))


def _row_label(key: tuple, show_params: bool) -> str:
    method, clip, vfm, weights, beta, gamma, logit_scale, limit, seed = key
    label = f"{method} {clip}" + ("" if vfm == "none" else f" + {vfm}")
    if str(weights).startswith("random"):
        label += " [random weights]"
    elif weights not in ("pretrained", "?"):
        label += f" [{weights}]"
    if show_params:
        label += f" (beta {beta:g}, gamma {gamma:g}, scale {logit_scale:g})"
    if limit:
        label += f" [subset {limit}, seed {seed}]"
    return label


def build_table(records: Sequence[dict], datasets: Optional[Sequence[str]] = None,
                paper: bool = False) -> Tuple[List[str], List[List[object]]]:
    """Columns and rows: ``[label, mIoU per dataset (None if missing)..., average]``."""
    if datasets is None:
        present = {r["dataset"] for r in records}
        datasets = [d for d in PAPER_DATASETS] + sorted(present - set(PAPER_DATASETS))
        if not paper:
            datasets = [d for d in datasets if d in present] or list(PAPER_DATASETS)
    cells: Dict[tuple, Dict[str, float]] = {}
    for r in records:  # newest last: a rerun replaces an older result
        cells.setdefault(_row_key(r), {})[r["dataset"]] = r["mIoU"]
    params = {k[4:7] for k in cells}
    show_params = len(params) > 1
    columns = ["method"] + [HEADERS.get(d, d) for d in datasets] + ["avg"]
    rows: List[List[object]] = []
    if paper:
        for name, vals in PUBLISHED.items():
            by = dict(zip(PAPER_DATASETS, vals))
            rows.append([name] + [by.get(d) for d in datasets] + [_avg([by.get(d) for d in datasets])])
    for key in sorted(cells, key=lambda k: tuple(str(x) for x in k)):
        vals = [cells[key].get(d) for d in datasets]
        rows.append([_row_label(key, show_params)] + vals + [_avg(vals)])
    return columns, rows


def _avg(vals: Sequence[Optional[float]]) -> Optional[str]:
    got = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not got:
        return None
    mark = "" if len(got) == len(vals) else "*"
    return f"{sum(got) / len(got):.1f}{mark}"


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.1f}"
    return str(v)


def to_markdown(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    if any(isinstance(r[-1], str) and r[-1].endswith("*") for r in rows):
        lines.append("")
        lines.append("\\* average over the datasets this row has (some are missing)")
    return "\n".join(lines) + "\n"


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def summarize(paths: Iterable[Path], out_dir: Optional[Path] = None, paper: bool = False,
              datasets: Optional[Sequence[str]] = None) -> str:
    """Collect, tabulate, write ``summary.md`` / ``summary.csv`` into ``out_dir`` (if given); return the markdown."""
    records = collect(paths)
    if not records:
        raise FileNotFoundError(f"no metrics.json found below {', '.join(str(p) for p in paths)}")
    columns, rows = build_table(records, datasets, paper)
    md = to_markdown(columns, rows)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.md").write_text(md)
        (out_dir / "summary.csv").write_text(to_csv(columns, rows))
    return md
