"""Sweeps logged to W&B: the offline Hydra multirun of proxyclip-eval (one run per point, grouped by
the sweep), read back with `wandb leet`, and the online W&B sweep YAML checked against the configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image

from proxyclip import compose_config

REPO = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).with_name("wandb"))


def make_custom(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("sky\ngrass\n")
    for i in range(n):
        lab = np.zeros((48, 64), np.uint8)
        lab[24:] = 1
        img = np.where(lab[..., None] == 0, [90, 140, 240], [40, 160, 40]) + rng.integers(0, 20, (48, 64, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i}.png")
    return root


def leet(*args: str) -> str:
    out = subprocess.run([WANDB, "leet", "inspect", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_hydra_multirun_of_eval_logs_one_wandb_run_per_point_grouped(tmp_path):
    data = make_custom(tmp_path / "data")
    sweep_dir = tmp_path / "multirun" / "beta-sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
               WANDB_ERROR_REPORTING="false", WANDB_CONFIG_DIR=str(tmp_path / "wcfg"),
               WANDB_CACHE_DIR=str(tmp_path / "wcache"), WANDB_DATA_DIR=str(tmp_path / "wdata"),
               MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "proxyclip.cli.evaluate", "-m", *TINY, "dataset=custom", f"dataset.root={data}",
           "progress=false", "log_images=1", "logger=wandb", "logger.mode=offline",
           "method.beta=0.8,1.6", f"hydra.sweep.dir={sweep_dir}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*"))  # each run in its job's folder (logger.dir unset)
    assert len(runs) == 2 and not (tmp_path / "wandb").exists()
    betas = {}
    for run in runs:
        summary = json.loads(leet("--summary", "--json", str(run)))
        (log,) = run.glob("run-*.wandb")
        records = [json.loads(x) for x in leet("--json", str(log)).splitlines() if x.strip()]
        rec = next(x for x in records if x["type"] == "run")["run"]
        assert rec["run_group"] == "beta-sweep"  # the sweep folder's name
        beta = summary["config"]["decode"]["knobs"]["beta"]  # the W&B config is the run identity
        assert summary["name"] == f"method.beta={beta}"  # the job's override
        betas[beta] = summary
        # the run's metrics equal what the job wrote to its own metrics.json
        metrics = json.loads((run.parents[1] / "metrics.json").read_text())  # that job's own results
        assert metrics["decode"] == summary["config"]["decode"] and metrics["encode"] == summary["config"]["encode"]
        assert summary["summary"]["mIoU"] == metrics["mIoU"]
        s = summary["summary"]
        assert s["per_class"]["_type"] == "table-file" and s["per_class"]["nrows"] == 2
        images = [v for v in s.values() if isinstance(v, dict) and v.get("_type") == "image-file" and "masks" in v]
        assert images and set(images[0]["masks"]) == {"prediction", "ground_truth"}
    assert sorted(betas) == [0.8, 1.6]


def test_wandb_sweep_yaml_drives_the_eval_entry_point():
    spec = yaml.safe_load((REPO / "conf" / "sweep_wandb.yaml").read_text())
    assert spec["metric"] == {"name": "mIoU", "goal": "maximize"}
    assert spec["command"] == ["${env}", "proxyclip-eval", "${args_no_hyphens}"]
    params = spec["parameters"]
    assert params["method.beta"]["values"] and params["method.gamma"]["values"]
    # what an agent would pass (key=value, as ${args_no_hyphens} does) composes against conf/eval.yaml:
    # every key exists and every value has the right type (the structured schema rejects typos)
    for beta in params["method.beta"]["values"]:
        for gamma in params["method.gamma"]["values"]:
            fixed = {k: v["value"] for k, v in params.items() if "value" in v}
            args = [f"{k}={v}" for k, v in fixed.items()] + [f"method.beta={beta}", f"method.gamma={gamma}"]
            cfg = compose_config("eval", args)
            assert cfg.method.beta == beta and cfg.method.gamma == gamma
            assert cfg.logger.name == "wandb" and cfg.logger.mode == "online"
            assert cfg.dataset.name == fixed["dataset"]
