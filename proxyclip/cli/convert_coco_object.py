"""``proxyclip-convert-coco-object SRC DST``: COCO-Object labels from COCO-Stuff 164k labels.

    proxyclip-convert-coco-object data/coco_stuff164k/annotations/val2017 data/coco_stuff164k/annotations/val2017
    # from the original stuffthingmaps, also writing COCO-Stuff's *_labelTrainIds.png:
    proxyclip-convert-coco-object stuffthingmaps_trainval2017/val2017 data/coco_stuff164k/annotations/val2017 \\
        --stuff-out data/coco_stuff164k/annotations/val2017
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from ..data.coco import convert_coco_object

    ap = argparse.ArgumentParser(prog="proxyclip-convert-coco-object", description=__doc__.split("\n")[0][2:])
    ap.add_argument("src", type=Path, help="COCO-Stuff label folder: *_labelTrainIds.png or original <id>.png maps")
    ap.add_argument("dst", type=Path, help="output folder for <id>_instanceTrainIds.png (0 = background, 1..80 things)")
    ap.add_argument("--stuff-out", type=Path, default=None,
                    help="also write COCO-Stuff <id>_labelTrainIds.png here (from original maps)")
    ap.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        written = convert_coco_object(args.src, args.dst, args.stuff_out, args.overwrite, not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        from .errors import say_error

        return say_error("proxyclip-convert-coco-object", e)  # one line; main() returns 2
    print(f"wrote {len(written)} COCO-Object label maps to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
