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

A *family* is declared once with ``{i}`` in its name, e.g. ``clip.blocks.{i}.attn.pattern``: it
fires as ``clip.blocks.0.attn.pattern``, ``clip.blocks.1.attn.pattern``, ... (one per block). The
names, the README's table and ``hook_names()`` list the family once, by its template; hooks and
caches take either a member (``clip.blocks.3.attn.pattern``: that block) or the template (every
block); a cache records members by their own names.

Window-level entries of a cache are concatenated over all windows of an image, in window order.
"""

from __future__ import annotations

import re
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
FAMILY = "{i}"  # the index placeholder of a family's name
_FAMILIES: Dict[str, "re.Pattern[str]"] = {}  # template -> regex of its members
_MEMBERS: Dict[str, Optional[HookDecl]] = {}  # resolved names (members and plain names)


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
    if FAMILY in name:
        _FAMILIES[name] = re.compile("^" + re.escape(name).replace(re.escape(FAMILY), r"(\d+)") + "$")
    _MEMBERS.clear()
    return name


def member(template: str, i: int) -> str:
    """The name block ``i`` of a family fires under: ``member("clip.blocks.{i}.resid_pre", 3)``."""
    return template.replace(FAMILY, str(int(i)))


def decl_of(name: str) -> Optional[HookDecl]:
    """The declaration of a plain name, a family's template or a family member; None if undeclared."""
    if name in _MEMBERS:
        decl = _MEMBERS[name]
        if decl is None or HOOKS.get(decl.name) is decl:  # still declared
            return decl
    decl = HOOKS.get(name)
    if decl is None:
        decl = next((HOOKS[t] for t, rx in _FAMILIES.items() if HOOKS.get(t) and rx.match(name)), None)
    _MEMBERS[name] = decl
    return decl


def family_of(name: str) -> str:
    """The declared name of ``name``: its family's template for a member, else ``name`` itself."""
    decl = decl_of(name)
    return name if decl is None else decl.name


def undeclare(name: str) -> None:
    """Forget a declaration (tests that declare points of their own)."""
    HOOKS.pop(name, None)
    _FAMILIES.pop(name, None)
    _MEMBERS.clear()


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
    unknown = [n for n in names if decl_of(n) is None]
    if unknown:
        raise KeyError(f"unknown hook name(s) {unknown}; the hook points are: {', '.join(hook_names())}")
    return names


def select_names(names: NameFilter) -> List[str]:
    """All declared names (None), the given ones (checked), or the declared ones a callable
    ``names(name) -> bool`` accepts (TransformerLens' ``names_filter``)."""
    if names is None:
        return list(hook_names())
    if callable(names):
        return [n for n in hook_names() if names(n)]
    if isinstance(names, str):
        names = [names]
    return _check_names(names)


class NameMatch:
    """Which fired names a cache records: all (None), the given names (a family's template takes
    every member), or those a callable ``names(name) -> bool`` accepts, asked with the name that
    fires (a member's own name, e.g. ``clip.blocks.3.attn.q``)."""

    def __init__(self, names: NameFilter):
        self._all, self._fn, self._names = names is None, names if callable(names) else None, frozenset()
        if not self._all and self._fn is None:
            self._names = frozenset(_check_names([names] if isinstance(names, str) else names))
        self._memo: Dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        hit = self._memo.get(name)
        if hit is None:
            hit = self._all or (bool(self._fn(name)) if self._fn is not None
                                else name in self._names or family_of(name) in self._names)
            self._memo[name] = hit
        return hit

    def explicit(self) -> frozenset:
        """The names given as a list (empty for None or a callable)."""
        return self._names


class HookSet:
    """The active hooks and caches of one pipeline. Identity when nothing is active."""

    def __init__(self) -> None:
        self._fns: Dict[str, List[HookFn]] = {}
        self._caches: List[tuple[Dict[str, List[torch.Tensor]], NameMatch]] = []

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
            entry = (cache, NameMatch(cache_names))
            self._caches.append(entry)
        try:
            yield
        finally:
            for name, fn in added:
                self._fns[name].remove(fn)
            if entry is not None:
                self._caches.remove(entry)

    @property
    def idle(self) -> bool:
        """True when no hook and no cache is active."""
        return not self._caches and not any(self._fns.values())

    def _fns_for(self, name: str) -> List[HookFn]:
        fns = self._fns.get(name) or []
        family = family_of(name)
        return fns + (self._fns.get(family) or []) if family != name else fns

    def listening(self, name: str) -> bool:
        """True when a hook or a cache is active on ``name`` (the pipeline skips making what no one reads)."""
        return bool(self._fns_for(name)) or any(wants(name) for _, wants in self._caches)

    def asked_for(self) -> frozenset:
        """The names hooks are set on and caches were given as a list (not None / a callable)."""
        return frozenset(n for n, fns in self._fns.items() if fns).union(*(w.explicit() for _, w in self._caches))

    def point(self, name: str, tensor: torch.Tensor, window_start: int = 0) -> torch.Tensor:
        """Pass ``tensor`` through the hook point ``name``: hooks may replace it, caches record it."""
        if decl_of(name) is None:
            raise KeyError(f"hook point {name!r} fires but was never declared (hooks.declare_hook)")
        fns = self._fns_for(name)
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
        for cache, wants in self._caches:
            if wants(name):
                cache.setdefault(name, []).append(tensor.detach().cpu())
        return tensor


def finish_cache(raw: Dict[str, List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Window-level entries: concatenate over batches. Image-level: the last value."""
    return {
        name: torch.cat(parts, dim=0) if decl_of(name).level == "window" else parts[-1]
        for name, parts in raw.items()
    }

