"""The training-free last-block methods: one attention function each, and their registry.

A method is ``fn(x: BlockInputs, **knobs) -> Attention`` (proxyclip/last_block.py): it reads the
queries, keys or VFM features of one batch of windows and says which attention replaces CLIP's
last one. Everything around it (values, out_proj, residual, FFN, head) is shared; whether the
residual and the FFN are kept is a switch of every method (``method.residual``, ``method.ffn``).

Adding a method: write its function, ``register_method(Method(...))`` below, add
``conf/method/<name>.yaml`` (its schema, published switches and knobs) and a test. The equations
and each method's source are in docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import proxy
from .last_block import Attention, BlockInputs


@dataclass(frozen=True)
class Method:
    name: str
    attention: Callable[..., Attention]  # fn(BlockInputs, **knobs) -> Attention
    knobs: Tuple[str, ...] = ()  # method-specific config keys passed to ``attention``
    needs_vfm: bool = False
    check: Optional[Callable[..., None]] = None  # check(**knobs) raises ValueError on a bad value


METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (method.name / method=); known: {', '.join(METHODS)}")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------- patterns
def softmax_attention(a: torch.Tensor, b: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """softmax(scale * a b^T + bias) over the last axis: (B, H, T, d) x2 -> (B, H, T, T)."""
    logits = scale * (a @ b.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1)


def gaussian_neighbourhood(grid: Tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's prior (1+N, 1+N): exp(-|p_i - p_j|^2 / (2 std^2)) over patch positions (in patches);
    zero on the CLS row and column."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    omega = torch.zeros(pos.shape[0] + 1, pos.shape[0] + 1, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * std ** 2))
    return omega.float()


# ---------------------------------------------------------------------------------------------- methods
def vanilla_attention(x: BlockInputs) -> Attention:
    """CLIP's own attention: softmax(tau q k^T) per head."""
    return Attention(softmax_attention(x.q(), x.k(), x.scale), x.grid, cls=True)


def identity_attention(x: BlockInputs) -> Attention:
    """MaskCLIP: every token keeps its own value."""
    b, t = x.tokens.shape[:2]
    return Attention(torch.eye(t, device=x.tokens.device).expand(b, 1, t, t), x.grid, cls=True)


def sclip_attention(x: BlockInputs) -> Attention:
    """SCLIP: softmax(tau q q^T) + softmax(tau k k^T) per head; rows sum to 2 (not renormalized)."""
    q, k = x.q(), x.k()
    pattern = softmax_attention(q, q, x.scale) + softmax_attention(k, k, x.scale)
    return Attention(pattern, x.grid, cls=True, rows_sum_to_one=False)


def clearclip_attention(x: BlockInputs) -> Attention:
    """ClearCLIP: softmax(tau q q^T) per head."""
    q = x.q()
    return Attention(softmax_attention(q, q, x.scale), x.grid, cls=True)


def naclip_attention(x: BlockInputs, gaussian_std: float) -> Attention:
    """NACLIP: softmax(tau k k^T + Omega) per head, Omega the Gaussian neighbourhood prior."""
    k = x.k()
    omega = gaussian_neighbourhood(x.grid, gaussian_std).to(k.device)
    return Attention(softmax_attention(k, k, x.scale, bias=omega), x.grid, cls=True)


def check_naclip(gaussian_std: float) -> None:
    _finite("gaussian_std", gaussian_std)
    if gaussian_std <= 0:
        raise ValueError(f"gaussian_std (NACLIP's neighbourhood sigma, in patches) must be > 0, got {gaussian_std}")


def proxyclip_attention(x: BlockInputs, beta: float, gamma: float, shift: bool = True, mask: bool = True
                        ) -> Attention:
    """ProxyCLIP: one attention for all heads from the VFM's patch affinities, on the VFM grid.

    S = cos(VFM tokens) (memoized per Encoded); S' = gamma * (S - beta * mean S) (``shift``; else
    gamma * S); entries S' < 0 excluded (``mask``); softmax. Hooks: ``proxy.*``.
    """
    feats = x.vfm_features
    s = x.point("proxy.affinity", x.memoized("proxy.affinity", lambda: proxy.cosine_affinity(feats)))
    s = x.point("proxy.affinity_normalized", proxy.normalize_affinity(s, beta if shift else 0.0, gamma))
    keep = proxy.affinity_mask(s) if mask else torch.ones_like(s, dtype=torch.bool)
    keep = x.point("proxy.mask", keep)
    attn = x.point("proxy.attention", proxy.masked_softmax(s, keep))
    return Attention(attn[:, None], tuple(feats.shape[-2:]), cls=False)


def check_proxyclip(beta: float, gamma: float, shift: bool = True, mask: bool = True) -> None:
    proxy.check_affinity_params(beta, gamma)


def _finite(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


register_method(Method("clip", vanilla_attention))
register_method(Method("maskclip", identity_attention))
register_method(Method("sclip", sclip_attention))
register_method(Method("clearclip", clearclip_attention))
register_method(Method("naclip", naclip_attention, knobs=("gaussian_std",), check=check_naclip))
register_method(Method("proxyclip", proxyclip_attention, knobs=("beta", "gamma", "shift", "mask"), needs_vfm=True,
                       check=check_proxyclip))
