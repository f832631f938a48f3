"""A float64 reference of CorrCLIP (v1) written from its equations (docs/regions.md, "CorrCLIP"), with
plain loops over cells, regions, heads and blocks; nothing here calls proxyclip's CorrCLIP code (or
its label-map helpers)."""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
import torch.nn.functional as F

import naive

SPATIAL_RULE = {12: 5, 24: 12, 32: 28}


def nearest(lab, size):
    """A 2-D integer map (list of rows or tensor) resized by the nearest rule floor(i * in / out)."""
    h, w = len(lab), len(lab[0])
    out_h, out_w = size
    rows = [min(int(math.floor(i * (h / out_h))), h - 1) for i in range(out_h)]
    cols = [min(int(math.floor(j * (w / out_w))), w - 1) for j in range(out_w)]
    return [[int(lab[r][c]) for c in cols] for r in rows]


def components(n, linked):
    """Connected components of n nodes, ``linked(a, b)`` -> bool, by breadth-first search; ids in
    order of the smallest member."""
    comp = [-1] * n
    cid = 0
    for s in range(n):
        if comp[s] >= 0:
            continue
        comp[s], todo = cid, [s]
        while todo:
            a = todo.pop()
            for b in range(n):
                if comp[b] < 0 and linked(a, b):
                    comp[b] = cid
                    todo.append(b)
        cid += 1
    return comp


def merge(cells, feats, eps):
    """Merged labels of the N cells (a list) with (N, C) normalized float64 features."""
    labels = sorted(set(cells))
    if len(labels) <= 2:
        return list(cells)
    kept = labels[1:]
    means = []
    for u in kept:
        s = sum(feats[i] for i in range(len(cells)) if cells[i] == u)
        means.append(s / s.norm())
    cos = [[float(a @ b) for b in means] for a in means]
    top = max(max(row) for row in cos)
    comp = components(len(kept), lambda a, b: top - cos[a][b] <= eps)
    new = {u: 10 ** 9 + comp[i] for i, u in enumerate(kept)}  # above every label: the smallest stays smallest
    return [c if c == labels[0] else new[c] for c in cells]


def mct_block(block, m, tokens, allowed):
    """One block for one mask class token m (D,) over the allowed rows of tokens (T, D)."""
    d = m.shape[0]
    heads = block.attn.num_heads
    dh = d // heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = block.ln_1(m) @ w[:d].T + b[:d]
    xs = block.ln_1(tokens[allowed])
    k = xs @ w[d:2 * d].T + b[d:2 * d]
    v = xs @ w[2 * d:].T + b[2 * d:]
    out = torch.zeros(d, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        logits = torch.tensor([float(q[sl] @ k[j, sl]) * dh ** -0.5 for j in range(k.shape[0])], dtype=torch.float64)
        out[sl] = torch.softmax(logits, 0) @ v[:, sl]
    ls1 = getattr(block, "ls_1", torch.nn.Identity())
    ls2 = getattr(block, "ls_2", torch.nn.Identity())
    m = m + ls1(block.attn.out_proj(out))
    return m + ls2(block.mlp(block.ln_2(m)))


def branch(block, tokens, a, grid, vgrid, knobs):
    """main / spatial: out_proj(A V) on the VFM grid, V = ln_1(tokens) W_v + b_v (patches) resized
    bilinear there; then the residual (the tokens' patches resized) and the FFN when on."""
    d = tokens.shape[1]
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    v = naive._resize_patches(block.ln_1(tokens[1:]) @ w[2 * d:].T + b[2 * d:], grid, vgrid)
    o = block.attn.out_proj(a @ v)
    y = naive._resize_patches(tokens[1:], grid, vgrid) + o if knobs["residual"] else o
    return y + block.mlp(block.ln_2(y)) if knobs["ffn"] else y


def window_scores(visual, layers, tokens, feats, lab, grid, knobs, text):
    """(Q, Hv, Wv) scores of one window: ``layers`` {i: tokens entering block i}, ``lab`` the
    window's labels (padded window size), ``feats`` (C, Hv, Wv) its VFM features."""
    c, hv, wv = feats.shape
    n = hv * wv
    f = [feats[:, i // wv, i % wv] / feats[:, i // wv, i % wv].norm() for i in range(n)]
    cells = [x for row in nearest(lab, (hv, wv)) for x in row]
    reg = merge(cells, f, knobs["eps"])
    r0 = min(reg)
    s = [[float(f[i] @ f[j]) for j in range(n)] for i in range(n)]
    mean = sum(sum(row) for row in s) / n ** 2
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        ok = [j for j in range(n) if (reg[i] == reg[j] != r0) or ((reg[i] == r0 or reg[j] == r0) and s[i][j] > mean)
              or i == j]
        row = torch.softmax(torch.tensor([knobs["tau"] * s[i][j] for j in ok], dtype=torch.float64), 0)
        for j, p in zip(ok, row):
            a[i, j] = p
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    on_clip = nearest([reg[r * wv:(r + 1) * wv] for r in range(hv)], grid)
    flat = [x for row in on_clip for x in row]
    mct = {}
    for r in sorted(set(flat)):
        allowed = torch.tensor([True] + [x == r for x in flat])
        m = layers[0][0].double()
        for i in range(depth):
            m = mct_block(blocks[i], m, layers[i].double(), allowed)
        mct[r] = m
    back = [x for row in nearest(on_clip, (hv, wv)) for x in row]
    last = blocks[-1]
    total = visual.ln_post(branch(last, tokens.double(), a, grid, (hv, wv), knobs))
    n_s = SPATIAL_RULE.get(depth, depth - 4) if knobs["spatial_blocks"] == -1 else knobs["spatial_blocks"]
    if n_s > 0:
        x_sp = sum(layers[i + 1].double() for i in range(depth - 2 - n_s, depth - 2)) / n_s  # outputs of blocks
        total = total + knobs["alpha"] * visual.ln_post(branch(last, x_sp, a, grid, (hv, wv), knobs))
    total = total + knobs["beta"] * visual.ln_post(torch.stack([mct[x] for x in back]))
    e = F.normalize(total @ visual.proj, dim=-1)
    return torch.stack([e @ t for t in text.double()]).reshape(-1, hv, wv)


def corrclip(seg, enc, queries, knobs) -> torch.Tensor:
    """(Q, h, w) CorrCLIP scores merged on the resized image."""
    visual = copy.deepcopy(seg.clip_model.visual).double()
    text = naive.text_embeddings(seg.clip_model, seg.clip.tokenizer, queries)
    resized = nearest(enc.masks.tolist(), enc.resized_size)
    top, bottom, left, right = enc.pad
    pad_label = int(enc.masks.max()) + 1
    per = []
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        width = x2 - x1 + left + right
        lab = [[pad_label] * width for _ in range(top)]
        lab += [[pad_label] * left + resized[y][x1:x2] + [pad_label] * right for y in range(y1, y2)]
        lab += [[pad_label] * width for _ in range(bottom)]
        layers = {**naive.window_layers(enc, i), len(visual.transformer.resblocks) - 1: enc.clip_tokens[i]}
        s = window_scores(visual, layers, enc.clip_tokens[i], enc.vfm_features[i].double(), lab, enc.clip_grid,
                          knobs, text)
        per.append(naive.upsample_window(s, enc.windows[i], enc.pad))
    return naive.merge_by_hand(per, enc.windows, enc.resized_size)


def vote(labels, masks):
    """CorrCLIP's map correction by hand: each label of ``masks`` but the smallest takes the most
    frequent class of its pixels in ``labels`` (the smallest class on a tie)."""
    out = labels.clone()
    ids = sorted(set(masks.flatten().tolist()))
    for u in ids[1:]:
        where = masks == u
        counts = Counter(labels[where].tolist())
        best = max(counts.values())
        out[where] = min(c for c, k in counts.items() if k == best)
    return out


def decide(scores, query_to_class, logit_scale, prob_thd):
    """Labels of (Q, H, W) scores: softmax over the queries, each class the max over its names,
    argmax (the first on a tie), best probability < prob_thd -> 0."""
    p = torch.softmax(logit_scale * scores.double(), 0)
    k = max(query_to_class) + 1
    probs = torch.stack([torch.stack([p[q] for q in range(len(query_to_class)) if query_to_class[q] == c]).amax(0)
                         for c in range(k)])
    best, labels = probs.max(0)
    labels[best < prob_thd] = 0
    return labels


def masks_file(folder, size, stem="img"):
    """Write ``<folder>/<stem>.npz``, a label map of ``size`` with a few overlapping rectangles (and
    some pixels unsegmented), for a method reading mask proposals; -> the config overrides reading it."""
    import numpy as np

    h, w = size
    lab = np.zeros((h, w), np.int32)
    lab[: h // 2, : w // 2] = 3
    lab[h // 3:, w // 3:] = 7
    lab[: h // 4, 2 * w // 3:] = 2
    lab[2 * h // 3:, : w // 4] = 5
    np.savez(f"{folder}/{stem}.npz", instance_mask=lab)
    return ["masks=file", f"masks.dir={folder}"]


IMAGE_LEVEL = {"corrclip": corrclip}
