"""The Hydra entry points as users run them: errors, multirun + summary, and a run killed mid-way then resumed."""

import json
import subprocess

import pytest
import torch
from fixtures_datasets import make_voc
from fixtures_eval import PYTHON, REPO, TINY_EVAL, subprocess_env


def _run(args, timeout=240, **env):
    return subprocess.run([PYTHON, *args], cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_missing_dataset_root_exits_2_naming_the_path(tmp_path):
    r = _run(["-m", "proxyclip.cli.evaluate", "dataset=cityscapes", f"data_root={tmp_path}", *TINY_EVAL,
              f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2, r.stderr
    assert f"{tmp_path / 'cityscapes'}" in r.stderr and "csCreateTrainIdLabelImgs" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_multirun_over_datasets_then_summary(tmp_path):
    make_voc(tmp_path, n=2)
    mr = tmp_path / "mr"
    # context60 has no data here: that job reports its error and the others still run
    r = _run(["-m", "proxyclip.cli.evaluate", "-m", "dataset=voc21,context60,voc20", f"data_root={tmp_path}",
              *TINY_EVAL, f"hydra.sweep.dir={mr}"], timeout=400)
    assert r.returncode == 2, r.stderr[-3000:]  # at the end, naming the failed job
    assert r.stderr.strip().splitlines()[-1].startswith("proxyclip-eval: error: 1 of 3 jobs failed: #1 dataset=context60")
    assert (mr / "0_voc21" / "metrics.json").is_file() and (mr / "2_voc20" / "metrics.json").is_file()
    assert "VOC2010" in (mr / "1_context60" / "error.txt").read_text()
    voc21 = json.loads((mr / "0_voc21" / "metrics.json").read_text())["mIoU"]
    s = _run(["-m", "proxyclip.cli.summary", str(mr)])
    assert s.returncode == 0, s.stderr
    lines = s.stdout.splitlines()
    assert "| method | CLIP | VFM | setting | VOC21 | VOC20 | avg |" in lines
    row = next(ln for ln in lines if ln.startswith("| proxyclip"))
    assert f"| {voc21:.1f} |" in row
    note = next(ln for ln in lines if ln.startswith("- All runs:"))
    assert "weights.source=random" in note  # what every row shares, said once
    assert (mr / "summary.md").read_text().splitlines()[:4] == lines[:4]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    make_voc(tmp_path, n=5)
    base = ["-m", "proxyclip.cli.evaluate", "dataset=voc20", f"data_root={tmp_path}", *TINY_EVAL]
    full = _run(base + [f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "killed"
    # SIGKILL after 2 images are saved, in the middle of the third (decoded, not yet saved)
    killed = _run([str(REPO / "tests" / "kill_after.py"), "2", *base[2:], f"hydra.run.dir={run_dir}"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    state = torch.load(run_dir / "state" / "rank0-of-1.pt", weights_only=False)
    assert len(state["done"]) == 2
    assert int(state["cm"].sum()) > 0

    resumed = _run(base + [f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "2 images already counted" in resumed.stdout
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert b["num_images"] == a["num_images"] == 5
    assert b["num_pixels"] == a["num_pixels"]  # no image counted twice or lost
    for key in ("mIoU", "aAcc", "mAcc"):
        assert b[key] == a[key]
    assert [r["IoU"] for r in b["per_class"]] == [r["IoU"] for r in a["per_class"]]
    final = torch.load(run_dir / "state" / "rank0-of-1.pt", weights_only=False)
    assert sorted(final["done"]) == sorted(set(final["done"])) and len(final["done"]) == 5


@pytest.mark.slow
def test_sweep_command_writes_the_tidy_table(tmp_path):
    make_voc(tmp_path, n=2)
    r = _run(["-m", "proxyclip.cli.sweep", "dataset=voc20", f"data_root={tmp_path}", *TINY_EVAL,
              "sweep.beta=[1.0,1.2]", "sweep.gamma=[2,3,4]", f"hydra.run.dir={tmp_path / 'sw'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "sw" / "sweep.csv").read_text().splitlines()
    assert rows[0] == "beta,gamma,mIoU,aAcc,mAcc" and len(rows) == 1 + 6
    assert "best mIoU" in r.stdout
    best = json.loads((tmp_path / "sw" / "sweep.json").read_text())["best"]
    assert best["mIoU"] == max(p["mIoU"] for p in json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"])
