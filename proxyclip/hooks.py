"""Named hook points, TransformerLens-style, each declared where it fires.

Every interesting tensor of the pipeline passes through ``hooks.point(name, tensor)``.
Outside a hook context this is the identity. Inside ``HookSet.active(...)`` a hook
function ``fn(tensor, hook) -> tensor | None`` may read the tensor, or return a
replacement of the same shape; a cache may record it.

A module declares the points it fires with :func:`declare_hook` (name, level, shape in words,
a one-line doc, and for encode-time points the ``Encoded`` field a stored encode replays).
The list of names (:func:`hook_names`), the per-window set, the replay of stored encodes and
the README's table (:func:`markdown_table`) all come from the declarations. Adding a hook
point: one ``declare_hook`` next to its ``point(...)`` call, and a test.

Window-level entries of a cache are concatenated over all windows of an image, in window order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

# the stages, in pipeline order (the README's table follows it)
STAGES = ("encode", "last block", "method", "block output", "text", "scores")


@dataclass(frozen=True)
class HookDecl:
    """A declared hook point."""

    name: str
    level: str  # "window": one tensor per batch of windows (n = windows); "image": one per image
    shape: str  # in words, e.g. "(n, C, Hv, Wv)"
    doc: str
    stage: str  # one of STAGES
    replay: Optional[str] = None  # the Encoded field a stored encode replays through this point


HOOKS: Dict[str, HookDecl] = {}


def declare_hook(name: str, level: str, shape: str, doc: str, stage: str, replay: Optional[str] = None) -> str:
    """Declare a hook point (at import time, next to where it fires); returns ``name``."""
    if level not in ("window", "image"):
        raise ValueError(f"hook {name}: level must be 'window' or 'image', got {level!r}")
    if stage not in STAGES:
        raise ValueError(f"hook {name}: stage must be one of {STAGES}, got {stage!r}")
    decl = HookDecl(name, level, shape, doc, stage, replay)
    if name in HOOKS and HOOKS[name] != decl:
        raise ValueError(f"hook {name} declared twice, differently")
    HOOKS[name] = decl
    return name


def declarations() -> List[HookDecl]:
    """Every declared hook point, in pipeline order (stage, then declaration order)."""
    order = {name: i for i, name in enumerate(HOOKS)}
    return sorted(HOOKS.values(), key=lambda d: (STAGES.index(d.stage), order[d.name]))


def hook_names() -> Tuple[str, ...]:
    return tuple(d.name for d in declarations())


def window_hooks() -> frozenset:
    return frozenset(d.name for d in HOOKS.values() if d.level == "window")


def replayed_hooks() -> List[HookDecl]:
    """The encode-time points a stored Encoded replays (its field: ``decl.replay``)."""
    return [d for d in declarations() if d.replay]


def markdown_table() -> str:
    """The README's hook table, from the declarations."""
    rows = ["| name | level | shape | what |", "|---|---|---|---|"]
    rows += [f"| `{d.name}` | {d.level} | {d.shape} | {d.doc} |" for d in declarations()]
    return "\n".join(rows) + "\n"


NameFilter = Union[None, Iterable[str], Callable[[str], bool]]


HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function is told about where it runs."""

    name: str
    window_start: int = 0  # index of the batch's first window (window-level hooks)


def _check_names(names: Iterable[str]) -> List[str]:
    names = list(names)
    unknown = [n for n in names if n not in HOOKS]
    if unknown:
        raise KeyError(f"unknown hook name(s) {unknown}; the hook points are: {', '.join(hook_names())}")
    return names


def select_names(names: NameFilter) -> List[str]:
    """All hook names (None), the given ones (checked), or those a callable ``names(name) -> bool``
    accepts (TransformerLens' ``names_filter``)."""
    if names is None:
        return list(hook_names())
    if callable(names):
        return [n for n in hook_names() if names(n)]
    if isinstance(names, str):
        names = [names]
    return _check_names(names)


class HookSet:
    """The active hooks and caches of one pipeline. Identity when nothing is active."""

    def __init__(self) -> None:
        self._fns: Dict[str, List[HookFn]] = {}
        self._caches: List[tuple[Dict[str, List[torch.Tensor]], frozenset]] = []

    @contextmanager
    def active(self, hooks: Optional[Dict[str, HookFn]] = None, cache: Optional[Dict[str, List[torch.Tensor]]] = None,
               cache_names: NameFilter = None) -> Iterator[None]:
        """Activate ``hooks`` ({name: fn}) and/or record ``cache_names`` (names, or a filter
        ``fn(name) -> bool``; None = all) into ``cache`` lists."""
        hooks = dict(hooks or {})
        _check_names(hooks)
        added = []
        for name, fn in hooks.items():
            if not callable(fn):
                raise TypeError(f"hook for {name!r} must be callable as fn(tensor, hook), got {type(fn).__name__}")
            self._fns.setdefault(name, []).append(fn)
            added.append((name, fn))
        entry = None
        if cache is not None:
            names = frozenset(select_names(cache_names))
            entry = (cache, names)
            self._caches.append(entry)
        try:
            yield
        finally:
            for name, fn in added:
                self._fns[name].remove(fn)
            if entry is not None:
                self._caches.remove(entry)

    def listening(self, name: str) -> bool:
        """True when a hook or a cache is active on ``name`` (the pipeline skips making what no one reads)."""
        return bool(self._fns.get(name)) or any(name in names for _, names in self._caches)

    def point(self, name: str, tensor: torch.Tensor, window_start: int = 0) -> torch.Tensor:
        """Pass ``tensor`` through the hook point ``name``: hooks may replace it, caches record it."""
        if name not in HOOKS:
            raise KeyError(f"hook point {name!r} fires but was never declared (hooks.declare_hook)")
        fns = self._fns.get(name)
        if fns:
            hook = HookPoint(name, window_start)
            for fn in fns:
                out = fn(tensor, hook)
                if out is not None:
                    if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
                        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise ValueError(
                            f"hook on {name!r} must return None or a tensor of shape {tuple(tensor.shape)}, got {got}"
                        )
                    tensor = out.to(dtype=tensor.dtype, device=tensor.device)
        for cache, names in self._caches:
            if name in names:
                cache.setdefault(name, []).append(tensor.detach().cpu())
        return tensor


def finish_cache(raw: Dict[str, List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Window-level entries: concatenate over batches. Image-level: the last value."""
    return {
        name: torch.cat(parts, dim=0) if name in window_hooks() else parts[-1]
        for name, parts in raw.items()
    }

