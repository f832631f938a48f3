"""Benchmark evaluation: the eval loop, resumable state, distributed sharding, feature cache, sweeps, summary.

    from proxyclip.evaluation import compose_eval_config, evaluate, sweep
"""

from .api import evaluate, sweep, sweep_heatmap
from .cache import FeatureCache
from .config import EvalConfig, SweepConfig, SweepGrid, compose_eval_config, register_eval_schemas
from .runner import GridResult, grid_points, run_grid, select_indices

__all__ = [
    "EvalConfig",
    "FeatureCache",
    "GridResult",
    "SweepConfig",
    "SweepGrid",
    "compose_eval_config",
    "evaluate",
    "grid_points",
    "register_eval_schemas",
    "run_grid",
    "select_indices",
    "sweep",
    "sweep_heatmap",
]
