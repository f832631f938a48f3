"""CorrCLIP's cost, ratios measured in one run (random weights, fp32, one 500x375 image).

    python bench/bench_corrclip.py [--repeats 3]      (BENCH_GENERATOR=sam2_hiera_t: a smaller SAM 2)

Prints:
  ProxyCLIP's predict (CLIP ViT-B/16 + DINO ViT-B/8, its protocol);
  CorrCLIP (CLIP ViT-B/16 + DINO ViT-B/8 q+k, windows 336 / 112, short side 336, masks from a file:
  a random label map of 60 overlapping rectangles) encode and decode, decode / ProxyCLIP predict
  (goal <= 0.5), and the size of its encode (every block's input is kept);
  the mask generator's cost (SAM 2, CorrCLIP's online settings) on the original image, and a second
  Segmenter's encode of the same image with the proposals cached (the generator skipped).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import VOC21, bench_setup, mask_generator_and_cache, proxyclip_baseline, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402
from proxyclip.masks import label_map  # noqa: E402
from proxyclip.parts import describe_size  # noqa: E402

CORRCLIP = ["method=corrclip", "clip=vit_b16", "clip.quick_gelu=true", "vfm=dino_vitb8", "vfm.feature=qk",
            "weights=random", "protocol.short_side=336", "protocol.crop=336", "protocol.stride=112",
            "protocol.prob_thd=0"]
GENERATOR = os.environ.get("BENCH_GENERATOR", "sam2_hiera_l")


def random_proposals(folder: Path, size, count: int = 60, seed: int = 0) -> None:
    """``folder/img.npz``: the label map of ``count`` random rectangles (painted by area, ascending)."""
    rng = np.random.default_rng(seed)
    h, w = size
    masks = np.zeros((count, h, w), bool)
    for m in masks:
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        m[y:y + rng.integers(20, h // 2), x:x + rng.integers(20, w // 2)] = True
    np.savez(folder / "img.npz", instance_mask=label_map(torch.from_numpy(masks)).numpy().astype(np.int32))


def main() -> None:
    args, seg = bench_setup()
    image, t_pred = proxyclip_baseline(args, seg)

    with tempfile.TemporaryDirectory() as folder:
        random_proposals(Path(folder), image.shape[1:])
        cc = Segmenter.from_config(compose_config(overrides=CORRCLIP + ["masks=file", f"masks.dir={folder}"]))
        cc.text_embeddings(VOC21)
        enc = cc.encode(image, image_id="img")
        t_enc = timed(lambda: cc.encode(image, image_id="img"), args.repeats)
        cc.decode(enc, VOC21)  # warm-up
        t_dec = timed(lambda: cc.decode(enc, VOC21), args.repeats)
        t_plain = timed(lambda: cc.decode(enc, VOC21, map_correction=False), args.repeats)
        print(f"corrclip: {len(enc.windows)} windows, resized {enc.resized_size}, {int(enc.masks.max())} proposals: "
              f"encode {t_enc:.3f} s, decode {t_dec:.3f} s (without the map correction {t_plain:.3f} s) -> "
              f"decode / ProxyCLIP predict {t_dec / t_pred:.3f} (goal <= 0.5); encode / ProxyCLIP predict "
              f"{t_enc / t_pred:.3f}")
        print(f"corrclip encode size: {describe_size(enc)}")

    mask_generator_and_cache(args, image, t_pred, GENERATOR)


if __name__ == "__main__":
    main()
