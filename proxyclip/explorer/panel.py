"""The explorer's widgets: each control of :class:`~proxyclip.explorer.view.Explorer`, the box they
are laid out in (``Explorer.widget``), and which handler each control's changes go to.

The controls are set on the Explorer as attributes (``explorer.method``, ``explorer.block``, ...);
what they do on a change is the Explorer's (proxyclip/explorer/view.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from ..methods import METHODS
from ..resolve import postprocess_presets
from .controls import LABEL, WIDTH, KnobPanel
from .inputs import ImageInputs, PatchPicker
from .sources import available_backbones

if TYPE_CHECKING:
    from .view import Explorer


def backbone_options(kind: str, given: Optional[Sequence[str]], current: str) -> list:
    """The dropdown's options: ``given`` (default: every file of conf/{kind}), ``current`` first if missing."""
    options = list(given or available_backbones(kind))
    if current not in options:
        options.insert(0, current)
    return options


def build_widgets(ex: "Explorer", clip_options: Optional[Sequence[str]], vfm_options: Optional[Sequence[str]]) -> None:
    """Every control of ``ex`` (showing its controller's state) and ``ex.widget``, the box of them all."""
    import ipywidgets as W

    c = ex.controller
    ex.inputs = ImageInputs(ex._on_image)
    ex.classes = W.Textarea(value="\n".join(c.classes), description="classes (one a line; synonyms with ';')",
                            layout=W.Layout(width=WIDTH, height="110px"), continuous_update=False,
                            style={"description_width": "initial"})
    ex.clip = W.Dropdown(options=backbone_options("clip", clip_options, c.clip_name), value=c.clip_name,
                         description="CLIP", style=LABEL)
    ex.vfm = W.Dropdown(options=backbone_options("vfm", vfm_options, c.vfm_name), value=c.vfm_name,
                        description="VFM", style=LABEL)
    ex.method = W.Dropdown(options=list(METHODS), value=None, description="method", style=LABEL)
    ex.postprocess = W.Dropdown(options=list(postprocess_presets()), value=None, description="post-process",
                                style=LABEL)
    ex.knob_panel = KnobPanel(ex._on_knob)  # the method's knobs
    ex.post_panel = KnobPanel(ex._on_setting)  # the post-process's settings
    ex.show_affinity = W.Checkbox(value=False, indent=False,
                                  description="affinity stages (S, S', mask), if the method has them")
    ex.show_masks = W.Checkbox(value=False, indent=False,
                               description="mask proposals over the image (masks=file|sam2|sam)")
    ex.block = W.IntSlider(value=0, min=0, max=0, description="CLIP block", style=LABEL, continuous_update=False,
                           tooltip="block (0-indexed) whose attention is shown", layout=W.Layout(width=WIDTH))
    ex.seg_image, ex.attn_image = W.Image(format="png"), W.Image(format="png")
    ex.patch = PatchPicker(ex.seg_image, lambda: None if ex._busy else ex._seg_figure, ex._on_point)
    ex.patch_x, ex.patch_y, ex.click_events = ex.patch.patch_x, ex.patch.patch_y, ex.patch.click_events
    controls = W.VBox([W.HTML("<b>ProxyCLIP explorer</b>"), ex.inputs.box, ex.clip, ex.vfm, ex.method,
                       ex.knob_panel.box, ex.postprocess, ex.post_panel.box, ex.classes,
                       ex.patch.box, ex.block, ex.show_affinity, ex.show_masks, ex.progress, ex.status],
                      layout=W.Layout(min_width="440px"))
    ex.widget = W.HBox([controls, W.VBox([ex.seg_image, ex.attn_image])])
    ex.widget.add_class("proxyclip-explorer")


def observe_controls(ex: "Explorer") -> None:
    """Each control's changes to its handler (after the first update, so that one fires none)."""
    for w, handler in ((ex.show_affinity, ex._on_view), (ex.show_masks, ex._on_masks), (ex.block, ex._on_block),
                       (ex.method, ex._on_method), (ex.postprocess, ex._on_postprocess),
                       (ex.classes, ex._on_classes), (ex.clip, ex._on_backbone), (ex.vfm, ex._on_backbone)):
        w.observe(handler, names="value")
