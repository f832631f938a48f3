"""Comparing VFMs on one image encodes CLIP once: ratios measured in one run (random weights, fp32).

    python bench/bench_vfms.py [--repeats 2]

Three VFMs (DINO ViT-S/16, DINO ViT-B/8, DINOv2 ViT-B/14) with CLIP ViT-B/16 on one 500x375 image:
  the comparison (encode with the first VFM, then Segmenter.with_vfm + encode(image, reuse=...) for the
  others, one decode each)
    / (one CLIP encode + the three VFM encodes + the three decodes, each timed alone)   (goal <= 1.1)
    / three separate predicts (each pipeline encoding CLIP again)                          (printed)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402

CLASSES = ["sky", "person; people", "horse", "grass", "tree"]
VFMS = ["dino_vits16", "dino_vitb8", "dinov2_vitb14_reg"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clip", default="vit_b16")
    args = ap.parse_args()
    torch.manual_seed(0)
    common = [f"clip={args.clip}", "weights=random"]
    base = Segmenter.from_config(compose_config(overrides=common + [f"vfm={VFMS[0]}"]))
    segs = [base] + [base.with_vfm(v) for v in VFMS[1:]]
    base.text_embeddings([q.strip() for c in CLASSES for q in c.split(";")])
    clip_only = Segmenter.from_config(compose_config(overrides=common + ["method=clip"]))
    image = torch.rand(3, 375, 500)
    print(f"threads={torch.get_num_threads()}  CLIP {args.clip}, VFMs {VFMS}, 500x375 image")

    for s in segs:  # warm-up (first-call allocations)
        s.predict(image, CLASSES)
    # the parts, each alone
    t_clip = timed(lambda: clip_only.encode(image), args.repeats)
    clip_part = clip_only.encode(image)
    assert clip_part.clip_key == base.clip_key
    t_vfm, t_dec = [], []
    for s in segs:
        t_vfm.append(timed(lambda: s.encode(image, reuse=clip_part), args.repeats))  # the VFM only
        enc = s.encode(image, reuse=clip_part)
        t_dec.append(timed(lambda: s.decode(enc, CLASSES), args.repeats))
        enc.memo.clear()
    parts = t_clip + sum(t_vfm) + sum(t_dec)
    print(f"  CLIP encode {t_clip:.2f} s; VFM encodes " + ", ".join(f"{v} {t:.2f} s" for v, t in zip(VFMS, t_vfm))
          + "; decodes " + ", ".join(f"{t:.3f} s" for t in t_dec))

    def compare():
        first = base.encode(image)
        base.decode(first, CLASSES)
        for s in segs[1:]:
            s.decode(s.encode(image, reuse=first), CLASSES)

    t_cmp = timed(compare, args.repeats)
    separate = [Segmenter.from_config(compose_config(overrides=common + [f"vfm={v}"])) for v in VFMS]
    t_sep = timed(lambda: [s.predict(image, CLASSES) for s in separate], args.repeats)
    print(f"comparison of {len(VFMS)} VFMs {t_cmp:.2f} s / sum of its parts {parts:.2f} s = {t_cmp / parts:.3f} "
          f"(goal <= 1.1: CLIP encoded once)")
    print(f"comparison {t_cmp:.2f} s / {len(VFMS)} separate predicts {t_sep:.2f} s = {t_cmp / t_sep:.3f}")


if __name__ == "__main__":
    main()
