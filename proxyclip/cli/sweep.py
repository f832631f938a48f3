"""``proxyclip-sweep``: a hyperparameter grid over a whole dataset, one encode per image.

    proxyclip-sweep dataset=voc21 'sweep.beta=[1.0,1.2,1.4]' 'sweep.gamma=[2,3,4,5]' cache_dir=cache/

Writes ``sweep.csv`` (beta, gamma, logit_scale, prob_thd, mIoU, aAcc, mAcc),
``sweep_per_class.csv`` (one row per point and class) and ``sweep.json`` into the run directory.
Resumable and distributed like ``proxyclip-eval``.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sweep")
def _main(cfg: DictConfig) -> float:
    from ..evaluation.app import run_cli

    return run_cli(cfg, "sweep")  # the best point's mIoU: what a Hydra sweeper (Optuna) optimizes


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()


if __name__ == "__main__":
    main()
