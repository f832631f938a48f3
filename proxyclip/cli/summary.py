"""``proxyclip-summary DIR...``: paper-layout mIoU tables from ``proxyclip-eval`` results.

    proxyclip-eval -m experiment=paper_main data_root=DATA device=cuda
    proxyclip-summary multirun/paper_main/2026-11-24_10-00-00          # the table kind the preset names
    proxyclip-summary multirun/eval/2026-11-24_10-00-00 --table vfm --wandb
    proxyclip-summary multirun/eval/2026-11-24_10-00-00 --rows vfm.layer --cols protocol.crop

Prints the tables (markdown) and writes summary.md and summary.csv (into the first folder, or
--out); with --wandb also a W&B run holding them (mode, project, ... from conf/logger/wandb.yaml).
Table kinds, presets, how rows are told apart and published numbers matched: docs/tables.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def wandb_logger_config(mode: Optional[str] = None, directory: Optional[Path] = None):
    """``conf/logger/wandb.yaml`` checked against the logger schema, with ``mode`` / ``dir`` replaced if given."""
    from omegaconf import OmegaConf

    from ..config import CONF_DIR, LoggerConfig

    values = OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml")
    values.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(LoggerConfig), values)
    if mode:
        cfg.mode = mode
    if directory is not None and not cfg.dir:
        cfg.dir = str(directory)
    return cfg


def main(argv=None) -> int:
    from ..evaluation.summary import KINDS, summarize

    ap = argparse.ArgumentParser(prog="proxyclip-summary", description="Paper-layout mIoU tables from metrics.json files.")
    ap.add_argument("paths", nargs="+", type=Path, help="run or multirun folders (searched recursively) or metrics.json files")
    ap.add_argument("--table", choices=KINDS, default=None,
                    help="table kind (default: the one of the preset the runs recorded, else main)")
    ap.add_argument("--rows", default=None, metavar="FIELD",
                    help="pivot: rows = this flat field of the runs' specs (beta, vfm.layer, protocol.crop, clip.name, "
                         "method, postprocess.steps, ...; method.beta = beta); needs --cols")
    ap.add_argument("--cols", default=None, metavar="FIELD", help="pivot: columns = this field (see --rows)")
    ap.add_argument("--out", type=Path, default=None, help="where to write summary.md / summary.csv (default: first folder)")
    ap.add_argument("--paper", action="store_true",
                    help="main/methods: all eight benchmark columns, plus the published rows no run matches")
    ap.add_argument("--datasets", default=None, help="comma-separated datasets to include, e.g. voc21,ade20k")
    ap.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run (conf/logger/wandb.yaml)")
    ap.add_argument("--wandb-mode", choices=("online", "offline"), default=None, help="override the config's W&B mode")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        first = args.paths[0]
        out = first if first.is_dir() else first.parent
    datasets = args.datasets.split(",") if args.datasets else None
    logger_cfg = wandb_logger_config(args.wandb_mode, out) if args.wandb else None
    try:
        md = summarize(args.paths, out, paper=args.paper, datasets=datasets, kind=args.table, logger_cfg=logger_cfg,
                       rows=args.rows, cols=args.cols)
    except (FileNotFoundError, ValueError) as e:
        from .errors import say_error

        return say_error("proxyclip-summary", e)  # one line; main() returns 2
    print(md, end="")
    print(f"(written to {out / 'summary.md'} and {out / 'summary.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
