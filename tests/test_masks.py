"""Mask proposals as a stage of the encode (proxyclip/masks): the label-map rule, files in CorrCLIP's
layout, the SAM 2 / SAM generators with seeded random weights, the disk cache, the hook, the errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip import Segmenter
from proxyclip.backbones.weights import WeightsUnavailable
from proxyclip.encoded import Encoded
from proxyclip.masks import label_map, mask_stage
from proxyclip.specs import EncodeSpec

from conftest import tiny_config

H, W = 80, 112


def _stack(*boxes, size=(6, 8)):
    """Boolean masks, each the rectangle (y1, y2, x1, x2)."""
    out = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for m, (a, b, c, d) in zip(out, boxes):
        m[a:b, c:d] = True
    return out


def test_label_map_paints_in_ascending_area_so_the_largest_wins():
    big, small, mid, inner = (0, 4, 0, 6), (2, 3, 5, 8), (1, 6, 4, 7), (1, 2, 1, 2)
    # areas: big 24, small 3, mid 15, inner 1 -> ids by area: inner 1, small 2, mid 3, big 4
    got = label_map(_stack(big, small, mid, inner))
    want = torch.zeros(6, 8, dtype=torch.int64)
    want[2:3, 5:8] = 2  # small, then painted over by the larger mid and big where they overlap
    want[1:6, 4:7] = 3
    want[0:4, 0:6] = 4  # big wins everywhere it covers: the nested inner mask disappears
    assert torch.equal(got, want)
    assert int((got == 1).sum()) == 0 and int(got[5, 7]) == 0 and int(got[2, 7]) == 2


def test_equal_areas_keep_their_order_and_empty_stacks_give_zeros():
    a, b = (0, 2, 0, 2), (1, 3, 1, 3)  # both 4 pixels, overlapping at (1, 1)
    got = label_map(_stack(a, b))
    assert int(got[1, 1]) == 2 and int(got[0, 0]) == 1 and int(got[2, 2]) == 2
    assert torch.equal(label_map(torch.zeros(0, 6, 8, dtype=torch.bool)), torch.zeros(6, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(M, H, W\) stack"):
        label_map(torch.zeros(6, 8, dtype=torch.bool))


def _image_file(tmp_path, name="img_001"):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy()
    path = tmp_path / f"{name}.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def file_segmenter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("region_masks")
    return Segmenter.from_config(tiny_config("masks=file", f"masks.dir={folder}")), folder


def test_file_round_trips_the_official_npz_layout(file_segmenter, tmp_path):
    seg, folder = file_segmenter
    labels = np.random.RandomState(1).randint(0, 7, size=(H, W)).astype(np.int32)
    np.savez_compressed(folder / "img_001.npz", instance_mask=labels)  # data/region_masks/<set>/<stem>.npz
    enc = seg.encode(str(_image_file(tmp_path)))
    assert enc.masks.dtype == torch.int64 and torch.equal(enc.masks, torch.from_numpy(labels).long())
    assert enc.masks_key == seg.encode_spec.masks_key and enc.masks_key.startswith("file-")
    back = Encoded.from_dict(enc.to_dict())
    assert torch.equal(back.masks, enc.masks) and back.masks_key == enc.masks_key
    # an image given as a tensor names its proposals with image_id
    img = torch.from_numpy(np.array(Image.open(tmp_path / "img_001.png"))).permute(2, 0, 1).float() / 255
    assert torch.equal(seg.encode(img, image_id="img_001").masks, enc.masks)


def test_file_reads_boolean_stacks_and_png_label_maps(file_segmenter, tmp_path):
    seg, folder = file_segmenter
    stack = _stack((0, 40, 0, 60), (10, 20, 10, 20), size=(H, W)).numpy()
    np.savez(folder / "stack.npz", instance_mask=stack)
    enc = seg.encode(str(_image_file(tmp_path, "stack")))
    want = torch.zeros(H, W, dtype=torch.int64)
    want[0:40, 0:60] = 2  # the large mask (id 2) covers the small one (id 1)
    assert torch.equal(enc.masks, want)
    Image.fromarray(np.full((H, W), 300, dtype=np.uint16)).save(folder / "png16.png")
    assert int(seg.encode(str(_image_file(tmp_path, "png16"))).masks.unique().item()) == 300


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"no proposals for image 'missing': expected .*missing\.npz or .*missing\.png"),
    ("corrupt", r"masks file .*corrupt\.npz: cannot be read"),
    ("wrongkey", r"masks file .*wrongkey\.npz: no array 'instance_mask' \(it has labels; set masks.key\)"),
    ("wrongsize", r"masks file .*wrongsize\.npz: label map of size 10x12, the image is 80x112"),
    ("rgb", r"masks file .*rgb\.png: expected a single-channel label map, got a RGB image"),
    ("floats", r"masks file .*floats\.npz: expected an integer \(H, W\) label map or an \(M, H, W\) stack"),
])
def test_a_bad_mask_file_is_one_error_line_naming_it(file_segmenter, tmp_path, case, pattern):
    seg, folder = file_segmenter
    if case == "corrupt":
        (folder / "corrupt.npz").write_bytes(b"not a zip archive")
    elif case == "wrongkey":
        np.savez(folder / "wrongkey.npz", labels=np.zeros((H, W), np.int32))
    elif case == "wrongsize":
        np.savez(folder / "wrongsize.npz", instance_mask=np.zeros((10, 12), np.int32))
    elif case == "rgb":
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "rgb.png")
    elif case == "floats":
        np.savez(folder / "floats.npz", instance_mask=np.zeros((H, W), np.float32))
    with pytest.raises(ValueError, match=pattern) as err:
        seg.encode(str(_image_file(tmp_path, case)))
    assert "\n" not in str(err.value)


def test_file_needs_a_folder_and_an_image_name(tmp_path):
    with pytest.raises(ValueError, match="masks=file needs masks.dir="):
        Segmenter.from_config(tiny_config("masks=file"))
    seg = Segmenter.from_config(tiny_config("masks=file", f"masks.dir={tmp_path}"))
    with pytest.raises(ValueError, match=r"pass a path to encode, or encode\(image, image_id="):
        seg.encode(torch.rand(3, H, W))


def test_hook_and_replay_of_the_proposals(file_segmenter, tmp_path):
    seg, folder = file_segmenter
    np.savez(folder / "hooked.npz", instance_mask=np.arange(H * W, dtype=np.int64).reshape(H, W) % 5)
    path = str(_image_file(tmp_path, "hooked"))
    _, cache = seg.run_with_cache(path, ["a", "b"], names=["masks.proposals"])
    assert torch.equal(cache["masks.proposals"], seg.encode(path).masks)
    enc = seg.encode(path)
    seen = []
    seg.run_with_hooks(enc, ["a", "b"], {"masks.proposals": lambda t, h: seen.append(t.shape) or torch.zeros_like(t)})
    assert seen == [(H, W)]  # a stored encode replays its proposals through the hook once


def test_the_masks_spec_is_its_own_part_of_the_identity(tmp_path):
    a = EncodeSpec.from_config(tiny_config("masks=file", f"masks.dir={tmp_path}"), random_weights=True, uses_vfm=True)
    b = EncodeSpec.from_config(tiny_config("masks=file", f"masks.dir={tmp_path}/x"), random_weights=True,
                               uses_vfm=True)
    none = EncodeSpec.from_config(tiny_config(), random_weights=True, uses_vfm=True)
    assert a.masks_key != b.masks_key and a.key() != b.key()
    assert (a.clip_key, a.vfm_key) == (b.clip_key, b.vfm_key) == (none.clip_key, none.vfm_key)
    assert none.masks is None and "masks" not in none.record() and none.masks_key is None
    assert EncodeSpec.from_record(a.record()) == a and a.flat()["masks.dir"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------- generators
GENERATORS = {
    "sam2": ["masks=sam2", "masks.model=sam2_hiera_t", "masks.input_size=128", "masks.points_per_side=2"],
    "sam": ["masks=sam", "masks.model=test_tiny", "masks.points_per_side=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_run_with_seeded_random_weights(name, tmp_path):
    pytest.importorskip("sam2" if name == "sam2" else "segment_anything")
    cfg = tiny_config(*GENERATORS[name], f"masks.cache={tmp_path}", "method=maskclip")
    seg = Segmenter.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 48, 64, generator=g)
    enc = seg.encode(img)
    assert enc.masks.shape == (48, 64) and enc.masks.dtype == torch.int64 and seg.masks.generator_calls == 1
    # the generator itself (built by that encode) yields boolean masks of the image's size; random weights
    # may find none, then the stack is empty but still (0, H, W) bool
    rgb = (img * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    stack = seg.masks._generate(rgb)
    assert isinstance(stack, np.ndarray) and stack.dtype == bool and stack.ndim == 3 and stack.shape[1:] == (48, 64)
    assert torch.equal(enc.masks, label_map(torch.from_numpy(stack)))  # deterministic: the same proposals
    # a second Segmenter (a second evaluation) reads the cache: the generator does not run
    again = Segmenter.from_config(cfg)
    again.masks.generate = lambda image: pytest.fail("the generator ran on a cached image")
    assert torch.equal(again.encode(img).masks, enc.masks) and again.masks.generator_calls == 0
    entries = list(tmp_path.rglob("*.npz"))
    assert len(entries) == 1 and entries[0].parent.parent.name == seg.masks.key
    other = Segmenter.from_config(tiny_config(*GENERATORS[name], f"masks.cache={tmp_path}", "method=maskclip",
                                              "masks.pred_iou_thresh=0.5"))
    assert other.masks.key != seg.masks.key  # another setting, another cache entry (a miss)


def test_offline_pretrained_generators_fail_fast(tmp_path, monkeypatch):
    pytest.importorskip("sam2")
    pytest.importorskip("segment_anything")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, what in (("sam2", "SAM 2 sam2_hiera_l"), ("sam", "SAM vit_h")):
        cfg = tiny_config(f"masks={name}", "weights=pretrained")
        spec = EncodeSpec.from_config(cfg, random_weights=False, uses_vfm=False)
        with pytest.raises(WeightsUnavailable, match=f"pretrained weights for {what}.*weights=local") as err:
            mask_stage(cfg, spec, torch.device("cpu"))
        assert "\n" not in str(err.value)


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)
    cfg = tiny_config("masks=sam2")
    spec = EncodeSpec.from_config(cfg, random_weights=True, uses_vfm=False)
    with pytest.raises(ImportError, match=r"masks=sam2 needs the package 'sam2'.*proxyclip\[regions\]"):
        mask_stage(cfg, spec, torch.device("cpu"))


def test_the_feature_cache_keeps_the_proposals_as_a_part(file_segmenter, tmp_path):
    from proxyclip.evaluation.cache import FeatureCache

    seg, folder = file_segmenter
    np.savez(folder / "cached.npz", instance_mask=np.full((H, W), 3, np.int32))
    path = _image_file(tmp_path, "cached")
    cache = FeatureCache(tmp_path / "features", seg, print_fn=lambda s: None)
    first = cache.get_or_encode(path, lambda reuse: seg.encode(str(path), reuse=reuse))
    assert cache.misses == 1 and (tmp_path / "features" / seg.encode_spec.masks_key / "spec.json").is_file()
    again = cache.get_or_encode(path, lambda reuse: pytest.fail("encoded again"))
    assert cache.hits == 1 and torch.equal(again.masks, first.masks) and again.masks_key == first.masks_key
