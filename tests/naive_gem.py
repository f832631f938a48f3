"""Float64 reference of GEM (docs/methods.md, "GEM"), written from its equations with plain loops
and the open_clip model's own modules; nothing here calls proxyclip code.

``layers``: {i: (T, D) tokens entering CLIP block i (0-indexed)}, the last block's included.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

import torch


def _normalize_rows(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-1, keepdim=True)


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def self_self(z: torch.Tensor, beta: float, iterations: int) -> torch.Tensor:
    """(T, d) of one head -> (T, T): iterate Z <- softmax(beta Zn Zn^T) Zn, then softmax(beta Zn Zn^T)."""
    for _ in range(iterations):
        zn = _normalize_rows(z)
        z = _softmax_rows(beta * (zn @ zn.T)) @ zn
    zn = _normalize_rows(z)
    return _softmax_rows(beta * (zn @ zn.T))


def beta_of(block, tokens: torch.Tensor, temp: float) -> float:
    """Adaptive: the mean over tokens of |ln_1(X)_t| (full width) times d^-1/2; else ``temp``."""
    if temp > 0:
        return float(temp)
    u = block.ln_1(tokens)
    d = tokens.shape[1] // block.attn.num_heads
    return sum(float(r.norm()) for r in u) / u.shape[0] * d ** -0.5


def path_blocks(num_blocks: int, depth: int) -> List[int]:
    """depth wraps resblocks[-i] for i = 1 .. depth-1: the last depth-1 blocks."""
    return sorted(num_blocks - i for i in range(1, depth))


def reference(model, layers: Dict[int, torch.Tensor], grid, knobs, qkv_from_path: bool = False
              ) -> Tuple[torch.Tensor, tuple, bool]:
    """G (T, D) after the path; the grid; True (CLS first). ``qkv_from_path`` builds the wrong
    variant (q, k, v from G) a pitfall test tells apart."""
    blocks = model.visual.transformer.resblocks
    which = path_blocks(len(blocks), knobs["depth"])
    g = layers[which[0]].double().clone()
    with torch.no_grad():
        for i in which:
            block = copy.deepcopy(blocks[i]).double()
            x = g if qkv_from_path else layers[i].double()
            d = x.shape[1]
            w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
            u = block.ln_1(x)
            q, k, v = (u @ w[j * d:(j + 1) * d].T + b[j * d:(j + 1) * d] for j in range(3))
            beta = beta_of(block, x, knobs["temp"])
            heads = block.attn.num_heads
            dh = d // heads
            out = torch.zeros_like(x)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                a = sum(self_self(z[:, sl], beta, knobs["iterations"]) for z in (v, k, q)) / 3
                out[:, sl] = a @ v[:, sl]
            o = block.attn.out_proj(out)
            g = g + getattr(block, "ls_1", torch.nn.Identity())(o)
    return g, tuple(grid), True


def window_scores(maps: torch.Tensor, knobs) -> torch.Tensor:
    """(Q, h, w) cosines -> GEM's own window scores: each query's map min-maxed when normalize."""
    if not knobs["normalize"]:
        return maps
    out = torch.zeros_like(maps)
    for qi in range(maps.shape[0]):
        lo, hi = float(maps[qi].min()), float(maps[qi].max())
        out[qi] = (maps[qi] - lo) / (hi - lo)
    return out
