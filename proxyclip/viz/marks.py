"""The random-weights mark: a red band above any figure saying its models ran with random weights,
and why (``weights=random`` was chosen, or pretrained weights were unavailable and the run fell
back to random ones). One helper for the CLI's overlay, the explorer's and the notebooks' figures."""

from __future__ import annotations

from typing import Any, Optional

from matplotlib.figure import Figure

REASONS = {
    "chosen": "weights=random was chosen",
    "fallback": "pretrained weights were unavailable: fell back to random ones",
}
BAND_INCHES = 0.42  # the band's fixed height: two lines of at most FONT_MAX points
FONT_MAX, FONT_MIN = 9.0, 6.0  # the banner's font size, shrunk (down to FONT_MIN) to fit the figure's width
COLOR = "#c00000"  # the banner text colour (no palette colour is near it)
MARK_LABEL = "random-weights mark"  # the banner Text's label (find it in ``fig.texts``)


def random_weights_reason(random_weights: bool, weights_source: str) -> Optional[str]:
    """``None`` (real weights), ``"chosen"`` (``weights.source`` is random) or ``"fallback"``
    (random weights although another source was asked for)."""
    if not random_weights:
        return None
    return "chosen" if str(weights_source) == "random" else "fallback"


def segmenter_reason(seg: Any) -> Optional[str]:
    """:func:`random_weights_reason` of a Segmenter (its ``random_weights`` and ``cfg.weights.source``)."""
    return random_weights_reason(bool(seg.random_weights), seg.cfg.weights.source)


def banner_text(reason: str) -> str:
    if reason not in REASONS:
        raise ValueError(f"random-weights reason must be one of {', '.join(REASONS)}, got {reason!r}")
    return f"RANDOM WEIGHTS: not a real segmentation\n({REASONS[reason]})"


def _freeze_layout(fig: Figure) -> None:
    """Run the figure's layout engine once and keep its result (so the figure can grow without a
    new layout moving the axes into the band)."""
    engine = fig.get_layout_engine()
    if engine is None or type(engine).__name__ == "PlaceHolderLayoutEngine":
        return
    fig.draw_without_rendering()
    fig.set_layout_engine("none")


def _grow_top(fig: Figure, inches: float) -> None:
    """Add ``inches`` at the top of a figure whose layout is fixed: everything placed in figure
    coordinates keeps its size and place relative to the bottom."""
    w, h = fig.get_size_inches()
    scale = h / (h + inches)
    fig.set_size_inches(w, h + inches)
    for ax in fig.axes:
        x0, y0, aw, ah = ax.get_position(original=True).bounds
        ax.set_position((x0, y0 * scale, aw, ah * scale), which="both")
    for t in fig.texts:
        if t.get_transform() == fig.transFigure or t.get_transform() == fig.transSubfigure:
            x, y = t.get_position()
            t.set_y(y * scale)
    for legend in fig.legends:  # anchored in the old figure's rectangle
        legend.set_bbox_to_anchor((0, 0, 1, scale), transform=fig.transFigure)


def mark_random_weights(fig: Figure, reason: Optional[str]) -> Figure:
    """Put the random-weights banner (red, in a band of fixed height above everything else) on
    ``fig``; ``reason`` None does nothing. Works on any figure (a layout engine's result is fixed
    first); the font shrinks to fit a narrow figure (never below FONT_MIN points), and a figure
    too narrow even then is widened. Returns ``fig``."""
    if reason is None:
        return fig
    text = banner_text(reason)
    _freeze_layout(fig)
    _grow_top(fig, BAND_INCHES)
    w, h = fig.get_size_inches()
    banner = fig.text(0.5, 1 - BAND_INCHES / 2 / h, text, ha="center", va="center", color=COLOR,
                      fontsize=FONT_MAX, fontweight="bold", linespacing=1.15, label=MARK_LABEL)
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else None
    if renderer is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer()
    width = banner.get_window_extent(renderer).width / fig.dpi  # inches at FONT_MAX
    room = 0.96 * w
    if width > room:
        size = max(FONT_MIN, FONT_MAX * room / width)
        banner.set_fontsize(size)
        if width * size / FONT_MAX > room:  # too narrow even at FONT_MIN: widen (axes keep their aspect)
            fig.set_size_inches(width * size / FONT_MAX / 0.96, h)
    return fig


def marked(fig: Figure, seg: Any) -> Figure:
    """``mark_random_weights(fig, segmenter_reason(seg))``: the mark when ``seg`` runs random weights."""
    return mark_random_weights(fig, segmenter_reason(seg))
