"""torchrun with 2 CPU processes (gloo): sharded images, summed confusion matrices, same metrics."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fixtures_datasets import make_voc
from fixtures_eval import PYTHON, REPO, TINY_EVAL, subprocess_env


@pytest.mark.slow
def test_torchrun_two_processes_equals_single_process(tmp_path):
    make_voc(tmp_path, n=5)
    args = ["dataset=voc20", f"data_root={tmp_path}", *TINY_EVAL]
    single = subprocess.run([PYTHON, "-m", "proxyclip.cli.evaluate", *args, f"hydra.run.dir={tmp_path / 'single'}"],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    dist = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "proxyclip.cli.evaluate", *args,
                           f"hydra.run.dir={tmp_path / 'dist'}"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert "2 process(es)" in dist.stdout
    a = json.loads((tmp_path / "single" / "metrics.json").read_text())
    b = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert b["num_images"] == a["num_images"] == 5 and b["num_pixels"] == a["num_pixels"]
    for key in ("mIoU", "aAcc", "mAcc"):
        assert b[key] == a[key]
    assert [r["IoU"] for r in b["per_class"]] == [r["IoU"] for r in a["per_class"]]
    # each process counted its own share: disjoint, together every image once
    r0 = torch.load(tmp_path / "dist" / "state" / "rank0-of-2.pt", weights_only=False)["done"]
    r1 = torch.load(tmp_path / "dist" / "state" / "rank1-of-2.pt", weights_only=False)["done"]
    assert len(r0) == 3 and len(r1) == 2 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == [f"2007_{i:06d}" for i in range(5)]


def test_stray_rank_run_dir_is_removed_only_when_empty_of_results(tmp_path):
    from proxyclip.evaluation.app import _remove_stray_run_dir

    stray = tmp_path / "stray"
    (stray / ".hydra").mkdir(parents=True)
    (stray / ".hydra" / "config.yaml").write_text("x: 1")
    (stray / "evaluate.log").write_text("")
    _remove_stray_run_dir(stray)
    assert not stray.exists()
    kept = tmp_path / "kept"
    (kept / ".hydra").mkdir(parents=True)
    (kept / "metrics.json").write_text("{}")
    _remove_stray_run_dir(kept)
    assert (kept / "metrics.json").exists()


@pytest.mark.slow
def test_killed_torchrun_resumes_on_one_process(tmp_path, eval_segmenter):
    from fixtures_eval import eval_cfg

    from proxyclip.evaluation import evaluate

    make_voc(tmp_path, n=5)
    full = evaluate(eval_cfg("voc20", tmp_path), run_dir=tmp_path / "full", seg=eval_segmenter)
    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    run_dir = tmp_path / "dist"
    # each rank SIGKILLs itself in the middle of its second image
    dist = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "kill_after.py"), "1",
                           "dataset=voc20", f"data_root={tmp_path}", *TINY_EVAL, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert dist.returncode != 0 and not (run_dir / "metrics.json").exists()
    done = [torch.load(p, weights_only=False)["done"] for p in sorted((run_dir / "state").glob("rank*-of-2.pt"))]
    assert 1 <= sum(map(len, done)) <= 2  # at most one image per rank got saved
    resumed = evaluate(eval_cfg("voc20", tmp_path), run_dir=run_dir, seg=eval_segmenter)
    assert resumed["num_images"] == 5 and resumed["num_pixels"] == full["num_pixels"]
    assert resumed["mIoU"] == full["mIoU"] and resumed["aAcc"] == full["aAcc"]
    mine = torch.load(run_dir / "state" / "rank0-of-1.pt", weights_only=False)["done"]
    assert not set(mine) & {i for d in done for i in d} and len(mine) + sum(map(len, done)) == 5
