"""The one timing helper of the bench scripts (run as ``python bench/<name>.py``)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls of ``fn``, in seconds: the run least disturbed by other jobs on a
    shared machine (as ``timeit`` advises; the median swings by 3x here when other sessions run tests)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@contextlib.contextmanager
def readout_memo(on: bool):
    """The VFM readout memo (proxyclip/backbones/readout_memo.py) on or off inside the block. The benches
    time the same input again and again, which the memo would answer without running the VFM: it is off
    (:func:`bench_setup`) except where one forward shared by two readouts is what is measured."""
    from proxyclip.backbones import readout_memo as memo

    size = memo.MEMO_BYTES
    memo.MEMO_BYTES = 256 * 2 ** 20 if on else 0
    try:
        yield
    finally:
        memo.MEMO_BYTES = size


def bench_setup(default_overrides=("clip=vit_b16", "vfm=dino_vitb8", "weights=random"), repeats: int = 3):
    """The common command line (``--repeats``, ``--overrides``) and the Segmenter it builds, seeded; the
    VFM readout memo off (:func:`readout_memo`). -> (args, segmenter)."""
    import argparse

    import torch

    from proxyclip import Segmenter, compose_config
    from proxyclip.backbones import readout_memo as memo

    memo.MEMO_BYTES = 0

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--overrides", nargs="*", default=list(default_overrides))
    args = ap.parse_args()
    torch.manual_seed(0)
    return args, Segmenter.from_config(compose_config(overrides=args.overrides))


VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def proxyclip_baseline(args, seg):
    """The baseline of the ratios: one seeded 500 x 375 image and the fastest time of ``seg``'s predict on
    VOC21's classes (text embedded and one warm-up first), printed. -> (image, seconds)."""
    import torch

    image = torch.rand(3, 375, 500, generator=torch.Generator().manual_seed(0))
    seg.text_embeddings(VOC21)
    seg.predict(image, VOC21)  # warm-up
    t_pred = timed(lambda: seg.predict(image, VOC21), args.repeats)
    print(f"threads={torch.get_num_threads()}  ProxyCLIP predict ({' '.join(args.overrides)}): {t_pred:.3f} s")
    return image, t_pred


def mask_generator_and_cache(args, image, t_pred: float, generator: str) -> None:
    """The mask proposals' cost, printed: SAM 2's generator (``generator``, random weights) on ``image``, the
    encode that runs it (writing the proposals' disk cache), and a second Segmenter's encode, which must read
    the cache (its generator call count is printed) -> the second / first ratio. Skipped, said so, without sam2."""
    import tempfile

    from proxyclip import Segmenter, compose_config

    with tempfile.TemporaryDirectory() as cache:
        over = ["clip=vit_b16", "weights=random", "method=maskclip", "masks=sam2", f"masks.model={generator}",
                f"masks.cache={cache}"]
        try:
            first = Segmenter.from_config(compose_config(overrides=over))
        except ImportError as e:
            print(f"SAM 2 generator: skipped ({e})")
            return
        t_gen = timed(lambda: first.masks.generate(image), 1)
        t_first = timed(lambda: first.encode(image), 1)  # generator (model built) + CLIP encode; writes the cache
        second = Segmenter.from_config(compose_config(overrides=over))
        t_second = timed(lambda: second.encode(image), args.repeats)
        print(f"SAM 2 generator ({generator}, 8 points per side, random weights) on 500x375: {t_gen:.3f} s "
              f"(incl. building the model) = {t_gen / t_pred:.2f} x ProxyCLIP predict; encode with it {t_first:.3f} s; "
              f"a second Segmenter's encode, proposals cached: {t_second:.3f} s (generator runs: "
              f"{second.masks.generator_calls}) -> ratio {t_second / t_first:.3f}")
