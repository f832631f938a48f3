"""Inputs: images of every kind and class lists, converted when usable, a clear error when not."""

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip import ImageError, load_image
from proxyclip.text import parse_classes

CLASSES = ["sky", "grass"]


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image("/tmp/definitely/nope.png")


def test_corrupt_and_non_image_files(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match="junk.jpg.*not a readable image"):
        load_image(junk)
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_modes_are_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255

    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    torch.testing.assert_close(load_image(tmp_path / "rgb.png"), expected)

    gray = Image.fromarray(rgb[..., 0])  # mode L
    gray.save(tmp_path / "gray.png")
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (3, 12, 10) and torch.equal(g[0], g[2])
    torch.testing.assert_close(g[0], torch.from_numpy(rgb[..., 0]).float() / 255)

    rgba = np.dstack([rgb, np.full((12, 10), 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    torch.testing.assert_close(load_image(tmp_path / "rgba.png"), expected)  # opaque: same colours

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "pal.png")
    torch.testing.assert_close(load_image(tmp_path / "pal.png"),
                               torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1).float() / 255)

    sixteen = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    d = load_image(tmp_path / "deep.png")
    assert d.shape == (3, 12, 10)
    torch.testing.assert_close(d[1], torch.from_numpy(sixteen.astype(np.float32) / 65535))


def test_tensor_input_checks():
    with pytest.raises(ImageError, match=r"\(3, H, W\)"):
        load_image(torch.rand(4, 5, 5))
    with pytest.raises(ImageError, match=r"\[0, 1\].*got range \[\d+, 2\d\d\]"):  # a (3, H, W) image in 0..255
        load_image(torch.randint(0, 256, (3, 5, 5), generator=torch.Generator().manual_seed(0)).float())
    with pytest.raises(ImageError, match="NaN"):
        load_image(torch.full((3, 5, 5), float("nan")))
    with pytest.raises(ImageError, match="uint8"):
        load_image(torch.zeros(3, 5, 5, dtype=torch.uint8))
    one = torch.rand(1, 5, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_image(one), one.expand(3, 5, 6))  # one channel: repeated
    assert torch.equal(load_image(one[0]), one.expand(3, 5, 6))  # (H, W) likewise
    rgb = torch.rand(3, 5, 6)
    assert torch.equal(load_image(rgb), rgb)  # a (3, H, W) float image in [0, 1] is taken as it is


def _same_prediction(a, b):
    assert torch.equal(a.image, b.image)
    torch.testing.assert_close(a.scores, b.scores, atol=0, rtol=0)
    assert torch.equal(a.labels, b.labels)


def test_every_mode_runs_through_the_segmenter(tiny_segmenter, tmp_path):
    """Each mode's file predicts exactly what its RGB rendering does (gray: the gray copied to three
    channels; opaque RGBA: the RGB; a palette image: its colours); a path = the PIL image = the tensor."""
    rgb = np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    rgb_img = Image.fromarray(rgb)
    for mode in ("L", "RGBA", "P", "LA"):
        p = tmp_path / f"{mode}.png"
        converted = rgb_img.convert(mode)
        converted.save(p)
        pred = tiny_segmenter.predict(p, CLASSES)
        assert pred.labels.shape == (40, 52)
        as_rgb = converted.convert("RGB")  # L and LA: gray in all three channels; RGBA here is opaque
        _same_prediction(pred, tiny_segmenter.predict(as_rgb, CLASSES))
        if mode == "L":
            gray = torch.from_numpy(np.asarray(converted).copy()).float() / 255
            _same_prediction(pred, tiny_segmenter.predict(gray.expand(3, 40, 52), CLASSES))
        if mode == "RGBA":
            _same_prediction(pred, tiny_segmenter.predict(rgb_img, CLASSES))  # opaque alpha: the RGB's result
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    rgb_img.save(tmp_path / "rgb.png")
    by_path = tiny_segmenter.predict(tmp_path / "rgb.png", CLASSES)
    _same_prediction(by_path, tiny_segmenter.predict(rgb_img, CLASSES))
    _same_prediction(by_path, tiny_segmenter.predict(tensor, CLASSES))
    _same_prediction(by_path, tiny_segmenter.predict(str(tmp_path / "rgb.png"), CLASSES))


def test_tiny_and_huge_images(tiny_segmenter):
    import naive

    tiny = torch.rand(3, 3, 5, generator=torch.Generator().manual_seed(2))
    enc = tiny_segmenter.encode(tiny)
    small = tiny_segmenter.decode(enc, CLASSES)
    assert small.scores.shape == (2, 3, 5)
    # enlarged to the short side (3x5 -> 64x107), windowed, merged, resized back to 3x5: the reference
    assert enc.resized_size == (64, 107)
    expected = naive.scores(tiny_segmenter, enc, CLASSES, "proxyclip", naive.knobs_of("proxyclip"))
    torch.testing.assert_close(small.scores.double(), expected, atol=1e-5, rtol=1e-5)
    # a 4000x3000 photo: resized to the short side first, so the windows stay few and small
    huge = torch.rand(3, 3000, 4000, generator=torch.Generator().manual_seed(3))
    enc = tiny_segmenter.encode(huge)
    assert enc.resized_size == (64, 85) and enc.windows == [(0, 64, 0, 64), (0, 64, 21, 85)]
    pred, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["scores.window"])
    assert pred.labels.shape == (3000, 4000) and torch.isfinite(pred.scores).all()
    # the two windows merged by hand at 64x85, then resized to the photo's size
    merged = naive.merge_by_hand(cache["scores.window"], enc.windows, (64, 85)).float()
    up = torch.nn.functional.interpolate(merged[None], size=(3000, 4000), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred.scores[:, ::7, ::9], up[:, ::7, ::9], atol=1e-5, rtol=1e-5)


def test_parse_classes():
    cl = parse_classes(["sky", " person; people ;", "horse"])
    assert cl.class_names == ["sky", "person; people ;", "horse"]
    assert cl.queries == ["sky", "person", "people", "horse"] and cl.query_to_class == [0, 1, 1, 2]


@pytest.mark.parametrize("classes,match", [
    ([], "empty"), (["sky", "sky"], "duplicate"), (["sky", "cat; Sky"], "duplicate"),
    (["sky", " ; ;"], "only separators"), ("sky", "list"),
])
def test_bad_class_lists(tiny_segmenter, classes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_segmenter.predict(torch.rand(3, 8, 8), classes)


def test_a_background_word_may_also_be_a_class_as_published():
    from proxyclip.data import read_class_lines
    from proxyclip.pipeline import decide

    cl = parse_classes(read_class_lines("coco_object"))  # "bed" is a background word and class 60
    beds = [i for i, q in enumerate(cl.queries) if q == "bed"]
    assert [cl.query_to_class[i] for i in beds] == [0, 60]
    scores = torch.zeros(len(cl.queries), 1, 1)
    scores[beds] = 1.0
    probs, labels = decide(scores, cl, 40.0, 0.0)
    assert probs[0, 0, 0] == probs[60, 0, 0] and labels.item() == 0  # a tie goes to class 0, as argmax does
    for bad in (["sky; bed", "bed", "bed"], ["sky", "bed; sky"], ["sky; bed; bed", "cat"]):
        with pytest.raises(ValueError, match="duplicate"):
            parse_classes(bad)
