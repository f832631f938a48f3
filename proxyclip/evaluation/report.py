"""How ``proxyclip-summary``'s tables are held and written: :class:`Table` of :class:`Cell`, as
markdown, CSV (full precision) and W&B tables (docs/tables.md, "Outputs")."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


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
