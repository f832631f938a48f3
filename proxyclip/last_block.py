"""CLIP's last block, taken apart so that a method can replace its attention (docs/methods.md).

X (B, T, D) enters the last block: T = 1 + gh*gw tokens, CLS first (``Encoded.clip_tokens``).
A method (``proxyclip.methods``) returns an :class:`Attention`: a pattern A (B, heads or 1, T', T')
over the T' tokens of some grid. Then, with V the block's values on that grid:

    O = concat_h(A_h V_h) W_o^T + b_o        (out_proj; V resized bilinear when the grid differs)
    Y = X + O  if residual else  O           (X resized the same way)
    Z = Y + mlp(ln_2(Y))  if ffn else  Y     -> hook ``clip.last_block_output``
    F = L2normalize(ln_post(Z) @ proj), CLS dropped                 -> hook ``clip.dense``

When A is shared by all heads and its rows sum to 1, ``out_proj`` is affine and resizing and
mixing are weighted means, so ``out_proj`` runs first, on CLIP's coarser grid: exact, and the
reason a ProxyCLIP decode is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .backbones import ClipBackbone
from .hooks import declare_hook
from .parts import resid_pre
from .proxy import resize_values

VALUES = declare_hook("clip.values", "window", "(n, D, gh, gw)", "value projection of the last block, CLS dropped",
                      "last block")

Grid = Tuple[int, int]


@dataclass
class Attention:
    """What a method computes in place of the last block's attention."""

    pattern: torch.Tensor  # (B, heads or 1, T', T'), float32; 1 = shared by all heads
    grid: Grid  # the grid of the pattern's patch tokens
    cls: bool  # token 0 of the pattern is CLS
    rows_sum_to_one: bool = True  # declared by the method; enables the out_proj-first shortcut


@dataclass
class BlockOutput:
    """A method that runs its own last block: Z (B, T', D) on ``grid``, before ln_post (hook
    ``clip.last_block_output``); the shared head makes the dense embeddings."""

    tokens: torch.Tensor
    grid: Grid
    cls: bool  # token 0 is CLS (dropped by the head)


@dataclass
class Dense:
    """A method's own dense embeddings (B, E, h, w), L2-normalized (hook ``clip.dense``)."""

    embeddings: torch.Tensor


@dataclass
class Scores:
    """A method's own window scores (B, Q, h, w) against ``x.text`` (e.g. with a text-side prior);
    merged and decided like every method's."""

    scores: torch.Tensor


class BlockInputs:
    """One batch of windows entering the last block, with its q, k, v computed on demand.

    ``q()``/``k()`` (B, H, T, d) and the values are memoized per Encoded (``memo``), so decoding
    many methods or hyperparameters from one encode computes them once.
    """

    def __init__(self, clip: ClipBackbone, tokens: torch.Tensor, grid: Grid, vfm_features: Optional[torch.Tensor],
                 memo: Dict[Any, torch.Tensor], memo_key: Tuple[int, int],
                 point: Callable[[str, torch.Tensor], torch.Tensor],
                 layers: Optional[Dict[str, torch.Tensor]] = None, text: Optional[torch.Tensor] = None,
                 pixels: Optional[Callable[[], torch.Tensor]] = None, switches: Optional[Dict[str, bool]] = None,
                 vfm_heads: Optional[int] = None):
        self.clip = clip
        self.tokens = tokens  # (B, 1 + gh*gw, D)
        self.grid = grid  # (gh, gw)
        self.vfm_features = vfm_features  # (B, C, Hv, Wv) or None
        self.vfm_heads = vfm_heads  # heads of the VFM attention its q/k/v features come from (None: tokens / unknown)
        self.point = point  # hook point of this batch: point(name, tensor) -> tensor
        self.text = text  # (Q, E) L2-normalized query embeddings (None when decoding without classes)
        self._layers = layers or {}  # this batch's layer parts, by part name (proxyclip/parts.py)
        self._pixels = pixels
        self.switches = dict(switches or {})  # the decode's last-block switches (residual, ffn), by name
        self._memo = memo
        self._memo_key = memo_key
        self.heads = clip.heads
        self.scale = (tokens.shape[-1] // self.heads) ** -0.5  # tau = d^-1/2

    def layer(self, i: int) -> torch.Tensor:
        """(B, 1 + gh*gw, D) tokens entering CLIP block ``i`` (0-indexed; the last block's = ``tokens``)."""
        if int(i) in (self.clip.num_blocks - 1, -1):
            return self.tokens
        name = resid_pre(i)
        if name not in self._layers:
            raise ValueError(f"the encode part {name} was not kept: declare it in the method's parts, or "
                             f"encode with keep=[{name!r}]")
        return self._layers[name]

    def window_pixels(self) -> torch.Tensor:
        """(B, 3, h, w) this batch's CLIP-normalized windows as CLIP saw them (padding included)."""
        if self._pixels is None:
            raise ValueError("this decode has no window pixels")
        return self._pixels()

    def memoized(self, name: str, compute: Callable[[], Any]) -> Any:
        key = (name,) + self._memo_key
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def q(self) -> torch.Tensor:
        return self.memoized("clip.qk", lambda: self.clip.query_key(self.tokens))[0]

    def k(self) -> torch.Tensor:
        return self.memoized("clip.qk", lambda: self.clip.query_key(self.tokens))[1]

    def patch_values(self) -> torch.Tensor:
        """(B, D, gh, gw) values of the patch tokens, through the ``clip.values`` hook point."""
        v = self.memoized("clip.values", lambda: self.clip.last_block_values(self.tokens, self.grid).float())
        return self.point(VALUES, v)

    def cls_value(self) -> torch.Tensor:
        """(B, 1, D) value of the CLS token."""
        return self.memoized("clip.cls_value", lambda: self.clip.cls_value(self.tokens).float())

    def tokens_on(self, grid: Grid, cls: bool) -> torch.Tensor:
        """X on another patch grid (patch tokens resized bilinear), with or without CLS -> (B, T', D)."""
        x = self.tokens
        if tuple(grid) != tuple(self.grid):
            patches = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)
            patches = resize_values(patches.float(), grid).flatten(2).transpose(1, 2)
            x = torch.cat([x[:, :1].float(), patches], dim=1)
        return x if cls else x[:, 1:]


def mix_heads(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """concat_h(A_h V_h): (B, Hp, T, T) pattern, (B, T, D) values -> (B, T, D). Hp = 1 shares A."""
    b, t, d = values.shape
    hp = pattern.shape[1]
    if hp == 1:
        return pattern[:, 0] @ values
    v = values.view(b, t, hp, d // hp).transpose(1, 2)  # (B, H, T, d)
    return (pattern @ v).transpose(1, 2).reshape(b, t, d)


def run_last_block(x: BlockInputs, att: Attention, residual: bool, ffn: bool, shortcut: bool = True) -> torch.Tensor:
    """Apply ``att`` to the values, then out_proj, residual and FFN -> Z (B, T', D).

    ``shortcut`` (out_proj first) is taken only when ``att`` allows it exactly.
    """
    clip = x.clip
    shortcut = shortcut and att.pattern.shape[1] == 1 and att.rows_sum_to_one
    values = x.patch_values()
    if shortcut:
        values = clip.out_proj_map(values)
    values = resize_values(values, att.grid)
    v = values.flatten(2).transpose(1, 2)  # (B, N', D)
    if att.cls:
        cls_v = x.cls_value()
        v = torch.cat([clip.out_proj(cls_v).to(v.dtype) if shortcut else cls_v.to(v.dtype), v], dim=1)
    out = mix_heads(att.pattern, v.to(att.pattern.dtype))
    if not shortcut:
        out = clip.out_proj(out).float()
    skip = x.tokens_on(att.grid, att.cls) if residual else None
    return clip.residual_and_ffn(out, skip, ffn)


def dense_from_block_output(clip: ClipBackbone, z: torch.Tensor, att: Attention) -> torch.Tensor:
    """Z (B, T', D) -> (B, E, h, w) L2-normalized dense embeddings on ``att.grid``, CLS dropped."""
    if att.cls:
        z = z[:, 1:]
    dense = F.normalize(clip.head(z).float(), dim=-1)
    return dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], *att.grid)
