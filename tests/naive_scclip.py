"""Float64 reference of SC-CLIP (docs/methods.md, "SC-CLIP"), written from its equations with plain
loops and the open_clip model's own modules; nothing here calls proxyclip code.

``layers``: {i: (T, D) tokens entering CLIP block i (0-indexed)}, the last block's included; the
output of block i is ``layers[i + 1]``.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence, Set, Tuple

import torch

BETA, PRIOR_SCALE, EPS, K, CONTAMINATION, NORM_COUNT = 0.4, 3.0, 1e-6, 30, 0.05, 10


def squared_distances(p: torch.Tensor) -> List[List[float]]:
    return [((p - p[i]) ** 2).sum(-1).tolist() for i in range(p.shape[0])]


def lof_values(p: torch.Tensor, k: int = K) -> List[float]:
    """SC-CLIP's LOF of each row of p (N, D): squared distances, the k nearest others, the
    reachability = the point's own k-distance, lrd = k / kd, LOF = mean neighbours' lrd / own lrd."""
    p = p.double()
    n = p.shape[0]
    k = min(k, n - 1)
    dist = squared_distances(p)
    knn = [sorted((j for j in range(n) if j != i), key=lambda j: dist[i][j])[:k] for i in range(n)]
    kd = [max(dist[i][j] for j in knn[i]) for i in range(n)]
    lrd = [k / kd[i] if kd[i] > 0 else math.inf for i in range(n)]
    out = []
    for i in range(n):
        mean = sum(lrd[j] for j in knn[i]) / k
        out.append(mean / lrd[i])  # inf / inf = nan, as in floating point
    return out


def linear_quantile(values: Sequence[float], q: float) -> float:
    """The linear-interpolation quantile, in float32 like SC-CLIP's (exact ties stay ties)."""
    v = sorted(torch.tensor(values, dtype=torch.float32).tolist())
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    a, b = torch.tensor(v[lo]), torch.tensor(v[hi])
    return float(a + torch.tensor(pos - lo, dtype=torch.float32) * (b - a))


def lof_outliers(p: torch.Tensor, k: int = K, contamination: float = CONTAMINATION) -> Set[int]:
    """The tokens whose LOF (as float32) is strictly above the (1 - contamination) linear quantile."""
    lof = torch.tensor(lof_values(p, k), dtype=torch.float32).tolist()
    if any(math.isnan(v) for v in lof):
        return set()
    q = linear_quantile(lof, 1.0 - contamination)
    return {i for i, v in enumerate(lof) if v > q}


def norm_outliers(p: torch.Tensor, count: int = NORM_COUNT) -> Set[int]:
    norms = [float(r.double().norm()) for r in p]
    return set(sorted(range(len(norms)), key=lambda i: -norms[i])[:count])


def repair(f: torch.Tensor, outliers: Set[int], grid: Tuple[int, int]) -> torch.Tensor:
    """Each outlier (row i div gw, column i mod gw) <- mean of its 8-neighbours in the grid that are
    not outliers, read from the unrepaired f; none -> unchanged."""
    gh, gw = grid
    out = f.clone()
    for i in outliers:
        r, c = divmod(i, gw)
        nb = [(r + dr) * gw + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
              if (dr, dc) != (0, 0) and 0 <= r + dr < gh and 0 <= c + dc < gw]
        nb = [j for j in nb if j not in outliers]
        if nb:
            out[i] = sum(f[j] for j in nb) / len(nb)
    return out


def cosine(f: torch.Tensor) -> torch.Tensor:
    """cos_ij = <f_i, f_j> / (|f_i| |f_j|)."""
    f = f.double()
    norms = torch.tensor([float(r.norm()) for r in f], dtype=torch.float64)
    return (f @ f.T) / (norms[:, None] * norms[None, :])


def threshold(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s < BETA, torch.zeros_like(s), s)


def aggregate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(s.shape[0]):
        out[i] = (s[i] @ x) / (float(s[i].sum()) + EPS)
    return out


def prior(s_mid: torch.Tensor) -> torch.Tensor:
    """A_mid row by row: softmax of M_i = 3 (S_mid_i - mean S_mid) over the entries M_ij >= 0."""
    n = s_mid.shape[0]
    mean = float(s_mid.sum()) / (n * n)
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        m = [PRIOR_SCALE * (float(s_mid[i, j]) - mean) for j in range(n)]
        kept = [j for j in range(n) if m[j] >= 0]
        z = sum(math.exp(m[j]) for j in kept)
        for j in kept:
            a[i, j] = math.exp(m[j]) / z
    return a


def last_block_pass(block, tokens: torch.Tensor, a_mid: torch.Tensor) -> torch.Tensor:
    """out_proj(concat_h A_h V_h), A_h = (A_mid + softmax(tau K_h K_h^T)) / 2, from ln_1(tokens)."""
    d = tokens.shape[1]
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    u = block.ln_1(tokens)
    k = u @ w[d:2 * d].T + b[d:2 * d]
    v = u @ w[2 * d:].T + b[2 * d:]
    heads = block.attn.num_heads
    dh = d // heads
    out = torch.zeros_like(tokens)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        kk = torch.softmax(dh ** -0.5 * (k[:, sl] @ k[:, sl].T), dim=-1)
        out[:, sl] = (0.5 * (a_mid + kk)) @ v[:, sl]
    return block.attn.out_proj(out)


def reference(model, layers: Dict[int, torch.Tensor], grid, knobs, prior_from=None, fusion=None,
              find=None) -> Tuple[torch.Tensor, tuple, bool]:
    """Z (N, D) of SC-CLIP for one window; the grid; False (no CLS). ``prior_from`` ("s_pre"),
    ``fusion`` (the blocks whose outputs are summed) and ``find`` (outliers given) exist to build
    the wrong variants the pitfall tests tell apart."""
    blocks = model.visual.transformer.resblocks
    last_i = len(blocks) - 1
    block = copy.deepcopy(blocks[-1]).double()
    x_last = layers[last_i].double()
    patches = x_last[1:]
    if find is not None:
        outliers = set(find)
    elif knobs["outliers"] == "lof":
        outliers = lof_outliers(patches)
    else:
        outliers = norm_outliers(patches)
    x = repair(patches, outliers, grid)
    c = x_last[0]
    s_mid = cosine(repair(layers[knobs["pre_adjust"] + 1].double()[1:], outliers, grid))
    s_pre = threshold(s_mid)
    x = aggregate(x, s_pre)
    with torch.no_grad():
        a_mid = prior(s_pre if prior_from == "s_pre" else s_mid)
        s_post = threshold(cosine(layers[knobs["post_adjust"] + 1].double()[1:]))
        y1 = aggregate(last_block_pass(block, x, a_mid) + knobs["res_cls"] * c, s_post)
        fused_blocks = range(knobs["multi_start"], knobs["multi_end"]) if fusion is None else fusion
        sigma = sum(layers[i + 1].double() for i in fused_blocks)
        y2 = aggregate(last_block_pass(block, sigma[1:], a_mid) + knobs["res_cls"] * sigma[0], s_post)
    return y1 + y2, tuple(grid), False
