"""Seeing inside CLIP from an Encoded's layer parts: the residual stream block by block, its token
norms, and a "logit lens" (each block's output read by CLIP's head as if it were the last).

The residual stream of a ViT with L blocks has L + 1 states per window: the tokens entering block
i (``clip.blocks.{i}.resid_pre``, i = 0..L-1; the last is ``Encoded.clip_tokens``) and the last block's
vanilla output (open_clip's own block L-1 on ``clip_tokens``). :func:`residual_stream` returns them
from an Encoded holding every layer part (``seg.encode(image, keep=every_part(seg))``).

Logit lens: block i's output (the stream after block i) -> ``ln_post`` -> ``proj`` -> L2 norm,
scored (cosine) against the classes' text embeddings, windows merged and decided as a decode is
(``proxyclip.decision``): a segmentation per block. The lens of the last block is vanilla CLIP's
segmentation (``method=clip``, residual and FFN on).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from .decision import WindowScores, decide
from .encoded import Encoded
from .last_block import Attention, dense_from_block_output
from .parts import resid_pre
from .text import parse_classes


def every_part(seg: Any) -> List[str]:
    """The layer parts of blocks 0..L-2 (with ``clip_tokens``: the input of every block)."""
    return [resid_pre(i) for i in range(seg.clip.num_blocks - 1)]


@torch.no_grad()
def residual_stream(seg: Any, enc: Encoded) -> List[Tuple[str, torch.Tensor]]:
    """[(name, tokens (n_windows, T, D))] for the L + 1 states: ``block i input`` for i = 0..L-1,
    then ``block L-1 output``. The Encoded must hold every layer part (an error names a missing one)."""
    last = seg.clip.num_blocks - 1
    missing = [p for p in every_part(seg) if p not in enc.layers]
    if missing:
        raise ValueError(f"the residual stream needs every layer part; this Encoded lacks {missing[0]}: "
                         "encode with seg.encode(image, keep=proxyclip.lens.every_part(seg))")
    states = [(f"block {i} input", enc.layers[resid_pre(i)]) for i in range(last)]
    states.append((f"block {last} input", enc.clip_tokens))
    bs, out = int(seg.cfg.batch_size), []
    for a in range(0, len(enc.windows), bs):
        out.append(seg.clip.block(last)(enc.clip_tokens[a:a + bs].to(seg.device, seg.clip.dtype)).float().cpu())
    states.append((f"block {last} output", torch.cat(out)))
    return states


def token_norms(tokens: torch.Tensor) -> torch.Tensor:
    """(n, T, D) -> (n, T) L2 norms of the tokens (CLS first)."""
    return tokens.float().norm(dim=-1)


def top_tokens(norms: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) norms -> the indices of the ``k`` largest (the outlier tokens), largest first."""
    return torch.topk(norms, min(int(k), norms.numel())).indices


@torch.no_grad()
def lens_scores(seg: Any, enc: Encoded, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n, T, D) stream tokens -> (n, Q, gh, gw) cosine scores through CLIP's head (CLS dropped)."""
    att = Attention(torch.empty(0), enc.clip_grid, cls=True)
    bs, out = int(seg.cfg.batch_size), []
    for a in range(0, tokens.shape[0], bs):
        dense = dense_from_block_output(seg.clip, tokens[a:a + bs].to(seg.device), att)
        out.append(torch.einsum("behw,qe->bqhw", dense, text.to(dense.dtype)).cpu())
    return torch.cat(out)


@torch.no_grad()
def logit_lens(seg: Any, enc: Encoded, classes: Sequence[str], logit_scale: float = 40.0,
               prob_thd: float = 0.0) -> Dict[int, torch.Tensor]:
    """{block i: (H, W) labels} of each block's output read by CLIP's head, i = 0..L-1."""
    cl = parse_classes(list(classes))
    text = seg.text_embeddings(cl.queries)
    outputs = residual_stream(seg, enc)[1:]  # the stream after block 0, 1, ..., L-1
    labels = {}
    for i, (_, tokens) in enumerate(outputs):
        ws = WindowScores(lens_scores(seg, enc, tokens, text), enc.windows, enc.pad, enc.resized_size, enc.image_size)
        labels[i] = decide(ws.full(), cl, logit_scale, prob_thd)[1]
    return labels
