"""The training-free last-block methods: one attention function each, and their registry.

A method is ``fn(x: BlockInputs, **knobs) -> Attention | BlockOutput | Dense | Scores``
(proxyclip/last_block.py): it reads the queries, keys, earlier blocks' tokens (``x.layer(i)``, the
parts it declares in ``Method.parts``) or VFM features of one batch of windows. Most return the
:class:`Attention` that replaces CLIP's last one; everything around it (values, out_proj, residual,
FFN, head) is then shared, and whether the residual and the FFN are kept is a switch of every
method (``method.residual``, ``method.ffn``). A method that runs its own last block returns the
block's output tokens, its dense embeddings, or its window scores (it may read ``x.text``).
An image-level method (``level="image"``: LPOSS) sees every window at once and returns the merged
maps (proxyclip/image_level.py, docs/regions.md).

Adding a method: write its function, ``register_method(Method(...))`` below with its knobs
declared (``proxyclip.knobs.Knob``: name, type, range, doc), add ``conf/method/<name>.yaml`` (its
published switches and the knobs' defaults) and a test. Sweeps, the explorer, the summary and the
run identity read the declarations; nothing else needs editing. The equations
and each method's source are in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import proxy
from .knobs import DECISION, SWITCHES, Knob
from .hooks import declare_hook
from .last_block import Attention, BlockInputs

for _name, _shape, _doc in (
        ("proxy.affinity", "(n, N, N)", "raw cosine affinity of the N = Hv·Wv VFM tokens (proxyclip)"),
        ("proxy.affinity_normalized", "(n, N, N)",
         "`(S - beta * mean(S)) * gamma`, mean per image (proxyclip; `gamma * S` with shift=false)"),
        ("proxy.mask", "(n, N, N) bool", "kept entries (`S' >= 0`; an empty row keeps its diagonal) (proxyclip)"),
        ("proxy.attention", "(n, N, N)", "masked softmax, rows sum to 1 (proxyclip)")):
    declare_hook(_name, "window", _shape, _doc, "method")


@dataclass(frozen=True)
class Method:
    """A registered method: its attention function and the knobs it takes (proxyclip/knobs.py).

    Every method also has the last block's switches (``knobs.SWITCHES``: residual, ffn) and the
    class decision's knobs (``knobs.DECISION``); ``all_knobs`` lists the three in decode order.
    """

    name: str
    attention: Callable[..., Attention]  # fn(BlockInputs, **knobs) -> Attention
    knobs: Tuple[Knob, ...] = ()  # method-specific settings passed to ``attention`` (defaults: its YAML)
    needs_vfm: bool = False
    doc: str = ""
    # the encode parts it reads besides the last block's input: fn(**its knobs) -> part names
    # (proxyclip/parts.py, e.g. ("clip.blocks.5.resid_pre", ...)); None = none. A ``layers``
    # parameter, if fn has one, receives the CLIP's block count (proxyclip.parts.method_parts)
    parts: Optional[Callable[..., Tuple[str, ...]]] = None
    # a check of its knob values (switches included) against a CLIP of ``layers`` blocks:
    # fn(knobs, layers) raises ValueError (one line naming the knob); run wherever its parts are listed
    check: Optional[Callable[[Dict[str, object], int], None]] = None
    # the VFM readout it needs (``vfm.feature``: "k" for a method reading per-head keys); None = any
    vfm_feature: Optional[str] = None
    # its function runs its own last block and takes the switches (``residual=``, ``ffn=``) itself
    own_switches: bool = False
    # "window": fn(BlockInputs, **knobs) per batch of windows, merged by the pipeline; "image":
    # fn(ImageInputs, **knobs) -> ImageScores for the whole image at once (proxyclip/image_level.py)
    level: str = "window"
    needs_masks: bool = False  # reads the encode's mask proposals (masks=file|sam2|sam; proxyclip/masks)
    needs_sam: bool = False  # reads the encode's SAM part (trident.sam; proxyclip/sam_attention.py)

    @property
    def knob_names(self) -> Tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    @property
    def all_knobs(self) -> Tuple[Knob, ...]:
        return SWITCHES + self.knobs + DECISION


METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.level not in ("window", "image"):
        raise ValueError(f"method {method.name}: level must be 'window' or 'image', got {method.level!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (method.name / method=); known: {', '.join(METHODS)}")
    return METHODS[name]


def check_vfm_feature(method: Method, feature: Optional[str]) -> None:
    """A method declaring a VFM readout (``Method.vfm_feature``) is run only on features read that
    way (``feature``: the Segmenter's ``vfm.feature``, which its encodes' ``vfm_key`` records)."""
    want = method.vfm_feature
    if want is not None and feature != want:
        raise ValueError(f"method {method.name} reads the VFM's attention {'keys' if want == 'k' else want} per head "
                         f"(vfm.feature={want}), but this Segmenter's VFM gives vfm.feature={feature}: build it with "
                         f"vfm.feature={want} (e.g. vfm=dino_vitb8 vfm.feature={want}), or decode from other = "
                         f"seg.for_method({method.name!r}): other.decode(other.encode(image, reuse=enc), ...)")


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


register_method(Method("clip", vanilla_attention, doc="CLIP's own last block"))
register_method(Method("maskclip", identity_attention, doc="identity attention (each token keeps its value)"))
register_method(Method("sclip", sclip_attention, doc="q-q plus k-k attention"))
register_method(Method("clearclip", clearclip_attention, doc="q-q attention"))
register_method(Method("naclip", naclip_attention, doc="k-k attention plus a Gaussian neighbourhood prior", knobs=(
    Knob("gaussian_std", "float", "sigma of NACLIP's neighbourhood prior, in patches", low=0, low_open=True,
         slider=(0.5, 20.0, 0.5)),
)))
register_method(Method("proxyclip", proxyclip_attention, needs_vfm=True, doc="attention from the VFM's patch affinities",
                       knobs=(
    Knob("beta", "float", "affinity shift: S' = (S - beta * mean(S)) * gamma", low=0, slider=(0.0, 3.0, 0.05)),
    Knob("gamma", "float", "affinity scale (inverse softmax temperature)", low=0, low_open=True,
         slider=(0.5, 10.0, 0.1)),
    Knob("shift", "bool", "subtract beta * mean(S) (the adaptive normalization); false: S' = gamma * S"),
    Knob("mask", "bool", "exclude entries with S' < 0; false: softmax over every entry"),
)))

from . import zoo  # noqa: E402,F401  (the 2025 methods register themselves)
