"""The ipywidgets view of an :class:`ExplorerController`: :class:`Explorer`.

Its knob controls are built from the declarations (``controls.KnobPanel``): the current method's
``all_knobs`` (rebuilt when the method changes) and the post-process's settings (rebuilt when
the post-process changes). The image and pixel inputs are ``inputs.ImageInputs`` and ``inputs.PatchPicker``.
The widgets are made and laid out in ``panel.py``; here is what a change to each one does.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from ..methods import METHODS
from ..viz import figure_to_png
from . import figures, panel
from .controller import ExplorerController
from .controls import WIDTH


def error_html(message: str) -> str:
    return f"<span style='color:#b00'>{message}</span>"


class Explorer:
    """The ipywidgets view of an :class:`ExplorerController`. ``Explorer(...).widget`` is the box to display.

    Keyword arguments go to the controller (``clip``, ``vfm``, ``weights``, ``overrides``,
    ``image``, ``classes``, ``segmenter`` (reuse a built pipeline), ``segmenter_factory``). ``clip_options`` /
    ``vfm_options`` restrict the dropdowns (default: every file in ``conf/clip`` and ``conf/vfm``).
    """

    def __init__(self, clip_options: Optional[Sequence[str]] = None, vfm_options: Optional[Sequence[str]] = None,
                 dpi: float = 72, **controller_kwargs):
        import ipywidgets as W

        self.dpi, self._busy, self.n_renders = dpi, False, 0
        self._seg_figure, self.last_update_seconds = None, float("nan")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="idle",
                                        layout=W.Layout(width=WIDTH), style={"description_width": "initial"})
        self.status = W.HTML(value="")
        controller_kwargs.setdefault("progress", self._on_progress)
        self.controller = ExplorerController(compute=False, **controller_kwargs)
        panel.build_widgets(self, clip_options, vfm_options)  # every control; self.widget, the box of them
        self._full_update()  # first encode + decode (shows progress)
        panel.observe_controls(self)

    def _ipython_display_(self):  # display(explorer) shows the widget
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------------ sync
    def _on_progress(self, message: str, fraction: float) -> None:
        self.progress.description = message
        self.progress.value = fraction
        self.progress.bar_style = "success" if fraction >= 1.0 else "info"

    def _sync_from_controller(self) -> None:
        """Every control from the controller: the method, its knobs, the post-process, the patch."""
        c = self.controller
        self._busy = True
        try:
            self.method.value = c.method
            self.postprocess.value = c.postprocess_preset
            self.knob_panel.show(c.knob_declarations(), c.knobs)
            self.post_panel.show(c.postprocess_knobs(), c.postprocess)
            self.patch.show(c.image.shape[1:], c.point)
            last = c.segmenter.clip.num_blocks - 1
            self.block.max = last
            self.block.value = last if c.block is None or c.block > last else c.block
            self.show_masks.value = c.show_masks
        finally:
            self._busy = False
        self._sync_per_pixel()

    def _sync_per_pixel(self) -> None:
        """An image-level method has no per-pixel attention: the affinity-stages checkbox is disabled
        (the attention panel and the status line say why)."""
        c = self.controller
        image_level = c.method is not None and METHODS[c.method].level == "image"
        self.show_affinity.disabled = image_level
        self.show_affinity.tooltip = (f"{c.method} is image-level: no per-pixel attention" if image_level else
                                      "the affinity stages of the method's attention, when it has them")

    def _set_enabled(self, enabled: bool) -> None:
        for w in (self.clip, self.vfm, self.method, self.postprocess, self.classes, self.show_affinity, self.block,
                  self.show_masks):
            w.disabled = not enabled
        if enabled:
            self._sync_per_pixel()
        self.inputs.set_disabled(not enabled)
        self.knob_panel.set_disabled(not enabled)
        self.post_panel.set_disabled(not enabled)

    def _full_update(self) -> None:
        self._set_enabled(False)
        try:
            self.controller.refresh()
            self._sync_from_controller()
            self._render()
        except Exception as e:  # shown in the explorer, not lost in a log
            self.status.value = error_html(f"error: {type(e).__name__}: {e}")
            raise
        finally:
            self._set_enabled(True)

    def _render(self, segmentation: bool = True, attention: bool = True) -> None:
        t0 = time.perf_counter()
        c = self.controller
        if segmentation:
            self._seg_figure = c.segmentation_figure()
            self.seg_image.value = figure_to_png(self._seg_figure, dpi=self.dpi)
        if attention:
            self.attn_image.value = figure_to_png(c.attention_figure(self.show_affinity.value), dpi=self.dpi)
        self.n_renders += 1
        self.status.value = figures.status_text(c)
        self.last_update_seconds = time.perf_counter() - t0

    def _apply(self, change_state, attention: bool = True) -> bool:
        """Run ``change_state()`` then the decode it needs and redraw; a ValueError is shown and the
        controls go back to the controller's state. Returns whether it worked."""
        t0 = time.perf_counter()
        try:
            change_state()
            self.controller.refresh()
        except ValueError as e:
            self._sync_from_controller()
            self.status.value = error_html(str(e))
            return False
        self._sync_from_controller()
        self._render(attention=attention)
        self.last_update_seconds = time.perf_counter() - t0
        return True

    # ------------------------------------------------------------------ events
    def _on_knob(self, name: str) -> None:
        """A knob control: one decode; the attention is redrawn only for the method's own knobs."""
        if not self._busy:
            c = self.controller
            before = dict(c.knobs)  # a value its decode refuses (Trident's residual): the knobs go back too
            if not self._apply(lambda: c.set_knobs(**{name: self.knob_panel.value(name)}), c.changes_attention(name)):
                c.set_knobs(**before), self._sync_from_controller()

    def _on_setting(self, name: str) -> None:
        """A post-process setting: one decode; the attention does not change."""
        if not self._busy:
            c = self.controller
            self._apply(lambda: c.set_postprocess({name: self.post_panel.value(name)}), attention=False)

    def _on_method(self, change=None) -> None:
        """The method dropdown: its knob controls, one decode on the cached Encoded."""
        if not self._busy:
            self._apply(lambda: self.controller.set_method(self.method.value))

    def _on_postprocess(self, change=None) -> None:
        """The post-process dropdown (a preset of conf/postprocess): its settings' controls, one decode."""
        if not self._busy and self.postprocess.value is not None:
            self._apply(lambda: self.controller.set_postprocess(self.postprocess.value), attention=False)

    def _on_classes(self, change=None) -> None:
        if not self._busy:
            try:
                self.controller.set_classes(self.classes.value)
            except (ValueError, TypeError) as e:
                self.status.value = error_html(f"classes: {e}")
                return
            self._apply(lambda: None)

    def _on_point(self, y: int, x: int) -> None:
        """The patch sliders or a click: no computation, both figures redrawn (the marker, the attention)."""
        if not self._busy:
            t0 = time.perf_counter()
            self.controller.set_point(y, x)
            self._render()
            self.last_update_seconds = time.perf_counter() - t0

    def _on_view(self, change=None) -> None:
        """The affinity-stages checkbox: record the stages (one decode if missing), redraw the attention panel."""
        if not self._busy:
            self.controller.set_record_stages(self.show_affinity.value)
            self.controller.refresh()
            self._render(segmentation=False)

    def _on_masks(self, change=None) -> None:
        """The mask-proposals checkbox: the segmentation redrawn with (or without) the encode's proposals; no computation."""
        if not self._busy:
            self.controller.set_show_masks(self.show_masks.value)
            self._render(attention=False)

    def _on_block(self, change=None) -> None:
        """The block slider: that block's attention (once per image, CLIP encodes keeping every block's tokens)."""
        if not self._busy:
            self._apply(lambda: self.controller.set_block(int(self.block.value)), attention=True)

    def _on_backbone(self, change=None) -> None:
        if self._busy:
            return
        c = self.controller
        previous = (c.clip_name, c.vfm_name)
        c.set_backbones(clip=self.clip.value, vfm=self.vfm.value)
        try:
            self._full_update()
        except Exception as e:  # e.g. weights that cannot be loaded: say so, go back to what worked
            undo_backbone(self, previous, change, e)

    def _on_image(self, image: Any, name: Optional[str]) -> None:
        """A new image from the inputs (sample, path or upload): encode and redraw."""
        try:
            self.controller.set_image(image, name=name)
        except (OSError, ValueError) as e:
            self.status.value = error_html(str(e))
            return
        self._full_update()


def undo_backbone(ex: Explorer, previous, change, error: Exception) -> None:
    """A backbone switch failed: back to ``previous`` (clip, vfm), cached (a decode at most), and say why."""
    c = ex.controller
    c.set_backbones(*previous)
    ex._busy = True
    try:
        ex.clip.value, ex.vfm.value = previous
    finally:
        ex._busy = False
    c.refresh()
    ex._render()
    wanted = change.new if change is not None else "the new backbones"
    ex.status.value = error_html(f"could not switch to {wanted}: {type(error).__name__}: {error}")
    ex.progress.description, ex.progress.bar_style = "failed", "danger"
