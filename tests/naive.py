"""Float64 references for the tests, written from the equations (docs/methods.md, docs/protocol.md)
with the open_clip model's own modules and plain loops: nothing here calls proxyclip's pipeline,
last_block, methods or proxy code, so a test comparing against these can catch a wrong number.

A new method needs its reference in ``ATTENTION`` (tests over ``METHODS`` fail until it has one).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from proxyclip.config import CONF_DIR

import naive_resclip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization, as published
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def method_defaults(name: str) -> Dict[str, object]:
    """The knob values conf/method/<name>.yaml sets (its published defaults), read as plain YAML."""
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))
    node.pop("defaults", None)
    return node


# ---------------------------------------------------------------------------------------------- attention rows
def _softmax_row(a, b, i, tau, bias=None):
    logits = torch.tensor([tau * float(a[i] @ b[j]) for j in range(b.shape[0])], dtype=torch.float64)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, 0)


def _per_head(fn):
    """An attention given per head and row: fn(q_h, k_h, i, tau, grid, knobs) -> row (T,)."""

    def attention(q, k, heads, grid, feats, knobs):
        t, d = q.shape
        dh = d // heads
        a = torch.zeros(heads, t, t, dtype=torch.float64)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            for i in range(t):
                a[h, i] = fn(q[:, sl], k[:, sl], i, dh ** -0.5, grid, knobs)
        return a, grid, True

    return attention


def _clip_row(q, k, i, tau, grid, knobs):
    return _softmax_row(q, k, i, tau)


def _maskclip_row(q, k, i, tau, grid, knobs):
    row = torch.zeros(q.shape[0], dtype=torch.float64)
    row[i] = 1.0
    return row


def _sclip_row(q, k, i, tau, grid, knobs):
    return _softmax_row(q, q, i, tau) + _softmax_row(k, k, i, tau)


def _clearclip_row(q, k, i, tau, grid, knobs):
    return _softmax_row(q, q, i, tau)


def _naclip_row(q, k, i, tau, grid, knobs):
    std = float(knobs["gaussian_std"])
    pos = [None] + [(p // grid[1], p % grid[1]) for p in range(grid[0] * grid[1])]
    bias = torch.tensor([0.0 if pos[i] is None or pos[j] is None else
                         math.exp(-((pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2) / (2 * std ** 2))
                         for j in range(q.shape[0])], dtype=torch.float64)
    return _softmax_row(k, k, i, tau, bias)


def proxy_attention(feats: torch.Tensor, beta: float, gamma: float, shift: bool = True, mask: bool = True
                    ) -> torch.Tensor:
    """ProxyCLIP's attention of one window's (C, Hv, Wv) VFM features, one row at a time: (N, N)."""
    tokens = feats.reshape(feats.shape[0], -1).T.double()
    n = tokens.shape[0]
    f = [t / math.sqrt(float((t * t).sum())) for t in tokens]
    s = [[float(f[i] @ f[j]) for j in range(n)] for i in range(n)]
    mean = sum(map(sum, s)) / (n * n)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        row = [gamma * (s[i][j] - (beta * mean if shift else 0.0)) for j in range(n)]
        kept = [j for j in range(n) if row[j] >= 0 or not mask]
        if not kept:  # an empty row keeps its diagonal
            out[i, i] = 1.0
            continue
        z = sum(math.exp(row[j]) for j in kept)
        for j in kept:
            out[i, j] = math.exp(row[j]) / z
    return out


def _proxyclip(q, k, heads, grid, feats, knobs):
    a = proxy_attention(feats, knobs["beta"], knobs["gamma"], knobs["shift"], knobs["mask"])
    return a[None], tuple(feats.shape[-2:]), False


def _resclip(q, k, heads, grid, feats, knobs, ctx):
    ref = naive_resclip.reference(ctx["model"], ctx["x"], ctx["layers"], grid, ctx["text"], ctx["pixels"],
                                  ctx["patch"], knobs)
    return ref["attention"], grid, True


# name -> fn(q, k, heads, clip grid, vfm features, knobs) -> (A (heads or 1, T', T'), grid of A, CLS first);
# a method in CONTEXT also takes ctx= (window_context: the model, the tokens, the kept blocks' tokens,
# the query embeddings, the window's pixels, the patch size)
ATTENTION = {
    "clip": _per_head(_clip_row),
    "maskclip": _per_head(_maskclip_row),
    "sclip": _per_head(_sclip_row),
    "clearclip": _per_head(_clearclip_row),
    "naclip": _per_head(_naclip_row),
    "proxyclip": _proxyclip,
    "resclip": _resclip,
}
CONTEXT = {"resclip"}

# knob values a method needs on the tiny CLIP (2 blocks, a 4x4 grid): the blocks it reads, a prior
# and a threshold that matter there (the YAML's defaults are the paper's, for a ViT-B/16)
TINY_KNOBS: Dict[str, Dict[str, object]] = {
    "resclip": {"rcs_layers": [0], "gaussian_std": 1.5, "temp_thd": 0.4},
    # image-level: the graph's neighbours must fit the tiny image's patches (LPOSS: k <= their count),
    # LPOSS+'s pixel window a small image
    "lposs": {"k": 8},
    "lposs_plus": {"k": 8, "r": 5},
}
# knob values under which a method's attention does not read the last block's switches (ResCLIP's
# SFR runs a provisional pass of the block with them)
SWITCH_FREE: Dict[str, Dict[str, object]] = {"resclip": {"sfr": False}}
# (method, knob) -> other knob values under which that knob changes the output on the random tiny
# model: ResCLIP's rcs_temp scales the whole attention, which without the residual only reaches the
# output through out_proj's bias (zero in a randomly initialized CLIP) before ln_post
MATTERS_WITH: Dict[Tuple[str, str], Dict[str, object]] = {("resclip", "rcs_temp"): {"residual": True}}


def tiny_knobs(method: str) -> Dict[str, object]:
    return dict(TINY_KNOBS.get(method, {}))


def tiny_overrides(method: str) -> list:
    """``method.<knob>=<value>`` overrides of :data:`TINY_KNOBS` for a config with ``method``."""
    return [f"method.{k}={str(v).lower() if isinstance(v, bool) else v}".replace(" ", "")
            for k, v in tiny_knobs(method).items()]


def tiny_parts() -> list:
    """The layer parts every registered method reads on the tiny CLIP with :data:`TINY_KNOBS`."""
    from proxyclip.methods import METHODS
    from proxyclip.parts import method_parts

    out = set()
    for name, meth in METHODS.items():
        out |= set(method_parts(meth, knobs_of(name, **tiny_knobs(name))))
    return sorted(out)


def window_context(seg, enc, i: int, queries) -> Dict[str, object]:
    """What a CONTEXT reference reads for window ``i`` of ``enc``: the kept blocks' tokens, the
    reference text embeddings of ``queries``, the window's pixels (resized, cut, CLIP-normalized,
    padded: written out here), the patch size."""
    from proxyclip.parts import block_of

    resized = enc.image
    if tuple(enc.resized_size) != tuple(enc.image.shape[-2:]):
        resized = F.interpolate(enc.image[None], size=enc.resized_size, mode="bilinear",
                                align_corners=False)[0].clamp(0, 1)
    y1, y2, x1, x2 = enc.windows[i]
    crop = (resized[:, y1:y2, x1:x2] - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    top, bottom, left, right = enc.pad
    return {"layers": {block_of(n): t[i] for n, t in enc.layers.items()},
            "text": text_embeddings(seg.clip_model, seg.clip.tokenizer, queries),
            "pixels": F.pad(crop, (left, right, top, bottom)), "patch": seg.clip.patch_size}


# ---------------------------------------------------------------------------------------------- last block
def _resize_patches(x: torch.Tensor, grid, size) -> torch.Tensor:
    """(gh*gw, D) patch tokens -> (h*w, D) on another grid, bilinear (align_corners=False)."""
    if tuple(grid) == tuple(size):
        return x
    m = x.T.reshape(1, x.shape[1], *grid)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)[0].flatten(1).T


def last_block(model, x: torch.Tensor, grid, feats, method: str, knobs, ctx=None) -> Tuple[torch.Tensor, tuple, bool]:
    """Z (T', D) of CLIP's last block for one window's tokens ``x`` (1 + gh*gw, D), float64,
    with ``method``'s attention; the grid of Z's patch tokens; whether Z starts with CLS.
    ``ctx``: what a method of :data:`CONTEXT` reads besides q and k (:func:`window_context`)."""
    visual = copy.deepcopy(model.visual).double()
    block = visual.transformer.resblocks[-1]
    x = x.double()
    d = x.shape[1]
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    xn = block.ln_1(x)
    q, k, v = (xn @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    extra = {"ctx": {"model": model, "x": x, **(ctx or {})}} if method in CONTEXT else {}
    a, agrid, cls = ATTENTION[method](q, k, block.attn.num_heads, grid, None if feats is None else feats.double(),
                                      knobs, **extra)
    if cls:
        xv, vv = x, v
    else:  # the pattern is over the patch tokens of another grid: values and skip resized there
        xv, vv = _resize_patches(x[1:], grid, agrid), _resize_patches(v[1:], grid, agrid)
    hp, t = a.shape[0], a.shape[1]
    dh = d // hp
    out = torch.zeros(t, d, dtype=torch.float64)
    for h in range(hp):
        sl = slice(h * dh, (h + 1) * dh)
        out[:, sl] = a[h] @ vv[:, sl]
    o = block.attn.out_proj(out)
    ls1 = getattr(block, "ls_1", torch.nn.Identity())
    ls2 = getattr(block, "ls_2", torch.nn.Identity())
    y = xv + ls1(o) if knobs["residual"] else o
    z = y + ls2(block.mlp(block.ln_2(y))) if knobs["ffn"] else y
    return z, agrid, cls


def dense(model, x, grid, feats, method, knobs, ctx=None) -> torch.Tensor:
    """(E, h, w) L2-normalized dense embeddings of one window, float64."""
    z, agrid, cls = last_block(model, x, grid, feats, method, knobs, ctx)
    z = z[1:] if cls else z
    visual = copy.deepcopy(model.visual).double()
    e = F.normalize(visual.ln_post(z) @ visual.proj, dim=-1)
    return e.T.reshape(e.shape[1], *agrid)


def open_clip_dense(seg, crop, method):
    """(E, 14, 14) dense map of a (3, 224, 224) crop from open_clip's own modules: clip = the model's
    visual forward with output tokens; maskclip = the tokens entering its last block (captured from
    that forward), then v = ln_1(x) W_v^T + b_v, out_proj, + x, + mlp(ln_2(.)); both through proj."""
    assert method in ("clip", "maskclip")
    visual = copy.deepcopy(seg.clip_model.visual)
    visual.output_tokens = True
    x = (crop - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    block = visual.transformer.resblocks[-1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            _, tokens = visual(x[None])
    finally:
        handle.remove()
    if method == "maskclip":
        t = captured["x"][0]
        d = t.shape[-1]
        with torch.no_grad():
            v = block.ln_1(t) @ block.attn.in_proj_weight[2 * d:].T + block.attn.in_proj_bias[2 * d:]
            y = t + block.attn.out_proj(v)
            z = y + block.mlp(block.ln_2(y))
            tokens = visual.ln_post(z[1:])[None]
    e = F.normalize((tokens @ visual.proj)[0].double(), dim=-1)
    return e.T.reshape(-1, 14, 14)


# ---------------------------------------------------------------------------------------------- text, scores
_TEXT: Dict[tuple, torch.Tensor] = {}


def text_embeddings(model, tokenizer, queries) -> torch.Tensor:
    """(Q, E) float64: per name, the 80 OpenAI templates encoded by open_clip, each L2-normalized,
    averaged, normalized again."""
    from proxyclip.text import TEMPLATES

    rows = []
    for name in queries:
        key = (id(model), name)
        if key not in _TEXT:
            with torch.no_grad():
                e = F.normalize(model.encode_text(tokenizer([t(name) for t in TEMPLATES])).double(), dim=-1)
            _TEXT[key] = F.normalize(e.mean(0), dim=0)
        rows.append(_TEXT[key])
    return torch.stack(rows)


def merge_by_hand(window_scores, boxes, size) -> torch.Tensor:
    """Sum of each window's (Q, h, w) scores at its box, divided by the per-pixel window count."""
    q = window_scores[0].shape[0]
    canvas = torch.zeros(q, *size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for s, (y1, y2, x1, x2) in zip(window_scores, boxes):
        for y in range(y1, y2):
            canvas[:, y, x1:x2] += s[:, y - y1].double()
            count[y, x1:x2] += 1
    assert count.min() >= 1
    return canvas / count


def window_scores(dense_map: torch.Tensor, text: torch.Tensor, box, pad) -> torch.Tensor:
    """(Q, h, w) cosines of one window upsampled to the padded window, the padding cut away."""
    top, bottom, left, right = pad
    hh, ww = box[1] - box[0] + top + bottom, box[3] - box[2] + left + right
    s = torch.einsum("ehw,qe->qhw", dense_map.double(), text.double())
    up = F.interpolate(s[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
    return up[:, top:hh - bottom, left:ww - right]


def scores(seg, enc, queries, method: str, knobs) -> torch.Tensor:
    """(Q, H, W) float64 scores of an Encoded: each window's reference dense map, cosines with the
    reference text embeddings, upsampled, padding cut, merged by hand, resized to the image."""
    text = text_embeddings(seg.clip_model, seg.clip.tokenizer, queries)
    per = []
    for i, box in enumerate(enc.windows):
        feats = None if enc.vfm_features is None else enc.vfm_features[i]
        ctx = window_context(seg, enc, i, queries) if method in CONTEXT else None
        d = dense(seg.clip_model, enc.clip_tokens[i], enc.clip_grid, feats, method, knobs, ctx)
        per.append(window_scores(d, text, box, enc.pad))
    merged = merge_by_hand(per, enc.windows, enc.resized_size)
    if tuple(merged.shape[-2:]) != enc.image_size:
        merged = F.interpolate(merged[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
    return merged


def knobs_of(method: str, **changes) -> Dict[str, object]:
    """The method's YAML defaults with ``changes`` applied (residual, ffn and its own knobs)."""
    k = method_defaults(method)
    k.update(changes)
    return k


def other_value(knob, current):
    """A valid value of ``knob`` other than ``current`` (for numbers: the slider end it is not at)."""
    if knob.kind == "bool":
        return not current
    if knob.kind == "choice":
        return next(c for c in knob.choices if c != current)
    if knob.kind == "ints":
        return [v + 1 for v in current]
    lo, hi, _ = knob.slider
    new = hi if current == lo else lo
    return int(new) if knob.kind == "int" else float(new)


# ---------------------------------------------------------------------------------------------- image level
# image-level methods (proxyclip/image_level.py): name -> fn(seg, enc, queries, knobs) -> (Q, h, w) float64
# merged scores at the resized size (tests/naive_lposs.py)
from naive_lposs import IMAGE_LEVEL  # noqa: E402

ATTENTION.update(IMAGE_LEVEL)
