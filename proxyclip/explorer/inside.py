"""Inside CLIP, for the explorer: each block's own attention, and a registry of extra per-method views.

Block attention. CLIP block i's attention (``softmax(tau q k^T)``, heads averaged) is recomputed from
the encode's layer part ``clip.blocks.{i}.resid_pre`` (the tokens entering block i; for the last block,
``Encoded.clip_tokens``) with the block's own ln_1 and in_proj, the same computation as the hook point
``clip.blocks.{i}.attn.pattern``. Blocks 0..L-2 are the same for every method (a method changes the
last block only), so this is every method's attention there; at the last block the explorer shows the
method's attention beside CLIP's own.

Extra views (proxyclip/attention_views.py, re-exported here; a light module a method's own module
can import). A method may add panels of its own (e.g. ResCLIP: its RCS attention and its SFR matrix):
``register_view(ExtraView(method, title, hooks, row))``. The decode records ``hooks`` (declared hook
points the method fires through ``x.point``) when that method is shown, and ``row(cache, enc, y, x)``
turns the recorded tensors into the chosen pixel's row ``(row (N,), grid (h, w), patch (r, c))``, or
None. :func:`pattern_view` makes one for a hook that holds an ``(n, h|1, T, T)`` pattern like
``attention.pattern``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..attention_views import EXTRA_VIEWS, ExtraView, extra_views, pattern_view, register_view  # noqa: F401
from ..backbones.blocks import block_pattern
from ..encoded import Encoded
from ..lens import every_part  # noqa: F401  (the parts the block slider reads)
from ..parts import block_of, resid_pre
from ..pipeline import Segmenter


@torch.no_grad()
def block_attention(seg: Segmenter, enc: Encoded, i: int) -> torch.Tensor:
    """CLIP block ``i``'s own attention, heads averaged: (n_windows, 1, T, T), memoized in ``enc.memo``.
    Needs the layer part ``clip.blocks.{i}.resid_pre`` for i < L-1 (``seg.encode(image, keep=...)``)."""
    key = ("explorer.block_attention", int(i))
    if key not in enc.memo:
        last = seg.clip.num_blocks - 1
        tokens = enc.clip_tokens if i == last else enc.layers.get(resid_pre(i))
        if tokens is None:
            raise ValueError(f"block {i}'s attention needs the layer part {resid_pre(i)}, which this Encoded lacks: "
                             f"encode with keep=[{resid_pre(i)!r}]")
        bs, parts = int(seg.cfg.batch_size), []
        for a in range(0, tokens.shape[0], bs):
            x = tokens[a:a + bs].to(seg.device, seg.clip.dtype)
            parts.append(block_pattern(seg.clip.block(i), x).mean(dim=1, keepdim=True).float().cpu())
        enc.memo[key] = torch.cat(parts)
    return enc.memo[key]


def view_hooks(method: str) -> Tuple[str, ...]:
    """The hook points a decode of ``method`` records for its extra views."""
    return tuple(h for v in extra_views(method) for h in v.hooks)


def check_block(seg: Segmenter, i: Optional[int]) -> Optional[int]:
    """A block index for the slider: 0..L-1 (the last one, or None, is kept as None)."""
    if i is None:
        return None
    last = seg.clip.num_blocks - 1
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= last:
        raise ValueError(f"block must be an integer in 0..{last} (0-indexed CLIP blocks), got {i!r}")
    return None if i == last else i


def lacks_parts(seg: Segmenter, enc: Optional[Encoded], block: Optional[int]) -> bool:
    """True when ``block``'s attention needs a layer part that ``enc`` lacks."""
    return (enc is not None and shown_block(seg, block) is not None and resid_pre(block) not in enc.layers)


def lacks_method_parts(seg: Segmenter, enc: Optional[Encoded], spec) -> bool:
    """True when a decode with ``spec`` reads layer parts ``enc`` lacks (a method reading earlier blocks,
    e.g. ResCLIP's ``rcs_layers``, chosen after an encode made for another method)."""
    last = seg.clip.num_blocks - 1  # the last block's input is the Encoded's own clip_tokens
    return enc is not None and any(p not in enc.layers for p in seg.parts_of(spec) if block_of(p) < last)


def shown_block(seg: Segmenter, block: Optional[int]) -> Optional[int]:
    """The block before the last that the panel shows, or None (the last block: e.g. after a switch
    to a CLIP with fewer blocks)."""
    return block if block is not None and block < seg.clip.num_blocks - 1 else None
