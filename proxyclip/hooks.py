"""Named hook points, TransformerLens-style.

Every interesting tensor of the pipeline passes through ``hooks.point(name, tensor)``.
Outside a hook context this is the identity. Inside ``HookSet.active(...)`` a hook
function ``fn(tensor, hook) -> tensor | None`` may read the tensor, or return a
replacement of the same shape; a cache may record it.

The names, and what they carry (B = windows in one backbone batch; window-level entries
of a cache are concatenated over all windows of an image, in window order):

    vfm.features              (B, C, Hv, Wv)  VFM patch features, prefix tokens dropped (methods with a VFM)
    clip.last_block_input     (B, 1+gh*gw, D) tokens entering CLIP's last block (what Encoded stores)
    clip.values               (B, D, gh, gw)  value projection of the last block, CLS dropped
    proxy.affinity            (B, N, N)       cosine affinity of VFM tokens, N = Hv*Wv       (proxyclip)
    proxy.affinity_normalized (B, N, N)       (S - beta * mean(S)) * gamma                     (proxyclip)
    proxy.mask                (B, N, N) bool  True where kept (S' >= 0, or the diagonal of an empty row)
    proxy.attention           (B, N, N)       softmax over kept entries, rows sum to 1         (proxyclip)
    attention.pattern         (B, h, T, T)    the attention the method runs: h heads, or 1 when shared;
                                              T = 1 + gh*gw (CLS first), or N for proxyclip
    clip.last_block_output    (B, T, D)       after residual and FFN, before ln_post
    clip.dense                (B, E, h, w)    L2-normalized dense embeddings (CLIP grid; VFM grid for proxyclip)
    text.embeddings           (Q, E)          one row per query name
    scores.window             (B, Q, h, w)    cosine scores of each window at its own size
    scores.image              (Q, H, W)       windows merged, at the original image size
    scores.refined            (Q, H, W)       after the post-process (= scores.image with postprocess=none)

The ``proxy.*`` points fire only for proxyclip. When a stored ``Encoded`` is decoded with hooks,
``vfm.features`` and ``clip.last_block_input`` are replayed from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

HOOK_NAMES: tuple[str, ...] = (
    "vfm.features",
    "clip.last_block_input",
    "clip.values",
    "proxy.affinity",
    "proxy.affinity_normalized",
    "proxy.mask",
    "proxy.attention",
    "attention.pattern",
    "clip.last_block_output",
    "clip.dense",
    "text.embeddings",
    "scores.window",
    "scores.image",
    "scores.refined",
)

# Hooks whose tensors are per window (their cache entries are concatenated over windows).
WINDOW_HOOKS = frozenset(HOOK_NAMES) - {"text.embeddings", "scores.image", "scores.refined"}

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function is told about where it runs."""

    name: str
    window_start: int = 0  # index of the batch's first window (window-level hooks)


def _check_names(names: Iterable[str]) -> List[str]:
    names = list(names)
    unknown = [n for n in names if n not in HOOK_NAMES]
    if unknown:
        raise KeyError(f"unknown hook name(s) {unknown}; the hook points are: {', '.join(HOOK_NAMES)}")
    return names


class HookSet:
    """The active hooks and caches of one pipeline. Identity when nothing is active."""

    def __init__(self) -> None:
        self._fns: Dict[str, List[HookFn]] = {}
        self._caches: List[tuple[Dict[str, List[torch.Tensor]], frozenset]] = []

    @contextmanager
    def active(self, hooks: Optional[Dict[str, HookFn]] = None, cache: Optional[Dict[str, List[torch.Tensor]]] = None,
               cache_names: Optional[Iterable[str]] = None) -> Iterator[None]:
        """Activate ``hooks`` ({name: fn}) and/or record ``cache_names`` into ``cache`` lists."""
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
            names = frozenset(_check_names(HOOK_NAMES if cache_names is None else cache_names))
            entry = (cache, names)
            self._caches.append(entry)
        try:
            yield
        finally:
            for name, fn in added:
                self._fns[name].remove(fn)
            if entry is not None:
                self._caches.remove(entry)

    def point(self, name: str, tensor: torch.Tensor, window_start: int = 0) -> torch.Tensor:
        """Pass ``tensor`` through the hook point ``name``: hooks may replace it, caches record it."""
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
        name: torch.cat(parts, dim=0) if name in WINDOW_HOOKS else parts[-1]
        for name, parts in raw.items()
    }
