"""Inside CLIP: what the per-block hook points and the layer parts cost, in one run
(CLIP ViT-B/16 + DINO ViT-B/8, random weights, fp32, one 500x375 image).

    python bench/bench_inside.py [--repeats 5]

Prints:
  the plain encode (no listener) / the same encode through a loop of open_clip's block modules
      (the fused path as it was before the per-block points existed)                   (goal <= 1.02)
  the encode keeping every layer part (the tokens entering blocks 0..10) / a plain encode (goal <= 1.15)
      and the Encoded's size per window
  a run_with_cache recording every clip.blocks.* point / a plain predict               (reported)
The two encodes of each ratio are timed in alternation (A B A B ...) and their fastest runs
compared (the least disturbed by other jobs on a shared machine); the first ratio is also given
for CLIP's encode_tokens alone on one batch of windows (where the per-block points live).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402

import torch  # noqa: E402
from _timing import bench_setup, timed  # noqa: E402

from proxyclip.parts import describe_size, resid_pre  # noqa: E402

VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def alternating(a, b, repeats: int):
    """Fastest wall times of ``a`` and ``b``, called in turn ``repeats`` times each."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return min(ta), min(tb)


def module_loop(clip):
    """encode_tokens as a plain loop of open_clip's block modules (written here, for the comparison)."""
    def encode_tokens(x, keep=()):
        v = clip.visual
        t = v.conv1(x.to(clip.dtype))
        grid = (t.shape[2], t.shape[3])
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1), t], 1)
        t = v.ln_pre(t + clip.positional_embedding(grid).to(t.dtype))
        kept = {}
        for i, block in enumerate(v.transformer.resblocks[:-1]):
            if i in keep:
                kept[i] = t
            t = block(t)
        return t, kept
    return encode_tokens


def main() -> None:
    args, seg = bench_setup(repeats=5)
    seg.text_embeddings(VOC21)
    image = torch.rand(3, 375, 500, generator=torch.Generator().manual_seed(0))
    print(f"threads={torch.get_num_threads()}  backbones: {args.overrides}")
    plain = seg.encode(image)  # warm-up
    loop = module_loop(seg.clip)

    def through_loop():
        seg.clip.encode_tokens = loop
        try:
            return seg.encode(image)
        finally:
            del seg.clip.encode_tokens

    assert torch.equal(through_loop().clip_tokens, plain.clip_tokens)
    t_plain, t_loop = alternating(lambda: seg.encode(image), through_loop, args.repeats)
    print(f"500x375 ({len(plain.windows)} windows): plain encode {t_plain:.3f} s, through open_clip's block "
          f"modules {t_loop:.3f} s -> ratio {t_plain / t_loop:.3f} (goal <= 1.02)")
    from proxyclip.stages import window_pixels as _window_pixels

    pix = _window_pixels(seg, plain, 0, min(len(plain.windows), int(seg.cfg.batch_size)))
    with torch.no_grad():
        t_ours, t_mod = alternating(lambda: seg.clip.encode_tokens(pix), lambda: loop(pix), 2 * args.repeats)
    print(f"  CLIP alone ({pix.shape[0]} windows): encode_tokens {t_ours:.3f} s, block-module loop {t_mod:.3f} s "
          f"-> ratio {t_ours / t_mod:.3f}")

    every = [resid_pre(i) for i in range(seg.clip.num_blocks - 1)]
    t_plain, t_keep = alternating(lambda: seg.encode(image), lambda: seg.encode(image, keep=every), args.repeats)
    kept = seg.encode(image, keep=every)
    print(f"keeping every layer part (blocks 0..{seg.clip.num_blocks - 2}): {t_keep:.3f} s vs plain {t_plain:.3f} s "
          f"-> ratio {t_keep / t_plain:.3f} (goal <= 1.15)")
    print(f"  size: plain {describe_size(plain)}")
    print(f"  size: every part {describe_size(kept)}")

    t_pred = timed(lambda: seg.predict(image, VOC21), args.repeats)
    names = lambda n: n.startswith("clip.blocks.")  # noqa: E731
    t_cache = timed(lambda: seg.run_with_cache(image, VOC21, names=names), max(1, args.repeats // 2))
    _, cache = seg.run_with_cache(image, VOC21, names=names)
    mb = sum(t.numel() * t.element_size() for t in cache.values()) / 1e6
    print(f"run_with_cache of every clip.blocks.* point ({len(cache)} tensors, {mb:.0f} MB): {t_cache:.3f} s vs "
          f"predict {t_pred:.3f} s -> ratio {t_cache / t_pred:.2f} (reported, no goal)")


if __name__ == "__main__":
    main()
