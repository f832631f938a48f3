"""Resize, sliding-window arithmetic and merge, against hand-worked cases."""

import pytest
import torch

from types import SimpleNamespace

from proxyclip.windows import (check_geometry, merge_windows, padding_multiple, resized_size, size_with_pad,
                               slide_windows, symmetric_padding, window_layout)


def test_resized_size_hand_worked():
    assert resized_size(375, 500, 336, 2048) == (336, 448)  # VOC image
    assert resized_size(512, 683, 448, 2048) == (448, 598)  # ADE image: 683 * 448/512 = 597.6
    assert resized_size(1024, 2048, 448, 2048) == (448, 896)  # Cityscapes
    assert resized_size(3000, 4000, 336, 2048) == (336, 448)  # large photo
    assert resized_size(100, 3000, 336, 2048) == (68, 2048)  # long side capped: scale 2048/3000
    assert resized_size(10, 20, 336, 2048) == (336, 672)  # small images are enlarged


def test_square_voc_windows():
    # 336 x 448 with crop 336 / stride 112: one row, (448 - 336 + 111) // 112 + 1 = 2 columns
    assert slide_windows(336, 448, 336, 112) == [(0, 336, 0, 336), (0, 336, 112, 448)]


def test_last_window_is_shifted_inward():
    # 500 rows: (500 - 336 + 111) // 112 + 1 = 3 rows starting 0, 112, 224 -> last shifted to 164
    boxes = slide_windows(500, 336, 336, 112)
    assert boxes == [(0, 336, 0, 336), (112, 448, 0, 336), (164, 500, 0, 336)]


def test_non_square_and_smaller_than_crop():
    # 200 wide < crop: one column of the full width; height 400: (400-336+111)//112+1 = 2 rows
    assert slide_windows(400, 200, 336, 112) == [(0, 336, 0, 200), (64, 400, 0, 200)]
    assert slide_windows(50, 70, 336, 112) == [(0, 50, 0, 70)]
    # non-square crop and stride
    assert slide_windows(6, 7, (4, 3), (2, 2)) == [
        (0, 4, 0, 3), (0, 4, 2, 5), (0, 4, 4, 7), (2, 6, 0, 3), (2, 6, 2, 5), (2, 6, 4, 7)]


def test_cityscapes_window_count():
    boxes = slide_windows(448, 896, 224, 112)
    assert len(boxes) == 3 * 7  # docs/protocol.md: 21 windows
    assert all(b[1] - b[0] == 224 and b[3] - b[2] == 224 for b in boxes)


@pytest.mark.parametrize("h,w,crop,stride", [(336, 448, 336, 112), (500, 333, 336, 112), (97, 61, 32, 17)])
def test_windows_cover_every_pixel_and_stay_inside(h, w, crop, stride):
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1


def test_merge_averages_overlaps():
    boxes = [(0, 2, 0, 3), (0, 2, 2, 5)]  # overlap in column 2
    scores = torch.stack([torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 3.0)])
    merged = merge_windows(scores, boxes, (2, 5))
    expected = torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0]] * 2)[None]
    torch.testing.assert_close(merged, expected)


def test_merge_rejects_gaps():
    with pytest.raises(ValueError, match="cover"):
        merge_windows(torch.ones(1, 1, 2, 2), [(0, 2, 0, 2)], (2, 4))


def test_padding():
    assert padding_multiple(16, 8) == 16
    assert padding_multiple(16, 14) == 112
    assert padding_multiple(14, 8) == 56  # ViT-L/14 + DINO B/8: the original's 56
    assert symmetric_padding(70, 96, 16) == (5, 5, 0, 0)
    assert symmetric_padding(33, 17, 16) == (7, 8, 7, 8)


def test_window_layout_hand_worked():
    voc = SimpleNamespace(short_side=336, max_long_side=2048, crop=336, stride=112)
    # a VOC image 375x500 -> 336x448, two full windows, no padding for ViT-B/16 + DINO B/8 (multiple 16)
    assert window_layout(375, 500, voc, 16) == ((336, 448), [(0, 336, 0, 336), (0, 336, 112, 448)], (0, 0, 0, 0))
    # 50x70 at short side 40 -> 40x56: one window smaller than the crop, padded to 48x64
    small = SimpleNamespace(short_side=40, max_long_side=2048, crop=64, stride=32)
    size, boxes, pad = window_layout(50, 70, small, 16)
    assert (size, boxes, pad) == ((40, 56), [(0, 40, 0, 56)], (4, 4, 4, 4))
    assert size_with_pad(boxes[0], pad) == (48, 64)
    assert size_with_pad((0, 33, 5, 22), symmetric_padding(33, 17, 16)) == (48, 32)


@pytest.mark.parametrize("field,value,match", [
    ("crop", 0, "protocol.crop must be a positive integer"), ("short_side", -1, "protocol.short_side"),
    ("stride", 400, r"protocol.stride \(400\) must not exceed protocol.crop \(336\)"),
])
def test_bad_geometry_is_named(field, value, match):
    geometry = dict(short_side=336, max_long_side=2048, crop=336, stride=112)
    check_geometry(geometry)
    with pytest.raises(ValueError, match=match):
        check_geometry({**geometry, field: value})


# ----------------------------------------------------------------------------------------------
# whole-image mode (protocol.crop: null): one window, the resized image, padded like any window

@pytest.mark.parametrize("h,w,mult", [(375, 500, 16), (333, 500, 16), (500, 281, 8), (64, 64, 16), (97, 61, 3)])
def test_whole_image_mode_is_one_window_covering_the_image(h, w, mult):
    from proxyclip.specs import GeometrySpec

    size, boxes, pad = window_layout(h, w, GeometrySpec(336, 2048, None, None), mult)
    assert boxes == [(0, size[0], 0, size[1])]
    assert all(v % mult == 0 for v in size_with_pad(boxes[0], pad))
    # the same layout as crop = stride >= the long side
    assert (size, boxes, pad) == window_layout(h, w, GeometrySpec(336, 2048, 4096, 4096), mult)
    check_geometry(dict(short_side=336, max_long_side=2048, crop=None, stride=None))
    check_geometry(dict(short_side=336, max_long_side=2048, crop=None, stride=112))  # the stride is ignored


def test_whole_image_mode_gives_the_scores_of_one_big_window():
    """End to end (tiny models): protocol.crop=null equals crop = stride = 4096 (one window) bit for
    bit; the encode spec says crop and stride null (the stride does not matter)."""
    from conftest import tiny_config

    from proxyclip import Segmenter

    img = torch.rand(3, 50, 90, generator=torch.Generator().manual_seed(2))
    classes = ["sky", "person; people", "horse"]
    whole = Segmenter.from_config(tiny_config("protocol.crop=null", "protocol.short_side=40"))
    big = Segmenter.from_config(tiny_config("protocol.crop=4096", "protocol.stride=4096", "protocol.short_side=40"))
    geo = whole.encode_spec.geometry
    assert (geo.crop, geo.stride) == (None, None) and whole.encode_spec.key() != big.encode_spec.key()
    enc = whole.encode(img)
    assert enc.windows == [(0, 40, 0, 72)] == big.encode(img).windows
    a, b = whole.predict(img, classes), big.predict(img, classes)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    small = Segmenter.from_config(tiny_config("protocol.short_side=40"))  # windows 64 / 32: more than one
    assert len(small.encode(img).windows) > 1
