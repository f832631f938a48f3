"""Slider-update latency of the explorer (proxyclip.widgets) vs one encode.

    python bench/bench_widgets.py [--clip vit_b16] [--vfm dino_vitb8] [--repeats 5] [--size 336]

Builds the ipywidgets explorer (no browser: the widget models run in this process) on a
size x size crop of the bundled sample image with random weights, then moves each knob control
(one per declared knob of the method: ``--method``, default the configured one) and times the
whole update the user waits for: decode on the cached Encoded + the figures redrawn. Prints
medians and the ratio to one encode. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from proxyclip import load_image  # noqa: E402
from proxyclip.widgets import ASSETS, Explorer  # noqa: E402


def two_values(knob, control):
    """Another value for the control: the other switch state or choice, a slider's other end."""
    if knob.kind == "bool":
        return not control.value
    if knob.kind == "choice":
        return next(v for v in knob.choices if v != control.value)
    if knob.kind == "ints":
        return ", ".join(str(int(v) + 1) for v in control.value.split(","))
    lo, hi = control.min, control.max
    return hi if control.value - lo < hi - control.value else lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="vit_b16")
    ap.add_argument("--vfm", default="dino_vitb8")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", default=None, help="a registered method (default: the configured one)")
    args = ap.parse_args()

    img = load_image(ASSETS / "sample.jpg")
    img = torch.nn.functional.interpolate(img[None], size=(args.size, args.size), mode="bilinear",
                                          align_corners=False)[0].clamp(0, 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; image {args.size}x{args.size}; "
          f"clip={args.clip} vfm={args.vfm} weights={args.weights}")

    t0 = time.perf_counter()
    ex = Explorer(clip=args.clip, vfm=args.vfm, weights=args.weights, image=img,
                  clip_options=[args.clip], vfm_options=[args.vfm])
    first = time.perf_counter() - t0
    c = ex.controller
    print(f"first view (build models + encode + decode + render): {first:.2f} s; "
          f"{len(c.encoded.windows)} window(s); VFM grid {tuple(c.encoded.vfm_features.shape[-2:]) if c.encoded.vfm_features is not None else None}")

    # one more encode, timed alone (warm)
    seg = c.segmenter
    encodes = []
    for _ in range(2):
        t = time.perf_counter()
        seg.encode(img)
        encodes.append(time.perf_counter() - t)
    encode_s = min(encodes)

    if args.method:
        ex.method.value = args.method
    results = {}
    n_enc = c.n_encodes
    for knob in c.knob_declarations():  # two values of each control: its current one and another
        control = ex.knob_panel.controls[knob.name]
        values = [control.value, two_values(knob, control)]
        times, decodes = [], []
        for i in range(args.repeats):
            t = time.perf_counter()
            control.value = values[(i + 1) % 2]
            times.append(time.perf_counter() - t)
            decodes.append(c.last_decode_seconds)
        results[knob.name] = (statistics.median(times), statistics.median(decodes))
    patch_times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        ex.patch_x.value = 40 + 30 * (i % 2)
        patch_times.append(time.perf_counter() - t)
    assert c.n_encodes == n_enc, "a control re-encoded"

    print(f"\none encode (warm, best of 2): {encode_s * 1000:.0f} ms")
    print(f"{'control':<20}{'update (median)':>18}{'of which decode':>18}{'ratio to encode':>18}")
    for name, (upd, dec) in results.items():
        print(f"{name:<20}{upd * 1000:>15.0f} ms{dec * 1000:>15.0f} ms{upd / encode_s:>18.3f}")
    pt = statistics.median(patch_times)
    print(f"{'patch x (no decode)':<20}{pt * 1000:>15.0f} ms{0:>15.0f} ms{pt / encode_s:>18.3f}")
    worst = max(u for u, _ in results.values())
    print(f"\nslowest control update {worst * 1000:.0f} ms = {worst / encode_s:.3f} x one encode "
          f"({'within' if worst <= 1.0 else 'OVER'} the 1 s target); encodes during the controls: {c.n_encodes - n_enc}")


if __name__ == "__main__":
    main()
