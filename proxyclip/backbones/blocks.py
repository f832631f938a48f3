"""CLIP's blocks run by the project, one step at a time, with a hook point at every step.

open_clip's ``ResidualAttentionBlock`` computes, for the tokens ``x`` entering block i::

    u = ln_1(x);  q, k, v = split(u @ in_proj_weight^T + in_proj_bias)      (per head, d = D / H)
    A = softmax(tau q k^T)  (tau = d^-1/2);  o = out_proj(merge_heads(A v))
    m = x + ls_1(o);  f = mlp(ln_2(m));  y = m + ls_2(f)                     (ls_*: layer scale or identity)

:func:`run_block` does exactly that from the block's own modules (its weights are read, nothing
is copied or patched) and passes each step through a hook point ``clip.blocks.{i}.<step>`` (the
family declared below; i 0-indexed like ``visual.transformer.resblocks[i]``). A hook replacing
``attn.pattern`` changes ``o`` and so every later block. The encode runs blocks 0..L-2 (block L-1
is the method's last block; its input is ``clip.last_block_input``).

A point nobody reads costs nothing: :class:`BlockPoints` tells the encode which blocks someone
listens to; every other block is called as open_clip's fused module, as without hooks.

timm ViT blocks (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) get
``vfm.blocks.{i}.*`` through torch module hooks on those modules (:func:`vfm_block_hooks`): the
points where a timm block has a module boundary, so a hook may both read and replace.
``resid_mid`` and q/k/v have none there and are not offered; other VFM structures (SAM, Hiera,
RADIO, ...) fire no ``vfm.blocks`` point.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hooks import HookSet, declare_hook, member

CLIP_BLOCK = "clip.blocks.{i}."
VFM_BLOCK = "vfm.blocks.{i}."

_TOKENS = "(n, T, D)"
CLIP_POINTS: Dict[str, str] = {
    "resid_pre": declare_hook(CLIP_BLOCK + "resid_pre", "window", _TOKENS,
                              "tokens entering CLIP block i (0-indexed; T = 1+gh·gw, CLS first); the encode runs "
                              "blocks 0..L-2, block L-1's input is `clip.last_block_input`", "encode"),
    "attn.q": declare_hook(CLIP_BLOCK + "attn.q", "window", "(n, H, T, D/H)",
                           "block i's queries per head, `in_proj(ln_1(resid_pre))`, before the scale", "encode"),
    "attn.k": declare_hook(CLIP_BLOCK + "attn.k", "window", "(n, H, T, D/H)", "block i's keys per head", "encode"),
    "attn.v": declare_hook(CLIP_BLOCK + "attn.v", "window", "(n, H, T, D/H)", "block i's values per head", "encode"),
    "attn.pattern": declare_hook(CLIP_BLOCK + "attn.pattern", "window", "(n, H, T, T)",
                                 "block i's attention softmax(tau q k^T); a replacement reaches every later block",
                                 "encode"),
    "attn.out": declare_hook(CLIP_BLOCK + "attn.out", "window", _TOKENS,
                             "block i's attention output after out_proj (before layer scale)", "encode"),
    "resid_mid": declare_hook(CLIP_BLOCK + "resid_mid", "window", _TOKENS, "`resid_pre + ls_1(attn.out)`", "encode"),
    "mlp_out": declare_hook(CLIP_BLOCK + "mlp_out", "window", _TOKENS,
                            "`mlp(ln_2(resid_mid))` (before layer scale)", "encode"),
    "resid_post": declare_hook(CLIP_BLOCK + "resid_post", "window", _TOKENS,
                               "`resid_mid + ls_2(mlp_out)`: block i's output, block i+1's `resid_pre`", "encode"),
}
_VTOKENS = "(n, P+N, C)"
VFM_POINTS: Dict[str, str] = {
    "resid_pre": declare_hook(VFM_BLOCK + "resid_pre", "window", _VTOKENS,
                              "tokens entering timm ViT block i of the VFM (P prefix tokens first); blocks up to "
                              "`vfm.layer` run", "encode"),
    "attn.pattern": declare_hook(VFM_BLOCK + "attn.pattern", "window", "(n, H, P+N, P+N)",
                                 "the VFM block's attention softmax(scale q k^T) (after its q/k norms)", "encode"),
    "attn.out": declare_hook(VFM_BLOCK + "attn.out", "window", _VTOKENS,
                             "the VFM block's attention output after `attn.proj` (before `ls1`)", "encode"),
    "mlp_out": declare_hook(VFM_BLOCK + "mlp_out", "window", _VTOKENS, "`mlp(norm2(.))` (before `ls2`)", "encode"),
    "resid_post": declare_hook(VFM_BLOCK + "resid_post", "window", _VTOKENS, "the VFM block's output", "encode"),
}

Point = Callable[[str, torch.Tensor], torch.Tensor]
_CLIP_MEMBER = re.compile(r"^clip\.blocks\.(\d+)\.")


class BlockPoints:
    """The per-block hook points of one batch of windows (starting at window ``start``):
    ``point(name, tensor)`` fires ``name`` there; ``listening(i)`` says if any point of block ``i``
    is read (a hook or a cache); ``any(n)`` if any of blocks 0..n-1 is."""

    def __init__(self, hooks: HookSet, start: int = 0, points: Dict[str, str] = CLIP_POINTS):
        self.hooks, self.start, self.points = hooks, int(start), points
        self._listening: Dict[int, bool] = {}

    def name(self, step: str, i: int) -> str:
        return member(self.points[step], i)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.hooks.point(name, tensor, self.start)

    def listening(self, i: int) -> bool:
        if i not in self._listening:
            self._listening[i] = not self.hooks.idle and any(
                self.hooks.listening(member(t, i)) for t in self.points.values())
        return self._listening[i]

    def listening_step(self, step: str, i: int) -> bool:
        return self.hooks.listening(self.name(step, i))

    def any(self, n: int) -> bool:
        return not self.hooks.idle and any(self.listening(i) for i in range(n))


def check_asked(names: Iterable[str], blocks_run: int) -> None:
    """Hook names given for ``clip.blocks.{i}.*`` must name a block the encode runs (0..blocks_run-1)."""
    for name in names:
        m = _CLIP_MEMBER.match(name)
        if m and int(m.group(1)) >= blocks_run:
            raise ValueError(f"hook point {name}: the encode runs CLIP blocks 0..{blocks_run - 1}; block {m.group(1)} "
                             f"{'is the last block, which the method replaces (its points: clip.last_block_input, attention.pattern, clip.last_block_output)' if int(m.group(1)) == blocks_run else 'does not exist'}")


def check_clip_block(block: nn.Module, i: int) -> None:
    """Block ``i`` has the modules :func:`run_block` reads (open_clip's ResidualAttentionBlock)."""
    attn = getattr(block, "attn", None)
    ok = (all(hasattr(block, m) for m in ("ln_1", "ln_2", "mlp")) and isinstance(attn, nn.MultiheadAttention)
          and attn.in_proj_weight is not None and not hasattr(block, "ln_1_kv"))
    if not ok:
        raise TypeError(f"clip.blocks.{i}.*: CLIP block {i} ({type(block).__name__}) is not open_clip's "
                        "ResidualAttentionBlock (ln_1, attn with in_proj_weight, ln_2, mlp): its steps cannot be hooked")


def _layer_scale(block: nn.Module, name: str) -> nn.Module:
    return getattr(block, name, None) or nn.Identity()


def split_heads(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3D) fused in-projection -> q, k, v, each (B, H, T, D/H)."""
    b, t, d3 = qkv.shape
    d = d3 // 3
    return tuple(qkv[..., j * d:(j + 1) * d].reshape(b, t, heads, d // heads).transpose(1, 2) for j in range(3))


def block_pattern(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(tau q k^T) (B, H, T, T) of an open_clip block from the tokens (B, T, D) entering it."""
    attn = block.attn
    q, k, _ = split_heads(F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias), int(attn.num_heads))
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)


def run_block(block: nn.Module, x: torch.Tensor, i: int, point: BlockPoints) -> torch.Tensor:
    """Block ``i`` on the tokens (B, T, D) entering it (batch first, after its ``resid_pre`` point),
    step by step through the points ``clip.blocks.{i}.*`` -> its output (after ``resid_post``)."""
    attn = block.attn
    b, t, d = x.shape
    heads = int(attn.num_heads)
    q, k, v = split_heads(F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias), heads)
    q, k, v = (point(point.name(s, i), a) for s, a in (("attn.q", q), ("attn.k", k), ("attn.v", v)))
    pattern = point(point.name("attn.pattern", i), torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-2, -1), -1))
    z = (pattern @ v).transpose(1, 2).reshape(b, t, d)
    out = point(point.name("attn.out", i), attn.out_proj(z))
    mid = point(point.name("resid_mid", i), x + _layer_scale(block, "ls_1")(out))
    mlp = point(point.name("mlp_out", i), block.mlp(block.ln_2(mid)))
    return point(point.name("resid_post", i), mid + _layer_scale(block, "ls_2")(mlp))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, keep: Sequence[int], point: BlockPoints,
               batch_first: bool = True) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """``blocks`` in turn on batch-first tokens ``x``: a block someone listens to runs step by step
    (:func:`run_block`), any other as its fused module. -> (output, {i: tokens entering block i}
    for i in ``keep``; for a listened block, as its ``resid_pre`` hook left them)."""
    kept: Dict[int, torch.Tensor] = {}
    wanted = set(int(i) for i in keep)
    for i, block in enumerate(blocks):
        listened = point.listening(i)
        if listened:
            check_clip_block(block, i)
            x = point(point.name("resid_pre", i), x)
        if i in wanted:
            kept[i] = x
        if listened:
            x = run_block(block, x, i, point)
        elif batch_first:
            x = block(x)
        else:
            x = block(x.transpose(0, 1)).transpose(0, 1)
    return x, kept


# ---------------------------------------------------------------------------------------- timm VFMs
_VFM_BLOCK_MODULES = ("norm1", "attn", "norm2", "mlp")


def vfm_blocks(model: nn.Module) -> Optional[Sequence[nn.Module]]:
    """The timm ViT blocks whose steps can be hooked, or None (another structure)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return None
    for b in blocks:
        attn = getattr(b, "attn", None)
        if not all(hasattr(b, m) for m in _VFM_BLOCK_MODULES) or not all(
                hasattr(attn, m) for m in ("qkv", "proj", "attn_drop", "fused_attn")):
            return None
    return blocks


@contextlib.contextmanager
def vfm_block_hooks(model: nn.Module, point: Optional[BlockPoints]) -> Iterator[None]:
    """While active, the listened blocks of a timm ViT fire ``vfm.blocks.{i}.*`` (torch module
    hooks; a listened attention pattern makes that block's attention run unfused)."""
    blocks = vfm_blocks(model) if point is not None else None
    handles: List = []
    unfused: List[nn.Module] = []
    if blocks is not None:
        for i, blk in enumerate(blocks):
            if point.listening(i):
                handles += _hook_vfm_block(blk, i, point, unfused)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for attn in unfused:
            attn.fused_attn = True


def _hook_vfm_block(blk: nn.Module, i: int, point: BlockPoints, unfused: List[nn.Module]) -> List:
    def out_hook(step: str):
        return lambda module, args, out: point(point.name(step, i), out)

    def pre(module, args, kwargs):
        return (point(point.name("resid_pre", i), args[0]),) + tuple(args[1:]), kwargs

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True)]
    if point.listening_step("attn.pattern", i) and blk.attn.fused_attn:
        blk.attn.fused_attn = False  # timm's unfused path: softmax(scale q k^T) -> attn_drop (identity in eval)
        unfused.append(blk.attn)
    handles.append(blk.attn.attn_drop.register_forward_hook(out_hook("attn.pattern")))
    handles.append(blk.attn.register_forward_hook(out_hook("attn.out")))
    handles.append(blk.mlp.register_forward_hook(out_hook("mlp_out")))
    handles.append(blk.register_forward_hook(out_hook("resid_post")))
    return handles
