"""``proxyclip-sweep``: a hyperparameter grid over a whole dataset, one encode per image.

    proxyclip-sweep dataset=voc21 'sweep.beta=[1.0,1.2,1.4]' 'sweep.gamma=[2,3,4,5]' cache_dir=cache/

Writes ``sweep.csv`` (beta, gamma, logit_scale, prob_thd, mIoU, aAcc, mAcc),
``sweep_per_class.csv`` (one row per point and class) and ``sweep.json`` into the run directory.
Resumable and distributed like ``proxyclip-eval``.
"""

from __future__ import annotations

from omegaconf import DictConfig


def _main(cfg: DictConfig) -> float:
    from ..evaluation.app import run_cli

    return run_cli(cfg, "sweep")  # the best point's mIoU: what a Hydra sweeper (Optuna) optimizes


def main() -> None:
    from .hydra_app import run_app

    run_app("proxyclip-sweep", "sweep", _main, __doc__)


if __name__ == "__main__":
    main()
