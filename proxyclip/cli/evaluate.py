"""``proxyclip-eval``: mIoU of one dataset (Hydra; ``-m`` for several).

    proxyclip-eval dataset=voc21 data_root=/datasets clip=vit_b16 vfm=dino_vitb8
    proxyclip-eval -m dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k
    torchrun --nproc_per_node=4 -m proxyclip.cli.evaluate dataset=ade20k device=cuda

Writes ``metrics.json`` (mIoU, aAcc, mAcc, per-class IoU/Acc, model and protocol) and
``per_class.csv`` into the run directory, plus ``state/`` for resuming: the same command with
``hydra.run.dir=<that directory>`` continues an interrupted run.
"""

from __future__ import annotations

from omegaconf import DictConfig


def _main(cfg: DictConfig) -> float:
    from ..evaluation.app import run_cli

    return run_cli(cfg, "eval")  # mIoU: what a Hydra sweeper (Optuna) optimizes


def main() -> None:
    from .hydra_app import run_app

    run_app("proxyclip-eval", "eval", _main, __doc__)


if __name__ == "__main__":
    main()
