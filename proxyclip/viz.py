"""Figures (matplotlib). Every function returns a Figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, distinct for neighbouring indices (the PASCAL VOC bit-interleaving scheme)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().permute(1, 2, 0).numpy()
    return np.clip(np.asarray(image, dtype=np.float32), 0, 1)


def plot_overlay(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], alpha: float = 0.5) -> Figure:
    """The image with its label map blended over it, and a legend of the classes present."""
    img = _to_hwc(image)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pal = label_palette(max(len(class_names), int(lab.max()) + 1)).astype(np.float32) / 255
    blended = (1 - alpha) * img + alpha * pal[lab]
    h, w = lab.shape
    fig = Figure(figsize=(6 * w / max(h, w) + 2, 6 * h / max(h, w)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(blended)
    ax.set_axis_off()
    present = [int(k) for k in np.unique(lab)]
    handles = [Patch(color=pal[k], label=class_names[k] if k < len(class_names) else str(k)) for k in present]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    return fig
