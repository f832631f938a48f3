"""How much of an evaluation is spent outside the backbones and the decode (issue 13), with and
without the read-ahead DataLoader workers, measured in one run.

    python bench/bench_eval_overlap.py [--tiny | --full] [--images 20] [--workers N] [--repeats 1]

A synthetic VOC-like folder of ``--images`` 500x375 JPEGs with palette PNG label maps (21 classes)
is evaluated twice with the same Segmenter through ``run_grid`` (the loop ``proxyclip-eval`` runs):
``num_workers=0`` (images and labels read in the loop) and ``num_workers=N`` (default: the
machine's default, at least 1). ``Segmenter.encode`` / ``decode`` / ``decode_many`` are wrapped
with timers; "outside" = wall time of the loop minus the time inside them (JPEG/PNG decoding
not hidden by the workers, confusion matrices, state saves, worker start-up). Text embeddings are
computed once before timing. ``--tiny`` (default): the tiny test models; ``--full``: CLIP ViT-B/16 +
DINO ViT-B/8 with random weights. The load average is printed: the machine may be shared.

Measured (2 cores, shared, load average 3-5): tiny models: outside / wall 0.20 without workers,
0.12 with 1 worker; --full: 0.008 without, 0.003 with 1 worker (encode ~10-20 s per image).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL = ["clip=vit_b16", "vfm=dino_vitb8", "weights=random"]


def make_folder(root: Path, n: int) -> None:
    """VOCdevkit/VOC2012 with ``n`` 500x375 images: smooth noise JPEGs, blocky labels 0..20 and 255."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    palette = rng.integers(0, 256, 768, dtype=np.uint8).tolist()
    for sid in ids:
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(voc / "JPEGImages" / f"{sid}.jpg", quality=90)
        blocks = rng.integers(0, 21, (6, 8)).astype(np.uint8)
        blocks[0, 0] = 255
        lab = Image.fromarray(blocks).resize((500, 375), Image.NEAREST)
        lab.putpalette(palette)
        lab.save(voc / "SegmentationClass" / f"{sid}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def wrap_timers(seg, spent: dict) -> None:
    """Replace seg's encode/decode/decode_many (on the instance) by timed calls adding to ``spent``;
    a call made inside another timed one (decode -> decode_many) is not counted twice."""
    depth = [0]
    for name in ("encode", "decode", "decode_many"):
        real = getattr(seg, name)

        def timed(*a, _real=real, _name=name, **k):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t

        setattr(seg, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=True, help="tiny test models (default)")
    size.add_argument("--full", dest="tiny", action="store_false", help="ViT-B/16 + DINO B/8, random weights")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None, help="workers of the read-ahead run (default: the machine's)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times")
    args = ap.parse_args()

    import torch

    from proxyclip import Segmenter, compose_config
    from proxyclip.data import build_dataset
    from proxyclip.evaluation.grid import grid_points
    from proxyclip.evaluation.runner import default_num_workers, run_grid

    workers = args.workers if args.workers is not None else max(1, default_num_workers())
    print(f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp, args.images)
        overrides = ["dataset=voc21", f"data_root={tmp}", "progress=false"] + (["experiment=tiny"] if args.tiny else FULL)
        cfg = compose_config("eval", overrides)
        torch.manual_seed(0)
        seg = Segmenter.from_config(cfg)
        ds = build_dataset(cfg.dataset)
        points = [spec for _, spec in grid_points(cfg, {}, ds.class_names)]
        seg.predict(ds.load_image(0), ds.class_names)  # warm-up; the text embeddings are cached from here on
        spent: dict = {}
        wrap_timers(seg, spent)
        rows = {0: [], workers: []}
        for r in range(args.repeats):
            for nw in (0, workers):
                spent.clear()
                t = time.perf_counter()
                res = run_grid(seg, ds, points, tmp / f"run{r}_{nw}", progress=False, print_fn=lambda m: None,
                               num_workers=nw, checkpoint_seconds=float(cfg.checkpoint_seconds))
                wall = time.perf_counter() - t
                assert res.num_images == args.images
                inside = sum(spent.values())
                rows[nw].append((wall, spent.get("encode", 0.0), inside - spent.get("encode", 0.0), res.cm))
        assert all(torch.equal(rows[0][0][3], row[3]) for nw in rows for row in rows[nw]), "workers changed the counts"
    print(f"models: {'tiny' if args.tiny else ' + '.join(FULL)}; {args.images} images of 500x375")
    print("| num_workers | wall s | encode s | decode s | outside s | outside / wall |")
    print("|---|---|---|---|---|---|")
    for nw, runs in rows.items():
        for wall, enc, dec, _ in runs:
            out = wall - enc - dec
            print(f"| {nw} | {wall:.2f} | {enc:.2f} | {dec:.2f} | {out:.2f} | {out / wall:.3f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
