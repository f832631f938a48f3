"""ResCLIP (docs/methods.md): against a float64 reference written from its equations
(tests/naive_resclip.py) on random tokens and on a ViT-B/16 with random weights; each pitfall of
the official code by a case that fails if it is got wrong; bad input as one clear error."""

import math

import pytest
import torch
import torch.nn.functional as F

import naive
import naive_resclip as nr
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.backbones import CLIP_MEAN, CLIP_STD
from proxyclip.last_block import BlockInputs, run_last_block
from proxyclip.methods import METHODS, get_method
from proxyclip.parts import resid_pre
from proxyclip.zoo.resclip import BASES, gaussian_kernel_1d, sfr_matrix, valid_paths

CLASSES = ["sky", "person; people", "horse"]
TINY = dict(rcs_layers=[0], gaussian_std=1.5)  # the tiny CLIP has 2 blocks; a prior that matters on 4x4


def knobs_for(base, **changes):
    w_resi = base == "sclip"
    return naive.knobs_of("resclip", base=base, residual=w_resi, ffn=w_resi, **{**TINY, **changes})


@pytest.fixture(scope="module")
def random_inputs(tiny_segmenter):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 17, 64, generator=g)
    block0 = torch.randn(2, 17, 64, generator=g)
    text = F.normalize(torch.randn(4, tiny_segmenter.clip.visual.proj.shape[1], generator=g), dim=-1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    return tokens, block0, text, pixels


def run_method(seg, inputs, knobs):
    """The registered method on BlockInputs of random tokens -> (Z, Attention, recorded hook points)."""
    tokens, block0, text, pixels = inputs
    rec = {}
    x = BlockInputs(seg.clip, tokens, (4, 4), None, {}, (0, 2), lambda n, t: rec.setdefault(n, t),
                    layers={resid_pre(0): block0}, text=text, pixels=lambda: pixels,
                    switches={"residual": knobs["residual"], "ffn": knobs["ffn"]})
    meth = get_method("resclip")
    att = meth.attention(x, **{k: knobs[k] for k in meth.knob_names})
    return run_last_block(x, att, knobs["residual"], knobs["ffn"]), att, rec


def reference(seg, inputs, i, knobs, variant=None):
    tokens, block0, text, pixels = inputs
    return nr.reference(seg.clip_model, tokens[i], {0: block0[i]}, (4, 4), text, pixels[i], 16, knobs, variant)


@pytest.mark.parametrize("base", BASES)
def test_resclip_equals_the_float64_reference_on_random_tokens(tiny_segmenter, random_inputs, base):
    knobs = knobs_for(base, temp_thd=0.3)
    z, att, rec = run_method(tiny_segmenter, random_inputs, knobs)
    assert att.pattern.shape == (2, tiny_segmenter.clip.heads, 17, 17) and att.cls and not att.rows_sum_to_one
    labels = set()
    for i in range(2):
        ref = reference(tiny_segmenter, random_inputs, i, knobs)
        torch.testing.assert_close(rec["resclip.rcs_attention"][i].double(), ref["rcs"], atol=1e-6, rtol=1e-5)
        assert torch.equal(rec["resclip.patch_labels"][i], ref["labels"])
        torch.testing.assert_close(rec["resclip.sfr"][i].double(), ref["sfr"], atol=4.9e-4, rtol=0)  # 1 fp16 ulp
        torch.testing.assert_close(att.pattern[i].double(), ref["attention"], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(z[i].double(), ref["z"], atol=2e-5, rtol=1e-5)
        labels |= set(ref["labels"].flatten().tolist())
    assert len(labels) > 2  # the SFR matrix is not trivial here


@pytest.mark.parametrize("base", BASES)
def test_rcs_after_the_softmax_and_sfr_before_it(tiny_segmenter, random_inputs, base):
    """The reference with RCS mixed into the logits and SFR into the probabilities (and, for
    NACLIP, Omega inside the tau_sfr scaling) is far from the method, which equals the right one."""
    knobs = knobs_for(base, temp_thd=0.3)
    z = run_method(tiny_segmenter, random_inputs, knobs)[0]
    right = reference(tiny_segmenter, random_inputs, 1, knobs)["z"]
    torch.testing.assert_close(z[1].double(), right, atol=2e-5, rtol=1e-5)
    for variant in ("swap", "omega_scaled") if base == "naclip" else ("swap",):
        wrong = reference(tiny_segmenter, random_inputs, 1, knobs, variant)["z"]
        assert (wrong - z[1].double()).abs().max() > 0.05, variant
    # rows of the final attention sum to tau_rcs ((1 - lambda_rcs) r + lambda_rcs), r = 2 for SCLIP's, else 1
    att = run_method(tiny_segmenter, random_inputs, knobs)[1].pattern
    r = 2.0 if base == "sclip" else 1.0
    want = knobs["rcs_temp"] * ((1 - knobs["rcs_weight"]) * r + knobs["rcs_weight"])
    torch.testing.assert_close(att.sum(-1), torch.full(att.shape[:-1], want))


def test_on_a_vit_b16_with_random_weights():
    """Default knobs (RCS over blocks 5..8, SFR), one 224 window: the pipeline's dense map equals
    the reference from the Encoded's tokens, the window's pixels and the decode's text."""
    seg = Segmenter.from_config(tiny_config("clip=vit_b16", "weights=random", "method=resclip", "protocol.short_side=224",
                                            "protocol.crop=224", "protocol.stride=224"))
    assert seg.encode_spec.parts == tuple(resid_pre(i) for i in (5, 6, 7, 8))
    img = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(3))
    enc = seg.encode(img)
    assert sorted(enc.layers) == sorted(resid_pre(i) for i in (5, 6, 7, 8)) and len(enc.windows) == 1
    knobs = naive.knobs_of("resclip")
    _, cache = seg.run_with_cache(enc, ["sky", "horse"], names=["clip.dense", "text.embeddings",
                                                                "resclip.patch_labels", "resclip.sfr"])
    pixels = (img - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    ref = nr.reference(seg.clip_model, enc.clip_tokens[0], {i: enc.layers[resid_pre(i)][0] for i in (5, 6, 7, 8)},
                       (14, 14), cache["text.embeddings"], pixels, 16, knobs)
    assert torch.equal(cache["resclip.patch_labels"][0], ref["labels"])
    torch.testing.assert_close(cache["resclip.sfr"][0].double(), ref["sfr"], atol=4.9e-4, rtol=0)
    visual = nr.double_visual(seg.clip_model)
    with torch.no_grad():
        e = F.normalize(visual.ln_post(ref["z"][1:]) @ visual.proj, dim=-1).T.reshape(-1, 14, 14)
    torch.testing.assert_close(cache["clip.dense"][0].double(), e, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SFR's pitfalls
def test_the_path_check_walks_d_over_the_global_d():
    """1x7 labels 0 0 0 1 0 0 0 (D = 6). From patch 1 the walk takes n / D of the way, n = 0..d:
    to patch 4 (d = 3) it visits 1, 1.5 -> 2, 2, 2.5 -> 2 (half to even) and never reaches the 1 at
    column 3: valid. Walking the whole segment (n / d), or rounding 2.5 up, reaches it."""
    labels = torch.tensor([[0, 0, 0, 1, 0, 0, 0]])
    valid, d, big_d = valid_paths(labels)
    assert big_d == 6 and d[1, 4] == 3
    # patch 1 to 0, 2, 3, 4 stays on label 0 (1 -> 0: 1, 0.83 -> 1, never leaves p_i); to 5, 6 it crosses column 3
    assert valid[1].tolist() == [True, True, True, True, True, False, False]
    assert not nr.path_ok(labels, 1, 4, 6, local=True) and not nr.path_ok(labels, 1, 4, 6, half_even=False)
    assert valid[0, 4].item() is False  # 0, 0.67 -> 1, 1.33 -> 1, 2, 2.67 -> 3
    # the decay of the invalid same-label pairs, exp(-d / D), read back from the matrix (no blur: kernel of 1)
    a = sfr_matrix(labels, delete_same_entity=True, std=0.1)
    row = a[2, 1:].double()  # token 2 = patch 1
    torch.testing.assert_close(row / row[0], torch.tensor([1, 1, 1, 0, 1, math.exp(-4 / 6), math.exp(-5 / 6)],
                                                          dtype=torch.float64), atol=2e-3, rtol=0)
    assert torch.equal(sfr_matrix(labels, False, 0.1)[2, 1:] > 0, torch.tensor([1, 1, 1, 0, 1, 1, 1]).bool())


def test_the_path_check_equals_a_brute_force_walk():
    labels = torch.randint(0, 3, (5, 7), generator=torch.Generator().manual_seed(2))
    valid, _, big_d = valid_paths(labels)
    want = torch.tensor([[nr.path_ok(labels, i, j, big_d) for j in range(35)] for i in range(35)])
    assert torch.equal(valid, want) and not want.all()


def test_the_sfr_blur_is_1d_along_the_raster_index():
    """2x3 labels [[0, 0, 1], [1, 0, 0]], sigma 0.5: kernel size min(6, int(4)) = 4, made odd: 5,
    g ~ exp(-2 m^2). Patch 2 = (0, 2) and patch 3 = (1, 0) share label 1; along the raster index
    they are neighbours, so the blurred row of patch 2 is [e^-8, e^-2 + e^-8, 1 + e^-2, 1 + e^-2,
    e^-2 + e^-8, e^-8] / sum (a 2-D blur would spread to (0, 1) and (1, 2) instead)."""
    g = gaussian_kernel_1d(6, 0.5)
    assert g.numel() == 5
    torch.testing.assert_close(g.double(), torch.tensor([math.exp(-2 * m * m) for m in (-2, -1, 0, 1, 2)],
                                                        dtype=torch.float64) / sum(math.exp(-2 * m * m) for m in (-2, -1, 0, 1, 2)))
    a = sfr_matrix(torch.tensor([[0, 0, 1], [1, 0, 0]]), delete_same_entity=False, std=0.5)
    e2, e8 = math.exp(-2), math.exp(-8)
    want = torch.tensor([e8, e2 + e8, 1 + e2, 1 + e2, e2 + e8, e8], dtype=torch.float64)
    row = a[3, 1:].double()  # token 3 = patch 2
    torch.testing.assert_close(row / row.sum(), want / want.sum(), atol=1e-3, rtol=0)
    assert torch.all(a[0] == 0) and torch.all(a[:, 0] == 0) and a.max() == 1


def test_the_sfr_matrix_is_divided_by_its_max_and_rounded_to_float16():
    labels = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(4))
    a = sfr_matrix(labels, True, 5.0)
    assert torch.equal(a, a.half().float()) and a.max() == 1.0
    exact = nr.sfr64(labels, True, 5.0, fp16=False)
    diff = (a.double() - exact).abs()
    assert diff.max() > 0 and diff.max() <= 4.9e-4  # rounded, by at most one fp16 ulp below 1
    torch.testing.assert_close(a.double(), nr.sfr64(labels, True, 5.0), atol=4.9e-4, rtol=0)


def test_labels_are_query_indices_and_below_temp_thd_is_query_0(tiny_segmenter, random_inputs):
    """Four query embeddings (no class list at all): the labels are query indices, 3 included;
    with temp_thd = 1 every pixel is below it: every patch gets query 0, the SFR matrix is the
    blur of an all-ones matrix."""
    knobs = knobs_for("sclip", temp_thd=0.3)
    rec = run_method(tiny_segmenter, random_inputs, knobs)[2]
    assert 3 in rec["resclip.patch_labels"].flatten().tolist()
    rec = run_method(tiny_segmenter, random_inputs, {**knobs, "temp_thd": 1.0})[2]
    assert torch.equal(rec["resclip.patch_labels"], torch.zeros(2, 4, 4, dtype=torch.int64))
    torch.testing.assert_close(rec["resclip.sfr"][0], sfr_matrix(torch.full((4, 4), 5), True, 1.5))


def test_labels_of_a_class_list_with_synonyms_are_its_queries(tiny_segmenter, rand_image):
    """Through the pipeline: the recorded labels equal the reference's argmax over the 4 queries of
    3 classes ("person; people" is two labels)."""
    seg = tiny_segmenter
    enc = seg.encode(rand_image, keep=[resid_pre(0)])
    knobs = naive.knobs_of("resclip", **TINY, temp_thd=0.3)
    _, cache = seg.run_with_cache(enc, CLASSES, names=["resclip.patch_labels", "text.embeddings", "clip.dense"],
                                  method="resclip", **TINY, temp_thd=0.3)
    assert cache["text.embeddings"].shape[0] == 4
    resized = F.interpolate(rand_image[None], size=enc.resized_size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    norm = (resized - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        p = enc.pad
        pixels = F.pad(norm[:, y1:y2, x1:x2], (p[2], p[3], p[0], p[1]))
        ref = nr.reference(seg.clip_model, enc.clip_tokens[i], {0: enc.layers[resid_pre(0)][i]}, enc.clip_grid,
                           cache["text.embeddings"], pixels, 16, knobs)
        assert torch.equal(cache["resclip.patch_labels"][i], ref["labels"])
        visual = nr.double_visual(seg.clip_model)
        with torch.no_grad():
            e = F.normalize(visual.ln_post(ref["z"][1:]) @ visual.proj, dim=-1).T.reshape(-1, *enc.clip_grid)
        torch.testing.assert_close(cache["clip.dense"][i].double(), e, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- switches, parts
@pytest.mark.parametrize("base", BASES)
def test_rcs_and_sfr_off_is_the_base_method(tiny_segmenter, rand_image, base):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    w_resi = base == "sclip"
    extra = {"gaussian_std": 1.5} if base == "naclip" else {}
    own = seg.decode(enc, CLASSES, method=base, residual=w_resi, ffn=w_resi, logit_scale=40.0, **extra)
    res = seg.decode(enc, CLASSES, method="resclip", base=base, rcs=False, sfr=False, residual=w_resi, ffn=w_resi,
                     gaussian_std=1.5)
    torch.testing.assert_close(res.scores, own.scores, atol=1e-5, rtol=1e-5)


def test_parts_are_the_rcs_blocks_and_a_decode_lacking_them_names_the_part(tiny_segmenter, rand_image):
    meth = METHODS["resclip"]
    assert meth.parts(rcs_layers=[5, 6, 7, 8], rcs=True) == tuple(resid_pre(i) for i in (5, 6, 7, 8))
    assert meth.parts(rcs_layers=[5, 6, 7, 8], rcs=False) == ()
    enc = tiny_segmenter.encode(rand_image)
    with pytest.raises(ValueError, match=r"^method resclip reads the encode part clip.blocks.0.resid_pre, which this "
                                         r"Encoded lacks.*keep=\['clip.blocks.0.resid_pre'\]"):
        tiny_segmenter.decode(enc, CLASSES, method="resclip", **TINY)


@pytest.mark.parametrize("overrides,match", [
    (["method.rcs_layers=[0,2]"], r"^rcs_layers=\[0, 2\]: block 2 is out of range; this CLIP has blocks 0..1"),
    (["method.rcs_layers=[-1]"], r"^method.rcs_layers must be a list of integers >= 0"),
    (["method.base=vanilla"], r"^method.base must be one of naclip, clearclip, sclip, got 'vanilla'"),
    (["method.base=sclip"], r"^resclip base=sclip runs ResCLIP's w_resi block.*method.residual=true method.ffn=true"),
    (["method.base=sclip", "method.residual=true"], r"residual=true ffn=false"),
])
def test_bad_config_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        Segmenter.from_config(tiny_config("method=resclip", "method.rcs_layers=[0]", *overrides))


def test_bad_decode_arguments(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image, keep=[resid_pre(0)])
    with pytest.raises(ValueError, match=r"^rcs_layers=\[5\]: block 5 is out of range; this CLIP has blocks 0..1"):
        seg.decode(enc, CLASSES, method="resclip", rcs_layers=[5])
    with pytest.raises(ValueError, match=r"^base must be one of naclip, clearclip, sclip, got 'gem'"):
        seg.decode(enc, CLASSES, method="resclip", base="gem", **TINY)
    with pytest.raises(ValueError, match=r"^resclip base=sclip"):
        seg.decode(enc, CLASSES, method="resclip", base="sclip", **TINY)
    spec = seg.decode_spec("resclip", **TINY)
    with pytest.raises(ValueError, match="needs the decode's query embeddings"):
        seg.dense_embeddings(enc, 0, 1, spec)
    assert seg.dense_embeddings(enc, 0, 1, seg.decode_spec("resclip", sfr=False, **TINY)).shape[:2] == (1, seg.clip.visual.proj.shape[1])


def test_hook_points_fire_with_their_shapes(tiny_segmenter, rand_image):
    enc = tiny_segmenter.encode(rand_image, keep=[resid_pre(0)])
    _, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=lambda n: n.startswith("resclip."), method="resclip",
                                             **TINY)
    n, t = len(enc.windows), 17
    assert {k: tuple(v.shape) for k, v in cache.items()} == {
        "resclip.rcs_attention": (n, tiny_segmenter.clip.heads, t, t), "resclip.patch_labels": (n, 4, 4),
        "resclip.sfr": (n, t, t)}
