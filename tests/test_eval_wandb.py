"""Evaluation and sweep results reach W&B (offline run, read back with `wandb leet inspect`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_datasets import make_voc
from fixtures_eval import eval_cfg

from proxyclip.evaluation import evaluate, sweep

WANDB = str(Path(sys.executable).with_name("wandb"))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                 "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_CODE": "true",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wcfg"), "WANDB_CACHE_DIR": str(tmp_path / "wcache"),
                 "WANDB_DATA_DIR": str(tmp_path / "wdata")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _summary(wandb_dir: Path) -> dict:
    (run_dir,) = list(wandb_dir.rglob("offline-run-*"))
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _find(obj, key):
    """The value of ``key`` anywhere in a nested summary object."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_eval_metrics_logged_to_offline_wandb(offline, eval_segmenter):
    make_voc(offline, n=2)
    cfg = eval_cfg("voc21", offline, "logger=wandb", "logger.mode=offline", f"logger.dir={offline / 'w1'}",
                   "log_images=1")
    out = evaluate(cfg, run_dir=offline / "run", seg=eval_segmenter)
    summary = _summary(offline / "w1")
    assert _find(summary, "mIoU") == pytest.approx(out["mIoU"])
    assert _find(summary, "aAcc") == pytest.approx(out["aAcc"])
    # class 0 (26 background words) is "background" in the metrics, the W&B keys and the CSV
    iou_keys = sorted(k for k in summary["summary"] if k.startswith("IoU/"))
    assert "IoU/background" in iou_keys and "IoU/sky" not in iou_keys and len(iou_keys) == 21, " ".join(iou_keys)
    assert out["per_class"][0]["class"] == "background"
    assert (offline / "run" / "per_class.csv").read_text().splitlines()[1].startswith("0,background,")


def test_sweep_best_point_logged(offline, eval_segmenter):
    make_voc(offline, n=2)
    cfg = eval_cfg("voc21", offline, "sweep.beta=[1.0,1.4]", "sweep.gamma=[2.0,3.0]", "logger=wandb",
                   "logger.mode=offline", f"logger.dir={offline / 'w2'}", config_name="sweep")
    out = sweep(cfg, run_dir=offline / "run", seg=eval_segmenter)
    summary = _summary(offline / "w2")
    assert _find(summary, "best_mIoU") == pytest.approx(out["best"]["mIoU"])
    assert _find(summary, "best_beta") == out["best"]["values"]["beta"]
    assert _find(summary, "best_gamma") == out["best"]["values"]["gamma"]
