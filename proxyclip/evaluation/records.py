"""The ``metrics.json`` records ``proxyclip-summary`` reads, and what tells their rows apart.

A record's fields are the flat fields of its run identity (proxyclip/specs.py): its
``EncodeSpec`` (``clip.name``, ``vfm.norm``, ``weights.source``, ``protocol.crop``, ``precision``,
...), its ``DecodeSpec`` (``method``, each knob by its bare name, ``postprocess``,
``postprocess.<setting>``, ``logit_scale``, ``prob_thd``, ``classes``) and its dataset selection
(``limit``, ``limit_seed``, ``samples``, ...; ``dataset`` itself is a table's column).

A row is every field except the per-dataset ones (:data:`PER_DATASET`), which vary by design
between the columns of one row; for those the row uses the difference from the dataset's own
shipped protocol (``eval`` composed with ``dataset=<name>``, the record's ``experiment`` and its
``protocol`` preset):
equal -> :data:`DEFAULT`, else the value; so are the method knobs that preset sets per dataset
(:func:`preset_knobs`, compared with the preset's value for the record's method) and the post-process
settings it sets per dataset (``postprocess_knobs``). ``samples`` / ``num_samples``, which no config
states, are compared with the most common value among the records of that dataset and subset.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..specs import GEOMETRY, DecodeSpec, EncodeSpec, flatten


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


DEFAULT = _Marker("default")  # a per-dataset field at its dataset's shipped value
ABSENT = _Marker("-")  # a field this record does not have (e.g. beta of sclip)

# the fields that vary by design between the datasets (columns) of one row
PER_DATASET: Tuple[str, ...] = tuple(f"protocol.{k}" for k in GEOMETRY) + (
    "prob_thd", "logit_scale", "area_thd", "classes", "samples", "num_samples", "reduce_zero_label", "ignore_index",
    "classnames")
FROM_RECORDS = ("samples", "num_samples")  # no config states them: compared among the records
COLUMN_FIELD = "dataset"


# ---------------------------------------------------------------------------------------------- reading
def collect(paths: Iterable[Path]) -> List[dict]:
    """Every ``metrics.json`` below ``paths`` (files or folders), oldest first, each with its
    flat fields under ``"_fields"`` (a record without a run identity is refused)."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(p.rglob("metrics.json"))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (give proxyclip-eval run or multirun folders)")
    records = []
    for f in sorted(set(files), key=lambda q: (q.stat().st_mtime, str(q))):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not a metrics.json written by proxyclip-eval ({e})") from e
        if not isinstance(r, dict) or "dataset" not in r or "mIoU" not in r:
            raise ValueError(f"{f}: missing 'dataset' or 'mIoU'; not a metrics.json written by proxyclip-eval")
        r["_path"] = str(f)
        fields_of(r)
        records.append(r)
    return records


def _where(r: Mapping[str, Any]) -> str:
    return r.get("_path") or f"the {r.get('dataset', '?')} record"


def fields_of(r: dict) -> Dict[str, Any]:
    """The flat fields of a record's encode, decode and selection (cached in ``r["_fields"]``)."""
    if "_fields" in r:
        return r["_fields"]
    missing = [k for k in ("encode", "decode", "selection") if not isinstance(r.get(k), Mapping)]
    if missing:
        raise ValueError(f"{_where(r)}: no {', '.join(repr(k) for k in missing)} run identity: written by an older "
                         "proxyclip-eval; rerun it (the summary tells rows apart by the run's specs)")
    try:
        enc, dec = encode_spec(r["encode"]), decode_spec(r["decode"])
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{_where(r)}: its encode/decode record does not fit this version's specs ({e})") from e
    out = {**enc.flat(), **dec.flat()}
    for k, v in flatten(r["selection"]).items():
        if k != COLUMN_FIELD:
            out[f"selection.{k}" if k in out else k] = v
    r["_fields"] = {k: freeze(v) for k, v in out.items()}
    return r["_fields"]


def encode_spec(rec: Mapping[str, Any]) -> EncodeSpec:
    """An ``EncodeSpec`` back from its ``record()`` (refused if the record has fields the spec lacks)."""
    spec = EncodeSpec.from_record(rec)
    _same(spec.record(), rec)
    return spec


def decode_spec(rec: Mapping[str, Any]) -> DecodeSpec:
    """A ``DecodeSpec`` back from its ``record()``."""
    spec = DecodeSpec.from_record(rec)
    _same(spec.record(), rec)
    return spec


def _same(made: Mapping[str, Any], rec: Mapping[str, Any]) -> None:
    extra = sorted(set(flatten(rec)) - set(flatten(made)))
    if extra:
        raise ValueError(f"unknown field(s) {extra}")


def freeze(v: Any) -> Any:
    """A hashable copy: lists -> tuples, dicts -> sorted item tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def field_names(records: Sequence[dict]) -> List[str]:
    """Every flat field present in ``records``, in the specs' order."""
    return list(dict.fromkeys(k for r in records for k in fields_of(r)))


def axis_value(fields: Mapping[str, Any], name: str) -> Any:
    """A record's value of a pivot axis (``vfm.name`` of a run without a VFM: ``none``)."""
    if name not in fields and name.endswith(".name") and name[:-5] in fields:
        return fields[name[:-5]]
    return fields.get(name, ABSENT)


def resolve_field(name: str, records: Sequence[dict]) -> str:
    """A field by its flat name or an alias (``method.beta`` -> ``beta``, ``vfm`` -> ``vfm.name``,
    ``postprocess.name`` -> ``postprocess``); unknown -> one error listing the fields present."""
    if name == COLUMN_FIELD:
        raise ValueError("the dataset is not a pivot field: every pivot is one grid a dataset, plus their mean")
    names = field_names(records) + [COLUMN_FIELD]
    candidates = [f"{name}.name", name, name.split(".", 1)[-1] if name.startswith("method.") else name,
                  name[:-len(".name")] if name.endswith(".name") else name]
    for c in candidates:
        if c in names and c != COLUMN_FIELD:
            return c
    raise ValueError(f"unknown field {name!r}: the records have {', '.join(n for n in names if n != COLUMN_FIELD)}")


# ---------------------------------------------------------------------------------------------- row identity
def base_overrides(dataset: str, experiment: Optional[str], protocol: Optional[str] = None) -> Tuple[str, ...]:
    """``dataset=<name>`` and, when conf/experiment has it, ``experiment=<e>``; when conf/protocol
    has it, ``protocol=<p>``."""
    from ..config import CONF_DIR

    with_experiment = experiment and (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file()
    with_protocol = protocol and (CONF_DIR / "protocol" / f"{protocol}.yaml").is_file()
    return ((f"dataset={dataset}",) + ((f"experiment={experiment}",) if with_experiment else ())
            + ((f"protocol={protocol}",) if with_protocol else ()))


@functools.lru_cache(maxsize=None)
def preset_knobs(protocol: Optional[str], method: Optional[str]) -> Tuple[str, ...]:
    """The method knobs protocol preset ``protocol`` sets per dataset for ``method`` (the knob
    names of its ``method_knobs`` table, conf/protocol/<protocol>.yaml): per-dataset fields of
    that method's rows, like the protocol's own; () for none."""
    from omegaconf import OmegaConf

    from ..config import CONF_DIR

    f = CONF_DIR / "protocol" / f"{protocol}.yaml"
    if not protocol or not method or not f.is_file():
        return ()
    raw = OmegaConf.to_container(OmegaConf.load(f))
    # its per-dataset post-process settings (postprocess_knobs), by their field names postprocess.<setting>
    names = {f"postprocess.{k}" for row in (raw.get("postprocess_knobs") or {}).values() for k in (row or {})}
    if str(method) in [str(m) for m in raw.get("method_knobs_for") or [raw.get("name", protocol)]]:
        names |= {str(k) for row in (raw.get("method_knobs") or {}).values() for k in (row or {})}
    return tuple(sorted(names))


def record_overrides(r: Mapping[str, Any]) -> Tuple[str, ...]:
    """:func:`base_overrides` of a record (its dataset, experiment and protocol preset)."""
    return base_overrides(r["dataset"], r.get("experiment"), r.get("protocol"))


@functools.lru_cache(maxsize=None)
def shipped(dataset: str, experiment: Optional[str] = None, protocol: Optional[str] = None) -> Dict[str, Any]:
    """The per-dataset fields of ``eval`` composed with ``dataset=<name>`` (and ``experiment=<e>``,
    ``protocol=<p>`` when conf/ has them); {} for a dataset without a conf/dataset YAML. Cached."""
    from ..config import CONF_DIR, compose_config
    from ..data import read_class_lines
    from ..specs import classes_digest

    if not (CONF_DIR / "dataset" / f"{dataset}.yaml").is_file():
        return {}
    try:
        full = config_fields(base_overrides(dataset, experiment, protocol))
        return {k: v for k, v in full.items() if k in PER_DATASET}
    except Exception:  # e.g. a class file that depends on the dataset's root (custom): what can be read
        pass
    try:
        cfg = compose_config("eval", list(base_overrides(dataset, experiment, protocol)))
    except Exception:  # a YAML that does not compose: compared by the raw values
        return {}
    out: Dict[str, Any] = {f"protocol.{k}": None if cfg.protocol[k] is None else int(cfg.protocol[k]) for k in GEOMETRY}
    d = cfg.dataset
    out.update(prob_thd=float(cfg.protocol.prob_thd), reduce_zero_label=bool(d.reduce_zero_label),
               ignore_index=int(d.ignore_index))
    try:
        lines = read_class_lines(str(d.classnames), d.background)
        out.update(classnames=str(d.classnames), classes=classes_digest(lines))
    except Exception:
        pass
    return out


@functools.lru_cache(maxsize=None)
def config_fields(overrides: Tuple[str, ...]) -> Dict[str, Any]:
    """The flat fields of the specs ``eval`` composed with ``overrides`` runs (cached): its
    EncodeSpec (as configured: no fallback to random weights), its DecodeSpec with the dataset's
    class lines, and its selection (``limit``, ``limit_seed``, the dataset's settings)."""
    from omegaconf import OmegaConf

    from ..config import compose_config
    from ..data import read_class_lines
    from ..methods import get_method
    from ..resolve import decode_spec as resolve_decode

    cfg = compose_config("eval", list(overrides))
    enc = EncodeSpec.from_config(cfg, random_weights=False, uses_vfm=get_method(str(cfg.method.name)).needs_vfm)
    d = cfg.dataset
    background = OmegaConf.to_container(d.background) if d.background is not None else None
    dec = resolve_decode(cfg, classes=read_class_lines(str(d.classnames), background))
    sel = {"limit": cfg.limit, "limit_seed": cfg.limit_seed, "reduce_zero_label": bool(d.reduce_zero_label),
           "ignore_index": int(d.ignore_index), "classnames": str(d.classnames), "background": background}
    return {k: freeze(v) for k, v in {**enc.flat(), **dec.flat(), **sel}.items()}


def defaults(r: dict) -> Dict[str, Any]:
    """The fields a run of ``r``'s dataset and preset gets by default (``eval`` composed with them;
    a method's knobs and logit scale: with its own method too; {} if that does not compose). A
    label leaves out a value equal to its default."""
    base = record_overrides(r)
    try:
        out = dict(config_fields(base))
    except Exception:  # a dataset without a YAML
        return {}
    method = fields_of(r).get("method")
    if method != out.get("method"):
        try:
            own = config_fields(base + (f"method={method}",))
        except Exception:  # an unregistered method
            return out
        # and what the method decides of the encode: the layer parts it reads, the VFM readout (CASS: k)
        knobs = set(r["decode"]["knobs"]) | {"logit_scale", "parts", "vfm.feature"}
        out.update({k: v for k, v in own.items() if k in knobs})
    return out


def identities(records: Sequence[dict]) -> List[Dict[str, Any]]:
    """Each record's row identity: its fields, per-dataset ones as :data:`DEFAULT` where they equal
    the dataset's shipped value (or, for ``samples``/``num_samples``, the most common value among
    the records of the same dataset and subset)."""
    def subset(r: dict) -> tuple:
        f = fields_of(r)
        return r["dataset"], f.get("limit"), f.get("limit_seed")

    common: Dict[tuple, Dict[str, Any]] = {}
    for r in records:
        for k in FROM_RECORDS:
            common.setdefault(subset(r), {}).setdefault(k, Counter())[fields_of(r).get(k, ABSENT)] += 1
    out = []
    for r in records:
        ref = dict(shipped(r["dataset"], r.get("experiment"), r.get("protocol")))
        if ref:  # a dataset with a YAML: the subset's most common sample list is its own
            ref.update({k: c.most_common(1)[0][0] for k, c in common[subset(r)].items()})
        method = fields_of(r).get("method")
        knobs = preset_knobs(r.get("protocol"), method)  # the preset's per-dataset method knobs
        if knobs and ref:
            try:
                post = fields_of(r).get("postprocess")  # its post-process, for the preset's settings of it
                own = config_fields(record_overrides(r) + (f"method={method}",) + (
                    (f"postprocess={post}",) if any(k.startswith("postprocess.") for k in knobs) else ()))
                ref.update({k: own[k] for k in knobs if k in own})
            except Exception:  # the method's YAML does not compose: compared by the raw values
                knobs = ()
        ident = {}
        for k, v in fields_of(r).items():
            ident[k] = DEFAULT if (k in PER_DATASET or k in knobs) and k in ref and ref[k] == v else v
        out.append(ident)
    return out


def row_key(ident: Mapping[str, Any], drop: Sequence[str] = ()) -> tuple:
    return tuple(sorted((k, v) for k, v in ident.items() if k not in drop))


def knob_names(records: Sequence[dict]) -> set:
    """The decode knobs (bare-named fields: ``residual``, ``beta``, ...) any of ``records`` has."""
    return {k for r in records for k in r["decode"]["knobs"]}


def group_of(name: str, knobs: Iterable[str] = ()) -> str:
    """What a field belongs to: ``vfm.norm``, ``vfm.name``, ``vfm`` -> ``vfm``; a knob, ``logit_scale``
    or ``method`` -> ``method``; else the field itself."""
    if "." in name:
        return name.split(".", 1)[0]
    if name == "limit_seed":
        return "limit"
    return "method" if name in knobs or name in ("method", "logit_scale") else name


# ---------------------------------------------------------------------------------------------- labels
def follows(f: str, g: str, idents: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``f``'s value is a function of ``g``'s among ``idents``."""
    seen: Dict[Any, Any] = {}
    return all(seen.setdefault(i.get(g, ABSENT), i.get(f, ABSENT)) == i.get(f, ABSENT) for i in idents)


def is_head(name: str, knobs: Iterable[str] = ()) -> bool:
    """A field that names its group's choice (``vfm.name``, ``weights.source``, ``method``, ``postprocess``)."""
    g = group_of(name, knobs)
    return name in (g, f"{g}.name", f"{g}.source")


def telling_fields(idents: Sequence[Mapping[str, Any]], shown: Sequence[str], order: Sequence[str],
                   knobs: Iterable[str] = ()) -> List[str]:
    """The fields whose values differ among ``idents`` (the rows of one table), in ``order``: not
    the ``shown`` ones (a column of their own), nor a field that follows from a shown one or from
    its group's head (``vfm.timm_name`` from ``vfm.name``, a method's knobs from ``method``, a
    post-process's settings from its name, ``weights.seed`` from ``weights.source``); a field kept
    brings its group's head along (``postprocess.dilations``: ``postprocess``)."""
    knobs = set(knobs)
    names = list(dict.fromkeys(list(order) + sorted({k for i in idents for k in i} - set(order))))
    telling = [k for k in names if len({i.get(k, ABSENT) for i in idents}) > 1 and k not in shown]
    heads = list(shown) + sorted((k for k in telling if is_head(k, knobs)), key=lambda k: not k.endswith(".name"))
    keep = list(telling)
    for h in heads:
        if h in shown or h in keep:
            keep = [f for f in keep if f == h or group_of(f, knobs) != group_of(h, knobs) or not follows(f, h, idents)]
    present = {k for i in idents for k in i}
    for f in list(keep):  # a setting brings its group's head along (postprocess.dilations: postprocess)
        g = group_of(f, knobs)
        head = next((h for h in (f"{g}.name", g, f"{g}.source") if h in present and h != f), None)
        if "." in f and head and head not in keep and head not in shown:
            keep.insert(keep.index(f), head)
    return keep


def label(ident: Mapping[str, Any], names: Sequence[str], default: Mapping[str, Any] = {}) -> str:
    """``vfm.norm=off postprocess=pamr postprocess.dilations=[8,16]``: the named fields this row has
    (a per-dataset field at its default, a value equal to ``default``'s and an unset one are left out;
    ``vfm.name`` of a run without a VFM reads ``vfm=none``)."""
    parts = []
    for k in names:
        v = ident.get(k, ABSENT)
        if v is ABSENT and k.endswith(".name") and k[:-5] in ident:
            k, v = k[:-5], ident[k[:-5]]
        if v is ABSENT or v is DEFAULT or (v is None and k not in PER_DATASET) or default.get(k, ABSENT) == v:
            continue
        parts.append(f"{k}={fmt(v)}")
    return " ".join(parts)


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.1f}" if v.is_integer() else f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(fmt(x) for x in v) + "]"
    return "none" if v is None else str(v)


def order_key(value: Any, preferred: Sequence[Any] = ()) -> tuple:
    """Preferred values first (in their order), then numbers ascending, then the rest by name."""
    if value in preferred:
        return (0, preferred.index(value), 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, 0, value, "")
    return (2, 0, 0, fmt(value))
