"""Images of every kind: converted when usable, a clear error when not."""

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip import ImageError, load_image

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
                               torch.from_numpy(np.asarray(pal.convert("RGB"))).permute(2, 0, 1).float() / 255)

    sixteen = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    d = load_image(tmp_path / "deep.png")
    assert d.shape == (3, 12, 10)
    torch.testing.assert_close(d[1], torch.from_numpy(sixteen.astype(np.float32) / 65535))


def test_tensor_input_checks():
    with pytest.raises(ImageError, match=r"\(3, H, W\)"):
        load_image(torch.rand(4, 5, 5))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(torch.rand(3, 5, 5) * 255)
    with pytest.raises(ImageError, match="NaN"):
        load_image(torch.full((3, 5, 5), float("nan")))
    with pytest.raises(ImageError, match="uint8"):
        load_image(torch.zeros(3, 5, 5, dtype=torch.uint8))
    assert load_image(torch.rand(1, 5, 6)).shape == (3, 5, 6)


def test_every_mode_runs_through_the_segmenter(tiny_segmenter, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    paths = []
    for mode in ("L", "RGBA", "P", "LA"):
        p = tmp_path / f"{mode}.png"
        Image.fromarray(rgb).convert(mode).save(p)
        paths.append(p)
    for p in paths:
        pred = tiny_segmenter.predict(p, CLASSES)
        assert pred.labels.shape == (40, 52)


def test_tiny_and_huge_images(tiny_segmenter):
    small = tiny_segmenter.predict(torch.rand(3, 3, 5), CLASSES)
    assert small.scores.shape == (2, 3, 5)
    # a 4000x3000 photo: resized to the short side first, so the windows stay few and small
    huge = torch.rand(3, 3000, 4000)
    enc = tiny_segmenter.encode(huge)
    assert enc.resized_size == (64, 85) and len(enc.windows) == 2
    pred = tiny_segmenter.decode(enc, CLASSES)
    assert pred.labels.shape == (3000, 4000) and torch.isfinite(pred.scores).all()
