"""Operations on label maps that region-based methods share (CorrCLIP: proxyclip/zoo/corrclip.py).

- :func:`nearest_labels`: a label map resized by torch's nearest rule (source index
  ``floor(i * in / out)``), values kept exactly;
- :func:`merge_regions`: regions of one window merged by the cosine of their mean features,
  DBSCAN with ``min_samples=1`` written as connected components of ``{D <= eps}`` (every point is a
  core point then, so a cluster is exactly a connected component; no scikit-learn needed);
- :func:`majority_vote`: each region of a label map takes the most frequent predicted class of
  its pixels (CorrCLIP's map correction).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def nearest_labels(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(h, w) integer labels -> (H, W) int64 by ``F.interpolate(mode="nearest")`` (float64 inside:
    exact for any label below 2**53)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    out = F.interpolate(labels.double()[None, None], size=tuple(int(s) for s in size), mode="nearest")[0, 0]
    return out.long()


def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """(R, R) bool symmetric adjacency -> (R,) int64 component ids 0, 1, ... numbered in order of
    their smallest member (min-label propagation; the diagonal is taken as set)."""
    r = adjacency.shape[0]
    adj = adjacency.bool() | torch.eye(r, dtype=torch.bool, device=adjacency.device)
    lab = torch.arange(r, device=adjacency.device)
    while True:
        new = torch.where(adj, lab[None, :], r).amin(dim=1)
        if torch.equal(new, lab):
            break
        lab = new
    return torch.unique(lab, return_inverse=True)[1]


def merge_regions(labels: torch.Tensor, feats: torch.Tensor, eps: float) -> torch.Tensor:
    """Merge the regions of one window on its feature grid.

    ``labels`` (N,) integer region labels of the N cells, ``feats`` (N, C) L2-normalized features.
    Returns (N,) int64 compact ids 0..R-1 in ascending order of the merged labels: 0 is always the
    smallest label present (CorrCLIP's "unsegmented" region r0). With at most two distinct labels
    nothing is merged. Otherwise every label but the smallest gets its mean feature, L2-normalized;
    C = their cosines, D = max(C) - C; labels joined by a chain of D <= eps share one id."""
    u, inv = torch.unique(labels, return_inverse=True)
    if u.numel() <= 2:
        return inv
    sums = torch.zeros(u.numel(), feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, inv, feats)
    means = F.normalize(sums[1:], dim=-1)
    c = means @ means.T
    comp = connected_components((c.max() - c) <= eps)
    new = torch.cat([torch.zeros(1, dtype=torch.long, device=comp.device), comp + 1])
    return new[inv]


def majority_vote(predicted: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(H, W) class labels -> (H, W): every pixel of a region of ``regions`` (H, W) takes the most
    frequent class of its region (the smallest class on a tie, as ``torch.mode`` on the CPU), except
    the pixels of the smallest region label (0, the unsegmented pixels, when present), which keep theirs."""
    if predicted.shape != regions.shape:
        raise ValueError(f"majority_vote: labels of shape {tuple(predicted.shape)} for regions of shape "
                         f"{tuple(regions.shape)}")
    u, inv = torch.unique(regions.to(predicted.device), return_inverse=True)
    k = int(predicted.max()) + 1
    counts = torch.bincount(inv.reshape(-1) * k + predicted.reshape(-1), minlength=u.numel() * k).view(u.numel(), k)
    winner = counts.argmax(dim=1)  # the first maximal count: the smallest class
    return torch.where(inv == 0, predicted, winner[inv])
