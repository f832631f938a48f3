"""One VFM forward, every readout: the last few inputs a timm model ran, with what that forward made.

A method reading another readout of the same VFM (CASS: DINO's keys, beside ProxyCLIP's tokens) gets a
Segmenter sharing the model (``proxyclip.build.for_method`` / ``with_vfm``). Its encode of the same
windows would run the same forward again: the tokens readout and the q / k / v of a layer come out of
one forward up to that layer. So each forward a :class:`~proxyclip.backbones.vfm.VfmBackbone` runs with
nobody listening to its blocks leaves here, on the model itself, its padded input, the layer's output
(with the final-norm flag it was read with) and, when the layer has a fused global ``attn.qkv``, that
projection's output. A later call of any backbone on the **same model object** with an equal input
(``torch.equal``), the same layer, position rule, dtype, device and weights (every parameter's in-place
version counter unchanged) reads it from here instead of running the model.

Results are copies (a caller changing them in place cannot change a later read). The memo holds at most
``MEMO_BYTES`` a model (default 256 MiB, oldest first out; 0 switches it off). With a listener on
``vfm.blocks.*`` the model always runs, so the hooks fire; with gradients enabled too (the memo keeps
detached tensors: a graph through the VFM is never cut). Encodes run under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

MEMO_BYTES = 256 * 2 ** 20
_ATTR = "_proxyclip_readout_memo"


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weights_version(model: nn.Module) -> Tuple[int, ...]:
    """Changes when any parameter or buffer of ``model`` is modified in place or replaced."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple(t._version for t in tensors) + tuple(id(t) for t in tensors)


class ReadoutMemo:
    """The memo of one model (module docstring): ``find`` / ``store`` entries keyed by the forward's settings."""

    def __init__(self) -> None:
        self.entries: List[Tuple[Tuple[Any, ...], torch.Tensor, Dict[str, Any]]] = []  # oldest first
        self.hits = 0

    def find(self, key: Tuple[Any, ...], x: torch.Tensor) -> Optional[Dict[str, Any]]:
        for k, stored_x, made in reversed(self.entries):
            if k == key and stored_x.shape == x.shape and torch.equal(stored_x, x):
                self.hits += 1
                return made
        return None

    def store(self, key: Tuple[Any, ...], x: torch.Tensor, made: Dict[str, Any]) -> None:
        made = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in made.items()}
        entry = (key, x.detach().clone(), made)
        if _size(entry) > MEMO_BYTES:
            return
        self.entries.append(entry)
        while sum(_size(e) for e in self.entries) > MEMO_BYTES:
            self.entries.pop(0)


def _size(entry) -> int:
    _, x, made = entry
    return _nbytes(x, *(v for v in made.values() if isinstance(v, torch.Tensor)))


def memo_of(model: nn.Module) -> Optional[ReadoutMemo]:
    """The model's memo (made on first use); None when ``MEMO_BYTES`` is 0."""
    if MEMO_BYTES <= 0:
        return None
    memo = model.__dict__.get(_ATTR)
    if memo is None:
        memo = ReadoutMemo()
        model.__dict__[_ATTR] = memo  # a plain attribute: not a submodule, not in the state dict
    return memo
