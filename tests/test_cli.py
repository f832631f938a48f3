"""proxyclip-segment writes its files; multirun works; bad input is a one-line error."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image


def run_cli(tmp_path, *args, multirun=False):
    cmd = [sys.executable, "-m", "proxyclip.cli.segment", *(["-m"] if multirun else []), *TINY, *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_segment_writes_outputs(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "run"
    r = run_cli(tmp_path, f"image={tmp_path / 'in.png'}", "classes=[sky,'person; people',horse]",
                "method.gamma=2.5", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    labels = Image.open(out / "labels.png")
    assert labels.mode == "P" and labels.size == (70, 50)
    lab = np.asarray(labels)
    assert lab.max() <= 2
    assert Image.open(out / "overlay.png").size[0] > 100
    shares = json.loads((out / "shares.json").read_text())
    assert list(shares["shares"]) == ["sky", "person; people", "horse"]
    for k, name in enumerate(shares["shares"]):
        assert abs(shares["shares"][name] - float((lab == k).mean())) < 1e-9
    assert shares["random_weights"] is True and shares["decode"]["knobs"]["gamma"] == 2.5
    assert shares["encode"]["vfm"]["name"] == "test_tiny" and shares["encode"]["weights"] == {"source": "random", "seed": 0}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"]["gamma"] == 2.5 and cfg["vfm"]["name"] == "test_tiny"


@pytest.mark.slow
def test_segment_multirun(tmp_path):
    r = run_cli(tmp_path, "method.gamma=2.0,4.0", "classes=[a,b]", f"hydra.sweep.dir={tmp_path / 'multi'}",
                multirun=True)
    assert r.returncode == 0, r.stderr
    gammas = sorted(json.loads((tmp_path / "multi" / str(i) / "shares.json").read_text())["decode"]["knobs"]["gamma"]
                    for i in range(2))
    assert gammas == [2.0, 4.0]


@pytest.mark.slow
def test_segment_bad_input_is_one_clear_line(tmp_path):
    r = run_cli(tmp_path, f"image={tmp_path / 'missing.jpg'}", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 2
    assert "error: image file not found" in r.stderr and "missing.jpg" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path, "classes=[]", f"hydra.run.dir={tmp_path / 'y'}")
    assert r.returncode == 2 and "class list is empty" in r.stderr


@pytest.mark.slow
def test_segment_logs_to_offline_wandb(tmp_path):
    from test_loggers import read_run

    out = tmp_path / "run"
    r = run_cli(tmp_path, "classes=[sky,'grass; lawn']", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    summary, records = read_run(str(run_dir))
    assert summary["state"] == "finished"
    assert summary["summary"]["random_weights"] is True
    # the shares table holds exactly the rows of shares.json
    shares = json.loads((out / "shares.json").read_text())["shares"]
    table = json.loads((run_dir / "files" / summary["summary"]["shares"]["path"]).read_text())
    assert table["columns"] == ["class", "share"]
    assert [row[0] for row in table["data"]] == list(shares) == ["sky", "grass; lawn"]
    assert [row[1] for row in table["data"]] == pytest.approx(list(shares.values()))
    # the mask is the labels.png map, its class labels the display names
    seg = summary["summary"]["segmentation"]
    mask = np.asarray(Image.open(run_dir / "files" / seg["masks"]["prediction"]["path"]))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(out / "labels.png")))
    labels_cfg = [r["config"]["update"] for r in records if r["type"] == "config"][-1]["_wandb"]["mask/class_labels"]
    assert next(v["value"] for k, v in labels_cfg.items() if k.endswith("prediction")) == {"0": "sky", "1": "grass"}
    overlay = summary["summary"]["overlay"]
    assert overlay["_type"] == "image-file" and overlay["width"] > 100
