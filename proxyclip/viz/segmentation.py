"""Label maps and score maps: overlays, side-by-side panels, one panel per method or query."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..text import display_name
from .common import _legend, _overlay, _to_numpy, colorize_labels, image_to_float_hwc, label_palette, present_classes


def plot_overlay(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], alpha: float = 0.5) -> Figure:
    """The image with its label map blended over it, and a legend of the classes present."""
    img = image_to_float_hwc(image)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pal = label_palette(max(len(class_names), int(lab.max()) + 1)).astype(np.float32) / 255
    blended = (1 - alpha) * img + alpha * pal[lab]
    h, w = lab.shape
    fig = Figure(figsize=(6 * w / max(h, w) + 2, 6 * h / max(h, w)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(blended)
    ax.set_axis_off()
    present = [int(k) for k in np.unique(lab)]
    handles = [Patch(color=pal[k], label=display_name(class_names[k]) if k < len(class_names) else str(k)) for k in present]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    return fig


def plot_segmentation(image, pred_labels, class_names: Sequence[str], gt_labels=None, alpha: float = 0.5,
                      ignore_index: int = 255, title: Optional[str] = None, panel_size: float = 3.5) -> Figure:
    """Side-by-side panels: image, ground truth (when given), prediction; one legend of the
    classes present in either label map. Label maps are ``(H, W)`` at the image's size."""
    img = image_to_float_hwc(image)
    n = len(class_names)
    panels = [("image", img)]
    if gt_labels is not None:
        panels.append(("ground truth", _overlay(img, colorize_labels(gt_labels, n, ignore_index), alpha)))
    panels.append(("prediction", _overlay(img, colorize_labels(pred_labels, n, ignore_index), alpha)))
    fig = Figure(figsize=(panel_size * len(panels), panel_size * img.shape[0] / img.shape[1] + 0.7),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, pixels) in zip(axes, panels):
        ax.imshow(pixels)
        ax.set_title(name)
        ax.set_axis_off()
    _legend(fig, present_classes(pred_labels, gt_labels, n_classes=n, ignore_index=ignore_index), class_names, n)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def plot_baseline_comparison(image, baseline_labels, proxy_labels, class_names: Sequence[str], gt_labels=None,
                             alpha: float = 0.5, ignore_index: int = 255,
                             names: Tuple[str, str] = ("CLIP, no VFM (baseline)", "ProxyCLIP"),
                             panel_size: float = 3.5) -> Figure:
    """Panels: image, [ground truth], the no-VFM baseline's prediction, ProxyCLIP's prediction."""
    img = image_to_float_hwc(image)
    n = len(class_names)
    panels = [("image", img)]
    if gt_labels is not None:
        panels.append(("ground truth", _overlay(img, colorize_labels(gt_labels, n, ignore_index), alpha)))
    panels.append((names[0], _overlay(img, colorize_labels(baseline_labels, n, ignore_index), alpha)))
    panels.append((names[1], _overlay(img, colorize_labels(proxy_labels, n, ignore_index), alpha)))
    fig = Figure(figsize=(panel_size * len(panels), panel_size * img.shape[0] / img.shape[1] + 0.7),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, pixels) in zip(axes, panels):
        ax.imshow(pixels)
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
                     alpha: float = 0.5, ncols: int = 4) -> Figure:
    """One panel per method (``{name: (H, W) labels}``), after the image and the ground truth
    (when given); one legend of the classes present."""
    img = image_to_float_hwc(image)
    n_classes = len(class_names)
    panels = [("image", None)] + ([("ground truth", gt_labels)] if gt_labels is not None else [])
    panels += list(labels_by_method.items())
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (title, labels) in zip(axes, panels):
        ax.imshow(img if labels is None else _overlay(img, colorize_labels(labels, n_classes), alpha))
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    maps = [m for _, m in panels[1:]]
    _legend(fig, present_classes(*maps, n_classes=n_classes), class_names, n_classes)
    return fig
