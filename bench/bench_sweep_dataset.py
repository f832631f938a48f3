"""Dataset-level sweep cost: a 12-point (beta, gamma) grid vs one evaluation, measured in one run.

    python bench/bench_sweep_dataset.py [--images 4] [--tiny]

Builds a fixture dataset in the VOC layout (500x375 images, VOC21 protocol: short side 336,
336/112 windows -> 2 windows an image) in a temporary folder and times, with the same
Segmenter (CLIP ViT-B/16 + DINO ViT-B/8, random weights, fp32; --tiny: the test models):

  single evaluation       evaluate(): one encode + one decode per image
  12-point sweep          sweep() with beta [1.0,1.2,1.4] x gamma [2,3,4,5]: one encode + 12 decodes per image
  12-point sweep, cached  the same from a warm feature cache (decodes only)

and prints the ratios to the single evaluation (goal: 12-point sweep <= 2x). Text embeddings
are cached per (CLIP model, names); they are warmed once before timing, as every image
after the first of a real run reuses them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402
from proxyclip.evaluation import evaluate, sweep  # noqa: E402


def make_voc_fixture(root: Path, n: int, h: int = 375, w: int = 500) -> None:
    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        sid = f"2007_{i:06d}"
        ids.append(sid)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([np.sin(xx / (20 + 7 * c) + i) + np.cos(yy / (30 + 5 * c)) for c in range(3)], -1)
        img = np.clip((img + 2) / 4 * 255 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{sid}.jpg", quality=90)
        lab = np.kron(rng.integers(0, 21, (5, 5)), np.ones((h // 5 + 1, w // 5 + 1), np.int64))[:h, :w]
        Image.fromarray(lab.astype(np.uint8)).save(voc / "SegmentationClass" / f"{sid}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="test-size models and 64-px windows (seconds, not minutes)")
    args = ap.parse_args()
    models = (["clip=test_tiny", "vfm=test_tiny", "protocol.short_side=64", "protocol.crop=64", "protocol.stride=32"]
              if args.tiny else ["clip=vit_b16", "vfm=dino_vitb8"])
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        make_voc_fixture(tmp, args.images)
        common = ["dataset=voc21", f"data_root={tmp}", "weights=random", "progress=false", *models]
        grid = ["sweep.beta=[1.0,1.2,1.4]", "sweep.gamma=[2,3,4,5]"]
        cfg_eval = compose_config("eval", common)
        cfg_sweep = compose_config("sweep", common + grid)
        cfg_cached = compose_config("sweep", common + grid + [f"cache_dir={tmp / 'cache'}"])
        seg = Segmenter.from_config(cfg_eval)
        from proxyclip.data import build_dataset

        classes = build_dataset(cfg_eval.dataset).class_names
        from proxyclip import parse_classes

        seg.text_embeddings(parse_classes(classes).queries)  # warm the text cache once

        def timed(fn, cfg, name):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                out = fn(cfg, run_dir=tmp / name, seg=seg)
            return time.perf_counter() - t, out

        t_eval, single = timed(evaluate, cfg_eval, "eval")
        t_sweep, swept = timed(sweep, cfg_sweep, "sweep")
        timed(sweep, cfg_cached, "fill-cache")  # fills the feature cache (not timed for the ratio)
        t_cached, _ = timed(sweep, cfg_cached, "cached")
        point = next(p for p in swept["points"] if p["values"] == {"beta": 1.2, "gamma": 3.0})
        assert abs(point["mIoU"] - single["mIoU"]) < 1e-9, "sweep point (1.2, 3) differs from the evaluation"

    model = "tiny test models" if args.tiny else "CLIP ViT-B/16 + DINO ViT-B/8"
    print(f"{args.images} images 500x375 (VOC21 protocol), {model}, random weights, fp32, "
          f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}")
    print(f"  single evaluation         {t_eval:8.2f} s")
    print(f"  12-point sweep            {t_sweep:8.2f} s   ratio {t_sweep / t_eval:5.2f}  (goal <= 2.0)")
    print(f"  12-point sweep, cached    {t_cached:8.2f} s   ratio {t_cached / t_eval:5.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
