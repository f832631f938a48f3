"""Paper-layout tables from ``proxyclip-eval`` results (``proxyclip-summary``; see ``docs/tables.md``).

Reads every ``metrics.json`` below the given folders (:mod:`.records`) and builds one kind of table:

- ``main``: one row per run identity (method, CLIP, VFM, setting), one column per benchmark in
  the paper's order, plus the average; a published number (:mod:`.published`) is shown beside a
  measured one only where the row's specs equal that published configuration in every field.
- ``methods``: the same layout, a row for every method the records have (registered or not), in
  the order of :data:`PREFERRED` then by name; published ViT-B/16 rows of each method's own paper
  beside them (under its own protocol preset: the rows of exactly that setup).
- a pivot (:func:`pivot_tables`) on any two flat fields, ``--rows KNOB --cols KNOB``: one grid
  a dataset plus their mean. ``vfm`` (rows ``vfm.name``, columns ``clip.name``), ``beta_gamma``
  and ``norm_mask`` (rows ``shift``, columns ``mask``) are named instances (:data:`PIVOTS`).

Rows whose specs differ are distinct rows; a "setting" column names the fields that differ
among the rows shown (:func:`.records.telling_fields`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .published import (
    COLLECTIONS,
    PAPER_DATASETS,
    REFERENCE_ROWS,
    PublishedRow,
    find_published,
    published_average,
    row_fields,
)
from .records import (
    ABSENT,
    DEFAULT,
    axis_value,
    PER_DATASET,
    collect,
    config_fields,
    defaults,
    field_names,
    fields_of,
    fmt,
    follows,
    identities,
    knob_names,
    label,
    order_key,
    record_overrides,
    resolve_field,
    row_key,
    telling_fields,
)
from .report import Cell, Table, cell_text, log_tables, to_csv, to_markdown  # noqa: F401 (re-exported)

HEADERS = {"voc21": "VOC21", "context60": "PC60", "coco_object": "Object", "voc20": "VOC20", "context59": "PC59",
           "coco_stuff": "Stuff", "cityscapes": "City", "ade20k": "ADE", "context459": "PC459", "ade847": "ADE847"}
PIVOTS: Dict[str, Tuple[str, str]] = {"vfm": ("vfm.name", "clip.name"), "beta_gamma": ("beta", "gamma"),
                                      "norm_mask": ("shift", "mask")}
KINDS = ("main", "methods", "methods_own") + tuple(PIVOTS)
# conf/experiment/paper_<kind>.yaml; the methods that read masks print the methods table too
PRESET_KINDS = {**{f"paper_{k}": k for k in KINDS}, "paper_methods_regions": "methods"}
# the order of the rows; a method not listed (any registered one) follows, by name
PREFERRED = {"method": ("clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "resclip", "scclip", "gem",
                        "cass", "lposs", "lposs_plus"),
             "clip.name": ("ViT-B-16", "ViT-L-14", "ViT-H-14"),
             "vfm.name": ("dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "sam_vitb", "mae_vitb16")}
LABEL_FIELDS = ("method", "clip.name", "clip.pretrained", "vfm.name", "vfm")  # main/methods: own columns
NO_PUBLISHED_NOTE = "No published numbers for this table in our docs: measured mIoU only."
PRECISION_NOTE = ("Published numbers ran in fp16 on GPUs: a run's precision is not compared; every other field "
                  "of its specs is, and it must cover every image (limit null).")


def default_kind(records: Sequence[dict]) -> str:
    """The table kind of the preset the records were run with (``experiment``), else ``main``."""
    names = {r.get("experiment") for r in records} - {None}
    return PRESET_KINDS.get(names.pop(), "main") if len(names) == 1 else "main"


def _mean(values: Sequence[Optional[float]]) -> Tuple[Optional[float], bool]:
    """(mean of the present, non-NaN values or None, whether some were missing)."""
    got = [v for v in values if v is not None and v == v]
    return (sum(got) / len(got) if got else None), len(got) < len(values)


def _datasets(records: Sequence[dict], datasets: Optional[Sequence[str]] = None, paper: bool = False) -> List[str]:
    if datasets:
        return list(datasets)
    present = {r["dataset"] for r in records}
    ordered = [d for d in PAPER_DATASETS if paper or d in present]
    return ordered + sorted(present - set(PAPER_DATASETS))


# ---------------------------------------------------------------------------------------------- main / methods
def _clip_label(f: Dict[str, Any]) -> str:
    return f"{f.get('clip.name', '?')}/{f.get('clip.pretrained', '?')}"


def _vfm_label(f: Dict[str, Any]) -> str:
    return str(f.get("vfm.name", f.get("vfm", "none")))


def _row_order(f: Dict[str, Any], setting: str) -> tuple:
    return tuple(order_key(f.get(k, ABSENT), PREFERRED.get(k, ())) for k in ("method", "clip.name")) + (
        order_key(f.get("clip.pretrained")), order_key(_vfm_label(f), PREFERRED["vfm.name"]), setting)


def _benchmark_row(label_: List[str], by_dataset: Dict[str, float], columns: Sequence[str],
                   pub: Optional[PublishedRow]) -> Tuple[List[str], List[Cell]]:
    """A cell per dataset column, then the average. A measured row (``by_dataset`` not empty) gets
    published numbers beside its measured cells only; a reference row (empty) the published ones."""
    published = pub.by_dataset if pub else {}
    compared = [d for d in columns if d in by_dataset] if by_dataset else list(columns)
    cells = [Cell(by_dataset.get(d), published.get(d) if d in compared else None) for d in columns]
    mean, partial = _mean([by_dataset.get(d) for d in columns]) if by_dataset else (None, False)
    cells.append(Cell(mean, published_average(pub, compared) if pub and compared else None, partial))
    return label_, cells


def benchmark_table(records: Sequence[dict], kind: str = "main", datasets: Optional[Sequence[str]] = None,
                    paper: bool = False) -> Table:
    """The ``main`` / ``methods`` table: a row per run identity, columns = datasets + avg.

    ``paper=True``: all eight benchmark columns, and the published rows no measured row matches
    (as reference rows, published numbers only).
    """
    columns = _datasets(records, datasets, paper)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for r, ident in zip(records, identities(records)):  # oldest first: a rerun replaces an older result
        g = groups.setdefault(row_key(ident), {"ident": ident, "cells": {}, "records": {}})
        g["cells"][r["dataset"]] = r["mIoU"]
        g["records"][r["dataset"]] = r
    setting = telling_fields([g["ident"] for g in groups.values()], LABEL_FIELDS, field_names(records),
                             knob_names(records))
    entries, used = [], []
    for g in groups.values():
        f = g["ident"]
        pub = find_published(list(g["records"].values()), COLLECTIONS[kind])
        used += [pub] if pub and pub not in used else []
        first = next(iter(g["records"].values()))
        lab = [str(f.get("method")), _clip_label(f), _vfm_label(f), label(f, setting, defaults(first))]
        entries.append((_row_order(f, lab[-1]), _benchmark_row(lab, g["cells"], columns, pub)))
    for pub in (p for p in REFERENCE_ROWS[kind] if paper and p not in used):
        f = row_fields(pub, PAPER_DATASETS[0])
        entries.append((_row_order(f, "~"), _benchmark_row([pub.label, _clip_label(f), _vfm_label(f) if
                                                             "vfm.name" in f else "-", "published"], {}, columns, pub)))
        used.append(pub)
    table = Table(kind, f"{kind}: mIoU (%)", ["method", "CLIP", "VFM", "setting"],
                  [HEADERS.get(d, d) for d in columns] + ["avg"], with_published=True)
    table.rows = [row for _, row in sorted(entries, key=lambda e: e[0])]
    table.notes = _shared_note(records, [g["ident"] for g in groups.values()], setting + list(LABEL_FIELDS)) + \
        _benchmark_notes(table, sorted(used, key=COLLECTIONS[kind].index))
    return table


def _benchmark_notes(table: Table, used: Sequence[PublishedRow]) -> List[str]:
    notes = ["Cells: measured (published, measured - published)." if used else
             "No published row matches these runs (same specs in every field): measured mIoU only."]
    if any(cells[-1].partial for _, cells in table.rows):
        notes.append("\\* average over the datasets this row has (some are missing); "
                     "its published average is over the same datasets.")
    sources: Dict[str, List[str]] = {}
    for p in used:
        sources.setdefault(p.source, []).append(p.label)
    notes += [f"Published {', '.join(labels)}: {source}." for source, labels in sources.items()]
    own = [p.label for p in used if p.own_protocol]
    if own:
        notes.append(f"{', '.join(own)}: published under the paper's own protocol; measured under ProxyCLIP's.")
    if used:
        notes.append(PRECISION_NOTE)
    return notes


# ---------------------------------------------------------------------------------------------- pivots
def pivot_tables(records: Sequence[dict], rows: str, cols: str, kind: Optional[str] = None) -> List[Table]:
    """A grid on two flat fields (``rows`` and ``cols``, aliases allowed: ``method.beta``): one a
    dataset (mIoU), preceded by their mean when there are several datasets.

    Fields that follow an axis (``clip.pretrained`` with ``clip.name`` as columns) travel with it;
    any other field that differs goes to the "setting" column; one shared by every row is said once.
    """
    rf, cf = resolve_field(rows, records), resolve_field(cols, records)
    if rf == cf:
        raise ValueError(f"--rows and --cols are the same field {rf!r}")
    kind = kind or f"{rf} x {cf}"
    idents = [dict(i, **{f: axis_value(fields_of(r), f) for f in (rf, cf)})  # the axes: raw values
              for r, i in zip(records, identities(records))]
    knobs = knob_names(records)
    varying = [k for k in field_names(records) if k not in (rf, cf) and len({i.get(k, ABSENT) for i in idents}) > 1]
    along_cols = [k for k in varying if follows(k, cf, idents)]  # travel with the column value
    grid: Dict[tuple, Dict[tuple, Dict[str, float]]] = {}
    row_ident: Dict[tuple, Dict[str, Any]] = {}
    col_ident: Dict[tuple, Dict[str, Any]] = {}
    row_rec: Dict[tuple, dict] = {}  # a record of each row and column (for its defaults)
    col_rec: Dict[tuple, dict] = {}
    for r, ident in zip(records, idents):  # oldest first: a rerun replaces an older result
        rest = {k: v for k, v in ident.items() if k not in (rf, cf) and k not in along_cols}
        rkey = (ident[rf], row_key(rest))
        ckey = (ident[cf],) + tuple(ident.get(k, ABSENT) for k in along_cols)
        row_ident.setdefault(rkey, {rf: rkey[0], **rest})
        row_rec.setdefault(rkey, r)
        col_rec.setdefault(ckey, r)
        col_ident.setdefault(ckey, {cf: ckey[0], **{k: ident[k] for k in along_cols if k in ident}})
        grid.setdefault(rkey, {}).setdefault(ckey, {})[r["dataset"]] = r["mIoU"]
    order = field_names(records)
    setting = telling_fields(list(row_ident.values()), (rf,), order, knobs)
    col_extra = telling_fields(list(col_ident.values()), (cf,), order, knobs)
    row_label = {k: label(v, setting, defaults(row_rec[k])) for k, v in row_ident.items()}
    col_label = {k: label(v, col_extra, defaults(col_rec[k])) for k, v in col_ident.items()}
    row_keys = sorted(grid, key=lambda k: (order_key(k[0], PREFERRED.get(rf, ())), row_label[k]))
    col_keys = sorted(col_ident, key=lambda k: (order_key(k[0], PREFERRED.get(cf, ())), col_label[k]))
    with_setting = any(row_label.values())
    notes = _shared_note(records, list(row_ident.values()), setting + [rf, cf] + along_cols) + [NO_PUBLISHED_NOTE]
    datasets = _datasets(records)
    tables = []
    for name in (["average"] if len(datasets) > 1 else []) + datasets:
        subset = datasets if name == "average" else [name]
        title = (f"{kind}: mean mIoU (%) over {', '.join(HEADERS.get(d, d) for d in datasets)}"
                 if name == "average" else f"{kind}: mIoU (%) on {HEADERS.get(name, name)}")
        table = Table(name, title, [rf] + (["setting"] if with_setting else []),
                      [f"{cf}={_axis(k[0])} {col_label[k]}".strip() for k in col_keys], notes=list(notes))
        for key in row_keys:
            lab = [_axis(key[0])] + ([row_label[key]] if with_setting else [])
            table.rows.append((lab, [_pivot_cell(grid[key].get(c, {}), subset) for c in col_keys]))
        if any(c.partial for _, cells in table.rows for c in cells):
            table.notes.insert(0, "\\* mean over the datasets this cell has (some are missing).")
        tables.append(table)
    return tables


def _axis(v: Any) -> str:
    return "-" if v is ABSENT else fmt(v)


def _shared_note(records: Sequence[dict], rows: Sequence[Dict[str, Any]], named: Sequence[str]) -> List[str]:
    """``All runs: weights.source=random ...``: what every row shares and the shipped config (``eval``
    with the runs' dataset and preset) does not (a per-dataset field at its default, a value resolved at
    run time such as ``precision: auto``, and the fields named elsewhere are left out)."""
    try:
        config = config_fields(record_overrides(records[0]))
    except Exception:  # a dataset or preset without a YAML: nothing to compare with
        return []
    shared = {k: v for k, v in rows[0].items() if all(r.get(k, ABSENT) == v for r in rows[1:])}
    named = [k for k in named if k in rows[0]]
    differ = [k for k, v in shared.items() if k not in named and v is not DEFAULT
              and config.get(k, ABSENT) not in (v, "auto") and not (k in PER_DATASET and k not in config)]
    pair = [{k: rows[0][k] for k in differ + named}, {k: config.get(k, ABSENT) for k in differ + named}]
    text = label(pair[0], telling_fields(pair, named, differ, knob_names(records)))
    return [f"All runs: {text}."] if text else []


def _pivot_cell(by_dataset: Dict[str, float], datasets: Sequence[str]) -> Cell:
    mean, partial = _mean([by_dataset.get(d) for d in datasets])
    return Cell(mean, partial=partial and mean is not None)


# ---------------------------------------------------------------------------------------------- entry points
def build_tables(records: Sequence[dict], kind: Optional[str] = None, datasets: Optional[Sequence[str]] = None,
                 paper: bool = False, rows: Optional[str] = None, cols: Optional[str] = None) -> List[Table]:
    """The tables of ``kind`` (None: :func:`default_kind`), or the pivot ``rows`` x ``cols``, for
    ``records`` (limited to ``datasets``)."""
    if (rows is None) != (cols is None):
        raise ValueError("a pivot needs both --rows and --cols")
    if rows is None:
        kind = kind or default_kind(records)
        if kind not in KINDS:
            raise ValueError(f"unknown table {kind!r}: choose one of {', '.join(KINDS)}")
    if datasets:
        records = [r for r in records if r["dataset"] in datasets]
        if not records:
            raise ValueError(f"no results for the datasets {', '.join(datasets)}")
    if rows is not None:
        return pivot_tables(records, rows, cols)
    if kind in PIVOTS:
        return pivot_tables(records, *PIVOTS[kind], kind=kind)
    return [benchmark_table(records, kind, datasets, paper)]


def summarize(paths: Iterable[Path], out_dir: Optional[Path] = None, paper: bool = False,
              datasets: Optional[Sequence[str]] = None, kind: Optional[str] = None,
              logger_cfg: Any = None, rows: Optional[str] = None, cols: Optional[str] = None) -> str:
    """Collect, tabulate, write ``summary.md`` / ``summary.csv`` into ``out_dir`` (if given), log to
    W&B with ``logger_cfg`` (if given); return the markdown."""
    paths = list(paths)
    records = collect(paths)
    if not records:
        raise FileNotFoundError(f"no metrics.json found below {', '.join(str(p) for p in paths)}")
    if rows is None and cols is None:
        kind = kind or default_kind(records)
    tables = build_tables(records, kind, datasets, paper, rows, cols)
    md = to_markdown(tables)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.md").write_text(md)
        (out_dir / "summary.csv").write_text(to_csv(tables))
    if logger_cfg is not None:
        experiments = sorted({str(r.get("experiment")) for r in records if r.get("experiment")})
        name = kind if rows is None else f"{rows}_x_{cols}"
        log_tables(tables, logger_cfg, {"table": name, "paths": [str(p) for p in paths], "experiments": experiments},
                   group=experiments[0] if len(experiments) == 1 else None)
    return md
