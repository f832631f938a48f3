"""A float64 reference of ResCLIP (docs/methods.md, "ResCLIP"), written from its equations with the
open_clip model's own modules, per head and per row, plain loops: nothing here calls proxyclip.

``reference(...)`` runs one window: RCS from the kept blocks' tokens, SFR's pass 1 (last block,
head, cosines, bilinear to the window, PAMR, softmax(40 s), labels, patch mode, label matrix, path
check, 1-D blur, normalization, fp16), pass 2. ``variant`` moves one step to a wrong place, so a
test can show that the right place matters.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_DOUBLE: Dict[int, torch.nn.Module] = {}


def double_visual(model) -> torch.nn.Module:
    """A float64 copy of ``model.visual`` (made once per model)."""
    if id(model) not in _DOUBLE:
        _DOUBLE[id(model)] = copy.deepcopy(model.visual).double()
    return _DOUBLE[id(model)]


def qkv(block, tokens: torch.Tensor):
    """q, k, v (T, D) of ``block`` from the tokens entering it: in_proj(ln_1(tokens))."""
    d = tokens.shape[1]
    u = block.ln_1(tokens.double())
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    return [u @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3)]


def row_softmax(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def omega(grid, std: float) -> torch.Tensor:
    """NACLIP's prior (T, T): exp(-|p_i - p_j|^2 / (2 std^2)) between patches, 0 on CLS."""
    n = grid[0] * grid[1]
    out = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dy, dx = i // grid[1] - j // grid[1], i % grid[1] - j % grid[1]
            out[i + 1, j + 1] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
    return out


def pamr64(scores: torch.Tensor, guide: torch.Tensor, steps: int, dilations: Sequence[int]) -> torch.Tensor:
    """PAMR in float64 with clamped neighbour coordinates (= replicate padding)."""
    q, h, w = scores.shape
    img = guide.double()
    ys, xs = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None].expand(h, w)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    idx = [((ys + dy * d).clamp(0, h - 1), (xs + dx * d).clamp(0, w - 1)) for d in dilations for dy, dx in offsets]
    stencil = []
    for di in range(len(dilations)):
        stencil.append(img)
        stencil += [img[:, a, b] for a, b in idx[8 * di:8 * di + 8]]
    stencil = torch.stack(stencil)  # (9 |D|, C, H, W)
    mean = stencil.mean(0)
    sigma = torch.sqrt(((stencil - mean) ** 2).sum(0) / (stencil.shape[0] - 1))
    logits = torch.stack([(-(img - img[:, a, b]).abs() / (1e-8 + 0.1 * sigma)).mean(0) for a, b in idx])
    alpha = torch.softmax(logits, dim=0)
    m = scores.double()
    for _ in range(steps):
        m = sum(alpha[j] * m[:, a, b] for j, (a, b) in enumerate(idx))
    return m


def patch_labels(labels: torch.Tensor, patch: int, grid, n_labels: int) -> torch.Tensor:
    """Per patch: the most frequent pixel label (the smallest among equal counts)."""
    out = torch.zeros(grid, dtype=torch.int64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            cell = labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].flatten().tolist()
            counts = [cell.count(v) for v in range(n_labels)]
            out[r, c] = counts.index(max(counts))
    return out


def path_ok(labels: torch.Tensor, i: int, j: int, big_d: int, local: bool = False, half_even: bool = True) -> bool:
    """The walk from patch i towards patch j: points p_i + (n / D)(p_j - p_i), n = 0..d_ij, in
    float32, rounded half to even; valid iff every point has label l_i. (``local``: n / d_ij, the
    whole segment; ``half_even=False``: halves away from zero: both wrong, for the tests.)"""
    lab = labels.numpy()
    gw = lab.shape[1]
    pi = np.array([i // gw, i % gw], dtype=np.float32)
    pj = np.array([j // gw, j % gw], dtype=np.float32)
    d = int(np.abs(pi - pj).max())
    den = np.float32(d if local else big_d)
    if den == 0:
        return True
    t = np.arange(d + 1, dtype=np.float32) / den  # float32 throughout
    pts = pi[None, :] + t[:, None] * (pj - pi)[None, :]
    pts = np.round(pts) if half_even else np.floor(pts + np.float32(0.5))  # np.round: half to even
    pts = pts.astype(np.int64)
    return bool((lab[pts[:, 0], pts[:, 1]] == lab[int(pi[0]), int(pi[1])]).all())


def blur_kernel(n: int, std: float) -> np.ndarray:
    size = min(n, int(6 * std + 1))
    if size % 2 == 0:
        size += 1
    m = np.arange(size) - size // 2
    g = np.exp(-(m ** 2) / (2 * std ** 2))
    return g / g.sum()


def sfr64(labels: torch.Tensor, delete_same_entity: bool, std: float, fp16: bool = True) -> torch.Tensor:
    """A_sfr (T, T) float64 from a (gh, gw) label grid, as the spec gives it."""
    gh, gw = labels.shape
    n = gh * gw
    flat = labels.flatten().tolist()
    pos = [(p // gw, p % gw) for p in range(n)]
    big_d = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in pos for b in pos)
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if flat[i] == flat[j] or i == j:
                m[i, j] = 1.0
                if delete_same_entity and big_d > 0 and not path_ok(labels, i, j, big_d):
                    d = max(abs(pos[i][0] - pos[j][0]), abs(pos[i][1] - pos[j][1]))
                    m[i, j] *= math.exp(-d / big_d)
    g = blur_kernel(n, std)
    half = len(g) // 2
    rows = np.zeros((n, n))
    for i in range(n):  # along j, zero padding: out_j = sum_m g_m M_i,j+m (g symmetric)
        padded = np.concatenate([np.zeros(half), m[i], np.zeros(half)])
        rows[i] = np.convolve(padded, g, mode="valid")
    rows = np.maximum(rows, 0.0)
    rows = rows / (rows.sum(1, keepdims=True) + 1e-8)
    a = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    a[1:, 1:] = torch.from_numpy(rows)
    a = a / a.max()
    return a.half().double() if fp16 else a


def reference(model, x: torch.Tensor, layers: Dict[int, torch.Tensor], grid, text: Optional[torch.Tensor],
              pixels: Optional[torch.Tensor], patch: int, knobs, variant: Optional[str] = None):
    """One window's ResCLIP: {"rcs", "labels", "sfr", "attention" (H, T, T), "z" (T, D)}, float64.

    ``variant``: "swap" (RCS mixed into the logits, SFR into the probabilities), "omega_scaled"
    (Omega inside the tau_sfr scaling) -- both wrong."""
    visual = double_visual(model)
    blocks = visual.transformer.resblocks
    last = blocks[-1]
    heads = last.attn.num_heads
    x = x.double()
    t, d = x.shape
    dh = d // heads
    tau = dh ** -0.5
    base = knobs["base"]
    out = {}
    with torch.no_grad():
        a_rcs = None
        if knobs["rcs"]:
            a_rcs = torch.zeros(heads, t, t, dtype=torch.float64)
            for l in knobs["rcs_layers"]:
                tokens = x if l == len(blocks) - 1 else layers[l].double()
                q, k, _ = qkv(blocks[l], tokens)
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    for i in range(t):
                        a_rcs[h, i] += row_softmax(tau * (k[:, sl] @ q[i, sl])) / len(knobs["rcs_layers"])
            out["rcs"] = a_rcs
        q, k, v = qkv(last, x)
        om = omega(grid, knobs["gaussian_std"])

        def attention(sfr):
            a = torch.zeros(heads, t, t, dtype=torch.float64)
            ts, ls = knobs["sfr_temp"], knobs["sfr_weight"]
            tr, lr = knobs["rcs_temp"], knobs["rcs_weight"]
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                for i in range(t):
                    def mixed(m):
                        s = tau * (m[:, sl] @ m[i, sl])
                        if sfr is not None and variant != "swap":
                            s = ts * ((1 - ls) * s + ls * sfr[i])
                        if a_rcs is not None and variant == "swap":
                            s = tr * ((1 - lr) * s + lr * a_rcs[h, i])
                        return s

                    def soft(s):
                        p = row_softmax(s)
                        if sfr is not None and variant == "swap":
                            p = ts * ((1 - ls) * p + ls * sfr[i])
                        return p

                    if base == "naclip":
                        s = mixed(k)
                        if variant == "omega_scaled" and sfr is not None:
                            s = tau * (k[:, sl] @ k[i, sl])
                            s = ts * ((1 - ls) * s + ls * sfr[i] + om[i])
                            p = soft(s)
                        else:
                            p = soft(s + om[i])
                    elif base == "clearclip":
                        p = soft(mixed(q))
                    else:
                        p = soft(mixed(q)) + soft(mixed(k))
                    if a_rcs is not None and variant != "swap":
                        p = tr * ((1 - lr) * p + lr * a_rcs[h, i])
                    a[h, i] = p
            return a

        def block(a):
            from naive import apply_attention

            return apply_attention(last, a, v, x, knobs["residual"], knobs["ffn"])

        sfr = None
        if knobs["sfr"]:
            z1 = block(attention(None))
            e = F.normalize(visual.ln_post(z1[1:]) @ visual.proj, dim=-1)
            s = (e @ text.double().T).T.reshape(-1, *grid)
            s = F.interpolate(s[None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)[0]
            s = pamr64(s, pixels, 10, (8, 16))
            prob = torch.softmax(40.0 * s, dim=0)
            best, lab = prob.max(0)
            lab[best < knobs["temp_thd"]] = 0
            out["labels"] = patch_labels(lab, patch, grid, s.shape[0])
            sfr = out["sfr"] = sfr64(out["labels"], knobs["delete_same_entity"], knobs["gaussian_std"])
        out["attention"] = attention(sfr)
        out["z"] = block(out["attention"])
    return out
