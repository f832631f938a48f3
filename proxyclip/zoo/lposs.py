"""LPOSS and LPOSS+ (Stojnic et al., CVPR 2025): label propagation over the patches of every window
at once, then (LPOSS+) over the pixels of the resized image. Image-level methods
(proxyclip/image_level.py); docs/regions.md has the equations and the official settings.

1. Per window: MaskCLIP's dense embeddings (``method=maskclip``'s last block, with this decode's
   residual / ffn switches), resized bilinearly to the VFM grid and re-normalized when the grids
   differ; the initial scores Y (N x Q) are their cosines with every query, all windows stacked in
   window order, patches row-major. The VFM features (``vfm.feature=v`` for the official DINO
   value features) are L2-normalized per patch.
2. The patch graph: each patch's k most similar patches (inner product, itself included; exact),
   weight max(s, 0)^gamma * exp(-sigma * |l_n - l_m|^pix_dist_pow) with l the patch centre in
   pixels of the resized image; W = A + A^T, diagonal removed, W_n = D^-1/2 W D^-1/2.
3. For each query column y: solve (I - alpha W_n) f = y by conjugate gradients from 0, at most 10
   iterations, stopping when |r| <= 1e-6 |y| (not the exact solve).
4. Each window's f back to its grid, bilinear to the padded window, padding cut, merged by sum /
   count on the resized image.
5. LPOSS+: the same propagation over pixels: every pixel to the pixels at offsets in
   [-r//2, r//2]^2 (not itself, inside the image), weight exp(-|lab_i - lab_j| / tau), lab = CIE Lab
   of the resized image (kornia) divided by (100, 128, 128); applied to the merged map.
"""

from __future__ import annotations

import warnings
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from ..decision import WindowScores
from ..image_level import ImageInputs, ImageScores, window_scores_of
from ..knobs import Knob
from ..methods import Method, register_method

CG_ITERATIONS, CG_TOLERANCE = 10, 1e-6


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iterations: int = CG_ITERATIONS, tol: float = CG_TOLERANCE) -> torch.Tensor:
    """Solve A x = b for every column of b (N, Q) at once, A symmetric positive definite given by
    ``matvec``: CG from x = 0, each column stopping after ``iterations`` or once |r| <= tol |b|
    (a zero column stays 0)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    limit = tol * b.norm(dim=0)
    active = rs > 0
    for _ in range(iterations):
        if not bool(active.any()):
            break
        ap = matvec(p)
        step = torch.where(active, rs / (p * ap).sum(0).where(active, torch.ones_like(rs)), torch.zeros_like(rs))
        x = x + step * p
        r = r - step * ap
        rs_new = (r * r).sum(0)
        active = active & (rs_new.sqrt() > limit)
        p = r + torch.where(active, rs_new / rs.where(rs > 0, torch.ones_like(rs)), torch.zeros_like(rs)) * p
        rs = rs_new
    return x


def normalized(w: torch.Tensor) -> torch.Tensor:
    """W -> D^-1/2 W D^-1/2 with the diagonal removed (a zero degree counts as 1)."""
    w = w.clone()
    w.fill_diagonal_(0)
    d = w.sum(1)
    d = torch.where(d == 0, torch.ones_like(d), d).rsqrt()
    return d[:, None] * w * d[None, :]


def patch_locations(x: ImageInputs, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, 2) patch centres (y, x) in pixels of the resized image, every window, row-major."""
    top, bottom, left, right = x.pad
    out = []
    for (y1, y2, x1, x2) in x.windows:
        py, px = (y2 - y1 + top + bottom) / grid[0], (x2 - x1 + left + right) / grid[1]
        ys = y1 - top + py / 2 + py * torch.arange(grid[0], dtype=torch.float64)
        xs = x1 - left + px / 2 + px * torch.arange(grid[1], dtype=torch.float64)
        out.append(torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2))
    return torch.cat(out)


def patch_graph(feats: torch.Tensor, locs: torch.Tensor, k: int, gamma: float, sigma: float,
                pix_dist_pow: float) -> torch.Tensor:
    """(N, N) normalized kNN graph W_n of (N, C) L2-normalized features at (N, 2) locations."""
    n = feats.shape[0]
    sim = feats @ feats.T
    vals, idx = sim.topk(k, dim=1)
    dist = (locs[:, None, :] - locs[idx]).norm(dim=-1).to(feats.dtype)
    w = vals.clamp_min(0).pow(gamma) * torch.exp(-sigma * dist.pow(pix_dist_pow))
    a = torch.zeros(n, n, dtype=feats.dtype, device=feats.device).scatter_(1, idx, w)
    return normalized(a + a.T)


def _initial_scores(x: ImageInputs) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """(N, Q) initial cosine scores, (N, C) normalized VFM features, the VFM grid."""
    if x.vfm_features is None:
        raise ValueError("lposs needs VFM features (vfm=dino_vitb16 vfm.feature=v)")
    grid = tuple(x.vfm_features.shape[-2:])
    scores = []
    for start, stop, _ in x.batches():
        dense = x.window_method("maskclip", start, stop, **x.switches)
        if tuple(dense.shape[-2:]) != grid:
            dense = F.normalize(F.interpolate(dense, size=grid, mode="bilinear", align_corners=False), dim=1)
        scores.append(window_scores_of(dense, x.text).flatten(2).transpose(1, 2).reshape(-1, x.text.shape[0]))
    feats = F.normalize(x.vfm_features.flatten(2).transpose(1, 2).reshape(-1, x.vfm_features.shape[1]), dim=-1)
    return torch.cat(scores), feats, grid


def lposs_merged(x: ImageInputs, alpha: float, gamma: float, k: int, sigma: float, pix_dist_pow: float
                 ) -> torch.Tensor:
    """(Q, h, w) LPOSS scores merged on the resized image."""
    y, feats, grid = _initial_scores(x)
    n = feats.shape[0]
    if k > n:
        raise ValueError(f"lposs: k={k} neighbours, but this image has only {n} patches ({x.num_windows} windows "
                         f"of {grid[0]}x{grid[1]}): set method.k <= {n}")
    w = patch_graph(feats, patch_locations(x, grid).to(feats.device), k, gamma, sigma, pix_dist_pow)
    f = conjugate_gradient(lambda v: v - alpha * (w @ v), y)
    low = f.reshape(x.num_windows, grid[0] * grid[1], -1).transpose(1, 2).reshape(x.num_windows, -1, *grid)
    ws = WindowScores(low, x.windows, x.pad, x.resized_size, x.resized_size)
    return ws.merge(ws.window_full(low))


def lab_image(rgb: torch.Tensor) -> torch.Tensor:
    """(3, h, w) RGB in [0, 1] -> CIE Lab divided by (100, 128, 128) (kornia's rgb_to_lab)."""
    try:
        from kornia.color import rgb_to_lab
    except ImportError:
        raise ImportError("lposs_plus needs the package 'kornia': pip install 'proxyclip[regions]'") from None
    scale = torch.tensor([100.0, 128.0, 128.0], dtype=rgb.dtype, device=rgb.device)[:, None, None]
    return rgb_to_lab(rgb[None])[0] / scale


def _offsets(rho: int):
    """Pixel offsets (dy, dx) in [-rho, rho]^2 but (0, 0), row-major (so a pixel's columns ascend)."""
    return [(dy, dx) for dy in range(-rho, rho + 1) for dx in range(-rho, rho + 1) if (dy, dx) != (0, 0)]


def pixel_graph(lab: torch.Tensor, tau: float, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """LPOSS+'s pixel graph of a (3, h, w) Lab image: W as a sparse CSR (h*w, h*w) matrix, one row a
    pixel with one entry per offset in [-r//2, r//2]^2 but (0, 0) (weight exp(-|lab_i - lab_j| / tau),
    0 for a neighbour outside the image, whose column is clamped inside), and D^-1/2 (h*w,)."""
    rho = int(r) // 2
    h, w = lab.shape[-2:]
    offsets = _offsets(rho)
    padded = F.pad(lab, (rho, rho, rho, rho))
    inside = F.pad(torch.ones(h, w, dtype=lab.dtype, device=lab.device), (rho, rho, rho, rho))
    # filled offset-major (one contiguous row an offset), then transposed once to CSR's pixel-major
    # layout: writing a strided column per offset was 10x slower on the CPU
    vals = torch.empty(len(offsets), h * w, dtype=lab.dtype, device=lab.device)
    itype = torch.int32 if h * w < 2 ** 31 else torch.int64
    cols = torch.empty(len(offsets), h * w, dtype=itype, device=lab.device)
    ys, xs = torch.arange(h, device=lab.device), torch.arange(w, device=lab.device)
    half = len(offsets) // 2  # offsets[-1 - o] = -offsets[o]: W is symmetric, so half the weights are shifts
    for o, (dy, dx) in enumerate(offsets[:half]):
        diff = lab - padded[:, rho + dy:rho + dy + h, rho + dx:rho + dx + w]
        dist = (diff * diff).sum(0).sqrt()
        weight = torch.exp(-dist / tau) * inside[rho + dy:rho + dy + h, rho + dx:rho + dx + w]
        vals[o] = weight.flatten()
        # pixel i's weight at offset -o is pixel i - o's at offset o (the same |lab| difference), 0 outside
        vals[-1 - o] = F.pad(weight, (rho, rho, rho, rho))[rho - dy:rho - dy + h, rho - dx:rho - dx + w].flatten()
    for o, (dy, dx) in enumerate(offsets):
        cols[o] = ((ys + dy).clamp(0, h - 1)[:, None] * w + (xs + dx).clamp(0, w - 1)[None, :]).flatten()
    vals, cols = vals.T.contiguous(), cols.T.contiguous()
    deg = vals.sum(1)
    dinv = torch.where(deg == 0, torch.ones_like(deg), deg).rsqrt()
    crow = torch.arange(0, h * w * len(offsets) + 1, len(offsets), dtype=itype, device=lab.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a plain CSR matrix-times-dense product
        warnings.simplefilter("ignore", UserWarning)
        graph = torch.sparse_csr_tensor(crow, cols.flatten(), vals.flatten(), (h * w, h * w), check_invariants=False)
    return graph, dinv


def pixel_refine(rgb: torch.Tensor, scores: torch.Tensor, alpha: float, tau: float, r: int) -> torch.Tensor:
    """LPOSS+'s pixel-level propagation of (Q, h, w) scores over the (3, h, w) image's Lab graph:
    CG on (I - alpha D^-1/2 W D^-1/2) f = y with the state pixel-major (h*w, Q), W one sparse matrix
    (:func:`pixel_graph`; devices without sparse CSR products sum shifted views)."""
    lab = lab_image(rgb.to(scores.dtype))
    q = scores.shape[0]
    y = scores.reshape(q, -1).T.contiguous()
    if lab.device.type not in ("cpu", "cuda"):
        return _pixel_refine_views(lab, y, alpha, tau, r).T.reshape(scores.shape)
    graph, dinv = pixel_graph(lab, tau, r)
    dinv = dinv[:, None]

    def matvec(v: torch.Tensor) -> torch.Tensor:  # v (h*w, Q) -> (I - alpha W_n) v
        return v - alpha * ((graph @ (v * dinv)) * dinv)

    return conjugate_gradient(matvec, y).T.reshape(scores.shape)


def _pixel_refine_views(lab: torch.Tensor, y: torch.Tensor, alpha: float, tau: float, r: int) -> torch.Tensor:
    """:func:`pixel_refine`'s CG with W applied as sums of shifted views (h*w, Q) -> (h*w, Q)."""
    rho = int(r) // 2
    h, w = lab.shape[-2:]
    padded = F.pad(lab, (rho, rho, rho, rho))
    inside = F.pad(torch.ones(1, h, w, dtype=lab.dtype, device=lab.device), (rho, rho, rho, rho))
    offsets = _offsets(rho)
    weights = []
    for dy, dx in offsets:
        other = padded[:, rho + dy:rho + dy + h, rho + dx:rho + dx + w]
        valid = inside[0, rho + dy:rho + dy + h, rho + dx:rho + dx + w]
        weights.append(torch.exp(-(lab - other).norm(dim=0) / tau) * valid)
    weights = torch.stack(weights)  # (O, h, w): weight of pixel i to i + offset
    deg = weights.sum(0)
    dinv = torch.where(deg == 0, torch.ones_like(deg), deg).rsqrt()[..., None]
    weights = weights[..., None]

    def matvec(v: torch.Tensor) -> torch.Tensor:  # v (h*w, Q) -> (I - alpha W_n) v
        m = v.reshape(h, w, -1) * dinv
        mp = F.pad(m, (0, 0, rho, rho, rho, rho))
        acc = torch.zeros_like(m)
        for o, (dy, dx) in enumerate(offsets):
            acc.addcmul_(weights[o], mp[rho + dy:rho + dy + h, rho + dx:rho + dx + w])
        return v - alpha * (acc * dinv).reshape(v.shape)

    return conjugate_gradient(matvec, y)


def lposs(x: ImageInputs, alpha: float, gamma: float, k: int, sigma: float, pix_dist_pow: float) -> ImageScores:
    """LPOSS: patch-level label propagation over every window (module docstring, steps 1-4)."""
    return ImageScores(lposs_merged(x, alpha, gamma, k, sigma, pix_dist_pow), size="resized")


def lposs_plus(x: ImageInputs, alpha: float, gamma: float, k: int, sigma: float, pix_dist_pow: float, tau: float,
               r: int) -> ImageScores:
    """LPOSS+: LPOSS, then the pixel-level propagation on the resized image (step 5)."""
    merged = lposs_merged(x, alpha, gamma, k, sigma, pix_dist_pow)
    return ImageScores(pixel_refine(x.resized_image(), merged, alpha, tau, r), size="resized")


KNOBS = (
    Knob("alpha", "float", "propagation strength: solve (I - alpha W_n) f = y", low=0, high=1, low_open=True,
         high_open=True, slider=(0.05, 0.99, 0.01)),
    Knob("gamma", "float", "patch-graph weight exponent: max(s, 0)^gamma", low=0, slider=(0.0, 10.0, 0.5)),
    Knob("k", "int", "neighbours of each patch in the graph (itself included; <= the image's patch count)", low=1,
         slider=(1, 800, 1)),
    Knob("sigma", "float", "spatial decay per pixel: exp(-sigma * distance^pix_dist_pow)", low=0,
         slider=(0.0, 0.1, 0.001)),
    Knob("pix_dist_pow", "float", "exponent of the patch distance in the spatial decay", low=0, low_open=True,
         slider=(0.25, 3.0, 0.25)),
)
PLUS_KNOBS = KNOBS + (
    Knob("tau", "float", "pixel-graph temperature: exp(-|lab_i - lab_j| / tau)", low=0, low_open=True,
         slider=(0.001, 0.1, 0.001)),
    Knob("r", "int", "pixel neighbourhood window side (offsets up to r // 2)", low=3, slider=(3, 25, 2)),
)

register_method(Method("lposs", lposs, knobs=KNOBS, needs_vfm=True, level="image",
                       doc="label propagation over a kNN graph of every window's VFM patches"))
register_method(Method("lposs_plus", lposs_plus, knobs=PLUS_KNOBS, needs_vfm=True, level="image",
                       doc="LPOSS, then label propagation over the pixels of the image (Lab colours)"))


def graph_of(enc, k: int, gamma: float, sigma: float, pix_dist_pow: float) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """LPOSS's patch graph of an ``Encoded`` (its VFM features, windows and padding), for notebooks and
    figures: ``(W_n (N, N), grid)``, the normalized graph the propagation solves over (step 2), N the
    patches of every window in window order, row-major (patch n is window ``n // (h*w)``), and the VFM
    grid (h, w). A patch's graph neighbours are the nonzero entries of its row (its own k nearest and
    the patches that have it among theirs: W = A + A^T)."""
    if enc.vfm_features is None:
        raise ValueError("lposs's graph needs VFM features: encode with a VFM (vfm=dino_vitb16 vfm.feature=v)")
    feats = enc.vfm_features
    grid = (int(feats.shape[-2]), int(feats.shape[-1]))
    feats = F.normalize(feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]), dim=-1)
    if not 1 <= int(k) <= feats.shape[0]:
        raise ValueError(f"lposs: k={k} neighbours, but this image has {feats.shape[0]} patches: set k in 1..{feats.shape[0]}")
    return patch_graph(feats, patch_locations(enc, grid).to(feats.device), int(k), gamma, sigma, pix_dist_pow), grid
