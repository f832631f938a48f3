"""Tiny synthetic datasets in the real on-disk layouts (mmsegmentation / detectron2 style).

The paths here are written out independently of conf/dataset/*.yaml, so a wrong path in a
config is caught by the reader tests. Each builder returns the data root (what ``data_root=``
gets) and the expected samples: ``{id: (image_path, raw_label_array)}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

Expected = Dict[str, Tuple[Path, np.ndarray]]

VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _image(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # smooth blobs plus noise: something the tiny models can tell apart, compressible
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(np.sin(xx / (5 + c) + rng.uniform(0, 6)) + np.cos(yy / (7 + c))) for c in range(3)], -1)
    arr = np.clip((base + 2) / 4 * 255 + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


def _blocks(h: int, w: int, values: np.ndarray, rng: np.random.Generator, ignore: int | None, dtype=np.uint8):
    """A label map of 4x4 blocks of random values (plus a few ignore pixels)."""
    bh, bw = (h + 3) // 4, (w + 3) // 4
    blocks = rng.choice(values, size=(4, 4))
    lab = np.kron(blocks, np.ones((bh, bw), dtype=np.int64))[:h, :w].astype(dtype)
    if ignore is not None:
        lab[rng.random((h, w)) < 0.05] = ignore
    return lab


def _label_png(path: Path, lab: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(lab.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(VOC_PALETTE)
    im.save(path)


def _label_tif(path: Path, lab: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lab.astype(np.uint16)).save(path)


SIZES = [(48, 64), (56, 48), (64, 80), (48, 48), (60, 72), (52, 64)]


def make_voc(data_root: Path, n: int = 4, seed: int = 0) -> Expected:
    """VOCdevkit/VOC2012: JPEGImages/*.jpg, SegmentationClass/*.png (palette, 0..20, 255), val.txt."""
    rng = np.random.default_rng(seed)
    root = data_root / "VOCdevkit" / "VOC2012"
    out: Expected = {}
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        h, w = SIZES[i % len(SIZES)]
        _image(root / "JPEGImages" / f"{sid}.jpg", h, w, rng)
        lab = _blocks(h, w, np.arange(0, 21), rng, 255)
        _label_png(root / "SegmentationClass" / f"{sid}.png", lab, palette=True)
        out[sid] = (root / "JPEGImages" / f"{sid}.jpg", lab)
    _image(root / "JPEGImages" / "2012_999999.jpg", 40, 40, rng)  # a train image not in val.txt
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return out


def make_context(data_root: Path, n: int = 3, seed: int = 1) -> Expected:
    """VOCdevkit/VOC2010: JPEGImages, SegmentationClassContext/*.png (0..59), SegmentationContext/val.txt."""
    rng = np.random.default_rng(seed)
    root = data_root / "VOCdevkit" / "VOC2010"
    out: Expected = {}
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        h, w = SIZES[i % len(SIZES)]
        _image(root / "JPEGImages" / f"{sid}.jpg", h, w, rng)
        lab = _blocks(h, w, np.arange(0, 60), rng, None)
        _label_png(root / "SegmentationClassContext" / f"{sid}.png", lab)
        out[sid] = (root / "JPEGImages" / f"{sid}.jpg", lab)
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(ids) + "\n")
    return out


def make_context459(data_root: Path, n: int = 3, seed: int = 2) -> Expected:
    """VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif (uint16 0..458, 65535)."""
    rng = np.random.default_rng(seed)
    root = data_root / "VOCdevkit" / "VOC2010"
    make_context(data_root, n, seed)
    out: Expected = {}
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        h, w = SIZES[i % len(SIZES)]
        lab = _blocks(h, w, np.array([0, 5, 300, 458]), rng, 65535, np.uint16)
        _label_tif(root / "annotations_detectron2" / "pc459_val" / f"{sid}.tif", lab)
        out[sid] = (root / "JPEGImages" / f"{sid}.jpg", lab)
    return out


def make_coco_stuff(data_root: Path, n: int = 3, seed: int = 3) -> Expected:
    """coco_stuff164k: images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png (0..170, 255)."""
    rng = np.random.default_rng(seed)
    root = data_root / "coco_stuff164k"
    out: Expected = {}
    for i in range(n):
        sid = f"{139 + i:012d}"
        h, w = SIZES[i % len(SIZES)]
        _image(root / "images" / "val2017" / f"{sid}.jpg", h, w, rng)
        lab = _blocks(h, w, np.array([0, 1, 79, 80, 120, 170]), rng, 255)
        _label_png(root / "annotations" / "val2017" / f"{sid}_labelTrainIds.png", lab)
        out[sid] = (root / "images" / "val2017" / f"{sid}.jpg", lab)
    return out


def make_cityscapes(data_root: Path, n: int = 4, seed: int = 4) -> Expected:
    """cityscapes: leftImg8bit/val/<city>/*_leftImg8bit.png, gtFine/val/<city>/*_gtFine_labelTrainIds.png."""
    rng = np.random.default_rng(seed)
    root = data_root / "cityscapes"
    out: Expected = {}
    for i in range(n):
        city = ["frankfurt", "lindau"][i % 2]
        stem = f"{city}_000000_{i:06d}"
        h, w = 48, 96
        img = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        _image(img, h, w, rng)
        lab = _blocks(h, w, np.arange(0, 19), rng, 255)
        _label_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", lab)
        # the other gtFine files of the real layout, which must not be read
        _label_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", lab + 7)
        out[f"{city}/{stem}"] = (img, lab)
    return out


def make_ade20k(data_root: Path, n: int = 3, seed: int = 5) -> Expected:
    """ade/ADEChallengeData2016: images/validation/*.jpg, annotations/validation/*.png (0 = other, 1..150)."""
    rng = np.random.default_rng(seed)
    root = data_root / "ade" / "ADEChallengeData2016"
    out: Expected = {}
    for i in range(n):
        sid = f"ADE_val_{i + 1:08d}"
        h, w = SIZES[i % len(SIZES)]
        _image(root / "images" / "validation" / f"{sid}.jpg", h, w, rng)
        lab = _blocks(h, w, np.array([0, 1, 2, 75, 150]), rng, None)
        _label_png(root / "annotations" / "validation" / f"{sid}.png", lab)
        out[sid] = (root / "images" / "validation" / f"{sid}.jpg", lab)
    return out


def make_ade847(data_root: Path, n: int = 3, seed: int = 6) -> Expected:
    """ADE20K_2021_17_01: images_detectron2/validation/*.jpg, annotations_detectron2/validation/*.tif."""
    rng = np.random.default_rng(seed)
    root = data_root / "ADE20K_2021_17_01"
    out: Expected = {}
    for i in range(n):
        sid = f"ADE_frame_{i:08d}"
        h, w = SIZES[i % len(SIZES)]
        _image(root / "images_detectron2" / "validation" / f"{sid}.jpg", h, w, rng)
        lab = _blocks(h, w, np.array([0, 255, 256, 846]), rng, 65535, np.uint16)
        _label_tif(root / "annotations_detectron2" / "validation" / f"{sid}.tif", lab)
        out[sid] = (root / "images_detectron2" / "validation" / f"{sid}.jpg", lab)
    return out


def make_custom(folder: Path, n: int = 3, seed: int = 7, classes=("background", "sky; cloud", "tree")) -> Expected:
    """images/ (mixed .png/.jpg), labels/*.png, classes.txt."""
    rng = np.random.default_rng(seed)
    out: Expected = {}
    for i in range(n):
        sid = f"img{i}"
        h, w = SIZES[i % len(SIZES)]
        img = folder / "images" / f"{sid}{'.png' if i % 2 else '.jpg'}"
        _image(img, h, w, rng)
        lab = _blocks(h, w, np.arange(len(classes)), rng, 255)
        _label_png(folder / "labels" / f"{sid}.png", lab)
        out[sid] = (img, lab)
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


BUILDERS = {
    "voc21": make_voc, "voc20": make_voc, "context60": make_context, "context59": make_context,
    "context459": make_context459, "coco_stuff": make_coco_stuff, "cityscapes": make_cityscapes,
    "ade20k": make_ade20k, "ade847": make_ade847,
}
