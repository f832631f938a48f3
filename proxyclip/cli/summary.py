"""``proxyclip-summary DIR...``: the paper-style mIoU table from ``proxyclip-eval`` results.

    proxyclip-eval -m dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k
    proxyclip-summary multirun/eval/2026-11-24_10-00-00 --paper

Prints the table (markdown) and writes summary.md and summary.csv (into the first folder, or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from ..evaluation.summary import summarize

    ap = argparse.ArgumentParser(prog="proxyclip-summary", description="Paper-style mIoU table from metrics.json files.")
    ap.add_argument("paths", nargs="+", type=Path, help="run or multirun folders (searched recursively) or metrics.json files")
    ap.add_argument("--out", type=Path, default=None, help="where to write summary.md / summary.csv (default: first folder)")
    ap.add_argument("--paper", action="store_true", help="add the published rows (docs/protocol.md, Published numbers) and all 8 columns")
    ap.add_argument("--datasets", default=None, help="comma-separated dataset columns, e.g. voc21,ade20k")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        first = args.paths[0]
        out = first if first.is_dir() else first.parent
    datasets = args.datasets.split(",") if args.datasets else None
    try:
        md = summarize(args.paths, out, paper=args.paper, datasets=datasets)
    except (FileNotFoundError, ValueError) as e:
        print(f"proxyclip-summary: error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"(written to {out / 'summary.md'} and {out / 'summary.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
