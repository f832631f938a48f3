"""A sweep's grid: the axes a run sweeps, checked against the configured method's declared knobs,
and the decode specs of its points.

    sweep:                       # conf/sweep.yaml; any knob of the method, its switches, the decision's,
      gaussian_std: [3, 5, 7]    # and the post-process's settings under ``postprocess``
      residual: [true, false]
      postprocess: {steps: [5, 10]}

An axis with an empty list is not swept (the configured value). The points are the product of the
axes, in the order of the knobs' declarations (switches, the method's, the decision's, the
post-process's); each is one :class:`DecodeSpec` (``Segmenter.decode_spec``).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from ..knobs import Knob
from ..methods import get_method
from ..postprocess import get_postprocess
from ..resolve import decode_spec
from ..specs import DecodeSpec, flatten, plain

Point = Tuple[Dict[str, Any], DecodeSpec]  # (the swept values, the decode spec)


def sweepable(method: str, postprocess: str) -> Dict[str, Knob]:
    """``{axis name: knob}`` a run of ``method`` with ``postprocess`` may sweep."""
    out = {k.name: k for k in get_method(method).all_knobs}
    out.update({f"postprocess.{k.name}": k for k in get_postprocess(postprocess).knobs})
    return out


def grid_axes(grid: Any, method: str, postprocess: str) -> Dict[str, List[Any]]:
    """The swept axes of ``grid`` (a mapping or DictConfig; empty lists dropped), each value checked
    by its knob. An axis the method does not have is an error listing the ones it has."""
    if grid is None:
        return {}
    flat = flatten(plain(grid) if OmegaConf.is_config(grid) else dict(grid))
    allowed = sweepable(method, postprocess)
    axes: Dict[str, List[Any]] = {}
    for name, values in flat.items():
        if values is None or (isinstance(values, (list, tuple)) and len(values) == 0):
            continue
        if name not in allowed:
            raise ValueError(f"sweep.{name} is not a knob of method {method} (postprocess={postprocess}); "
                             f"sweep one of: {', '.join(allowed)}")
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"sweep.{name} must be a list of values, e.g. sweep.{name}=[a,b], got {values!r}")
        axes[name] = [allowed[name].check(v, "sweep") for v in values]
    return axes


def grid_points(cfg: Any, axes: Mapping[str, Sequence[Any]], classes: Optional[Sequence[str]] = None) -> List[Point]:
    """The product of ``axes`` as (values, DecodeSpec) pairs; no axes = the configured point.

    ``cfg`` is the run's config (its method, post-process and protocol), not a Segmenter's: a
    Segmenter built for another dataset has another ``prob_thd``.
    """
    post_name = str(cfg.postprocess.name)
    points = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        values = dict(zip(axes, combo))
        post = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("postprocess.")}
        knobs = {k: v for k, v in values.items() if not k.startswith("postprocess.")}
        spec = decode_spec(cfg, classes, None, {"name": post_name, **post} if post else None, **knobs)
        points.append((values, spec))
    return points
