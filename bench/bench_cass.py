"""CASS's cost, measured in one run (CLIP ViT-B/16 + DINO ViT-B/8 keys, random weights, fp32).

    python bench/bench_cass.py [--repeats 3]

Prints:
  one 336x336 window: encode (CLIP + DINO keys), CASS's first decode (nothing memoized) and a
      decode from the memoized spectra / low-rank factors, each / the encode          (goal <= 0.15)
  500x375: CASS predict, and its decode from the encode / the predict
  the matching's cost: how far from separable it is (max |c_ij - c_i0 - c_0j + c_00|; 0 = every
      permutation costs the same, the spec's random-weights warning)
Text embeddings (21 VOC names) are warmed once, as every image after the first finds them cached.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def fresh(enc):
    enc.memo.clear()
    return enc


def main() -> None:
    args, seg = bench_setup(("clip=vit_b16", "vfm=dino_vitb8", "vfm.feature=k", "method=cass", "weights=random",
                             "protocol.crop=336", "protocol.stride=112"))
    seg.text_embeddings(VOC21)
    print(f"threads={torch.get_num_threads()}  {args.overrides}")
    window = torch.rand(3, 336, 336)
    enc = seg.encode(window)
    seg.decode(enc, VOC21)  # warm-up
    t_enc = timed(lambda: seg.encode(window), args.repeats)
    t_first = timed(lambda: seg.decode(fresh(enc), VOC21), args.repeats)
    seg.decode(enc, VOC21)
    t_memo = timed(lambda: seg.decode(enc, VOC21), args.repeats)
    print(f"one 336x336 window ({enc.clip_grid[0]}x{enc.clip_grid[1]} CLIP, {tuple(enc.vfm_features.shape[-2:])} DINO): "
          f"encode {t_enc:.3f} s; first decode {t_first * 1000:.1f} ms -> {t_first / t_enc:.3f} of the encode "
          f"(goal <= 0.15); memoized decode {t_memo * 1000:.1f} ms -> {t_memo / t_enc:.3f}")
    _, cache = seg.run_with_cache(fresh(enc), VOC21, names=["cass.cost"])
    c = cache["cass.cost"][0].double()
    residual = (c - c[:, :1] - c[:1, :] + c[0, 0]).abs().max()
    print(f"matching cost (12 x 12): spread of entries {float(c.max() - c.min()):.3e}, distance from separable "
          f"{float(residual):.3e}")
    image = torch.rand(3, 375, 500)
    enc = seg.encode(image)
    t_pred = timed(lambda: seg.predict(image, VOC21), args.repeats)
    t_dec = timed(lambda: seg.decode(fresh(enc), VOC21), args.repeats)
    print(f"500x375 ({len(enc.windows)} windows of 336): predict {t_pred:.3f} s, first decode {t_dec:.3f} s -> "
          f"{t_dec / t_pred:.3f} of the predict")


if __name__ == "__main__":
    main()
