"""The effect of the position-embedding resize rules (clip.pos_resize, vfm.pos_resize) on the
evaluation fixture's numbers, measured in one run (random weights, fp32).

    python bench/bench_pos_resize.py [--tiny | --full] [--images 4]

The fixture: the evaluation tests' synthetic VOC21 folder (tests/fixtures_datasets.make_voc) and
their configuration (``--tiny``, default: experiment=tiny, the tests' eval_segmenter; ``--full``:
CLIP ViT-B/16 + DINO ViT-B/8 under VOC21's protocol, 336 windows: CLIP 21x21 and DINO 42x42 grids).
Four settings, each evaluated by ``proxyclip.evaluation.evaluate`` and each image predicted alone:

    old        clip.pos_resize=size            vfm.pos_resize=size_antialias   (before the field:
               CLIP resized bicubic by size, the DINO-shaped VFM by timm's resample_abs_pos_embed)
    clip only  clip.pos_resize=scale_plus_0.1  vfm.pos_resize=size_antialias
    vfm only   clip.pos_resize=size            vfm.pos_resize=scale_plus_0.1
    new        the defaults: scale_plus_0.1 for both (the official rules of ProxyCLIP's code)

Printed per setting: mIoU, aAcc, and against ``old``: the mIoU difference, the largest change of a
cosine score (max |d score|, and relative to max |score|), the fraction of pixels whose label
changes, and the smallest cosine between the two runs' CLIP tokens entering the last block and
between their VFM features (per token).

Measured (2 cores, random weights, so the labels are near-degenerate: mIoU ~0.1 %):
  --tiny (CLIP 4x4 and VFM 4x4 grids from 14x14 tables: a strong downsampling):
    clip only: dmIoU -0.0021, max|dscore| 4.5e-2 (0.18 of max|score|), 1.4 % of labels change, CLIP token cos >= 0.939
    vfm only:  dmIoU -0.0002, max|dscore| 7.8e-3 (0.03), 0.12 % of labels, VFM feature cos >= 0.9986
    new:       dmIoU -0.0022, max|dscore| 4.4e-2 (0.18), 1.5 % of labels
  --full (CLIP 21x21 from 14x14, DINO 42x42 from 28x28; 7 min):
    clip only: dmIoU 0, max|dscore| 1.3e-4 (1.1e-3 of max|score|), no label changes, CLIP token cos >= 0.99917
    vfm only:  dmIoU 0, max|dscore| 6.0e-4 (4.9e-3), no label changes, VFM feature cos >= 0.99965
    new:       dmIoU 0, max|dscore| 5.4e-4 (4.4e-3), no label changes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SETTINGS = {
    "old": ("size", "size_antialias"),
    "clip only": ("scale_plus_0.1", "size_antialias"),
    "vfm only": ("size", "scale_plus_0.1"),
    "new": ("scale_plus_0.1", "scale_plus_0.1"),
}
MODELS = {"tiny": ["experiment=tiny"], "full": ["clip=vit_b16", "vfm=dino_vitb8", "weights=random"]}


def min_token_cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=dim).min())


def main() -> None:
    ap = argparse.ArgumentParser()
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true", help="the tests' tiny random models (default)")
    group.add_argument("--full", action="store_true", help="CLIP ViT-B/16 + DINO ViT-B/8, random weights")
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()

    from fixtures_datasets import make_voc

    from proxyclip import Segmenter, compose_config
    from proxyclip.data import build_dataset
    from proxyclip.evaluation import evaluate

    models = "full" if args.full else "tiny"
    root = Path(tempfile.mkdtemp(prefix="bench-pos-resize-"))
    make_voc(root, n=args.images)
    results = {}
    for name, (clip_rule, vfm_rule) in SETTINGS.items():
        cfg = compose_config("eval", ["dataset=voc21", f"data_root={root}", *MODELS[models], "progress=false",
                                      "checkpoint_seconds=0", f"clip.pos_resize={clip_rule}",
                                      f"vfm.pos_resize={vfm_rule}"])
        seg = Segmenter.from_config(cfg)
        out = evaluate(cfg, run_dir=root / name.replace(" ", "_"), seg=seg)
        ds = build_dataset(cfg.dataset)
        per_image = []
        for sample in ds.samples:
            enc = seg.encode(str(sample.image))
            pred = seg.decode(enc, ds.class_names)
            per_image.append((pred.scores, pred.labels, enc.clip_tokens, enc.vfm_features))
        results[name] = (out["mIoU"], out["aAcc"], per_image)

    grid = ("CLIP 4x4, VFM 4x4 from 14x14 tables" if models == "tiny"
            else "CLIP 21x21 from 14x14, DINO 42x42 from 28x28")
    print(f"threads={torch.get_num_threads()}  models={models} ({grid}), {args.images} fixture images, VOC21 classes")
    print(f"{'setting':<10} {'clip':<15} {'vfm':<15} {'mIoU':>8} {'aAcc':>8} {'dmIoU':>9} {'max|dscore|':>12} "
          f"{'rel':>9} {'labels chg':>11} {'min cos CLIP':>13} {'min cos VFM':>12}")
    _, _, ref = results["old"]
    for name, (miou, aacc, per_image) in results.items():
        d = max(float((s - r[0]).abs().max()) for (s, *_), r in zip(per_image, ref))
        scale = max(float(r[0].abs().max()) for r in ref)
        changed = sum(int((lab != r[1]).sum()) for (_, lab, *_), r in zip(per_image, ref))
        pixels = sum(r[1].numel() for r in ref)
        cos_clip = min(min_token_cosine(c, r[2], -1) for (_, _, c, _), r in zip(per_image, ref))
        cos_vfm = min(min_token_cosine(v, r[3], 1) for (*_, v), r in zip(per_image, ref))
        clip_rule, vfm_rule = SETTINGS[name]
        print(f"{name:<10} {clip_rule:<15} {vfm_rule:<15} {miou:8.3f} {aacc:8.3f} {miou - results['old'][0]:+9.4f} "
              f"{d:12.3e} {d / scale:9.2e} {changed / pixels:11.2e} {cos_clip:13.7f} {cos_vfm:12.7f}")


if __name__ == "__main__":
    main()
