"""CorrCLIP (Zhang et al., ICCV 2025, v1): class-agnostic mask proposals of the whole image reshape
the last block's attention and add mask class tokens. Image-level (proxyclip/image_level.py), it
reads the encode's label map (``masks=file|sam2|sam``); docs/regions.md has the equations, the
official settings and where this differs. Per window (the label map nearest-resized to the
network input, cut with the window's box, its padding a region of its own):

1. Labels to the VFM grid (nearest). With more than two labels, every label but the smallest is
   merged with the others by the cosine of their mean VFM features (DBSCAN, min_samples 1:
   connected components of max(C) - C <= eps; proxyclip/masks/regions.py).
2. Scope: S = f f^T of the L2-normalized VFM features (``vfm.feature=qk``: DINO's q + k);
   i may attend to j iff they share a region other than r0 (the smallest), or one of them is in
   r0 and S_ij > mean(S); A = softmax(tau S) over those.
3. Mask class tokens: one per region present on CLIP's grid (nearest from the VFM grid), started
   from CLS after ln_pre and run through every CLIP block as a query over [CLS, its region's
   patches] of that block's input tokens (the stored ``clip.blocks.{i}.resid_pre``: the CLS/patch
   stream never attends to them, so it is vanilla CLIP's and the encode does not depend on masks).
4. The last block, three branches: main = out_proj(A V) with V from the last block's input X,
   spatial = the same with X_sp (the mean of the outputs of the ``n_s`` blocks before the last
   two) in place of X, semantic = each VFM cell's region token M (region read from the CLIP-grid
   labels, nearest). F = ln_post(main) + alpha ln_post(spatial) + beta ln_post(M); scores =
   normalize(F proj) t^T on the VFM grid; bilinear to the window, merged by sum / count.
5. Map correction (``map_correction``): after the decision, every proposal of the original-size
   label map (but the smallest label, 0) takes the majority class of its pixels (a label-level
   step: ImageScores.relabel).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decision import WindowScores
from ..hooks import declare_hook
from ..image_level import ImageInputs, ImageScores
from ..knobs import Knob
from ..masks.regions import majority_vote, merge_regions, nearest_labels
from ..methods import Method, register_method
from ..parts import resid_pre
from ..proxy import resize_values

REGIONS = declare_hook("corrclip.regions", "window", "(n, Hv, Wv) int64",
                       "CorrCLIP: merged regions on the VFM grid, ids 0..R-1 ascending (0 = the smallest label, r0)",
                       "method")
SCOPE = declare_hook("corrclip.attention", "window", "(n, N, N)",
                     "CorrCLIP: the scope-reconstructed attention softmax(tau S) over the allowed pairs", "method")
# CorrCLIP's rule for the number of blocks averaged into the spatial branch, by CLIP depth
SPATIAL_RULE = {12: 5, 24: 12, 32: 28}


def spatial_count(spatial_blocks: int, layers: int) -> int:
    """n_s: ``spatial_blocks``, or (-1) CorrCLIP's rule: 12 -> 5, 24 -> 12, 32 -> 28, else L - 4."""
    return SPATIAL_RULE.get(int(layers), int(layers) - 4) if int(spatial_blocks) == -1 else int(spatial_blocks)


def check_corrclip(knobs: Dict[str, object], layers: int) -> None:
    n = spatial_count(int(knobs["spatial_blocks"]), layers)
    if not 0 <= n <= layers - 2:
        rule = " (-1: CorrCLIP's rule for this depth)" if int(knobs["spatial_blocks"]) == -1 else ""
        raise ValueError(f"spatial_blocks={knobs['spatial_blocks']}{rule} gives n_s={n}, but this CLIP has {layers} "
                         f"blocks: n_s must be in 0..{layers - 2} (the outputs of blocks L-2-n_s..L-3; 0 = no spatial "
                         "branch): set method.spatial_blocks")


def corrclip_parts(alpha: float, beta: float, tau: float, eps: float, spatial_blocks: int, map_correction: bool,
                   layers: Optional[int] = None) -> Tuple[str, ...]:
    """The tokens entering every block 0..L-1 (the mask class tokens run through all of them)."""
    if layers is None:
        raise ValueError("corrclip's parts depend on the CLIP's block count: call method_parts with layers=")
    return tuple(resid_pre(i) for i in range(int(layers)))


def _layer_scale(block: nn.Module, name: str) -> nn.Module:
    return getattr(block, name, None) or nn.Identity()


def block_kv(block: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a CLIP block from the (B, T, D) tokens entering it: (B, H, T, d) each."""
    b, t, d = tokens.shape
    h = int(block.attn.num_heads)
    kv = F.linear(block.ln_1(tokens), block.attn.in_proj_weight[d:], block.attn.in_proj_bias[d:])
    k, v = kv[..., :d], kv[..., d:]
    return (k.reshape(b, t, h, d // h).transpose(1, 2), v.reshape(b, t, h, d // h).transpose(1, 2))


def mct_block(block: nn.Module, m: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
              ) -> torch.Tensor:
    """One block for the (R, D) mask class tokens: each a query over the (H, T, d) keys / values it
    is ``allowed`` (R, T) to see (not the other tokens: they stay out of the keys), then the residual
    and the FFN as in the block."""
    r, d = m.shape
    h = k.shape[0]
    q = F.linear(block.ln_1(m), block.attn.in_proj_weight[:d], block.attn.in_proj_bias[:d])
    q = q.reshape(r, h, d // h).transpose(0, 1)  # (H, R, d)
    logits = (q @ k.transpose(-1, -2)) * (d // h) ** -0.5
    p = torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1)
    o = block.attn.out_proj((p @ v).transpose(0, 1).reshape(r, d))
    m = m + _layer_scale(block, "ls_1")(o)
    return m + _layer_scale(block, "ls_2")(block.mlp(block.ln_2(m)))


def scope_attention(f: torch.Tensor, regions: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, N) softmax(tau S) over the allowed pairs (step 2), S = f f^T; the diagonal always allowed
    (it is in CorrCLIP too unless every feature is the same)."""
    s = f @ f.T
    same = (regions[:, None] == regions[None, :]) & (regions[:, None] != 0)
    loose = ((regions[:, None] == 0) | (regions[None, :] == 0)) & (s > s.mean())
    allowed = same | loose | torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return torch.softmax((tau * s).masked_fill(~allowed, float("-inf")), dim=-1)


def _patches_on(clip, tokens: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """(B, T, D) tokens -> (B, N, D) their patches resized bilinear to the VFM grid ``size``."""
    p = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    return resize_values(p, size).flatten(2).transpose(1, 2)


def _branch(clip, tokens: torch.Tensor, grid, size, attention: torch.Tensor, switches: Dict[str, bool]
            ) -> torch.Tensor:
    """(B, N, D) out_proj(A V) of the last block with values from ``tokens`` (B, T, D), on the VFM
    grid (out_proj first: A's rows and the bilinear weights sum to 1), then the switches."""
    values = resize_values(clip.out_proj_map(clip.last_block_values(tokens, grid).float()), size)
    out = attention @ values.flatten(2).transpose(1, 2)
    skip = _patches_on(clip, tokens, grid, size) if switches.get("residual") else None
    return clip.residual_and_ffn(out, skip, bool(switches.get("ffn")))


def window_labels(x: ImageInputs) -> List[torch.Tensor]:
    """Each window's labels (padded window size): the label map nearest-resized to the network
    input, cut with the window's box, padded with a label above every proposal's."""
    resized = x.memoized("corrclip.resized_labels", lambda: nearest_labels(x.masks, x.resized_size))
    top, bottom, left, right = x.pad
    pad_label = int(x.masks.max()) + 1
    return [F.pad(resized[y1:y2, x1:x2], (left, right, top, bottom), value=pad_label) for (y1, y2, x1, x2) in x.windows]


def corrclip(x: ImageInputs, alpha: float, beta: float, tau: float, eps: float, spatial_blocks: int,
             map_correction: bool) -> ImageScores:
    """CorrCLIP's merged scores of every window (module docstring, steps 1-5)."""
    if x.masks is None:
        raise ValueError("corrclip reads mask proposals: encode with masks=file (masks.dir=...), masks=sam2 or masks=sam")
    if x.vfm_features is None:
        raise ValueError("corrclip needs VFM features (vfm=dino_vitb8 vfm.feature=qk)")
    labels = window_labels(x)
    vgrid = tuple(x.vfm_features.shape[-2:])
    low = []
    for start, stop, inp in x.batches():
        clip, grid, layers = inp.clip, inp.grid, inp.clip.num_blocks
        n_s = spatial_count(spatial_blocks, layers)
        feats = F.normalize(inp.vfm_features.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, N, C)
        regions, attn, allowed, cells = [], [], [], []
        for b in range(stop - start):
            reg = merge_regions(nearest_labels(labels[start + b], vgrid).flatten(), feats[b], eps)
            regions.append(reg)
            attn.append(scope_attention(feats[b], reg, tau))
            on_clip = nearest_labels(reg.view(vgrid), grid).flatten()
            present, idx = torch.unique(on_clip, return_inverse=True)
            keys = torch.zeros(present.numel(), 1 + idx.numel(), dtype=torch.bool, device=idx.device)
            keys[:, 0] = True
            keys[idx, 1 + torch.arange(idx.numel(), device=idx.device)] = True
            allowed.append(keys)
            back = nearest_labels(on_clip.view(grid), vgrid).flatten()  # region of each VFM cell, as CLIP sees it
            cells.append(torch.searchsorted(present, back))
        regions = x.point(REGIONS, torch.stack(regions).view(-1, *vgrid), start)
        attn = x.point(SCOPE, torch.stack(attn), start)
        # mask class tokens through every block, keys / values from that block's stored input
        mct = [inp.layer(0)[b, :1].float().expand(a.shape[0], -1) for b, a in enumerate(allowed)]
        for i in range(layers):
            block = clip.block(i)
            k, v = block_kv(block, inp.layer(i).float())
            mct = [mct_block(block, m, k[b], v[b], allowed[b]) for b, m in enumerate(mct)]
        visual = clip.visual
        fused = visual.ln_post(_branch(clip, inp.tokens.float(), grid, vgrid, attn, x.switches))
        if n_s > 0:
            x_sp = torch.stack([inp.layer(i).float() for i in range(layers - 1 - n_s, layers - 1)]).mean(0)
            fused = fused + alpha * visual.ln_post(_branch(clip, x_sp, grid, vgrid, attn, x.switches))
        fused = fused + beta * visual.ln_post(torch.stack([m[c] for m, c in zip(mct, cells)]))
        emb = F.normalize(fused @ visual.proj, dim=-1)
        low.append((emb @ x.text.to(emb.dtype).T).transpose(1, 2).reshape(stop - start, -1, *vgrid))
    low = torch.cat(low)
    ws = WindowScores(low, x.windows, x.pad, x.resized_size, x.resized_size)
    masks = x.masks
    relabel = (lambda predicted: majority_vote(predicted, masks.to(predicted.device))) if map_correction else None
    return ImageScores(ws.merge(ws.window_full(low)), size="resized", relabel=relabel)


KNOBS = (
    Knob("alpha", "float", "weight of the spatial branch: F = ln_post(main) + alpha ln_post(spatial) + ...", low=0,
         slider=(0.0, 3.0, 0.05)),
    Knob("beta", "float", "weight of the semantic branch (mask class tokens): ... + beta ln_post(M)", low=0,
         slider=(0.0, 3.0, 0.05)),
    Knob("tau", "float", "scope attention temperature: softmax(tau S) over the allowed pairs", low=0, low_open=True,
         slider=(0.5, 20.0, 0.5)),
    Knob("eps", "float", "region merging: regions joined when max(C) - cos <= eps (DBSCAN, min_samples 1)", low=0,
         slider=(0.0, 1.0, 0.01)),
    Knob("spatial_blocks", "int", "n_s: block outputs averaged into the spatial branch (-1 = CorrCLIP's rule by "
         "depth: 12 -> 5, 24 -> 12, 32 -> 28, else L-4; 0 = no spatial branch; at most L-2, so the slider stops at "
         "ViT-B's 10: deeper CLIPs take more by method.spatial_blocks=)", low=-1, slider=(-1, 10, 1)),
    Knob("map_correction", "bool", "after the decision, each proposal takes the majority class of its pixels"),
)

register_method(Method("corrclip", corrclip, knobs=KNOBS, needs_vfm=True, level="image", needs_masks=True,
                       parts=corrclip_parts, check=check_corrclip, vfm_feature="qk",
                       doc="mask proposals scope the VFM attention and add mask class tokens (CorrCLIP)"))
