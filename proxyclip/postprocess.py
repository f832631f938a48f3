"""Post-processing of the merged score maps, before the class decision (``postprocess=``).

A post-process is ``fn(scores (Q, H, W), guide (C, H, W), **settings) -> (Q, H, W)`` at the
original image size; ``guide`` is the image normalized with CLIP's mean/std. Adding one: the
function, a ``register_postprocess`` entry, ``conf/postprocess/<name>.yaml``, a test.

PAMR (pixel-adaptive mask refinement, as NACLIP and Talk2DINO run it; docs/methods.md): for each
dilation d, pixel i's 8 neighbours at offset d (replicate padding), P = 8 |D| in all.

    sigma_ic = sample std (n - 1) of channel c over the 3x3 stencils of every dilation (9 |D| values)
    alpha_ij = softmax_j( mean_c( -|I_ic - I_jc| / (1e-8 + 0.1 sigma_ic) ) )
    m <- sum_j alpha_ij m(j),  ``steps`` times
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

OFFSETS: Tuple[Tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def neighbours(x: torch.Tensor, d: int) -> List[torch.Tensor]:
    """The 8 maps x(i + d * offset), replicate padding: (C, H, W) -> 8 x (C, H, W)."""
    h, w = x.shape[-2:]
    padded = F.pad(x[None], (d, d, d, d), mode="replicate")[0]
    return [padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in OFFSETS]


def pamr_weights(guide: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(C, H, W) guide image -> (P, H, W) weights alpha over the P = 8 |D| neighbours (sum to 1)."""
    guide = guide.float()
    near = [neighbours(guide, int(d)) for d in dilations]
    stencil = torch.stack([v for d_near in near for v in [guide] + d_near])  # (9 |D|, C, H, W)
    sigma = stencil.std(dim=0, unbiased=True)  # (C, H, W)
    denom = 1e-8 + 0.1 * sigma
    logits = torch.stack([-((guide - v).abs() / denom).mean(dim=0) for d_near in near for v in d_near])
    return torch.softmax(logits, dim=0)


def pamr(scores: torch.Tensor, guide: torch.Tensor, steps: int, dilations: Sequence[int]) -> torch.Tensor:
    """Refine (Q, H, W) score maps with the (C, H, W) guide image's local affinities, ``steps`` times."""
    if steps == 0:
        return scores
    alpha = pamr_weights(guide, dilations)  # (P, H, W)
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


def check_pamr(steps: int, dilations: Sequence[int]) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"postprocess.steps (PAMR iterations) must be an integer >= 0, got {steps!r}")
    if len(dilations) == 0:
        raise ValueError("postprocess.dilations is empty: PAMR needs at least one dilation, e.g. [8, 16]")
    bad = [d for d in dilations if isinstance(d, bool) or not isinstance(d, int) or d < 1]
    if bad:
        raise ValueError(f"postprocess.dilations must be positive integers (pixels), got {list(dilations)}")


@dataclass(frozen=True)
class Postprocess:
    name: str
    refine: Optional[Callable[..., torch.Tensor]]  # None: the identity
    settings: Tuple[str, ...] = ()  # config keys passed to ``refine``
    check: Optional[Callable[..., None]] = None


POSTPROCESSES: Dict[str, Postprocess] = {}


def register_postprocess(p: Postprocess) -> Postprocess:
    POSTPROCESSES[p.name] = p
    return p


def get_postprocess(name: str) -> Postprocess:
    if name not in POSTPROCESSES:
        raise ValueError(f"unknown postprocess {name!r} (postprocess.name / postprocess=); known: "
                         f"{', '.join(POSTPROCESSES)}")
    return POSTPROCESSES[name]


register_postprocess(Postprocess("none", None))
register_postprocess(Postprocess("pamr", pamr, settings=("steps", "dilations"), check=check_pamr))
