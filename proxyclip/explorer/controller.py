"""The explorer's state and computation, without widgets: :class:`ExplorerController`.

Its controls are data: the current method's knobs (``methods.get_method(m).all_knobs``: the
switches, the method's own knobs, the decision's) and the post-process's settings
(``postprocess.get_postprocess(p).knobs``). Any change to them, to the method, the post-process
or the classes is one decode on the cached ``Encoded``; a new image or backbone is an encode
(unless that pair was encoded before).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..config import compose_config
from ..encoded import Encoded, Prediction
from ..knobs import Knob, listing
from ..methods import get_method
from ..pipeline import Segmenter
from ..postprocess import get_postprocess
from ..resolve import postprocess_presets
from ..specs import DecodeSpec
from ..text import parse_classes
from . import figures, inside
from .pipelines import PipelineCache
from .sources import ASSETS, DEFAULT_CLASSES, read_image


def knob_values(spec: DecodeSpec) -> Dict[str, Any]:
    """The value of every knob of ``spec``'s method (``all_knobs`` order) in a DecodeSpec."""
    params = spec.params()
    return {k.name: params[k.name] for k in get_method(spec.method).all_knobs}


def preset_of(seg: Segmenter, settings: Mapping[str, Any]) -> Optional[str]:
    """The first preset of conf/postprocess (one named as the function first) with these settings."""
    presets = sorted(postprocess_presets(), key=lambda p: p != settings["name"])
    return next((p for p in presets if seg.decode_spec(postprocess=p).postprocess_settings == dict(settings)), None)


class ExplorerController:
    """State and computation of the explorer; no widgets. Tests drive it directly or through the view.

    Counters ``n_encodes``, ``n_decodes``, ``n_builds`` say what was computed.
    ``segmenter_factory(clip, vfm) -> Segmenter`` builds a pipeline (default: compose
    ``conf/`` with ``clip=..., vfm=..., weights=...`` plus ``overrides``).
    ``progress(message, fraction)`` is told about slow steps (model build, encode).
    """

    def __init__(self, clip: str = "vit_b16", vfm: str = "dino_vitb8", weights: str = "random",
                 overrides: Sequence[str] = (), image: Any = None, classes: Sequence[str] = DEFAULT_CLASSES,
                 segmenter_factory: Optional[Callable[[str, str], Segmenter]] = None,
                 progress: Optional[Callable[[str, float], None]] = None, max_segmenters: int = 2,
                 max_encoded: int = 8, compute: bool = True, segmenter: Optional[Segmenter] = None):
        self.weights = weights
        self.overrides = list(overrides)
        self.pipelines = PipelineCache(segmenter_factory or self._default_factory, max_segmenters, max_encoded)
        self.progress = progress or (lambda message, fraction: None)
        self.clip_name, self.vfm_name = clip, vfm
        if segmenter is not None:
            self.pipelines.add(clip, vfm, segmenter)
        self.classes: List[str] = list(classes)
        self.image: torch.Tensor = read_image(image if image is not None else ASSETS / "sample.jpg")
        self.image_name = str(image) if isinstance(image, (str, Path)) else ("sample.jpg" if image is None else "image")
        self.method: Optional[str] = None  # None until a segmenter is there: then its configured method
        self.knobs: Dict[str, Any] = {}  # the value of every knob of the method (Method.all_knobs)
        self.postprocess: Dict[str, Any] = {}  # {"name": function, **settings}
        self.postprocess_preset: Optional[str] = None  # the conf/postprocess preset the settings started from
        self.point: Tuple[float, float] = (self.image.shape[1] / 2, self.image.shape[2] / 2)  # (y, x) original pixels
        self.encoded: Optional[Encoded] = None
        self.clip_attention: Optional[torch.Tensor] = None  # (n_win, 1, T, T): CLIP's own, heads averaged
        self.prediction: Optional[Prediction] = None
        self.cache: Dict[str, torch.Tensor] = {}
        self.n_decodes = 0
        self.last_decode_seconds = float("nan")
        self.record_stages = False  # also keep the affinity stages (figures.STAGE_NAMES) when the method has them
        self.block: Optional[int] = None  # the CLIP block whose own attention is shown (None: the last)
        self.show_masks = False  # draw the encode's mask proposals (Encoded.masks) over the image
        self._stale_encode = self._stale_decode = True
        if compute:
            self.refresh()

    # ------------------------------------------------------------------ pipelines
    def _default_factory(self, clip: str, vfm: str) -> Segmenter:
        shared = self.pipelines.find(clip)  # same CLIP: build only the VFM, share the rest
        if shared is not None:
            return shared.with_vfm(vfm)
        cfg = compose_config(overrides=[f"clip={clip}", f"vfm={vfm}", f"weights={self.weights}", *self.overrides])
        return Segmenter.from_config(cfg)

    @property
    def segmenter(self) -> Segmenter:
        seg = self.pipelines.segmenter(self.clip_name, self.vfm_name, self.progress, f" ({self.weights} weights)")
        if self.method is None:  # the configured method, its YAML's knob values, the configured post-process
            spec = seg.decode_spec()
            self.method, self.knobs, self.postprocess = spec.method, knob_values(spec), spec.postprocess_settings
            self.postprocess_preset = preset_of(seg, self.postprocess)
        return seg

    n_encodes = property(lambda self: self.pipelines.n_encodes)
    n_builds = property(lambda self: self.pipelines.n_builds)
    last_encode_seconds = property(lambda self: self.pipelines.last_encode_seconds)

    # ------------------------------------------------------------------ the declarations behind the controls
    def knob_declarations(self) -> Tuple[Knob, ...]:
        """The current method's knobs: switches, its own, the decision's (one control each)."""
        self.segmenter  # built on first use: its configured method and post-process become the state
        return get_method(self.method).all_knobs

    def postprocess_knobs(self) -> Tuple[Knob, ...]:
        """The current post-process's settings (one control each)."""
        self.segmenter  # built on first use: its configured method and post-process become the state
        return get_postprocess(self.postprocess["name"]).knobs

    def changes_attention(self, name: str) -> bool:
        """Whether knob ``name`` reaches the method's attention (its own knobs), not only what follows it."""
        return name in get_method(self.method).knob_names

    def spec(self) -> DecodeSpec:
        """The checked DecodeSpec of the next decode."""
        return self.segmenter.decode_spec(method=self.method, postprocess=dict(self.postprocess),
                                          classes=self.classes, **self.knobs)

    # ------------------------------------------------------------------ inputs
    def set_image(self, image: Any, name: Optional[str] = None) -> None:
        """A path, PIL image, (3, H, W) tensor or encoded image bytes. Re-encodes on refresh."""
        self.image = read_image(image)
        self.image_name = name or (str(image) if isinstance(image, (str, Path)) else "image")
        self.point = (self.image.shape[1] / 2, self.image.shape[2] / 2)
        self._stale_encode = True

    def set_backbones(self, clip: Optional[str] = None, vfm: Optional[str] = None) -> None:
        self.clip_name = clip if clip is not None else self.clip_name
        self.vfm_name = vfm if vfm is not None else self.vfm_name
        self._stale_encode = True

    def set_classes(self, classes: Union[Sequence[str], str]) -> None:
        """A list of class lines, or text with one class per line (or comma-separated)."""
        if isinstance(classes, str):
            sep = "\n" if "\n" in classes else ","
            classes = [c.strip() for c in classes.split(sep) if c.strip()]
        parse_classes(list(classes))  # a bad list raises here and leaves the state as it was
        self.classes = list(classes)
        self._stale_decode = True

    def set_knobs(self, **values: Any) -> None:
        """Knob values of the current method by name (checked by their declarations; a bad value
        raises and changes nothing). A changed value decodes on refresh."""
        decl = {k.name: k for k in self.knob_declarations()}
        unknown = sorted(set(values) - set(decl))
        if unknown:
            raise ValueError(f"method {self.method} has no knob(s) {unknown}; "
                             f"its knobs: {listing(tuple(decl.values()))}")
        checked = {name: decl[name].check(v, self.method) for name, v in values.items()}
        for name, v in checked.items():
            if self.knobs.get(name) != v:
                self.knobs[name] = v
                self._stale_decode = True

    def set_method(self, name: str) -> None:
        """Another method (``proxyclip.methods``), its knobs at its YAML's defaults: a decode on the same Encoded."""
        meth = get_method(name)
        seg = self.segmenter
        if meth.needs_vfm and seg.vfm is None:
            raise ValueError(f"method {name} needs a VFM; this pipeline has none")
        if name != self.method:
            self.method, self.knobs = name, knob_values(seg.decode_spec(method=name))
            self._stale_decode = True

    def set_postprocess(self, postprocess: Union[str, Mapping[str, Any]]) -> None:
        """A preset of conf/postprocess by name (its settings), or a mapping of settings to change
        (with ``name``: another post-process function, the rest from its YAML). A decode, no encode."""
        seg = self.segmenter
        if isinstance(postprocess, str):
            arg, preset = postprocess, postprocess
        else:
            same = postprocess.get("name", self.postprocess["name"]) == self.postprocess["name"]
            arg = {**self.postprocess, **postprocess} if same else dict(postprocess)
            preset = self.postprocess_preset if same else None
        settings = seg.decode_spec(postprocess=arg).postprocess_settings
        self.postprocess_preset = preset
        if settings != self.postprocess:
            self.postprocess = settings
            self._stale_decode = True

    def set_record_stages(self, on: bool) -> None:
        """Keep the affinity stages of the next decodes; turning it on decodes once more if they are
        missing. Off by default: for SAM (64x64 tokens) each is 67 MB a window."""
        self.record_stages = bool(on)
        if on and self.encoded is not None and figures.STAGE_NAMES[0] not in self.cache:
            self._stale_decode = True

    def set_point(self, y: float, x: float) -> None:
        """The chosen pixel (original image coordinates) whose attention is shown. No computation."""
        h, w = self.image.shape[1:]
        self.point = (min(max(float(y), 0.0), h - 1.0), min(max(float(x), 0.0), w - 1.0))

    def set_show_masks(self, on: bool) -> None:
        """Draw the encode's mask proposals (``Encoded.masks``: masks=file|sam2|sam) over the image of
        the segmentation figure. No computation (the proposals are part of the encode)."""
        self.show_masks = bool(on)

    @property
    def image_id(self) -> Optional[str]:
        """The image's name for ``masks=file`` (its file stem; ``set_image(..., name=)`` names a tensor)."""
        return Path(self.image_name).stem if self.image_name else None

    def set_block(self, i: Optional[int]) -> None:
        """The CLIP block (0-indexed; None = the last) whose attention the panel shows. A block before
        the last reads the encode's layer parts: once per image, CLIP's part is encoded keeping them."""
        self.block = inside.check_block(self.segmenter, i)

    # ------------------------------------------------------------------ computation
    def refresh(self) -> bool:
        """Run what the changes since the last refresh need: an encode (a new image or backbones), the
        layer parts the block slider or the method reads, a decode. Returns True if anything ran."""
        ran = self._stale_encode or self.encoded is None
        if ran:
            _encode(self)
        spec = self.spec() if self._stale_decode else None
        ran = _keep_parts(self, spec) or ran
        if self._stale_decode:
            _decode(self, spec)
            ran = True
        return ran

    # ------------------------------------------------------------------ what is shown
    def attention_view(self) -> figures.AttentionView:
        """The attention rows of the chosen pixel (from caches: no computation)."""
        return figures.attention_view(self)

    def segmentation_figure(self):
        return figures.segmentation_figure(self)

    def attention_figure(self, show_affinity: bool = False):
        return figures.attention_figure(self, show_affinity)


def _encode(c: ExplorerController) -> None:
    """``c``'s image under its backbones (from the pipelines' cache when there): a decode follows."""
    c.encoded, c.clip_attention = c.pipelines.encode(c.segmenter, c.image, c.progress, (c.clip_name, c.vfm_name),
                                                     c.image_id)
    c.progress("encoded", 1.0)
    c._stale_encode, c._stale_decode = False, True


def _keep_parts(c: ExplorerController, spec: Optional[DecodeSpec]) -> bool:
    """``c``'s image encoded again keeping every block's tokens when the block slider's block, or the
    method of the next decode (``spec``; one reading earlier blocks, e.g. ResCLIP), reads a layer part
    the Encoded lacks: once per image. Returns whether it ran."""
    seg = c.segmenter
    if not (inside.lacks_parts(seg, c.encoded, c.block)
            or (spec is not None and inside.lacks_method_parts(seg, c.encoded, spec))):
        return False
    c.encoded = c.pipelines.keep_parts(seg, c.image, c.encoded, c.progress, c.image_id)
    return True


def _decode(c: ExplorerController, spec: DecodeSpec) -> None:
    """One decode of ``c``'s state, recording the hook points its panels draw (figures.recorded_hooks)."""
    names = figures.recorded_hooks(c.method, c.record_stages)
    t0 = time.perf_counter()
    seg, enc = _readout(c)
    c.prediction, c.cache = seg.run_with_cache(enc, c.classes, names=names, spec=spec)
    c.last_decode_seconds = time.perf_counter() - t0
    c.n_decodes += 1
    c._stale_decode = False


def _readout(c: "ExplorerController"):
    """(Segmenter, Encoded) of ``c``'s method: a method reading another VFM readout (CASS: keys)
    decodes from the same models with that readout, its VFM run once per encode (CLIP part reused)."""
    seg = c.segmenter.for_method(c.method)
    if seg is c.segmenter:
        return seg, c.encoded
    key = (id(c.encoded), seg.vfm_key)
    if getattr(c, "_readout_enc", (None,))[0] != key:
        c._readout_enc = (key, seg.encode(c.encoded.image, reuse=c.encoded, keep=tuple(c.encoded.layers),
                                          image_id=c.image_id))
    return seg, c._readout_enc[1]
