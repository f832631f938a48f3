"""Figures (matplotlib). Every ``plot_*`` function returns a Figure.

Figures are made with ``matplotlib.figure.Figure`` (no pyplot state), so they work in
notebooks (displayed as the cell's value), scripts (``fig.savefig``), W&B
(``logger.log_figure``) and the widget explorer, headless with any backend.

    label maps:       plot_overlay, plot_segmentation (image | ground truth | prediction),
                      plot_baseline_comparison (no-VFM baseline vs ProxyCLIP)
    scores:           plot_class_scores (one map per query)
    attention:        plot_attention_map, plot_attention_grid (proxy attention of a chosen
                      patch; CLIP's own last-block attention for contrast),
                      plot_affinity_stages (S, S' = (S - beta*mean)*gamma, mask, attention)
    sweeps:           plot_sweep_heatmap (e.g. mIoU over beta x gamma)
    tensors:          clip_last_block_attention, locate_patch, window_pixels, patch_heatmap
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .text import display_name


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

# ----------------------------------------------------------------------------------------
# Workbench visualizations (issue 4). Every plot_* function returns a matplotlib Figure made
# with matplotlib.figure.Figure (no pyplot state: safe in loops, scripts, W&B and widgets).
# ----------------------------------------------------------------------------------------

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


def _overlay(image_hwc: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    return (1 - alpha) * image_hwc + alpha * colors.astype(np.float32) / 255.0


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


# --- attention maps -----------------------------------------------------------------------

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


# --- tensors behind the attention views ------------------------------------------------------

def clip_last_block_attention(block, tokens):
    """CLIP's own attention in its last block (what ProxyCLIP replaces), averaged over heads.

    ``block``: an open_clip ``ResidualAttentionBlock`` (``ln_1``, ``attn`` an
    ``nn.MultiheadAttention``), e.g. ``seg.clip_model.visual.transformer.resblocks[-1]``.
    ``tokens``: ``(B, 1+T, D)`` from the ``clip.last_block_input`` hook (batch-first).
    Returns ``(B, T, T)``: patch-to-patch attention (CLS dropped, rows renormalized to sum 1).
    """
    attn = block.attn
    x = block.ln_1(tokens.to(attn.in_proj_weight.dtype))
    d = x.shape[-1]
    heads = attn.num_heads
    q, k, _ = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    b, t, _ = q.shape
    q = q.reshape(b, t, heads, d // heads).transpose(1, 2)
    k = k.reshape(b, t, heads, d // heads).transpose(1, 2)
    from .methods import softmax_attention

    weights = softmax_attention(q, k, 1 / math.sqrt(d // heads)).mean(dim=1)  # (B, 1+T, 1+T): method "clip"
    patches = weights[:, 1:, 1:]
    return patches / patches.sum(dim=-1, keepdim=True)


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
    and the row renormalized to sum 1; otherwise (ProxyCLIP) the grid is the VFM's.

    Returns ``(row (N,), grid, (r, c), window)``, ready for :func:`plot_attention_grid`.
    """
    t = pattern.shape[-1]
    gh, gw = enc.clip_grid
    if t == 1 + gh * gw:
        grid, cls, pad = (gh, gw), True, enc.pad
    else:
        grid, cls = tuple(enc.vfm_features.shape[-2:]), False
        pad = (0, 0, 0, 0) if vfm_resizes_input else enc.pad  # SAM sees the unpadded window resized
    win, r, c = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, grid, pad=pad)
    row = pattern[win].float().mean(dim=0)[int(cls) + r * grid[1] + c]
    if cls:
        row = row[1:] / row[1:].sum()
    return row, grid, (r, c), win


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
