"""ResCLIP (Yang et al., CVPR 2025): Residual Cross-correlation Self-attention (RCS) and Semantic
Feedback Refinement (SFR) over a NACLIP, ClearCLIP or SCLIP last block (docs/methods.md, "ResCLIP").

Per window, with tau = d^-1/2 and the decode's switches (residual, ffn) for both passes:

    A_rcs,h = mean_{l in rcs_layers} softmax(tau Q_l,h K_l,h^T)      (blocks' own attention, CLS included)
    naclip:    P_h = softmax(mix(tau K_h K_h^T) + Omega)             (Omega: NACLIP's Gaussian prior)
    clearclip: P_h = softmax(mix(tau Q_h Q_h^T))
    sclip:     P_h = softmax(mix(tau Q_h Q_h^T)) + softmax(mix(tau K_h K_h^T))
    mix(S) = tau_sfr ((1 - lambda_sfr) S + lambda_sfr A_sfr)   (SFR, logits; pass 2 only)
    A_h = tau_rcs ((1 - lambda_rcs) P_h + lambda_rcs A_rcs,h)    (RCS, probabilities; rows not renormalized)

SFR runs the last block twice: pass 1 (RCS, no SFR) gives cosine scores, bilinear to the window,
PAMR (10 steps, dilations 8 and 16, guided by the window's pixels), softmax(40 s) over the queries;
the query index per pixel (best probability < temp_thd -> query 0), the mode per patch, then
M_ij = [l_i = l_j] (pairs whose straight walk leaves the label decay by exp(-d_ij / D) with
``delete_same_entity``), each row blurred by a 1-D Gaussian along the raster index, ReLU, rows
normalized, divided by the global max, rounded to float16: A_sfr, zero CLS row and column.
Pass 2 (RCS and SFR) returns its per-head pattern; the shared last block applies it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..hooks import declare_hook
from ..knobs import Knob
from ..last_block import Attention, BlockInputs, dense_from_block_output, run_last_block
from ..methods import Method, gaussian_neighbourhood, register_method
from ..parts import check_block_indices, resid_pre
from ..postprocess import pamr, pamr_matrix, pamr_weights

log = logging.getLogger(__name__)

BASES = ("naclip", "clearclip", "sclip")
PROVISIONAL_LOGIT_SCALE = 40.0  # SFR's provisional softmax (the official logit scale everywhere)
PAMR_STEPS, PAMR_DILATIONS = 10, (8, 16)  # SFR's provisional PAMR (always on)

RCS_ATTENTION = declare_hook("resclip.rcs_attention", "window", "(n, H, T, T)",
                             "RCS: mean of softmax(tau q k^T) of the `rcs_layers` blocks, per head, CLS included "
                             "(resclip)", "method")
PATCH_LABELS = declare_hook("resclip.patch_labels", "window", "(n, gh, gw)",
                            "SFR's provisional label per patch: a query index, the mode over its pixels (resclip)",
                            "method")
SFR_MATRIX = declare_hook("resclip.sfr", "window", "(n, T, T)",
                          "SFR's matrix A_sfr / max, rounded to float16, zero CLS row and column (resclip)", "method")


# ---------------------------------------------------------------------------------------------- checks
def check_resclip(knobs: Mapping[str, Any], layers: int) -> None:
    """``rcs_layers`` within this CLIP's blocks (when RCS is on); ``base=sclip`` only with the
    residual and the FFN."""
    if knobs.get("rcs", True):
        check_block_indices("rcs_layers", knobs["rcs_layers"], layers)
    if knobs["base"] == "sclip" and not (knobs["residual"] and knobs["ffn"]):
        raise ValueError(f"resclip base=sclip runs ResCLIP's w_resi block (residual and FFN kept), got residual="
                         f"{str(knobs['residual']).lower()} ffn={str(knobs['ffn']).lower()}: set "
                         "method.residual=true method.ffn=true (naclip and clearclip run with both false)")


def resclip_parts(rcs_layers: Sequence[int], rcs: bool = True, **_: Any) -> Tuple[str, ...]:
    """The tokens entering each ``rcs_layers`` block (none with RCS off)."""
    return tuple(resid_pre(i) for i in rcs_layers) if rcs else ()


# ---------------------------------------------------------------------------------------------- RCS
def rcs_attention(x: BlockInputs, layers: Sequence[int]) -> torch.Tensor:
    """(B, H, T, T) mean over ``layers`` of each block's own softmax(tau q k^T), per head."""
    total = None
    for i in layers:
        q, k = block_qk(x.clip, i, x.layer(i))
        a = torch.softmax((q.shape[-1] ** -0.5) * (q @ k.transpose(-1, -2)), dim=-1)
        total = a if total is None else total.add_(a)
    return total / len(layers)


def block_qk(clip: Any, i: int, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k of block ``i`` (``clip.block_qkv`` without its values): two (B, H, T, D/H) float32 tensors."""
    block, d = clip.block(i), clip.width
    bias = block.attn.in_proj_bias
    qk = F.linear(block.ln_1(tokens.to(clip.dtype)), block.attn.in_proj_weight[:2 * d],
                  None if bias is None else bias[:2 * d]).float()
    b, t = tokens.shape[:2]
    h = int(block.attn.num_heads)
    return tuple(qk[..., j * d:(j + 1) * d].view(b, t, h, d // h).transpose(1, 2) for j in range(2))


# ---------------------------------------------------------------------------------------------- last block
def base_attention(x: BlockInputs, base: str, gaussian_std: float, sfr: Optional[torch.Tensor] = None,
                   sfr_weight: float = 0.0, sfr_temp: float = 1.0) -> torch.Tensor:
    """The base's per-head probabilities P (B, H, T, T), SFR mixed into its logits when ``sfr``
    (B, T, T) is given: tau_sfr ((1 - lambda_sfr) S + lambda_sfr A_sfr), before the softmax (and Omega)."""

    def mixed(a: torch.Tensor) -> torch.Tensor:
        s = x.scale * (a @ a.transpose(-1, -2))
        if sfr is not None:
            s = sfr_temp * ((1.0 - sfr_weight) * s + sfr_weight * sfr[:, None].to(s.dtype))
        return s

    if base == "naclip":
        k = x.k()
        omega = neighbourhood_prior(x.grid, gaussian_std, k.device)
        return torch.softmax(mixed(k) + omega, dim=-1)
    if base == "clearclip":
        return torch.softmax(mixed(x.q()), dim=-1)
    return torch.softmax(mixed(x.q()), dim=-1) + torch.softmax(mixed(x.k()), dim=-1)  # sclip


_PRIORS: dict = {}


def neighbourhood_prior(grid: Tuple[int, int], std: float, device) -> torch.Tensor:
    """NACLIP's Gaussian prior Omega of ``grid`` (``methods.gaussian_neighbourhood``), cached per
    (grid, std, device): it depends on neither the image nor the decode's other knobs."""
    key = (tuple(int(g) for g in grid), float(std), str(device))
    if key not in _PRIORS:
        if len(_PRIORS) > 16:
            _PRIORS.clear()
        _PRIORS[key] = gaussian_neighbourhood(key[0], key[1]).to(device)
    return _PRIORS[key]


def with_rcs(p: torch.Tensor, a_rcs: Optional[torch.Tensor], weight: float, temp: float) -> torch.Tensor:
    """RCS after the softmax: tau_rcs ((1 - lambda_rcs) P + lambda_rcs A_rcs); P itself without RCS."""
    return p if a_rcs is None else temp * ((1.0 - weight) * p + weight * a_rcs)


# ---------------------------------------------------------------------------------------------- SFR
def provisional_labels(x: BlockInputs, pattern: torch.Tensor, temp_thd: float) -> torch.Tensor:
    """Pass 1: the last block with ``pattern``, cosine scores at window size, PAMR, softmax(40 s)
    over the queries -> (B, gh, gw) query index per patch (the mode of its pixels' labels)."""
    if x.text is None:
        raise ValueError("resclip's SFR needs the decode's query embeddings (its provisional segmentation): "
                         "decode with classes, or with sfr=false")
    quiet = copy.copy(x)  # pass 1 runs the shared block without firing its hook points
    quiet.point = lambda name, tensor: tensor
    att = Attention(pattern, x.grid, cls=True, rows_sum_to_one=False)
    z = run_last_block(quiet, att, x.switches["residual"], x.switches["ffn"])
    dense = dense_from_block_output(x.clip, z, att)
    pixels = x.memoized("resclip.pixels", x.window_pixels)
    scores = torch.einsum("behw,qe->bqhw", dense, x.text.to(dense.dtype))
    scores = F.interpolate(scores, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    out = []
    for i, (s, guide) in enumerate(zip(scores, pixels)):
        try:  # PAMR's step (a sparse matrix) depends on the window's pixels only: once per Encoded
            step = x.memoized(f"resclip.pamr_matrix.{i}",
                              lambda: pamr_matrix(pamr_weights(guide, PAMR_DILATIONS), PAMR_DILATIONS))
            s = pamr(s, guide, PAMR_STEPS, PAMR_DILATIONS, matrix=step)
        except RuntimeError as err:  # the official code skips its PAMR on a RuntimeError
            log.warning("resclip: provisional PAMR skipped (%s)", err)
        prob = torch.softmax(PROVISIONAL_LOGIT_SCALE * s, dim=0)
        best, label = prob.max(dim=0)
        label = torch.where(best < temp_thd, torch.zeros_like(label), label)
        out.append(patch_mode(label, x.clip.patch_size, x.grid, s.shape[0]))
    return torch.stack(out)


def patch_mode(labels: torch.Tensor, patch: int, grid: Tuple[int, int], n_labels: int) -> torch.Tensor:
    """(H, W) pixel labels -> (gh, gw): the most frequent label of each patch's pixels (ties: the
    smallest label); pixels past the last whole patch are ignored."""
    gh, gw = grid
    cells = labels[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch).permute(0, 2, 1, 3)
    cells = cells.reshape(gh * gw, patch * patch)
    index = torch.arange(gh * gw, device=labels.device)[:, None] * n_labels + cells
    counts = torch.bincount(index.flatten(), minlength=gh * gw * n_labels).view(gh * gw, n_labels)
    return counts.argmax(dim=1).reshape(gh, gw)  # argmax: the first (smallest) label among equal counts


def chebyshev(grid: Tuple[int, int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch positions (N, 2) int64 (row, col) in raster order, and d_ij = max(|dr|, |dc|) (N, N)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    return pos, (pos[:, None] - pos[None]).abs().amax(dim=-1)


def walk_table(length: int, big_d: int, device=None) -> torch.Tensor:
    """(D + 1, length, length) int64: round(a + (n / D)(b - a)) for coordinates a, b of one axis,
    float32, half to even (one axis of the path check; the two axes are independent)."""
    a = torch.arange(length, dtype=torch.float32, device=device)
    t = torch.arange(big_d + 1, dtype=torch.float32, device=device) / torch.tensor(float(big_d), device=device)
    return torch.round(a[None, :, None] + t[:, None, None] * (a[None, None, :] - a[None, :, None])).long()


_WALKS: dict = {}


def walks(grid: Tuple[int, int], device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every step of the path check on a gh x gw grid, flattened (cached per grid): for each pair
    (i, j) with d_ij > 0 and each n = 1..d_ij, the pair's flat index i N + j, its p_i (int64) and
    the cell round(p_i + (n / D)(p_j - p_i)) (float32, half to even per axis; D = max d) -> (pair,
    source, cell, D)."""
    key = (tuple(int(g) for g in grid), str(device))
    if key not in _WALKS:
        gh, gw = key[0]
        pos, d = chebyshev((gh, gw), device)
        big_d = int(d.max())
        n_tok = gh * gw
        if big_d == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            _WALKS[key] = (empty, empty, empty, 0)
            return _WALKS[key]
        rows, cols = walk_table(gh, big_d, device), walk_table(gw, big_d, device)
        pi, pj = (d > 0).nonzero(as_tuple=True)
        steps = d[pi, pj]
        pair, source, cell = [], [], []
        for n in range(1, big_d + 1):  # n = 0 is p_i itself; t = n / D <= 1 stays on the segment
            on = steps >= n
            i, j = pi[on], pj[on]
            pair.append(i * n_tok + j)
            source.append(i)
            cell.append(rows[n][pos[i, 0], pos[j, 0]] * gw + cols[n][pos[i, 1], pos[j, 1]])
        if len(_WALKS) > 8:
            _WALKS.clear()
        _WALKS[key] = (torch.cat(pair), torch.cat(source), torch.cat(cell), big_d)
    return _WALKS[key]


def valid_paths(labels: torch.Tensor, only: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The path check on a (gh, gw) label grid: for every pair (i, j) (or the pairs ``only`` (N, N)
    marks; the others are reported valid) the points p_i + (n / D)(p_j - p_i), n = 0..d_ij, float32,
    rounded half to even, D = max d over all pairs; valid iff every point has label l_i.
    -> (valid (N, N) bool, d (N, N), D)."""
    gh, gw = labels.shape
    _, d = chebyshev((gh, gw), labels.device)
    pair, source, cell, big_d = walks((gh, gw), labels.device)
    flat = labels.flatten()
    valid = torch.ones(d.numel(), dtype=torch.bool, device=labels.device)
    if big_d > 0:
        left = flat[cell] != flat[source]  # a step off the label of p_i
        valid[pair[left]] = False
    valid = valid.view_as(d)
    if only is not None:
        valid = valid | ~only
    return valid, d, big_d


def gaussian_kernel_1d(n: int, std: float) -> torch.Tensor:
    """The SFR blur's kernel: size min(n, int(6 std + 1)), made odd (+1), g_m ~ exp(-m^2 / 2 std^2), sum 1."""
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    m = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-m ** 2 / (2 * std ** 2))
    return g / g.sum()


def sfr_matrix(labels: torch.Tensor, delete_same_entity: bool, std: float) -> torch.Tensor:
    """(gh, gw) patch labels -> A_sfr (T, T) float32: same-label matrix (path decay), 1-D blur along
    the raster index of j, ReLU, rows normalized; zero CLS row and column; / max; rounded to float16."""
    flat = labels.flatten()
    n = flat.numel()
    m = (flat[:, None] == flat[None, :]).float()
    m.fill_diagonal_(1.0)
    if delete_same_entity:
        valid, d, big_d = valid_paths(labels, only=m > 0)
        if big_d > 0:
            m = torch.where(valid, m, m * torch.exp(-d.float() / big_d))
    g = gaussian_kernel_1d(n, std).to(m.device)
    blurred = F.relu(F.conv1d(m[:, None], g.view(1, 1, -1), padding=g.numel() // 2)[:, 0])
    blurred = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    a = torch.zeros(n + 1, n + 1, device=m.device)
    a[1:, 1:] = blurred
    return (a / a.max()).half().float()


# ---------------------------------------------------------------------------------------------- the method
def resclip_attention(x: BlockInputs, base: str, rcs_layers: Sequence[int], rcs: bool, rcs_weight: float,
                      rcs_temp: float, sfr: bool, sfr_weight: float, sfr_temp: float, temp_thd: float,
                      delete_same_entity: bool, gaussian_std: float) -> Attention:
    """ResCLIP's final-pass attention (B, H, T, T), CLS included, rows summing to tau_rcs (not 1)."""
    if not x.switches:
        raise ValueError("resclip runs the last block itself (SFR's pass 1): its BlockInputs need the decode's "
                         "switches (residual, ffn)")
    check_resclip({"base": base, "rcs_layers": rcs_layers, "rcs": rcs, **x.switches}, x.clip.num_blocks)
    a_rcs = None
    if rcs:
        layers = tuple(int(i) for i in rcs_layers)
        a_rcs = x.point(RCS_ATTENTION, x.memoized(f"resclip.rcs{layers}", lambda: rcs_attention(x, layers)))
    a_sfr = None
    if sfr:
        first = with_rcs(base_attention(x, base, gaussian_std), a_rcs, rcs_weight, rcs_temp)
        labels = x.point(PATCH_LABELS, provisional_labels(x, first, temp_thd))
        a_sfr = x.point(SFR_MATRIX, torch.stack([sfr_matrix(lab, delete_same_entity, gaussian_std)
                                                 for lab in labels]))
    p = base_attention(x, base, gaussian_std, a_sfr, sfr_weight, sfr_temp)
    return Attention(with_rcs(p, a_rcs, rcs_weight, rcs_temp), x.grid, cls=True, rows_sum_to_one=False)


def _unit(name: str, doc: str) -> Knob:
    return Knob(name, "float", doc, low=0, high=1, slider=(0.0, 1.0, 0.05))


def _temp(name: str, doc: str) -> Knob:
    return Knob(name, "float", doc, low=0, low_open=True, slider=(0.5, 4.0, 0.1))


register_method(Method(
    "resclip", resclip_attention, parts=resclip_parts, check=check_resclip,
    doc="RCS (blocks' attention) and SFR (a provisional segmentation's matrix) over a NACLIP, ClearCLIP or SCLIP block",
    knobs=(
        Knob("base", "choice", "the last block ResCLIP mixes into (sclip needs residual=true ffn=true)",
             choices=BASES),
        Knob("rcs_layers", "ints", "RCS: CLIP blocks (0-indexed) whose softmax(tau q k^T) is averaged", low=0),
        Knob("rcs", "bool", "RCS on: A = rcs_temp ((1 - rcs_weight) P + rcs_weight A_rcs), after the softmax"),
        _unit("rcs_weight", "RCS weight lambda_rcs"),
        _temp("rcs_temp", "RCS scale tau_rcs (rows of A sum to it)"),
        Knob("sfr", "bool", "SFR on: a provisional pass, its label matrix mixed into the logits (two passes)"),
        _unit("sfr_weight", "SFR weight lambda_sfr"),
        _temp("sfr_temp", "SFR scale tau_sfr of the mixed logits (before the softmax)"),
        _unit("temp_thd", "SFR: provisional best probability below this -> query 0"),
        Knob("delete_same_entity", "bool", "SFR: same-label pairs whose straight walk leaves the label decay by "
             "exp(-d/D)"),
        Knob("gaussian_std", "float", "sigma (patches) of NACLIP's prior and of SFR's 1-D blur", low=0, low_open=True,
             slider=(0.5, 20.0, 0.5)),
    )))
