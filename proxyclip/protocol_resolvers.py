"""The OmegaConf resolvers of the protocol presets (conf/protocol/*.yaml, docs/protocol.md):
``${per_dataset:<field>}`` reads a preset's table for the composed dataset, ``${class_file:<own>}``
a dataset's class file, ``${vfm_feature_for:<method>,<otherwise>}`` the VFM readout a method needs.
Registered on import (by proxyclip.config).

A preset's per-dataset **method** knobs (``method_knobs: {dataset: {knob: value}}``, for the
methods ``method_knobs_for``, default the method of the preset's name) are not resolvers: they are
written into ``cfg.method`` once the config is composed (:func:`apply_method_knobs`, called by
``compose_config`` and by every Hydra app), except a knob set on the command line. Likewise a
preset's per-dataset **post-process** settings (``postprocess_knobs: {dataset: {setting: value}}``,
Trident's ``coarse_thresh``), written into ``cfg.postprocess`` for the settings its function declares.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf


def _per_dataset(key: str, *, _parent_: Any, _root_: Any) -> Any:
    """``${per_dataset:crop}``: the protocol's table entry for the composed dataset, else its
    ``base`` value (no dataset, e.g. proxyclip-segment, or one the table does not list)."""
    dataset = _select(_root_, "dataset.name")
    row = (_parent_.get("datasets") or {}).get(dataset) if dataset is not None else None
    if row is not None and key in row:
        return OmegaConf.to_container(row, resolve=True)[key]
    base = _parent_.get("base") or {}
    if key not in base:
        raise ValueError(f"protocol {_parent_.get('name')}: no {key} for dataset {dataset} in protocol.datasets "
                         f"and none in protocol.base")
    return OmegaConf.to_container(base, resolve=True)[key]


def _class_file(own: Any, *, _root_: Any) -> Any:
    """``${class_file:voc21}`` (a dataset's classnames): the protocol's class file when it names
    one (protocol.classnames), else the dataset's own ``own``."""
    chosen = _select(_root_, "protocol.classnames")
    return own if chosen is None else chosen


def _select(root: Any, key: str) -> Any:
    """``root.<key>``, or None when it is missing or not a node (``dataset: ???`` in ``--help``)."""
    try:
        return OmegaConf.select(root, key, default=None, throw_on_missing=False)
    except Exception:  # e.g. a group left to choose is the string "???", not a node
        return None


def _vfm_feature_for(method: Any, otherwise: Any) -> Any:
    """``${vfm_feature_for:${method.name},tokens}``: the VFM readout ``method`` declares it needs
    (``Method.vfm_feature``: CASS's ``k``), else ``otherwise`` (an experiment over several methods
    gives each the VFM features it runs on; ``vfm.feature=`` on the command line still wins)."""
    from .methods import METHODS

    meth = METHODS.get(str(method))
    return otherwise if meth is None or meth.vfm_feature is None else meth.vfm_feature


# ---------------------------------------------------------------------------------------------- method knobs
def preset_file(protocol: Any) -> str:
    """``conf/protocol/<name>.yaml``: where a preset's values come from (for error messages)."""
    return f"conf/protocol/{_get(protocol, 'name')}.yaml"


def knobs_for(protocol: Any) -> List[str]:
    """The methods a preset's ``method_knobs`` apply to: ``method_knobs_for``, or [its name]."""
    names = _get(protocol, "method_knobs_for") or [_get(protocol, "name")]
    return [str(n) for n in names]


def check_method_knobs(protocol: Any) -> Dict[str, Dict[str, Any]]:
    """A preset's ``method_knobs`` table, checked and typed by the knobs' declarations: each
    dataset's entry a mapping of knobs (switches included) of the methods of :func:`knobs_for` (a
    knob only some of them have is applied to those: LPOSS+'s ``tau`` under protocol=lposs).
    Any problem is one ValueError naming the file, the dataset and the knob."""
    from .knobs import DECISION, SWITCHES, listing
    from .methods import METHODS

    table = _plain(_get(protocol, "method_knobs")) or {}
    where = preset_file(protocol)
    if not isinstance(table, dict):
        raise ValueError(f"{where}: method_knobs must be a mapping {{dataset: {{knob: value}}}}, got {table!r}")
    if not table:
        return {}
    methods = []
    for name in knobs_for(protocol):
        if name not in METHODS:
            raise ValueError(f"{where}: method_knobs apply to method {name!r} (method_knobs_for, else the preset's "
                             f"name), which is not a registered method; known: {', '.join(METHODS)}")
        methods.append(METHODS[name])
    out: Dict[str, Dict[str, Any]] = {}
    for dataset, row in table.items():
        if not isinstance(row, dict):
            raise ValueError(f"{where}: method_knobs.{dataset} must be a mapping {{knob: value}}, got {row!r}")
        out[str(dataset)] = {}
        for knob, value in row.items():
            declared = [k for m in methods for k in SWITCHES + m.knobs if k.name == knob]
            if not declared:
                why = (" (a protocol field: set it in the preset's datasets table)"
                       if knob in {k.name for k in DECISION} else "")
                names = " or ".join(m.name for m in methods)
                have = "; ".join(f"{m.name}: {listing(SWITCHES + m.knobs)}" for m in methods)
                raise ValueError(f"{where}: method_knobs.{dataset}.{knob} is not a knob of method {names}{why}; "
                                 f"its knobs: {have}" if len(methods) > 1 else
                                 f"{where}: method_knobs.{dataset}.{knob} is not a knob of method {names}{why}; "
                                 f"its knobs: {listing(SWITCHES + methods[0].knobs)}")
            for k in declared:  # every method's declaration of it accepts the value
                out[str(dataset)][str(knob)] = k.check(value, f"{where}: method_knobs.{dataset}")
    return out


def preset_method_knobs(cfg: Any, method: Optional[str] = None) -> Dict[str, Any]:
    """The knobs ``cfg``'s protocol preset sets for ``method`` (default: the configured one) on
    the composed dataset: ``{knob: value}``, {} when the preset's table is not for that method,
    does not list the dataset, or there is no dataset (proxyclip-segment)."""
    protocol = _select(cfg, "protocol")
    if protocol is None or not hasattr(protocol, "get"):
        return {}
    table = check_method_knobs(protocol)
    method = str(_select(cfg, "method.name")) if method is None else str(method)
    dataset = _select(cfg, "dataset.name")
    if not table or method not in knobs_for(protocol) or dataset is None:
        return {}
    from .knobs import SWITCHES
    from .methods import METHODS

    own = {k.name for k in SWITCHES + METHODS[method].knobs}  # a knob of another method of the list: not this one's
    return {k: v for k, v in table.get(str(dataset), {}).items() if k in own}


def apply_method_knobs(cfg: Any, chosen: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write the preset's knobs for the composed method and dataset into ``cfg.method``, except
    those set on the command line (``method.<knob>=...``: ``chosen``, default
    :func:`proxyclip.config.chosen_overrides`). Returns what was written. Precedence, highest
    first: the command line (and a multirun's swept values), the preset's ``method_knobs``, the
    method's YAML (and any other config file: an experiment's own values do not win)."""
    if chosen is None:
        from .config import chosen_overrides

        chosen = chosen_overrides(cfg)
    keys = set(chosen)
    written = {}
    for knob, value in preset_method_knobs(cfg).items():
        if f"method.{knob}" in keys:
            continue
        cfg.method[knob] = value
        written[knob] = value
    post = _select(cfg, "postprocess.name")
    for name, value in ({} if post is None else preset_postprocess_knobs(cfg, str(post))).items():
        if f"postprocess.{name}" not in keys:  # the preset's per-dataset post-process settings, same precedence
            cfg.postprocess[name] = value
            written[f"postprocess.{name}"] = value
    return written


def check_postprocess_knobs(protocol: Any) -> Dict[str, Dict[str, Any]]:
    """A preset's ``postprocess_knobs`` table ({dataset: {setting: value}}, e.g. Trident's per-dataset
    ``coarse_thresh``), checked and typed by the declarations of the post-processes having each
    setting; a setting no registered post-process declares is one ValueError naming the file."""
    from .postprocess import POSTPROCESSES

    table = _plain(_get(protocol, "postprocess_knobs")) or {}
    where = preset_file(protocol)
    if not isinstance(table, dict):
        raise ValueError(f"{where}: postprocess_knobs must be a mapping {{dataset: {{setting: value}}}}, got {table!r}")
    out: Dict[str, Dict[str, Any]] = {}
    for dataset, row in table.items():
        if not isinstance(row, dict):
            raise ValueError(f"{where}: postprocess_knobs.{dataset} must be a mapping {{setting: value}}, got {row!r}")
        out[str(dataset)] = {}
        for name, value in row.items():
            declared = [k for p in POSTPROCESSES.values() for k in p.knobs if k.name == name]
            if not declared:
                have = "; ".join(f"{p.name}: {', '.join(p.settings) or 'none'}" for p in POSTPROCESSES.values())
                raise ValueError(f"{where}: postprocess_knobs.{dataset}.{name} is not a setting of any post-process; "
                                 f"their settings: {have}")
            for k in declared:
                out[str(dataset)][str(name)] = k.check(value, f"{where}: postprocess_knobs.{dataset}")
    return out


def preset_postprocess_knobs(cfg: Any, postprocess: str) -> Dict[str, Any]:
    """The settings of post-process ``postprocess`` that ``cfg``'s protocol preset sets on the composed
    dataset (``postprocess_knobs``); {} without a table entry or a dataset."""
    from .postprocess import get_postprocess

    protocol = _select(cfg, "protocol")
    dataset = _select(cfg, "dataset.name")
    if protocol is None or not hasattr(protocol, "get") or dataset is None:
        return {}
    own = set(get_postprocess(str(postprocess)).settings)
    return {k: v for k, v in check_postprocess_knobs(protocol).get(str(dataset), {}).items() if k in own}


def _get(node: Any, key: str) -> Any:
    try:
        return node.get(key)
    except Exception:
        return None


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (dict, list, str, int, float, bool)):
        return v
    return OmegaConf.to_container(v, resolve=True)


for _name, _fn in (("per_dataset", _per_dataset), ("class_file", _class_file), ("vfm_feature_for", _vfm_feature_for)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
