"""The last-block methods (docs/methods.md): each against a float64 reference written from its
equations (tests/naive.py), vanilla CLIP against open_clip's own forward, one Encoded decoded by
every registered method, each switch and knob checked for its value, not only for a change.

Methods that run their own last block (naive.OwnBlock: SC-CLIP, GEM, CASS) take the same checks on their
block output, dense maps or window scores, with knob values that fit the tiny 2-block CLIP
(naive.TINY_KNOBS); their own tests (tests/test_<method>.py) check them on ViT-B/16."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import naive
import naive_corrclip
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.backbones import CLIP_MEAN, CLIP_STD
from proxyclip.last_block import Attention, BlockInputs, BlockOutput, Dense, Scores, run_last_block
from proxyclip.methods import METHODS, gaussian_neighbourhood, get_method
from proxyclip.parts import method_parts, resid_pre
from proxyclip.text import parse_classes

CLASSES = ["sky", "person; people", "horse"]
CLIP_METHODS = [name for name, m in METHODS.items() if not m.needs_vfm and m.level == "window"]
# the per-window methods; image-level ones (proxyclip/image_level.py) are compared whole: tests/test_lposs.py
# and test_each_image_level_method_equals_its_reference below
WINDOW_METHODS = [name for name, m in METHODS.items() if m.level == "window"]
QUERIES = parse_classes(CLASSES).queries
TINY = naive.tiny_values  # knob values a method needs on the tiny CLIP (tests/naive.py TINY_KNOBS)


def test_every_method_has_a_reference():
    """tests/naive.py holds a float64 reference of every registered method's attention."""
    assert set(naive.ATTENTION) == set(METHODS)


@pytest.fixture(scope="module")
def block_inputs(tiny_segmenter):
    """Random tokens entering the last block and block 0, VFM features, query embeddings and window
    pixels of two windows; ``make(residual, ffn)`` -> BlockInputs whose hook points are recorded in
    ``points`` (a method running its own block is compared with what it records); ``ctx(i)``: window i
    for the references."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 17, 64, generator=g)
    feats = torch.randn(2, 8, 3, 5, generator=g) + 0.3  # a VFM grid other than CLIP's 4x4: values resized
    block0 = torch.randn(2, 17, 64, generator=g)
    text = F.normalize(torch.randn(4, tiny_segmenter.clip.visual.proj.shape[1], generator=g), dim=-1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    points = {}

    def record(name, t):
        points[name] = t
        return t

    def make(residual=False, ffn=False):
        return BlockInputs(tiny_segmenter.clip, tokens, (4, 4), feats, {}, (0, 2), record,
                           layers={resid_pre(0): block0}, text=text, pixels=lambda: pixels,
                           switches={"residual": residual, "ffn": ffn})

    def ctx(i):
        return {"layers": {0: block0[i]}, "text": text, "pixels": pixels[i], "patch": tiny_segmenter.clip.patch_size}

    return tokens, feats, make, ctx, text, points


def _call(meth, x, knobs):
    """The method's function with its knobs (and the switches, when it runs its own last block)."""
    args = {k: knobs[k] for k in meth.knob_names}
    if meth.own_switches:
        args.update(residual=knobs["residual"], ffn=knobs["ffn"])
    return meth.attention(x, **args)


def _own_result(out):
    """(kind in the reference's result, tensor) of a method's non-Attention result."""
    if isinstance(out, Scores):
        return "scores", out.scores
    if isinstance(out, Dense):
        return "dense", out.embeddings
    assert isinstance(out, BlockOutput)
    return "z", out.tokens


@pytest.mark.parametrize("residual,ffn", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("name", WINDOW_METHODS)
def test_each_method_equals_a_naive_loop(tiny_segmenter, block_inputs, name, residual, ffn):
    tokens, feats, make, ctx, text, points = block_inputs
    x = make(residual, ffn)
    meth = get_method(name)
    knobs = naive.tiny_knobs(name, residual=residual, ffn=ffn)
    if name in ("naclip", "cass"):
        knobs["gaussian_std"] = 1.5  # a prior that matters on a 4x4 grid
    points.clear()
    att = _call(meth, x, knobs)
    if naive.own_block(name):  # its own last block: what it returns, and its Z
        if not naive.scores_itself(name):  # a block output (the switches do not apply)
            assert isinstance(att, BlockOutput)
        kind, got = _own_result(att)
        for i in range(2):
            ref = naive.own_result(tiny_segmenter.clip_model, tokens[i], (4, 4), feats[i], name, knobs, text,
                                   {k: v[i] for k, v in points.items()}, ctx(i)["layers"])
            if isinstance(att, BlockOutput):
                assert (tuple(att.grid), att.cls) == (ref["grid"], ref["cls"])
            torch.testing.assert_close(got[i].double(), ref[kind], atol=2e-5, rtol=1e-5)
            if "clip.last_block_output" in points:
                torch.testing.assert_close(points["clip.last_block_output"][i].double(), ref["z"], atol=2e-5, rtol=1e-5)
        return
    assert isinstance(att, Attention)
    z = run_last_block(x, att, residual, ffn)
    for i in range(2):
        ref, grid, cls = naive.last_block(tiny_segmenter.clip_model, tokens[i], (4, 4), feats[i], name, knobs, ctx(i))
        assert (tuple(att.grid), att.cls) == (grid, cls)
        torch.testing.assert_close(z[i].double(), ref, atol=2e-5, rtol=1e-5)


def test_attention_patterns(block_inputs):
    x = block_inputs[2]()
    points = block_inputs[5]
    heads = x.heads
    sclip = get_method("sclip").attention(x).pattern
    assert sclip.shape == (2, heads, 17, 17)
    torch.testing.assert_close(sclip.sum(-1), torch.full((2, heads, 17), 2.0))  # not renormalized
    for name in WINDOW_METHODS:  # a method that declares rows summing to 1 has them
        meth = METHODS[name]
        points.clear()
        att = _call(meth, x, naive.tiny_knobs(name))
        if isinstance(att, BlockOutput):  # its own block output: on CLIP's grid, CLS as declared
            assert att.tokens.shape == (2, 16 + att.cls, 64) and tuple(att.grid) == (4, 4)
        if not isinstance(att, Attention):  # its own block: finite, and the attention it records is a softmax
            assert torch.isfinite(_own_result(att)[1]).all()
            if "attention.pattern" in points:
                p = points["attention.pattern"]
                assert p.shape[1] in (1, heads)
                torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
            continue
        assert torch.isfinite(att.pattern).all() and att.pattern.shape[1] in (1, heads)
        if att.rows_sum_to_one:
            torch.testing.assert_close(att.pattern.sum(-1), torch.ones(att.pattern.shape[:-1]))
    identity = get_method("maskclip").attention(x).pattern
    assert identity.shape == (2, 1, 17, 17) and torch.equal(identity[1, 0], torch.eye(17))


def test_naclip_kernel():
    omega = gaussian_neighbourhood((3, 4), 2.0)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)  # CLS row and column
    assert torch.all(omega[1:, 1:].diagonal() == 1)
    # patch (0,0) is token 1, patch (1,1) token 6, patch (2,3) token 12
    assert math.isclose(float(omega[1, 6]), math.exp(-2 / 8), rel_tol=1e-6)
    assert math.isclose(float(omega[1, 12]), math.exp(-(4 + 9) / 8), rel_tol=1e-6)
    torch.testing.assert_close(omega, omega.T)


def test_vanilla_clip_equals_open_clip_forward():
    """method=clip at the native 224 grid = open_clip's unmodified model, patch tokens through ln_post and proj."""
    seg = Segmenter.from_config(tiny_config("method=clip", "protocol.short_side=224", "protocol.crop=224",
                                            "protocol.stride=224"))
    img = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(1))
    _, cache = seg.run_with_cache(img, CLASSES, names=["clip.dense"])
    assert cache["clip.dense"].shape[-2:] == (14, 14)
    visual = copy.deepcopy(seg.clip_model.visual)
    visual.output_tokens = True
    x = (img - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    with torch.no_grad():
        _, tokens = visual(x[None])
    ref = F.normalize(tokens @ visual.proj, dim=-1).transpose(1, 2).reshape(1, -1, 14, 14)
    torch.testing.assert_close(cache["clip.dense"], ref, atol=1e-5, rtol=1e-5)


def _reference_dense(seg, enc, name, knobs, cache=None):
    """(n, E, h, w) float64 reference dense maps of every window of ``enc`` (tests/naive.py);
    ``cache``: the decode's recorded hook tensors (the ties a method running its own block settled)."""
    ctx = (lambda i: naive.window_context(seg, enc, i, QUERIES)) if naive.needs_context(name) else (lambda i: None)
    return torch.stack([naive.dense(seg.clip_model, enc.clip_tokens[i], enc.clip_grid,
                                    None if enc.vfm_features is None else enc.vfm_features[i], name, knobs, ctx(i),
                                    naive.window_choices(cache, i))
                        for i in range(len(enc.windows))])


def _every_methods_parts(seg):
    """The layer parts every registered method reads with its tiny-CLIP knob values (naive.tiny_parts)."""
    return naive.tiny_parts(seg.clip.num_blocks)


def _names(name, *more):
    """A cache filter: ``more`` and the method's own hook points (``<name>.*``)."""
    return lambda n: n in more or n.startswith(f"{name}.")


def _own_scores(name):
    """The method runs its own last block (its reference gives the scores, not only the dense maps)."""
    return naive.own_block(name)


def test_one_encode_serves_every_method(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image, keep=_every_methods_parts(tiny_segmenter))
    for name in WINDOW_METHODS:
        tiny = TINY(name)
        seg = tiny_segmenter.for_method(name)  # a method reading another VFM readout (CASS: keys): same models
        enc_m = enc if seg is tiny_segmenter else seg.encode(rand_image, reuse=enc)
        assert enc_m.clip_tokens is enc.clip_tokens  # the CLIP part is the one encode's
        pred, cache = seg.run_with_cache(enc_m, CLASSES, names=_names(name, "attention.pattern", "clip.dense"),
                                         method=name, **tiny)
        assert pred.method == name and torch.isfinite(pred.scores).all()
        # the dense maps of every window = a float64 reference of this method from the block's weights
        ref = _reference_dense(seg, enc_m, name, naive.tiny_knobs(name), cache)
        torch.testing.assert_close(cache["clip.dense"].double(), ref, atol=2e-5, rtol=1e-5)
        if _own_scores(name):  # and its own scores = the reference's, merged as every method's
            expected = naive.scores(seg, enc_m, pred.queries, name, naive.tiny_knobs(name), cache)
            torch.testing.assert_close(pred.scores.double(), expected, atol=2e-5, rtol=1e-5)
        # decoding with another method = a Segmenter configured with that method (same seeded weights)
        if not METHODS[name].needs_vfm:
            own = Segmenter.from_config(tiny_config(f"method={name}", *naive.tiny_overrides(name)))
            assert own.vfm is None
            torch.testing.assert_close(own.predict(rand_image, CLASSES).scores, pred.scores)
    # the method's own defaults: clearclip's logit scale is 50, the protocol's prob_thd is kept
    assert tiny_segmenter.decode(enc, CLASSES, method="clearclip").params["logit_scale"] == 50.0


@pytest.mark.parametrize("name", WINDOW_METHODS)
def test_switches_and_knobs_reach_the_block(tiny_segmenter, rand_image, name):
    """Each switch does exactly what it says to the block output, and each knob of each method gives
    the reference's value at that setting."""
    seg = tiny_segmenter.for_method(name)  # a method reading another VFM readout (CASS: keys): same models
    tiny = TINY(name)
    defaults = naive.tiny_knobs(name)
    settings = [defaults] + [{**defaults, k.name: naive.other_value(k, defaults[k.name])} for k in METHODS[name].knobs
                             if k.name not in naive.TINY_FIXED.get(name, ())]
    keep = set(naive.tiny_parts(seg.clip.num_blocks))
    keep |= {p for s in settings for p in method_parts(METHODS[name], s, seg.clip.num_blocks)}
    enc = seg.encode(rand_image, keep=sorted(keep))
    block = seg.clip.last_block
    z = {}
    for residual, ffn in ((False, False), (True, False), (True, True)):
        pred, cache = seg.run_with_cache(enc, CLASSES, names=["clip.last_block_output", "clip.dense"], method=name,
                                         residual=residual, ffn=ffn, **tiny, **naive.SWITCH_FREE.get(name, {}))
        assert (pred.params["residual"], pred.params["ffn"]) == (residual, ffn)
        z[residual, ffn] = cache["clip.last_block_output"]
    grid = tuple(cache["clip.dense"].shape[-2:])
    x = enc.clip_tokens
    if naive.own_block(name) and not METHODS[name].own_switches:  # its own last block: the switches change nothing
        assert torch.equal(z[True, True], z[False, False]) and torch.equal(z[True, False], z[False, False])
    else:
        if z[True, True].shape[1] != x.shape[1]:  # a pattern over another grid, no CLS: X resized bilinear there
            patches = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *enc.clip_grid)
            x = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        # residual: Y = X + O, so (residual on) - (residual off) = X
        torch.testing.assert_close(z[True, False] - z[False, False], x, atol=1e-5, rtol=1e-5)
        # ffn: Z = Y + mlp(ln_2(Y))
        with torch.no_grad():
            y = z[True, False]
            torch.testing.assert_close(z[True, True], y + block.mlp(block.ln_2(y)), atol=1e-5, rtol=1e-5)
    # each of the method's own knobs, at a value other than its default: the reference at that value
    # (dense maps; a method's own window scores: the image scores)
    for knob in METHODS[name].knobs:
        if knob.name in naive.TINY_FIXED.get(name, ()):
            continue  # no other value fits the tiny CLIP: tests/test_<method>.py checks it on ViT-B/16
        value = naive.other_value(knob, defaults[knob.name])
        where = {**defaults, **naive.MATTERS_WITH.get((name, knob.name), {})}
        given = {k: where[k] for k in (*tiny, *naive.MATTERS_WITH.get((name, knob.name), {}))}
        changed = {**where, knob.name: value}
        pred, cache = seg.run_with_cache(enc, CLASSES, names=_names(name, "clip.dense"), method=name,
                                         **{**given, knob.name: value})
        assert pred.params[knob.name] == value
        if naive.scores_itself(name):  # a knob of its own scores (e.g. CASS's text side): the reference's scores
            ref = naive.scores(seg, enc, pred.queries, name, changed, cache)
            torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-5)
            _, base = seg.run_with_cache(enc, CLASSES, names=_names(name), method=name, **given)
            assert not torch.allclose(ref, naive.scores(seg, enc, pred.queries, name, where, base), atol=1e-4)
        elif "clip.dense" in cache:
            ref = _reference_dense(seg, enc, name, changed, cache)
            torch.testing.assert_close(cache["clip.dense"].double(), ref, atol=2e-5, rtol=1e-5)
            assert not torch.allclose(ref, _reference_dense(seg, enc, name, where), atol=1e-4)  # it matters here
        else:
            ref = naive.scores(seg, enc, pred.queries, name, changed, cache)
            torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-5)
            assert not torch.allclose(ref, naive.scores(seg, enc, pred.queries, name, where), atol=1e-4)


def test_proxyclip_shift_and_mask_off_is_plain_softmax(tiny_segmenter, rand_image):
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names=["proxy.attention", "vfm.features"],
                                             shift=False, mask=False, gamma=2.5)
    f = F.normalize(cache["vfm.features"].flatten(2).transpose(1, 2).double(), dim=-1)
    direct = torch.softmax(2.5 * (f @ f.transpose(1, 2)), dim=-1)
    torch.testing.assert_close(cache["proxy.attention"].double(), direct, atol=1e-6, rtol=1e-5)


def test_proxyclip_scores_unchanged_by_the_refactor(tiny_segmenter, rand_image):
    """ProxyCLIP's dense output written out in float64 from the paper's equations and the model's
    modules: S = cos(VFM tokens); S' = gamma (S - beta mean S) per window; S' < 0 masked (an empty
    row keeps its diagonal); softmax; applied to CLIP's values v = ln_1(X) W_v^T + b_v resized
    bilinear to the VFM grid; out_proj; ln_post; proj; L2-normalized (residual, FFN off)."""
    seg = tiny_segmenter
    beta, gamma = 1.2, 3.0
    assert (seg.cfg.method.beta, seg.cfg.method.gamma, seg.cfg.method.residual, seg.cfg.method.ffn) == (
        beta, gamma, False, False)
    enc = seg.encode(rand_image)
    _, cache = seg.run_with_cache(enc, CLASSES, names=["clip.dense"])
    visual = copy.deepcopy(seg.clip_model.visual).double()
    block = visual.transformer.resblocks[-1]
    d = enc.clip_tokens.shape[-1]
    gh, gw = enc.clip_grid
    expected = []
    with torch.no_grad():
        for x, feats in zip(enc.clip_tokens.double(), enc.vfm_features.double()):
            f = F.normalize(feats.flatten(1).T, dim=-1)  # (N, C)
            s = f @ f.T
            s = gamma * (s - beta * s.mean())
            keep = s >= 0
            keep |= torch.eye(len(s), dtype=torch.bool) & ~keep.any(-1, keepdim=True)
            attn = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
            v = block.ln_1(x) @ block.attn.in_proj_weight[2 * d:].T + block.attn.in_proj_bias[2 * d:]
            v = v[1:].T.reshape(1, d, gh, gw)
            v = F.interpolate(v, size=feats.shape[-2:], mode="bilinear", align_corners=False)[0].flatten(1).T
            out = block.attn.out_proj(attn @ v)
            e = F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
            expected.append(e.T.reshape(e.shape[1], *feats.shape[-2:]))
    torch.testing.assert_close(cache["clip.dense"].double(), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_hooks_replace_the_attention_pattern(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    eye = lambda p, hook: torch.eye(p.shape[-1]).expand_as(p).clone()  # noqa: E731
    a = tiny_segmenter.run_with_hooks(enc, CLASSES, hooks={"attention.pattern": eye}, method="clip")
    b = tiny_segmenter.decode(enc, CLASSES, method="maskclip")
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_a_method_without_vfm_builds_none(caplog):
    with caplog.at_level(logging.WARNING):
        seg = Segmenter.from_config(tiny_config("method=sclip"))  # the VFM comes from the preset: no warning
    assert seg.vfm is None and seg.vfm_model is None
    assert sum("uses no VFM" in r.message for r in caplog.records) == 0
    with caplog.at_level(logging.WARNING):
        seg = Segmenter.from_config(tiny_config("method=sclip", "vfm=test_tiny"))  # chosen by the user: said once
    assert seg.vfm is None and sum("uses no VFM" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("overrides,match", [
    (["method=proxyclip", "vfm=none"], "needs a VFM.*method=maskclip"),
    (["method=naclip", "method.gaussian_std=-1"], "gaussian_std.*> 0"),
    (["postprocess=pamr", "postprocess.steps=-2"], "postprocess.steps"),
    (["postprocess=pamr", "postprocess.dilations=[]"], "postprocess.dilations.*empty"),
])
def test_bad_method_config_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        Segmenter.from_config(tiny_config(*overrides))


def test_bad_decode_arguments(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    with pytest.raises(ValueError, match="unknown method 'sclp'.*; known: " + ", ".join(METHODS)):
        tiny_segmenter.decode(enc, CLASSES, method="sclp")
    with pytest.raises(ValueError, match="sclip has no parameter.*beta"):
        tiny_segmenter.decode(enc, CLASSES, method="sclip", beta=1.0)
    with pytest.raises(ValueError, match="gaussian_std"):
        tiny_segmenter.decode(enc, CLASSES, method="naclip", gaussian_std=float("nan"))
    with pytest.raises(ValueError, match="residual must be true or false"):
        tiny_segmenter.decode(enc, CLASSES, residual=1)
    with pytest.raises(ValueError, match="unknown postprocess 'crf'.*pamr_naclip"):
        tiny_segmenter.decode(enc, CLASSES, postprocess="crf")
    with pytest.raises(ValueError, match="pamr has no setting.*stepz"):
        tiny_segmenter.decode(enc, CLASSES, postprocess={"name": "pamr", "stepz": 3})


def test_unknown_method_in_config_lists_the_known_ones():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="sclip"):
        tiny_config("method=sclp")


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.level == "image"])
def test_each_image_level_method_equals_its_reference(name, tmp_path):
    """An image-level method's merged maps = its float64 reference (tests/naive.py ATTENTION: (Q, h, w)
    at the resized size), on the tiny models with 32-px windows and every knob at a valid small value
    (a method reading mask proposals: a label map from a file, tests/naive_corrclip.py)."""
    meth = METHODS[name]
    masks = naive_corrclip.masks_file(tmp_path, (40, 56)) if meth.needs_masks else []
    seg = Segmenter.from_config(tiny_config(f"method={name}", f"vfm.feature={meth.vfm_feature or 'v'}", *masks,
                                            *naive.tiny_overrides(name), "protocol.short_side=32",
                                            "protocol.crop=32", "protocol.stride=16"))
    enc = seg.encode(torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(3)),
                     image_id="img" if meth.needs_masks else None)
    small = {"k": 6, "r": 5, "tau": 0.1}
    knobs = naive.knobs_of(name, **{**naive.tiny_values(name),
                                    **{k: v for k, v in small.items() if k in METHODS[name].knob_names}})
    pred = seg.decode(enc, CLASSES, **{k: knobs[k] for k in ("residual", "ffn", *METHODS[name].knob_names)})
    ref = naive.ATTENTION[name](seg, enc, ["sky", "person", "people", "horse"], knobs)
    ref = F.interpolate(ref[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-4)
