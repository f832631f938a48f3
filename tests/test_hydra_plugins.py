"""Hydra plugins on the eval entry point: Optuna searches beta/gamma on the value the task returns
(mIoU), and the Slurm launcher's config composes (no cluster needed). Both plugins are the ``sweepers`` extra, part of ``dev``."""

import json
import subprocess

import pytest
import yaml

from fixtures_datasets import make_voc
from fixtures_eval import PYTHON, REPO, TINY_EVAL, subprocess_env


@pytest.mark.slow
def test_optuna_three_trials_over_beta_gamma_maximize_the_returned_miou(tmp_path):
    make_voc(tmp_path, n=2)
    sweep_dir = tmp_path / "optuna"
    r = subprocess.run(
        [PYTHON, "-m", "proxyclip.cli.evaluate", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
         "hydra.sweeper.n_jobs=1", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
         "method.beta=interval(0.8,1.8)", "method.gamma=interval(1.5,6.0)", "dataset=voc20",
         f"data_root={tmp_path}", *TINY_EVAL, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())
    assert len(trials) == 3
    metrics = [json.loads((p / "metrics.json").read_text()) for p in trials]
    points = {(m["decode"]["knobs"]["beta"], m["decode"]["knobs"]["gamma"]) for m in metrics}
    assert len(points) == 3 and all(0.8 <= b <= 1.8 and 1.5 <= g <= 6.0 for b, g in points)
    # the sweeper saw each job's returned mIoU: its best is the best trial's metrics.json
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    top = max(metrics, key=lambda m: m["mIoU"])
    assert best["best_value"] == pytest.approx(top["mIoU"])
    assert best["best_params"]["method.beta"] == pytest.approx(top["decode"]["knobs"]["beta"])
    assert best["best_params"]["method.gamma"] == pytest.approx(top["decode"]["knobs"]["gamma"])


def test_submitit_slurm_launcher_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from proxyclip.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("eval", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                         "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                                         "hydra.launcher.timeout_min=120", "dataset=voc21", *TINY_EVAL],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (
        "gpu", 4, 4, 120)
    assert cfg.dataset.name == "voc21" and cfg.protocol.crop == 64  # the task's own config is unchanged by it
