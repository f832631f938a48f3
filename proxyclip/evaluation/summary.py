"""Paper-layout tables from ``proxyclip-eval`` results (``proxyclip-summary``; see ``docs/tables.md``).

Reads every ``metrics.json`` below the given folders and builds one kind of table:

- ``main``: one row per (method, CLIP, VFM, setting), one column per benchmark in the paper's
  order, plus the average; a published number (:mod:`.published`) is shown beside each measured
  one with the difference (measured - published).
- ``methods``: the same layout, rows in the order clip, maskclip, sclip, clearclip, naclip,
  proxyclip, published ViT-B/16 rows of each method's own paper beside them.
- ``vfm``: rows = VFM, columns = CLIP, cell = mean mIoU over the datasets (and one table a dataset).
- ``beta_gamma``: rows = beta, columns = gamma; ``norm_mask``: rows = shift, columns = mask
  (one grid a dataset, plus their average).

A "setting" column names whatever else tells rows apart: hyperparameters that differ between
runs of the same dataset and model, non-pretrained weights, a VFM layer or feature other than
the default, post-processing, an image subset.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .published import (
    COLLECTIONS,
    PAPER_DATASETS,
    REFERENCE_ROWS,
    PublishedRow,
    find_published,
    published_average,
)

HEADERS = {"voc21": "VOC21", "context60": "PC60", "coco_object": "Object", "voc20": "VOC20", "context59": "PC59",
           "coco_stuff": "Stuff", "cityscapes": "City", "ade20k": "ADE", "context459": "PC459", "ade847": "ADE847"}
KINDS = ("main", "methods", "vfm", "beta_gamma", "norm_mask")
PRESET_KINDS = {"paper_main": "main", "paper_methods": "methods", "paper_vfm": "vfm",
                "paper_beta_gamma": "beta_gamma", "paper_norm_mask": "norm_mask"}
METHOD_ORDER = ("clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip")
CLIP_ORDER = ("ViT-B-16/openai", "ViT-L-14/openai", "ViT-H-14/laion2b_s32b_b79k")
VFM_ORDER = ("dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "sam_vitb", "mae_vitb16")
# fields that always identify a row, with the value a record without them gets
BASE_FIELDS: Dict[str, Any] = {"method": "?", "clip": "?", "vfm": "none", "weights": "pretrained", "vfm_layer": -1,
                               "vfm_feature": "tokens", "postprocess": "none", "limit": None, "limit_seed": 0}
# the value of a base field that needs no mention in the "setting" column
UNREMARKABLE: Dict[str, Any] = {"weights": "pretrained", "vfm_layer": -1, "vfm_feature": "tokens",
                                "postprocess": "none", "limit": None}
NO_PUBLISHED_NOTE = "No published numbers for this table in our docs: measured mIoU only."


# ----------------------------------------------------------------------------------------------
# records


def collect(paths: Iterable[Path]) -> List[dict]:
    """Every ``metrics.json`` below ``paths`` (files or folders), oldest first."""
    files: List[Path] = []
    for p in map(Path, paths):
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
        if not isinstance(r, dict) or "dataset" not in r or "mIoU" not in r:
            raise ValueError(f"{f}: missing 'dataset' or 'mIoU'; not a metrics.json written by proxyclip-eval")
        r["_path"] = str(f)
        records.append(r)
    return records


def default_kind(records: Sequence[dict]) -> str:
    """The table kind of the preset the records were run with (``experiment``), else ``main``."""
    names = {r.get("experiment") for r in records} - {None}
    return PRESET_KINDS.get(names.pop(), "main") if len(names) == 1 else "main"


def _params(r: dict) -> dict:
    return r.get("params") or {}


def param_value(r: dict, key: str) -> Any:
    """``params[key]`` of a record; if absent, ``method.<key>`` of the run's resolved Hydra config
    (``.hydra/config.yaml`` beside its metrics.json), else None."""
    if key in _params(r):
        return _params(r)[key]
    return _hydra_method(str(Path(r.get("_path", "")).parent)).get(key)


@functools.lru_cache(maxsize=None)
def _hydra_method(run_dir: str) -> dict:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not run_dir or not path.is_file():
        return {}
    from omegaconf import OmegaConf

    method = OmegaConf.to_container(OmegaConf.load(path)).get("method") or {}
    return method if isinstance(method, dict) else {}


def row_params(records: Sequence[dict], exclude: Sequence[str] = ()) -> List[str]:
    """Hyperparameters that tell rows apart: those differing between two records of the same
    dataset and base fields (a dataset's own protocol, e.g. its prob_thd, is not one)."""
    seen: Dict[tuple, Dict[str, set]] = {}
    for r in records:
        group = seen.setdefault((r["dataset"],) + tuple(_base(r, exclude)), {})
        for k, v in _params(r).items():
            group.setdefault(k, set()).add(_hashable(v))
    keys = {k for group in seen.values() for k, vals in group.items() if len(vals) > 1}
    return sorted(keys - set(exclude))


def _base(r: dict, exclude: Sequence[str] = ()) -> List[Any]:
    return [r.get(f, d) for f, d in BASE_FIELDS.items() if f not in exclude]


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def setting_label(r: dict, params: Sequence[str], fields: Sequence[str] = ()) -> str:
    """What else identifies ``r``'s row: ``fields`` (base fields named always), non-default base
    fields, and the row-telling ``params``."""
    parts = [f"{k}={fmt(r.get(k, BASE_FIELDS[k]))}" for k in fields]
    parts += [f"{k}={fmt(r.get(k, BASE_FIELDS[k]))}" for k, plain in UNREMARKABLE.items()
              if r.get(k, BASE_FIELDS[k]) != plain]
    if r.get("limit"):
        parts.append(f"limit_seed={r.get('limit_seed', 0)}")
    parts += [f"{k}={fmt(_params(r).get(k))}" for k in params]
    return " ".join(parts)


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.1f}" if v.is_integer() else f"{v:g}"
    return "-" if v is None else str(v)


def order_key(value: Any, preferred: Sequence[Any] = ()) -> tuple:
    """Preferred values first (in their order), then numbers ascending, then the rest by name."""
    if value in preferred:
        return (0, preferred.index(value), 0, "")
    if isinstance(value, (int, float)):
        return (1, 0, value, "")
    return (2, 0, 0, str(value))


# ----------------------------------------------------------------------------------------------
# tables


@dataclass
class Cell:
    """A measured mIoU (or mean of several) and the published one it is compared with."""

    value: Optional[float] = None
    published: Optional[float] = None
    partial: bool = False  # a mean over fewer datasets than the table's columns

    @property
    def diff(self) -> Optional[float]:
        if self.value is None or self.published is None or math.isnan(self.value):
            return None
        return self.value - self.published


@dataclass
class Table:
    name: str  # "main", "methods", "average", or a dataset key
    title: str
    label_columns: List[str]
    value_columns: List[str]
    rows: List[Tuple[List[str], List[Cell]]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    with_published: bool = False


def _mean(values: Sequence[Optional[float]]) -> Tuple[Optional[float], bool]:
    """(mean of the present, non-NaN values or None, whether some were missing)."""
    got = [v for v in values if v is not None and not math.isnan(v)]
    return (sum(got) / len(got) if got else None), len(got) < len(values)


def _columns(records: Sequence[dict], datasets: Optional[Sequence[str]], paper: bool) -> List[str]:
    if datasets:
        return list(datasets)
    present = {r["dataset"] for r in records}
    ordered = [d for d in PAPER_DATASETS if paper or d in present]
    return ordered + sorted(present - set(PAPER_DATASETS))


def _paper_config(r: dict) -> bool:
    """Published numbers are for the default VFM layer and feature, without post-processing."""
    return all(r.get(k, BASE_FIELDS[k]) == UNREMARKABLE[k] for k in ("vfm_layer", "vfm_feature", "postprocess"))


def _benchmark_row(label: List[str], by_dataset: Dict[str, float], columns: Sequence[str],
                   pub: Optional[PublishedRow]) -> Tuple[List[str], List[Cell]]:
    """A cell per dataset column, then the average. A measured row (``by_dataset`` not empty) gets
    published numbers beside its measured cells only; a reference row (empty) the published ones."""
    published = pub.by_dataset if pub else {}
    compared = [d for d in columns if d in by_dataset] if by_dataset else list(columns)
    cells = [Cell(by_dataset.get(d), published.get(d) if d in compared else None) for d in columns]
    mean, partial = _mean([by_dataset.get(d) for d in columns]) if by_dataset else (None, False)
    cells.append(Cell(mean, published_average(pub, compared) if pub and compared else None, partial))
    return label, cells


def benchmark_table(records: Sequence[dict], kind: str = "main", datasets: Optional[Sequence[str]] = None,
                    paper: bool = False) -> Table:
    """The ``main`` / ``methods`` table: rows = (method, CLIP, VFM, setting), columns = datasets + avg.

    ``paper=True``: all eight benchmark columns, and the published rows no measured row matches
    (as reference rows, published numbers only).
    """
    columns = _columns(records, datasets, paper)
    params = row_params(records)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for r in records:  # oldest first: a rerun replaces an older result
        g = groups.setdefault(tuple(_base(r)) + tuple(_hashable(_params(r).get(k)) for k in params),
                              {"record": r, "cells": {}})
        g["cells"][r["dataset"]] = r["mIoU"]
    entries, used = [], []
    for g in groups.values():
        r = g["record"]
        pub = find_published(r.get("method", "?"), r.get("clip", "?"), r.get("vfm", "none"), COLLECTIONS[kind]) \
            if _paper_config(r) else None
        used += [pub] if pub and pub not in used else []
        label = [str(r.get("method", "?")), str(r.get("clip", "?")), str(r.get("vfm", "none")), setting_label(r, params)]
        entries.append((_row_order(r.get("method"), r.get("clip"), r.get("vfm"), label[-1]),
                        _benchmark_row(label, g["cells"], columns, pub)))
    for pub in (p for p in REFERENCE_ROWS[kind] if paper and p not in used):
        entries.append((_row_order(pub.method, pub.clip, pub.vfm, "~"),
                        _benchmark_row([pub.label, pub.clip, pub.vfm or "-", "published"], {}, columns, pub)))
        used.append(pub)
    table = Table(kind, f"{kind}: mIoU (%)", ["method", "CLIP", "VFM", "setting"],
                  [HEADERS.get(d, d) for d in columns] + ["avg"], with_published=True)
    table.rows = [row for _, row in sorted(entries, key=lambda e: e[0])]
    table.notes = _benchmark_notes(table, used)
    return table


def _row_order(method: Any, clip: Any, vfm: Any, setting: str) -> tuple:
    return (order_key(method, METHOD_ORDER), order_key(clip, CLIP_ORDER), order_key(vfm, VFM_ORDER), setting)


def _benchmark_notes(table: Table, used: Sequence[PublishedRow]) -> List[str]:
    notes = ["Cells: measured (published, measured - published)." if used else
             "No published row matches these runs: measured mIoU only."]
    if any(cells[-1].partial for _, cells in table.rows):
        notes.append("\\* average over the datasets this row has (some are missing); "
                     "its published average is over the same datasets.")
    sources: Dict[str, List[str]] = {}
    for p in used:
        sources.setdefault(p.source, []).append(p.label)
    notes += [f"Published {', '.join(labels)}: {source}." for source, labels in sources.items()]
    return notes


@dataclass(frozen=True)
class Pivot:
    """A grid table: rows = ``row_of(record)``, columns = ``col_of(record)``."""

    kind: str
    row_title: str
    col_title: str
    row_of: Callable[[dict], Any]
    col_of: Callable[[dict], Any]
    axes: Tuple[str, ...]  # the fields the axes read (left out of the "setting" column)
    row_order: Tuple[Any, ...] = ()
    col_order: Tuple[Any, ...] = ()


PIVOTS = {
    "vfm": Pivot("vfm", "VFM", "CLIP", lambda r: r.get("vfm", "none"), lambda r: r.get("clip", "?"),
                 ("vfm", "clip"), VFM_ORDER, CLIP_ORDER),
    "beta_gamma": Pivot("beta_gamma", "beta", "gamma", lambda r: param_value(r, "beta"),
                        lambda r: param_value(r, "gamma"), ("beta", "gamma")),
    "norm_mask": Pivot("norm_mask", "shift", "mask", lambda r: param_value(r, "shift"),
                       lambda r: param_value(r, "mask"), ("shift", "mask")),
}


def pivot_tables(records: Sequence[dict], pivot: Pivot) -> List[Table]:
    """One grid per dataset (mIoU), preceded by their mean when there are several datasets."""
    params = row_params(records, exclude=pivot.axes)
    varying = [f for f in ("method", "clip", "vfm") if f not in pivot.axes and len({r.get(f) for r in records}) > 1]
    grid: Dict[Tuple[Any, str], Dict[Any, Dict[str, float]]] = {}
    for r in records:  # oldest first: a rerun replaces an older result
        row = (_hashable(pivot.row_of(r)), setting_label(r, params, varying))
        grid.setdefault(row, {}).setdefault(_hashable(pivot.col_of(r)), {})[r["dataset"]] = r["mIoU"]
    datasets = [d for d in PAPER_DATASETS if any(r["dataset"] == d for r in records)]
    datasets += sorted({r["dataset"] for r in records} - set(datasets))
    rows = sorted(grid, key=lambda k: (order_key(k[0], pivot.row_order), k[1]))
    cols = sorted({c for cells in grid.values() for c in cells}, key=lambda c: order_key(c, pivot.col_order))
    settings = {setting for _, setting in rows}
    with_setting = len(settings) > 1  # one setting shared by all rows is said once, in a note
    shared = [f"All runs: {settings.pop()}."] if len(settings) == 1 and "" not in settings else []
    names = (["average"] if len(datasets) > 1 else []) + datasets
    tables = []
    for name in names:
        subset = datasets if name == "average" else [name]
        title = (f"{pivot.kind}: mean mIoU (%) over {', '.join(HEADERS.get(d, d) for d in datasets)}"
                 if name == "average" else f"{pivot.kind}: mIoU (%) on {HEADERS.get(name, name)}")
        table = Table(name, title, [pivot.row_title] + (["setting"] if with_setting else []),
                      [f"{pivot.col_title}={fmt(c)}" for c in cols], notes=shared + [NO_PUBLISHED_NOTE])
        for key in rows:
            label = [fmt(key[0])] + ([key[1]] if with_setting else [])
            table.rows.append((label, [_pivot_cell(grid[key].get(c, {}), subset) for c in cols]))
        if any(c.partial for _, cells in table.rows for c in cells):
            table.notes.insert(0, "\\* mean over the datasets this cell has (some are missing).")
        tables.append(table)
    return tables


def _pivot_cell(by_dataset: Dict[str, float], datasets: Sequence[str]) -> Cell:
    mean, partial = _mean([by_dataset.get(d) for d in datasets])
    return Cell(mean, partial=partial and mean is not None)


def build_tables(records: Sequence[dict], kind: Optional[str] = None, datasets: Optional[Sequence[str]] = None,
                 paper: bool = False) -> List[Table]:
    """The tables of ``kind`` (None: :func:`default_kind`) for ``records`` (limited to ``datasets``)."""
    kind = kind or default_kind(records)
    if kind not in KINDS:
        raise ValueError(f"unknown table {kind!r}: choose one of {', '.join(KINDS)}")
    if datasets:
        records = [r for r in records if r["dataset"] in datasets]
        if not records:
            raise ValueError(f"no results for the datasets {', '.join(datasets)}")
    if kind in PIVOTS:
        return pivot_tables(records, PIVOTS[kind])
    return [benchmark_table(records, kind, datasets, paper)]


# ----------------------------------------------------------------------------------------------
# output


def cell_text(c: Cell) -> str:
    """``61.0 (61.3, -0.3)``: measured (published, difference of the numbers shown); ``-`` if none."""
    if c.value is None:
        return "-" if c.published is None else f"({c.published:.1f})"
    if math.isnan(c.value):
        return "nan"
    shown = f"{c.value:.1f}" + ("*" if c.partial else "")
    if c.published is None:
        return shown
    diff = round(round(c.value, 1) - round(c.published, 1), 1) + 0.0  # of the numbers shown; no "-0.0"
    return f"{shown} ({c.published:.1f}, {diff:+.1f})"


def to_markdown(tables: Sequence[Table]) -> str:
    out: List[str] = []
    for t in tables:
        header = t.label_columns + t.value_columns
        out += [f"**{t.title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(label + [cell_text(c) for c in cells]) + " |" for label, cells in t.rows]
        out += [""] + [f"- {note}" for note in t.notes] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def csv_columns(t: Table) -> List[str]:
    """``table``, the label columns, then per value column: measured[, published, diff]."""
    cols = ["table"] + t.label_columns
    for c in t.value_columns:
        cols += [c, f"{c} published", f"{c} diff"] if t.with_published else [c]
    return cols


def csv_rows(t: Table) -> List[List[Any]]:
    rows = []
    for label, cells in t.rows:
        row: List[Any] = [t.name] + label
        for c in cells:
            row += [c.value, c.published, c.diff] if t.with_published else [c.value]
        rows.append(row)
    return rows


def to_csv(tables: Sequence[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(csv_columns(tables[0]))
    for t in tables:
        for row in csv_rows(t):
            w.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def log_tables(tables: Sequence[Table], logger_cfg: Any, run_config: Dict[str, Any], group: Optional[str]) -> Optional[str]:
    """Each table as a W&B table ``summary/<name>`` in one run; returns the run's folder (None if disabled)."""
    from ..loggers import build_logger

    kind = run_config.get("table", "summary")
    with build_logger(logger_cfg, run_config, name=f"summary-{kind}", group=group, job_type="summary") as log:
        for t in tables:
            log.log_table(f"summary/{t.name}", csv_columns(t), csv_rows(t))
        return getattr(log, "run_dir", None)


def summarize(paths: Iterable[Path], out_dir: Optional[Path] = None, paper: bool = False,
              datasets: Optional[Sequence[str]] = None, kind: Optional[str] = None,
              logger_cfg: Any = None) -> str:
    """Collect, tabulate, write ``summary.md`` / ``summary.csv`` into ``out_dir`` (if given), log to
    W&B with ``logger_cfg`` (if given); return the markdown."""
    paths = list(paths)
    records = collect(paths)
    if not records:
        raise FileNotFoundError(f"no metrics.json found below {', '.join(str(p) for p in paths)}")
    kind = kind or default_kind(records)
    tables = build_tables(records, kind, datasets, paper)
    md = to_markdown(tables)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.md").write_text(md)
        (out_dir / "summary.csv").write_text(to_csv(tables))
    if logger_cfg is not None:
        experiments = sorted({str(r.get("experiment")) for r in records if r.get("experiment")})
        log_tables(tables, logger_cfg, {"table": kind, "paths": [str(p) for p in paths], "experiments": experiments},
                   group=experiments[0] if len(experiments) == 1 else None)
    return md
