"""Proxy attention: the stages of ProxyCLIP's decode, as plain tensor functions.

    features (B, C, H, W) --cosine_affinity--> S (B, N, N)
    S --normalize_affinity(beta, gamma)--> S' = (S - beta * mean(S)) * gamma   (mean per image)
    S' --affinity_mask--> kept = S' >= 0; a row with nothing kept keeps its diagonal
    (S', kept) --masked_softmax--> A (B, N, N), rows sum to 1, never NaN
    (A, values on the VFM grid) --aggregate--> (B, N, D)

All heads of CLIP's last block share A, so the aggregation runs on the full width at once.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_affinity_params(beta: float, gamma: float) -> None:
    """Raise ValueError unless beta >= 0 and gamma > 0 are finite numbers."""
    _check_finite(beta=beta, gamma=gamma)
    if beta < 0:
        raise ValueError(f"beta (affinity shift) must be >= 0, got {beta}")
    if gamma <= 0:
        raise ValueError(f"gamma (affinity scale) must be > 0, got {gamma}")


def check_decision_params(logit_scale: float, prob_thd: float) -> None:
    """Raise ValueError unless logit_scale > 0 and 0 <= prob_thd <= 1 are finite numbers."""
    _check_finite(logit_scale=logit_scale, prob_thd=prob_thd)
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if not 0 <= prob_thd <= 1:
        raise ValueError(f"prob_thd must lie in [0, 1], got {prob_thd}")


def check_hyperparameters(beta: float, gamma: float, logit_scale: float, prob_thd: float) -> None:
    """Raise ValueError naming the first hyperparameter outside its valid range."""
    _check_finite(beta=beta, gamma=gamma, logit_scale=logit_scale, prob_thd=prob_thd)
    check_affinity_params(beta, gamma)
    check_decision_params(logit_scale, prob_thd)


def cosine_affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features -> (B, N, N) cosine similarities of the N = H*W tokens."""
    f = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)
    return f @ f.transpose(1, 2)


def normalize_affinity(affinity: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Adaptive normalization ``(S - beta * mean(S)) * gamma``; the mean is over each image's N x N matrix."""
    mean = affinity.mean(dim=(1, 2), keepdim=True)
    return (affinity - beta * mean) * gamma


def affinity_mask(normalized: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool: True where ``S' >= 0``; a row with no such entry keeps only its diagonal."""
    keep = normalized >= 0
    empty = ~keep.any(dim=-1)  # (B, N)
    if empty.any():
        eye = torch.eye(keep.shape[-1], dtype=torch.bool, device=keep.device)
        keep = keep | (empty[..., None] & eye)
    return keep


def masked_softmax(normalized: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's kept entries (excluded entries get weight 0)."""
    return torch.softmax(normalized.masked_fill(~mask, float("-inf")), dim=-1)


def resize_values(values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, D, gh, gw) CLIP values -> (B, D, H, W) on the VFM grid, bilinear, align_corners=False."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(values, size=size, mode="bilinear", align_corners=False)


def aggregate(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, N, N) attention @ (B, D, H, W) values (N = H*W) -> (B, N, D)."""
    return attention @ values.flatten(2).transpose(1, 2).to(attention.dtype)
