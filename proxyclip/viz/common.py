"""What every figure shares: the label palette, image and tensor conversions, legends,
and rendering a Figure to PNG."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..text import display_name


def _base_colours() -> np.ndarray:
    """matplotlib's tab10 and the pale half of tab20, their greys left out: 18 colours, none near
    black or white, neighbours distinct."""
    from matplotlib import colormaps

    tab10 = [colormaps["tab10"](i)[:3] for i in range(10) if i != 7]
    pale = [colormaps["tab20"](i)[:3] for i in range(1, 20, 2) if i != 15]
    return np.round(np.array(tab10 + pale) * 255).astype(np.uint8)


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per class index: matplotlib's tab10 then tab20's pale colours
    (greys left out), then hues spaced by the golden ratio at three lightnesses and two saturations.
    Every colour is saturated, far from black (ignored pixels) and from white; neighbours differ."""
    import colorsys

    base = _base_colours()
    extra = []
    for k in range(max(0, n - len(base))):
        hue = (0.13 + k * 0.6180339887) % 1.0
        light, sat = (0.42, 0.55, 0.66)[k % 3], (0.8, 0.55)[(k // 3) % 2]
        extra.append(colorsys.hls_to_rgb(hue, light, sat))
    extra = np.round(np.array(extra).reshape(-1, 3) * 255).astype(np.uint8)
    return np.concatenate([base, extra])[:n]


def figure_to_png(fig, dpi: Optional[float] = None) -> bytes:
    """Render a matplotlib Figure to PNG bytes with the Agg canvas (at ``dpi``, which becomes the
    figure's own, so its transforms map data to the PNG's pixels afterwards)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    if dpi is not None:
        fig.set_dpi(dpi)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def image_to_float_hwc(image) -> np.ndarray:
    """An image as ``(H, W, 3)`` float in [0, 1]: from a ``(3, H, W)`` tensor/array in [0, 1]
    (``Prediction.image``), an ``(H, W, 3)`` array (uint8 or float) or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and (arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype == torch.bool:
            return x.numpy()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def colorize_labels(labels, n_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` label map -> ``(H, W, 3)`` uint8 colours from :func:`label_palette`;
    ``ignore_index`` (and any label outside [0, n_classes)) is black."""
    lab = _to_numpy(labels).astype(np.int64)
    palette = label_palette(max(n_classes, 1))
    out = np.zeros(lab.shape + (3,), np.uint8)
    valid = (lab >= 0) & (lab < n_classes) & (lab != ignore_index)
    out[valid] = palette[lab[valid]]
    return out


def _legend(fig: Figure, present: Sequence[int], class_names: Sequence[str], n_classes: int) -> None:
    palette = label_palette(max(n_classes, 1))
    handles = [Patch(facecolor=palette[k] / 255.0, edgecolor="black", linewidth=0.5,
                     label=display_name(class_names[k])) for k in present]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False,
                   fontsize="small")


def present_classes(*label_maps, n_classes: int, ignore_index: int = 255) -> List[int]:
    """Sorted class indices that occur in any of the label maps (ignore_index left out)."""
    found = set()
    for lab in label_maps:
        if lab is None:
            continue
        values = np.unique(_to_numpy(lab).astype(np.int64))
        found.update(int(v) for v in values if 0 <= v < n_classes and v != ignore_index)
    return sorted(found)

