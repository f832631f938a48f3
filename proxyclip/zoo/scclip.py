"""SC-CLIP (Bai et al., arXiv 2411.15869): outlier repair, similarity adjustment, multi-level fusion.

Blocks 0..L-2 run unmodified in the encode; the decode replaces the last block (docs/methods.md):

1. outliers O: SC-CLIP's own local outlier factor over the patch tokens entering the last block
   (:func:`outlier_tokens`; or, ``outliers=norm``, the 10 tokens of largest L2 norm of its first
   release), memoized per encode;
2. repair R: each outlier replaced by the mean of its valid non-outlier 8-neighbours on the grid;
3. X = R(x_last patches) (CLS dropped), c = x_last's CLS;
   S_mid = cos(R(output of block ``pre_adjust``)), S_pre = S_mid with entries < 0.4 set to 0;
   X <- Agg(X, S_pre), Agg(X, S) = (S / (S 1 + 1e-6)) X;
4. one prior for every head and both passes, A_mid = softmax(M), M = 3 (S_mid - mean S_mid) with
   M < 0 excluded; the last block's attention A_h = (A_mid + softmax(tau K_h K_h^T)) / 2 with K, V
   from ln_1 of its input; O = out_proj(concat_h A_h V_h) (no residual, no FFN);
5. S_post = cos(output of block ``post_adjust``), entries < 0.4 set to 0;
   Y1 = Agg(O(X) + res_cls c, S_post);
6. Sigma = sum of the outputs of blocks multi_start..multi_end-1 (CLS included, unrepaired);
   Y2 = Agg(O(Sigma patches) + res_cls Sigma's CLS, S_post); Z = Y1 + Y2 (patches only) -> head.

Block indices are 0-indexed (SC-CLIP's ``feats_list`` indices): ``pre_adjust=8`` is the output of
block 8 = the tokens entering block 9 (the paper's "block 9" output, 1-indexed).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..hooks import declare_hook
from ..knobs import Knob
from ..last_block import BlockInputs, BlockOutput
from ..methods import Method, register_method
from ..parts import check_block_indices, resid_pre

BETA = 0.4  # similarity threshold of S_pre and S_post (hard-coded in SC-CLIP)
PRIOR_SCALE = 3.0  # M = 3 (S_mid - mean S_mid)
AGG_EPS = 1e-6  # Agg's row-normalization epsilon
LOF_K = 30  # neighbours of the local outlier factor
CONTAMINATION = 0.05  # share of tokens above the LOF quantile
NORM_OUTLIERS = 10  # outliers=norm: the tokens of largest L2 norm (SC-CLIP's first release)

OUTLIERS = declare_hook("scclip.outliers", "window", "(n, gh, gw) bool",
                        "the tokens SC-CLIP repairs, found on the last block's input (scclip)", "method")
PRIOR = declare_hook("scclip.prior", "window", "(n, N, N)",
                     "A_mid = softmax of 3 (S_mid - mean S_mid), entries < 0 excluded; shared by every head and "
                     "both passes (scclip)", "method")


# ---------------------------------------------------------------------------------------------- outliers
def local_outlier_factor(tokens: torch.Tensor, k: int = LOF_K) -> torch.Tensor:
    """SC-CLIP's LOF of each token, (..., N, D) -> (..., N) float64 (not scikit-learn's).

    delta_ij = |p_i - p_j|^2 (squared distances); kNN(i) = the k nearest tokens other than i
    (k clamped to N - 1); kd_i = the largest of those k distances; the reachability is kd_i itself,
    so lrd_i = k / kd_i (a NaN kd_i counts as 1e-6); LOF_i = mean_{j in kNN(i)} lrd_j / lrd_i.
    """
    p = tokens.double()
    n = p.shape[-2]
    k = min(int(k), n - 1)
    sq = (p * p).sum(-1)
    d = (sq[..., :, None] + sq[..., None, :] - 2 * (p @ p.transpose(-1, -2))).clamp_min(0)
    d = d + torch.diag_embed(torch.full(d.shape[:-1], float("inf"), dtype=d.dtype, device=d.device))
    dist, idx = d.topk(k, dim=-1, largest=False)
    lrd = k / torch.nan_to_num(dist[..., -1], nan=1e-6)  # kd_i = 0 (duplicates): lrd inf, LOF NaN
    neighbours = torch.gather(lrd[..., None, :].expand(*lrd.shape, n), -1, idx)  # lrd_j of each i's kNN
    return neighbours.mean(-1) / lrd


def outlier_tokens(tokens: torch.Tensor, k: int = LOF_K, contamination: float = CONTAMINATION) -> torch.Tensor:
    """SC-CLIP's outlier tokens: (..., N, D) patch tokens -> (..., N) bool.

    LOF_i > q, q = the linear-interpolation (1 - contamination) quantile of the LOF values (float32,
    strict >): about contamination x N tokens (10 of 196, 22 of 441 with the defaults). Tokens
    whose LOF is undefined (e.g. all identical) give no outlier. For notebooks, e.g.
    ``outlier_tokens(enc.clip_tokens[:, 1:])``.
    """
    if tokens.shape[-2] < 2:
        return torch.zeros(tokens.shape[:-1], dtype=torch.bool, device=tokens.device)
    lof = local_outlier_factor(tokens, k).float()
    q = torch.quantile(lof, 1.0 - float(contamination), dim=-1, keepdim=True, interpolation="linear")
    return lof > q


def norm_outliers(tokens: torch.Tensor, count: int = NORM_OUTLIERS) -> torch.Tensor:
    """The first release's detector: the ``count`` tokens of largest L2 norm, (..., N, D) -> (..., N) bool."""
    norms = tokens.float().norm(dim=-1)
    top = norms.topk(min(int(count), norms.shape[-1]), dim=-1).indices
    return torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, top, True)


def repair(tokens: torch.Tensor, outliers: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, N, D) patch tokens on the gh x gw grid (token i at row i div gw, column i mod gw): each
    outlier replaced by the mean of its 8-neighbours inside the grid that are not outliers, read from
    the unrepaired tokens; an outlier without such a neighbour and every other token unchanged."""
    b, n, d = tokens.shape
    gh, gw = grid
    f = tokens.transpose(1, 2).reshape(b, d, gh, gw)
    valid = (~outliers).to(f.dtype).reshape(b, 1, gh, gw)
    fp, vp = F.pad(f * valid, (1, 1, 1, 1)), F.pad(valid, (1, 1, 1, 1))
    total, count = torch.zeros_like(f), torch.zeros_like(valid)
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                total = total + fp[:, :, dy:dy + gh, dx:dx + gw]
                count = count + vp[:, :, dy:dy + gh, dx:dx + gw]
    fix = outliers.reshape(b, 1, gh, gw) & (count > 0)
    out = torch.where(fix, total / count.clamp_min(1), f)
    return out.reshape(b, d, n).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- pieces
def cosine(f: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine similarities."""
    fn = F.normalize(f, dim=-1)
    return fn @ fn.transpose(1, 2)


def aggregate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Agg(X, S) = (S / (S 1 + 1e-6)) X."""
    return (s / (s.sum(-1, keepdim=True) + AGG_EPS)) @ x


def thresholded(s: torch.Tensor) -> torch.Tensor:
    """Entries below beta = 0.4 set to 0."""
    return s.masked_fill(s < BETA, 0.0)


def attention_prior(s_mid: torch.Tensor) -> torch.Tensor:
    """A_mid = softmax(M) over the entries M >= 0, M = 3 (S_mid - mean S_mid), one mean per window."""
    m = PRIOR_SCALE * (s_mid - s_mid.mean(dim=(-1, -2), keepdim=True))
    return torch.softmax(m.masked_fill(m < 0, float("-inf")), dim=-1)


def last_block_pass(x: BlockInputs, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """out_proj(concat_h A_h V_h), A_h = (A_mid + softmax(tau K_h K_h^T)) / 2, K, V of the last
    block from ln_1(tokens): (B, N, D) -> (B, N, D); no residual, no FFN."""
    clip = x.clip
    block, d = clip.last_block, clip.width
    b, n, _ = tokens.shape
    w, bias = block.attn.in_proj_weight[d:], block.attn.in_proj_bias
    kv = F.linear(block.ln_1(tokens.to(clip.dtype)), w, None if bias is None else bias[d:]).float()
    k, v = (t.reshape(b, n, x.heads, d // x.heads).transpose(1, 2) for t in (kv[..., :d], kv[..., d:]))
    # (A_mid + softmax(tau K_h K_h^T)) V_h / 2 as A_mid V (one product for every head: A_mid is
    # shared) plus one fused attention per head; the (H, N, N) attention is never formed
    own = F.scaled_dot_product_attention(k, k, v, scale=x.scale).transpose(1, 2).reshape(b, n, d)
    out = 0.5 * (prior @ kv[..., d:] + own)
    return clip.out_proj(out).float()


def check_indices(layers: int, pre_adjust: int, post_adjust: int, multi_start: int, multi_end: int) -> None:
    """Each index names a block whose output exists (0..L-2); the fusion range is not empty."""
    for name, value in (("pre_adjust", pre_adjust), ("post_adjust", post_adjust), ("multi_start", multi_start)):
        check_block_indices(name, [value], layers, last=False)
    if not multi_start < multi_end <= layers - 1:
        raise ValueError(f"multi_end={multi_end}: the fusion sums the outputs of blocks multi_start..multi_end-1 "
                         f"(0-indexed), so multi_end must be in {multi_start + 1}..{layers - 1} for this CLIP "
                         f"(blocks 0..{layers - 1}, multi_start={multi_start})")


def scclip_parts(pre_adjust: int, post_adjust: int, multi_start: int, multi_end: int, res_cls: float,
                 outliers: str, layers: Optional[int] = None) -> Tuple[str, ...]:
    """The tokens SC-CLIP reads: the output of block i is the tokens entering block i + 1."""
    if layers is not None:
        check_indices(layers, pre_adjust, post_adjust, multi_start, multi_end)
    blocks = {pre_adjust, post_adjust, *range(multi_start, multi_end)}
    return tuple(resid_pre(i + 1) for i in sorted(blocks))


# ---------------------------------------------------------------------------------------------- method
def scclip_block(x: BlockInputs, pre_adjust: int, post_adjust: int, multi_start: int, multi_end: int,
                 res_cls: float, outliers: str) -> BlockOutput:
    """SC-CLIP's last block (module docstring): Z (B, N, D) on CLIP's grid, CLS dropped."""
    check_indices(x.clip.num_blocks, pre_adjust, post_adjust, multi_start, multi_end)
    grid = x.grid
    last = x.tokens.float()
    patches = last[:, 1:]
    detect = outlier_tokens if outliers == "lof" else norm_outliers
    mask = x.memoized(f"scclip.outliers.{outliers}", lambda: detect(patches))
    mask = x.point(OUTLIERS, mask.reshape(-1, *grid)).reshape(mask.shape)
    s_mid = cosine(repair(x.layer(pre_adjust + 1)[:, 1:].float(), mask, grid))
    tokens = aggregate(repair(patches, mask, grid), thresholded(s_mid))
    prior = x.point(PRIOR, attention_prior(s_mid))
    s_post = x.memoized(f"scclip.s_post.{post_adjust}",
                        lambda: thresholded(cosine(x.layer(post_adjust + 1)[:, 1:].float())))
    y1 = aggregate(last_block_pass(x, tokens, prior) + res_cls * last[:, :1], s_post)
    fused = x.memoized(f"scclip.fused.{multi_start}.{multi_end}",
                       lambda: sum(x.layer(i + 1).float() for i in range(multi_start, multi_end)))
    y2 = aggregate(last_block_pass(x, fused[:, 1:], prior) + res_cls * fused[:, :1], s_post)
    return BlockOutput(y1 + y2, grid, cls=False)


register_method(Method(
    "scclip", scclip_block, parts=scclip_parts,
    doc="outlier repair, similarity adjustment and multi-level fusion around two last-block passes (SC-CLIP)",
    knobs=(
        Knob("pre_adjust", "int", "S_mid / S_pre from the repaired output of this block (0-indexed; SC-CLIP 8 = "
             "the tokens entering block 9)", low=0, slider=(0, 10, 1)),
        Knob("post_adjust", "int", "S_post from the output of this block (0-indexed; SC-CLIP 3)", low=0,
             slider=(0, 10, 1)),
        Knob("multi_start", "int", "fusion: sum of the outputs of blocks multi_start..multi_end-1 (0-indexed; "
             "SC-CLIP 3)", low=0, slider=(0, 10, 1)),
        Knob("multi_end", "int", "fusion: end of the block range, exclusive (SC-CLIP 10: blocks 3..9)", low=1,
             slider=(1, 11, 1)),
        Knob("res_cls", "float", "weight of the CLS token added to every token after each pass", low=0,
             slider=(0.0, 1.0, 0.05)),
        Knob("outliers", "choice", "outlier detector: lof (SC-CLIP's own LOF, k 30, 5%) or norm (the 10 tokens "
             "of largest norm, its first release)", choices=("lof", "norm")),
    )))
