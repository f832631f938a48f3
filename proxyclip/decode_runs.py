"""What a Segmenter's ``decode_many`` runs once for several DecodeSpecs (proxyclip/pipeline.py).

Specs that differ only in the decision's values (``logit_scale``, ``prob_thd``, ``area_thd``) share
one run of the method (its last block) and one set of window scores: a sweep's points. Each group
is checked against the Encoded first (its keys, padding and the parts its method reads), so a bad
decode fails before any run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Dict, List, Sequence

from .encoded import Encoded, check_decodable
from .methods import check_vfm_feature, get_method
from .specs import DecodeSpec, classes_digest

if TYPE_CHECKING:
    from .pipeline import Segmenter


def shared_runs(seg: "Segmenter", enc: Encoded, classes: Sequence[str], specs: Sequence[DecodeSpec]) -> List[List[int]]:
    """The indices into ``specs`` grouped by shared run (first-seen order), each group checked: the
    specs were made for ``classes`` and ``enc`` holds what their method reads under ``seg``'s configuration."""
    for spec in specs:
        if spec.classes and spec.classes != classes_digest(classes):
            raise ValueError("this DecodeSpec was made for another class list (its classes digest differs): "
                             "make it with decode_spec(classes=...) for these classes")
    shared: Dict[str, List[int]] = {}
    for i, spec in enumerate(specs):
        shared.setdefault(replace(spec, logit_scale=1.0, prob_thd=0.0, area_thd=None).key(), []).append(i)
    pad = seg.layout(enc.image)[2]
    for idx in shared.values():
        meth = get_method(specs[idx[0]].method)
        check_decodable(enc, meth, seg.clip_key, seg.vfm_key, pad, seg.parts_of(specs[idx[0]]), seg.encode_spec.sam_key)
        if meth.needs_vfm:
            check_vfm_feature(meth, seg.encode_spec.vfm.feature)
    return list(shared.values())
