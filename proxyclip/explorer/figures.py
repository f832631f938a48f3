"""What the explorer draws, from the controller's caches (no computation but a block's attention,
once per encode and block): the segmentation with the chosen pixel, and the attention of that
pixel's token under the current method beside CLIP's own (or, when recorded and the method has
them, its affinity stages), with the chosen CLIP block's own attention (the block slider) and
a method's extra views (proxyclip/explorer/inside.py) when there are any. Both carry the red
random-weights band (``viz.marked``) when the segmenter runs random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import numpy as np
import torch

from ..knobs import DECISION
from ..methods import get_method
from . import inside
from ..viz.common import label_palette
from ..viz.segmentation import draw_boundaries
from ..viz import (locate_patch, marked, pattern_row, plot_affinity_stages, plot_attention_grid, plot_segmentation,
                   window_pixels)

if TYPE_CHECKING:
    from .controller import ExplorerController

# the hook points plot_affinity_stages draws (fired by a method whose attention is built from an
# affinity: proxyclip); recorded only while shown
STAGE_NAMES = ("proxy.affinity", "proxy.affinity_normalized", "proxy.mask")


def recorded_hooks(method: str, stages: bool = False) -> Tuple[str, ...]:
    """The hook points a decode of ``method`` records for the panels: a per-pixel method's
    ``attention.pattern`` (and its affinity stages, ``stages``: when they are shown), then those of
    the method's extra views (``inside.view_hooks``). An image-level method has no attention."""
    per_pixel = get_method(method).level == "window"
    return (("attention.pattern",) + (STAGE_NAMES if stages else ()) if per_pixel else ()) + inside.view_hooks(method)


@dataclass
class AttentionView:
    """What the attention panel shows for the chosen pixel."""

    window: int  # window index
    window_image: torch.Tensor  # (3, h, w) pixels of that window (resized image)
    proxy_row: Optional[torch.Tensor]  # (N,) the method's attention of the chosen token (heads averaged)
    proxy_grid: Optional[Tuple[int, int]]  # its grid (the VFM's for proxyclip, else CLIP's)
    proxy_patch: Optional[Tuple[int, int]]  # (row, col) on that grid
    clip_row: Optional[torch.Tensor]  # (T,) CLIP's own last-block attention of the chosen CLIP token
    clip_grid: Tuple[int, int]
    clip_patch: Tuple[int, int]
    affinity_row: Optional[torch.Tensor] = None
    normalized_row: Optional[torch.Tensor] = None
    mask_row: Optional[torch.Tensor] = None
    block: Optional[int] = None  # the CLIP block before the last chosen with the block slider (None: the last)
    block_row: Optional[torch.Tensor] = None  # (T,) that block's own attention of the chosen CLIP token
    extra: List[Tuple[str, torch.Tensor, Tuple[int, int], Tuple[int, int]]] = field(default_factory=list)
    message: Optional[str] = None  # why the method's own per-pixel attention is not shown (None: it is)


def no_attention_message(c: "ExplorerController") -> Optional[str]:
    """Why the current method has no per-pixel attention panel, or None when it has one: an
    image-level method (``Method.level == "image"``: LPOSS's graph over every window, ...) decides
    from the whole image, and a method running its own last block may fire no ``attention.pattern``."""
    meth = get_method(c.method)
    if meth.level == "image":
        return (f"{c.method} is an image-level method (it decides from every window at once): it has no "
                f"per-pixel attention; its segmentation is shown above, CLIP's own attention here")
    if c.prediction is not None and "attention.pattern" not in c.cache:
        return f"{c.method} records no attention.pattern (it runs its own last block): no per-pixel attention of its own"
    return None


def attention_view(c: "ExplorerController") -> AttentionView:
    enc, (y, x) = c.encoded, c.point
    win, crow, ccol = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, enc.clip_grid, pad=enc.pad)
    view = AttentionView(window=win, window_image=window_pixels(enc.image, enc.resized_size, enc.windows[win]),
                         proxy_row=None, proxy_grid=None, proxy_patch=None,
                         clip_row=None, clip_grid=enc.clip_grid, clip_patch=(crow, ccol))
    if c.clip_attention is not None:
        view.clip_row = pattern_row(c.clip_attention, enc, y, x)[0]
    view.message = no_attention_message(c)
    if "attention.pattern" in c.cache and view.message is None:
        seg = c.segmenter
        resizes = seg.vfm is not None and seg.vfm.resizes_input
        row, grid, patch, _ = pattern_row(c.cache["attention.pattern"], enc, y, x, vfm_resizes_input=resizes)
        view.proxy_row, view.proxy_grid, view.proxy_patch = row, grid, patch
        if all(name in c.cache for name in STAGE_NAMES):
            k = patch[0] * grid[1] + patch[1]
            view.affinity_row, view.normalized_row, view.mask_row = (c.cache[n][win, k] for n in STAGE_NAMES)
    seg = c.segmenter
    view.block = inside.shown_block(seg, c.block)
    if view.block is not None:
        view.block_row = pattern_row(inside.block_attention(seg, enc, view.block), enc, y, x)[0]
    for extra in inside.extra_views(c.method):  # a method's own panels (inside.register_view)
        got = extra.row(c.cache, enc, y, x)
        if got is not None:
            view.extra.append((extra.title, *got))
    return view


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.3g}"


def title(c: "ExplorerController") -> str:
    """``method [+ post-process]: backbones   own knobs and the decision's``, from the prediction's spec."""
    spec = c.prediction.spec
    meth, params = get_method(spec.method), spec.params()
    post = spec.postprocess_settings["name"]
    head = spec.method + ("" if post == "none" else f" + {post}")
    backbones = f"{c.clip_name} + {c.vfm_name}" if meth.needs_vfm else c.clip_name
    shown = meth.knob_names + tuple(k.name for k in DECISION)
    return f"{head}: {backbones}   " + " ".join(f"{k}={_fmt(params[k])}" for k in shown)


NO_MASKS = "no mask proposals in this encode: configure masks=file (masks.dir=...), masks=sam2 or masks=sam"
MASKS_LABEL = "mask proposals"  # the label of the proposals' image on the image panel


def proposal_colors(labels: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """(H, W) proposal label map -> (H, W, 4) RGBA floats: one colour per proposal id (the label
    palette, cycled), ``alpha`` opaque; unsegmented pixels (id 0) transparent."""
    lab = labels.cpu().numpy().astype(np.int64)
    palette = label_palette(PROPOSAL_COLOURS).astype(np.float32) / 255.0
    rgba = np.zeros(lab.shape + (4,), np.float32)
    rgba[..., :3] = palette[(lab - 1) % PROPOSAL_COLOURS]
    rgba[..., 3] = np.where(lab > 0, alpha, 0.0)
    return rgba


PROPOSAL_COLOURS = 64  # distinct colours before the palette repeats


def draw_proposals(ax, labels: torch.Tensor, alpha: float = 0.45) -> None:
    """The proposals over an image panel: each one filled in its colour, with its outline (the
    boundaries between ids, 0 = unsegmented included)."""
    ax.imshow(proposal_colors(labels, alpha), interpolation="nearest", label=MASKS_LABEL)
    draw_boundaries(ax, labels, linewidth=0.6)


def segmentation_figure(c: "ExplorerController"):
    pred = c.prediction
    fig = plot_segmentation(pred.image, pred.labels, pred.class_names, title=title(c), panel_size=3.2)
    y, x = c.point
    if c.show_masks:  # the encode's proposals over the image panel (or why there are none)
        masks = c.encoded.masks
        if masks is None:
            fig.axes[0].set_title("image (no mask proposals)")
            fig.axes[0].text(0.5, -0.02, "configure masks=file|sam2|sam", transform=fig.axes[0].transAxes,
                             ha="center", va="top", fontsize=8, color="#b00")
        else:
            draw_proposals(fig.axes[0], masks)
            fig.axes[0].set_title(f"image + {int(masks.unique().gt(0).sum())} mask proposals")
    for ax in fig.axes[:2]:
        ax.plot([x], [y], marker="+", color="red", markersize=12, markeredgewidth=2)
    return marked(fig, c.segmenter)


def attention_figure(c: "ExplorerController", show_affinity: bool = False):
    v = attention_view(c)
    if show_affinity and v.affinity_row is not None:
        return marked(plot_affinity_stages(v.window_image, v.affinity_row, v.normalized_row, v.mask_row,
                                           v.proxy_grid, v.proxy_patch, attention_row=v.proxy_row, panel_size=2.6),
                      c.segmenter)
    maps = []
    if v.block_row is not None:
        maps.append((f"CLIP block {v.block} (every method's)", v.block_row, v.clip_grid, v.clip_patch))
    if v.proxy_row is not None:
        vfm = get_method(c.method).needs_vfm
        name = f"{c.method} attention ({c.vfm_name})" if vfm else f"{c.method} attention"
        maps.append((name, v.proxy_row, v.proxy_grid, v.proxy_patch))
    if v.clip_row is not None:
        maps.append((f"CLIP's own attention ({c.clip_name})", v.clip_row, v.clip_grid, v.clip_patch))
    maps += v.extra
    fig = plot_attention_grid(v.window_image, maps, ncols=2, panel_size=3.0)
    if v.message is not None:
        fig.suptitle(v.message, fontsize="small", color="#b00", wrap=True)
    return marked(fig, c.segmenter)


def status_text(c: "ExplorerController") -> str:
    """The status line: image, windows, timings, and how many encodes and decodes ran (then why the
    method has no per-pixel attention, and why no proposals are drawn, when so)."""
    notes = [n for n in (no_attention_message(c), NO_MASKS if c.show_masks and c.encoded.masks is None else None) if n]
    return "<br>".join([f"{c.image_name} {tuple(c.image.shape[1:])} | {len(c.encoded.windows)} window(s) | "
            f"encode {c.last_encode_seconds:.2f} s, decode {c.last_decode_seconds * 1000:.0f} ms | "
            f"encodes {c.n_encodes}, decodes {c.n_decodes}"] + notes)
