"""Layer parts: what a method reads from the encode besides the tokens entering the last block.

A layer part is named like the hook point it comes from, ``clip.blocks.{i}.resid_pre``: the
tokens (n_windows, 1 + gh·gw, D) entering CLIP block ``i`` (0-indexed like open_clip's
``visual.transformer.resblocks[i]``; block i's output is block i+1's ``resid_pre``). The tokens
entering the last block are always kept (``Encoded.clip_tokens``); every other block's are kept
only when asked for: by the configured method (``Method.parts``, from its knob values), by an
evaluation's decodes, or by ``Segmenter.encode(image, keep=[...])``.

A part depends on exactly what the CLIP part depends on (``EncodeSpec.clip_key``), so its key is
``<clip_key>/<part name>``. Per window a ViT-B/16 part at 224 px is 197 x 768 float32 = 0.61 MB
(336 px: 1.36 MB, 448 px: 2.41 MB); ``encoded_size`` reports an Encoded's MB per window.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

RESID_PRE = "clip.blocks.{}.resid_pre"
_PART = re.compile(r"^clip\.blocks\.(\d+)\.resid_pre$")


def resid_pre(i: int) -> str:
    """The part name of the tokens entering block ``i`` (0-indexed)."""
    return RESID_PRE.format(int(i))


def block_of(part: str) -> int:
    """``clip.blocks.{i}.resid_pre`` -> i; anything else is an error naming the accepted form."""
    m = _PART.match(str(part))
    if m is None:
        raise ValueError(f"unknown encode part {part!r}: parts are named clip.blocks.<i>.resid_pre "
                         "(the tokens entering CLIP block i, 0-indexed)")
    return int(m.group(1))


def check_parts(parts: Iterable[str], layers: int) -> Tuple[str, ...]:
    """The sorted, de-duplicated parts a CLIP with ``layers`` blocks can make (``resid_pre`` of the
    last block is ``Encoded.clip_tokens`` and is dropped here); an index out of range is an error."""
    blocks = set()
    for p in parts:
        i = block_of(p)
        if not 0 <= i < layers:
            raise ValueError(f"encode part {p}: block {i} is out of range, this CLIP has blocks 0..{layers - 1}")
        if i < layers - 1:
            blocks.add(i)
    return tuple(resid_pre(i) for i in sorted(blocks))


def check_block_indices(name: str, values: Sequence[int], layers: int, last: bool = True) -> Tuple[int, ...]:
    """A knob listing CLIP blocks (``name``, 0-indexed): every index in 0..L-1 (0..L-2 when the
    last block is not allowed); one error line naming the knob otherwise."""
    top = layers - 1 if last else layers - 2
    out = tuple(int(v) for v in values)
    bad = [v for v in out if not 0 <= v <= top]
    if bad:
        raise ValueError(f"{name}={list(out)}: block {bad[0]} is out of range; this CLIP has blocks 0..{layers - 1} "
                         f"(0-indexed{'' if last else ', the last one excluded'})")
    return out


def method_parts(method: Any, knobs: Mapping[str, Any], layers: Optional[int] = None) -> Tuple[str, ...]:
    """The parts ``method`` reads with these knob values (``Method.parts(**its knobs)``).

    With the CLIP's number of blocks ``layers`` (when known), the method's own ``check`` of the
    values runs first, and a parts function with a ``layers`` parameter also gets that count: to
    name blocks from the end (GEM's ``depth``) and to refuse a knob's block index out of range
    with an error naming the knob (:func:`check_block_indices`)."""
    if layers is not None and getattr(method, "check", None) is not None:
        method.check(knobs, layers)
    if method.parts is None:
        return ()
    kw = {k: knobs[k] for k in method.knob_names}
    if layers is not None and "layers" in inspect.signature(method.parts).parameters:
        kw["layers"] = int(layers)
    return tuple(method.parts(**kw))


def missing_parts(have: Mapping[str, Any], need: Iterable[str], layers: int) -> Tuple[str, ...]:
    """The parts of ``need`` that ``have`` (an Encoded's ``layers``) lacks."""
    return tuple(p for p in check_parts(need, layers) if p not in have)


def encoded_size(enc: Any) -> Dict[str, float]:
    """MB per window of each stored part of an Encoded (float32 as stored)."""
    n = max(1, len(enc.windows))
    out = {"clip.last_block_input": enc.clip_tokens.numel() * enc.clip_tokens.element_size() / n / 1e6}
    if enc.vfm_features is not None:
        out["vfm.features"] = enc.vfm_features.numel() * enc.vfm_features.element_size() / n / 1e6
    for name, t in enc.layers.items():
        out[name] = t.numel() * t.element_size() / n / 1e6
    out["total"] = sum(out.values())
    return out


def describe_size(enc: Any) -> str:
    """One line: an Encoded's MB per window, in total and by part (the layer parts summed)."""
    size = encoded_size(enc)
    layers = [v for k, v in size.items() if k in enc.layers]
    bits = [f"clip.last_block_input {size['clip.last_block_input']:.2f}"]
    if layers:
        bits.append(f"{len(layers)} layer part{'s' if len(layers) > 1 else ''} {sum(layers):.2f}")
    if "vfm.features" in size:
        bits.append(f"vfm.features {size['vfm.features']:.2f}")
    return f"{size['total']:.2f} MB a window ({', '.join(bits)})"
