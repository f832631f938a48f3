"""Building a Segmenter's backbones from a config: CLIP, the VFM (only when the method runs one),
weights (pretrained / local / seeded random, with the optional fallback to random), device and
precision; and :func:`with_vfm`, a Segmenter with another VFM that shares the CLIP model."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import OmegaConf

from .backbones import ClipBackbone, VfmBackbone, WeightsUnavailable, build_vfm, create_clip_model, create_tokenizer
from .config import chosen_overrides, group_choice
from .devices import resolve_runtime
from .methods import get_method
from .specs import EncodeSpec
from .windows import check_geometry

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def no_vfm_message(method: str, vfm: str) -> str:
    return (f"method={method} needs a VFM, but vfm={vfm}: choose one (e.g. vfm=dino_vitb8); for the baseline "
            "without a VFM use method=maskclip (method.residual=false method.ffn=false for the v-only variant)")


def vfm_chosen(cfg: Any) -> bool:
    """Whether the user chose the VFM (``vfm=...`` / ``vfm.*`` on the command line or in
    ``compose_config``'s overrides), not a preset or the default."""
    return any(k == "vfm" or k.startswith("vfm.") for k in chosen_overrides(cfg))


def build_segmenter(cls: type, cfg: Any) -> Any:
    """``cls(cfg, clip, vfm, random_weights)`` with the backbones ``cfg`` names (see conf/)."""
    device, _ = resolve_runtime(cfg)  # device/precision "auto" -> this machine's values, written into cfg
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    check_geometry(cfg.protocol)
    method = get_method(cfg.method.name)
    if method.needs_vfm and not cfg.vfm.timm_name:
        raise ValueError(no_vfm_message(cfg.method.name, cfg.vfm.name))
    use_vfm = method.needs_vfm
    if not use_vfm and cfg.vfm.timm_name and vfm_chosen(cfg):
        log.warning("method=%s uses no VFM: vfm=%s is neither built nor run", cfg.method.name, cfg.vfm.name)
    dtype = DTYPES[cfg.precision]
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
    clip = ClipBackbone(clip_model.to(device=device, dtype=dtype), create_tokenizer(cfg.clip.name),
                        pos_resize=cfg.clip.pos_resize)
    if vfm is not None:
        vfm = vfm.to(device=device, dtype=dtype)
    return cls(cfg, clip, vfm, random_weights=(source == "random"))


def with_vfm(seg: Any, vfm: str, **settings: Any) -> Any:
    """A Segmenter like ``seg`` with another VFM (a conf/vfm name plus field overrides such as
    ``layer=6``, ``feature="k"``), sharing ``seg``'s CLIP model and text cache, and its VFM model
    too when the two VFM specs differ only in how features are read (``VfmSpec.model_record``)."""
    if not get_method(seg.method).needs_vfm:
        raise ValueError(f"method={seg.method} uses no VFM: build the Segmenter with a method that does")
    node = OmegaConf.to_container(group_choice("vfm", vfm))
    cfg = OmegaConf.merge(seg.cfg, {"vfm": node})
    for k, v in settings.items():
        if k not in cfg.vfm:
            raise ValueError(f"vfm has no field {k!r}; its fields: {', '.join(cfg.vfm)}")
        cfg.vfm[k] = v
    if not cfg.vfm.timm_name:
        raise ValueError(no_vfm_message(seg.method, vfm))
    spec = EncodeSpec.from_config(cfg, random_weights=seg.random_weights, uses_vfm=True)
    v = cfg.vfm
    if seg.vfm is not None and spec.vfm.model_record() == seg.encode_spec.vfm.model_record():
        backbone = VfmBackbone(seg.vfm.model, layer=v.layer, feature=v.feature, norm=v.norm,
                               input_size=v.input_size, name=v.name, pos_resize=v.pos_resize)
    else:
        source = "random" if seg.random_weights else seg.cfg.weights.source
        backbone = build_vfm(v, source, cfg.weights.seed).to(device=seg.device, dtype=DTYPES[cfg.precision])
    other = type(seg)(cfg, seg.clip, backbone, seg.random_weights)
    other.text = seg.text
    return other


def for_method(seg: Any, method: str) -> Any:
    """``seg``, or a Segmenter sharing its models whose VFM gives the readout ``method`` reads
    (``Method.vfm_feature``, e.g. CASS's keys), made once per readout:
    ``other.decode(other.encode(image, reuse=enc), ...)`` reuses ``enc``'s CLIP part."""
    if getattr(get_method(method), "needs_sam", False) and seg.sam is None:
        return _with_sam(seg, method)
    want = get_method(method).vfm_feature
    if want is None or seg.vfm is None or seg.vfm.feature == want:
        return seg
    made = seg.__dict__.setdefault("_for_method", {})
    if want not in made:
        settings = OmegaConf.to_container(seg.cfg.vfm, resolve=True)  # every field as configured, but the readout
        settings.update(feature=want)
        made[want] = with_vfm(seg, str(settings.pop("name")), **settings)
    return made[want]


def _with_sam(seg: Any, method: str) -> Any:
    """A Segmenter sharing ``seg``'s models, configured for ``method`` (its YAML), which makes the
    per-image SAM part that method reads (Trident; ``trident.sam`` as ``seg``'s config says), made once."""
    made = seg.__dict__.setdefault("_for_method", {})
    if ("sam", method) not in made:
        cfg = OmegaConf.create(OmegaConf.to_container(seg.cfg, resolve=True))
        cfg.method = OmegaConf.to_container(group_choice("method", method), resolve=True)
        made["sam", method] = type(seg)(cfg, seg.clip, seg.vfm, seg.random_weights)
    return made["sam", method]
