"""Trident (Shi et al., ICCV 2025): ProxyCLIP's stage on every window, the windows spliced into one
canvas of the whole image, aggregated with SAM's last-block attention of the original image.
An image-level method (proxyclip/image_level.py); docs/regions.md has the equations, the
official settings and the deviations. Written from the method's description and the official code
(YuHengsss/Trident at a93b346), not copied from it.

1. Per window n: the ProxyCLIP stage on the VFM's (DINO ViT-B/16 final-norm) tokens: S_n = cos
   affinity; mu = ONE mean over the S of every window of the image; S' = gamma (S - beta mu),
   entries S' < 0 excluded (an empty row keeps its diagonal), softmax -> A_n (one for all heads);
   V_n = in_proj_v(ln_1(X_n)) of the patch tokens, bilinear to the VFM grid; O_n = out_proj(A_n V_n)
   (no residual, no FFN).
2. Splice: each O_n summed into a canvas of the resized image on the VFM's token grid at its
   box (token offset = round((y1 - pad_top) / cell), cell = the window's pixels per VFM token),
   divided by the per-cell count.
3. SAM (the encode's SAM part, proxyclip/sam_attention.py): per head P_h (softmax over the whole
   SAM grid, cropped to the valid hv x wv grid, rows not renormalized) and v_h;
   C_h = cos(v_h); t_m = cos_fac * mean_{h,n} C_h[m, n] (refine_neg_cos false: t_m < 0 -> 0.6),
   t_m = min(t_m, 0.9); R = mean_h P_h * 1(C_h > t_m); W = R / rowsum(R).
4. The canvas bilinear to (hv, wv); Z = W canvas; ln_post, proj, L2-normalized; cosine with every
   query -> (Q, hv, wv) on the SAM grid, bilinear to the original image. With ``trident.halves``
   (Cityscapes) the canvas is split at half its width and each half goes through steps 3-4 with
   the SAM pass of its half of the image; the two score maps side by side.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import proxy
from ..image_level import ImageInputs, ImageScores
from ..knobs import Knob
from ..methods import Method, register_method
from ..sam_attention import pieces, valid_attention

THRESHOLD_CAP, NEGATIVE_THRESHOLD = 0.9, 0.6


def proxy_stage(feats: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """(n, N, N) attention of every window, the affinity's mean taken over all n windows jointly."""
    s = proxy.cosine_affinity(feats)
    s = gamma * (s - beta * s.mean())
    return proxy.masked_softmax(s, proxy.affinity_mask(s))


def token_offsets(x: ImageInputs, grid: Tuple[int, int]) -> List[Tuple[int, int]]:
    """(row, column) of each window's first VFM token on the canvas (module docstring, step 2)."""
    top, bottom, left, right = x.pad
    out = []
    for (y1, y2, x1, x2) in x.windows:
        cy, cx = (y2 - y1 + top + bottom) / grid[0], (x2 - x1 + left + right) / grid[1]
        out.append((max(0, round((y1 - top) / cy)), max(0, round((x1 - left) / cx))))
    return out


def splice(maps: torch.Tensor, offsets: List[Tuple[int, int]]) -> torch.Tensor:
    """(n, D, h, w) window maps -> (D, Hc, Wc) canvas, overlaps averaged (Hc, Wc: the last cells reached)."""
    h, w = maps.shape[-2:]
    hc, wc = max(o[0] for o in offsets) + h, max(o[1] for o in offsets) + w
    canvas = maps.new_zeros(maps.shape[1], hc, wc)
    count = maps.new_zeros(hc, wc)
    for m, (r, c) in zip(maps, offsets):
        canvas[:, r:r + h, c:c + w] += m
        count[r:r + h, c:c + w] += 1
    if (count == 0).any():
        raise ValueError("trident: the windows' VFM grids leave canvas cells uncovered (protocol.stride too large "
                         "for protocol.crop)")
    return canvas / count


def sam_weights(part: Dict[str, torch.Tensor], cos_fac: float, refine_neg_cos: bool,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, N) W of the SAM part on its valid grid (module docstring, step 3)."""
    heads = int(part["qkv"].shape[1])
    ps, cs = [], []
    for h in range(heads):
        p, v = valid_attention(part, h, dtype)
        vn = F.normalize(v, dim=-1)
        ps.append(p)
        cs.append(vn @ vn.T)
    t = cos_fac * torch.stack([c.mean(1) for c in cs]).mean(0)  # (N,): mean over heads and keys
    if not refine_neg_cos:
        t = torch.where(t < 0, torch.full_like(t, NEGATIVE_THRESHOLD), t)
    t = t.clamp(max=THRESHOLD_CAP)[:, None]
    r = sum(p * (c > t) for p, c in zip(ps, cs)) / heads
    return r / r.sum(1, keepdim=True)


def canvas_of(x: ImageInputs, beta: float, gamma: float) -> torch.Tensor:
    """(D, Hc, Wc) the spliced out_proj outputs of the ProxyCLIP stage (steps 1-2)."""
    feats = x.vfm_features
    grid = tuple(feats.shape[-2:])
    attn = proxy_stage(feats, beta, gamma)
    outs = []
    for start, stop, bi in x.batches():
        v = proxy.resize_values(bi.patch_values(), grid).flatten(2).transpose(1, 2)  # (B, N, D)
        o = bi.clip.out_proj(attn[start:stop] @ v.to(attn.dtype)).float()
        outs.append(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], *grid))
    return splice(torch.cat(outs), token_offsets(x, grid))


def grid_scores(x: ImageInputs, beta: float, gamma: float, cos_fac: float, refine_neg_cos: bool) -> torch.Tensor:
    """(Q, hv, wv) Trident's cosine scores on the SAM part's valid grid (steps 1-4)."""
    if x.sam is None:
        raise ValueError("trident reads the SAM part of the encode (trident.sam), but this decode has none: encode "
                         "with a Segmenter configured with method=trident")
    if x.vfm_features is None:
        raise ValueError("trident needs VFM features (vfm=dino_vitb16)")
    if x.switches.get("residual") or x.switches.get("ffn"):
        raise ValueError("trident's last block has no residual and no FFN: method.residual=false method.ffn=false")
    canvas = canvas_of(x, beta, gamma)
    parts = pieces(x.sam)
    if len(parts) == 1:
        halves = [canvas]
    else:  # Cityscapes: the canvas split at half its width, each half aggregated by its own SAM pass
        cut = canvas.shape[-1] // 2
        halves = [canvas[..., :cut], canvas[..., cut:]]
        rows = {int(p["valid"][0]) for p in parts}
        if len(rows) != 1:
            raise ValueError(f"trident.halves: the two halves' SAM grids have {sorted(rows)} rows (unequal halves)")
    clip = x.block_inputs(0, 1).clip
    out = []
    for i, (part, half) in enumerate(zip(parts, halves)):
        hv, wv = (int(t) for t in part["valid"])
        half = F.interpolate(half[None], size=(hv, wv), mode="bilinear", align_corners=False)[0]
        w = x.memoized(f"trident.W.{i}.{float(cos_fac)!r}.{bool(refine_neg_cos)}",
                       lambda part=part: sam_weights(part, cos_fac, refine_neg_cos).to(half.device))
        z = w @ half.flatten(1).T.to(w.dtype)  # (N, D)
        dense = F.normalize(clip.head(z[None].to(clip.dtype))[0].float(), dim=-1)  # (N, E)
        out.append((dense @ x.text.float().T).T.reshape(-1, hv, wv))
    return torch.cat(out, dim=-1)


def trident(x: ImageInputs, beta: float, gamma: float, cos_fac: float, refine_neg_cos: bool) -> ImageScores:
    """Trident's scores at the original image size (bilinear from the SAM grid)."""
    low = grid_scores(x, beta, gamma, cos_fac, refine_neg_cos)
    return ImageScores(F.interpolate(low[None], size=x.image_size, mode="bilinear", align_corners=False)[0],
                       size="original")


KNOBS = (
    Knob("beta", "float", "ProxyCLIP stage: S' = gamma (S - beta * mean S), the mean over every window jointly",
         low=0, slider=(0.0, 3.0, 0.05)),
    Knob("gamma", "float", "ProxyCLIP stage: affinity scale", low=0, low_open=True, slider=(0.5, 10.0, 0.1)),
    Knob("cos_fac", "float", "SAM aggregation: keep P_h where cos(v_h) > cos_fac * its row's mean cosine (cap 0.9)",
         low=0, slider=(0.0, 5.0, 0.1)),
    Knob("refine_neg_cos", "bool", "SAM aggregation: keep a negative threshold as it is (false: it becomes 0.6)"),
)

register_method(Method("trident", trident, knobs=KNOBS, needs_vfm=True, needs_sam=True, level="image",
                       doc="ProxyCLIP on every window, spliced, aggregated by SAM's last-block attention"))
