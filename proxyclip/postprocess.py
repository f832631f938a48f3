"""Post-processing of the merged score maps, before the class decision (``postprocess=``).

A post-process is ``fn(scores (Q, H, W), guide (C, H, W), **settings) -> (Q, H, W)`` at the
original image size; ``guide`` is the image normalized with CLIP's mean/std. Adding one: the
function, a ``register_postprocess`` entry with its settings declared (``proxyclip.knobs.Knob``),
``conf/postprocess/<name>.yaml``, a test.

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

from .knobs import Knob

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


def pamr(scores: torch.Tensor, guide: torch.Tensor, steps: int, dilations: Sequence[int],
         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Refine (Q, H, W) score maps with the (C, H, W) guide image's local affinities, ``steps`` times
    (``weights``: ``pamr_weights(guide, dilations)`` computed before, for a guide refined many times)."""
    if steps == 0:
        return scores
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
    refine = get_postprocess(settings["name"]).refine
    if refine is None:
        return scores
    return refine(scores, guide, **{k: v for k, v in settings.items() if k != "name"})
