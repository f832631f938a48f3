"""What the explorer draws, from the controller's caches (no computation but a block's attention,
once per encode and block): the segmentation with the chosen pixel, and the attention of that
pixel's token under the current method beside CLIP's own (or, when recorded and the method has
them, its affinity stages), with the chosen CLIP block's own attention (the block slider) and
a method's extra views (proxyclip/explorer/inside.py) when there are any. Both carry the red
random-weights band (``viz.marked``) when the segmenter runs random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

from ..knobs import DECISION
from ..methods import get_method
from . import inside
from ..viz import (locate_patch, marked, pattern_row, plot_affinity_stages, plot_attention_grid, plot_segmentation,
                   window_pixels)

if TYPE_CHECKING:
    from .controller import ExplorerController

# the hook points plot_affinity_stages draws (fired by a method whose attention is built from an
# affinity: proxyclip); recorded only while shown
STAGE_NAMES = ("proxy.affinity", "proxy.affinity_normalized", "proxy.mask")


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


def attention_view(c: "ExplorerController") -> AttentionView:
    enc, (y, x) = c.encoded, c.point
    win, crow, ccol = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, enc.clip_grid, pad=enc.pad)
    view = AttentionView(window=win, window_image=window_pixels(enc.image, enc.resized_size, enc.windows[win]),
                         proxy_row=None, proxy_grid=None, proxy_patch=None,
                         clip_row=None, clip_grid=enc.clip_grid, clip_patch=(crow, ccol))
    if c.clip_attention is not None:
        view.clip_row = pattern_row(c.clip_attention, enc, y, x)[0]
    if "attention.pattern" in c.cache:
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


def segmentation_figure(c: "ExplorerController"):
    pred = c.prediction
    fig = plot_segmentation(pred.image, pred.labels, pred.class_names, title=title(c), panel_size=3.2)
    y, x = c.point
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
    return marked(plot_attention_grid(v.window_image, maps, ncols=2, panel_size=3.0), c.segmenter)


def status_text(c: "ExplorerController") -> str:
    """The status line: image, windows, timings, and how many encodes and decodes ran."""
    return (f"{c.image_name} {tuple(c.image.shape[1:])} | {len(c.encoded.windows)} window(s) | "
            f"encode {c.last_encode_seconds:.2f} s, decode {c.last_decode_seconds * 1000:.0f} ms | "
            f"encodes {c.n_encodes}, decodes {c.n_decodes}")
