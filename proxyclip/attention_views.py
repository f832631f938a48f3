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
