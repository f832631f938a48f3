"""Sweep figures: a metric over a 2-D grid of settings (heatmap) or along one axis (line)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .common import _to_numpy


def _tick(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) else str(v)


def plot_sweep_heatmap(values, row_values: Sequence[Any], col_values: Sequence[Any], row_name: str = "beta",
                       col_name: str = "gamma", metric: str = "mIoU", fmt: str = "{:.1f}",
                       cmap: str = "viridis") -> Figure:
    """A metric over a 2-D grid (``values[i, j]`` at ``row_values[i]``, ``col_values[j]``; numbers
    or names, e.g. CLIP x VFM), each cell annotated, the best cell outlined. NaN cells stay blank."""
    v = _to_numpy(values).astype(np.float64)
    if v.shape != (len(row_values), len(col_values)):
        raise ValueError(f"values {v.shape} do not match the grid ({len(row_values)}, {len(col_values)})")
    fig = Figure(figsize=(2.2 + 0.9 * len(col_values), 1.4 + 0.6 * len(row_values)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(v, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_values)), [_tick(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [_tick(r) for r in row_values])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    finite = np.isfinite(v)
    if finite.any():
        mid = (np.nanmin(v) + np.nanmax(v)) / 2
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if finite[i, j]:
                    ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize="small",
                            color="black" if v[i, j] > mid else "white")
        i, j = np.unravel_index(np.argmax(np.where(finite, v, -np.inf)), v.shape)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"{metric}: best {fmt.format(v[i, j])} at {row_name}={_tick(row_values[i])}, "
                     f"{col_name}={_tick(col_values[j])}", fontsize="medium")
    fig.colorbar(im, ax=ax, label=metric)
    return fig


def plot_sweep_line(values, xs: Sequence[Any], name: str, metric: str = "mIoU", fmt: str = "{:.1f}") -> Figure:
    """A metric along one swept setting (``values[i]`` at ``xs[i]``; numbers, or names and switches
    drawn as categories), each point annotated, the best one marked. NaN points are left out."""
    v = _to_numpy(values).astype(np.float64).ravel()
    if v.shape != (len(xs),):
        raise ValueError(f"values {v.shape} do not match the {len(xs)} values of {name}")
    numeric = all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) for x in xs)
    pos = np.asarray(xs, dtype=np.float64) if numeric else np.arange(len(xs), dtype=np.float64)
    fig = Figure(figsize=(2.4 + 0.6 * len(xs), 3.2), layout="constrained")
    ax = fig.subplots()
    finite = np.isfinite(v)
    order = np.argsort(pos)
    ax.plot(pos[order][finite[order]], v[order][finite[order]], marker="o")
    if not numeric:
        ax.set_xticks(pos, [_tick(x) for x in xs])
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    for p, y, ok in zip(pos, v, finite):
        if ok:
            ax.annotate(fmt.format(y), (p, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize="small")
    if finite.any():
        i = int(np.argmax(np.where(finite, v, -np.inf)))
        ax.plot([pos[i]], [v[i]], marker="o", markersize=12, fillstyle="none", color="red")
        ax.set_title(f"{metric}: best {fmt.format(v[i])} at {name}={_tick(xs[i])}", fontsize="medium")
    return fig
