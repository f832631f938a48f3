"""Attention maps: one token's attention (or affinity) row drawn over its window, and the tensors
behind them (which window and token a pixel falls in, a window's pixels, a row of a recorded
``attention.pattern``)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .common import _to_numpy, image_to_float_hwc


def patch_heatmap(row, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """A length-N attention (or affinity) row over an ``(h, w)`` token grid, N = h*w, as an
    ``(H, W)`` map at ``size`` (nearest: every token is drawn as the block of pixels it covers)."""
    h, w = grid
    r = _to_numpy(row).astype(np.float32).reshape(h, w)
    H, W = size
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    return r[ys][:, xs]


def patch_box(patch: Tuple[int, int], grid: Tuple[int, int], size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """Pixel box ``(y1, y2, x1, x2)`` covered by token ``patch = (row, col)`` of ``grid`` on an image of ``size``."""
    (r, c), (h, w), (H, W) = patch, grid, size
    return r * H / h, (r + 1) * H / h, c * W / w, (c + 1) * W / w


def _draw_patch(ax, patch, grid, size, color="red") -> None:
    y1, y2, x1, x2 = patch_box(patch, grid, size)
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))


def _attention_panel(fig, ax, img, row, grid, patch, title, cmap="inferno", alpha=0.65, vmin=None, vmax=None,
                     colorbar=True):
    heat = patch_heatmap(row, grid, img.shape[:2])
    ax.imshow(img)
    im = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    if patch is not None:
        _draw_patch(ax, patch, grid, img.shape[:2])
    ax.set_title(title, fontsize="medium")
    ax.set_axis_off()
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def plot_attention_map(image, attention_row, grid: Tuple[int, int], patch: Optional[Tuple[int, int]] = None,
                       title: str = "proxy attention", cmap: str = "inferno", alpha: float = 0.65,
                       panel_size: float = 4.0) -> Figure:
    """The attention of one query token over all N = h*w key tokens, drawn over the image.

    ``attention_row``: ``(N,)``, e.g. ``cache["proxy.attention"][win, k]`` with
    ``k = row * w + col`` (see :func:`attention_row`). ``image``: the window's pixels (the
    heatmap is stretched over it). ``patch = (row, col)`` is outlined.
    """
    img = image_to_float_hwc(image)
    fig = Figure(figsize=(panel_size + 0.9, panel_size * img.shape[0] / img.shape[1] + 0.4), layout="constrained")
    ax = fig.subplots()
    _attention_panel(fig, ax, img, attention_row, grid, patch, title, cmap=cmap, alpha=alpha)
    return fig


def plot_attention_grid(image, maps: Sequence[Tuple[str, Any, Tuple[int, int], Optional[Tuple[int, int]]]],
                        ncols: int = 3, cmap: str = "inferno", alpha: float = 0.65, panel_size: float = 3.2) -> Figure:
    """Several attention maps side by side: ``maps`` = [(title, row (N,), grid, patch), ...]
    (e.g. the proxy attention of several VFMs, or of several gammas, and CLIP's own)."""
    img = image_to_float_hwc(image)
    n = len(maps)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=((panel_size + 0.7) * ncols, panel_size * nrows * img.shape[0] / img.shape[1] + 0.4 * nrows),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, row, grid, patch) in zip(axes, maps):
        _attention_panel(fig, ax, img, row, grid, patch, title, cmap=cmap, alpha=alpha)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def plot_affinity_stages(image, affinity_row, normalized_row, mask_row, grid: Tuple[int, int],
                         patch: Optional[Tuple[int, int]] = None, attention_row=None,
                         panel_size: float = 3.2) -> Figure:
    """For one query token: the raw cosine affinity S, the normalized S' = (S - beta*mean)*gamma
    (diverging colours, 0 = white: the masking threshold), the mask (kept = S' >= 0) and,
    when given, the resulting attention. Rows are ``(N,)`` from the ``proxy.*`` hooks."""
    img = image_to_float_hwc(image)
    n_panels = 3 + (attention_row is not None)
    fig = Figure(figsize=((panel_size + 0.7) * n_panels, panel_size * img.shape[0] / img.shape[1] + 0.5),
                 layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    _attention_panel(fig, axes[0], img, affinity_row, grid, patch, "cosine affinity S", cmap="viridis",
                     vmin=-1.0, vmax=1.0)
    norm = _to_numpy(normalized_row).astype(np.float32)
    bound = float(np.abs(norm).max()) or 1.0
    _attention_panel(fig, axes[1], img, norm, grid, patch, "normalized S'", cmap="RdBu_r", vmin=-bound, vmax=bound)
    mask = _to_numpy(mask_row).astype(np.float32)
    _attention_panel(fig, axes[2], img, mask, grid, patch, f"kept (S' >= 0): {int(mask.sum())}/{mask.size}",
                     cmap="gray", vmin=0.0, vmax=1.0, alpha=0.7)
    if attention_row is not None:
        _attention_panel(fig, axes[3], img, attention_row, grid, patch, "attention softmax(S')")
    return fig


def window_pixels(image, resized_size: Tuple[int, int], box: Tuple[int, int, int, int]):
    """The pixels of window ``box = (y1, y2, x1, x2)`` of the resized image: ``(3, h, w)``.
    ``image`` is the original ``(3, H, W)`` (``Encoded.image``), ``resized_size`` = ``Encoded.resized_size``."""
    t = image if hasattr(image, "detach") else torch.as_tensor(np.asarray(image))
    t = t.float()
    if tuple(t.shape[-2:]) != tuple(resized_size):
        t = torch.nn.functional.interpolate(t[None], size=tuple(resized_size), mode="bilinear",
                                            align_corners=False)[0].clamp(0, 1)
    y1, y2, x1, x2 = box
    return t[:, y1:y2, x1:x2]


def locate_patch(y: float, x: float, image_size: Tuple[int, int], resized_size: Tuple[int, int],
                 windows: Sequence[Tuple[int, int, int, int]], grid: Tuple[int, int],
                 pad: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> Tuple[int, int, int]:
    """Which window and which token of its ``grid`` cover original-image pixel ``(y, x)``.

    Returns ``(window, row, col)``. Of the windows containing the point, the one whose centre
    is nearest wins (the point is then farthest from a window border). The ``grid`` covers the
    window plus its symmetric ``pad = (top, bottom, left, right)`` (``Encoded.pad``; zero for a
    VFM that resizes its input, like SAM).
    """
    H, W = image_size
    h, w = resized_size
    ry, rx = (y + 0.5) * h / H - 0.5, (x + 0.5) * w / W - 0.5
    ry, rx = min(max(ry, 0.0), h - 1.0), min(max(rx, 0.0), w - 1.0)
    best, best_d = None, None
    for i, (y1, y2, x1, x2) in enumerate(windows):
        if y1 <= ry < y2 and x1 <= rx < x2:
            d = (ry - (y1 + y2 - 1) / 2) ** 2 + (rx - (x1 + x2 - 1) / 2) ** 2
            if best_d is None or d < best_d:
                best, best_d = i, d
    if best is None:
        raise ValueError(f"pixel ({y}, {x}) is in no window")
    y1, y2, x1, x2 = windows[best]
    top, bottom, left, right = pad
    gh, gw = grid
    row = min(int((ry - y1 + top + 0.5) * gh / (y2 - y1 + top + bottom)), gh - 1)
    col = min(int((rx - x1 + left + 0.5) * gw / (x2 - x1 + left + right)), gw - 1)
    return best, row, col


def pattern_row(pattern, enc, y: float, x: float, vfm_resizes_input: bool = False):
    """The attention of the token under original-image pixel ``(y, x)`` over the patch tokens of
    its window, read from an ``attention.pattern`` hook tensor ``(n_windows, H or 1, T, T)`` of a
    decode of ``enc`` (any method): heads averaged; for T = 1 + gh*gw the CLS column is dropped
    and the row renormalized to sum 1; for T = gh*gw (CASS) CLIP's patches; otherwise (ProxyCLIP) the VFM's.

    Returns ``(row (N,), grid, (r, c), window)``, ready for :func:`plot_attention_grid`.
    """
    t = pattern.shape[-1]
    gh, gw = enc.clip_grid
    vfm_tokens = None if enc.vfm_features is None else int(enc.vfm_features.shape[-2] * enc.vfm_features.shape[-1])
    if t == 1 + gh * gw:
        grid, cls, pad = (gh, gw), True, enc.pad
    elif t == gh * gw and t != vfm_tokens:  # CLIP's patches without CLS (CASS)
        grid, cls, pad = (gh, gw), False, enc.pad
    else:
        grid, cls = tuple(enc.vfm_features.shape[-2:]), False
        pad = (0, 0, 0, 0) if vfm_resizes_input else enc.pad  # SAM sees the unpadded window resized
    win, r, c = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, grid, pad=pad)
    row = pattern[win].float().mean(dim=0)[int(cls) + r * grid[1] + c]
    if cls:
        row = row[1:] / row[1:].sum()
    return row, grid, (r, c), win
