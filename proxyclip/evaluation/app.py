"""Shared body of ``proxyclip-eval`` and ``proxyclip-sweep`` (Hydra apps)."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig


def _remove_stray_run_dir(path: Path) -> None:
    """A non-zero torchrun rank's own Hydra folder (only .hydra/ and *.log): rank 0's is used instead."""
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    if all(e.name == ".hydra" or e.suffix == ".log" for e in entries):
        shutil.rmtree(path, ignore_errors=True)


def headline_metric(kind: str, written: Optional[Dict[str, Any]]) -> float:
    """The number a Hydra sweeper optimizes: mIoU (eval) or the best point's mIoU (sweep); NaN if none."""
    if not written:
        return math.nan
    return float(written["mIoU"] if kind == "eval" else written["best"]["mIoU"])


def run_cli(cfg: DictConfig, kind: str) -> float:
    """Run the eval / sweep app; returns :func:`headline_metric` (Hydra hands it to the sweeper).

    An input error is one ``error:`` line (and ``error.txt`` in the run directory): exit 2 in a
    single run; in a multirun the job is recorded as failed, the other jobs still run, and the app
    exits 2 at the end naming the failed jobs (``proxyclip.cli.hydra_app``)."""
    from ..cli.errors import input_errors
    from ..cli.hydra_app import quiet_root_info, report_job_done, report_job_error
    from ..config import hydra_output_dir
    from ..devices import resolve_runtime
    from .api import evaluate, sweep
    from .distributed import broadcast_object, cleanup, init_distributed

    quiet_root_info()
    prog = f"proxyclip-{kind}"
    resolve_runtime(cfg)  # device/precision "auto" -> this machine's values, before anything uses them
    info = init_distributed(str(cfg.device))
    try:
        out = Path(cfg.run_dir) if cfg.get("run_dir") else Path(hydra_output_dir())
        if info.enabled:  # every process must write into rank 0's run directory
            shared = Path(broadcast_object(str(out), info))
            if shared != out and not cfg.get("run_dir"):
                _remove_stray_run_dir(out)
            out = shared
        stale = out / "error.txt"
        if info.is_main and stale.is_file():  # from an earlier attempt in this run directory
            stale.unlink()
        try:
            value = headline_metric(kind, (evaluate if kind == "eval" else sweep)(cfg, run_dir=out, info=info))
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; continue with the same command and hydra.run.dir={out}", file=sys.stderr)
            sys.exit(130)
        except input_errors() as e:
            report_job_error(prog, str(e), out)
            return math.nan
        report_job_done()
        return value
    finally:
        cleanup(info)
