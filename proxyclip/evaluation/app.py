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
    """Run the eval / sweep app; returns :func:`headline_metric` (Hydra hands it to the sweeper)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ..backbones import WeightsUnavailable
    from ..config import hydra_output_dir
    from ..data import BadLabelError, DatasetNotFoundError
    from ..devices import resolve_runtime
    from .api import evaluate, sweep
    from .distributed import broadcast_object, cleanup, init_distributed

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
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
        try:
            return headline_metric(kind, (evaluate if kind == "eval" else sweep)(cfg, run_dir=out, info=info))
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; continue with the same command and hydra.run.dir={out}", file=sys.stderr)
            sys.exit(130)
        except (ValueError, TypeError, FileNotFoundError, DatasetNotFoundError, BadLabelError, WeightsUnavailable,
                RuntimeError) as e:
            msg = f"{prog}: error: {e}"
            print(msg, file=sys.stderr)
            try:
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(msg + "\n")
            except OSError:
                pass
            if not multirun:  # in a multirun, the other jobs (datasets) still run
                sys.exit(2)
            return math.nan
    finally:
        cleanup(info)
