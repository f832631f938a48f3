"""Post-processing (``postprocess=``): of the merged score maps before the class decision, or of
the labels after it.

A score-level post-process is ``fn(scores (Q, H, W), guide (C, H, W), **settings) -> (Q, H, W)`` at
the original image size; ``guide`` is the image normalized with CLIP's mean/std. A label-level one
(``stage="labels"``: Trident's SAM refinement, proxyclip/sam_refine.py) is ``fn(labels (H, W),
probs (K, H, W), seg, enc, **settings) -> labels``, run after each decision (prob_thd applied).
Adding one: the function, a ``register_postprocess`` entry with its settings declared
(``proxyclip.knobs.Knob``), ``conf/postprocess/<name>.yaml``, a test.

PAMR (pixel-adaptive mask refinement, as NACLIP and Talk2DINO run it; docs/methods.md): for each
dilation d, pixel i's 8 neighbours at offset d (replicate padding), P = 8 |D| in all.

    sigma_ic = sample std (n - 1) of channel c over the 3x3 stencils of every dilation (9 |D| values)
    alpha_ij = softmax_j( mean_c( -|I_ic - I_jc| / (1e-8 + 0.1 sigma_ic) ) )
    m <- sum_j alpha_ij m(j),  ``steps`` times
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .knobs import Knob

OFFSETS: Tuple[Tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def neighbours(x: torch.Tensor, d: int) -> List[torch.Tensor]:
    """The 8 maps x(i + d * offset), replicate padding: (C, H, W) -> 8 x (C, H, W)."""
    h, w = x.shape[-2:]
    padded = F.pad(x[None], (d, d, d, d), mode="replicate")[0]
    return [padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in OFFSETS]


_INDEX_CACHE: Dict[Tuple[int, int, Tuple[int, ...], str], Tuple[torch.Tensor, torch.Tensor]] = {}


def neighbour_index(h: int, w: int, dilations: Sequence[int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel i's P = 8 |D| neighbours (replicate padding = clamped coordinates) as CSR columns:
    (H*W, P) int32 raster indices sorted per row, and (H*W, P) int64 the position of each in the order
    of :func:`pamr_weights` (dilation-major, then :data:`OFFSETS`). Cached per shape."""
    key = (int(h), int(w), tuple(int(d) for d in dilations), str(device))
    if key not in _INDEX_CACHE:
        ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
        cols = []
        for d in key[2]:
            for dy, dx in OFFSETS:
                r = (ys + dy * d).clamp(0, h - 1)
                c = (xs + dx * d).clamp(0, w - 1)
                cols.append((r[:, None] * w + c[None, :]).flatten())
        cols, order = torch.stack(cols, dim=1).sort(dim=1)
        if len(_INDEX_CACHE) > 16:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = (cols.to(torch.int32 if h * w < 2 ** 31 else torch.int64), order)
    return _INDEX_CACHE[key]


def pamr_weights(guide: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(C, H, W) guide image -> (P, H, W) weights alpha over the P = 8 |D| neighbours (sum to 1)."""
    guide = guide.float()
    diff = torch.stack([v for d in dilations for v in neighbours(guide, int(d))]) - guide  # (P, C, H, W)
    # sample std (n - 1) over the 9 |D| stencil values (the pixel itself once per dilation), from the
    # differences to the pixel: the variance does not depend on the shift
    n = 9 * len(dilations)
    shift = diff.sum(dim=0) / n  # mean - guide
    dev = diff - shift
    var = (dev * dev).sum(dim=0) + len(dilations) * shift * shift
    denom = 1e-8 + 0.1 * (var / (n - 1)).sqrt()  # (C, H, W)
    logits = -(diff.abs_() / denom).mean(dim=1)  # (P, H, W)
    return torch.softmax(logits, dim=0)


def pamr_matrix(weights: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The (H*W, H*W) sparse CSR matrix of one PAMR step: row i holds pixel i's P = 8 |D| weights
    alpha_ij at its neighbours' columns (replicate padding: a clamped neighbour may repeat)."""
    p, h, w = weights.shape
    if p != 8 * len(dilations):
        raise ValueError(f"pamr weights have {p} neighbours a pixel; dilations {list(dilations)} make "
                         f"{8 * len(dilations)}")
    cols, order = neighbour_index(h, w, dilations, weights.device)
    crow = torch.arange(0, h * w * p + 1, p, device=weights.device, dtype=cols.dtype)
    vals = weights.float().reshape(p, -1).T.gather(1, order)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a plain CSR matrix-times-dense product
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (h * w, h * w),
                                       check_invariants=False)


def _sparse_ok(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def pamr(scores: torch.Tensor, guide: torch.Tensor, steps: int, dilations: Sequence[int],
         weights: Optional[torch.Tensor] = None, matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Refine (Q, H, W) score maps with the (C, H, W) guide image's local affinities, ``steps`` times
    (``weights``: ``pamr_weights(guide, dilations)`` computed before, for a guide refined many times;
    ``matrix``: ``pamr_matrix(weights, dilations)``, the same as one sparse matrix).

    Each step is one sparse matrix product over the pixels (CSR, P entries a row) with the maps kept
    pixel-major (H*W, Q); devices without sparse CSR products run the neighbour sums as views."""
    if steps == 0:
        return scores
    q, h, w = scores.shape
    if matrix is None and not _sparse_ok(scores.device):
        return _pamr_views(scores, guide, steps, dilations, weights)
    if matrix is None:
        alpha = pamr_weights(guide, dilations) if weights is None else weights  # (P, H, W)
        matrix = pamr_matrix(alpha, dilations)
    m = scores.float().reshape(q, h * w).T.contiguous()  # (H*W, Q)
    for _ in range(steps):
        m = matrix @ m
    return m.T.reshape(q, h, w).to(scores.dtype)


def _pamr_views(scores: torch.Tensor, guide: torch.Tensor, steps: int, dilations: Sequence[int],
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`pamr` as sums of shifted views (for devices without sparse CSR products)."""
    alpha = pamr_weights(guide, dilations) if weights is None else weights  # (P, H, W)
    m = scores.float()
    for _ in range(steps):
        out = torch.zeros_like(m)
        j = 0
        for d in dilations:
            for v in neighbours(m, int(d)):
                out.addcmul_(alpha[j], v)
                j += 1
        m = out
    return m.to(scores.dtype)


@dataclass(frozen=True)
class Postprocess:
    """A registered post-process: its function and its declared settings (proxyclip/knobs.py)."""

    name: str
    refine: Optional[Callable[..., torch.Tensor]]  # None: the identity
    knobs: Tuple[Knob, ...] = ()  # settings passed to ``refine`` (defaults: conf/postprocess/<preset>.yaml)
    doc: str = ""
    # "scores": refine(scores, guide, **settings) before the decision; "labels": refine(labels, probs, seg,
    # enc, **settings) -> labels after each decision (prob_thd applied; :func:`apply_label_postprocess`)
    stage: str = "scores"
    needs_sam: bool = False  # reads the SAM part's image embedding (kept when it is the configured post-process)

    @property
    def settings(self) -> Tuple[str, ...]:
        return tuple(k.name for k in self.knobs)


POSTPROCESSES: Dict[str, Postprocess] = {}


def register_postprocess(p: Postprocess) -> Postprocess:
    POSTPROCESSES[p.name] = p
    return p


def get_postprocess(name: str) -> Postprocess:
    if name not in POSTPROCESSES:
        raise ValueError(f"unknown postprocess {name!r} (postprocess.name / postprocess=); known: "
                         f"{', '.join(POSTPROCESSES)}")
    return POSTPROCESSES[name]


register_postprocess(Postprocess("none", None, doc="no refinement"))
register_postprocess(Postprocess("pamr", pamr, doc="pixel-adaptive mask refinement", knobs=(
    Knob("steps", "int", "PAMR iterations", low=0, slider=(0, 20, 1)),
    Knob("dilations", "ints", "PAMR neighbourhood dilations (pixels)", low=1),
)))


def apply_postprocess(settings: Dict, scores: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Run the post-process ``settings`` names (``{"name": ..., **settings}``) on (Q, H, W) scores."""
    post = get_postprocess(settings["name"])
    if post.refine is None or post.stage != "scores":
        return scores
    return post.refine(scores, guide, **{k: v for k, v in settings.items() if k != "name"})


def apply_label_postprocess(settings: Dict, labels: torch.Tensor, probs: torch.Tensor, seg: Any, enc: Any
                            ) -> torch.Tensor:
    """Run a label-level post-process (``stage="labels"``) on one decision's (H, W) labels with its
    (K, H, W) class probabilities; the labels as they are for any other."""
    post = get_postprocess(settings["name"])
    if post.refine is None or post.stage != "labels":
        return labels
    return post.refine(labels, probs, seg, enc, **{k: v for k, v in settings.items() if k != "name"})


from . import sam_refine  # noqa: E402,F401  (registers postprocess=sam_refine)
