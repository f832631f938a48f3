"""One identity for every run: what an encode depends on (:class:`EncodeSpec`) and what a decode
depends on (:class:`DecodeSpec`).

Everything that must tell two settings apart reads these two and nothing else: the parts of an
``Encoded`` (``clip_key`` / ``vfm_key``), the feature cache's folders, the text cache's model
identity, the resume fingerprint of an evaluation, ``metrics.json`` / ``sweep.json``, the W&B
config and the summary's rows. A field added to a spec reaches all of them.

Each spec has a stable ``key()`` (a digest of its ``record()``), a plain nested ``record()``
(JSON-ready) and ``flat()``: the same facts under the names a command line uses
(``clip.name``, ``vfm.layer``, ``protocol.crop``, ``beta``, ``postprocess.steps``, ...).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from omegaconf import OmegaConf

ENCODED_FORMAT = 2  # 2: CLIP tokens entering the last block (1: its values)
GEOMETRY = ("short_side", "max_long_side", "crop", "stride")


def digest(obj: Any, n: int = 12) -> str:
    """Stable short digest of a JSON-able object (keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@functools.lru_cache(maxsize=64)
def _checkpoint_digest(path: str, size: int, mtime: float) -> str:
    from .files import file_digest

    return "sha256:" + file_digest(path, "sha256")[:16]


def checkpoint_digest(path: Optional[str]) -> Optional[str]:
    """The content digest of a local checkpoint file (memoized per path, size and mtime), or None."""
    if not path:
        return None
    p = os.path.expanduser(str(path))
    if not os.path.isfile(p):
        return f"missing:{p}"  # the build reports it; the spec stays printable
    st = os.stat(p)
    return _checkpoint_digest(p, st.st_size, st.st_mtime)


def plain(v: Any) -> Any:
    """An OmegaConf node as plain Python (resolved); anything else as it is."""
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def flatten(record: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> ``{"a.b": v}`` (lists stay values)."""
    out: Dict[str, Any] = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# ---------------------------------------------------------------------------------------------- encode
@dataclass(frozen=True)
class ClipSpec:
    name: str  # open_clip architecture
    pretrained: str  # open_clip tag
    quick_gelu: bool
    pos_resize: str  # position-embedding resize rule (proxyclip/backbones/pos_embed.py)
    checkpoint: Optional[str] = None  # content digest of the local checkpoint (weights=local)


@dataclass(frozen=True)
class VfmSpec:
    name: str  # the conf/vfm key
    timm_name: str
    input_size: Optional[int]
    timm_kwargs: str  # canonical JSON of the extra timm.create_model arguments
    checkpoint: Optional[str]  # content digest of the local checkpoint (weights=local)
    # how the features are read from the model (the same model serves every value of these)
    pos_resize: str = field(metadata={"readout": True})  # position-embedding rule, applied per forward
    layer: int = field(default=-1, metadata={"readout": True})
    feature: str = field(default="tokens", metadata={"readout": True})
    norm: bool = field(default=True, metadata={"readout": True})

    def model_record(self) -> Dict[str, Any]:
        """The fields that decide the model's weights (a model can be shared when these match)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("readout")}


@dataclass(frozen=True)
class WeightsSpec:
    source: str  # pretrained | local | random (after any fallback to random)
    seed: Optional[int] = None  # random weights only


@dataclass(frozen=True)
class GeometrySpec:
    """The resize and the windows (the dataset's protocol); ``crop`` None = whole-image mode (one
    window, the resized image; ``stride`` None then)."""

    short_side: int
    max_long_side: int
    crop: Optional[int]
    stride: Optional[int]


@dataclass(frozen=True)
class MasksSpec:
    """The mask proposals, a per-image part of the encode (proxyclip/masks): read from files
    (``file``) or made by an automatic mask generator (``sam2``, ``sam``) with these settings."""

    name: str  # file | sam2 | sam
    dir: Optional[str] = None  # file: the folder of <image stem>.npz / .png
    key: Optional[str] = None  # file: the .npz array's name
    model: Optional[str] = None  # sam2: its config (sam2_hiera_l, ...); sam: vit_h | vit_l | vit_b
    pretrained: Optional[str] = None  # weights=pretrained: where they come from (hub repo id, URL)
    checkpoint: Optional[str] = None  # content digest of the local checkpoint (weights=local)
    input_size: Optional[int] = None  # the model's input side (None: its own, 1024); small for tests
    points_per_side: Optional[int] = None
    points_per_batch: Optional[int] = None
    pred_iou_thresh: Optional[float] = None
    stability_score_thresh: Optional[float] = None
    stability_score_offset: Optional[float] = None
    box_nms_thresh: Optional[float] = None
    min_mask_region_area: Optional[int] = None
    multimask_output: Optional[bool] = None  # sam2 only
    apply_postprocessing: Optional[bool] = None  # sam2 only (build_sam2's)


@dataclass(frozen=True)
class SamAttnSpec:
    """The SAM part, per image (proxyclip/sam_attention.py): the last block's q, k, v and its
    decomposed relative-position tables of a timm SAM ViT on the original image (Trident)."""

    name: str  # the conf/vfm preset (sam_vitb, test_tiny_sam)
    timm_name: str
    input_size: int  # the model's fixed input side (1024)
    timm_kwargs: str  # canonical JSON
    checkpoint: Optional[str] = None  # content digest of the local checkpoint (weights=local)
    halves: bool = False  # the left and right halves of the image through SAM separately (Cityscapes)
    # the image embedding (the neck's output) kept too: the configured post-process reads it (sam_refine)
    embedding: bool = False
    # the prompt encoder / mask decoder the post-process runs at decode (weights=local: the checkpoint's
    # content digest; pretrained: its URL): in the run's identity, not in the SAM part's cache key
    decoder: Optional[str] = field(default=None, metadata={"decode": True})

    def record(self) -> Dict[str, Any]:
        """Its fields; ``embedding`` and ``decoder`` only when set (the keys of parts without stay as they were)."""
        r = asdict(self)
        for name, off in (("embedding", False), ("decoder", None)):
            if r[name] == off:
                del r[name]
        return r

    def part_record(self) -> Dict[str, Any]:
        """The fields the stored SAM part depends on (not the decode-time ``decoder``)."""
        return {k: v for k, v in self.record().items() if k != "decoder"}


@dataclass(frozen=True)
class EncodeSpec:
    """Everything an ``Encoded`` depends on. CLIP's part depends on clip, weights, geometry,
    precision; the VFM's part on vfm, weights, geometry, precision; ``parts`` names the layer
    parts kept (proxyclip/parts.py: the configured method's), each keyed ``<clip_key>/<name>``."""

    clip: ClipSpec
    vfm: Optional[VfmSpec]  # None: the method runs no VFM
    weights: WeightsSpec
    geometry: GeometrySpec
    precision: str
    parts: Tuple[str, ...] = ()
    masks: Optional[MasksSpec] = None  # None: no mask proposals (masks=none; absent from the record)
    sam: Optional[SamAttnSpec] = None  # None: no SAM part (a method without needs_sam; absent from the record)

    def record(self) -> Dict[str, Any]:
        r = {"clip": asdict(self.clip), "vfm": None if self.vfm is None else asdict(self.vfm),
             "weights": asdict(self.weights), "protocol": asdict(self.geometry), "precision": self.precision,
             "parts": list(self.parts)}
        if self.masks is not None:
            r["masks"] = asdict(self.masks)
        if self.sam is not None:
            r["sam"] = self.sam.record()
        return r

    def flat(self) -> Dict[str, Any]:
        r = self.record()
        if r["vfm"] is None:
            r["vfm"] = "none"
        return flatten(r)

    def key(self) -> str:
        return digest(self.record())

    def clip_part(self) -> Dict[str, Any]:
        return {"clip": asdict(self.clip), "weights": asdict(self.weights), "protocol": asdict(self.geometry),
                "precision": self.precision, "format": ENCODED_FORMAT}

    def vfm_part(self) -> Optional[Dict[str, Any]]:
        if self.vfm is None:
            return None
        return {"vfm": asdict(self.vfm), "weights": asdict(self.weights), "protocol": asdict(self.geometry),
                "precision": self.precision, "format": ENCODED_FORMAT}

    def masks_part(self) -> Optional[Dict[str, Any]]:
        """The mask proposals' identity: the generator and its settings (and, for a model, its
        weights and precision); not the geometry (proposals are made on the original image)."""
        if self.masks is None:
            return None
        if self.masks.name == "file":
            return {"masks": asdict(self.masks)}
        return {"masks": asdict(self.masks), "weights": asdict(self.weights), "precision": self.precision}

    def sam_part(self) -> Optional[Dict[str, Any]]:
        """The SAM part's identity: its model, weights and precision (made on the original image:
        not the geometry)."""
        if self.sam is None:
            return None
        return {"sam": self.sam.part_record(), "weights": asdict(self.weights), "precision": self.precision}

    @property
    def sam_key(self) -> Optional[str]:
        part = self.sam_part()
        return None if part is None else f"{self.sam.name}-{digest(part)}"

    @property
    def masks_key(self) -> Optional[str]:
        part = self.masks_part()
        return None if part is None else f"{self.masks.name}-{digest(part)}"

    @property
    def clip_key(self) -> str:
        return f"{self.clip.name}-{digest(self.clip_part())}"

    @property
    def vfm_key(self) -> Optional[str]:
        part = self.vfm_part()
        return None if part is None else f"{self.vfm.name}-{digest(part)}"

    def text_model_id(self) -> str:
        """The identity of the text tower (the text cache's key): CLIP, its weights, precision (not
        ``pos_resize``, which only the image tower uses)."""
        clip = {k: v for k, v in asdict(self.clip).items() if k != "pos_resize"}
        return digest({"clip": clip, "weights": asdict(self.weights), "precision": self.precision})

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> "EncodeSpec":
        """The spec a :meth:`record` describes (e.g. read back from a metrics.json)."""
        return cls(ClipSpec(**r["clip"]), None if r["vfm"] is None else VfmSpec(**r["vfm"]), WeightsSpec(**r["weights"]),
                   GeometrySpec(**r["protocol"]), r["precision"], tuple(r.get("parts", ())),
                   None if r.get("masks") is None else MasksSpec(**r["masks"]),
                   None if r.get("sam") is None else SamAttnSpec(**r["sam"]))

    @classmethod
    def from_config(cls, cfg: Any, *, random_weights: bool, uses_vfm: bool,
                    parts: Optional[Tuple[str, ...]] = None) -> "EncodeSpec":
        """The spec of what ``cfg`` encodes (``random_weights``: the weights actually used are random,
        e.g. after a fallback; ``uses_vfm``: the method runs the VFM; ``parts``: the layer parts
        kept, default the configured method's, proxyclip.resolve.configured_parts)."""
        if parts is None:
            from .resolve import configured_parts

            parts = configured_parts(cfg)
        c, w, p = cfg.clip, cfg.weights, cfg.protocol
        source = "random" if random_weights else str(w.source)
        local = source == "local"
        clip = ClipSpec(str(c.name), str(c.pretrained), bool(c.quick_gelu), pos_resize=str(c.pos_resize),
                        checkpoint=checkpoint_digest(c.checkpoint) if local else None)
        vfm = None
        if uses_vfm:
            v = cfg.vfm
            kwargs = plain(v.timm_kwargs) if "timm_kwargs" in v else {}
            vfm = VfmSpec(name=str(v.name), timm_name=str(v.timm_name),
                          input_size=None if v.input_size is None else int(v.input_size),
                          timm_kwargs=json.dumps(kwargs or {}, sort_keys=True),
                          checkpoint=checkpoint_digest(v.checkpoint) if local else None,
                          layer=int(v.layer), feature=str(v.feature), norm=bool(v.norm),
                          pos_resize=str(v.pos_resize))
        weights = WeightsSpec(source, int(w.seed) if source == "random" else None)
        whole = p.crop is None  # whole-image mode: the stride does not matter
        geometry = GeometrySpec(*(None if whole and k in ("crop", "stride") else int(p[k]) for k in GEOMETRY))
        from .masks import masks_spec
        from .sam_attention import sam_attn_spec

        return cls(clip, vfm, weights, geometry, str(cfg.precision), tuple(parts),
                   masks_spec(cfg.get("masks") if hasattr(cfg, "get") else None, local),
                   sam_attn_spec(cfg, local, source))


# ---------------------------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodeSpec:
    """Everything a decode depends on besides the Encoded: the method and every knob (switches
    included), the post-process and every setting, the decision's logit scale and threshold, and
    the class list (by digest), SCLIP's area rule (``area_thd``, None = off)."""

    method: str
    knobs: Tuple[Tuple[str, Any], ...]  # (name, value): residual, ffn, then the method's knobs
    postprocess: Tuple[Tuple[str, Any], ...]  # ("name", preset's function), then its settings
    logit_scale: float
    prob_thd: float
    classes: str = ""  # digest of the class lines ("" = not bound to a class list)
    area_thd: Optional[float] = None  # the protocol's area rule (proxyclip/decision.py); None = off

    @property
    def knob_values(self) -> Dict[str, Any]:
        return dict(self.knobs)

    @property
    def postprocess_settings(self) -> Dict[str, Any]:
        return dict(self.postprocess)

    def params(self) -> Dict[str, Any]:
        """The decode's settings as one dict: method, knobs, logit_scale, prob_thd, postprocess."""
        return {"method": self.method, **self.knob_values, "logit_scale": self.logit_scale,
                "prob_thd": self.prob_thd, "postprocess": self.postprocess_settings}

    def record(self) -> Dict[str, Any]:
        out = {"method": self.method, "knobs": self.knob_values, "postprocess": self.postprocess_settings,
               "logit_scale": self.logit_scale, "prob_thd": self.prob_thd, "classes": self.classes}
        if self.area_thd is not None:  # off: left out, so the keys of runs without the rule stay as they were
            out["area_thd"] = self.area_thd
        return out

    def flat(self) -> Dict[str, Any]:
        """``method``, each knob by its name, ``postprocess`` (its function's name) and
        ``postprocess.<setting>``, ``logit_scale``, ``prob_thd``, ``classes``, ``area_thd``."""
        post = self.postprocess_settings
        out: Dict[str, Any] = {"method": self.method, **self.knob_values, "postprocess": post.get("name")}
        out.update({f"postprocess.{k}": v for k, v in post.items() if k != "name"})
        out.update(logit_scale=self.logit_scale, prob_thd=self.prob_thd, classes=self.classes, area_thd=self.area_thd)
        return out

    def key(self) -> str:
        return digest(self.record())

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> "DecodeSpec":
        """The spec a :meth:`record` describes (e.g. read back from a metrics.json)."""
        return cls(r["method"], tuple(r["knobs"].items()), tuple(r["postprocess"].items()), r["logit_scale"],
                   r["prob_thd"], r.get("classes", ""), r.get("area_thd"))


def classes_digest(lines: Sequence[str]) -> str:
    """The identity of a class list: its lines, in order, as given (synonyms included)."""
    return digest([str(x) for x in lines], 16)


def differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{field: (a's value, b's value)}`` for the flat fields where ``a`` and ``b`` differ."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
