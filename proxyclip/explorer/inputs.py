"""The explorer's inputs besides the knobs: the image (a bundled sample, a path, or an upload ->
``on_image(image, name)``) and the chosen pixel (sliders or a click -> ``on_point(y, x)``)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .controls import LABEL, WIDTH
from .sources import pixel_to_data, sample_images


class ImageInputs:
    """A sample-image dropdown, a path box with a load button, and an upload button, in ``box``."""

    def __init__(self, on_image: Callable[[Any, Optional[str]], None]):
        import ipywidgets as W

        self.on_image = on_image
        self.samples = sample_images()
        self.picker = W.Dropdown(options=list(self.samples), description="sample image", style=LABEL)
        self.path = W.Text(placeholder="/path/to/image.jpg", description="or a path", style=LABEL)
        self.load = W.Button(description="load", layout=W.Layout(width="70px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.box = W.VBox([self.picker, W.HBox([self.path, self.load]), self.upload])
        self.picker.observe(self._on_sample, names="value")
        self.load.on_click(self._on_path)
        self.upload.observe(self._on_upload, names="value")

    def set_disabled(self, disabled: bool) -> None:
        for w in (self.picker, self.load, self.upload):
            w.disabled = disabled

    def _on_sample(self, change=None) -> None:
        if self.picker.value is not None:
            self.on_image(self.samples[self.picker.value], self.picker.value)

    def _on_path(self, button=None) -> None:
        self.on_image(self.path.value.strip(), None)

    def _on_upload(self, change=None) -> None:
        files = self.upload.value
        if files:
            f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
            self.on_image(f["content"], f.get("name", "upload"))


class PatchPicker:
    """The chosen pixel: two sliders (``patch_x``, ``patch_y``) and, with ipyevents, a click on the
    segmentation image (``source``) -> ``on_point(y, x)``. ``figure()`` is the figure that image shows."""

    def __init__(self, source, figure: Callable[[], Any], on_point: Callable[[int, int], None]):
        import ipywidgets as W

        self.figure, self.on_point, self._quiet = figure, on_point, False
        self.patch_x = W.IntSlider(min=0, max=1, description="patch x", continuous_update=False, style=LABEL,
                                   layout=W.Layout(width=WIDTH))
        self.patch_y = W.IntSlider(min=0, max=1, description="patch y", continuous_update=False, style=LABEL,
                                   layout=W.Layout(width=WIDTH))
        self.hint = W.HTML("<small>the patch sliders choose the pixel whose attention is shown</small>")
        self.box = W.VBox([self.patch_x, self.patch_y, self.hint])
        self.click_events = None
        try:  # optional: pip install ipyevents
            from ipyevents import Event
        except ImportError:
            pass
        else:
            self.click_events = Event(source=source, watched_events=["click"])
            self.click_events.on_dom_event(self.on_click)
            self.hint.value = "<small>click the segmentation (or use the patch sliders) to choose the patch</small>"
        for w in (self.patch_x, self.patch_y):
            w.observe(self._changed, names="value")

    def show(self, size, point) -> None:
        """The image's (H, W) as the sliders' range and the (y, x) point as their values (no callback)."""
        self._quiet = True
        try:
            self.patch_y.max, self.patch_x.max = size[0] - 1, size[1] - 1
            self.patch_y.value, self.patch_x.value = int(point[0]), int(point[1])
        finally:
            self._quiet = False

    def _changed(self, change=None) -> None:
        if not self._quiet:
            self.on_point(self.patch_y.value, self.patch_x.value)

    def on_click(self, event: Dict[str, Any]) -> None:
        """A click on the segmentation figure: choose that pixel (either panel)."""
        fig = self.figure()
        if fig is None or event.get("type") != "click":
            return
        if "dataX" in event:  # ipyevents: position in the image's own pixels
            px, py = event["dataX"], event["dataY"]
        else:
            scale = fig.bbox.width / max(event["boundingRectWidth"], 1)
            px, py = event["relativeX"] * scale, event["relativeY"] * scale
        hit = pixel_to_data(fig, px, py)
        if hit is None:
            return
        self._quiet = True
        try:
            self.patch_x.value = int(min(max(round(hit[0]), 0), self.patch_x.max))
            self.patch_y.value = int(min(max(round(hit[1]), 0), self.patch_y.max))
        finally:
            self._quiet = False
        self._changed()
