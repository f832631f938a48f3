"""Float64 references for the tests, written from the equations (docs/methods.md, docs/protocol.md)
with the open_clip model's own modules and plain loops: nothing here calls proxyclip's pipeline,
last_block, methods or proxy code, so a test comparing against these can catch a wrong number.

A new method needs its reference in ``ATTENTION`` (tests over ``METHODS`` fail until it has one):
an attention function, or an :class:`OwnBlock` for a method that runs its own last block (SC-CLIP,
GEM: tests/naive_scclip.py, tests/naive_gem.py; CASS: ``_cass`` here); a method reading more than q and k (kept blocks,
query embeddings, window pixels: ResCLIP) is in ``CONTEXT`` and gets ``ctx`` (:func:`window_context`).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import naive_gem
import naive_resclip
import naive_scclip
from proxyclip.config import CONF_DIR

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


# ---------------------------------------------------------------------------------------------- own last blocks
class OwnBlock:
    """The reference of a method that runs its own last block (it returns a BlockOutput, Dense or
    Scores instead of an Attention), in one of two forms:

    - ``OwnBlock(block, window_scores=None)``: ``block(model, layers, grid, knobs) -> (Z (T', D) before
      ln_post, grid of Z, CLS first)`` with ``layers`` {i: (T, D) tokens entering CLIP block i}, the last
      block's included (the rest from ``ctx["layers"]``, :func:`window_context`); ``window_scores(maps
      (Q, h, w), knobs)``: its own window scores from the cosines (None: the cosines). The residual and
      FFN switches do not apply to it (SC-CLIP, GEM).
    - ``OwnBlock(fn=fn)``: a method that may score the queries itself (e.g. CASS's text prior) and takes
      the switches itself: ``fn(model, x (1+N, D), grid, feats (C, Hv, Wv), knobs, text (Q, E) or None,
      choices)`` -> dict of ``z`` (N', D) before ln_post, ``grid`` of z, ``dense`` (E, h, w) and, with
      text, ``scores`` (Q, h, w), float64. ``choices``: this window's tensors recorded by the decode at
      hook points, for ties a float64 reference cannot break the same way (the reference checks that
      the recorded choice is one of its optima).

    :func:`own_result` gives both forms' results as that dict (``cls``: whether ``z`` starts with CLS)."""

    def __init__(self, block: Optional[Callable] = None, window_scores: Optional[Callable] = None,
                 fn: Optional[Callable] = None):
        assert (block is None) != (fn is None), "OwnBlock: give block or fn"
        self.block = block
        self.window_scores = window_scores
        self.fn = fn


def _softmax_list(row):
    top = max(row)
    e = [math.exp(r - top) for r in row]
    z = sum(e)
    return [v / z for v in e]


def _ward_clusters(t: torch.Tensor, h: float):
    """Partition of the rows of ``t`` (Q, E): agglomerative Ward on cosine distances (Lance-Williams),
    every merge at height <= h performed; a list of sorted member lists."""
    n = t.shape[0]
    tn = F.normalize(t.double(), dim=-1)
    d = {}
    for a in range(n):
        for b in range(a + 1, n):
            d[a, b] = min(max(1.0 - float(tn[a] @ tn[b]), 0.0), 2.0)
    members = {a: [a] for a in range(n)}
    nxt = n
    while len(members) > 1:
        (u, v), du = min(d.items(), key=lambda kv: kv[1])
        if du > h:
            break
        nu, nv = len(members[u]), len(members[v])
        for w in members:
            if w in (u, v):
                continue
            nw = len(members[w])
            duw, dvw = d[min(u, w), max(u, w)], d[min(v, w), max(v, w)]
            d[w, nxt] = math.sqrt(((nw + nu) * duw ** 2 + (nw + nv) * dvw ** 2 - nw * du ** 2) / (nu + nv + nw))
        members[nxt] = sorted(members.pop(u) + members.pop(v))
        d = {k: val for k, val in d.items() if u not in k and v not in k}
        nxt += 1
    return sorted(members.values())


def _lowrank(g: torch.Tensor, r: int, svd: str):
    if svd == "exact":
        u, s, vh = torch.linalg.svd(g)
        return u[:, :r], s[:r], vh[:r].T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # the method's documented seed, drawn fresh for every graph
        return torch.svd_lowrank(g, q=r, niter=2)


def _cass(model, x, grid, feats, knobs, text, choices):
    """CASS from its spec (docs/methods.md), one window, float64, loops where they are cheap."""
    import itertools

    visual = copy.deepcopy(model.visual).double()
    block = visual.transformer.resblocks[-1]
    x = x.double()
    d, heads = x.shape[1], block.attn.num_heads
    dh = d // heads
    tau = dh ** -0.5
    w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
    xn = block.ln_1(x)
    q, k, v = (xn @ w_in[i * d:(i + 1) * d].T + b_in[i * d:(i + 1) * d] for i in range(3))
    n = grid[0] * grid[1]
    kp, vp = k[1:], v[1:]
    # the VFM's keys on CLIP's grid, min-max mapped onto the range of CLIP's patch keys
    kd = F.interpolate(feats[None].double(), size=tuple(grid), mode="bilinear", align_corners=False)[0].reshape(
        feats.shape[0], n)
    kd = (kd - kd.min()) / (kd.max() - kd.min()) * (kp.max() - kp.min()) + kp.min()
    dv = kd.shape[0] // heads
    sl = [slice(h * dh, (h + 1) * dh) for h in range(heads)]
    a = [tau * kp[:, sl[h]] @ kp[:, sl[h]].T for h in range(heads)]
    g = [tau * kd[h * dv:(h + 1) * dv].T @ kd[h * dv:(h + 1) * dv] for h in range(heads)]
    kk = min(int(knobs["k_eigen"]), n)

    def spectrum(m):
        lam = torch.linalg.eigvalsh(m).flip(0)[:kk]
        lam = lam / lam.norm()
        return sorted((lam / lam.sum()).tolist())

    sg, sa = [spectrum(m) for m in g], [spectrum(m) for m in a]
    cost = [[1.0 - sum(abs(sg[i][t] - sa[j][t]) for t in range(kk)) for j in range(heads)] for i in range(heads)]
    if heads <= 7:
        best = min(itertools.permutations(range(heads)), key=lambda p: sum(cost[i][p[i]] for i in range(heads)))
    else:
        from scipy.optimize import linear_sum_assignment

        best = tuple(linear_sum_assignment(torch.tensor(cost).numpy())[1])
    perm = best
    if choices and "cass.assignment" in choices:  # the decode's choice, if it is one of the optima
        given = tuple(int(c) for c in choices["cass.assignment"])
        total = lambda p: sum(cost[i][p[i]] for i in range(heads))  # noqa: E731
        assert sorted(given) == list(range(heads)) and total(given) <= total(best) + 1e-6, (given, best, cost)
        perm = given
    r = min(int(knobs["rank"]), n)
    sf = float(knobs["scale_factor"])
    std = float(knobs["gaussian_std"])
    pos = [(p // grid[1], p % grid[1]) for p in range(n)]
    omega = [[math.exp(-((pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2) / (2 * std ** 2))
              for j in range(n)] for i in range(n)]
    out = torch.zeros(n, d, dtype=torch.float64)
    patterns = []
    for i in range(heads):  # CLIP head i fuses VFM head perm[i], weight 1 - cost[i][perm[i]]
        j = perm[i]
        w = 1.0 - cost[i][j]
        u, s, vv = _lowrank(g[j], r, knobs["svd"])
        if knobs["eigenscaling"] and float(s.max()) > float(s.min()):  # [lo, hi] -> [lo / 2, 1.5 hi]
            lo, hi = float(s.min()), float(s.max())
            s = torch.tensor([(x_ - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo for x_ in s.tolist()],
                             dtype=torch.float64)
        low = u @ torch.diag(s) @ vv.T
        for t in range(n):
            low[t, t] = 0.0
        mapped = (low - low.min()) / (low.max() - low.min()) * (a[i].max() - a[i].min()) + a[i].min()
        m = (sf * w * mapped + a[i]) / (sf * w + 1.0)
        p = torch.tensor([_softmax_list([float(m[t, c]) + omega[t][c] for c in range(n)]) for t in range(n)],
                         dtype=torch.float64)
        patterns.append(p)
        out[:, sl[i]] = p @ vp[:, sl[i]]
    o = block.attn.out_proj(out)
    ls1 = getattr(block, "ls_1", torch.nn.Identity())
    ls2 = getattr(block, "ls_2", torch.nn.Identity())
    y = x[1:] + ls1(o) if knobs["residual"] else o
    z = y + ls2(block.mlp(block.ln_2(y))) if knobs["ffn"] else y
    e = F.normalize(visual.ln_post(z) @ visual.proj, dim=-1)  # (N, E)
    res = {"z": z, "grid": tuple(grid), "dense": e.T.reshape(e.shape[1], *grid), "pattern": torch.stack(patterns)}
    if text is None:
        return res
    # the window's CLS through the standard last block: its global vector g
    o_cls = torch.zeros(d, dtype=torch.float64)
    for h in range(heads):
        att = _softmax_row(q[:, sl[h]], k[:, sl[h]], 0, tau)
        o_cls[sl[h]] = att @ v[:, sl[h]]
    y0 = x[0] + ls1(block.attn.out_proj(o_cls[None]))[0]
    z0 = y0 + ls2(block.mlp(block.ln_2(y0[None])))[0]
    glob = F.normalize(visual.ln_post(z0[None]) @ visual.proj, dim=-1)[0]
    t = text.double()
    prior = [float(glob @ t[qi]) for qi in range(t.shape[0])]
    adjusted = t.clone()
    alpha = float(knobs["mean_vector_weight"])
    for members in _ward_clusters(t, float(knobs["h_threshold"])):
        star = max(members, key=lambda qi: (prior[qi], -qi))  # the first of the highest
        tt = t[star] / t[star].norm()
        sims = [float(e[c] @ tt) for c in range(n)]
        top = sorted(range(n), key=lambda c: -sims[c])[:2]
        mean = F.normalize(sum(e[c] for c in top) / len(top), dim=0)
        adjusted[star] = F.normalize((1 - alpha) * tt + alpha * mean, dim=0)
    wg = float(knobs["global_weight"])
    sc = torch.tensor([[(1 - wg) * float(e[c] @ adjusted[qi]) + wg * prior[qi] for c in range(n)]
                       for qi in range(t.shape[0])], dtype=torch.float64)
    res.update(scores=sc.reshape(-1, *grid), prior=torch.tensor(prior, dtype=torch.float64), text=adjusted)
    return res


# name -> fn(q, k, heads, clip grid, vfm features, knobs) -> (A (heads or 1, T', T'), grid of A, CLS first);
# a method in CONTEXT also takes ctx= (window_context: the model, the tokens, the kept blocks' tokens,
# the query embeddings, the window's pixels, the patch size); or an OwnBlock (a method running its own
# last block; the block form reads ctx's layers)
ATTENTION = {
    "clip": _per_head(_clip_row),
    "maskclip": _per_head(_maskclip_row),
    "sclip": _per_head(_sclip_row),
    "clearclip": _per_head(_clearclip_row),
    "naclip": _per_head(_naclip_row),
    "proxyclip": _proxyclip,
    "resclip": _resclip,
    "scclip": OwnBlock(naive_scclip.reference),
    "gem": OwnBlock(naive_gem.reference, naive_gem.window_scores),
    "cass": OwnBlock(fn=_cass),
}
CONTEXT = {"resclip"}

# knob values a method needs on the tiny CLIP (2 blocks, a 4x4 grid): the blocks it reads, a prior
# and a threshold that matter there (the YAML's defaults are the paper's, for a ViT-B/16, and name
# blocks the tiny CLIP does not have)
TINY_KNOBS: Dict[str, Dict[str, object]] = {
    "resclip": {"rcs_layers": [0], "gaussian_std": 1.5, "temp_thd": 0.4},
    "scclip": {"pre_adjust": 0, "post_adjust": 0, "multi_start": 0, "multi_end": 1},
    "gem": {"depth": 3},
    # image-level: the graph's neighbours must fit the tiny image's patches (LPOSS: k <= their count),
    # LPOSS+'s pixel window a small image
    "lposs": {"k": 8},
    "lposs_plus": {"k": 8, "r": 5},
    # CorrCLIP's spatial branch averages block outputs before the last two: a 2-block CLIP has none
    "corrclip": {"spatial_blocks": 0},
}
# knobs that have no other valid value on the tiny CLIP (each checked on ViT-B/16 in tests/test_<method>.py)
TINY_FIXED: Dict[str, Tuple[str, ...]] = {"scclip": ("pre_adjust", "post_adjust", "multi_start", "multi_end")}
# knob values under which a method's attention does not read the last block's switches (ResCLIP's
# SFR runs a provisional pass of the block with them)
SWITCH_FREE: Dict[str, Dict[str, object]] = {"resclip": {"sfr": False}}
# (method, knob) -> other knob values under which that knob changes the output on the random tiny
# model: ResCLIP's rcs_temp scales the whole attention, which without the residual only reaches the
# output through out_proj's bias (zero in a randomly initialized CLIP) before ln_post
MATTERS_WITH: Dict[Tuple[str, str], Dict[str, object]] = {("resclip", "rcs_temp"): {"residual": True}}
# (method, knob) whose other value narrows what a later knob may take (CLIPer: fuse_feature off leaves one level,
# so select_layer must be -1..0): a test moving every knob in turn moves these back before the next one
NARROWS: Tuple[Tuple[str, str], ...] = (("cliper", "fuse_feature"),)
# method -> the switches (residual, ffn) it refuses to turn on, with one error line (Trident's last block has neither)
REFUSED_SWITCHES: Dict[str, Tuple[str, ...]] = {"trident": ("residual", "ffn")}


def tiny_values(method: str) -> Dict[str, object]:
    """Only the knob values of :data:`TINY_KNOBS` (keyword arguments of a decode on the tiny CLIP)."""
    return dict(TINY_KNOBS.get(method, {}))


def tiny_knobs(method: str, **changes) -> Dict[str, object]:
    """Every knob: the method's YAML defaults, with the tiny CLIP's values (TINY_KNOBS), then ``changes``."""
    return knobs_of(method, **{**tiny_values(method), **changes})


def tiny_overrides(method: str) -> list:
    """``method.<knob>=<value>`` overrides of :data:`TINY_KNOBS` for a config with ``method``."""
    return [f"method.{k}={str(v).lower() if isinstance(v, bool) else v}".replace(" ", "")
            for k, v in tiny_values(method).items()]


def tiny_parts(layers: Optional[int] = None) -> list:
    """The layer parts every registered method reads on the tiny CLIP (``layers`` blocks, 2 unless
    given) with :data:`TINY_KNOBS` (its check run)."""
    from proxyclip.methods import METHODS
    from proxyclip.parts import method_parts

    layers = 2 if layers is None else layers
    out = set()
    for name, meth in METHODS.items():
        out |= set(method_parts(meth, tiny_knobs(name), layers))
    return sorted(out)


def own_block(method: str) -> bool:
    return isinstance(ATTENTION[method], OwnBlock)


def scores_itself(method: str) -> bool:
    """An OwnBlock method that scores the queries itself and takes the switches (the ``fn`` form: CASS)."""
    return own_block(method) and ATTENTION[method].fn is not None


def needs_context(method: str) -> bool:
    """Its reference reads :func:`window_context` (a CONTEXT method, or an OwnBlock's earlier blocks)."""
    return method in CONTEXT or own_block(method)


def window_layers(enc, i: int) -> Dict[int, torch.Tensor]:
    """{block: (T, D) tokens entering it} of window ``i`` of an Encoded's kept layer parts."""
    out = {}
    for name, t in enc.layers.items():
        m = re.fullmatch(r"clip\.blocks\.(\d+)\.resid_pre", name)
        assert m, name
        out[int(m.group(1))] = t[i]
    return out


def window_context(seg, enc, i: int, queries) -> Dict[str, object]:
    """What a CONTEXT reference reads for window ``i`` of ``enc``: the kept blocks' tokens, the
    reference text embeddings of ``queries``, the window's pixels (resized, cut, CLIP-normalized,
    padded: written out here), the patch size."""
    resized = enc.image
    if tuple(enc.resized_size) != tuple(enc.image.shape[-2:]):
        resized = F.interpolate(enc.image[None], size=enc.resized_size, mode="bilinear",
                                align_corners=False)[0].clamp(0, 1)
    y1, y2, x1, x2 = enc.windows[i]
    crop = (resized[:, y1:y2, x1:x2] - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    top, bottom, left, right = enc.pad
    return {"layers": window_layers(enc, i),
            "text": text_embeddings(seg.clip_model, seg.clip.tokenizer, queries),
            "pixels": F.pad(crop, (left, right, top, bottom)), "patch": seg.clip.patch_size}


# ---------------------------------------------------------------------------------------------- last block
def _resize_patches(x: torch.Tensor, grid, size) -> torch.Tensor:
    """(gh*gw, D) patch tokens -> (h*w, D) on another grid, bilinear (align_corners=False)."""
    if tuple(grid) == tuple(size):
        return x
    m = x.T.reshape(1, x.shape[1], *grid)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)[0].flatten(1).T


def own_result(model, x, grid, feats, method: str, knobs, text=None, choices=None, layers=None
               ) -> Dict[str, torch.Tensor]:
    """The reference's results of a method running its own last block (:class:`OwnBlock`), one window:
    ``z``, ``grid``, ``cls``, ``dense`` and, with ``text``, ``scores`` (its window scores before
    upsampling). ``layers``: {i: tokens entering block i} of the earlier blocks (the block form)."""
    ref = ATTENTION[method]
    if ref.fn is not None:
        out = dict(ref.fn(model, x, grid, None if feats is None else feats.double(), knobs, text, choices))
        out.setdefault("cls", False)
        return out
    blocks = len(model.visual.transformer.resblocks)
    z, zgrid, cls = ref.block(model, {**(layers or {}), blocks - 1: x}, grid, knobs)
    visual = copy.deepcopy(model.visual).double()
    e = F.normalize(visual.ln_post(z[1:] if cls else z) @ visual.proj, dim=-1)
    out = {"z": z, "grid": tuple(zgrid), "cls": cls, "dense": e.T.reshape(e.shape[1], *zgrid)}
    if text is not None:
        s = torch.einsum("ehw,qe->qhw", out["dense"], text.double())
        out["scores"] = s if ref.window_scores is None else ref.window_scores(s, knobs)
    return out


def apply_attention(block, a, v, x, residual, ffn):
    """The last block around an attention a (heads, T, T): mix v per head, out_proj, then the
    residual (Y = X + ls_1(O)) and the FFN (Z = Y + ls_2(mlp(ln_2(Y)))) when on; float64."""
    hp, t, d = a.shape[0], a.shape[1], v.shape[1]
    dh = d // hp
    out = torch.zeros(t, d, dtype=torch.float64)
    for h in range(hp):
        sl = slice(h * dh, (h + 1) * dh)
        out[:, sl] = a[h] @ v[:, sl]
    o = block.attn.out_proj(out)
    ls1 = getattr(block, "ls_1", torch.nn.Identity())
    ls2 = getattr(block, "ls_2", torch.nn.Identity())
    y = x + ls1(o) if residual else o
    return y + ls2(block.mlp(block.ln_2(y))) if ffn else y


def last_block(model, x: torch.Tensor, grid, feats, method: str, knobs, ctx=None, choices=None
               ) -> Tuple[torch.Tensor, tuple, bool]:
    """Z (T', D) of CLIP's last block for one window's tokens ``x`` (1 + gh*gw, D), float64,
    with ``method``'s attention; the grid of Z's patch tokens; whether Z starts with CLS.
    ``ctx``: what a method of :data:`CONTEXT` reads besides q and k (:func:`window_context`); an
    OwnBlock method reads its ``layers`` ({i: tokens entering block i} of the earlier blocks);
    ``choices``: an OwnBlock's recorded ties (:func:`window_choices`)."""
    if own_block(method):
        r = own_result(model, x, grid, feats, method, knobs, None, choices, (ctx or {}).get("layers"))
        return r["z"], r["grid"], r["cls"]
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
    z = apply_attention(block, a, vv, xv, knobs["residual"], knobs["ffn"])
    return z, agrid, cls


def dense(model, x, grid, feats, method, knobs, ctx=None, choices=None) -> torch.Tensor:
    """(E, h, w) L2-normalized dense embeddings of one window, float64."""
    z, agrid, cls = last_block(model, x, grid, feats, method, knobs, ctx, choices)
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


def window_scores(dense_map: torch.Tensor, text: torch.Tensor, box, pad, own=None) -> torch.Tensor:
    """(Q, h, w) cosines of one window (``own(maps)``: the method's own scores from them) upsampled
    to the padded window, the padding cut away."""
    s = torch.einsum("ehw,qe->qhw", dense_map.double(), text.double())
    if own is not None:
        s = own(s)
    return upsample_window(s, box, pad)


def upsample_window(s: torch.Tensor, box, pad) -> torch.Tensor:
    """(Q, h, w) low-resolution window scores upsampled to the padded window, the padding cut away."""
    top, bottom, left, right = pad
    hh, ww = box[1] - box[0] + top + bottom, box[3] - box[2] + left + right
    up = F.interpolate(s[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
    return up[:, top:hh - bottom, left:ww - right]


def window_choices(cache, i: int):
    """Window ``i``'s entries of a decode's cache (window-level hook tensors), for :class:`OwnBlock`."""
    from proxyclip.hooks import window_hooks

    return {k: v[i] for k, v in (cache or {}).items() if k in window_hooks()}


def scores(seg, enc, queries, method: str, knobs, cache=None) -> torch.Tensor:
    """(Q, H, W) float64 scores of an Encoded: each window's reference dense map, cosines with the
    reference text embeddings (a method scoring the queries itself: its reference window scores),
    upsampled, padding cut, merged by hand, resized to the image. ``cache``: the decode's recorded
    hook tensors (ties, :class:`OwnBlock`)."""
    text = text_embeddings(seg.clip_model, seg.clip.tokenizer, queries)
    per = []
    for i, box in enumerate(enc.windows):
        feats = None if enc.vfm_features is None else enc.vfm_features[i]
        if own_block(method):
            r = own_result(seg.clip_model, enc.clip_tokens[i], enc.clip_grid, feats, method, knobs, text,
                           window_choices(cache, i), window_layers(enc, i))
            per.append(upsample_window(r["scores"], box, enc.pad))
            continue
        ctx = window_context(seg, enc, i, queries) if needs_context(method) else None
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
# merged scores at the resized size (tests/naive_lposs.py; CLIPer: its values at the original size, tests/naive_cliper.py)
from naive_lposs import IMAGE_LEVEL  # noqa: E402
from naive_cliper import IMAGE_LEVEL as _CLIPER  # noqa: E402

IMAGE_LEVEL = {**IMAGE_LEVEL, **_CLIPER}

ATTENTION.update(IMAGE_LEVEL)
from naive_corrclip import IMAGE_LEVEL as CORRCLIP_LEVEL  # noqa: E402

ATTENTION.update(CORRCLIP_LEVEL)

from naive_trident import IMAGE_LEVEL as _TRIDENT  # noqa: E402  (tests/naive_trident.py)

ATTENTION.update(_TRIDENT)
