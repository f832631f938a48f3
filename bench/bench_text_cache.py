"""Text-embedding disk cache: a second run (a new process) of 100 class names / the first run.

    python bench/bench_text_cache.py [--names 100]

For the tiny test CLIP and for CLIP ViT-B/16 (random weights: the same cost as pretrained ones),
each run is a fresh Python process that builds the model and times ``text_embeddings`` of the first
N names of the ADE-847 class list (80 templates each). The first run encodes and writes the cache,
the second reads it. Prints seconds and the ratio second / first (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"test_tiny": ["experiment=tiny"], "vit_b16": ["clip=vit_b16", "vfm=none", "weights=random"]}

CHILD = """
import sys, time
from proxyclip import Segmenter, compose_config
from proxyclip.data import read_class_lines
names = read_class_lines("ade847")[: int(sys.argv[2])]
seg = Segmenter.from_config(compose_config(overrides=sys.argv[3:] + [f"text_cache={sys.argv[1]}"]))
t = time.perf_counter()
seg.text_embeddings(names)
print(time.perf_counter() - t, seg.text.disk.hits, seg.text.disk.misses)
"""


def run(cache: str, n: int, overrides) -> tuple:
    env_py = [sys.executable, "-c", CHILD, cache, str(n), *overrides]
    out = subprocess.run(env_py, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    seconds, hits, misses = out.stdout.split()[-3:]
    return float(seconds), int(hits), int(misses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=100)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args()
    for model in args.models:
        with tempfile.TemporaryDirectory() as cache:
            first, _, misses = run(cache, args.names, MODELS[model])
            second, hits, _ = run(cache, args.names, MODELS[model])
        print(f"{model}: {args.names} names, first run {first:.2f} s ({misses} encoded), second run {second:.3f} s "
              f"({hits} from disk): ratio {second / first:.4f} (goal <= 0.05)", flush=True)


if __name__ == "__main__":
    main()
