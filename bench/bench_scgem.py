"""SC-CLIP's and GEM's decode of one 336x336 window against the encode (CLIP ViT-B/16, random
weights, fp32), measured in one run.

    python bench/bench_scgem.py [--repeats 3]

Prints, for scclip and gem: the encode of the window (keeping the method's layer parts), a first
decode (nothing memoized: SC-CLIP's LOF included) and a repeated decode (the memo of the encode
kept: SC-CLIP's outliers, S_post and the fusion sum), each as a ratio to the encode (the issue's
goal: <= 0.15). Text embeddings are warmed first; the decode includes scoring and the decision.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402

CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"]


def main() -> None:
    args, _ = bench_setup(default_overrides=("clip=vit_b16", "vfm=none", "weights=random", "method=clip"))
    window = torch.rand(3, 336, 336, generator=torch.Generator().manual_seed(0))
    geometry = ["protocol.short_side=336", "protocol.crop=336", "protocol.stride=336"]
    print(f"threads={torch.get_num_threads()}  {args.overrides}")
    for name in ("scclip", "gem"):
        seg = Segmenter.from_config(compose_config(overrides=args.overrides + geometry + [f"method={name}"]))
        seg.text_embeddings(CLASSES)
        enc = seg.encode(window)
        assert len(enc.windows) == 1
        t_enc = timed(lambda: seg.encode(window), args.repeats)

        def first():
            enc.memo.clear()
            seg.decode(enc, CLASSES)

        t_first = timed(first, args.repeats)
        t_again = timed(lambda: seg.decode(enc, CLASSES), args.repeats)
        print(f"{name:7s} encode {t_enc:.3f} s ({len(enc.layers)} layer parts); decode first {t_first:.3f} s "
              f"-> {t_first / t_enc:.3f}, memoized {t_again:.3f} s -> {t_again / t_enc:.3f} (goal <= 0.15)")


if __name__ == "__main__":
    main()
