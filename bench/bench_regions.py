"""Whole-image stages, ratios measured in one run (random weights, fp32, one 500x375 image).

    python bench/bench_regions.py [--repeats 3]      (BENCH_GENERATOR=sam2_hiera_t: a smaller SAM 2)

Prints:
  LPOSS and LPOSS+ decodes (CLIP ViT-B/16 + DINO ViT-B/16 values, LPOSS's protocol: short side 448,
  windows 224 / 112) / one ProxyCLIP predict (CLIP ViT-B/16 + DINO ViT-B/8, its protocol)  (goal LPOSS+ <= 1.0)
  the mask generator's cost (SAM 2, CorrCLIP's settings) on the original image, and a second
  Segmenter's encode of the same image with the proposals cached (the generator skipped)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import VOC21, bench_setup, mask_generator_and_cache, proxyclip_baseline, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402

LPOSS = ["clip=vit_b16", "vfm=dino_vitb16", "vfm.feature=v", "weights=random", "protocol.short_side=448",
         "protocol.crop=224", "protocol.stride=112", "protocol.prob_thd=0"]
GENERATOR = os.environ.get("BENCH_GENERATOR", "sam2_hiera_l")


def main() -> None:
    args, seg = bench_setup()
    image, t_pred = proxyclip_baseline(args, seg)

    lp = Segmenter.from_config(compose_config(overrides=LPOSS + ["method=lposs"]))
    lp.text_embeddings(VOC21)
    enc = lp.encode(image)
    n = len(enc.windows) * enc.vfm_features.shape[-2] * enc.vfm_features.shape[-1]
    t_enc = timed(lambda: lp.encode(image), args.repeats)
    for m in ("lposs", "lposs_plus"):
        lp.decode(enc, VOC21, method=m)  # warm-up
        t_dec = timed(lambda: lp.decode(enc, VOC21, method=m), args.repeats)
        print(f"{m}: {len(enc.windows)} windows, {n} patches, resized {enc.resized_size}: decode {t_dec:.3f} s "
              f"(encode {t_enc:.3f} s) -> decode / ProxyCLIP predict {t_dec / t_pred:.3f}"
              + (" (goal <= 1.0)" if m == "lposs_plus" else ""))

    mask_generator_and_cache(args, image, t_pred, GENERATOR)


if __name__ == "__main__":
    main()
