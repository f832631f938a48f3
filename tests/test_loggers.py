"""proxyclip.loggers: W&B runs written offline and read back with W&B's own reader (`wandb leet`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from proxyclip.config import LoggerConfig
from proxyclip.loggers import NoOpLogger, WandbLogger, build_logger, image_to_uint8

WANDB = str(Path(sys.executable).with_name("wandb"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, silent, no git, no error reporting, every W&B folder under tmp_path."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "MPLBACKEND": "Agg",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def leet(*args: str) -> str:
    out = subprocess.run([WANDB, "leet", "inspect", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """(summary object, list of all records) of an offline run, via `wandb leet inspect`."""
    summary = json.loads(leet("--summary", "--json", run_dir))
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    records = [json.loads(line) for line in leet("--json", str(log_file)).splitlines() if line.strip()]
    return summary, records


def test_wandb_offline_run_holds_config_metrics_table_images(offline_wandb):
    import matplotlib.pyplot as plt

    cfg = OmegaConf.structured(LoggerConfig(name="wandb", mode="offline", dir=str(offline_wandb / "runs")))
    run_config = {"clip": {"name": "ViT-B-16"}, "method": {"beta": 1.2, "gamma": 3.0}}
    rng = np.random.default_rng(0)
    image = rng.random((3, 24, 32), dtype=np.float32)  # (3, H, W) in [0, 1], as Prediction.image
    pred = np.zeros((24, 32), np.int64)
    pred[:, 20:] = 2
    pred[:8, :] = 1
    gt = pred.copy()
    gt[0, 0] = 255  # ignore
    gt[10:, :5] = 2

    with build_logger(cfg, run_config, name="unit", group="grid-1", job_type="sweep") as log:
        assert isinstance(log, WandbLogger)
        log.log_metrics({"mIoU": 40.0, "aAcc": 80.0}, step=0)
        log.log_metrics({"mIoU": 42.5, "aAcc": 81.0}, step=1)
        log.log_table("per_class_iou", ["class", "IoU"], [["sky", np.float32(50.0)], ["person", 32.5]])
        log.log_segmentation("val/sample", image, pred, gt, ["sky", "person; people", "horse"])
        fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
        ax.imshow(np.eye(4))
        log.log_figure("attention", fig, close=True)
        run_dir = log.run_dir

    summary, records = read_run(run_dir)
    assert summary["state"] == "finished"
    assert summary["name"] == "unit"
    assert summary["config"]["method"] == {"beta": 1.2, "gamma": 3.0}
    assert summary["config"]["clip"]["name"] == "ViT-B-16"
    assert summary["summary"]["mIoU"] == 42.5  # latest value
    run_record = next(r for r in records if r["type"] == "run")["run"]
    assert run_record["run_group"] == "grid-1"
    assert run_record["job_type"] == "sweep"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["mIoU"] for h in history if "mIoU" in h] == [40.0, 42.5]

    # table: the file W&B wrote holds exactly our rows
    table = summary["summary"]["per_class_iou"]
    assert table["_type"] == "table-file" and table["nrows"] == 2
    data = json.loads((Path(run_dir) / "files" / table["path"]).read_text())
    assert data["columns"] == ["class", "IoU"]
    assert data["data"] == [["sky", 50.0], ["person", 32.5]]

    # segmentation: the image pixels and both masks decode back to what we logged
    seg = summary["summary"]["val/sample"]
    assert (seg["height"], seg["width"]) == (24, 32)
    pixels = np.asarray(Image.open(Path(run_dir) / "files" / seg["path"]).convert("RGB"))
    np.testing.assert_array_equal(pixels, image_to_uint8(image))
    masks = seg["masks"]
    for key, expected in (("prediction", pred), ("ground_truth", gt)):
        mask = np.asarray(Image.open(Path(run_dir) / "files" / masks[key]["path"]))
        np.testing.assert_array_equal(mask.astype(np.int64), expected)
    config_updates = [r["config"]["update"] for r in records if r["type"] == "config"]
    labels_cfg = config_updates[-1]["_wandb"]["mask/class_labels"]
    pred_labels = next(v["value"] for k, v in labels_cfg.items() if k.endswith("prediction"))
    gt_labels = next(v["value"] for k, v in labels_cfg.items() if k.endswith("ground_truth"))
    assert pred_labels == {"0": "sky", "1": "person", "2": "horse"}
    assert gt_labels["255"] == "ignore"

    # figure: an image of the figure's pixel size (2 x 1.5 inches at 50 dpi)
    figure = summary["summary"]["attention"]
    assert figure["_type"] == "image-file"
    assert (figure["width"], figure["height"]) == (100, 75)


def test_each_build_is_its_own_run(offline_wandb):
    cfg = {"name": "wandb", "mode": "offline", "dir": str(offline_wandb / "runs"), "group": "g"}
    dirs = []
    for i in range(2):
        with build_logger(cfg, {"i": i}) as log:
            log.log_metrics({"x": float(i)})
            dirs.append(log.run_dir)
    assert len(set(dirs)) == 2
    for i, d in enumerate(dirs):
        summary, records = read_run(d)
        assert summary["config"]["i"] == i
        assert summary["summary"]["x"] == float(i)
        assert next(r for r in records if r["type"] == "run")["run"]["run_group"] == "g"


def test_none_and_disabled_loggers_write_nothing(offline_wandb):
    target = offline_wandb / "nothing"
    for cfg in (
        OmegaConf.structured(LoggerConfig(name="none", dir=str(target))),
        {"name": "wandb", "mode": "disabled", "dir": str(target)},
        None,
    ):
        with build_logger(cfg, {"a": 1}) as log:
            assert isinstance(log, NoOpLogger)
            log.log_metrics({"a": 1.0}, step=0)
            log.log_table("t", ["a"], [[1]])
            log.log_segmentation("s", np.zeros((3, 4, 4)), np.zeros((4, 4), int), None, ["x"])
            log.log_figure("f", None)
        log.finish()  # twice is fine
    assert not target.exists()
    with pytest.raises(ValueError, match="unknown logger"):
        build_logger({"name": "tensorboard", "mode": "offline"})


def test_segmentation_shape_mismatch_is_an_error(offline_wandb):
    cfg = {"name": "wandb", "mode": "offline", "dir": str(offline_wandb / "runs")}
    with build_logger(cfg) as log:
        with pytest.raises(ValueError, match="does not match"):
            log.log_segmentation("s", np.zeros((3, 8, 8)), np.zeros((8, 9), int))


def test_image_to_uint8_layouts():
    chw = np.zeros((3, 2, 5), np.float32)
    chw[0] = 1.0  # red
    hwc = image_to_uint8(chw)
    assert hwc.shape == (2, 5, 3) and hwc.dtype == np.uint8
    assert (hwc[..., 0] == 255).all() and (hwc[..., 1:] == 0).all()
    np.testing.assert_array_equal(image_to_uint8(Image.fromarray(hwc)), hwc)
    np.testing.assert_array_equal(image_to_uint8(hwc), hwc)
    gray = image_to_uint8(np.full((4, 4), 0.5))
    assert gray.shape == (4, 4, 3) and (gray == 128).all()


@pytest.mark.slow
def test_hydra_multirun_jobs_are_grouped_by_sweep(offline_wandb, tmp_path):
    """Each Hydra multirun job builds its own run; the group is the sweep folder's name."""
    app = tmp_path / "app.py"
    app.write_text(
        "import os\nimport hydra\n"
        "from omegaconf import OmegaConf\n"
        "from proxyclip.loggers import build_logger\n"
        "@hydra.main(version_base='1.3', config_path=None, config_name=None)\n"
        "def main(cfg):\n"
        "    lg = OmegaConf.create({'name': 'wandb', 'mode': 'offline', 'dir': os.environ['RUNS_OUT']})\n"
        "    with build_logger(lg, {'beta': cfg.beta}) as log:\n"
        "        log.log_metrics({'beta_seen': cfg.beta})\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    out = tmp_path / "runs"
    sweep_dir = tmp_path / "multirun" / "my-sweep"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RUNS_OUT=str(out))
    proc = subprocess.run(
        [sys.executable, str(app), "-m", "+beta=1.0,1.5", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    seen = {}
    for d in runs:
        summary, records = read_run(str(d))
        run = next(r for r in records if r["type"] == "run")["run"]
        assert run["run_group"] == "my-sweep"
        seen[summary["name"]] = summary["summary"]["beta_seen"]
    assert seen == {"+beta=1.0": 1.0, "+beta=1.5": 1.5}
