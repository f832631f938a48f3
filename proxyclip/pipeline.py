"""The Segmenter: wires the stages together. encode (expensive) / decode (cheap) / predict.

    encode: image -> resize -> windows -> [CLIP tokens entering the last block, VFM features]  (Encoded)
    decode: last block with the method's attention (proxyclip/methods.py, last_block.py) -> dense
            -> scores -> merge windows -> post-process -> probabilities -> labels           (Prediction)

One encode serves every method: ``decode(enc, classes, method="sclip")``. Every stage's tensor
passes through a named hook point (see ``proxyclip.hooks``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from . import build, resolve
from .backbones import CLIP_MEAN, CLIP_STD, ClipBackbone, VfmBackbone
from .backbones.blocks import check_asked
from .decision import DEFAULT_BUDGET, WindowScores, decide, decide_chunked
from .decode_runs import shared_runs
from .encoded import Encoded, Prediction, check_replayable, replay
from .hooks import HookFn, HookSet, NameFilter, declare_hook, finish_cache, hook_names
from .image_level import image_level_result
from .images import ImageLike, load_image
from .masks import mask_stage, proposals_of
from .sam_attention import sam_part_of, sam_stage
from .last_block import Scores
from .methods import check_vfm_feature, get_method
from .parts import block_of, check_parts, method_parts
from .postprocess import apply_label_postprocess, apply_postprocess, get_postprocess
from .resolve import PostprocessArg
from .specs import DecodeSpec, EncodeSpec
from .text import ClassList, TextEncoder, parse_classes, text_cache_options
from .stages import method_output, run_backbones, window_pixels
from .windows import (check_geometry, padding_multiple, resize_image, size_with_pad,
                      window_layout)

log = logging.getLogger(__name__)

__all__ = ["Segmenter", "Encoded", "Prediction", "decide"]

TEXT = declare_hook("text.embeddings", "image", "(Q, E)", "one row per query name", "text")
WINDOW_SCORES = declare_hook("scores.window", "window", "(n, Q, h, w)", "cosine scores of each window at its own size",
                             "scores")
IMAGE_SCORES = declare_hook("scores.image", "image", "(Q, H, W)", "windows merged, at the original image size",
                            "scores")
REFINED = declare_hook("scores.refined", "image", "(Q, H, W)",
                       "after the post-process (PAMR; = `scores.image` with `postprocess=none`)", "scores")


class Segmenter:
    """Training-free segmentation for one (CLIP, VFM, weights, method) configuration.

    The configured method (``cfg.method``) is the default of every decode; any registered method
    decodes from the same Encoded (``decode(enc, classes, method="sclip")``), except that a method
    needing a VFM needs a Segmenter built with one. ``encode_spec`` is the identity of what
    ``encode`` makes; ``decode_spec(...)`` that of a decode (proxyclip/specs.py).
    """

    def __init__(self, cfg: DictConfig, clip: ClipBackbone, vfm: Optional[VfmBackbone], random_weights: bool):
        self.cfg, self.clip, self.vfm, self.random_weights = cfg, clip, vfm, random_weights
        self.device = torch.device(cfg.device)
        self.encode_spec = EncodeSpec.from_config(cfg, random_weights=random_weights, uses_vfm=vfm is not None)
        text_cache = text_cache_options(cfg, random_weights, self.encode_spec.text_model_id())
        self.text = TextEncoder(clip.model, clip.tokenizer, self.device, **text_cache)
        self.hooks = HookSet()
        self.masks = mask_stage(cfg, self.encode_spec, self.device)  # None with masks=none (proxyclip/masks)
        # None unless the configured method reads the SAM part (Trident; proxyclip/sam_attention.py)
        self.sam = sam_stage(cfg, self.encode_spec, self.device, next(clip.model.parameters()).dtype)
        check_geometry(cfg.protocol)
        _check_inputs(cfg, vfm, self.masks)  # the configured method's VFM (and its readout) and mask proposals
        vfm_patch = [] if vfm is None or vfm.resizes_input else [vfm.patch_size]
        self.pad_multiple = padding_multiple(clip.patch_size, *vfm_patch)
        self._clip_norm = _norm_tensors(CLIP_MEAN, CLIP_STD, self.device)
        self._vfm_norm = None if vfm is None else _norm_tensors(vfm.mean, vfm.std, self.device)
        self.decode_spec()  # the configured method's and post-process's values are valid

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Segmenter":
        """Build the backbones as ``cfg`` says (see conf/); no VFM when the method needs none."""
        return build.build_segmenter(cls, cfg)

    def with_vfm(self, vfm: str, **settings: Any) -> "Segmenter":
        """A Segmenter with another VFM (a conf/vfm name, plus field overrides such as ``layer=6``,
        ``feature="k"``) that shares this one's CLIP model and text cache (and its VFM model, when
        only the layer, feature or norm differ). Its ``encode(image, reuse=enc)`` takes the CLIP part
        from ``enc``: comparing VFMs, layers or features on one image runs CLIP once."""
        return build.with_vfm(self, vfm, **settings)

    def for_method(self, method: str) -> "Segmenter":
        """This Segmenter, or one sharing its models whose VFM gives the readout ``method`` reads
        (e.g. CASS's keys; :func:`proxyclip.build.for_method`)."""
        return build.for_method(self, method)

    clip_model = property(lambda self: self.clip.model, doc="The underlying open_clip model.")
    vfm_model = property(lambda self: None if self.vfm is None else self.vfm.model,
                         doc="The underlying timm model (None when the method needs no VFM).")
    method = property(lambda self: str(self.cfg.method.name), doc="The configured method (every decode's default).")
    clip_key = property(lambda self: self.encode_spec.clip_key, doc="Identity of the CLIP part an encode makes.")
    vfm_key = property(lambda self: self.encode_spec.vfm_key, doc="Identity of the VFM part (None without a VFM).")
    key = property(lambda self: f"{self.clip_key}+{self.vfm_key or 'novfm'}", doc="Identity of both parts.")

    hook_names = property(lambda self: list(hook_names()), doc="Every declared hook point.")
    decode_budget = DEFAULT_BUDGET  # bytes of full-resolution work a decision holds at once (proxyclip.decision)

    def layout(self, img: torch.Tensor) -> Tuple[Tuple[int, int], list, Tuple[int, int, int, int]]:
        """(resized size, windows, padding) of a (3, H, W) image under this configuration."""
        return window_layout(img.shape[1], img.shape[2], self.encode_spec.geometry, self.pad_multiple)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, image: ImageLike, reuse: Optional[Encoded] = None, keep: Sequence[str] = (),
               image_id: Optional[str] = None) -> Encoded:
        """Resize, cut windows, run the backbones (CLIP up to its last block; the VFM if any) -> Encoded.

        ``keep``: layer parts to keep besides those the configured method reads (``encode_spec.parts``),
        e.g. ``["clip.blocks.5.resid_pre"]`` (proxyclip/parts.py). ``reuse``: an Encoded of the same
        image (e.g. from a Segmenter with another VFM, see :meth:`with_vfm`) whose parts made under
        this configuration's keys and window layout are taken as they are: comparing VFMs on one
        image runs CLIP once, and a layer part already there is not recomputed. ``image_id``: the
        image's name for ``masks=file`` (default: the stem of ``image`` when it is a path).
        """
        img = load_image(image)
        if not self.hooks.idle:  # a hook named for a block the encode does not run says so
            check_asked(self.hooks.asked_for(), self.clip.num_blocks - 1)
        size, boxes, pad = self.layout(img)
        want = check_parts(tuple(self.encode_spec.parts) + tuple(keep), self.clip.num_blocks)
        same, layers, clip_tokens, vfm_features = _reused(self, reuse, img, size, boxes, pad, want)
        run_vfm = self.vfm is not None and vfm_features is None
        if run_vfm or clip_tokens is None:
            tokens, feats, made = run_backbones(self, resize_image(img.to(self.device), size), boxes, pad,
                                                 clip=clip_tokens is None, vfm=run_vfm,
                                                 keep=[block_of(p) for p in want])
            if clip_tokens is None:
                layers = made
        grid = self.clip.grid_of(*size_with_pad(boxes[0], pad))
        masks = proposals_of(self, img, image, image_id, reuse if same else None)
        sam = sam_part_of(self, img, reuse if same else None)
        return Encoded(image=img, resized_size=size, windows=boxes, pad=pad, masks=masks,
                       masks_key=None if masks is None else self.encode_spec.masks_key,
                       sam=sam, sam_key=None if sam is None else self.encode_spec.sam_key,
                       clip_tokens=tokens if clip_tokens is None else clip_tokens, clip_grid=grid,
                       vfm_features=feats if run_vfm else vfm_features, clip_key=self.clip_key, vfm_key=self.vfm_key,
                       layers=layers)

    # ------------------------------------------------------------------ decode
    def decode_spec(self, method: Optional[str] = None, postprocess: PostprocessArg = None,
                    classes: Optional[Sequence[str]] = None, **params: Any) -> DecodeSpec:
        """The checked :class:`DecodeSpec` of a decode (see proxyclip/resolve.py): ``method`` and its
        knobs by name (``None`` = the configured value), ``postprocess`` (a preset name or a mapping)."""
        return resolve.decode_spec(self.cfg, classes, method, postprocess, **params)

    def parts_of(self, spec: DecodeSpec) -> Tuple[str, ...]:
        """The layer parts (proxyclip/parts.py) a decode with ``spec`` reads from the Encoded."""
        layers = self.clip.num_blocks
        return check_parts(method_parts(get_method(spec.method), spec.knob_values, layers), layers)

    def text_embeddings(self, queries: Sequence[str]) -> torch.Tensor:
        """(Q, E) prompt-ensembled text embeddings, cached per name."""
        return self.text.embed(list(queries))

    @torch.no_grad()
    def dense_embeddings(self, enc: Encoded, start: int, stop: int, spec: DecodeSpec,
                         text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E, h, w) L2-normalized dense embeddings of windows ``start:stop`` with ``spec``'s method.

        The grid (h, w) is CLIP's, or the VFM's for ProxyCLIP. q, k, v and ProxyCLIP's raw affinity
        depend only on the Encoded, so they are computed once per Encoded (``enc.memo``).
        """
        out = method_output(self, enc, start, stop, spec, text)
        if isinstance(out, Scores):
            raise ValueError(f"method {spec.method} makes window scores, not dense embeddings")
        return out

    @torch.no_grad()
    def decode(self, enc: Encoded, classes: Sequence[str], method: Optional[str] = None,
               postprocess: PostprocessArg = None, spec: Optional[DecodeSpec] = None, keep_prob: bool = True,
               **params: Any) -> Prediction:
        """Last block, scores, merge, post-process, decision (``keep_prob``: see :meth:`decode_many`).

        ``method`` (default: the configured one) and its knobs by name (``beta=``, ``gamma=``,
        ``gaussian_std=``, ``residual=``, ``ffn=``, ``logit_scale=``, ``prob_thd=``; ``None`` = default);
        ``postprocess`` as in :func:`proxyclip.resolve.postprocess_settings`; or a ready ``spec``
        (from :meth:`decode_spec`) in place of all of them. The full (Q, H, W) maps are made only
        when needed (see :mod:`proxyclip.decision` and :class:`Prediction`).
        """
        if spec is None:
            spec = self.decode_spec(method, postprocess, classes, **params)
        elif method is not None or postprocess is not None or any(v is not None for v in params.values()):
            raise ValueError("decode takes either spec= or method/postprocess/knobs, not both")
        return self.decode_many(enc, classes, [spec], keep_prob)[0]

    @torch.no_grad()
    def decode_many(self, enc: Encoded, classes: Sequence[str], specs: Sequence[DecodeSpec],
                    keep_prob: bool = True) -> List[Prediction]:
        """One Prediction per spec; specs that differ only in ``logit_scale`` / ``prob_thd`` / ``area_thd``
        share one run of the last block and one set of window scores (a sweep's points). ``keep_prob=False``
        skips the winner's probability where no threshold needs it (evaluation reads labels only)."""
        cl = parse_classes(classes)
        out: List[Optional[Prediction]] = [None] * len(specs)
        groups = shared_runs(self, enc, classes, specs)  # checked: the class list, what each method reads
        text = self.hooks.point(TEXT, self.text_embeddings(cl.queries))  # once for every point
        for idx in groups:
            preds = _decide_points(self, enc, cl, [specs[i] for i in idx], text, keep_prob)
            for i, pred in zip(idx, preds):
                out[i] = pred
        return out  # type: ignore[return-value]

    def predict(self, image: ImageLike, classes: Sequence[str], method: Optional[str] = None,
                postprocess: PostprocessArg = None, **params: Any) -> Prediction:
        return self.decode(self.encode(image), classes, method, postprocess, **params)  # decode(encode(image))

    # ------------------------------------------------------------------ hooks
    def _encoded(self, image: ImageLike | Encoded) -> Encoded:
        """Encode an image; or replay a stored Encoded through the encode-time hook points."""
        if not isinstance(image, Encoded):
            return self.encode(image)
        check_replayable(self.hooks.asked_for())
        return replay(image, self.hooks, int(self.cfg.batch_size))

    def run_with_cache(self, image: ImageLike | Encoded, classes: Sequence[str], names: NameFilter = None,
                       method: Optional[str] = None, postprocess: PostprocessArg = None,
                       **params: Any) -> Tuple[Prediction, Dict[str, torch.Tensor]]:
        """Predict and record hook tensors: all (``names=None``), the given names, or those a filter
        ``names(name) -> bool`` accepts. Pass an Encoded to skip encode: its stored tensors replay
        the encode-time points they hold, but the per-block points (``clip.blocks.{i}.*``,
        ``vfm.blocks.{i}.*``) fire only while the blocks run, so asking for them by name with an
        Encoded is an error (pass the image; ``names=None`` or a filter just records what fires)."""
        raw: Dict[str, List[torch.Tensor]] = {}
        with self.hooks.active(cache=raw, cache_names=names):
            pred = self.decode(self._encoded(image), classes, method, postprocess, **params)
        return pred, finish_cache(raw)

    def run_with_hooks(self, image: ImageLike | Encoded, classes: Sequence[str], hooks: Dict[str, HookFn],
                       method: Optional[str] = None, postprocess: PostprocessArg = None, **params: Any) -> Prediction:
        """Predict with ``hooks`` ({name: fn(tensor, hook) -> replacement or None}) active.

        With an Encoded, hooks on the encode-time points apply to its stored tensors.
        """
        with self.hooks.active(hooks=hooks):
            return self.decode(self._encoded(image), classes, method, postprocess, **params)


def _norm_tensors(mean, std, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _exhaustive(seg: "Segmenter", spec: DecodeSpec) -> bool:
    """Full (Q, H, W) maps are needed: a post-process reads them, or a hook / cache listens."""
    return (get_postprocess(spec.postprocess_settings["name"]).refine is not None
            or any(seg.hooks.listening(n) for n in (WINDOW_SCORES, IMAGE_SCORES, REFINED)))


def _check_inputs(cfg: DictConfig, vfm: Optional[VfmBackbone], masks: Any) -> None:
    """The configured method has the VFM (with the readout) and the mask proposals it reads."""
    if get_method(cfg.method.name).needs_vfm and vfm is None:
        raise ValueError(build.no_vfm_message(cfg.method.name, cfg.vfm.name))
    if vfm is not None:
        check_vfm_feature(get_method(cfg.method.name), vfm.feature)
    if get_method(cfg.method.name).needs_masks and masks is None:
        raise ValueError(f"method {cfg.method.name} reads mask proposals: set masks=file|sam2|sam (it is none)")


def _reused(seg: "Segmenter", reuse: Optional[Encoded], img: torch.Tensor, size, boxes, pad, want):
    """What an encode takes from ``reuse`` (same image and window layout): (same, its layer parts in
    ``want``, its CLIP tokens when every wanted part is there, its VFM features) under ``seg``'s keys."""
    same = (reuse is not None and reuse.resized_size == size and reuse.windows == boxes and reuse.pad == pad
            and torch.equal(reuse.image, img))
    clip_same = same and reuse.clip_key == seg.clip_key
    layers = {k: v for k, v in reuse.layers.items() if k in want} if clip_same else {}
    clip_tokens = reuse.clip_tokens if clip_same and len(layers) == len(want) else None
    vfm_features = None
    if seg.vfm is not None and same and reuse.vfm_key == seg.vfm_key:
        vfm_features = reuse.vfm_features
    return same, layers, clip_tokens, vfm_features


def _decide_points(seg: "Segmenter", enc: Encoded, cl: ClassList, specs: List[DecodeSpec], text: torch.Tensor,
                   keep_prob: bool) -> List[Prediction]:
    """Window scores once (low resolution), then each spec's decision.

    Exhaustive path (post-process or listeners): the (Q, H, W) merged scores are materialized as
    before (memory ~ (windows + 3) x Q x H x W floats plus the post-process's own) and
    :func:`decide` runs on them. Otherwise :func:`decide_chunked`: O(H x W) plus a bounded chunk.
    """
    common = dict(image=enc.image, class_names=cl.class_names, queries=cl.queries, query_to_class=cl.query_to_class,
                  random_weights=seg.random_weights)
    if get_method(specs[0].method).level == "image":  # no window merge: the method merges (proxyclip/image_level.py)
        scores, relabel = image_level_result(seg, enc, specs[0], text, method_output, window_pixels,
                                             cl.query_to_class)
        return _decide_merged(seg, enc, cl, specs, scores, common, relabel)
    ws = WindowScores(_low_res_scores(seg, enc, specs[0], text), enc.windows, enc.pad, enc.resized_size, enc.image_size)
    if ws.low.shape[1] != text.shape[0]:
        raise ValueError(f"{ws.low.shape[1]} query maps for {text.shape[0]} queries")
    if not _exhaustive(seg, specs[0]):
        results = decide_chunked(ws, cl, [(s.logit_scale, s.prob_thd, s.area_thd) for s in specs], seg.decode_budget,
                                 keep_prob)
        return [Prediction(labels=labels, best_prob=prob, spec=s, source=ws, **common)
                for s, (labels, prob) in zip(specs, results)]
    if seg.hooks.listening(WINDOW_SCORES):  # window maps at window size, for the hook; merged from them
        bs = int(seg.cfg.batch_size)
        parts = [seg.hooks.point(WINDOW_SCORES, ws.window_full(ws.low[a:a + bs]), a).cpu()
                 for a in range(0, len(enc.windows), bs)]
        merged = ws.merge(torch.cat(parts))
    else:  # the chunked decision's maps, bit for bit
        merged = ws.full().cpu()
    return _decide_merged(seg, enc, cl, specs, merged, common)


def _decide_merged(seg: "Segmenter", enc: Encoded, cl: ClassList, specs: List[DecodeSpec], merged: torch.Tensor,
                   common: Dict[str, Any], relabel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> List[Prediction]:
    """(Q, H, W) merged scores -> hook, post-process, hook, each spec's decision (both method levels),
    then an image-level method's label-level step ``relabel`` on each decision's labels (ImageScores.relabel)."""
    scores = seg.hooks.point(IMAGE_SCORES, merged)
    mean, std = (t[0].cpu() for t in seg._clip_norm)
    refined = apply_postprocess(specs[0].postprocess_settings, scores, (enc.image.cpu().float() - mean) / std)
    scores = seg.hooks.point(REFINED, refined)
    preds = []
    for s in specs:
        probs, labels = decide(scores, cl, s.logit_scale, s.prob_thd, s.area_thd)
        if relabel is not None:
            labels = relabel(labels)
        labels = apply_label_postprocess(s.postprocess_settings, labels, probs, seg, enc)  # sam_refine
        preds.append(Prediction(scores=scores, probs=probs, labels=labels, spec=s, **common))
    return preds


def _low_res_scores(seg: "Segmenter", enc: Encoded, spec: DecodeSpec, text: torch.Tensor) -> torch.Tensor:
    """(n_windows, Q, h, w) cosine scores of every window at the dense grid's resolution (on seg.device)."""
    out = []
    bs = int(seg.cfg.batch_size)
    for start in range(0, len(enc.windows), bs):
        res = method_output(seg, enc, start, min(start + bs, len(enc.windows)), spec, text)
        if isinstance(res, Scores):
            out.append(res.scores)
        else:
            out.append(torch.einsum("behw,qe->bqhw", res, text.to(res.dtype)))
    return torch.cat(out)
