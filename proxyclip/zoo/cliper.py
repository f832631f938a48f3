"""CLIPer (Sun et al., ICCV 2025; linsun449/cliper.code): early-layer fusion of CLIP's attention
maps and level features, with fine-grained compensation (none, or DINO's patch affinities). An
image-level method (proxyclip/image_level.py); docs/regions.md ("CLIPer") has the equations, the
official settings and the deviations.

A *unit* is the whole resized image (always) or one sliding window (when the encode has several
windows). From the tokens x_0..x_{L-1} entering every block of a unit (the encode's layer parts):

1. S = sum over blocks 0..L-2 of their per-head attention softmax(tau q k^T) (H x T x T, CLS
   included), recomputed from x_i with block i's ln_1 and in_proj (the encoder is not touched).
2. Level features F_b = ln_1^b(x_b) for b = 0..L-2 and F_{L-1} = x_{L-1}; for each level in that
   order a Sinkhorn round S <- S / colsum, S <- S / rowsum (in place: level j sees j rounds, unless
   ``carry_normalization`` is off), B = relu(sym(S) - column mean), A = B / rowsum(B) (a row with
   nothing left keeps its diagonal).
3. Each level through the last block: out_proj(concat_h A_h V_h) with V from ln_1^{L-1}(F) (a
   second LayerNorm for every level but the last), ln_post, proj; cosines with the queries
   [foreground, background, mean of the foreground], times ``level_logit_scale``; softmax over
   them; the foreground maps P_j.
4. Sliding branch: the windows' level logits averaged on the whole grid, their last-level attention
   (head mean, patch block) stitched into one N x N matrix (count-divided, rows renormalized) W,
   logits <- logits W, softmax, foreground, P_j <- (P_j^slide + P_j) / 2.
5. s = P_{select_layer}; s < attention_thr * max(s) -> 0 *in the stack too*; seg = s A-bar (A-bar
   the whole image's last-level head-mean attention, from the right) + mean of the stack.
6. Compensation: none, or DINO: A_v = masked softmax of 3 (S_v - 1.2 mean S_v) over the VFM's
   patches of the original image; pred = A_v seg (from the left).
7. The decision (score gating, normalization, bkg_thre): :func:`decision_values`, returned as
   scores whose arg-max is CLIPer's label.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backbones import CLIP_MEAN, CLIP_STD
from ..image_level import ImageInputs, ImageScores
from ..knobs import Knob
from ..methods import Method, register_method
from ..parts import resid_pre
from ..windows import symmetric_padding

SCORE_EPS = 1e-5  # pred_c / (max pred_c + 1e-5)
NORM_EPS = 1e-6  # min-max normalization
STITCH_EPS = 1e-5  # stitched attention / (count + 1e-5)
DINO_SCALE, DINO_SHIFT = 3.0, 1.2  # A_v = softmax(3 (S_v - 1.2 mean S_v)), entries < 0 excluded
NOT_PRESENT = -1.0  # the value of a class the image-level gate removes (below every kept value)


# ---------------------------------------------------------------------------------------------- attention
def sinkhorn_round_(s: torch.Tensor) -> torch.Tensor:
    """One Sinkhorn round on (..., T, T) in place: divide by the column sums, then the row sums."""
    s.div_(s.sum(-2, keepdim=True))
    s.div_(s.sum(-1, keepdim=True))
    return s


def fused_pattern(s: torch.Tensor) -> torch.Tensor:
    """A = B / rowsum(B), B = max(sym(S) - mean over the query index, 0) per head; a row of B with
    nothing left (every entry <= its column's mean: 0/0 in the official code) keeps its diagonal."""
    b = 0.5 * (s + s.transpose(-1, -2))
    b = (b - b.mean(-2, keepdim=True)).clamp_min(0)
    rows = b.sum(-1, keepdim=True)
    empty = rows == 0
    a = b / torch.where(empty, torch.ones_like(rows), rows)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    return a + eye * empty.to(s.dtype)


def level_patterns(s0: torch.Tensor, levels: int, carry: bool) -> List[torch.Tensor]:
    """The fused attention of each of ``levels`` levels, first to last: with ``carry`` the rounds
    accumulate on one copy of S (level j sees j rounds), else each level sees one round of S."""
    out = []
    s = s0.clone()
    for _ in range(levels):
        if not carry:
            s = s0.clone()
        out.append(fused_pattern(sinkhorn_round_(s)))
    return out


# ---------------------------------------------------------------------------------------------- one unit
def unit_state(clip, xs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S (H, T, T) summed attention of blocks 0..L-2, V (L, H, T, d) each level's last-block values)
    of one unit from the (T, D) tokens entering each of its L blocks."""
    last = len(xs) - 1
    s = None
    vs = []
    for i in range(last):
        q, k, _ = clip.block_qkv(i, xs[i][None])
        a = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)[0]
        s = a if s is None else s + a
        level = clip.block(i).ln_1(xs[i][None].to(clip.dtype))  # F_b = ln_1^b(x_b)
        vs.append(clip.block_qkv(last, level)[2][0])  # ln_1^{L-1} once more
    vs.append(clip.block_qkv(last, xs[last][None])[2][0])  # F_{L-1} = x_{L-1}: one LayerNorm
    return s.float(), torch.stack(vs).float()


def unit_levels(clip, s0: torch.Tensor, values: torch.Tensor, text: torch.Tensor, scale: float, fuse: bool,
                carry: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits (levels, Q', N) of the patches, A (H, T, T) the last level's fused attention)."""
    levels = values.shape[0] if fuse else 1
    pats = level_patterns(s0, levels, carry)
    vals = values if fuse else values[-1:]
    out = []
    for a, v in zip(pats, vals):
        mixed = (a @ v).transpose(0, 1).reshape(v.shape[1], -1)  # concat_h A_h V_h: (T, D)
        e = F.normalize(clip.head(clip.out_proj(mixed[None])).float()[0, 1:], dim=-1)  # CLS dropped
        out.append(scale * (text @ e.T))
    return torch.stack(out), pats[-1]


def queries_of(x: ImageInputs, background_class: bool) -> Tuple[torch.Tensor, List[int], List[int]]:
    """T' = [foreground, background, mean of the foreground] (rows normalized), and the indices of
    x.text's foreground and background queries."""
    q2c = x.query_to_class if x.query_to_class is not None else list(range(x.text.shape[0]))
    if background_class:
        fg = [q for q, c in enumerate(q2c) if c != 0]
        bg = [q for q, c in enumerate(q2c) if c == 0]
        if not fg:
            raise ValueError("cliper background_class=true needs a foreground class besides class 0")
        bg_rows = x.text[bg]
    else:
        fg, bg = list(range(len(q2c))), []
        if x.embed is None:
            raise ValueError("cliper background_class=false embeds the word 'background': this decode has no text "
                             "encoder")
        bg_rows = x.embed(["background"]).to(x.text)
    fg_rows = x.text[fg]
    t = torch.cat([fg_rows, bg_rows, fg_rows.mean(0, keepdim=True)])
    return F.normalize(t.float(), dim=-1), fg, bg


# ---------------------------------------------------------------------------------------------- geometry
def whole_image_tokens(x: ImageInputs, clip) -> Tuple[List[torch.Tensor], Tuple[int, int], Tuple[int, int, int, int]]:
    """The tokens entering every block for the whole resized image (one pass of CLIP's blocks at
    decode, the resized image CLIP-normalized and padded to the patch as the windows are)."""
    img = x.resized_image()
    h, w = img.shape[-2:]
    pad = symmetric_padding(h, w, clip.patch_size)
    mean = torch.tensor(CLIP_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=img.device).view(3, 1, 1)
    inp = F.pad((img - mean) / std, (pad[2], pad[3], pad[0], pad[1]))[None]
    last, kept = clip.encode_tokens(inp, list(range(clip.num_blocks - 1)))
    xs = [kept[i][0].float() for i in range(clip.num_blocks - 1)] + [last[0].float()]
    return xs, clip.grid_of(inp.shape[-2], inp.shape[-1]), pad


def window_offsets(x: ImageInputs, whole_pad: Tuple[int, int, int, int], grid: Tuple[int, int],
                   whole: Tuple[int, int], patch: int) -> List[Tuple[int, int]]:
    """Each window's (row, column) patch offset in the whole image's grid: its padded top-left
    corner in the whole padded image, in patches, rounded (exact when the resized image's sides
    are patch multiples), kept inside the grid."""
    top, _, left, _ = x.pad
    out = []
    for (y1, _, x1, _) in x.windows:
        oy = int(round((y1 - top + whole_pad[0]) / patch))
        ox = int(round((x1 - left + whole_pad[2]) / patch))
        out.append((min(max(oy, 0), whole[0] - grid[0]), min(max(ox, 0), whole[1] - grid[1])))
    return out


def to_size(maps: torch.Tensor, grid_pad: Tuple[int, int, int, int], patch: int, resized: Tuple[int, int],
            size: Tuple[int, int]) -> torch.Tensor:
    """(C, gh, gw) maps on the whole image's patch grid -> (C, *size), bilinear (align_corners=False):
    directly when the grid has no padding (CLIPer's own case), else through the padded resized image
    with the padding cut."""
    if not any(grid_pad):
        return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    gh, gw = maps.shape[-2:]
    up = F.interpolate(maps[None], size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)[0]
    top, _, left, _ = grid_pad
    up = up[:, top:top + resized[0], left:left + resized[1]]
    if tuple(up.shape[-2:]) == tuple(size):
        return up
    return F.interpolate(up[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# ---------------------------------------------------------------------------------------------- decision
def decision_values(pred: torch.Tensor, seg_max: torch.Tensor, score_thr: float, bkg_thre: float,
                    is_normalize: bool, background_class: bool) -> torch.Tensor:
    """CLIPer's decision as per-class values whose arg-max (first on ties) is its label.

    pred (C, H, W) foreground maps at the original size, seg_max (C,) the max of each class's seg
    map. score_c = (max pred_c + seg_max_c) / 2; pred_c <- pred_c / (max pred_c + 1e-5) * score_c;
    classes with score_c <= score_thr are not present (value -1); is_normalize: per-class min-max
    (+1e-6); bkg_thre > 0: values < bkg_thre -> 0 and the background value 0 (label 0 where no
    present class is above 0); else the background value (1 - max over present classes)^2.
    Returns (C + 1, H, W) with the background first when ``background_class``, else (C, H, W).
    """
    pmax = pred.flatten(1).amax(1)
    score = 0.5 * pmax + 0.5 * seg_max
    v = pred / (pmax + SCORE_EPS)[:, None, None] * score[:, None, None]
    if is_normalize:
        lo = v.flatten(1).amin(1)[:, None, None]
        hi = v.flatten(1).amax(1)[:, None, None]
        v = (v - lo) / (hi - lo + NORM_EPS)
    present = score > score_thr
    if bkg_thre > 0:
        v = v.masked_fill(v < bkg_thre, 0.0)
    kept = v.masked_fill(~present[:, None, None], 0.0)
    v = v.masked_fill(~present[:, None, None], NOT_PRESENT)
    if not background_class:
        return v
    if bkg_thre > 0:
        bg = torch.zeros_like(v[:1])
    else:
        top = kept.amax(0, keepdim=True) if kept.shape[0] else torch.zeros_like(v[:1])
        bg = (1 - top) ** 2
    return torch.cat([bg, v])


# ---------------------------------------------------------------------------------------------- the method
def _state(x: ImageInputs, clip, key: str, xs_fn):
    return x.memoized(f"cliper.{key}", lambda: unit_state(clip, xs_fn()))


def cliper(x: ImageInputs, fuse_feature: bool, attention_thr: float, score_thr: float, bkg_thre: float,
           is_normalize: bool, select_layer: int, carry_normalization: bool, compensation: str,
           level_logit_scale: float, background_class: bool) -> ImageScores:
    """CLIPer (module docstring, steps 1-7) -> per-query values at the original size."""
    first = x.block_inputs(0, 1)
    clip = first.clip
    layers = clip.num_blocks
    check_select_layer(select_layer, layers if fuse_feature else 1)
    text, fg, bg = queries_of(x, background_class)
    c = len(fg)
    sliding = x.num_windows > 1
    if sliding:  # the whole image is not among the windows: one pass of CLIP's blocks, memoized
        grid, pad = _whole_geometry(x, clip)
        s0, vals = _state(x, clip, "whole", lambda: whole_image_tokens(x, clip)[0])
    else:  # the one window is the whole image
        s0, vals = _state(x, clip, "window0", lambda: [first.layer(i)[0].float() for i in range(layers)])
        grid, pad = first.grid, x.pad
    logits, a_last = unit_levels(clip, s0, vals, text, level_logit_scale, fuse_feature, carry_normalization)
    probs = torch.softmax(logits, dim=1)[:, :c]  # (levels, C, N)
    if sliding:
        probs = 0.5 * probs + 0.5 * sliding_probs(x, clip, grid, pad, text, level_logit_scale, fuse_feature,
                                                   carry_normalization)[:, :c]
    seg = aggregate(probs, a_last.mean(0)[1:, 1:], select_layer, attention_thr).reshape(c, *grid)
    patch = clip.patch_size
    if compensation == "dino":
        pred_low = dino_compensation(x, seg, pad, patch)
        pred = F.interpolate(pred_low[None], size=x.image_size, mode="bilinear", align_corners=False)[0]
    else:
        pred = to_size(seg, pad, patch, x.resized_size, x.image_size)
    values = decision_values(pred.float(), seg.flatten(1).amax(1).float(), score_thr, bkg_thre, is_normalize,
                             background_class)
    out = torch.empty(x.text.shape[0], *x.image_size, dtype=values.dtype, device=values.device)
    if background_class:
        out[bg] = values[0]
        out[fg] = values[1:]
    else:
        out[fg] = values
    return ImageScores(out, size="original")


def aggregate(stack: torch.Tensor, a_bar: torch.Tensor, select_layer: int, attention_thr: float) -> torch.Tensor:
    """seg (C, N) = s A-bar + mean of the stack, s = stack[select_layer] with entries below
    attention_thr x its per-class max set to 0 *in the stack* (the mean sees them thresholded, as
    the official in-place code); A-bar applied from the right: r_j = sum_i s_i A-bar_ij."""
    stack = stack.clone()
    s = stack[select_layer]
    s.masked_fill_(s < attention_thr * s.amax(-1, keepdim=True), 0.0)  # a view: writes through
    return s @ a_bar + stack.mean(0)


def dino_attention(feats: torch.Tensor) -> torch.Tensor:
    """A_v (N, N) of (C, fh, fw) VFM features: softmax over the entries >= 0 of 3 (S_v - 1.2 mean S_v),
    S_v their cosines, one mean over the whole matrix (a row with none keeps its diagonal)."""
    f = F.normalize(feats.flatten(1).T.float(), dim=-1)
    sv = f @ f.T
    m = DINO_SCALE * (sv - DINO_SHIFT * sv.mean())
    keep = m >= 0
    keep |= torch.eye(m.shape[0], dtype=torch.bool, device=m.device) & ~keep.any(-1, keepdim=True)
    return torch.softmax(m.masked_fill(~keep, float("-inf")), dim=-1)


def _whole_geometry(x: ImageInputs, clip) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
    h, w = x.resized_size
    pad = symmetric_padding(h, w, clip.patch_size)
    return clip.grid_of(h + pad[0] + pad[1], w + pad[2] + pad[3]), pad


def sliding_probs(x: ImageInputs, clip, whole: Tuple[int, int], whole_pad, text: torch.Tensor, scale: float,
                  fuse: bool, carry: bool) -> torch.Tensor:
    """(levels, Q', N) the sliding branch's probabilities on the whole grid (step 4)."""
    n = whole[0] * whole[1]
    logit_sum = count = att_sum = att_count = None
    first = x.block_inputs(0, 1)
    grid = first.grid
    offsets = window_offsets(x, whole_pad, grid, whole, clip.patch_size)
    layers = clip.num_blocks
    for start, stop, inputs in x.batches():
        for b in range(stop - start):
            w = start + b
            s0, vals = _state(x, clip, f"window{w}", lambda: [inputs.layer(i)[b].float() for i in range(layers)])
            logits, a_last = unit_levels(clip, s0, vals, text, scale, fuse, carry)
            oy, ox = offsets[w]
            rows = torch.arange(grid[0], device=logits.device)[:, None] + oy
            cols = torch.arange(grid[1], device=logits.device)[None, :] + ox
            idx = (rows * whole[1] + cols).flatten()  # the window's patches in the whole grid
            if logit_sum is None:
                logit_sum = logits.new_zeros(logits.shape[0], logits.shape[1], n)
                count = logits.new_zeros(n)
                att_sum = logits.new_zeros(n, n)
                att_count = logits.new_zeros(n, n)
            logit_sum[:, :, idx] += logits
            count[idx] += 1
            pair = (idx[:, None], idx[None, :])
            att_sum[pair] += a_last.mean(0)[1:, 1:]
            att_count[pair] += 1
    logits = logit_sum / count.clamp_min(1)
    wmat = att_sum / (att_count + STITCH_EPS)
    wmat = wmat / wmat.sum(-1, keepdim=True)
    return torch.softmax(logits @ wmat, dim=1)


def dino_compensation(x: ImageInputs, seg: torch.Tensor, grid_pad, patch: int) -> torch.Tensor:
    """pred = A_v seg (from the left) on the VFM grid of the original image (step 6) -> (C, fh, fw)."""
    if x.vfm_image is None:
        raise ValueError("cliper compensation=dino needs a VFM (vfm=dino_vitb8); this Segmenter has none")
    feats = x.memoized("cliper.dino", lambda: _dino_features(x))
    _, fh, fw = feats.shape
    av = dino_attention(feats)
    cross = to_size(seg, grid_pad, patch, x.resized_size, (fh, fw)).flatten(1)  # (C, N_v)
    return (cross @ av.T).reshape(-1, fh, fw)  # pred_i = sum_j A_v[i, j] cross_j


def _dino_features(x: ImageInputs) -> torch.Tensor:
    """The VFM's features of the original image resized bilinear down to a multiple of its patch."""
    p = int(x.vfm_patch_size)
    h, w = x.image_size
    size = (max(p, h // p * p), max(p, w // p * p))
    img = x.image.float()
    if size != (h, w):
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    return x.vfm_image(img)


# ---------------------------------------------------------------------------------------------- registration
def check_select_layer(select_layer: int, levels: int) -> None:
    if not -levels <= int(select_layer) < levels:
        raise ValueError(f"cliper select_layer={select_layer}: this run has {levels} level"
                         f"{'s' if levels > 1 else ''} (fuse_feature {'on' if levels > 1 else 'off'}): expected "
                         f"{-levels}..{levels - 1} (-1 = the last block)")


def _check(knobs: Dict[str, object], layers: int) -> None:
    check_select_layer(int(knobs["select_layer"]), layers if knobs["fuse_feature"] else 1)


def _parts(layers: int, **_: object) -> Tuple[str, ...]:
    return tuple(resid_pre(i) for i in range(layers))


KNOBS = (
    Knob("fuse_feature", "bool", "fuse every block's level (seg adds the mean of all levels' maps); false: the last "
         "block only"),
    Knob("attention_thr", "float", "s < attention_thr * max(s) -> 0 per class before the propagation", low=0, high=1,
         slider=(0.0, 1.0, 0.05)),
    Knob("score_thr", "float", "a class is present iff score_c = (max pred_c + max seg_c) / 2 > score_thr", low=0,
         slider=(0.0, 2.0, 0.05)),
    Knob("bkg_thre", "float", "> 0: values < bkg_thre -> 0, background where nothing is left; 0: background "
         "score (1 - max)^2", low=0, slider=(0.0, 1.0, 0.05)),
    Knob("is_normalize", "bool", "per-class min-max normalization of the gated maps"),
    Knob("select_layer", "int", "the level s is taken from (python index into the levels: -1 = the last block)",
         slider=(-12, -1, 1)),
    Knob("carry_normalization", "bool", "the Sinkhorn rounds accumulate across levels (the official in-place "
         "code); false: one round per level"),
    Knob("compensation", "choice", "fine-grained compensation: none, or dino (the VFM's affinities of the "
         "original image)", choices=("none", "dino")),
    Knob("level_logit_scale", "float", "softmax(level_logit_scale * cos) over the queries of each level",
         low=0, low_open=True, slider=(10.0, 200.0, 10.0)),
    Knob("background_class", "bool", "class 0 is the background (its names are the background queries); false: "
         "every class is foreground, the background query is the word 'background'"),
)

register_method(Method("cliper", cliper, knobs=KNOBS, needs_vfm=True, level="image", parts=_parts, check=_check,
                       doc="early-layer fusion of every block's attention and features, with DINO compensation"))
