"""The explorer's caches of the expensive half: built pipelines per (CLIP, VFM) and encodes per
(pipeline, image), each with CLIP's own last-block attention, both least-recently-used."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch

from ..encoded import Encoded
from ..last_block import BlockInputs
from ..lens import every_part
from ..methods import vanilla_attention
from ..pipeline import Segmenter
from .sources import image_id

Progress = Callable[[str, float], None]


@torch.no_grad()
def clip_own_attention(seg: Segmenter, enc: Encoded) -> torch.Tensor:
    """CLIP's own last-block attention (``methods.vanilla_attention`` on the backbone's q and k),
    heads averaged: ``(n_windows, 1, T, T)``, CLS first, as an ``attention.pattern`` of ``method="clip"``
    (read it with ``viz.pattern_row``). q and k are memoized in ``enc.memo`` as a decode does."""
    bs, parts = int(seg.cfg.batch_size), []
    for start in range(0, len(enc.windows), bs):
        stop = min(start + bs, len(enc.windows))
        x = BlockInputs(seg.clip, enc.clip_tokens[start:stop].to(seg.device), enc.clip_grid, None, enc.memo,
                        (start, stop), lambda name, t: t)
        parts.append(vanilla_attention(x).pattern.mean(dim=1, keepdim=True).float().cpu())
    return torch.cat(parts)


class PipelineCache:
    """Segmenters by (clip, vfm) and Encoded (with CLIP's attention) by (pipeline key, image id).

    ``factory(clip, vfm) -> Segmenter`` builds a missing pipeline; an encode of an image already
    encoded with the same CLIP reuses CLIP's part (only the VFM runs). Counters ``n_builds`` and
    ``n_encodes`` say what was computed; ``last_encode_seconds`` how long the last encode took.
    """

    def __init__(self, factory: Callable[[str, str], Segmenter], max_segmenters: int = 2, max_encoded: int = 8):
        self.factory = factory
        self.max_segmenters, self.max_encoded = max_segmenters, max_encoded
        self.segmenters: "OrderedDict[Tuple[str, str], Segmenter]" = OrderedDict()
        self.encoded: "OrderedDict[Tuple[str, str], Tuple[Encoded, torch.Tensor]]" = OrderedDict()
        self.n_builds = self.n_encodes = 0
        self.last_encode_seconds = float("nan")

    def add(self, clip: str, vfm: str, seg: Segmenter) -> None:
        """An already built pipeline for (clip, vfm): not built again."""
        self.segmenters[(clip, vfm)] = seg

    def find(self, clip: str) -> Optional[Segmenter]:
        """The most recently used pipeline with this CLIP and a VFM (to share its CLIP), or None."""
        return next((s for (c, _), s in reversed(self.segmenters.items()) if c == clip and s.vfm is not None), None)

    def segmenter(self, clip: str, vfm: str, progress: Progress, what: str = "") -> Segmenter:
        key = (clip, vfm)
        if key not in self.segmenters:
            progress(f"building {clip} + {vfm}{what}", 0.0)
            self.segmenters[key] = self.factory(clip, vfm)
            self.n_builds += 1
            while len(self.segmenters) > self.max_segmenters:
                self.segmenters.popitem(last=False)
        self.segmenters.move_to_end(key)
        return self.segmenters[key]

    def encode(self, seg: Segmenter, image: torch.Tensor, progress: Progress, names: Tuple[str, str],
               name: Optional[str] = None) -> Tuple[Encoded, torch.Tensor]:
        """(Encoded, CLIP's own attention) of ``image`` under ``seg``, from the cache when there.
        ``names``: (clip, vfm) names for the progress messages; ``name``: the image's name for
        ``masks=file`` (its file stem)."""
        iid = image_id(image)
        key = (seg.key, iid)
        if key in self.encoded:
            self.encoded.move_to_end(key)
            return self.encoded[key]
        reuse, reused_attention = next(((e, a) for (_, i), (e, a) in reversed(self.encoded.items())
                                        if i == iid and e.clip_key == seg.clip_key), (None, None))
        n_win = len(seg.layout(image)[1])
        what = f"{names[1]} (CLIP reused)" if reuse is not None else f"{names[0]} + {names[1]}"
        progress(f"encoding {n_win} window(s) with {what}", 0.1)
        t0 = time.perf_counter()
        enc = seg.encode(image, reuse=reuse, keep=() if reuse is None else tuple(reuse.layers), image_id=name)
        self.last_encode_seconds = time.perf_counter() - t0
        self.n_encodes += 1
        if reuse is not None and enc.clip_tokens is reuse.clip_tokens:
            attention = reused_attention  # CLIP's part is the same: so is its own attention
        else:
            progress("CLIP's own attention", 0.9)
            attention = clip_own_attention(seg, enc)
        self.encoded[key] = (enc, attention)
        while len(self.encoded) > self.max_encoded:
            self.encoded.popitem(last=False)
        return enc, attention

    def keep_parts(self, seg: Segmenter, image: torch.Tensor, enc: Encoded, progress: Progress,
                   name: Optional[str] = None) -> Encoded:
        """``enc`` encoded again keeping every layer part (blocks 0..L-2; its VFM part reused), in the
        cache in its place: the block slider reads any block from it."""
        progress("encoding CLIP again, keeping every block's tokens", 0.1)
        t0 = time.perf_counter()
        kept = seg.encode(image, reuse=enc, keep=every_part(seg), image_id=name)
        self.last_encode_seconds = time.perf_counter() - t0
        self.n_encodes += 1
        key = (seg.key, image_id(image))
        attention = self.encoded[key][1] if key in self.encoded else clip_own_attention(seg, kept)
        self.encoded[key] = (kept, attention)
        progress("encoded", 1.0)
        return kept
