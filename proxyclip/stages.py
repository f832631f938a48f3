"""The per-window stages the Segmenter runs: the backbones at encode (CLIP's tokens entering its
last block and any kept layer parts; the VFM's features) and the method at decode (its own
result, or the shared last block and head), each batch through its hook points."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .backbones.blocks import VFM_POINTS, BlockPoints, vfm_blocks
from .encoded import Encoded
from .hooks import declare_hook
from .knobs import SWITCHES
from .last_block import Attention, BlockInputs, BlockOutput, Dense, Scores, dense_from_block_output, run_last_block
from .methods import get_method
from .parts import resid_pre
from .specs import DecodeSpec
from .windows import resize_image

if TYPE_CHECKING:
    from .pipeline import Segmenter

VFM_FEATURES = declare_hook("vfm.features", "window", "(n, C, Hv, Wv)",
                            "VFM patch features, prefix tokens dropped (methods with a VFM)", "encode",
                            replay="vfm_features")
BLOCK_INPUT = declare_hook("clip.last_block_input", "window", "(n, 1+gh·gw, D)",
                           "tokens entering CLIP's last block (what `Encoded` stores)", "encode", replay="clip_tokens")
PATTERN = declare_hook("attention.pattern", "window", "(n, h, T, T)",
                       "the attention every method runs: h heads, or 1 when shared; T = 1+gh·gw (CLS first), "
                       "N for proxyclip (VFM tokens) and cass (CLIP's patches)", "method")
BLOCK_OUTPUT = declare_hook("clip.last_block_output", "window", "(n, T, D)",
                            "after the residual and the FFN (when on), before ln_post", "block output")
DENSE = declare_hook("clip.dense", "window", "(n, E, h, w)",
                     "L2-normalized dense embeddings (CLIP's grid; the VFM's for proxyclip)", "block output")


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def method_output(seg: "Segmenter", enc: Encoded, start: int, stop: int, spec: DecodeSpec,
                   text: Optional[torch.Tensor]) -> Union[torch.Tensor, Scores]:
    """The method's result for windows ``start:stop``: dense embeddings, or its own Scores."""
    meth = get_method(spec.method)
    knobs = spec.knob_values
    if meth.level == "image":
        raise ValueError(f"method {spec.method} is image-level: it makes merged score maps (decode), "
                         "not per-window dense embeddings")

    def point(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return seg.hooks.point(name, tensor, start)

    feats = None if enc.vfm_features is None else enc.vfm_features[start:stop].to(seg.device)
    layers = {k: v[start:stop].to(seg.device) for k, v in enc.layers.items()}
    x = BlockInputs(seg.clip, enc.clip_tokens[start:stop].to(seg.device), enc.clip_grid, feats, enc.memo,
                    (start, stop), point, layers=layers, text=text,
                    pixels=lambda: window_pixels(seg, enc, start, stop),
                    switches={k.name: knobs[k.name] for k in SWITCHES},
                    vfm_heads=None if seg.vfm is None else seg.vfm.heads)
    args = {k: knobs[k] for k in meth.knob_names}
    if meth.own_switches:
        args.update(residual=knobs["residual"], ffn=knobs["ffn"])
    out = meth.attention(x, **args)
    if isinstance(out, Scores):
        return out
    if isinstance(out, Dense):
        return point(DENSE, out.embeddings)
    if isinstance(out, BlockOutput):
        z = point(BLOCK_OUTPUT, out.tokens)
        att = Attention(torch.empty(0), out.grid, out.cls)
    else:
        pattern = point(PATTERN, out.pattern)
        replaced = pattern is not out.pattern
        att = replace(out, pattern=pattern)
        z = point(BLOCK_OUTPUT, run_last_block(x, att, knobs["residual"], knobs["ffn"], shortcut=not replaced))
    return point(DENSE, dense_from_block_output(seg.clip, z, att))


def window_pixels(seg: "Segmenter", enc: Encoded, start: int, stop: int) -> torch.Tensor:
    """(B, 3, h, w) windows ``start:stop`` of ``enc`` as CLIP saw them: CLIP-normalized, padded."""
    resized = resize_image(enc.image.to(seg.device), enc.resized_size)
    crops = torch.stack([resized[:, a:b, c:d] for (a, b, c, d) in enc.windows[start:stop]])
    p = enc.pad
    return F.pad(normalize(crops, *seg._clip_norm), (p[2], p[3], p[0], p[1]))


def run_backbones(seg: "Segmenter", resized: torch.Tensor, boxes, pad, clip: bool, vfm: bool, keep: Sequence[int] = ()):
    """CLIP's tokens entering the last block (and the kept blocks'), and/or the VFM's features of
    every window, batched."""
    tokens, feats, layers = [], [], {i: [] for i in keep}
    bs = int(seg.cfg.batch_size)
    for start in range(0, len(boxes), bs):
        crops = torch.stack([resized[:, a:b, c:d] for (a, b, c, d) in boxes[start:start + bs]])
        if vfm:
            vfm_in = normalize(crops, *seg._vfm_norm)
            if not seg.vfm.resizes_input:
                vfm_in = F.pad(vfm_in, (pad[2], pad[3], pad[0], pad[1]))
            vp = BlockPoints(seg.hooks, start, VFM_POINTS)  # vfm.blocks.{i}.*: only when someone listens
            listened = not seg.hooks.idle and vp.any(len(vfm_blocks(seg.vfm.model) or ()))
            out = seg.vfm.features(vfm_in, point=vp) if listened else seg.vfm.features(vfm_in)
            feats.append(seg.hooks.point(VFM_FEATURES, out.float(), start))
        if clip:
            clip_in = F.pad(normalize(crops, *seg._clip_norm), (pad[2], pad[3], pad[0], pad[1]))
            cp = BlockPoints(seg.hooks, start)  # clip.blocks.{i}.*: the fused blocks unless someone listens
            if cp.any(seg.clip.num_blocks - 1):
                last, kept = seg.clip.encode_tokens(clip_in, keep, point=cp)
            else:
                last, kept = seg.clip.encode_tokens(clip_in, keep)
            for i in keep:
                layers[i].append(kept[i].float())
            tokens.append(seg.hooks.point(BLOCK_INPUT, last.float(), start))
    made = {resid_pre(i): torch.cat(t) for i, t in layers.items()} if clip else {}
    return (torch.cat(tokens) if clip else None), (torch.cat(feats) if vfm else None), made
