"""A float64 reference of Trident written from its equations (docs/regions.md, "Trident") with plain
loops; nothing here calls proxyclip's Trident code. It reads the encode's stored parts: the CLIP
tokens entering the last block, the VFM features and the SAM part (q, k, v and the rel-pos tables
of the SAM encoder's last block; tests/test_trident.py checks that part against timm's own block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import naive


def sam_attention(part, h: int):
    """(P_h, v_h) on the valid grid: the softmax over the whole grid (loops over the bias), cropped."""
    q, k, v = (part["qkv"][i, h].double() for i in range(3))
    gh, gw = (int(t) for t in part["grid"])
    hv, wv = (int(t) for t in part["valid"])
    rh, rw = part["rel_h"].double(), part["rel_w"].double()
    scale = float(part["scale"])
    n = gh * gw
    logits = scale * (q @ k.T)
    for a in range(n):
        i, j = divmod(a, gw)
        for b in range(n):
            kk, ll = divmod(b, gw)
            logits[a, b] += float(q[a] @ rh[i, kk]) + float(q[a] @ rw[j, ll])
    p = torch.softmax(logits, dim=-1)
    valid = [a for a in range(n) if a // gw < hv and a % gw < wv]
    return p[valid][:, valid], v[valid]


def sam_w(part, cos_fac: float, refine_neg_cos: bool) -> torch.Tensor:
    heads = int(part["qkv"].shape[1])
    ps, cs = [], []
    for h in range(heads):
        p, v = sam_attention(part, h)
        vn = v / v.norm(dim=-1, keepdim=True)
        ps.append(p)
        cs.append(vn @ vn.T)
    n = ps[0].shape[0]
    r = torch.zeros(n, n, dtype=torch.float64)
    for m in range(n):
        t = cos_fac * sum(float(c[m].sum()) for c in cs) / (heads * n)
        if not refine_neg_cos and t < 0:
            t = 0.6
        t = min(t, 0.9)
        for h in range(heads):
            for j in range(n):
                if cs[h][m, j] > t:
                    r[m, j] += ps[h][m, j] / heads
    return r / r.sum(1, keepdim=True)


def trident(seg, enc, queries, knobs) -> torch.Tensor:
    """(Q, H, W) Trident scores at the original image size."""
    beta, gamma = knobs["beta"], knobs["gamma"]
    model = seg.clip_model
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    d = enc.clip_tokens.shape[-1]
    text = naive.text_embeddings(model, seg.clip.tokenizer, queries)
    feats = enc.vfm_features.double()
    nwin, _, hd, wd = feats.shape
    # ProxyCLIP stage, the mean over every window's affinity at once
    sims = []
    for f in feats:
        fn = f.flatten(1).T
        fn = fn / fn.norm(dim=-1, keepdim=True)
        sims.append(fn @ fn.T)
    mu = sum(float(s.sum()) for s in sims) / sum(s.numel() for s in sims)
    top, bottom, left, right = enc.pad
    canvas, count = {}, {}
    wo = block.attn.out_proj.weight.double()
    bo = block.attn.out_proj.bias.double()
    wv_ = block.attn.in_proj_weight[2 * d:].double()
    bv = block.attn.in_proj_bias[2 * d:].double()
    ln1 = lambda t: F.layer_norm(t, (d,), block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps)  # noqa: E731
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        s = gamma * (sims[i] - beta * mu)
        a = torch.zeros_like(s)
        for r in range(s.shape[0]):
            keep = [c for c in range(s.shape[1]) if s[r, c] >= 0] or [r]
            e = torch.stack([torch.exp(s[r, c]) for c in keep])
            for c, val in zip(keep, e / e.sum()):
                a[r, c] = val
        x = enc.clip_tokens[i].double()
        v = ln1(x) @ wv_.T + bv
        gh, gw = enc.clip_grid
        v = v[1:].T.reshape(1, d, gh, gw)
        v = F.interpolate(v, size=(hd, wd), mode="bilinear", align_corners=False)[0].flatten(1).T
        o = (a @ v) @ wo.T + bo  # (N, D)
        cy, cx = (y2 - y1 + top + bottom) / hd, (x2 - x1 + left + right) / wd
        r0, c0 = max(0, round((y1 - top) / cy)), max(0, round((x1 - left) / cx))
        for n in range(hd * wd):
            key = (r0 + n // wd, c0 + n % wd)
            canvas[key] = canvas.get(key, 0) + o[n]
            count[key] = count.get(key, 0) + 1
    hc, wc = max(k[0] for k in canvas) + 1, max(k[1] for k in canvas) + 1
    grid = torch.stack([torch.stack([canvas[(r, c)] / count[(r, c)] for c in range(wc)]) for r in range(hc)])
    grid = grid.permute(2, 0, 1)  # (D, Hc, Wc)
    if "pieces" in enc.sam:  # Cityscapes: left / right halves of the canvas with their own SAM passes
        parts = [{k[:-2]: v for k, v in enc.sam.items() if k.endswith(f".{i}")} for i in range(2)]
        halves = [grid[:, :, :wc // 2], grid[:, :, wc // 2:]]
    else:
        parts, halves = [enc.sam], [grid]
    out = []
    for part, half in zip(parts, halves):
        hv, wv = (int(t) for t in part["valid"])
        half = F.interpolate(half[None], size=(hv, wv), mode="bilinear", align_corners=False)[0]
        w = sam_w(part, knobs["cos_fac"], knobs["refine_neg_cos"])
        z = w @ half.flatten(1).T
        z = F.layer_norm(z, (d,), visual.ln_post.weight.double(), visual.ln_post.bias.double(), visual.ln_post.eps)
        e = z @ visual.proj.double()
        e = e / e.norm(dim=-1, keepdim=True)
        out.append(torch.stack([e @ t for t in text]).reshape(-1, hv, wv))
    s = torch.cat(out, dim=-1)
    return F.interpolate(s[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]


IMAGE_LEVEL = {"trident": trident}
