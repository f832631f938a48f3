"""Trident (docs/regions.md, "Trident"): equal to its float64 reference (tests/naive_trident.py) on the
tiny models with a tiny random SAM ViT (conf/vfm/test_tiny_sam.yaml); its SAM part equal to timm's own
last block; each pitfall of the method checked by a case that fails when it is got wrong."""

import io

import pytest
import torch
import torch.nn.functional as F

import naive
import naive_trident
from conftest import tiny_config
from fixtures_eval import encoded_twice_through_cache
from proxyclip import Segmenter
from proxyclip.encoded import Encoded
from proxyclip.sam_attention import multiple_of_16_size, sam_input, valid_attention
from proxyclip.zoo.trident import proxy_stage, sam_weights, splice, token_offsets

CLASSES = ["sky", "person; people", "horse"]
QUERIES = ["sky", "person", "people", "horse"]


@pytest.fixture(scope="module")
def seg():
    return Segmenter.from_config(tiny_config("method=trident"))


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def enc(seg, image):
    return seg.encode(image)


@pytest.fixture(scope="module")
def reference(seg, enc):
    return naive_trident.trident(seg, enc, QUERIES, naive.knobs_of("trident"))


def test_equals_the_reference(seg, enc, reference):
    pred = seg.decode(enc, CLASSES)
    torch.testing.assert_close(pred.scores.double(), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("changes", [{"cos_fac": 0.0}, {"cos_fac": 0.4, "refine_neg_cos": False},
                                     {"beta": 0.5, "gamma": 6.0}])
def test_each_knob_equals_the_reference(seg, enc, reference, changes):
    knobs = naive.knobs_of("trident", **changes)
    pred = seg.decode(enc, CLASSES, **changes)
    ref = naive_trident.trident(seg, enc, QUERIES, knobs)
    torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ref, reference, atol=1e-5)


def test_cityscapes_halves_equal_the_reference(image):
    """trident.halves=true: each half of the image through SAM, the canvas split at half its width, a
    block-diagonal W; the left half's scores do not depend on the right half's SAM pass."""
    seg2 = Segmenter.from_config(tiny_config("method=trident", "trident.halves=true"))
    enc2 = seg2.encode(image)
    assert int(enc2.sam["pieces"]) == 2 and tuple(enc2.sam["valid.0"].tolist()) == (8, 6)  # 80 x 56 -> 80 x 64 -> 128 x 102
    pred = seg2.decode(enc2, CLASSES)
    ref = naive_trident.trident(seg2, enc2, QUERIES, naive.knobs_of("trident"))
    torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-4)
    from proxyclip.zoo import trident as tri

    low = {}
    real = tri.grid_scores
    tri.grid_scores = lambda *a, **k: low.setdefault(len(low), real(*a, **k))
    try:
        seg2.decode(enc2, CLASSES)
        other = dict(enc2.sam, **{"qkv.1": torch.randn_like(enc2.sam["qkv.1"])})
        seg2.decode(Encoded(**{**enc2.__dict__, "sam": other, "memo": {}}), CLASSES)
    finally:
        tri.grid_scores = real
    torch.testing.assert_close(low[0][..., :6], low[1][..., :6])
    assert not torch.allclose(low[0][..., 6:], low[1][..., 6:])
    assert seg2.encode_spec.sam_key != Segmenter.from_config(tiny_config("method=trident")).encode_spec.sam_key


def test_the_sam_part_is_timms_last_block(seg, enc, image):
    """P_h v_h over the whole grid (uncropped) = the input of the last block's attn.proj in timm's forward."""
    model = seg.sam.model
    seen = []
    hook = model.blocks[-1].attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x, valid = sam_input(image, seg.sam.spec.input_size)
    with torch.no_grad():
        model.forward_intermediates(x, indices=[1], norm=False, intermediates_only=True)
    hook.remove()
    part = enc.sam
    full = dict(part, valid=part["grid"])  # the whole grid as "valid": no crop
    heads = int(part["qkv"].shape[1])
    got = torch.cat([naive_trident.sam_attention(full, h)[0] @ part["qkv"][2, h].double() for h in range(heads)], -1)
    torch.testing.assert_close(got, seen[0].reshape(got.shape).double(), atol=1e-5, rtol=1e-4)
    assert tuple(int(t) for t in part["valid"]) == valid


def test_sam_input_geometry():
    assert multiple_of_16_size(448, 597) == (464, 608)  # Trident's preprocess_image: VOC 500x375 at 448
    assert multiple_of_16_size(448, 608) == (448, 608)  # multiples of 16 are kept
    assert multiple_of_16_size(100, 100) == (336, 336)  # floored at 336
    x, valid = sam_input(torch.rand(3, 375, 500), 1024)
    assert x.shape == (1, 3, 1024, 1024) and valid == (48, 64)
    assert x[0, :, 768:].abs().max() == 0  # zero padding below the 768 valid rows
    _, valid = sam_input(torch.rand(3, 80, 112), 128)
    assert valid == (5, 8)  # multiples of 16 kept; long side 112 -> 128: 91 x 128 -> 5 x 8 cells


def test_sam_rows_are_not_renormalized_after_the_crop(enc):
    p, v = valid_attention(enc.sam, 0)
    hv, wv = (int(t) for t in enc.sam["valid"])
    assert p.shape == (hv * wv, hv * wv) and v.shape[0] == hv * wv
    rows = p.sum(-1)
    assert (rows < 1 - 1e-4).all()  # the softmax ran over every key of the 8x8 grid
    ref, _ = naive_trident.sam_attention(enc.sam, 0)
    torch.testing.assert_close(p.double(), ref, atol=1e-6, rtol=1e-5)


def test_refine_neg_cos_changes_only_negative_thresholds_and_cos_fac_zero_keeps_positive_cosines():
    """Synthetic W inputs: 2 heads on a 1x6 grid (valid 1x6), values of 4 tokens near e1 and 2 opposite
    ones (cosine 0.22 with each other, -0.78 with the others), so those 2 rows have a negative mean cosine."""
    g = torch.Generator().manual_seed(0)
    n, d = 6, 4
    v = torch.tensor([[1.0, 0, 0, 0]] * 4 + [[-1.0, 0.8, 0, 0], [-1.0, -0.8, 0, 0]])
    v[:4] += 0.05 * torch.randn(4, d, generator=g)
    qkv = torch.randn(3, 2, n, d, generator=g)
    qkv[2] = torch.stack([v, v[:, [0, 2, 1, 3]]])
    part = {"qkv": qkv, "rel_h": torch.randn(1, 1, d, generator=g), "rel_w": torch.randn(n, n, d, generator=g),
            "grid": torch.tensor([1, n]), "valid": torch.tensor([1, n]), "scale": torch.tensor(0.5, dtype=torch.float64)}
    cs = [F.normalize(qkv[2, h].double(), dim=-1) @ F.normalize(qkv[2, h].double(), dim=-1).T for h in range(2)]
    mean_cos = (cs[0].mean(1) + cs[1].mean(1)) / 2
    negative = mean_cos < 0
    assert negative.any() and (~negative).any()
    on, off = sam_weights(part, 1.2, True), sam_weights(part, 1.2, False)
    torch.testing.assert_close(on[~negative], off[~negative])  # rows with t >= 0: the same
    assert not torch.allclose(on[negative], off[negative])  # t < 0 -> 0.6: fewer kept entries
    for got, flag in ((on, True), (off, False)):
        torch.testing.assert_close(got.double(), naive_trident.sam_w(part, 1.2, flag), atol=1e-6, rtol=1e-5)
    # cos_fac 0: every entry with a positive cosine is kept, whatever its row's mean
    zero = sam_weights(part, 0.0, True).double()
    ps = [naive_trident.sam_attention(part, h)[0] for h in range(2)]
    r = sum(p * (c > 0) for p, c in zip(ps, cs)) / 2
    torch.testing.assert_close(zero, r / r.sum(1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_the_affinity_mean_is_joint_over_the_windows():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 3, 3, generator=g)
    a = proxy_stage(feats, 1.2, 3.0)
    other = feats.clone()
    other[1] = torch.randn(8, 3, 3, generator=g) + 2.0  # only window 1 changes
    assert not torch.allclose(proxy_stage(other, 1.2, 3.0)[0], a[0])  # window 0's attention moves with it
    f = F.normalize(feats.flatten(2).transpose(1, 2).double(), dim=-1)
    s = f @ f.transpose(1, 2)
    s = 3.0 * (s - 1.2 * s.mean())  # one mean over both windows
    ref = torch.softmax(s.masked_fill(s < 0, float("-inf")), -1)
    torch.testing.assert_close(a.double(), ref, atol=1e-6, rtol=1e-5)


def test_splice_averages_overlaps_at_token_offsets():
    maps = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    canvas = splice(maps, [(0, 0), (0, 1)])
    assert canvas.shape == (1, 2, 3)
    torch.testing.assert_close(canvas[0], torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))


def test_token_offsets_round_a_shifted_window_onto_the_grid(seg, enc):
    from proxyclip.image_level import ImageInputs

    x = ImageInputs(windows=[(0, 336, 0, 336), (0, 336, 224, 560), (0, 336, 261, 597)], pad=(0, 0, 0, 0),
                    resized_size=(336, 597), image=torch.zeros(3, 1, 1), text=torch.zeros(1, 1), masks=None,
                    batch_size=1, block_inputs=None, resized=None, window_method=None, vfm_features=None, point=None,
                    memo={})
    assert token_offsets(x, (21, 21)) == [(0, 0), (0, 14), (0, 16)]  # 261 / 16 = 16.3 -> 16; canvas 21 x 37


def test_the_output_grid_is_the_sam_grid(seg, enc):
    """The scores are the SAM grid's, bilinear to the image: constant on no CLIP / canvas cell."""
    from proxyclip.zoo import trident as tri

    got = {}
    real = tri.grid_scores

    def spy(*a, **k):
        got["low"] = real(*a, **k)
        return got["low"]

    tri.grid_scores = spy
    try:
        pred = seg.decode(enc, CLASSES)
    finally:
        tri.grid_scores = real
    hv, wv = (int(t) for t in enc.sam["valid"])
    assert got["low"].shape == (4, hv, wv)
    up = F.interpolate(got["low"][None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred.scores, up)


def test_decode_from_a_stored_encode_equals_predict(seg, enc, image):
    buf = io.BytesIO()
    torch.save(enc.to_dict(), buf)
    buf.seek(0)
    stored = Encoded.from_dict(torch.load(buf, weights_only=False))
    assert stored.sam_key == seg.encode_spec.sam_key and stored.sam_key.startswith("test_tiny_sam-")
    a = seg.decode(stored, CLASSES, cos_fac=0.5)
    b = seg.predict(image, CLASSES, cos_fac=0.5)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.labels, b.labels)
    again = seg.encode(image, reuse=stored)  # the SAM part is reused, not recomputed
    assert again.sam is stored.sam


def test_feature_cache_keeps_the_sam_part(seg, image, tmp_path):
    first, second, calls = encoded_twice_through_cache(seg, image, tmp_path)
    assert calls == 0
    torch.testing.assert_close(second.sam["qkv"], first.sam["qkv"])
    torch.testing.assert_close(seg.decode(second, CLASSES).scores, seg.decode(first, CLASSES).scores)


def test_bad_inputs_are_one_clear_error(seg, enc, image, tiny_segmenter):
    from proxyclip.sam_attention import sam_attn_spec

    plain = tiny_segmenter.encode(image)  # proxyclip: no SAM part
    assert plain.sam is None and tiny_segmenter.sam is None
    with pytest.raises(ValueError, match="reads the SAM part"):
        seg.decode(plain, CLASSES)
    with pytest.raises(ValueError, match="no residual and no FFN"):
        seg.decode(enc, CLASSES, residual=True)
    with pytest.raises(ValueError, match="cos_fac must be a number >= 0"):
        seg.decode(enc, CLASSES, cos_fac=-1.0)
    with pytest.raises(ValueError, match="trident.sam=dino_vitb16 is not a SAM ViT"):
        sam_attn_spec(tiny_config("method=trident", "trident.sam=dino_vitb16"), False)
    with pytest.raises(ValueError, match="trident.sam=nosuch: no such conf/vfm preset"):
        sam_attn_spec(tiny_config("method=trident", "trident.sam=nosuch"), False)


def test_pretrained_sam_offline_fails_at_once(monkeypatch):
    from proxyclip.backbones.weights import WeightsUnavailable
    from proxyclip.sam_attention import build_sam_encoder
    from proxyclip.specs import SamAttnSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = SamAttnSpec("sam_vitb", "samvit_base_patch16.sa1b", 1024, "{}")
    with pytest.raises(WeightsUnavailable, match="samvit_base_patch16"):
        build_sam_encoder(spec, "pretrained", 0, None, torch.device("cpu"), torch.float32)
