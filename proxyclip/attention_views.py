"""A registry of extra attention views per method, for the explorer (proxyclip/explorer/inside.py).

A light module (torch and dataclasses only) that a method's own module may import at import time:
``register_view(pattern_view("resclip", "RCS attention", "resclip.rcs_attention"))``. The explorer's
decode of that method records the view's hook points and draws the chosen pixel's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Row = Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]


@dataclass(frozen=True)
class ExtraView:
    """One more attention panel for ``method``: ``title``, the hook points its decode records, and
    ``row(cache, enc, y, x) -> (row, grid, patch) | None`` for the pixel (y, x) of the original image."""

    method: str
    title: str
    hooks: Tuple[str, ...]
    row: Callable[[Dict[str, torch.Tensor], Any, float, float], Optional[Row]]


EXTRA_VIEWS: Dict[str, List[ExtraView]] = {}


def register_view(view: ExtraView) -> ExtraView:
    """Add ``view`` to its method's panels (once per title)."""
    views = EXTRA_VIEWS.setdefault(view.method, [])
    views[:] = [v for v in views if v.title != view.title] + [view]
    return view


def extra_views(method: str) -> Sequence[ExtraView]:
    return tuple(EXTRA_VIEWS.get(method, ()))


def pattern_view(method: str, title: str, hook: str) -> ExtraView:
    """A view of a hook holding an (n, h|1, T, T) attention pattern (heads averaged, CLS first when
    T = 1 + gh·gw) as ``viz.pattern_row`` reads ``attention.pattern``."""
    def row(cache, enc, y, x):
        if hook not in cache:
            return None
        from .viz import pattern_row

        r, grid, patch, _ = pattern_row(cache[hook], enc, y, x)
        return r, grid, patch

    return ExtraView(method, title, (hook,), row)


def matrix_view(method: str, title: str, hook: str) -> ExtraView:
    """A view of a hook holding one (n, T, T) matrix per window (no heads), CLS first when T = 1 + gh·gw:
    the chosen token's row over its window's patches, renormalized to sum 1 like a pattern's."""
    def row(cache, enc, y, x):
        if hook not in cache:
            return None
        from .viz import pattern_row

        r, grid, patch, _ = pattern_row(cache[hook][:, None], enc, y, x)
        return r, grid, patch

    return ExtraView(method, title, (hook,), row)


def same_label_view(method: str, title: str, hook: str) -> ExtraView:
    """A view of a hook holding one (n, gh, gw) label grid per window (on CLIP's grid): 1 where a
    patch has the chosen patch's label, 0 elsewhere (ResCLIP's SFR links exactly those pairs before
    its blur and path decay)."""
    def row(cache, enc, y, x):
        if hook not in cache:
            return None
        from .viz import locate_patch

        labels = cache[hook]
        grid = tuple(int(s) for s in labels.shape[-2:])
        win, r, c = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, grid, pad=enc.pad)
        lab = labels[win]
        return (lab == lab[r, c]).flatten().float(), grid, (r, c)

    return ExtraView(method, title, (hook,), row)


# ResCLIP (proxyclip/zoo/resclip.py declares these hook points): its RCS attention (the mean of the
# rcs_layers blocks' own attention, heads averaged), the provisional labels of SFR's first pass, and
# SFR's matrix A_sfr. A view whose hook did not fire (rcs=false, sfr=false) is not drawn.
register_view(pattern_view("resclip", "ResCLIP RCS attention (rcs_layers' mean)", "resclip.rcs_attention"))
register_view(same_label_view("resclip", "ResCLIP SFR: same provisional label", "resclip.patch_labels"))
register_view(matrix_view("resclip", "ResCLIP SFR matrix A_sfr (row)", "resclip.sfr"))
