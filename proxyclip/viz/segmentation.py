"""Label maps and score maps: overlays, side-by-side panels, one panel per method or query."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..text import display_name
from .common import _legend, _to_numpy, colorize_labels, image_to_float_hwc, label_palette, present_classes

MIN_WIDTH = 4.5  # inches: the overlay's narrowest figure (its legend and a banner fit)


def class_boundaries(labels) -> np.ndarray:
    """``(H, W)`` bool: pixels whose right or lower neighbour has another label."""
    lab = _to_numpy(labels)
    edge = np.zeros(lab.shape, bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    return edge


def draw_boundaries(ax, labels, linewidth: float = 0.9) -> None:
    """Class boundaries as white lines with a dark outline (visible on any image): one contour per
    class present, vector lines of a fixed width whatever the image's size."""
    from matplotlib import patheffects

    lab = _to_numpy(labels).astype(np.int64)
    if not class_boundaries(lab).any():
        return
    outline = [patheffects.withStroke(linewidth=linewidth + 1.2, foreground="black")]
    for k in np.unique(lab):
        ax.contour((lab == k).astype(np.float32), levels=[0.5], colors="white", linewidths=linewidth,
                   path_effects=outline)


def _label_panel(ax, labels, n_classes: int, ignore_index: int = 255):
    """An opaque label map: every pixel exactly its class's palette colour (the legend's)."""
    return ax.imshow(colorize_labels(labels, n_classes, ignore_index), interpolation="nearest",
                     interpolation_stage="rgba")


def _legend_handles(present: Sequence[int], class_names: Sequence[str], n_classes: int):
    palette = label_palette(max(n_classes, 1))
    return [Patch(facecolor=palette[k] / 255.0, edgecolor="none",
                  label=display_name(class_names[k]) if k < len(class_names) else str(k)) for k in present]


def plot_overlay(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], panel: float = 4.0,
                 ignore_index: int = 255) -> Figure:
    """The image with the class boundaries drawn on it, beside (a wide image: above) the opaque
    label map, and a legend of the classes present below. Colours are exact: a legend swatch is
    the colour of its class's pixels. The layout is fixed (no layout engine, save without
    ``bbox_inches="tight"``): the longer side of a panel is ``panel`` inches, the figure at
    least MIN_WIDTH wide, the legend band as tall as its rows."""
    img = image_to_float_hwc(image)
    lab = _to_numpy(labels).astype(np.int64)
    h, w = lab.shape
    n = max(len(class_names), int(lab[lab != ignore_index].max(initial=0)) + 1)
    present = present_classes(lab, n_classes=n, ignore_index=ignore_index)
    stacked = w > 1.6 * h  # a wide image: panels one above the other
    pw, ph = (panel * 1.5, panel * 1.5 * h / w) if stacked else (panel * w / max(h, w), panel * h / max(h, w))
    title_h, margin, gap = 0.28, 0.15, 0.2
    cols, rows = (1, 2) if stacked else (2, 1)
    content_w = cols * pw + (cols - 1) * gap
    fig_w = max(MIN_WIDTH, content_w + 2 * margin)
    ncol = max(1, min(len(present), int((fig_w - 2 * margin) // 1.5)))
    legend_h = 0.22 * math.ceil(max(len(present), 1) / ncol) + 0.15
    fig_h = margin + rows * (title_h + ph) + legend_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    left0 = (fig_w - content_w) / 2
    axes = []
    for i, title in enumerate(("image + class boundaries", "label map")):
        c, r = (0, i) if stacked else (i, 0)
        x0 = left0 + c * (pw + gap)
        y0 = fig_h - margin - (r + 1) * (title_h + ph) + 0.02
        ax = fig.add_axes((x0 / fig_w, y0 / fig_h, pw / fig_w, ph / fig_h))
        ax.set_title(title, fontsize=9, pad=3)
        ax.set_axis_off()
        axes.append(ax)
    axes[0].imshow(img, interpolation="antialiased")
    draw_boundaries(axes[0], lab)
    _label_panel(axes[1], lab, n, ignore_index)
    handles = _legend_handles(present, class_names, n)
    if (lab == ignore_index).any():
        handles.append(Patch(facecolor="black", edgecolor="none", label="ignored"))
    legend_ax = fig.add_axes((0, 0, 1, legend_h / fig_h))
    legend_ax.set_axis_off()
    legend_ax.set_label("legend")
    legend_ax.legend(handles=handles, loc="center", ncol=ncol, frameon=False, fontsize=9, handlelength=1.6,
                     handleheight=1.1, columnspacing=1.2)
    return fig


def plot_segmentation(image, pred_labels, class_names: Sequence[str], gt_labels=None,
                      ignore_index: int = 255, title: Optional[str] = None, panel_size: float = 3.5) -> Figure:
    """Side-by-side panels: the image (the prediction's class boundaries drawn on it), ground truth
    (when given), prediction, as opaque label maps (ignored pixels black); one legend of the classes
    present in either label map, its colours the panels' own. Label maps are ``(H, W)`` at the image's size."""
    img = image_to_float_hwc(image)
    n = len(class_names)
    panels = [("image", None)] + ([("ground truth", gt_labels)] if gt_labels is not None else [])
    panels.append(("prediction", pred_labels))
    fig = Figure(figsize=(panel_size * len(panels), panel_size * img.shape[0] / img.shape[1] + 0.7),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, labels) in zip(axes, panels):
        if labels is None:
            ax.imshow(img)
            draw_boundaries(ax, pred_labels)
        else:
            _label_panel(ax, labels, n, ignore_index)
        ax.set_title(name)
        ax.set_axis_off()
    _legend(fig, present_classes(pred_labels, gt_labels, n_classes=n, ignore_index=ignore_index), class_names, n)
    if title:
        fig.suptitle(title, fontsize="medium", wrap=True)  # a long title (the explorer's settings) wraps
    return fig


def plot_baseline_comparison(image, baseline_labels, proxy_labels, class_names: Sequence[str], gt_labels=None,
                             ignore_index: int = 255,
                             names: Tuple[str, str] = ("CLIP, no VFM (baseline)", "ProxyCLIP"),
                             panel_size: float = 3.5) -> Figure:
    """Panels: image, [ground truth], the no-VFM baseline's prediction, ProxyCLIP's prediction (opaque
    label maps in the legend's colours)."""
    img = image_to_float_hwc(image)
    n = len(class_names)
    panels = [("image", img)]
    if gt_labels is not None:
        panels.append(("ground truth", colorize_labels(gt_labels, n, ignore_index)))
    panels.append((names[0], colorize_labels(baseline_labels, n, ignore_index)))
    panels.append((names[1], colorize_labels(proxy_labels, n, ignore_index)))
    fig = Figure(figsize=(panel_size * len(panels), panel_size * img.shape[0] / img.shape[1] + 0.7),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, pixels) in zip(axes, panels):
        ax.imshow(pixels, interpolation="nearest", interpolation_stage="rgba")
        ax.set_title(name, fontsize="medium")
        ax.set_axis_off()
    present = present_classes(baseline_labels, proxy_labels, gt_labels, n_classes=n, ignore_index=ignore_index)
    _legend(fig, present, class_names, n)
    return fig


def plot_class_scores(image, scores, names: Sequence[str], ncols: int = 4, cmap: str = "viridis",
                      panel_size: float = 2.6, shared_scale: bool = True) -> Figure:
    """One panel per query: its ``(H, W)`` score map (``scores`` is ``(Q, H, W)``, e.g.
    ``Prediction.scores``) with a colour bar; the image is the first panel. ``shared_scale``
    puts all maps on one colour scale (so panels compare); else each has its own."""
    img = image_to_float_hwc(image)
    s = _to_numpy(scores).astype(np.float32)
    if s.ndim != 3 or len(names) != s.shape[0]:
        raise ValueError(f"scores must be (Q, H, W) with Q = len(names) = {len(names)}, got {s.shape}")
    total = s.shape[0] + 1
    ncols = max(1, min(ncols, total))
    nrows = math.ceil(total / ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows * img.shape[0] / img.shape[1] + 0.4 * nrows),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize="small")
    lo, hi = (float(s.min()), float(s.max())) if shared_scale else (None, None)
    for q in range(s.shape[0]):
        ax = axes[q + 1]
        im = ax.imshow(s[q], cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(str(names[q]), fontsize="small")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    return fig


def plot_method_grid(image, labels_by_method: Mapping[str, Any], class_names: Sequence[str], gt_labels=None,
                     ncols: int = 4) -> Figure:
    """One panel per method (``{name: (H, W) labels}``, an opaque label map), after the image and the
    ground truth (when given); one legend of the classes present, in the panels' colours."""
    img = image_to_float_hwc(image)
    n_classes = len(class_names)
    panels = [("image", None)] + ([("ground truth", gt_labels)] if gt_labels is not None else [])
    panels += list(labels_by_method.items())
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (title, labels) in zip(axes, panels):
        if labels is None:
            ax.imshow(img)
        else:
            _label_panel(ax, labels, n_classes)
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    maps = [m for _, m in panels[1:]]
    _legend(fig, present_classes(*maps, n_classes=n_classes), class_names, n_classes)
    return fig
