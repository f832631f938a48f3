"""The method zoo's cost ratios, measured in one run (CLIP ViT-B/16 + DINO ViT-B/8, random weights, fp32).

    python bench/bench_methods.py [--repeats 3]

Prints:
  all six methods decoded from one encode of a 500x375 image / one ProxyCLIP predict   (goal <= 0.25)
  each method's decode of one 336x336 window / its encode                               (goal <= 0.05)
      (its encode: the shared CLIP + DINO encode; also shown against a CLIP-only encode,
       which is all a method without a VFM builds)
  ProxyCLIP predict with PAMR (10 steps, dilations 8 and 16, 21 classes) / without      (goal <= 1.20)
Each decode is a first decode of its Encoded (nothing memoized from an earlier one); text
embeddings are warmed once, as every image after the first finds them cached.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402
from proxyclip.methods import METHODS  # noqa: E402

VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def fresh(enc):
    enc.memo.clear()  # a first decode: q, k, values, the affinity computed afresh
    return enc


def main() -> None:
    args, seg = bench_setup()
    seg.text_embeddings(VOC21)
    methods = list(METHODS)
    # the layer parts every method reads (SC-CLIP, GEM: earlier blocks' tokens), kept by the one encode
    parts = sorted({p for m in methods for p in seg.parts_of(seg.decode_spec(method=m))})
    print(f"threads={torch.get_num_threads()}  backbones: {args.overrides}  methods: {methods}")

    # 1. all methods from one encode vs one ProxyCLIP predict, 500x375
    image = torch.rand(3, 375, 500)
    seg.predict(image, VOC21)  # warm-up (first-call allocations)
    enc = seg.encode(image, keep=parts)
    t_pred = timed(lambda: seg.predict(image, VOC21), args.repeats)
    # a method reading another VFM readout (CASS: keys) decodes from the same models' encode with that
    # readout (CLIP part reused; its VFM pass is counted here, once per repeat)
    readout = {m: seg.for_method(m) for m in methods}
    t_all = timed(lambda: [readout[m].decode(fresh(readout[m].encode(image, reuse=enc)) if readout[m] is not seg
                                             else fresh(enc), VOC21, method=m) for m in methods], args.repeats)
    print(f"500x375 ({len(enc.windows)} windows): ProxyCLIP predict {t_pred:.3f} s; {len(methods)} decodes from one "
          f"encode {t_all:.3f} s -> ratio {t_all / t_pred:.3f} (goal <= 0.25)")

    # 2. each method's decode of one 336 window vs its encode
    window = torch.rand(3, 336, 336)
    enc1 = seg.encode(window, keep=parts)
    t_enc = timed(lambda: seg.encode(window), args.repeats)
    t_enc_parts = timed(lambda: seg.encode(window, keep=parts), args.repeats)
    print(f"one 336x336 window: encode keeping every method's layer parts ({len(parts)}) {t_enc_parts:.3f} s "
          f"-> / plain encode {t_enc_parts / t_enc:.3f}")
    clip_only = Segmenter.from_config(compose_config(overrides=args.overrides + ["method=clip"]))
    clip_only.text_embeddings(VOC21)
    t_enc_clip = timed(lambda: clip_only.encode(window), args.repeats)
    print(f"one 336x336 window: encode CLIP + DINO {t_enc:.3f} s, CLIP only {t_enc_clip:.3f} s")
    for m in methods:
        own_enc = enc1 if readout[m] is seg else readout[m].encode(window, reuse=enc1)  # enc1 keeps the parts
        t_dec = timed(lambda: readout[m].decode(fresh(own_enc), VOC21, method=m), args.repeats * 2)
        own = t_enc if METHODS[m].needs_vfm else t_enc_clip
        print(f"  {m:10s} decode {t_dec * 1000:7.1f} ms: / shared encode {t_dec / t_enc:.3f}, "
              f"/ its own encode ({'CLIP + DINO' if METHODS[m].needs_vfm else 'CLIP only'}) {t_dec / own:.3f} "
              "(goal <= 0.05)")

    # 3. PAMR on top of a ProxyCLIP predict, 500x375, 21 classes
    t_plain = timed(lambda: seg.predict(image, VOC21), args.repeats)
    t_pamr = timed(lambda: seg.predict(image, VOC21, postprocess="pamr_naclip"), args.repeats)
    print(f"500x375 predict {t_plain:.3f} s, with PAMR (10 steps, dilations 8, 16) {t_pamr:.3f} s -> ratio "
          f"{t_pamr / t_plain:.3f} (goal <= 1.20)")


if __name__ == "__main__":
    main()
