"""A float64 reference of CLIPer written from its equations (docs/regions.md, "CLIPer"), with plain
loops over heads, rows, levels, windows and pixels and open_clip's own modules (made float64);
nothing here calls proxyclip's CLIPer code. The tokens entering every block are the encode's (the
windows' layer parts); the whole image of a sliding run is run here through open_clip's modules
(conv1, positions resized by the rule of docs/vfm.md, ln_pre, the blocks)."""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import naive

SCORE_EPS, NORM_EPS, STITCH_EPS = 1e-5, 1e-6, 1e-5


# ---------------------------------------------------------------------------------------------- pieces
def sinkhorn_round(s: torch.Tensor) -> torch.Tensor:
    """One round on (T, T): each column divided by its sum, then each row by its sum."""
    t = s.shape[0]
    out = s.clone()
    for j in range(t):
        c = sum(float(out[i, j]) for i in range(t))
        for i in range(t):
            out[i, j] = out[i, j] / c
    for i in range(t):
        r = sum(float(out[i, j]) for j in range(t))
        for j in range(t):
            out[i, j] = out[i, j] / r
    return out


def fused(s: torch.Tensor) -> torch.Tensor:
    """B = (S + S^T) / 2 minus each column's mean over the rows, negatives 0, rows normalized; a row
    with nothing left is the identity row (defined here: the official code divides 0 by 0)."""
    t = s.shape[0]
    b = [[0.5 * (float(s[i, j]) + float(s[j, i])) for j in range(t)] for i in range(t)]
    means = [sum(b[i][j] for i in range(t)) / t for j in range(t)]
    out = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        row = [max(b[i][j] - means[j], 0.0) for j in range(t)]
        z = sum(row)
        if z == 0:
            out[i, i] = 1.0
            continue
        for j in range(t):
            out[i, j] = row[j] / z
    return out


def layer_norm(ln, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.double(), ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


def block_attention(block, x: torch.Tensor) -> torch.Tensor:
    """(H, T, T) softmax(tau q k^T) per head of a block from the tokens entering it."""
    d = x.shape[1]
    w, b = block.attn.in_proj_weight.double(), block.attn.in_proj_bias.double()
    u = layer_norm(block.ln_1, x)
    q, k = u @ w[:d].T + b[:d], u @ w[d:2 * d].T + b[d:2 * d]
    heads = int(block.attn.num_heads)
    dh = d // heads
    t = x.shape[0]
    out = torch.zeros(heads, t, t, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        for i in range(t):
            logits = torch.tensor([float(q[i, sl] @ k[j, sl]) / math.sqrt(dh) for j in range(t)], dtype=torch.float64)
            out[h, i] = torch.softmax(logits, 0)
    return out


def last_block_output(model, a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """E (T, E') = ln_post(out_proj(concat_h A_h V_h)) proj, V = ln_1^{L-1}(F) W_v^T + b_v."""
    visual = copy.deepcopy(model.visual).double()
    block = visual.transformer.resblocks[-1]
    d = f.shape[1]
    v = layer_norm(block.ln_1, f) @ block.attn.in_proj_weight[2 * d:].T + block.attn.in_proj_bias[2 * d:]
    heads = a.shape[0]
    dh = d // heads
    out = torch.zeros(f.shape[0], d, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        out[:, sl] = a[h] @ v[:, sl]
    return visual.ln_post(block.attn.out_proj(out)) @ visual.proj


def unit(model, xs: List[torch.Tensor], text: torch.Tensor, knobs) -> Tuple[torch.Tensor, torch.Tensor]:
    """One unit's (levels, Q', N) logits and its last level's (H, T, T) fused attention."""
    blocks = model.visual.transformer.resblocks
    last = len(xs) - 1
    s = sum(block_attention(blocks[i], xs[i]) for i in range(last))
    feats = [layer_norm(blocks[i].ln_1, xs[i]) for i in range(last)] + [xs[last].double()]
    if not knobs["fuse_feature"]:
        feats = feats[-1:]
    heads = s.shape[0]
    state = [s[h].clone() for h in range(heads)]
    logits, a = [], None
    for f in feats:
        pats = []
        for h in range(heads):
            if knobs["carry_normalization"]:
                state[h] = sinkhorn_round(state[h])
                pats.append(fused(state[h]))
            else:
                pats.append(fused(sinkhorn_round(s[h])))
        a = torch.stack(pats)
        e = last_block_output(model, a, f)[1:]
        e = e / e.norm(dim=1, keepdim=True)
        logits.append(float(knobs["level_logit_scale"]) * torch.stack([e @ t for t in text]))
    return torch.stack(logits), a


# ---------------------------------------------------------------------------------------------- geometry
def resized_image(enc) -> torch.Tensor:
    if tuple(enc.resized_size) == tuple(enc.image.shape[-2:]):
        return enc.image.double()
    return F.interpolate(enc.image[None], size=enc.resized_size, mode="bilinear",
                         align_corners=False)[0].clamp(0, 1).double()


def symmetric_pad(h: int, w: int, p: int) -> Tuple[int, int, int, int]:
    ph, pw = (-h) % p, (-w) % p
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def whole_image_tokens(model, enc, p: int) -> Tuple[List[torch.Tensor], Tuple[int, int], Tuple[int, int, int, int]]:
    """The tokens entering each block for the whole resized image, from open_clip's modules."""
    img = resized_image(enc)
    h, w = img.shape[-2:]
    pad = symmetric_pad(h, w, p)
    x = (img - torch.tensor(naive.CLIP_MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(
        naive.CLIP_STD, dtype=torch.float64)[:, None, None]
    x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))[None].float()
    v = model.visual
    with torch.no_grad():
        t = v.conv1(x)
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        pos = v.positional_embedding
        g0 = int(round(math.sqrt(pos.shape[0] - 1)))
        if (gh, gw) != (g0, g0):  # rule scale_plus_0.1 (docs/vfm.md)
            grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic",
                                 align_corners=False, recompute_scale_factor=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
        t = torch.cat([v.class_embedding.expand(1, 1, -1), t], 1) + pos
        t = v.ln_pre(t)
        xs = []
        for block in v.transformer.resblocks:
            xs.append(t[0])
            t = block(t if getattr(v.transformer, "batch_first", True) else t.transpose(0, 1))
            if not getattr(v.transformer, "batch_first", True):
                t = t.transpose(0, 1)
    return xs, (int(gh), int(gw)), pad


def window_tokens(enc, i: int, layers: int) -> List[torch.Tensor]:
    parts = naive.window_layers(enc, i)
    return [parts[b] for b in range(layers - 1)] + [enc.clip_tokens[i]]


def grid_to(maps: torch.Tensor, pad, p: int, resized, size) -> torch.Tensor:
    """(C, gh, gw) -> (C, *size): directly without padding, else via the padded resized image."""
    if not any(pad):
        return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    gh, gw = maps.shape[-2:]
    up = F.interpolate(maps[None], size=(gh * p, gw * p), mode="bilinear", align_corners=False)[0]
    up = up[:, pad[0]:pad[0] + resized[0], pad[2]:pad[2] + resized[1]]
    if tuple(up.shape[-2:]) == tuple(size):
        return up
    return F.interpolate(up[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# ---------------------------------------------------------------------------------------------- decision
def decision(pred: torch.Tensor, seg: torch.Tensor, knobs, background_class: bool):
    """Step 10 with loops over classes and pixels: (labels (H, W) by the official rule, the class
    values the method returns (with the background first when ``background_class``))."""
    c, hh, ww = pred.shape
    score = [0.5 * float(pred[k].max()) + 0.5 * float(seg[k].max()) for k in range(c)]
    vals = torch.zeros(c, hh, ww, dtype=torch.float64)
    for k in range(c):
        m = float(pred[k].max())
        vals[k] = pred[k] / (m + SCORE_EPS) * score[k]
        if knobs["is_normalize"]:
            lo, hi = float(vals[k].min()), float(vals[k].max())
            vals[k] = (vals[k] - lo) / (hi - lo + NORM_EPS)
    present = [k for k in range(c) if score[k] > float(knobs["score_thr"])]
    bkg = float(knobs["bkg_thre"])
    labels = torch.zeros(hh, ww, dtype=torch.long)
    out = torch.full((c + (1 if background_class else 0), hh, ww), -1.0, dtype=torch.float64)
    off = 1 if background_class else 0
    for y in range(hh):
        for x in range(ww):
            v = {k: float(vals[k, y, x]) for k in present}
            if bkg > 0:
                v = {k: (0.0 if a < bkg else a) for k, a in v.items()}
            for k, a in v.items():
                out[k + off, y, x] = a
            best = max(v.values()) if v else 0.0
            if bkg > 0:
                bg = 0.0
                win = None if best == 0 else min(k for k in v if v[k] == best)
                labels[y, x] = 0 if win is None else win + off
            else:
                bg = (1 - best) ** 2
                cand = [(bg, -1)] + [(v[k], k) for k in present]
                top = max(a for a, _ in cand)
                win = next(k for a, k in cand if a == top)  # the background first, then class order
                labels[y, x] = 0 if win == -1 else win + off
            if background_class:
                out[0, y, x] = bg
    return labels, out


# ---------------------------------------------------------------------------------------------- the method
def reference(seg, enc, queries, query_to_class, knobs) -> Dict[str, torch.Tensor]:
    """CLIPer of an Encoded from the spec: ``values`` (Q, H, W) as the method returns them, ``labels``
    (H, W) by the official rule (for one name per class), ``pred`` and ``seg``."""
    model = seg.clip_model
    p = seg.clip.patch_size
    layers = len(model.visual.transformer.resblocks)
    bgc = knobs["background_class"]
    text = naive.text_embeddings(model, seg.clip.tokenizer, queries)
    fg = [q for q in range(len(queries)) if not bgc or query_to_class[q] != 0]
    bg = [q for q in range(len(queries)) if bgc and query_to_class[q] == 0]
    bg_rows = text[bg] if bgc else naive.text_embeddings(model, seg.clip.tokenizer, ["background"])
    mean_fg = text[fg].mean(0)
    tq = torch.cat([text[fg], bg_rows, mean_fg[None]])
    tq = tq / tq.norm(dim=1, keepdim=True)
    c = len(fg)
    sliding = len(enc.windows) > 1
    if sliding:
        xs, grid, pad = whole_image_tokens(model, enc, p)
    else:
        xs, grid, pad = window_tokens(enc, 0, layers), enc.clip_grid, enc.pad
    logits, a_last = unit(model, xs, tq, knobs)
    probs = torch.softmax(logits, dim=1)[:, :c]
    n = grid[0] * grid[1]
    if sliding:
        lsum = torch.zeros(logits.shape[0], logits.shape[1], n, dtype=torch.float64)
        cnt = torch.zeros(n, dtype=torch.float64)
        asum = torch.zeros(n, n, dtype=torch.float64)
        acnt = torch.zeros(n, n, dtype=torch.float64)
        wgrid = enc.clip_grid
        for i, (y1, _, x1, _) in enumerate(enc.windows):
            lw, aw = unit(model, window_tokens(enc, i, layers), tq, knobs)
            am = aw.mean(0)[1:, 1:]
            oy = min(max(int(round((y1 - enc.pad[0] + pad[0]) / p)), 0), grid[0] - wgrid[0])
            ox = min(max(int(round((x1 - enc.pad[2] + pad[2]) / p)), 0), grid[1] - wgrid[1])
            cells = [(oy + r) * grid[1] + (ox + cc) for r in range(wgrid[0]) for cc in range(wgrid[1])]
            for a, ca in enumerate(cells):
                lsum[:, :, ca] += lw[:, :, a]
                cnt[ca] += 1
                for b, cb in enumerate(cells):
                    asum[ca, cb] += am[a, b]
                    acnt[ca, cb] += 1
        lavg = lsum / cnt.clamp_min(1)
        wmat = asum / (acnt + STITCH_EPS)
        wmat = wmat / wmat.sum(1, keepdim=True)
        prop = torch.zeros_like(lavg)
        for j in range(n):  # from the right: out_j = sum_i logit_i W_ij
            for i in range(n):
                prop[:, :, j] += lavg[:, :, i] * wmat[i, j]
        probs = 0.5 * probs + 0.5 * torch.softmax(prop, dim=1)[:, :c]
    stack = [probs[j].clone() for j in range(probs.shape[0])]
    sel = int(knobs["select_layer"]) % len(stack)
    for k in range(c):
        m = float(stack[sel][k].max())
        for i in range(n):
            if float(stack[sel][k, i]) < float(knobs["attention_thr"]) * m:
                stack[sel][k, i] = 0.0  # the stack's own entry: the mean below sees it thresholded
    abar = a_last.mean(0)[1:, 1:]
    s = stack[sel]
    r = torch.zeros(c, n, dtype=torch.float64)
    for j in range(n):
        for i in range(n):
            r[:, j] += s[:, i] * abar[i, j]
    segm = (r + sum(stack) / len(stack)).reshape(c, *grid)
    if knobs["compensation"] == "dino":
        vp = seg.vfm.patch_size
        hh, ww = enc.image_size
        size = (max(vp, hh // vp * vp), max(vp, ww // vp * vp))
        img = enc.image.float()
        if size != (hh, ww):
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        mean, std = (torch.tensor(t).view(3, 1, 1) for t in (seg.vfm.mean, seg.vfm.std))
        with torch.no_grad():
            feats = seg.vfm.features(((img - mean) / std)[None])[0].double()
        _, fh, fw = feats.shape
        f = feats.flatten(1).T
        f = f / f.norm(dim=1, keepdim=True)
        sv = f @ f.T
        mu = float(sv.mean())
        nv = sv.shape[0]
        av = torch.zeros(nv, nv, dtype=torch.float64)
        for i in range(nv):
            row = [3.0 * (float(sv[i, j]) - 1.2 * mu) for j in range(nv)]
            kept = [j for j in range(nv) if row[j] >= 0] or [i]
            z = sum(math.exp(row[j]) for j in kept)
            for j in kept:
                av[i, j] = math.exp(row[j]) / z
        cross = grid_to(segm, pad, p, enc.resized_size, (fh, fw)).flatten(1)
        pred = torch.zeros_like(cross)
        for i in range(nv):  # from the left: pred_i = sum_j A_v[i, j] cross_j
            for j in range(nv):
                pred[:, i] += av[i, j] * cross[:, j]
        pred = F.interpolate(pred.reshape(c, fh, fw)[None], size=enc.image_size, mode="bilinear",
                             align_corners=False)[0]
    else:
        pred = grid_to(segm, pad, p, enc.resized_size, enc.image_size)
    labels, vals = decision(pred, segm, knobs, bgc)
    out = torch.zeros(len(queries), *enc.image_size, dtype=torch.float64)
    for q in range(len(queries)):
        out[q] = vals[0] if q in bg else vals[fg.index(q) + (1 if bgc else 0)]
    return {"values": out, "labels": labels, "pred": pred, "seg": segm}


def cliper(seg, enc, queries, knobs) -> torch.Tensor:
    """The registered reference (tests/naive.py IMAGE_LEVEL): the (Q, H, W) values, CLASSES-style
    queries (``sky`` is class 0, ``person`` / ``people`` the synonyms of class 1)."""
    q2c = {"sky": 0, "person": 1, "people": 1, "horse": 2}
    classes = [q2c[q] for q in queries] if set(queries) <= set(q2c) else list(range(len(queries)))
    return reference(seg, enc, queries, classes, knobs)["values"]


IMAGE_LEVEL = {"cliper": cliper}
