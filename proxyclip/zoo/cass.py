"""CASS (Kim et al., CVPR 2025): the last block's attention from a spectral fusion of CLIP's and a
VFM's (DINO ViT-B/8) key graphs, and an object-presence prior on the text side (docs/methods.md).

Per window, with k the last block's keys and K^D the VFM's last-block keys (both per head, CLS
dropped; K^D resized bilinear to CLIP's grid and min-max mapped onto the range of k):

    A_h = tau k_h k_h^T,  G_h = tau K^D_h K^D_h^T                    (N x N graphs per head)
    cost[i, j] = 1 - dist(spectrum(G_i), spectrum(A_j))           rows: VFM heads, columns: CLIP heads
    c = linear_sum_assignment(cost)                                   (maximizes the spectral distance)
    CLIP head i fuses the rank-r graph of VFM head c[i] with w = 1 - cost[i, c[i]] (swapped, as published):
    M_i = (sf w D_i + A_i) / (sf w + 1),  P_i = softmax(M_i + Omega),  O = out_proj(concat_i P_i v_i)
    F = L2(ln_post(O) proj);  s = (1 - w_g) F T'^T + w_g (g T^T)       (g: the window's CLS embedding)

T' adjusts one query per Ward cluster of the query names towards its two best patches. The scores
are returned as :class:`Scores` on CLIP's grid. Heavy, text-independent steps (the spectra, the
low-rank factors, the window's CLS embedding) are memoized per Encoded.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import declare_hook
from ..knobs import Knob
from ..last_block import BlockInputs, Scores
from ..methods import Method, gaussian_neighbourhood, register_method

SVD_SEED = 42  # every randomized SVD draws its sketch from this seed (the official's run seed)

COST = declare_hook("cass.cost", "window", "(n, H, H)",
                    "CASS: 1 - spectral distance, rows the VFM's heads, columns CLIP's", "method")
ASSIGNMENT = declare_hook("cass.assignment", "window", "(n, H) int64",
                          "CASS: the CLIP head matched to each VFM head (linear_sum_assignment of cass.cost)", "method")
PRIOR = declare_hook("cass.prior", "window", "(n, Q)", "CASS: object-presence prior g·T of the window's CLS embedding",
                     "method")
TEXT = declare_hook("cass.text", "window", "(n, Q, E)", "CASS: the query embeddings after the per-cluster adjustment",
                    "method")
PATTERN = "attention.pattern"  # declared by the pipeline; (n, H, N, N) here: no CLS
BLOCK_OUTPUT, DENSE = "clip.last_block_output", "clip.dense"


def _scipy():
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.optimize import linear_sum_assignment
        from scipy.spatial.distance import squareform
    except ImportError:  # pragma: no cover - scipy is a declared extra
        raise ImportError("method=cass needs scipy (Hungarian matching, Ward clustering): "
                          "pip install 'proxyclip[inside]'") from None
    return linear_sum_assignment, linkage, fcluster, squareform


# ---------------------------------------------------------------------------------------------- graph side
def vfm_keys_on_grid(feats: torch.Tensor, grid: Tuple[int, int], k: torch.Tensor, heads: int) -> torch.Tensor:
    """VFM keys (B, C, Hv, Wv) -> (B, H, N, C/H): bilinear to CLIP's ``grid``, then min-max mapped
    per window over all heads, tokens and channels onto [min k, max k] of CLIP's keys k (B, H, N, d)."""
    b, c = feats.shape[:2]
    kd = F.interpolate(feats.double(), size=tuple(grid), mode="bilinear", align_corners=False).flatten(2)
    lo, hi = kd.amin(dim=(1, 2), keepdim=True), kd.amax(dim=(1, 2), keepdim=True)
    klo, khi = k.double().amin(dim=(1, 2, 3))[:, None, None], k.double().amax(dim=(1, 2, 3))[:, None, None]
    kd = (kd - lo) / (hi - lo).clamp_min(1e-12) * (khi - klo) + klo
    return kd.view(b, heads, c // heads, -1).transpose(-1, -2)


def top_spectra(keys: torch.Tensor, scale: float, k_eigen: int) -> torch.Tensor:
    """(B, H, N, d) keys -> (B, H, k) the top eigenvalues of tau K K^T (descending, float64), each
    L2-normalized; k = min(k_eigen, N). The non-zero spectrum of K K^T is that of K^T K (d x d)."""
    k64 = keys.double()
    small = k64.shape[-2] > k64.shape[-1]
    gram = scale * (k64.transpose(-1, -2) @ k64 if small else k64 @ k64.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(gram).flip(-1)
    kk = min(int(k_eigen), keys.shape[-2])
    lam = lam[..., :kk]
    if lam.shape[-1] < kk:  # N > d: the N x N spectrum's tail is zero
        lam = F.pad(lam, (0, kk - lam.shape[-1]))
    return lam / lam.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def spectral_cost(lam_vfm: torch.Tensor, lam_clip: torch.Tensor) -> torch.Tensor:
    """cost[i, j] = 1 - sum_t |sort(p_i)_t - sort(q_j)_t|, p = lam_vfm / L1, q = lam_clip / L1: (B, H, H)."""
    p = (lam_vfm / lam_vfm.sum(-1, keepdim=True)).sort(dim=-1).values
    q = (lam_clip / lam_clip.sum(-1, keepdim=True)).sort(dim=-1).values
    return 1.0 - (p[:, :, None, :] - q[:, None, :, :]).abs().sum(-1)


def match_heads(cost: torch.Tensor) -> torch.Tensor:
    """(B, H, H) cost -> (B, H) int64: the column (CLIP head) ``linear_sum_assignment`` gives each row."""
    lsa = _scipy()[0]
    cols = []
    for c in cost.detach().cpu().double().numpy():
        rows, col = lsa(c)
        assert (rows == np.arange(len(rows))).all()
        cols.append(col)
    return torch.as_tensor(np.stack(cols), dtype=torch.long, device=cost.device)


def low_rank(keys: torch.Tensor, scale: float, rank: int, svd: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factors U (.., N, r), S (.., r), V (.., N, r) of each graph G = scale K K^T of the keys
    (.., N, d), float64; r = min(rank, N). ``randomized``: ``torch.svd_lowrank(G, q=r, niter=2)``'s
    steps (Halko et al.'s range finder: R, then Q = qr(G R), two power iterations, svd(Q^T G)) with G
    applied as scale K (K^T X), never formed; its sketch R (N x r) drawn from SVD_SEED for every graph,
    the global RNG left as it was. ``exact``: the top r singular triplets of G."""
    k = keys.double()
    n = k.shape[-2]
    r = min(int(rank), n)
    if svd == "exact":
        u, s, vh = torch.linalg.svd(scale * (k @ k.transpose(-1, -2)))
        return u[..., :r], s[..., :r], vh[..., :r, :].transpose(-1, -2)
    with torch.random.fork_rng(devices=[k.device] if k.device.type == "cuda" else []):
        torch.manual_seed(SVD_SEED)
        sketch = torch.randn(n, r, dtype=k.dtype, device=k.device)

    def g(x: torch.Tensor) -> torch.Tensor:  # G x (G is symmetric: G^H x too)
        return scale * (k @ (k.transpose(-1, -2) @ x))

    q = torch.linalg.qr(g(sketch)).Q
    for _ in range(2):
        q = torch.linalg.qr(g(q)).Q
        q = torch.linalg.qr(g(q)).Q
    u, s, vh = torch.linalg.svd(g(q).transpose(-1, -2), full_matrices=False)  # Q^H G = (G Q)^H
    return q @ u, s, vh.transpose(-1, -2)


def eigenscale(s: torch.Tensor) -> torch.Tensor:
    """Dynamic eigenscaling: [s_min, s_max] -> [0.5 s_min, 1.5 s_max], linearly (per graph, last axis);
    a graph whose values are all equal (rank 1) keeps them (its range-mapped graph is scale-free anyway)."""
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (s - lo) / span.clamp_min(1e-300) * (1.5 * hi - 0.5 * lo) + 0.5 * lo, s)


def range_map(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Min-max map each (N, N) matrix of ``x`` onto [min, max] of the same-index matrix of ``like``."""
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    tlo, thi = like.amin(dim=(-2, -1), keepdim=True), like.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-300) * (thi - tlo) + tlo


def fused_graphs(a: torch.Tensor, factors, cols: torch.Tensor, cost: torch.Tensor, eigenscaling: bool,
                 scale_factor: float) -> torch.Tensor:
    """M (B, H, N, N): CLIP head i with the low-rank graph of VFM head j = cols[i], weight
    w = 1 - cost[i, j] (the published index swap); L = U diag(s') V^T, diag(L) := 0, then mapped onto
    A_i's range (D_i); M_i = (sf w D_i + A_i) / (sf w + 1)."""
    u, s, v = factors
    idx = cols[:, :, None, None]
    u = torch.gather(u, 1, idx.expand(-1, -1, *u.shape[-2:]))
    v = torch.gather(v, 1, idx.expand(-1, -1, *v.shape[-2:]))
    s = torch.gather(s, 1, cols[:, :, None].expand(-1, -1, s.shape[-1]))
    if eigenscaling:
        s = eigenscale(s)
    lr = (u * s[..., None, :]) @ v.transpose(-1, -2)
    lr = lr - torch.diag_embed(lr.diagonal(dim1=-2, dim2=-1))
    d = range_map(lr, a)
    w = (1.0 - torch.gather(cost, 2, cols[:, :, None]))[..., None]  # (B, H, 1, 1): w of pair (i, cols[i])
    return (scale_factor * w * d + a) / (scale_factor * w + 1.0)


# ---------------------------------------------------------------------------------------------- text side
def query_clusters(text: torch.Tensor, h_threshold: float) -> np.ndarray:
    """(Q,) cluster labels 0.. of the query embeddings: Ward linkage on their cosine distances
    (1 - cos, clipped to [0, 2], zero diagonal), cut at distance ``h_threshold``."""
    _, linkage, fcluster, squareform = _scipy()
    t = F.normalize(text.detach().double().cpu(), dim=-1).numpy()
    if len(t) < 2:
        return np.zeros(len(t), dtype=np.int64)
    dist = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="ward")
    return fcluster(z, t=h_threshold, criterion="distance").astype(np.int64) - 1


def adjust_text(text: torch.Tensor, labels: np.ndarray, prior: torch.Tensor, dense: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """T' (B, Q, E): per window and cluster, only the query i* with the highest prior is moved:
    T'_i* = L2((1 - alpha) t + alpha m), t = L2(T_i*), m = L2(mean of the 2 patches of ``dense``
    (B, N, E) most similar to t)."""
    b = dense.shape[0]
    n_clusters = int(labels.max()) + 1
    member = torch.as_tensor(labels[None, :] == np.arange(n_clusters)[:, None], device=prior.device)  # (C, Q)
    masked = prior[:, None, :].masked_fill(~member[None], float("-inf"))  # (B, C, Q)
    best = masked.argmax(-1)  # (B, C): i* of each cluster
    t = F.normalize(text[best], dim=-1)  # (B, C, E)
    sims = torch.einsum("bne,bce->bcn", dense, t)
    top = sims.topk(min(2, dense.shape[1]), dim=-1).indices  # (B, C, 2)
    rows = torch.gather(dense[:, None].expand(-1, n_clusters, -1, -1), 2,
                        top[..., None].expand(-1, -1, -1, dense.shape[-1]))
    m = F.normalize(rows.mean(2), dim=-1)
    new = F.normalize((1 - alpha) * t + alpha * m, dim=-1)
    out = text[None].expand(b, -1, -1).clone()
    out.scatter_(1, best[..., None].expand(-1, -1, text.shape[-1]), new.to(out.dtype))
    return out


# ---------------------------------------------------------------------------------------------- the method
def window_cls_embedding(x: BlockInputs, values: torch.Tensor) -> torch.Tensor:
    """(B, E) the window's global vector: CLS through CLIP's standard last block, ln_post, proj, L2
    (``values``: the patch values (B, D, gh, gw))."""
    clip = x.clip
    q, k = x.q(), x.k()
    att = torch.softmax(x.scale * (q[:, :, :1] @ k.transpose(-1, -2)), dim=-1)  # (B, H, 1, T)
    v = torch.cat([x.cls_value().float(), values.flatten(2).transpose(1, 2)], dim=1)  # (B, T, D)
    b, t, d = v.shape
    o = (att @ v.view(b, t, x.heads, d // x.heads).transpose(1, 2)).transpose(1, 2).reshape(b, 1, d)
    y = clip.residual_and_ffn(clip.out_proj(o).float(), x.tokens[:, :1].float(), True)
    return F.normalize(clip.head(y.float())[:, 0].float(), dim=-1)


def _graph_inputs(x: BlockInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """CLIP's patch keys (B, H, N, d) and the VFM keys on CLIP's grid (B, H, N, C/H), checked."""
    feats, heads = x.vfm_features, x.heads
    if feats is None:
        raise ValueError("method cass needs the VFM's last-block keys (vfm.feature=k), but this decode has no VFM features")
    if x.vfm_heads is not None and int(x.vfm_heads) != heads:
        raise ValueError(f"method cass matches the VFM's attention heads to CLIP's, but the VFM's keys have {x.vfm_heads} "
                         f"heads and CLIP's last block {heads}: choose a VFM with {heads} heads (vfm=dino_vitb8 for "
                         "ViT-B/16)")
    if feats.shape[1] % heads:
        raise ValueError(f"method cass: the VFM's {feats.shape[1]} key channels do not split into CLIP's {heads} heads")
    k = x.k()[:, :, 1:]
    return k, vfm_keys_on_grid(feats, x.grid, k, heads)


def cass_scores(x: BlockInputs, global_weight: float, mean_vector_weight: float, h_threshold: float,
                eigenscaling: bool, gaussian_std: float, k_eigen: int, rank: int, scale_factor: float, svd: str,
                residual: bool = False, ffn: bool = False) -> Scores:
    """CASS's window scores (B, Q, gh, gw) against ``x.text`` (module docstring; docs/methods.md)."""
    if x.text is None:
        raise ValueError("method cass scores the queries itself (its text-side prior): decode it with classes")
    clip, tau = x.clip, x.scale
    k, kd = x.memoized("cass.keys", lambda: _graph_inputs(x))
    spectra = x.memoized(f"cass.spectra.{k_eigen}", lambda: (top_spectra(kd, tau, k_eigen), top_spectra(k, tau, k_eigen)))
    cost = x.point(COST, spectral_cost(*spectra))
    cols = x.point(ASSIGNMENT, match_heads(cost))
    factors = x.memoized(f"cass.low_rank.{rank}.{svd}", lambda: low_rank(kd, tau, rank, svd))
    a = tau * (k.double() @ k.double().transpose(-1, -2))
    m = fused_graphs(a, factors, cols, cost, eigenscaling, scale_factor)
    omega = gaussian_neighbourhood(x.grid, gaussian_std)[1:, 1:].to(m.device, m.dtype)
    pattern = x.point(PATTERN, torch.softmax(m + omega, dim=-1).float())
    values = x.patch_values()
    v = values.flatten(2).transpose(1, 2)  # (B, N, D)
    b, n, d = v.shape
    o = (pattern @ v.view(b, n, x.heads, d // x.heads).transpose(1, 2)).transpose(1, 2).reshape(b, n, d)
    z = clip.residual_and_ffn(clip.out_proj(o).float(), x.tokens[:, 1:].float() if residual else None, ffn)
    z = x.point(BLOCK_OUTPUT, z.float())
    dense = F.normalize(clip.head(z).float(), dim=-1)
    dense = x.point(DENSE, dense.transpose(1, 2).reshape(b, -1, *x.grid))
    feats = dense.flatten(2).transpose(1, 2)  # (B, N, E)
    text = x.text.to(feats.dtype)
    prior = x.point(PRIOR, x.memoized("cass.global", lambda: window_cls_embedding(x, values)) @ text.T)  # (B, Q)
    adjusted = x.point(TEXT, adjust_text(text, query_clusters(text, h_threshold), prior, feats, mean_vector_weight))
    s = (1 - global_weight) * torch.einsum("bne,bqe->bqn", feats, adjusted) + global_weight * prior[:, :, None]
    return Scores(s.reshape(b, -1, *x.grid))


register_method(Method(
    "cass", cass_scores, needs_vfm=True, vfm_feature="k", own_switches=True,
    doc="spectral fusion of CLIP's and the VFM's key graphs, matched per head; object-presence prior on the text",
    knobs=(
        Knob("global_weight", "float", "w_g: s = (1 - w_g) F T'^T + w_g * (window CLS embedding . T)", low=0, high=1,
             slider=(0.0, 1.0, 0.05)),
        Knob("mean_vector_weight", "float", "alpha: the chosen query of each cluster moves to L2((1-alpha) t + alpha m)",
             low=0, high=1, slider=(0.0, 1.0, 0.01)),
        Knob("h_threshold", "float", "Ward distance at which the query names are cut into clusters", low=0,
             slider=(0.0, 2.0, 0.01)),
        Knob("eigenscaling", "bool", "stretch the VFM graph's rank-r singular values onto [0.5 s_min, 1.5 s_max]"),
        Knob("gaussian_std", "float", "sigma of NACLIP's neighbourhood prior, in patches", low=0, low_open=True,
             slider=(0.5, 20.0, 0.5)),
        Knob("k_eigen", "int", "top eigenvalues per head compared by the head matching", low=1, slider=(1, 50, 1)),
        Knob("rank", "int", "rank of the VFM graph's low-rank approximation", low=1, slider=(1, 50, 1)),
        Knob("scale_factor", "float", "fusion weight sf: M = (sf w D + A) / (sf w + 1)", low=0, slider=(0.0, 50.0, 1.0)),
        Knob("svd", "choice", "the low rank: randomized (torch.svd_lowrank, niter 2, seeded) or exact",
             choices=("randomized", "exact")),
    )))
