"""Knobs as data: every setting a decode takes, declared once where its method or post-process is
registered (name, type, valid range or choices, a one-line doc); the default lives in the YAML.

Every outer tool reads these declarations: ``Segmenter.decode`` checks and types a value with
:meth:`Knob.check`; ``proxyclip-sweep`` accepts ``sweep.<name>`` for exactly the knobs of the
configured method (plus the decision and post-process ones); the explorer builds one control per
knob (:attr:`Knob.slider` for numbers, a checkbox for switches, a dropdown for choices); the
summary pivots on any of them.

    Knob("gamma", "float", "affinity scale (inverse softmax temperature)", low=0, low_open=True,
         slider=(0.5, 8.0, 0.1))

Kinds: ``float`` (an int is accepted and becomes float), ``int``, ``bool``, ``choice`` (one of
``choices``), ``ints`` (a list of ints, each within the range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

KINDS = ("float", "int", "bool", "choice", "ints")


@dataclass(frozen=True)
class Knob:
    """One declared setting of a method, a post-process or the class decision."""

    name: str
    kind: str  # float | int | bool | choice | ints
    doc: str  # one line, shown in errors, --help-like listings and the explorer's tooltips
    low: Optional[float] = None  # lower bound (inclusive unless low_open)
    high: Optional[float] = None  # upper bound (inclusive unless high_open)
    low_open: bool = False
    high_open: bool = False
    choices: Tuple[str, ...] = ()  # kind "choice"
    slider: Optional[Tuple[float, float, float]] = None  # (min, max, step) of the explorer's slider

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"knob {self.name}: a choice knob needs its choices")

    def describe(self) -> str:
        """``gamma (float > 0): affinity scale``: what an error message or a listing shows."""
        return f"{self.name} ({self.expected()}): {self.doc}"

    def expected(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        what = {"float": "a number", "int": "an integer", "ints": "a list of integers"}[self.kind]
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        return what + (" " + " and ".join(bounds) if bounds else "")

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` typed as this knob's kind (int -> float for floats; a list for ints), or a
        ValueError naming ``where.name``, the value and what was expected."""
        label = f"{where}.{self.name}" if where else self.name

        def bad(detail: str = "") -> ValueError:
            return ValueError(f"{label} must be {self.expected()}, got {value!r}{detail}")

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise bad()
            return value
        if self.kind == "ints":
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise bad()
            items = list(value)
            if not items:
                raise bad(" (empty)")
            for v in items:
                if isinstance(v, bool) or not isinstance(v, int) or not self._in_range(v):
                    raise bad()
            return [int(v) for v in items]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if self.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad()
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        if not self._in_range(value):
            raise bad()
        return value

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


def _num(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------------------------------------- shared knobs
# The last block's switches: every method has them (its YAML sets its published values).
SWITCHES: Tuple[Knob, ...] = (
    Knob("residual", "bool", "last block: Y = X + attention output (else Y = attention output)"),
    Knob("ffn", "bool", "last block: Z = Y + mlp(ln_2(Y)) (else Z = Y)"),
)
# The class decision: logit_scale from the method's YAML, prob_thd from the dataset's protocol.
DECISION: Tuple[Knob, ...] = (
    Knob("logit_scale", "float", "class decision: softmax(logit_scale * scores)", low=0, low_open=True,
         slider=(5.0, 200.0, 5.0)),
    Knob("prob_thd", "float", "best probability below this -> background (class 0); 0 disables", low=0, high=1,
         slider=(0.0, 1.0, 0.05)),
)


def by_name(knobs: Sequence[Knob]) -> Dict[str, Knob]:
    return {k.name: k for k in knobs}


def listing(knobs: Sequence[Knob]) -> str:
    """``a, b, c``: the names, for error messages."""
    return ", ".join(k.name for k in knobs) or "none"
