"""Float64 references of LPOSS and LPOSS+ written from their equations (docs/methods.md, "LPOSS"),
with plain loops and dense matrices; nothing here calls proxyclip's LPOSS code (or kornia: the CIE
Lab conversion is written out from its formula)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import naive


def cg(a: torch.Tensor, y: torch.Tensor, iterations: int = 10, tol: float = 1e-6) -> torch.Tensor:
    """Conjugate gradients for one column: x0 = 0, at most ``iterations``, stop when |r| <= tol |y|."""
    x = torch.zeros_like(y)
    r = y.clone()
    if float(r.norm()) == 0:
        return x
    p = r.clone()
    rho = float(r @ r)
    for _ in range(iterations):
        q = a @ p
        step = rho / float(p @ q)
        x = x + step * p
        r = r - step * q
        new = float(r @ r)
        if math.sqrt(new) <= tol * float(y.norm()):
            break
        p = r + (new / rho) * p
        rho = new
    return x


def normalize_graph(w: torch.Tensor) -> torch.Tensor:
    n = w.shape[0]
    w = w.clone()
    for i in range(n):
        w[i, i] = 0.0
    d = [float(w[i].sum()) or 1.0 for i in range(n)]
    out = torch.zeros_like(w)
    for i in range(n):
        for j in range(n):
            out[i, j] = w[i, j] / math.sqrt(d[i] * d[j])
    return out


def knn_graph(feats, locs, k, gamma, sigma, pix_dist_pow) -> torch.Tensor:
    """(N, N) W_n: each row's k largest inner products (itself included), weighted, W = A + A^T."""
    n = feats.shape[0]
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        sims = [(float(feats[i] @ feats[j]), j) for j in range(n)]
        for s, j in sorted(sims, key=lambda t: -t[0])[:k]:
            dist = math.dist(locs[i], locs[j])
            a[i, j] = max(s, 0.0) ** gamma * math.exp(-sigma * dist ** pix_dist_pow)
    return normalize_graph(a + a.T)


def lposs_resized(seg, enc, queries, knobs) -> torch.Tensor:
    """(Q, h, w) LPOSS scores merged on the resized image."""
    text = naive.text_embeddings(seg.clip_model, seg.clip.tokenizer, queries)
    feats, ys, locs = [], [], []
    top, bottom, left, right = enc.pad
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        v = enc.vfm_features[i].double()
        c, gh, gw = v.shape
        d = naive.dense(seg.clip_model, enc.clip_tokens[i], enc.clip_grid, None, "maskclip", knobs)
        if tuple(d.shape[-2:]) != (gh, gw):
            d = F.normalize(F.interpolate(d[None], size=(gh, gw), mode="bilinear", align_corners=False)[0], dim=0)
        py, px = (y2 - y1 + top + bottom) / gh, (x2 - x1 + left + right) / gw
        for a in range(gh):
            for b in range(gw):
                feats.append(v[:, a, b] / v[:, a, b].norm())
                ys.append(torch.stack([d[:, a, b] @ t for t in text]))
                locs.append((y1 - top + py / 2 + a * py, x1 - left + px / 2 + b * px))
    feats, y = torch.stack(feats), torch.stack(ys)
    wn = knn_graph(feats, locs, knobs["k"], knobs["gamma"], knobs["sigma"], knobs["pix_dist_pow"])
    lap = torch.eye(len(feats), dtype=torch.float64) - knobs["alpha"] * wn
    f = torch.stack([cg(lap, y[:, q]) for q in range(y.shape[1])], dim=1)
    per, n0 = [], 0
    for box in enc.windows:
        gh, gw = enc.vfm_features.shape[-2:]
        low = f[n0:n0 + gh * gw].T.reshape(-1, gh, gw)
        n0 += gh * gw
        hh, ww = box[1] - box[0] + top + bottom, box[3] - box[2] + left + right
        up = F.interpolate(low[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        per.append(up[:, top:hh - bottom, left:ww - right])
    return naive.merge_by_hand(per, enc.windows, enc.resized_size)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(3, h, w) sRGB in [0, 1] -> CIE Lab (D65), from the formula (linearize, matrix, f, L a b)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
    xyz = torch.einsum("ij,jhw->ihw", m, lin.double())
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)[:, None, None]
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def pixel_step(rgb: torch.Tensor, scores: torch.Tensor, alpha: float, tau: float, r: int) -> torch.Tensor:
    """LPOSS+'s pixel propagation with a dense (P, P) graph over the pixels, loops over offsets."""
    lab = srgb_to_lab(rgb) / torch.tensor([100.0, 128.0, 128.0], dtype=torch.float64)[:, None, None]
    _, h, w = lab.shape
    rho = r // 2
    wmat = torch.zeros(h * w, h * w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for dy in range(-rho, rho + 1):
                for dx in range(-rho, rho + 1):
                    yy, xx = y + dy, x + dx
                    if (dy, dx) != (0, 0) and 0 <= yy < h and 0 <= xx < w:
                        wmat[y * w + x, yy * w + xx] = math.exp(-float((lab[:, y, x] - lab[:, yy, xx]).norm()) / tau)
    d = wmat.sum(1)
    d[d == 0] = 1
    wn = wmat / d.sqrt()[:, None] / d.sqrt()[None, :]
    lap = torch.eye(h * w, dtype=torch.float64) - alpha * wn
    q = scores.shape[0]
    return torch.stack([cg(lap, scores[i].double().flatten()) for i in range(q)]).reshape(q, h, w)


def lposs(seg, enc, queries, knobs) -> torch.Tensor:
    return lposs_resized(seg, enc, queries, knobs)


def lposs_plus(seg, enc, queries, knobs) -> torch.Tensor:
    from proxyclip.windows import resize_image

    rgb = resize_image(enc.image, enc.resized_size).double()
    return pixel_step(rgb, lposs_resized(seg, enc, queries, knobs), knobs["alpha"], knobs["tau"], knobs["r"])


# image-level methods: name -> fn(seg, enc, queries, knobs) -> (Q, h, w) float64 merged scores at the resized size
IMAGE_LEVEL = {"lposs": lposs, "lposs_plus": lposs_plus}
