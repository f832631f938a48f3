"""What the pipeline hands around: :class:`Encoded` (the expensive half of one image) and
:class:`Prediction` (a decode's result)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .decision import WindowScores, decide
from .hooks import HookSet, decl_of, replayed_hooks
from .specs import ENCODED_FORMAT, DecodeSpec
from .text import ClassList
from .windows import Box


@dataclass
class Encoded:
    """The expensive half of one image: per window, the CLIP tokens entering the last block and the
    VFM features, kept as separate parts.

    Depends only on the image and the encode spec (``clip_key`` / ``vfm_key`` are its two parts'
    identities: ``proxyclip.specs.EncodeSpec``), never on the method, its knobs, classes or thresholds.
    """

    image: torch.Tensor  # (3, H, W) original image in [0, 1]
    resized_size: Tuple[int, int]  # (h, w) after the short-side resize
    windows: List[Box]  # (y1, y2, x1, x2) in the resized image
    pad: Tuple[int, int, int, int]  # (top, bottom, left, right) padding of every window
    clip_tokens: torch.Tensor  # (n_windows, 1 + gh*gw, D) float32, CLS first (None only in a cache's partial entry)
    clip_grid: Tuple[int, int]  # (gh, gw)
    vfm_features: Optional[torch.Tensor]  # (n_windows, C, Hv, Wv) float32, None without a VFM
    clip_key: str  # EncodeSpec.clip_key; the padding is checked on decode
    vfm_key: Optional[str]  # EncodeSpec.vfm_key; None without a VFM
    # layer parts (proxyclip/parts.py): {"clip.blocks.{i}.resid_pre": (n_windows, 1 + gh*gw, D)}, same clip_key
    layers: Dict[str, torch.Tensor] = field(default_factory=dict)
    # per-image part: the mask proposals' (H, W) int64 label map at the original size (0 = unsegmented;
    # proxyclip/masks), None with masks=none; masks_key = EncodeSpec.masks_key
    masks: Optional[torch.Tensor] = None
    masks_key: Optional[str] = None
    # per-image part: the SAM encoder's last-block attention inputs of the original image (Trident;
    # proxyclip/sam_attention.py), None unless the encode's method reads it; sam_key = EncodeSpec.sam_key
    sam: Optional[Dict[str, torch.Tensor]] = None
    sam_key: Optional[str] = None
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False)  # decode-side reuse, not saved

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def key(self) -> str:
        return f"{self.clip_key}+{self.vfm_key or 'novfm'}"

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of CPU tensors and metadata, for ``torch.save``."""
        return dict(format=ENCODED_FORMAT, image=self.image.cpu(), resized_size=list(self.resized_size),
                    windows=[list(b) for b in self.windows], pad=list(self.pad), clip_tokens=self.clip_tokens.cpu(),
                    clip_grid=list(self.clip_grid),
                    vfm_features=None if self.vfm_features is None else self.vfm_features.cpu(),
                    clip_key=self.clip_key, vfm_key=self.vfm_key,
                    layers={k: v.cpu() for k, v in self.layers.items()},
                    masks=None if self.masks is None else self.masks.cpu(), masks_key=self.masks_key,
                    sam=None if self.sam is None else {k: v.cpu() for k, v in self.sam.items()}, sam_key=self.sam_key)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Encoded":
        if d.get("format") != ENCODED_FORMAT:
            raise ValueError(f"Encoded format {d.get('format', 1)} is not {ENCODED_FORMAT} (saved by an older version: "
                             "encode again)")
        return cls(image=d["image"], resized_size=tuple(d["resized_size"]), windows=[tuple(b) for b in d["windows"]],
                   pad=tuple(d["pad"]), clip_tokens=d["clip_tokens"], clip_grid=tuple(d["clip_grid"]),
                   vfm_features=d["vfm_features"], clip_key=d["clip_key"], vfm_key=d["vfm_key"],
                   layers=dict(d.get("layers") or {}), masks=d.get("masks"), masks_key=d.get("masks_key"),
                   sam=d.get("sam"), sam_key=d.get("sam_key"))


class Prediction:
    """Result for one image, at its original size.

    labels      (H, W) int64 argmax class; best probability < prob_thd -> 0 (background); always kept
    best_prob   (H, W) the winning class's probability (None when the decode was told not to keep it)
    scores      (Q, H, W) cosine scores per query name, windows merged (and post-processed, if on)
    probs       (K, H, W) softmax(logit_scale * scores) over queries, max over each class's queries
    spec        the DecodeSpec of the decode (method, every knob, post-process, decision, classes)

    ``scores`` and ``probs`` are materialized on first access from what the decode kept (the
    windows' low-resolution scores and their layout, ``source``) unless the decode had them already
    (a post-process, or a hook / cache on ``scores.image``); each costs Q (or K) x H x W floats.
    :meth:`class_scores` gives one class's map without materializing the others.
    """

    def __init__(self, image: torch.Tensor, scores: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                 class_names: Sequence[str] = (), queries: Sequence[str] = (),
                 query_to_class: Sequence[int] = (), spec: Optional[DecodeSpec] = None,
                 random_weights: bool = False, best_prob: Optional[torch.Tensor] = None,
                 source: Optional[WindowScores] = None):
        if labels is None:
            raise ValueError("a Prediction needs its labels")
        if scores is None and source is None:
            raise ValueError("a Prediction needs its scores or the window scores they come from (source=)")
        self.image, self.labels, self.spec, self.random_weights = image, labels, spec, random_weights
        self.class_names, self.queries, self.query_to_class = list(class_names), list(queries), list(query_to_class)
        self._scores, self._probs, self.source = scores, probs, source
        if best_prob is None and probs is not None:
            best_prob = probs.amax(dim=0)
        self.best_prob = best_prob

    @property
    def classes(self) -> ClassList:
        return ClassList(self.class_names, self.queries, self.query_to_class)

    @property
    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self.source.full()
        return self._scores

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            if self.spec is None:
                raise ValueError("this Prediction has no DecodeSpec: its logit scale is unknown")
            self._probs = decide(self.scores, self.classes, self.spec.logit_scale, self.spec.prob_thd,
                                 self.spec.area_thd)[0]
        return self._probs

    @property
    def materialized(self) -> bool:
        """True once the full (Q, H, W) scores are held."""
        return self._scores is not None

    def class_scores(self, name_or_index: Union[int, str]) -> torch.Tensor:
        """(H, W) full-resolution score of one class (the max over its queries); by class index,
        class line, or one of its query names."""
        k = self._class_index(name_or_index)
        rows = [q for q, owner in enumerate(self.query_to_class) if owner == k]
        maps = self._scores[rows] if self._scores is not None else self.source.full(rows)
        return maps.amax(dim=0)

    def _class_index(self, name_or_index: Union[int, str]) -> int:
        if isinstance(name_or_index, int) and not isinstance(name_or_index, bool):
            if not 0 <= name_or_index < len(self.class_names):
                raise IndexError(f"class index {name_or_index} out of range (K={len(self.class_names)})")
            return name_or_index
        name = str(name_or_index)
        if name in self.class_names:
            return self.class_names.index(name)
        if name in self.queries:
            return self.query_to_class[self.queries.index(name)]
        raise KeyError(f"{name!r} is neither a class nor a query name of this prediction: {self.class_names}")

    @property
    def params(self) -> Dict[str, Any]:
        """Every setting of the decode: method, its switches and knobs, logit_scale, prob_thd, postprocess."""
        return {} if self.spec is None else self.spec.params()

    @property
    def method(self) -> str:
        return "" if self.spec is None else self.spec.method


def check_decodable(enc: Encoded, meth: Any, clip_key: str, vfm_key: Optional[str],
                    pad: Tuple[int, int, int, int], parts: Sequence[str] = (), sam_key: Optional[str] = None) -> None:
    """``enc`` was made under these part keys and window padding, and has what ``meth`` reads
    (its VFM features; its layer ``parts``, proxyclip/parts.py)."""
    if not isinstance(enc, Encoded):
        raise TypeError(f"decode takes the Encoded returned by encode(), got {type(enc).__name__}")
    if enc.clip_key != clip_key:
        raise ValueError(f"this Encoded was made by another CLIP configuration ({enc.clip_key}), not {clip_key}")
    if pad != enc.pad:
        raise ValueError(f"this Encoded's windows are padded {enc.pad}, not as this configuration pads them "
                         f"({pad}): encode again with this Segmenter")
    if meth.needs_vfm:
        if enc.vfm_features is None:
            raise ValueError(f"method {meth.name} needs VFM features, but this Encoded has none (it was encoded "
                             f"for a method without a VFM); encode with a Segmenter built for {meth.name}")
        if enc.vfm_key != vfm_key:
            raise ValueError(f"this Encoded's VFM features come from another configuration ({enc.vfm_key}), "
                             f"not {vfm_key}")
    if getattr(meth, "needs_masks", False) and enc.masks is None:
        raise ValueError(f"method {meth.name} reads mask proposals, but this Encoded has none: encode with "
                         "masks=file (masks.dir=...), masks=sam2 or masks=sam")
    if getattr(meth, "needs_sam", False):
        if enc.sam is None:
            raise ValueError(f"method {meth.name} reads the SAM part (the SAM encoder's last-block attention of the "
                             f"image), but this Encoded has none: encode with a Segmenter configured with "
                             f"method={meth.name} (trident.sam=sam_vitb)")
        if sam_key is not None and enc.sam_key != sam_key:
            raise ValueError(f"this Encoded's SAM part comes from another configuration ({enc.sam_key}), not {sam_key}")
    lacking = [p for p in parts if p not in enc.layers]
    if lacking:
        raise ValueError(f"method {meth.name} reads the encode part {lacking[0]}, which this Encoded lacks "
                         f"(it has {sorted(enc.layers) or 'no layer parts'}): encode with "
                         f"seg.encode(image, keep={list(parts)!r}), or with a Segmenter configured for {meth.name}")


def replay(enc: Encoded, hooks: HookSet, batch_size: int) -> Encoded:
    """Pass a stored Encoded's tensors through the encode-time hook points (those declared with a
    ``replay`` field), batch by batch, so hooks can read and replace them; a copy if any changed."""
    changed: Dict[str, torch.Tensor] = {}
    for decl in replayed_hooks():
        stored = getattr(enc, decl.replay)
        if stored is None:
            continue
        if decl.level == "image":  # one tensor per image (the mask proposals)
            t = hooks.point(decl.name, stored)
            if t is not stored:
                changed[decl.replay] = t
            continue
        parts, replaced = [], False
        for start in range(0, len(enc.windows), batch_size):
            t = stored[start:start + batch_size]
            parts.append(hooks.point(decl.name, t, start))
            replaced |= parts[-1] is not t
        if replaced:
            changed[decl.replay] = torch.cat(parts)
    return replace(enc, memo={}, **changed) if changed else enc


def check_replayable(names) -> None:
    """The hook names asked for by name can fire from a stored Encoded: an encode-time point with
    nothing stored to replay (the per-block points) needs the image encoded again."""
    lost = sorted(n for n in names if (d := decl_of(n)) is not None and d.stage == "encode" and not d.replay)
    if lost:
        raise ValueError(f"hook point {lost[0]} fires while the encode runs CLIP's (or the VFM's) blocks, and a stored "
                         "Encoded keeps no record of it: pass the image instead of the Encoded "
                         "(run_with_cache(image, ...) encodes again)")
