"""The Segmenter: wires the stages together. encode (expensive) / decode (cheap) / predict.

    encode: image -> resize -> windows -> [CLIP tokens entering the last block, VFM features]  (Encoded)
    decode: last block with the method's attention (proxyclip/methods.py, last_block.py) -> dense
            -> scores -> merge windows -> post-process -> probabilities -> labels           (Prediction)

One encode serves every method: ``decode(enc, classes, method="sclip")``. Every stage's tensor
passes through a named hook point (see ``proxyclip.hooks``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import proxy
from .backbones import CLIP_MEAN, CLIP_STD, ClipBackbone, VfmBackbone, WeightsUnavailable, build_vfm, create_clip_model
from .config import CONF_DIR, group_choice
from .hooks import HOOK_NAMES, HookFn, HookSet, finish_cache
from .images import ImageLike, load_image
from .last_block import BlockInputs, dense_from_block_output, run_last_block
from .methods import Method, get_method
from .postprocess import get_postprocess
from .devices import resolve_runtime
from .text import ClassList, TextEncoder, parse_classes, text_cache_options
from .windows import (Box, merge_windows, padding_multiple, resize_image, resized_size, slide_windows,
                      symmetric_padding)

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ENCODED_FORMAT = 2  # 2: CLIP tokens entering the last block (1: its values)
PostprocessSpec = Union[None, str, Mapping[str, Any]]


@dataclass
class Encoded:
    """The expensive half of one image: per window, the CLIP tokens entering the last block and the
    VFM features, kept as separate parts.

    Depends only on the image, the backbones, their weights and the resolution settings
    (``clip_key`` / ``vfm_key`` say which), never on the method, its knobs, classes or thresholds.
    """

    image: torch.Tensor  # (3, H, W) original image in [0, 1]
    resized_size: Tuple[int, int]  # (h, w) after the short-side resize
    windows: List[Box]  # (y1, y2, x1, x2) in the resized image
    pad: Tuple[int, int, int, int]  # (top, bottom, left, right) padding of every window
    clip_tokens: torch.Tensor  # (n_windows, 1 + gh*gw, D) float32, CLS first (None only in a cache's partial entry)
    clip_grid: Tuple[int, int]  # (gh, gw)
    vfm_features: Optional[torch.Tensor]  # (n_windows, C, Hv, Wv) float32, None without a VFM
    clip_key: str  # identity of (CLIP, weights, resolution, crop, stride); the padding is checked on decode
    vfm_key: Optional[str]  # identity of (VFM, weights, resolution, crop, stride); None without a VFM
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False)  # decode-side reuse, not saved

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def key(self) -> str:
        return f"{self.clip_key}+{self.vfm_key or 'novfm'}"

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of CPU tensors and metadata, for ``torch.save``."""
        return dict(format=_ENCODED_FORMAT, image=self.image.cpu(), resized_size=list(self.resized_size),
                    windows=[list(b) for b in self.windows], pad=list(self.pad), clip_tokens=self.clip_tokens.cpu(),
                    clip_grid=list(self.clip_grid),
                    vfm_features=None if self.vfm_features is None else self.vfm_features.cpu(),
                    clip_key=self.clip_key, vfm_key=self.vfm_key)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Encoded":
        if d.get("format") != _ENCODED_FORMAT:
            raise ValueError(f"Encoded format {d.get('format', 1)} is not {_ENCODED_FORMAT} (saved by an older version: "
                             "encode again)")
        return cls(image=d["image"], resized_size=tuple(d["resized_size"]), windows=[tuple(b) for b in d["windows"]],
                   pad=tuple(d["pad"]), clip_tokens=d["clip_tokens"], clip_grid=tuple(d["clip_grid"]),
                   vfm_features=d["vfm_features"], clip_key=d["clip_key"], vfm_key=d["vfm_key"])


@dataclass
class Prediction:
    """Result for one image, at its original size.

    scores  (Q, H, W) cosine scores per query name, windows merged (and post-processed, if on)
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
    params: Dict[str, Any] = field(default_factory=dict)  # method, its knobs, logit_scale, prob_thd, postprocess
    random_weights: bool = False  # True when the backbones run with random weights

    @property
    def method(self) -> str:
        return str(self.params.get("method", ""))


class Segmenter:
    """Training-free segmentation for one (CLIP, VFM, weights, method) configuration.

    The configured method (``cfg.method``) is the default of every decode; any registered method
    decodes from the same Encoded (``decode(enc, classes, method="sclip")``), except that a method
    needing a VFM needs a Segmenter built with one.
    """

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
        method = get_method(m.name)
        if method.needs_vfm and vfm is None:
            raise ValueError(_no_vfm_message(m.name, cfg.vfm.name))
        vfm_patch = [] if vfm is None or vfm.resizes_input else [vfm.patch_size]
        self.pad_multiple = padding_multiple(clip.patch_size, *vfm_patch)
        self._clip_norm = _norm_tensors(CLIP_MEAN, CLIP_STD, self.device)
        self._vfm_norm = None if vfm is None else _norm_tensors(vfm.mean, vfm.std, self.device)
        self.clip_key, self.vfm_key = self._make_keys()
        self.resolve_params()  # the configured method's values are valid
        self.resolve_postprocess()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Segmenter":
        """Build the backbones as ``cfg`` says (see conf/); no VFM when the method needs none."""
        device, _ = resolve_runtime(cfg)  # device/precision "auto" -> this machine's values, written into cfg
        if int(cfg.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        _check_geometry(cfg.method)
        method = get_method(cfg.method.name)
        if method.needs_vfm and not cfg.vfm.timm_name:
            raise ValueError(_no_vfm_message(cfg.method.name, cfg.vfm.name))
        use_vfm = method.needs_vfm
        if not use_vfm and cfg.vfm.timm_name:
            log.warning("method=%s uses no VFM: vfm=%s is neither built nor run", cfg.method.name, cfg.vfm.name)
        dtype = _DTYPES[cfg.precision]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("precision=%s on CPU is much slower than fp32", cfg.precision)
        w = cfg.weights
        source = w.source
        try:
            clip_model = create_clip_model(cfg.clip.name, cfg.clip.pretrained, cfg.clip.quick_gelu, source,
                                           seed=w.seed, checkpoint=cfg.clip.checkpoint)
            vfm = build_vfm(cfg.vfm, source, w.seed) if use_vfm else None
        except WeightsUnavailable as e:
            if not w.fallback_to_random:
                raise
            print(f"[proxyclip] pretrained weights unavailable, using RANDOM weights (seed {w.seed}): {e}")
            source = "random"
            clip_model = create_clip_model(cfg.clip.name, cfg.clip.pretrained, cfg.clip.quick_gelu, source, seed=w.seed)
            vfm = build_vfm(cfg.vfm, source, w.seed) if use_vfm else None
        clip = ClipBackbone(clip_model.to(device=device, dtype=dtype), open_clip.get_tokenizer(cfg.clip.name))
        if vfm is not None:
            vfm = vfm.to(device=device, dtype=dtype)
        return cls(cfg, clip, vfm, random_weights=(source == "random"))

    def with_vfm(self, vfm: str, **settings: Any) -> "Segmenter":
        """A Segmenter with another VFM (a conf/vfm name, plus field overrides such as ``layer=6``,
        ``feature="k"``) that shares this one's CLIP model and text cache (and its VFM model, when
        only the layer, feature or norm differ). Its ``encode(image, reuse=enc)`` takes the CLIP part
        from ``enc``: comparing VFMs, layers or features on one image runs CLIP once."""
        node = OmegaConf.to_container(group_choice("vfm", vfm))
        cfg = OmegaConf.merge(self.cfg, {"vfm": node})
        for k, v in settings.items():
            if k not in cfg.vfm:
                raise ValueError(f"vfm has no field {k!r}; its fields: {', '.join(cfg.vfm)}")
            cfg.vfm[k] = v
        if not get_method(self.method).needs_vfm:
            raise ValueError(f"method={self.method} uses no VFM: build the Segmenter with a method that does")
        model_fields = ("timm_name", "timm_kwargs", "checkpoint", "input_size")
        v, mine = cfg.vfm, self.cfg.vfm
        if self.vfm is not None and all(v[k] == mine[k] for k in model_fields):  # same model, other layer/feature
            backbone = VfmBackbone(self.vfm.model, layer=v.layer, feature=v.feature, norm=v.norm,
                                   input_size=v.input_size, name=v.name)
        else:
            source = "random" if self.random_weights else self.cfg.weights.source
            backbone = build_vfm(v, source, cfg.weights.seed)
            if backbone is None:
                raise ValueError(_no_vfm_message(self.method, vfm))
            backbone = backbone.to(device=self.device, dtype=_DTYPES[cfg.precision])
        other = Segmenter(cfg, self.clip, backbone, self.random_weights)
        other.text = self.text
        return other

    @property
    def clip_model(self) -> torch.nn.Module:
        """The underlying open_clip model."""
        return self.clip.model

    @property
    def vfm_model(self) -> Optional[torch.nn.Module]:
        """The underlying timm model (None when the method needs no VFM)."""
        return None if self.vfm is None else self.vfm.model

    @property
    def method(self) -> str:
        """The configured method (the default of every decode)."""
        return str(self.cfg.method.name)

    @property
    def key(self) -> str:
        """Identity of what ``encode`` produces (both parts)."""
        return f"{self.clip_key}+{self.vfm_key or 'novfm'}"

    @property
    def hook_names(self) -> List[str]:
        return list(HOOK_NAMES)

    def _make_keys(self) -> Tuple[str, Optional[str]]:
        """Identities of the two parts an encode makes (the window padding is checked separately:
        it depends on both backbones' patch sizes, and is usually none)."""
        c, v, w, m = self.cfg.clip, self.cfg.vfm, self.cfg.weights, self.cfg.method
        source = "random" if self.random_weights else w.source

        def weights(checkpoint: Optional[str]) -> str:
            return {"random": f"random{w.seed}", "local": f"local:{checkpoint}"}.get(source, "pretrained")

        common = [f"res={m.short_side}/{m.max_long_side}/{m.crop}/{m.stride}", f"prec={self.cfg.precision}",
                  f"format={_ENCODED_FORMAT}"]
        clip_key = f"{c.name}-{_digest([f'clip={c.name}/{c.pretrained}/qg{int(c.quick_gelu)}', weights(c.checkpoint)] + common)}"
        if self.vfm is None:
            return clip_key, None
        vfm_parts = [f"vfm={v.name}/{v.timm_name}/{v.input_size}", f"layer={v.layer}/{v.feature}/norm{int(v.norm)}",
                     f"kw={OmegaConf.to_container(v.timm_kwargs) if 'timm_kwargs' in v else {}}", weights(v.checkpoint)]
        return clip_key, f"{v.name}-{_digest(vfm_parts + common)}"

    # ------------------------------------------------------------------ encode
    def _layout(self, img: torch.Tensor) -> Tuple[Tuple[int, int], List[Box], Tuple[int, int, int, int]]:
        """(resized size, windows, padding) of an image under this configuration."""
        m = self.cfg.method
        size = resized_size(img.shape[1], img.shape[2], m.short_side, m.max_long_side)
        boxes = slide_windows(size[0], size[1], m.crop, m.stride)
        y1, y2, x1, x2 = boxes[0]
        return size, boxes, symmetric_padding(y2 - y1, x2 - x1, self.pad_multiple)

    @torch.no_grad()
    def encode(self, image: ImageLike, reuse: Optional[Encoded] = None) -> Encoded:
        """Resize, cut windows, run the backbones (CLIP up to its last block; the VFM if any) -> Encoded.

        ``reuse``: an Encoded of the same image (e.g. from a Segmenter with another VFM, see
        :meth:`with_vfm`) whose parts made under this configuration's keys and window layout are
        taken as they are: comparing VFMs on one image runs CLIP once.
        """
        img = load_image(image)
        size, boxes, pad = self._layout(img)
        same = (reuse is not None and reuse.resized_size == size and reuse.windows == boxes and reuse.pad == pad
                and torch.equal(reuse.image, img))
        clip_tokens = reuse.clip_tokens if same and reuse.clip_key == self.clip_key else None
        vfm_features = None
        if self.vfm is not None and same and reuse.vfm_key == self.vfm_key:
            vfm_features = reuse.vfm_features
        run_vfm = self.vfm is not None and vfm_features is None
        resized = resize_image(img.to(self.device), size) if run_vfm or clip_tokens is None else None
        tokens, feats = [], []
        bs = int(self.cfg.batch_size)
        for start in range(0, len(boxes) if resized is not None else 0, bs):
            crops = torch.stack([resized[:, a:b, c:d] for (a, b, c, d) in boxes[start:start + bs]])
            if run_vfm:
                vfm_in = _normalize(crops, *self._vfm_norm)
                if not self.vfm.resizes_input:
                    vfm_in = F.pad(vfm_in, (pad[2], pad[3], pad[0], pad[1]))
                f = self.vfm.features(vfm_in).float()
                feats.append(self.hooks.point("vfm.features", f, start))
            if clip_tokens is None:
                clip_in = F.pad(_normalize(crops, *self._clip_norm), (pad[2], pad[3], pad[0], pad[1]))
                t = self.clip.tokens_before_last_block(clip_in).float()
                tokens.append(self.hooks.point("clip.last_block_input", t, start))
        grid = self.clip.grid_of(*size_with_pad(boxes[0], pad))
        return Encoded(image=img, resized_size=size, windows=boxes, pad=pad,
                       clip_tokens=torch.cat(tokens) if clip_tokens is None else clip_tokens, clip_grid=grid,
                       vfm_features=torch.cat(feats) if run_vfm else vfm_features,
                       clip_key=self.clip_key, vfm_key=self.vfm_key)

    # ------------------------------------------------------------------ decode
    def resolve_params(self, method: Optional[str] = None, **params: Any) -> Dict[str, Any]:
        """All settings of one decode: ``method``, its switches and knobs, ``logit_scale``, ``prob_thd``.

        Given values win (``None`` = not given); the rest come from ``cfg.method`` for the configured
        method, else from that method's own YAML (conf/method/<name>.yaml), except ``prob_thd`` (and
        the geometry), which belong to the dataset's protocol and always come from ``cfg.method``.
        """
        name = self.method if method is None else str(method)
        meth = get_method(name)
        base = self.cfg.method if name == self.method else group_choice("method", name)
        keys = ("residual", "ffn") + meth.knobs + ("logit_scale", "prob_thd")
        unknown = sorted(k for k, v in params.items() if v is not None and k not in keys)
        if unknown:
            raise ValueError(f"method {name} has no parameter(s) {unknown}; its parameters: {', '.join(keys)}")
        p: Dict[str, Any] = {"method": name}
        for k in keys:
            default = self.cfg.method.prob_thd if k == "prob_thd" else base[k]
            p[k] = _as_type_of(k, default, params.get(k))
        proxy.check_decision_params(p["logit_scale"], p["prob_thd"])
        if meth.check is not None:
            meth.check(**{k: p[k] for k in meth.knobs})
        return p

    def resolve_postprocess(self, postprocess: PostprocessSpec = None) -> Dict[str, Any]:
        """The post-process settings of one decode: ``None`` = the configured one; a preset name
        (a file of conf/postprocess/: ``"pamr"``, ``"pamr_talk2dino"``, ``"none"``); or a mapping with
        ``name`` (``"pamr"``) and the settings to change (the rest: the configured ones if the name is
        the configured one, else conf/postprocess/<name>.yaml's)."""
        if postprocess is None:
            spec: Dict[str, Any] = {"name": self.cfg.postprocess.name}
        elif isinstance(postprocess, str):
            presets = _postprocess_presets()
            if postprocess not in presets:
                raise ValueError(f"unknown postprocess {postprocess!r}; the presets in conf/postprocess: {', '.join(presets)}")
            preset = OmegaConf.to_container(group_choice("postprocess", postprocess))
            spec = {k: v for k, v in preset.items() if k == "name" or k in get_postprocess(preset["name"]).settings}
        elif isinstance(postprocess, Mapping):
            spec = dict(postprocess)
        else:
            raise TypeError(f"postprocess must be None, a name or a mapping, got {type(postprocess).__name__}")
        name = str(spec.pop("name", self.cfg.postprocess.name))
        post = get_postprocess(name)
        base = self.cfg.postprocess if name == self.cfg.postprocess.name else group_choice("postprocess", name)
        unknown = sorted(set(spec) - set(post.settings))
        if unknown:
            raise ValueError(f"postprocess {name} has no setting(s) {unknown}; its settings: {list(post.settings) or 'none'}")
        out: Dict[str, Any] = {"name": name}
        for k in post.settings:
            value = spec.get(k, base[k])
            out[k] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if post.check is not None:
            post.check(**{k: out[k] for k in post.settings})
        return out

    def text_embeddings(self, queries: Sequence[str]) -> torch.Tensor:
        """(Q, E) prompt-ensembled text embeddings, cached per name."""
        return self.text.embed(list(queries))

    @torch.no_grad()
    def dense_embeddings(self, enc: Encoded, start: int, stop: int, params: Dict[str, Any]) -> torch.Tensor:
        """(B, E, h, w) L2-normalized dense embeddings of windows ``start:stop`` with ``params``' method.

        The grid (h, w) is CLIP's, or the VFM's for ProxyCLIP. q, k, v and ProxyCLIP's raw affinity
        depend only on the Encoded, so they are computed once per Encoded (``enc.memo``).
        """
        meth = get_method(params["method"])

        def point(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return self.hooks.point(name, tensor, start)

        feats = None if enc.vfm_features is None else enc.vfm_features[start:stop].to(self.device)
        x = BlockInputs(self.clip, enc.clip_tokens[start:stop].to(self.device), enc.clip_grid, feats, enc.memo,
                        (start, stop), point)
        att = meth.attention(x, **{k: params[k] for k in meth.knobs})
        pattern = point("attention.pattern", att.pattern)
        replaced = pattern is not att.pattern
        att = replace(att, pattern=pattern)
        z = point("clip.last_block_output", run_last_block(x, att, params["residual"], params["ffn"],
                                                           shortcut=not replaced))
        return point("clip.dense", dense_from_block_output(self.clip, z, att))

    def _check_encoded(self, enc: Encoded, meth: Method) -> None:
        if not isinstance(enc, Encoded):
            raise TypeError(f"decode takes the Encoded returned by encode(), got {type(enc).__name__}")
        if enc.clip_key != self.clip_key:
            raise ValueError(f"this Encoded was made by another CLIP configuration ({enc.clip_key}), not {self.clip_key}")
        pad = self._layout(enc.image)[2]
        if pad != enc.pad:
            raise ValueError(f"this Encoded's windows are padded {enc.pad}, not as this configuration pads them "
                             f"({pad}): encode again with this Segmenter")
        if meth.needs_vfm:
            if enc.vfm_features is None:
                raise ValueError(f"method {meth.name} needs VFM features, but this Encoded has none (it was encoded "
                                 f"for a method without a VFM); encode with a Segmenter built for {meth.name}")
            if enc.vfm_key != self.vfm_key:
                raise ValueError(f"this Encoded's VFM features come from another configuration ({enc.vfm_key}), "
                                 f"not {self.vfm_key}")

    @torch.no_grad()
    def decode(self, enc: Encoded, classes: Sequence[str], method: Optional[str] = None,
               postprocess: PostprocessSpec = None, **params: Any) -> Prediction:
        """Last block, scores, merge, post-process, decision.

        ``method`` (default: the configured one) and its parameters by name (``beta=``, ``gamma=``,
        ``gaussian_std=``, ``residual=``, ``ffn=``, ``logit_scale=``, ``prob_thd=``; ``None`` = default,
        see :meth:`resolve_params`); ``postprocess`` as in :meth:`resolve_postprocess`.
        """
        p = self.resolve_params(method, **params)
        self._check_encoded(enc, get_method(p["method"]))
        post = self.resolve_postprocess(postprocess)
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
            dense = self.dense_embeddings(enc, start, stop, p)
            s = torch.einsum("behw,qe->bqhw", dense, text.to(dense.dtype))
            s = F.interpolate(s, size=padded, mode="bilinear", align_corners=False)
            s = s[:, :, top:top + wh, left:left + ww]
            window_scores.append(self.hooks.point("scores.window", s, start).cpu())
        merged = merge_windows(torch.cat(window_scores), enc.windows, enc.resized_size)
        if tuple(merged.shape[-2:]) != enc.image_size:
            merged = F.interpolate(merged[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
        scores = self.hooks.point("scores.image", merged)
        scores = self.hooks.point("scores.refined", self._postprocess(scores, enc.image, post))
        probs, labels = decide(scores, cl, p["logit_scale"], p["prob_thd"])
        return Prediction(image=enc.image, scores=scores, probs=probs, labels=labels, class_names=cl.class_names,
                          queries=cl.queries, query_to_class=cl.query_to_class, params={**p, "postprocess": post},
                          random_weights=self.random_weights)

    def _postprocess(self, scores: torch.Tensor, image: torch.Tensor, post: Dict[str, Any]) -> torch.Tensor:
        refine = get_postprocess(post["name"]).refine
        if refine is None:
            return scores
        mean, std = (t[0].cpu() for t in self._clip_norm)
        guide = (image.cpu().float() - mean) / std
        return refine(scores, guide, **{k: v for k, v in post.items() if k != "name"})

    def predict(self, image: ImageLike, classes: Sequence[str], method: Optional[str] = None,
                postprocess: PostprocessSpec = None, **params: Any) -> Prediction:
        """``decode(encode(image), classes, method, postprocess, **params)``."""
        return self.decode(self.encode(image), classes, method, postprocess, **params)

    # ------------------------------------------------------------------ hooks
    def _encoded(self, image: ImageLike | Encoded) -> Encoded:
        """Encode an image; or replay a stored Encoded's tensors through the encode-time hook points.

        Replaying lets hooks read and replace ``vfm.features`` and ``clip.last_block_input`` of a
        cached encode (everything after them is decode and fires anyway).
        """
        if not isinstance(image, Encoded):
            return self.encode(image)
        enc, bs = image, int(self.cfg.batch_size)
        feats, tokens, changed = [], [], False
        for start in range(0, len(enc.windows), bs):
            if enc.vfm_features is not None:
                f = enc.vfm_features[start:start + bs]
                feats.append(self.hooks.point("vfm.features", f, start))
                changed |= feats[-1] is not f
            t = enc.clip_tokens[start:start + bs]
            tokens.append(self.hooks.point("clip.last_block_input", t, start))
            changed |= tokens[-1] is not t
        if not changed:
            return enc
        return replace(enc, vfm_features=torch.cat(feats) if feats else None, clip_tokens=torch.cat(tokens), memo={})

    def run_with_cache(self, image: ImageLike | Encoded, classes: Sequence[str], names: Optional[Iterable[str]] = None,
                       method: Optional[str] = None, postprocess: PostprocessSpec = None,
                       **params: Any) -> Tuple[Prediction, Dict[str, torch.Tensor]]:
        """Predict and record hook tensors (all names, or ``names``). Pass an Encoded to skip encode."""
        raw: Dict[str, List[torch.Tensor]] = {}
        with self.hooks.active(cache=raw, cache_names=names):
            pred = self.decode(self._encoded(image), classes, method, postprocess, **params)
        return pred, finish_cache(raw)

    def run_with_hooks(self, image: ImageLike | Encoded, classes: Sequence[str], hooks: Dict[str, HookFn],
                       method: Optional[str] = None, postprocess: PostprocessSpec = None, **params: Any) -> Prediction:
        """Predict with ``hooks`` ({name: fn(tensor, hook) -> replacement or None}) active.

        With an Encoded, hooks on ``vfm.features`` and ``clip.last_block_input`` apply to its stored tensors.
        """
        with self.hooks.active(hooks=hooks):
            return self.decode(self._encoded(image), classes, method, postprocess, **params)


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


@functools.lru_cache(maxsize=None)
def _postprocess_presets() -> Tuple[str, ...]:
    """The preset names of conf/postprocess (read once, not on every decode)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / "postprocess").glob("*.yaml")))


def _no_vfm_message(method: str, vfm: str) -> str:
    return (f"method={method} needs a VFM, but vfm={vfm}: choose one (e.g. vfm=dino_vitb8); for the baseline "
            "without a VFM use method=maskclip (method.residual=false method.ffn=false for the v-only variant)")


def _as_type_of(name: str, default: Any, value: Any) -> Any:
    """``value`` (or ``default`` when None) with ``default``'s type: bool stays bool, numbers become float."""
    v = default if value is None else value
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def size_with_pad(box: Box, pad: Tuple[int, int, int, int]) -> Tuple[int, int]:
    """(height, width) of a window after its symmetric padding."""
    return box[1] - box[0] + pad[0] + pad[1], box[3] - box[2] + pad[2] + pad[3]


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
