"""The Segmenter: wires the stages together. encode (expensive) / decode (cheap) / predict.

    encode: image -> resize -> windows -> [VFM features, CLIP values] per window      (Encoded)
    decode: affinity -> normalize -> mask -> attention -> aggregate -> dense -> scores
            -> merge windows -> probabilities -> labels                               (Prediction)

Every stage's tensor passes through a named hook point (see ``proxyclip.hooks``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import proxy
from .backbones import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ClipBackbone, VfmBackbone,
                        WeightsUnavailable, create_clip_model, create_vfm_model)
from .hooks import HOOK_NAMES, HookFn, HookSet, finish_cache
from .images import ImageLike, load_image
from .devices import resolve_runtime
from .text import ClassList, TextEncoder, parse_classes, text_cache_options
from .windows import (Box, merge_windows, padding_multiple, resize_image, resized_size, slide_windows,
                      symmetric_padding)

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Encoded:
    """The expensive half of one image: per-window VFM features and CLIP values.

    Depends only on the image, the backbones, their weights and the resolution settings
    (``key`` says which), never on beta, gamma, classes or thresholds.
    """

    image: torch.Tensor  # (3, H, W) original image in [0, 1]
    resized_size: Tuple[int, int]  # (h, w) after the short-side resize
    windows: List[Box]  # (y1, y2, x1, x2) in the resized image
    pad: Tuple[int, int, int, int]  # (top, bottom, left, right) padding of every window
    clip_values: torch.Tensor  # (n_windows, D, gh, gw) float32
    vfm_features: Optional[torch.Tensor]  # (n_windows, C, Hv, Wv) float32, None without a VFM
    key: str  # identity of (backbones, weights, resolution, crop, stride)
    memo: Dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)  # decode-side reuse, not saved

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of CPU tensors and metadata, for ``torch.save``."""
        return dict(image=self.image.cpu(), resized_size=list(self.resized_size), windows=[list(b) for b in self.windows],
                    pad=list(self.pad), clip_values=self.clip_values.cpu(),
                    vfm_features=None if self.vfm_features is None else self.vfm_features.cpu(), key=self.key)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Encoded":
        return cls(image=d["image"], resized_size=tuple(d["resized_size"]), windows=[tuple(b) for b in d["windows"]],
                   pad=tuple(d["pad"]), clip_values=d["clip_values"], vfm_features=d["vfm_features"], key=d["key"])


@dataclass
class Prediction:
    """Result for one image, at its original size.

    scores  (Q, H, W) cosine scores per query name, windows merged
    probs   (K, H, W) softmax(logit_scale * scores) over queries, max over each class's queries
    labels  (H, W) int64 argmax class; best probability < prob_thd -> 0 (background)
    """

    image: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    class_names: List[str]
    queries: List[str]
    query_to_class: List[int]
    params: Dict[str, float] = field(default_factory=dict)  # beta, gamma, logit_scale, prob_thd used
    random_weights: bool = False  # True when the backbones run with random weights


class Segmenter:
    """ProxyCLIP inference for one (CLIP, VFM, weights, method) configuration."""

    def __init__(self, cfg: DictConfig, clip: ClipBackbone, vfm: Optional[VfmBackbone], random_weights: bool):
        self.cfg = cfg
        self.clip = clip
        self.vfm = vfm
        self.random_weights = random_weights
        self.device = torch.device(cfg.device)
        self.text = TextEncoder(clip.model, clip.tokenizer, self.device, **text_cache_options(cfg, random_weights))
        self.hooks = HookSet()
        m = cfg.method
        _check_geometry(m)
        vfm_patch = [] if vfm is None or vfm.resizes_input else [vfm.patch_size]
        self.pad_multiple = padding_multiple(clip.patch_size, *vfm_patch)
        self._clip_norm = _norm_tensors(CLIP_MEAN, CLIP_STD, self.device)
        self._vfm_norm = _norm_tensors(IMAGENET_MEAN, IMAGENET_STD, self.device)
        self.key = self._make_key()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Segmenter":
        """Build both backbones as ``cfg`` says (see conf/)."""
        device, _ = resolve_runtime(cfg)  # device/precision "auto" -> this machine's values, written into cfg
        if int(cfg.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        _check_geometry(cfg.method)
        dtype = _DTYPES[cfg.precision]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("precision=%s on CPU is much slower than fp32", cfg.precision)
        w = cfg.weights
        source = w.source
        try:
            clip_model = create_clip_model(cfg.clip.name, cfg.clip.pretrained, cfg.clip.quick_gelu, source,
                                           seed=w.seed, checkpoint=cfg.clip.checkpoint)
            vfm_model = _create_vfm(cfg, source)
        except WeightsUnavailable as e:
            if not w.fallback_to_random:
                raise
            print(f"[proxyclip] pretrained weights unavailable, using RANDOM weights (seed {w.seed}): {e}")
            source = "random"
            clip_model = create_clip_model(cfg.clip.name, cfg.clip.pretrained, cfg.clip.quick_gelu, source, seed=w.seed)
            vfm_model = _create_vfm(cfg, source)
        clip = ClipBackbone(clip_model.to(device=device, dtype=dtype), open_clip.get_tokenizer(cfg.clip.name))
        vfm = None
        if vfm_model is not None:
            vfm = VfmBackbone(vfm_model.to(device=device, dtype=dtype), cfg.vfm.family, cfg.vfm.input_size)
        return cls(cfg, clip, vfm, random_weights=(source == "random"))

    @property
    def clip_model(self) -> torch.nn.Module:
        """The underlying open_clip model."""
        return self.clip.model

    @property
    def vfm_model(self) -> Optional[torch.nn.Module]:
        """The underlying timm model (None for the no-VFM baseline)."""
        return None if self.vfm is None else self.vfm.model

    @property
    def hook_names(self) -> List[str]:
        return list(HOOK_NAMES)

    def _make_key(self) -> str:
        c, v, w, m = self.cfg.clip, self.cfg.vfm, self.cfg.weights, self.cfg.method
        weights = {"random": f"random{w.seed}", "local": f"local:{c.checkpoint}:{v.checkpoint}"}.get(
            "random" if self.random_weights else w.source, "pretrained")
        parts = [f"clip={c.name}/{c.pretrained}/qg{int(c.quick_gelu)}", f"vfm={v.name}/{v.timm_name}/{v.input_size}",
                 f"kw={OmegaConf.to_container(v.timm_kwargs) if 'timm_kwargs' in v else {}}", f"w={weights}",
                 f"res={m.short_side}/{m.max_long_side}/{m.crop}/{m.stride}", f"prec={self.cfg.precision}"]
        text = "|".join(parts)
        return f"{v.name}-{c.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, image: ImageLike) -> Encoded:
        """Resize, cut windows, run both backbones. -> Encoded (all windows)."""
        img = load_image(image)
        m = self.cfg.method
        size = resized_size(img.shape[1], img.shape[2], m.short_side, m.max_long_side)
        resized = resize_image(img.to(self.device), size)
        boxes = slide_windows(size[0], size[1], m.crop, m.stride)
        y1, y2, x1, x2 = boxes[0]
        pad = symmetric_padding(y2 - y1, x2 - x1, self.pad_multiple)
        values, feats = [], []
        bs = int(self.cfg.batch_size)
        for start in range(0, len(boxes), bs):
            crops = torch.stack([resized[:, a:b, c:d] for (a, b, c, d) in boxes[start:start + bs]])
            clip_in = F.pad(_normalize(crops, *self._clip_norm), (pad[2], pad[3], pad[0], pad[1]))
            if self.vfm is not None:
                vfm_in = _normalize(crops, *self._vfm_norm)
                if not self.vfm.resizes_input:
                    vfm_in = F.pad(vfm_in, (pad[2], pad[3], pad[0], pad[1]))
                f = self.vfm.features(vfm_in).float()
                feats.append(self.hooks.point("vfm.features", f, start))
            tokens = self.clip.tokens_before_last_block(clip_in)
            tokens = self.hooks.point("clip.last_block_input", tokens, start)
            grid = self.clip.grid_of(clip_in.shape[-2], clip_in.shape[-1])
            v = self.clip.last_block_values(tokens, grid).float()
            values.append(self.hooks.point("clip.values", v, start))
        return Encoded(image=img, resized_size=size, windows=boxes, pad=pad, clip_values=torch.cat(values),
                       vfm_features=torch.cat(feats) if feats else None, key=self.key)

    # ------------------------------------------------------------------ decode
    def resolve_params(self, beta=None, gamma=None, logit_scale=None, prob_thd=None) -> Dict[str, float]:
        """Hyperparameters for one decode: the given values, else the config's."""
        m = self.cfg.method
        p = dict(beta=m.beta if beta is None else beta, gamma=m.gamma if gamma is None else gamma,
                 logit_scale=m.logit_scale if logit_scale is None else logit_scale,
                 prob_thd=m.prob_thd if prob_thd is None else prob_thd)
        proxy.check_hyperparameters(**p)
        return {k: float(v) for k, v in p.items()}

    def text_embeddings(self, queries: Sequence[str]) -> torch.Tensor:
        """(Q, E) prompt-ensembled text embeddings, cached per name."""
        return self.text.embed(list(queries))

    @torch.no_grad()
    def dense_embeddings(self, enc: Encoded, start: int, stop: int, beta: float, gamma: float) -> torch.Tensor:
        """(B, E, Hv, Wv) L2-normalized dense embeddings of windows ``start:stop``.

        Two exact shortcuts keep repeated decodes cheap: the last block's ``out_proj`` is affine
        and both the bilinear resize and every attention row are weighted means (weights
        summing to 1), so ``out_proj`` runs on CLIP's coarser grid before them; and the raw
        cosine affinity depends only on the VFM features, so it is computed once per Encoded.
        """
        values = enc.clip_values[start:stop].to(self.device)
        projected = self.clip.out_proj_map(values)  # (B, D, gh, gw)
        if enc.vfm_features is None:
            grid = tuple(values.shape[-2:])
            aggregated = projected.flatten(2).transpose(1, 2)
        else:
            hp = self.hooks.point
            memo_key = ("proxy.affinity", start, stop)
            if memo_key not in enc.memo:
                enc.memo[memo_key] = proxy.cosine_affinity(enc.vfm_features[start:stop].to(self.device))
            grid = tuple(enc.vfm_features.shape[-2:])
            s = hp("proxy.affinity", enc.memo[memo_key], start)
            s = hp("proxy.affinity_normalized", proxy.normalize_affinity(s, beta, gamma), start)
            mask = hp("proxy.mask", proxy.affinity_mask(s), start)
            attn = hp("proxy.attention", proxy.masked_softmax(s, mask), start)
            aggregated = proxy.aggregate(attn, proxy.resize_values(projected, grid))
        dense = F.normalize(self.clip.head(aggregated).float(), dim=-1)
        dense = dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], *grid)
        return self.hooks.point("clip.dense", dense, start)

    @torch.no_grad()
    def decode(self, enc: Encoded, classes: Sequence[str], beta: Optional[float] = None, gamma: Optional[float] = None,
               logit_scale: Optional[float] = None, prob_thd: Optional[float] = None) -> Prediction:
        """Proxy attention, scores, merge, decision. ``None`` hyperparameters come from ``cfg.method``."""
        if not isinstance(enc, Encoded):
            raise TypeError(f"decode takes the Encoded returned by encode(), got {type(enc).__name__}")
        if enc.key != self.key:
            raise ValueError(f"this Encoded was made by another configuration ({enc.key}), not {self.key}")
        p = self.resolve_params(beta, gamma, logit_scale, prob_thd)
        cl = parse_classes(classes)
        text = self.hooks.point("text.embeddings", self.text_embeddings(cl.queries))
        top, bottom, left, right = enc.pad
        wh = enc.windows[0][1] - enc.windows[0][0]
        ww = enc.windows[0][3] - enc.windows[0][2]
        padded = (wh + top + bottom, ww + left + right)
        window_scores = []
        bs = int(self.cfg.batch_size)
        for start in range(0, len(enc.windows), bs):
            stop = min(start + bs, len(enc.windows))
            dense = self.dense_embeddings(enc, start, stop, p["beta"], p["gamma"])
            s = torch.einsum("behw,qe->bqhw", dense, text.to(dense.dtype))
            s = F.interpolate(s, size=padded, mode="bilinear", align_corners=False)
            s = s[:, :, top:top + wh, left:left + ww]
            window_scores.append(self.hooks.point("scores.window", s, start).cpu())
        merged = merge_windows(torch.cat(window_scores), enc.windows, enc.resized_size)
        if tuple(merged.shape[-2:]) != enc.image_size:
            merged = F.interpolate(merged[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
        scores = self.hooks.point("scores.image", merged)
        probs, labels = decide(scores, cl, p["logit_scale"], p["prob_thd"])
        return Prediction(image=enc.image, scores=scores, probs=probs, labels=labels, class_names=cl.class_names,
                          queries=cl.queries, query_to_class=cl.query_to_class, params=p,
                          random_weights=self.random_weights)

    def predict(self, image: ImageLike, classes: Sequence[str], **params: Optional[float]) -> Prediction:
        """``decode(encode(image), classes, **params)``."""
        return self.decode(self.encode(image), classes, **params)

    # ------------------------------------------------------------------ hooks
    def _encoded(self, image: ImageLike | Encoded) -> Encoded:
        """Encode an image; or replay a stored Encoded's tensors through the encode-time hook points.

        Replaying lets hooks read and replace ``vfm.features`` and ``clip.values`` of a cached
        encode (``clip.last_block_input`` is not stored, so it fires only when encoding).
        """
        if not isinstance(image, Encoded):
            return self.encode(image)
        enc, bs = image, int(self.cfg.batch_size)
        feats, values, feats_changed, values_changed = [], [], False, False
        for start in range(0, len(enc.windows), bs):
            if enc.vfm_features is not None:
                f = enc.vfm_features[start:start + bs]
                feats.append(self.hooks.point("vfm.features", f, start))
                feats_changed |= feats[-1] is not f
            v = enc.clip_values[start:start + bs]
            values.append(self.hooks.point("clip.values", v, start))
            values_changed |= values[-1] is not v
        if not (feats_changed or values_changed):
            return enc
        return replace(enc, vfm_features=torch.cat(feats) if feats_changed else enc.vfm_features,
                       clip_values=torch.cat(values) if values_changed else enc.clip_values,
                       memo={} if feats_changed else enc.memo)

    def run_with_cache(self, image: ImageLike | Encoded, classes: Sequence[str], names: Optional[Iterable[str]] = None,
                       **params: Optional[float]) -> Tuple[Prediction, Dict[str, torch.Tensor]]:
        """Predict and record hook tensors (all names, or ``names``). Pass an Encoded to skip encode."""
        raw: Dict[str, List[torch.Tensor]] = {}
        with self.hooks.active(cache=raw, cache_names=names):
            pred = self.decode(self._encoded(image), classes, **params)
        return pred, finish_cache(raw)

    def run_with_hooks(self, image: ImageLike | Encoded, classes: Sequence[str], hooks: Dict[str, HookFn],
                       **params: Optional[float]) -> Prediction:
        """Predict with ``hooks`` ({name: fn(tensor, hook) -> replacement or None}) active.

        With an Encoded, hooks on ``vfm.features`` and ``clip.values`` apply to its stored tensors.
        """
        with self.hooks.active(hooks=hooks):
            return self.decode(self._encoded(image), classes, **params)


def decide(scores: torch.Tensor, classes: ClassList, logit_scale: float, prob_thd: float
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, H, W) scores -> (K, H, W) class probabilities and (H, W) int64 labels."""
    q_probs = torch.softmax(logit_scale * scores, dim=0)
    k = len(classes.class_names)
    if k == len(classes.queries):  # one name per class: queries are the classes, in order
        probs = q_probs
    else:
        groups: List[List[int]] = [[] for _ in range(k)]
        for q, owner in enumerate(classes.query_to_class):
            groups[owner].append(q)
        probs = torch.stack([q_probs[g[0]] if len(g) == 1 else q_probs[g].amax(dim=0) for g in groups])
    best, labels = probs.max(dim=0)
    if prob_thd > 0:
        labels[best < prob_thd] = 0
    return probs, labels.long()


def _create_vfm(cfg: DictConfig, source: str):
    v = cfg.vfm
    if v.family == "none":
        return None
    if not v.timm_name:
        raise ValueError(f"vfm={v.name}: vfm.timm_name is not set (family {v.family!r} needs a timm model)")
    kwargs = OmegaConf.to_container(v.timm_kwargs) if "timm_kwargs" in v else {}
    return create_vfm_model(v.timm_name, source, seed=cfg.weights.seed, checkpoint=v.checkpoint,
                            timm_kwargs=kwargs, is_sam=(v.family == "sam"))


def _check_geometry(m) -> None:
    for name in ("short_side", "max_long_side", "crop", "stride"):
        if int(m[name]) <= 0:
            raise ValueError(f"method.{name} must be a positive integer, got {m[name]}")
    if m.stride > m.crop:
        raise ValueError(f"method.stride ({m.stride}) must not exceed method.crop ({m.crop}): windows would leave gaps")


def _norm_tensors(mean, std, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std
