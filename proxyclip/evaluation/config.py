"""Structured schemas of the evaluation entry points (``conf/eval.yaml``, ``conf/sweep.yaml``).

They extend the core :class:`~proxyclip.config.Config` with a dataset, a logger and the
run's own options, so a typo in any of them is an error. Importing this module registers
``eval_schema`` and ``sweep_schema`` in Hydra's ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import Config, DatasetConfig, LoggerConfig, compose_config


@dataclass
class EvalConfig(Config):
    """``proxyclip-eval``: one dataset, the method's hyperparameters, one confusion matrix."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data_root: str = "data"  # the folder holding the usual dataset folders (VOCdevkit, ade, ...)
    limit: Optional[int] = None  # evaluate a reproducible random subset of this many images
    limit_seed: int = 0  # which subset
    cache_dir: Optional[str] = None  # on-disk feature cache of encode outputs; null = none
    checkpoint_seconds: float = 10.0  # save the resumable state at most this often (0 = after every image)
    log_images: int = 4  # first N images logged as segmentation masks (when a logger is on)
    progress: bool = True  # tqdm progress bar (images/s, ETA)
    run_dir: Optional[str] = None  # null = Hydra's run directory
    experiment_name: Optional[str] = None  # set by a conf/experiment/ preset; recorded in metrics.json


@dataclass
class SweepGrid:
    """Values to sweep; an empty list means the method's value (a single point)."""

    beta: List[float] = field(default_factory=list)
    gamma: List[float] = field(default_factory=list)
    logit_scale: List[float] = field(default_factory=list)
    prob_thd: List[float] = field(default_factory=list)


@dataclass
class SweepConfig(EvalConfig):
    """``proxyclip-sweep``: the whole grid from one encode per image."""

    sweep: SweepGrid = field(default_factory=SweepGrid)


def register_eval_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="sweep_schema", node=SweepConfig)


register_eval_schemas()


def compose_eval_config(overrides: Optional[List[str]] = None, config_name: str = "eval") -> DictConfig:
    """``compose_config("eval" | "sweep", overrides)`` with the evaluation schemas registered.

    >>> cfg = compose_eval_config(["dataset=voc21", "data_root=/datasets", "weights=random"])
    """
    register_eval_schemas()
    return compose_config(config_name, overrides)
