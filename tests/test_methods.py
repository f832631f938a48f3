"""The last-block methods (docs/methods.md): each against a naive float64 loop written from its
equations, vanilla CLIP against open_clip's own forward, one Encoded decoded by every method."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.backbones import CLIP_MEAN, CLIP_STD
from proxyclip.last_block import BlockInputs, run_last_block
from proxyclip.methods import METHODS, gaussian_neighbourhood, get_method

CLASSES = ["sky", "person; people", "horse"]
CLIP_METHODS = ["clip", "maskclip", "sclip", "clearclip", "naclip"]


def naive_last_block(block, x, method, residual, ffn, std=5.0, grid=(4, 4)):
    """Z of the last block for one image, float64, one head and one row at a time."""
    block = copy.deepcopy(block).double()
    x = x.double()
    t, d = x.shape
    heads = block.attn.num_heads
    dh = d // heads
    xn = block.ln_1(x)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, k, v = (xn @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    tau = dh ** -0.5
    pos = [None] + [(i // grid[1], i % grid[1]) for i in range(grid[0] * grid[1])]
    out = torch.zeros(t, d, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
        for i in range(t):
            def softmax_row(a, bmat, bias=None):
                logits = torch.tensor([tau * float(a[i] @ bmat[j]) for j in range(t)], dtype=torch.float64)
                if bias is not None:
                    logits = logits + bias
                return torch.softmax(logits, 0)

            if method == "clip":
                row = softmax_row(qh, kh)
            elif method == "maskclip":
                row = torch.zeros(t, dtype=torch.float64)
                row[i] = 1.0
            elif method == "sclip":
                row = softmax_row(qh, qh) + softmax_row(kh, kh)
            elif method == "clearclip":
                row = softmax_row(qh, qh)
            elif method == "naclip":
                bias = torch.tensor([0.0 if pos[i] is None or pos[j] is None else
                                     math.exp(-((pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2)
                                              / (2 * std ** 2)) for j in range(t)], dtype=torch.float64)
                row = softmax_row(kh, kh, bias)
            out[i, sl] = row @ vh
    o = block.attn.out_proj(out)
    y = x + o if residual else o
    return y + block.mlp(block.ln_2(y)) if ffn else y


@pytest.fixture(scope="module")
def block_inputs(tiny_segmenter):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 17, 64, generator=g)
    return lambda: BlockInputs(tiny_segmenter.clip, tokens, (4, 4), None, {}, (0, 2), lambda n, t: t)


@pytest.mark.parametrize("residual,ffn", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("name", CLIP_METHODS)
def test_each_method_equals_a_naive_loop(tiny_segmenter, block_inputs, name, residual, ffn):
    x = block_inputs()
    meth = get_method(name)
    knobs = {"gaussian_std": 1.5} if name == "naclip" else {}
    att = meth.attention(x, **knobs)
    z = run_last_block(x, att, residual, ffn)
    block = tiny_segmenter.clip.last_block
    for i in range(2):
        ref = naive_last_block(block, x.tokens[i], name, residual, ffn, std=1.5)
        torch.testing.assert_close(z[i].double(), ref, atol=2e-5, rtol=1e-5)


def test_attention_patterns(block_inputs):
    x = block_inputs()
    heads = x.heads
    sclip = get_method("sclip").attention(x).pattern
    assert sclip.shape == (2, heads, 17, 17)
    torch.testing.assert_close(sclip.sum(-1), torch.full((2, heads, 17), 2.0))  # not renormalized
    for name in ("clip", "clearclip", "naclip"):
        kw = {"gaussian_std": 5.0} if name == "naclip" else {}
        pattern = get_method(name).attention(x, **kw).pattern
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, heads, 17))
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
    seg = Segmenter.from_config(tiny_config("method=clip", "method.short_side=224", "method.crop=224",
                                            "method.stride=224"))
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


def test_one_encode_serves_every_method(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    for name in METHODS:
        pred, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["attention.pattern", "clip.dense"],
                                                    method=name)
        assert pred.method == name and torch.isfinite(pred.scores).all()
        expected_t = 16 if name == "proxyclip" else 17
        assert cache["attention.pattern"].shape[-2:] == (expected_t, expected_t)
        # decoding with another method = a Segmenter configured with that method (same seeded weights)
        if name != "proxyclip":
            own = Segmenter.from_config(tiny_config(f"method={name}"))
            assert own.vfm is None
            torch.testing.assert_close(own.predict(rand_image, CLASSES).scores, pred.scores)
    # the method's own defaults: clearclip's logit scale is 50, the protocol's prob_thd is kept
    assert tiny_segmenter.decode(enc, CLASSES, method="clearclip").params["logit_scale"] == 50.0


def test_switches_and_knobs_reach_the_block(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    a = tiny_segmenter.decode(enc, CLASSES, method="maskclip")
    b = tiny_segmenter.decode(enc, CLASSES, method="maskclip", residual=False, ffn=False)
    assert a.params["residual"] and not b.params["residual"]
    assert not torch.allclose(a.scores, b.scores)
    n1 = tiny_segmenter.decode(enc, CLASSES, method="naclip", gaussian_std=0.5)
    n2 = tiny_segmenter.decode(enc, CLASSES, method="naclip", gaussian_std=50.0)
    assert not torch.allclose(n1.scores, n2.scores)


def test_proxyclip_shift_and_mask_off_is_plain_softmax(tiny_segmenter, rand_image):
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names=["proxy.attention", "vfm.features"],
                                             shift=False, mask=False, gamma=2.5)
    f = F.normalize(cache["vfm.features"].flatten(2).transpose(1, 2).double(), dim=-1)
    direct = torch.softmax(2.5 * (f @ f.transpose(1, 2)), dim=-1)
    torch.testing.assert_close(cache["proxy.attention"].double(), direct, atol=1e-6, rtol=1e-5)


def test_proxyclip_scores_unchanged_by_the_refactor(tiny_segmenter, rand_image):
    """ProxyCLIP computed the way the pipeline did before methods existed: values -> out_proj ->
    resize -> proxy attention -> ln_post/proj; the method path must give the same bits."""
    from proxyclip import proxy

    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    _, cache = seg.run_with_cache(enc, CLASSES, names=["clip.dense"])
    clip = seg.clip
    with torch.no_grad():
        values = clip.last_block_values(enc.clip_tokens, enc.clip_grid).float()
        projected = clip.out_proj_map(values)
        grid = tuple(enc.vfm_features.shape[-2:])
        s = proxy.normalize_affinity(proxy.cosine_affinity(enc.vfm_features), 1.2, 3.0)
        attn = proxy.masked_softmax(s, proxy.affinity_mask(s))
        dense = F.normalize(clip.head(proxy.aggregate(attn, proxy.resize_values(projected, grid))).float(), dim=-1)
    dense = dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], *grid)
    assert torch.equal(cache["clip.dense"], dense)


def test_hooks_replace_the_attention_pattern(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    eye = lambda p, hook: torch.eye(p.shape[-1]).expand_as(p).clone()  # noqa: E731
    a = tiny_segmenter.run_with_hooks(enc, CLASSES, hooks={"attention.pattern": eye}, method="clip")
    b = tiny_segmenter.decode(enc, CLASSES, method="maskclip")
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_a_method_without_vfm_builds_none(caplog):
    with caplog.at_level(logging.WARNING):
        seg = Segmenter.from_config(tiny_config("method=sclip"))
    assert seg.vfm is None and seg.vfm_model is None
    assert sum("uses no VFM" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("overrides,match", [
    (["method=proxyclip", "vfm=none"], "needs a VFM.*method=maskclip"),
    (["method=naclip", "method.gaussian_std=-1"], "gaussian_std.*> 0"),
    (["postprocess=pamr", "postprocess.steps=-2"], "postprocess.steps"),
    (["postprocess=pamr", "postprocess.dilations=[]"], "dilations is empty"),
])
def test_bad_method_config_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        Segmenter.from_config(tiny_config(*overrides))


def test_bad_decode_arguments(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image)
    with pytest.raises(ValueError, match="unknown method 'sclp'.*clip, maskclip, sclip"):
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
