"""Trident, ratios measured in one run (random weights, fp32, one 500x375 image, VOC21's 21 classes).

    python bench/bench_trident.py [--repeats 2]

Prints:
  Trident predict (CLIP ViT-B/16 + DINO ViT-B/16 final-norm tokens + SAM ViT-B at 1024, its VOC21
  protocol: short side 448, sub-images 336 / stride 224) / one ProxyCLIP predict (CLIP ViT-B/16 +
  DINO ViT-B/8, its protocol) (no goal: reported)
  the SAM part's cost (SAM ViT-B encoder on the original image) and its size per image; a Trident
  decode from the encode (the memoized W) and one with another cos_fac (W made again)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import VOC21, bench_setup, proxyclip_baseline, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402

TRIDENT = ["clip=vit_b16", "vfm=dino_vitb16", "weights=random", "method=trident", "trident.sam=sam_vitb",
           "protocol=trident", "dataset=voc21"]


def main() -> None:
    args, seg = bench_setup(repeats=2)
    image, t_pred = proxyclip_baseline(args, seg)

    tr = Segmenter.from_config(compose_config("eval", overrides=TRIDENT + ["data_root=/nonexistent"]))
    tr.text = seg.text if tr.clip.model is seg.clip.model else tr.text
    tr.text_embeddings(VOC21)
    enc = tr.encode(image)
    tr.decode(enc, VOC21)  # warm-up
    t_tri = timed(lambda: tr.predict(image, VOC21), args.repeats)
    t_sam = timed(lambda: tr.sam.part(image), args.repeats)
    t_dec = timed(lambda: tr.decode(enc, VOC21), args.repeats)
    t_w = timed(lambda: (enc.memo.clear(), tr.decode(enc, VOC21, cos_fac=0.8)), 1)
    size = sum(v.numel() * v.element_size() for v in enc.sam.values())
    hv, wv = (int(t) for t in enc.sam["valid"])
    n, heads = hv * wv, int(enc.sam["qkv"].shape[1])
    cropped = (heads * n * n + heads * n * int(enc.sam["qkv"].shape[-1])) * 4
    print(f"trident: {len(enc.windows)} sub-images of {tuple(enc.windows[0])}, resized {enc.resized_size}, "
          f"SAM valid grid {hv}x{wv}: predict {t_tri:.3f} s -> trident / ProxyCLIP predict {t_tri / t_pred:.3f}")
    print(f"SAM part (ViT-B encoder at 1024 on the original image): {t_sam:.3f} s ({t_sam / t_tri:.2f} of the predict); "
          f"stored {size / 2**20:.1f} MiB an image (q, k, v, rel-pos tables; P and v cropped would be "
          f"{cropped / 2**20:.0f} MiB)")
    print(f"trident decode from the encode: {t_dec:.3f} s (W memoized); with a new cos_fac (W made again, "
          f"memo cleared): {t_w:.3f} s; decode / ProxyCLIP predict {t_dec / t_pred:.3f}")


if __name__ == "__main__":
    main()
