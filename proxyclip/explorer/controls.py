"""Controls made from knob declarations (proxyclip/knobs.py): one ipywidget per knob.

    float / int with ``knob.slider``  -> FloatSlider / IntSlider (the range widened to hold the value)
    float / int without one           -> BoundedFloatText / BoundedIntText within the knob's bounds
    bool                              -> Checkbox
    choice                            -> Dropdown of ``knob.choices``
    ints                              -> Text of comma-separated integers

Every control is labelled with the knob's name and has its doc as tooltip. :class:`KnobPanel`
holds the controls of one tuple of knobs and rebuilds them when the declarations change.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

from ..knobs import Knob

WIDTH = "420px"
LABEL = {"description_width": "110px"}
UNBOUNDED = 1e12  # the text box's limit where a knob declares no bound


def decimals(step: float) -> int:
    """Decimal places of a slider step (0.05 -> 2, 0.5 -> 1, 5 -> 0)."""
    text = f"{float(step):g}"
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def knob_control(knob: Knob, value: Any):
    """The ipywidget for ``knob``, showing ``value``."""
    import ipywidgets as W

    common = dict(description=knob.name, tooltip=knob.doc, style=LABEL, layout=W.Layout(width=WIDTH))
    if knob.kind == "bool":
        return W.Checkbox(value=bool(value), description=knob.name, tooltip=knob.doc, indent=False)
    if knob.kind == "choice":
        return W.Dropdown(options=list(knob.choices), value=value, **common)
    if knob.kind == "ints":
        return W.Text(value=", ".join(str(v) for v in value), placeholder="integers, comma-separated",
                      continuous_update=False, **common)
    integer = knob.kind == "int"
    if knob.slider is not None:
        lo, hi, step = knob.slider
        lo, hi = min(lo, value), max(hi, value)
        if integer:
            return W.IntSlider(value=int(value), min=int(lo), max=int(hi), step=max(int(step), 1),
                               continuous_update=False, **common)
        return W.FloatSlider(value=float(value), min=lo, max=hi, step=step, continuous_update=False,
                             readout_format=f".{max(decimals(step), 1)}f", **common)
    lo = -UNBOUNDED if knob.low is None else knob.low
    hi = UNBOUNDED if knob.high is None else knob.high
    if integer:
        return W.BoundedIntText(value=int(value), min=int(lo), max=int(hi), **common)
    return W.BoundedFloatText(value=float(value), min=lo, max=hi, **common)


def parse_ints(text: str, knob: Knob) -> list:
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{knob.name} must be {knob.expected()}, separated by commas; got {text!r}") from None


def control_value(knob: Knob, widget) -> Any:
    """What ``widget`` shows, as ``knob``'s kind (ValueError for unreadable text)."""
    if knob.kind == "ints":
        return parse_ints(widget.value, knob)
    if knob.kind == "int":
        return int(widget.value)
    if knob.kind == "float":
        return float(widget.value)
    return widget.value


def show_value(knob: Knob, widget, value: Any) -> None:
    """Set ``widget`` to ``value`` (a slider's range widened to hold it)."""
    if knob.kind == "ints":
        widget.value = ", ".join(str(v) for v in value)
        return
    if knob.slider is not None:
        widget.min, widget.max = min(widget.min, value), max(widget.max, value)
    widget.value = value


class KnobPanel:
    """The controls of one tuple of knobs in a VBox (``box``); ``on_change(name)`` is called when
    the user changes one (read it with :meth:`value`). Setting values from code does not call it."""

    def __init__(self, on_change: Callable[[str], None]):
        import ipywidgets as W

        self.box = W.VBox([])
        self.knobs: Tuple[Knob, ...] = ()
        self.controls: Dict[str, Any] = {}
        self._on_change = on_change
        self._quiet = False

    def show(self, knobs: Sequence[Knob], values: Mapping[str, Any]) -> None:
        """Controls for ``knobs`` with ``values``: rebuilt if the declarations changed, else updated."""
        knobs = tuple(knobs)
        if knobs != self.knobs:
            self.knobs = knobs
            self.controls = {k.name: knob_control(k, values[k.name]) for k in knobs}
            for name, w in self.controls.items():
                w.observe(lambda change, name=name: self._changed(name), names="value")
            self.box.children = list(self.controls.values())
            return
        self._quiet = True
        try:
            for k in knobs:
                if self.value_or_none(k.name) != values[k.name]:
                    show_value(k, self.controls[k.name], values[k.name])
        finally:
            self._quiet = False

    def value(self, name: str) -> Any:
        knob = next(k for k in self.knobs if k.name == name)
        return control_value(knob, self.controls[name])

    def value_or_none(self, name: str) -> Any:
        try:
            return self.value(name)
        except ValueError:
            return None

    def set_disabled(self, disabled: bool) -> None:
        for w in self.controls.values():
            w.disabled = disabled

    def _changed(self, name: str) -> None:
        if not self._quiet:
            self._on_change(name)
