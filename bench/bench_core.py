"""Core cost ratios, measured in one run (CLIP ViT-B/16 + DINO ViT-B/8, random weights, fp32).

    python bench/bench_core.py [--repeats 3]

Prints:
  decode / encode of one 336x336 window                       (goal <= 0.05)
  16-point (beta, gamma) sweep / one predict, 500x375 image   (goal <= 1.5)
  predict / the two backbones' own forward on the same windows (goal <= 1.10)
Text embeddings are cached per (CLIP model, names), so they are warmed once before timing:
every image after the first reuses them.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

from proxyclip.backbones import CLIP_MEAN, CLIP_STD  # noqa: E402

CLASSES = ["sky", "person; people", "horse", "grass", "tree"]


def norm(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def main() -> None:
    args, seg = bench_setup()
    seg.text_embeddings([q.strip() for c in CLASSES for q in c.split(";")])  # warm the text cache
    print(f"threads={torch.get_num_threads()}  backbones: {args.overrides}")

    # 1. one 336x336 window: decode vs encode
    window = torch.rand(3, 336, 336)
    enc = seg.encode(window)
    assert len(enc.windows) == 1
    t_enc = timed(lambda: seg.encode(window), args.repeats)

    def first_decode():  # as the first decode of an image pays it: with the affinity computed afresh
        enc.memo.clear()
        seg.decode(enc, CLASSES)

    t_first = timed(first_decode, args.repeats * 3)
    t_dec = timed(lambda: seg.decode(enc, CLASSES), args.repeats * 3)
    print(f"one 336x336 window: encode {t_enc:.3f} s, first decode {t_first * 1000:.1f} ms, repeated decode "
          f"{t_dec * 1000:.1f} ms; first decode/encode = {t_first / t_enc:.4f} (goal <= 0.05), "
          f"repeated decode/encode = {t_dec / t_enc:.4f}")

    # 2. VOC-sized image: 16-point sweep vs one predict
    image = torch.rand(3, 375, 500)
    t_pred = timed(lambda: seg.predict(image, CLASSES), args.repeats)

    def sweep():
        e = seg.encode(image)
        for beta in (1.0, 1.2, 1.4, 1.6):
            for gamma in (2.0, 3.0, 4.0, 5.0):
                seg.decode(e, CLASSES, beta=beta, gamma=gamma)

    t_sweep = timed(sweep, max(1, args.repeats - 1))
    print(f"500x375 image ({len(seg.encode(image).windows)} windows): predict {t_pred:.3f} s, 16-point sweep "
          f"{t_sweep:.3f} s, sweep/predict = {t_sweep / t_pred:.3f} (goal <= 1.5)")

    # 3. predict vs the backbones' own forward passes over the same windows
    enc = seg.encode(image)
    resized = F.interpolate(image[None], size=enc.resized_size, mode="bilinear", align_corners=False)[0]
    crops = torch.stack([resized[:, a:b, c:d] for a, b, c, d in enc.windows])
    bs = int(seg.cfg.batch_size)

    @torch.no_grad()
    def backbones():
        for i in range(0, len(crops), bs):
            x = crops[i:i + bs]
            seg.clip_model.visual.positional_embedding.data  # noqa: B018 (weights only)
            tokens = seg.clip.tokens_before_last_block(norm(x, CLIP_MEAN, CLIP_STD))
            last = seg.clip_model.visual.transformer.resblocks[-1]
            last(tokens)  # CLIP's full last block, as its own forward would run it
            seg.vfm_model.forward_features(norm(x, seg.vfm.mean, seg.vfm.std))

    t_bb = timed(backbones, args.repeats)
    print(f"backbones' own forward over the same windows {t_bb:.3f} s, predict/backbones = {t_pred / t_bb:.3f} "
          f"(goal <= 1.10)")


if __name__ == "__main__":
    main()
