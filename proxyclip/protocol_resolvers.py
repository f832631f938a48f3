"""The OmegaConf resolvers of the protocol presets (conf/protocol/*.yaml, docs/protocol.md):
``${per_dataset:<field>}`` reads a preset's table for the composed dataset, ``${class_file:<own>}``
a dataset's class file. Registered on import (by proxyclip.config)."""

from __future__ import annotations

from typing import Any

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


for _name, _fn in (("per_dataset", _per_dataset), ("class_file", _class_file)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
