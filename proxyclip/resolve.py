"""A decode's settings, resolved from the config and what a call gives: a :class:`DecodeSpec`.

Given values win (``None`` = not given); the rest come from ``cfg.method`` for the configured
method, else from that method's own YAML (conf/method/<name>.yaml) with the knobs the protocol
preset sets for it on the dataset (``protocol.method_knobs``); ``prob_thd`` and ``area_thd``
always come from the dataset's protocol (``cfg.protocol``), ``logit_scale`` too when the protocol
sets one (``protocol.logit_scale`` not null: SCLIP's 65 / 50 / 50, ...), else from the method.
Every value is checked and typed by its knob's declaration (proxyclip/knobs.py); an unknown name
is an error listing the method's knobs.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import OmegaConf

from .config import CONF_DIR, group_choice
from .knobs import DECISION, SWITCHES, listing
from .methods import Method, get_method
from .postprocess import get_postprocess
from .protocol_resolvers import preset_method_knobs, preset_postprocess_knobs
from .specs import DecodeSpec, classes_digest, plain

PostprocessArg = Union[None, str, Mapping[str, Any]]
_METHOD_FIXED = ("name", "logit_scale")


@functools.lru_cache(maxsize=None)
def postprocess_presets() -> Tuple[str, ...]:
    """The preset names of conf/postprocess (read once, not on every decode)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / "postprocess").glob("*.yaml")))


def check_method_node(node: Any, meth: Method) -> None:
    """``cfg.method`` holds exactly the method's fields (an appended ``+method.gama=2`` is refused)."""
    allowed = set(_METHOD_FIXED) | {k.name for k in SWITCHES + meth.knobs}
    extra = sorted(set(node) - allowed)
    if extra:
        raise ValueError(f"method.{extra[0]} is not a setting of method {meth.name}; its settings: "
                         f"{listing(SWITCHES + meth.knobs + DECISION[:1])}")


def method_knobs(cfg: Any, name: str, params: Mapping[str, Any]) -> Tuple[Method, Dict[str, Any]]:
    """The method and its checked values of every knob: switches, its own, logit_scale, prob_thd."""
    meth = get_method(name)
    configured = name == str(cfg.method.name)
    base = cfg.method if configured else group_choice("method", name)
    if configured:
        check_method_node(base, meth)
    # another method: its YAML's values, but the knobs the protocol preset sets for it on this dataset
    preset = {} if configured else preset_method_knobs(cfg, name)
    known = {k.name for k in meth.all_knobs}
    unknown = sorted(k for k, v in params.items() if v is not None and k not in known)
    if unknown:
        raise ValueError(f"method {name} has no parameter(s) {unknown}; its parameters: "
                         + "; ".join(k.describe() for k in meth.all_knobs))
    values: Dict[str, Any] = {}
    for knob in meth.all_knobs:
        given = params.get(knob.name)
        if given is not None:
            values[knob.name] = knob.check(given)
        elif knob.name == "prob_thd" or (knob.name == "logit_scale" and protocol_value(cfg, "logit_scale") is not None):
            values[knob.name] = knob.check(plain(cfg.protocol[knob.name]), "protocol")
        elif knob.name in preset:
            values[knob.name] = preset[knob.name]
        else:
            values[knob.name] = knob.check(plain(base[knob.name]), "method")
    return meth, values


def clip_layers(name: str) -> int:
    """The number of blocks of open_clip model ``name``'s vision tower (from its config, no build)."""
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    layers = cfg.get("vision_cfg", {}).get("layers")
    if not isinstance(layers, int):
        raise ValueError(f"clip.name={name}: open_clip's config gives no integer vision layer count")
    return layers


def configured_parts(cfg: Any) -> Tuple[str, ...]:
    """The layer parts (proxyclip/parts.py) the configured method reads with its configured knobs."""
    from .parts import check_parts, method_parts

    meth, values = method_knobs(cfg, str(cfg.method.name), {})
    if meth.parts is None and meth.check is None:
        return ()
    layers = clip_layers(str(cfg.clip.name))
    return check_parts(method_parts(meth, values, layers), layers)


def protocol_value(cfg: Any, name: str) -> Any:
    """``cfg.protocol.<name>`` (None when the config has no such field)."""
    node = cfg.get("protocol") if hasattr(cfg, "get") else getattr(cfg, "protocol", None)
    return None if node is None or name not in node else plain(node[name])


def area_threshold(cfg: Any) -> Optional[float]:
    """The protocol's area rule (``protocol.area_thd``), checked: None (off) or a fraction in [0, 1)."""
    v = protocol_value(cfg, "area_thd")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) < 1:
        raise ValueError(f"protocol.area_thd must be null (off) or a fraction in [0, 1), got {v!r}")
    return float(v)


def postprocess_settings(cfg: Any, postprocess: PostprocessArg = None) -> Dict[str, Any]:
    """``{"name": function, **settings}``: ``None`` = the configured one; a preset name (a file of
    conf/postprocess/: ``"pamr"``, ``"pamr_talk2dino"``, ``"none"``); or a mapping with ``name``
    (a registered post-process) and the settings to change (the rest: the configured ones if the
    name is the configured one, else conf/postprocess/<name>.yaml's). Values read from a YAML give
    way to the protocol preset's per-dataset settings of that post-process (``postprocess_knobs``)."""
    named: Dict[str, Any] = {}
    if postprocess is None:
        spec: Dict[str, Any] = {"name": cfg.postprocess.name}
    elif isinstance(postprocess, str):
        if postprocess not in postprocess_presets():
            raise ValueError(f"unknown postprocess {postprocess!r}; the presets in conf/postprocess: "
                             f"{', '.join(postprocess_presets())}")
        named = OmegaConf.to_container(group_choice("postprocess", postprocess))
        spec = {"name": named["name"]}
    elif isinstance(postprocess, Mapping):
        spec = dict(postprocess)
    else:
        raise TypeError(f"postprocess must be None, a name or a mapping, got {type(postprocess).__name__}")
    name = str(spec.pop("name", cfg.postprocess.name))
    post = get_postprocess(name)
    from_yaml = isinstance(postprocess, str) or name != cfg.postprocess.name
    base = named if isinstance(postprocess, str) else (
        cfg.postprocess if name == cfg.postprocess.name else group_choice("postprocess", name))
    # values from a YAML: the settings the protocol preset sets for that post-process on this dataset win
    preset = preset_postprocess_knobs(cfg, name) if from_yaml else {}
    unknown = sorted(set(spec) - set(post.settings))
    if unknown:
        raise ValueError(f"postprocess {name} has no setting(s) {unknown}; its settings: "
                         + ("; ".join(k.describe() for k in post.knobs) or "none"))
    out: Dict[str, Any] = {"name": name}
    for knob in post.knobs:
        value = spec[knob.name] if knob.name in spec else preset.get(knob.name, base[knob.name])
        out[knob.name] = knob.check(plain(value), "postprocess")
    return out


def decode_spec(cfg: Any, classes: Optional[Sequence[str]] = None, method: Optional[str] = None,
                postprocess: PostprocessArg = None, **params: Any) -> DecodeSpec:
    """The :class:`DecodeSpec` of one decode (``classes``: the class lines, for its digest)."""
    name = str(cfg.method.name) if method is None else str(method)
    meth, values = method_knobs(cfg, name, params)
    post = postprocess_settings(cfg, postprocess)
    own = tuple((k.name, values[k.name]) for k in SWITCHES + meth.knobs)
    return DecodeSpec(method=name, knobs=own, postprocess=tuple(post.items()), logit_scale=values["logit_scale"],
                      prob_thd=values["prob_thd"], classes="" if classes is None else classes_digest(classes),
                      area_thd=area_threshold(cfg))
