"""Benchmark evaluation: the eval loop, resumable state, distributed sharding, feature cache, sweeps, summary.

    from proxyclip import compose_config
    from proxyclip.evaluation import evaluate, sweep
"""

from .api import evaluate, sweep, sweep_heatmap
from .cache import FeatureCache
from .runner import GridResult, grid_points, run_grid, select_indices

__all__ = [
    "FeatureCache",
    "GridResult",
    "evaluate",
    "grid_points",
    "run_grid",
    "select_indices",
    "sweep",
    "sweep_heatmap",
]
