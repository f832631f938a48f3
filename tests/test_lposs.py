"""LPOSS / LPOSS+ (proxyclip/zoo/lposs.py) against float64 references written from the equations
(tests/naive_lposs.py): the pieces on random tensors, the whole decode on the tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import naive
import naive_lposs
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.zoo import lposs as L

CLASSES = ["sky", "person; people", "horse"]


def test_conjugate_gradient_equals_the_loop_and_is_truncated():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T / 30 + 0.05 * torch.eye(30, dtype=torch.float64)  # badly conditioned: 10 steps do not converge
    b = torch.randn(30, 4, generator=g, dtype=torch.float64)
    b[:, 2] = 0  # a zero column stays zero
    got = L.conjugate_gradient(lambda v: a @ v, b)
    want = torch.stack([naive_lposs.cg(a, b[:, q]) for q in range(4)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    exact = torch.linalg.solve(a, b)
    assert float((got - exact).norm()) > 1e-3 * float(exact.norm())  # 10 iterations, not the closed form
    easy = torch.eye(30, dtype=torch.float64) * 2  # converges in one step: the tolerance stops it
    torch.testing.assert_close(L.conjugate_gradient(lambda v: easy @ v, b), b / 2)


def test_patch_graph_equals_the_loop():
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(20, 6, generator=g, dtype=torch.float64), dim=-1)
    locs = torch.rand(20, 2, generator=g, dtype=torch.float64) * 100
    for k, gamma, sigma, power in ((5, 3.0, 0.01, 1.0), (20, 1.0, 0.05, 2.0)):
        got = L.patch_graph(feats, locs, k, gamma, sigma, power)
        want = naive_lposs.knn_graph(feats, locs.tolist(), k, gamma, sigma, power)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got, got.T)


def test_pixel_step_equals_the_dense_reference_and_kornia_lab_the_formula():
    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(3, 9, 11, generator=g, dtype=torch.float64)
    torch.testing.assert_close(L.lab_image(rgb), naive_lposs.srgb_to_lab(rgb) / torch.tensor(
        [100.0, 128.0, 128.0], dtype=torch.float64)[:, None, None], atol=1e-5, rtol=1e-5)
    scores = torch.randn(2, 9, 11, generator=g, dtype=torch.float64)
    for alpha, tau, r in ((0.95, 0.01, 13), (0.5, 0.3, 5)):
        got = L.pixel_refine(rgb, scores, alpha, tau, r)
        want = naive_lposs.pixel_step(rgb, scores, alpha, tau, r)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def small():
    """Tiny CLIP and VFM (value features), a 32-px window: 2 windows of 2x2 patches, a 32x45 image."""
    return lambda name: Segmenter.from_config(tiny_config(f"method={name}", "vfm.feature=v", "protocol.short_side=32",
                                                          "protocol.crop=32", "protocol.stride=16"))


@pytest.mark.parametrize("name", ["lposs", "lposs_plus"])
def test_the_decode_equals_the_float64_reference(small, rand_image, name):
    seg = small(name)
    enc = seg.encode(rand_image)
    assert enc.resized_size == (32, 45) and len(enc.windows) == 2 and enc.vfm_features.shape[-2:] == (2, 2)
    for change in ({"k": 6}, {"k": 8, "alpha": 0.5, "gamma": 1.0, "sigma": 0.05, "pix_dist_pow": 2.0}):
        knobs = naive.knobs_of(name, **change, **({"r": 5, "tau": 0.1} if name == "lposs_plus" else {}))
        pred = seg.decode(enc, CLASSES, **{k: v for k, v in knobs.items() if k != "name"})
        ref = naive.ATTENTION[name](seg, enc, ["sky", "person", "people", "horse"], knobs)
        ref = F.interpolate(ref[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-4)
        assert pred.params["k"] == knobs["k"] and pred.spec.logit_scale == 1.0


def test_lposs_differs_from_maskclip_and_its_knobs_matter(small, rand_image):
    seg = small("lposs")
    enc = seg.encode(rand_image)
    base = seg.decode(enc, CLASSES, k=6).scores
    assert not torch.allclose(base, seg.decode(enc, CLASSES, method="maskclip").scores, atol=1e-3)
    for knob, value in (("alpha", 0.5), ("gamma", 1.0), ("k", 3), ("sigma", 0.2), ("pix_dist_pow", 2.0)):
        assert not torch.allclose(base, seg.decode(enc, CLASSES, **{"k": 6, knob: value}).scores, atol=1e-6), knob


def test_k_larger_than_the_patch_count_is_a_clear_error(small, rand_image):
    seg = small("lposs")
    with pytest.raises(ValueError, match=r"lposs: k=400 neighbours, but this image has only 8 patches "
                                         r"\(2 windows of 2x2\): set method.k <= 8") as err:
        seg.predict(rand_image, CLASSES)
    assert "\n" not in str(err.value)
    assert seg.predict(rand_image, CLASSES, k=8).labels.shape == rand_image.shape[1:]  # k = N is allowed


def test_lposs_needs_a_vfm():
    from proxyclip.methods import get_method

    assert get_method("lposs").needs_vfm and get_method("lposs_plus").level == "image"


@pytest.mark.parametrize("dataset", ["voc21", "context60", "coco_object", "cityscapes", "ade20k", "custom"])
def test_protocol_lposs_is_the_documented_one_on_every_dataset(dataset):
    """conf/protocol/lposs.yaml = docs/regions.md's official protocol, the same on every benchmark:
    short side 448 (long side <= 2048), windows 224 / 112, prob_thd 0, logit scale 1, no area rule,
    the dataset's own class file; with method=lposs_plus the decode reads it."""
    from omegaconf import OmegaConf

    from proxyclip import compose_config
    from proxyclip.resolve import decode_spec

    cfg = compose_config("eval", ["data_root=/nonexistent", "dataset.root=/nonexistent", "protocol=lposs",
                                  "method=lposs_plus", f"dataset={dataset}"])
    p = OmegaConf.to_container(cfg.protocol, resolve=True)
    want = {"short_side": 448, "max_long_side": 2048, "crop": 224, "stride": 112, "prob_thd": 0.0,
            "logit_scale": 1.0, "area_thd": None, "classnames": None}
    assert {k: p[k] for k in want} == want
    spec = decode_spec(cfg)
    assert (spec.method, spec.logit_scale, spec.prob_thd, spec.area_thd) == ("lposs_plus", 1.0, 0.0, None)
