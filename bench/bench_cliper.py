"""CLIPer's cost, ratios measured in one run (random weights, fp32, one 500x375 image).

    python bench/bench_cliper.py [--repeats 3]

Prints (no goal; a report):
  one ProxyCLIP predict (CLIP ViT-B/16 + DINO ViT-B/8, its protocol: short side 336, windows 224 / 112)
  CLIPer predicts / that: whole image (crop null) and sliding (crop 336 / stride 112: VOC21's setting,
  the whole image run once more at decode), each with compensation none and dino (DINO ViT-B/8 on
  the original image); a second decode of the same Encoded (the units memoized) / the predict
  the Encoded's size per window with every block's tokens kept (proxyclip.parts.encoded_size)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import VOC21, bench_setup, proxyclip_baseline, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402
from proxyclip.parts import describe_size, encoded_size  # noqa: E402

CLIPER = ["clip=vit_b16", "vfm=dino_vitb8", "weights=random", "method=cliper", "protocol.short_side=336",
          "protocol.prob_thd=0", "protocol.logit_scale=1"]


def main() -> None:
    args, seg = bench_setup()
    image, t_pred = proxyclip_baseline(args, seg)

    for name, geo in (("whole image", ["protocol.crop=null"]), ("sliding 336/112", ["protocol.crop=336",
                                                                                     "protocol.stride=112"])):
        cl = Segmenter.from_config(compose_config(overrides=CLIPER + geo))
        cl.text_embeddings(VOC21 + ["background"])
        enc = cl.encode(image)
        size = encoded_size(enc)
        print(f"CLIPer {name}: {len(enc.windows)} window(s) of grid {enc.clip_grid}, resized {enc.resized_size}; "
              f"Encoded {describe_size(enc)}; every block's tokens {size['total'] - size.get('vfm.features', 0):.2f} "
              f"MB a window")
        t_enc = timed(lambda: cl.encode(image), args.repeats)
        for comp in ("none", "dino"):
            cl.predict(image, VOC21, compensation=comp)  # warm-up
            t = timed(lambda: cl.predict(image, VOC21, compensation=comp), args.repeats)
            e = cl.encode(image)
            cl.decode(e, VOC21, compensation=comp)  # fills the memo (the units, the DINO features)
            t_again = timed(lambda: cl.decode(e, VOC21, compensation=comp, attention_thr=0.2), args.repeats)
            print(f"  compensation={comp}: predict {t:.3f} s (encode {t_enc:.3f} s) -> CLIPer / ProxyCLIP predict "
                  f"{t / t_pred:.2f}; a second decode of the Encoded {t_again:.3f} s -> {t_again / t_pred:.2f}")


if __name__ == "__main__":
    main()
