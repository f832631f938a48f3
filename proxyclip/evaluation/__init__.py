"""Benchmark evaluation: the eval loop, resumable state, distributed sharding, feature cache, sweeps, summary.

    from proxyclip import compose_config
    from proxyclip.evaluation import evaluate, sweep
"""

from .api import EvalJob, SweepJob, evaluate, sweep
from .cache import FeatureCache
from .grid import grid_axes, grid_points, sweepable
from .outputs import sweep_figure
from .runner import GridResult, run_grid, select_indices, selection_record

__all__ = [
    "EvalJob",
    "FeatureCache",
    "GridResult",
    "SweepJob",
    "evaluate",
    "grid_axes",
    "grid_points",
    "run_grid",
    "select_indices",
    "selection_record",
    "sweep",
    "sweep_figure",
    "sweepable",
]
