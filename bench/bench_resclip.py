"""ResCLIP's cost, measured in one run (CLIP ViT-B/16, random weights, fp32, one 336x336 window).

    python bench/bench_resclip.py [--repeats 3]

Prints, for one 336 window and the 21 VOC classes:
  the encode keeping RCS's four blocks (clip.blocks.5..8.resid_pre) / a plain encode, and the
      Encoded's size per window (proxyclip.parts.encoded_size)
  each base's decode (RCS + SFR, its two passes and the provisional PAMR) / that encode
      (the issue's goal: <= 0.15), and the decode with SFR off, with RCS off, with both off
Each decode is a first decode of its Encoded (nothing memoized); text embeddings are warmed once.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

from proxyclip.parts import encoded_size  # noqa: E402

VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def main() -> None:
    args, seg = bench_setup(("clip=vit_b16", "weights=random", "method=resclip", "protocol.short_side=336",
                             "protocol.crop=336", "protocol.stride=336"))
    seg.text_embeddings(VOC21)
    window = torch.rand(3, 336, 336, generator=torch.Generator().manual_seed(0))
    enc = seg.encode(window)
    seg.decode(enc, VOC21)  # warm-up
    t_enc = timed(lambda: seg.encode(window), args.repeats)
    t_plain = timed(lambda: _plain(seg, window), args.repeats)
    size = encoded_size(enc)
    print(f"threads={torch.get_num_threads()}  {args.overrides}")
    print(f"one 336x336 window: encode keeping {sorted(enc.layers)} {t_enc:.3f} s; plain encode {t_plain:.3f} s "
          f"-> ratio {t_enc / t_plain:.3f}; Encoded {size['total']:.2f} MB per window "
          f"({size['clip.last_block_input']:.2f} MB the last block's input, {len(enc.layers)} parts)")

    def decode(**knobs):
        enc.memo.clear()
        return seg.decode(enc, VOC21, **knobs)

    for base in ("naclip", "clearclip", "sclip"):
        sw = {"residual": True, "ffn": True} if base == "sclip" else {}
        t = timed(lambda: decode(base=base, **sw), args.repeats * 2)
        print(f"  base={base:9s} decode {t * 1000:7.1f} ms -> / encode {t / t_enc:.3f} (goal <= 0.15)")
    for label, knobs in (("sfr=false", {"sfr": False}), ("rcs=false", {"rcs": False}),
                         ("rcs=false sfr=false", {"rcs": False, "sfr": False})):
        t = timed(lambda: decode(**knobs), args.repeats * 2)
        print(f"  naclip {label:20s} decode {t * 1000:7.1f} ms -> / encode {t / t_enc:.3f}")


def _plain(seg, window):
    """A plain encode (no layer parts kept): the tokens entering the last block only."""
    from proxyclip.stages import run_backbones as _run_backbones
    from proxyclip.windows import resize_image

    img = window.to(seg.device)
    size, boxes, pad = seg.layout(img)
    return _run_backbones(seg, resize_image(img, size), boxes, pad, clip=True, vfm=False, keep=())


if __name__ == "__main__":
    main()
