"""GEM (Bars et al., CVPR 2024): the grounding everything module, a self-self attention path.

The original ViT runs unchanged (the encode). Beside it, over the last ``depth - 1`` blocks
(``depth`` 7 = the last six; blocks L-depth+1 .. L-1, 0-indexed), a second path G accumulates
(docs/methods.md):

    G = X_s  (the tokens entering block s = L - depth + 1, CLS included)
    for each block l = s .. L-1, with U = ln_1(X_l) and Q, K, V = in_proj(U) per head, all from
    the *original* path's tokens X_l:
        beta = mean_t |U_t| * d^-1/2 (adaptive, one per window and block) or a fixed ``temp``
        for Z in (V, K, Q): ``iterations`` times Z <- softmax(beta Z^ Z^T) Z^  (Z^ = Z L2-normalized
        per token and head); then A_Z = softmax(beta Z^ Z^T)
        O = out_proj(concat_h (A_V + A_K + A_Q)_h V_h / 3)
        G <- G + ls_1(O)          (no LayerNorm, no FFN on the path; G never feeds the original path)
    then the shared head on G (ln_post, proj, L2 norm, CLS dropped).

``normalize`` (GEM's own default; false here so that scores stay cosines) min-max normalizes each
query's map per window, and the method then returns window scores.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hooks import declare_hook
from ..knobs import Knob
from ..last_block import Attention, BlockInputs, BlockOutput, Scores, dense_from_block_output
from ..methods import Method, register_method
from ..parts import resid_pre

TEMPERATURE = declare_hook("gem.temperature", "window", "(n, depth-1)",
                           "beta of each block on the GEM path, first to last (adaptive: the mean token norm of "
                           "ln_1(X) times d^-1/2; else the fixed temp) (gem)", "method")


def check_depth(depth: int, layers: int) -> int:
    """The first block (0-indexed) of the path: L - depth + 1, which must exist."""
    if not 2 <= depth <= layers + 1:
        raise ValueError(f"depth={depth}: GEM runs over the last depth-1 blocks and this CLIP has {layers} "
                         f"(blocks 0..{layers - 1}): depth must be in 2..{layers + 1} (7 = the last six)")
    return layers - depth + 1


def gem_parts(depth: int, iterations: int, temp: float, normalize: bool, layers: Optional[int] = None
              ) -> Tuple[str, ...]:
    """The tokens entering each block of the path (the last one's is the Encoded's own)."""
    if layers is None:
        raise ValueError("gem's parts depend on the CLIP's block count: call proxyclip.parts.method_parts "
                         "with layers=")
    return tuple(resid_pre(i) for i in range(check_depth(depth, layers), layers))


def self_self(z: torch.Tensor, beta: torch.Tensor, iterations: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, T, T): ``iterations`` times Z <- softmax(beta Z^ Z^T) Z^, then
    softmax(beta Z^ Z^T); Z^ = Z L2-normalized over d; beta (B, 1, 1, 1)."""
    for _ in range(iterations):
        zn = F.normalize(z, dim=-1)
        z = torch.softmax((beta * zn) @ zn.transpose(-1, -2), dim=-1) @ zn  # beta on (T, d), not (T, T)
    zn = F.normalize(z, dim=-1)
    return torch.softmax((beta * zn) @ zn.transpose(-1, -2), dim=-1)


def self_self_mix(z: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, iterations: int) -> torch.Tensor:
    """``self_self(z, beta, iterations) @ v`` without the (T, T) matrix: each softmax(beta Z^ Z^T) Y
    as one fused attention (``scaled_dot_product_attention`` of queries beta Z^, keys Z^, scale 1)."""
    for _ in range(iterations):
        zn = F.normalize(z, dim=-1)
        z = F.scaled_dot_product_attention(beta * zn, zn, zn, scale=1.0)
    zn = F.normalize(z, dim=-1)
    return F.scaled_dot_product_attention(beta * zn, zn, v, scale=1.0)


def _ln_1(x: BlockInputs, i: int) -> torch.Tensor:
    clip = x.clip
    return clip.block(i).ln_1(x.layer(i).to(clip.dtype))


def temperatures(x: BlockInputs, start: int, temp: float, normed=None) -> torch.Tensor:
    """(B, L - start) beta of each block of the path: ``temp`` when > 0, else the adaptive
    mean over the T tokens of |ln_1(X_l)_t| (the full width D) times d^-1/2, d the head width
    (``normed``: the blocks' ln_1(X_l), first to last, when computed before)."""
    clip = x.clip
    betas = []
    for n, i in enumerate(range(start, clip.num_blocks)):
        block, tokens = clip.block(i), x.layer(i)
        if temp > 0:
            betas.append(torch.full(tokens.shape[:1], float(temp), device=tokens.device))
        else:
            d = tokens.shape[-1] // int(block.attn.num_heads)
            u = _ln_1(x, i) if normed is None else normed[n]
            betas.append(u.float().norm(dim=-1).mean(-1) * d ** -0.5)
    return torch.stack(betas, dim=1)


def gem_path(x: BlockInputs, depth: int, iterations: int, temp: float) -> torch.Tensor:
    """G (B, T, D) after the last block of the path (module docstring).

    Per block, (A_V + A_K + A_Q) V / 3 is computed as (A_V V + A_K V + A_Q V) / 3, each term one
    fused attention (:func:`self_self_mix`), the (T, T) matrices never formed."""
    clip = x.clip
    layers = clip.num_blocks
    start = check_depth(depth, layers)
    normed = [_ln_1(x, i) for i in range(start, layers)]
    betas = x.point(TEMPERATURE, temperatures(x, start, temp, normed))
    g = x.layer(start).float()
    for n, i in enumerate(range(start, layers)):
        block = clip.block(i)
        b, t, d = x.layer(i).shape
        h = int(block.attn.num_heads)
        qkv = F.linear(normed[n], block.attn.in_proj_weight, block.attn.in_proj_bias).float()
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(b, t, h, d // h).transpose(1, 2) for j in range(3))
        beta = betas[:, n].view(b, 1, 1, 1)
        mixed = (self_self_mix(v, v, beta, iterations) + self_self_mix(k, v, beta, iterations)
                 + self_self_mix(q, v, beta, iterations)) / 3
        out = block.attn.out_proj(mixed.transpose(1, 2).reshape(b, t, d).to(clip.dtype)).float()
        g = g + (getattr(block, "ls_1", None) or nn.Identity())(out)
    return g


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """(B, Q, h, w): each map scaled to [0, 1] over its h x w values (a constant map -> 0)."""
    lo = scores.amin(dim=(-1, -2), keepdim=True)
    hi = scores.amax(dim=(-1, -2), keepdim=True)
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def gem_block(x: BlockInputs, depth: int, iterations: int, temp: float, normalize: bool
              ) -> Union[BlockOutput, Scores]:
    """GEM: its path's output (B, T, D), CLS first; with ``normalize`` the min-maxed window scores."""
    g = gem_path(x, depth, iterations, temp)
    if not normalize:
        return BlockOutput(g, x.grid, cls=True)
    if x.text is None:
        raise ValueError("gem with normalize=true makes min-max normalized window scores and needs the queries' "
                         "text embeddings (decode with classes), not dense embeddings")
    dense = dense_from_block_output(x.clip, g, Attention(torch.empty(0), x.grid, cls=True))
    return Scores(min_max(torch.einsum("behw,qe->bqhw", dense, x.text.to(dense.dtype))))


register_method(Method(
    "gem", gem_block, parts=gem_parts,
    doc="self-self attention path over the last blocks, original tokens' q, k, v (GEM)",
    knobs=(
        Knob("depth", "int", "the path runs over the last depth-1 blocks (GEM 7 = the last six)", low=2,
             slider=(2, 13, 1)),
        Knob("iterations", "int", "self-self iterations of each of the v, k, q paths before the attention "
             "(ss_attn_iter)", low=0, slider=(0, 5, 1)),
        Knob("temp", "float", "fixed softmax temperature beta; 0 = adaptive, mean |ln_1(X)| d^-1/2 per block "
             "and window (GEM's default)", low=0, slider=(0.0, 20.0, 0.5)),
        Knob("normalize", "bool", "min-max each query's map per window (GEM's default true; false keeps "
             "cosine scores)"),
    )))
