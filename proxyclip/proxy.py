"""Proxy attention: the stages of ProxyCLIP's decode, as plain tensor functions.

    features (B, C, H, W) --cosine_affinity--> S (B, N, N)
    S --normalize_affinity(beta, gamma)--> S' = (S - beta * mean(S)) * gamma   (mean per image)
    S' --affinity_mask--> kept = S' >= 0; a row with nothing kept keeps its diagonal
    (S', kept) --masked_softmax--> A (B, N, N), rows sum to 1, never NaN

All heads of CLIP's last block share A, so the aggregation runs on the full width at once.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


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
