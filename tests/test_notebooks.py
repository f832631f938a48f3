"""The workbench notebooks: paired with their py:percent files, committed without outputs, and
executed top to bottom in smoke mode (PROXYCLIP_SMOKE=1: tiny random models), checking what they made."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from proxyclip.methods import METHODS

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.py"))  # the notebooks, from the folder
WANDB = str(Path(sys.executable).with_name("wandb"))
CHECKS = {}  # notebook name -> the check of its smoke run (every notebook needs one)
FAST = {"06_method_zoo"}  # the one run outside the slow marker (the quick suite's representative)


def checks(name):
    def register(fn):
        CHECKS[name] = fn
        return fn

    return register


def test_every_notebook_is_paired_and_has_no_outputs():
    assert NAMES and sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        py = jupytext.read(NOTEBOOKS / f"{name}.py")
        assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
        # same cells, same sources: the .py is the diff-friendly twin of the .ipynb
        assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells], name
        for cell in ipynb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: committed outputs"
        tagged = [c for c in ipynb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "SMOKE = None" in tagged[0].source, f"{name}: parameters cell"


def execute(name: str, tmp_path: Path, **env: str) -> nbformat.NotebookNode:
    """Run the notebook in a kernel whose temp folder (TMPDIR) is ``tmp_path/"tmp"``: what it leaves there can be seen."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    saved = dict(os.environ)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    os.environ.update({"TMPDIR": str(tmp_path / "tmp"), "PROXYCLIP_SMOKE": "1", "PROXYCLIP_WANDB_DIR": str(tmp_path / "wandb"),
                       "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_ERROR_REPORTING": "false", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
                       "HF_HUB_OFFLINE": "1", **env})
    os.environ.pop("MPLBACKEND", None)  # the notebooks use the inline backend, as in Jupyter
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def outputs(nb, kind: str):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def text_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def leet_summary(run_dir: Path) -> dict:
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def leet_records(run_dir: Path) -> list:
    (log,) = run_dir.glob("run-*.wandb")
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@checks("01_quickstart")
def check_quickstart(nb, tmp_path):
    assert "smoke mode" in text_of(nb)
    assert len(outputs(nb, "image/png")) >= 3  # segmentation, score maps, gamma=6
    widgets = outputs(nb, "application/vnd.jupyter.widget-view+json")
    assert len(widgets) == 1  # the explorer, as the last cell's value
    assert nb.cells[-1].outputs[-1]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]


@checks("02_attention_maps")
def check_attention_maps(nb, tmp_path):
    assert len(outputs(nb, "image/png")) == 4  # VFMs, gamma x beta, stages, baseline comparison
    (run,) = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    s = leet_summary(run)["summary"]
    for key in ("attention/vfms", "attention/gamma_beta", "attention/stages"):
        assert s[key]["_type"] == "image-file" and (run / "files" / s[key]["path"]).stat().st_size > 1000
    assert set(s["segmentation/proxyclip"]["masks"]) == {"prediction"}


@checks("03_sweeps")
def check_sweeps_logs_the_grid_to_wandb(nb, tmp_path):
    assert len(outputs(nb, "image/png")) == 3  # heatmap, best-point segmentation, the one-axis line
    (run,) = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))  # the second sweep is not logged
    summary = leet_summary(run)
    assert summary["config"]["dataset"] == "custom"
    axes = summary["config"]["sweep_axes"]
    assert axes == ["beta", "gamma"]  # the notebook's SWEEP
    s = summary["summary"]
    table = json.loads((run / "files" / s["sweep"]["path"]).read_text())
    assert table["columns"] == axes + ["mIoU", "aAcc", "mAcc"]  # the swept keys, then the metrics
    grid = {a: sorted({float(row[i]) for row in table["data"]}) for i, a in enumerate(axes)}
    assert grid == {"beta": [1.0, 1.4], "gamma": [2.0, 4.0]}  # the smoke grid, every point once
    assert s["sweep"]["_type"] == "table-file" and s["sweep"]["nrows"] == math.prod(len(v) for v in grid.values())
    best_row = max(table["data"], key=lambda r: r[table["columns"].index("mIoU")])
    assert s["best_mIoU"] == pytest.approx(best_row[table["columns"].index("mIoU")])
    assert [s[f"best_{a}"] for a in axes] == pytest.approx(best_row[:len(axes)])
    assert s["mIoU_" + "_".join(axes)]["_type"] == "image-file"
    run_rec = next(r for r in leet_records(run) if r["type"] == "run")["run"]
    assert run_rec["run_group"] == "gamma-beta-grid"


def vfm_of(config: dict) -> str:
    """The VFM of a run's W&B config (its encode spec; none = no VFM)."""
    vfm = config["encode"]["vfm"]
    return "none" if vfm in (None, "none") else vfm["name"]


@checks("04_backbone_ablation")
def check_backbone_ablation_one_run_per_pair_grouped(nb, tmp_path):
    assert len(outputs(nb, "image/png")) == 2  # CLIP x VFM, VFM (feature) x layer
    assert len(outputs(nb, "application/vnd.jupyter.widget-view+json")) == 1  # the layer/feature sliders
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # test_tiny x {test_tiny, none} + the summary run
    by_job = {}
    for run in runs:
        rec = next(r for r in leet_records(run) if r["type"] == "run")["run"]
        assert rec["run_group"] == "clip-x-vfm"
        by_job.setdefault(rec.get("job_type"), []).append((run, leet_summary(run)))
    assert len(by_job["eval"]) == 2 and len(by_job["summary"]) == 1
    vfms = sorted(vfm_of(s["config"]) for _, s in by_job["eval"])
    assert vfms == ["none", "test_tiny"]
    run, summary = by_job["summary"][0]
    table = json.loads((run / "files" / summary["summary"]["ablation"]["path"]).read_text())
    mious = {row[1]: row[2] for row in table["data"]}
    for _, s in by_job["eval"]:  # the summary table holds the numbers each pair's run logged
        assert mious[vfm_of(s["config"])] == pytest.approx(s["summary"]["mIoU"])
    layers = json.loads((run / "files" / summary["summary"]["layers"]["path"]).read_text())
    by_setting = {(row[1], row[2]): row[3] for row in layers["data"]}
    assert set(by_setting) == {("tokens", -1), ("tokens", -2), ("k", -1), ("k", -2)}
    # the last layer's tokens, with CLIP reused from another encode, = the full evaluation of that pair
    assert by_setting["tokens", -1] == pytest.approx(mious["test_tiny"])
    assert by_setting["tokens", -2] != pytest.approx(by_setting["tokens", -1])


@checks("05_hooks_tour")
def check_hooks_tour(nb, tmp_path):
    text = text_of(nb)
    for name in ["vfm.features", "proxy.attention", "scores.image"]:
        assert name in text
    assert "ground-truth affinity (ceiling)" in text
    assert len(outputs(nb, "image/png")) == 3


@checks("06_method_zoo")
def check_method_zoo(nb, tmp_path):
    assert len(outputs(nb, "image/png")) == 2  # segmentations side by side, attention of one patch
    (run,) = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    s = leet_summary(run)["summary"]
    table = json.loads((run / "files" / s["methods"]["path"]).read_text())
    methods = [row[0] for row in table["data"]]
    # every registered method (read from the registry: a new one is in the table by itself) but those reading
    # mask proposals, which are named as left out, then NACLIP with PAMR
    assert methods == [m for m, meth in METHODS.items() if not meth.needs_masks] + ["naclip+pamr"]
    text = text_of(nb)
    left_out = text.split("left out, they read mask proposals (docs/regions.md): ")[1].splitlines()[0]
    assert left_out == (", ".join(m for m, meth in METHODS.items() if meth.needs_masks) or "none")
    # the attention figure: the window-level methods recording an attention.pattern; the others are named
    no_pattern = text.split("no attention pattern of their own: ")[1].splitlines()[0]
    for name, meth in METHODS.items():
        if meth.level == "image" and not meth.needs_masks:
            assert f"{name} (image-level)" in no_pattern
    assert "scclip (runs its own last block)" in no_pattern and "proxyclip" not in no_pattern
    best = max(table["data"], key=lambda r: r[1])
    assert s["best_method"] == best[0] and s["best_mIoU"] == pytest.approx(best[1])
    for key in ("segmentations", "attention_of_one_patch"):
        assert s[key]["_type"] == "image-file"


@checks("07_inside_clip")
def check_inside_clip(nb, tmp_path):
    assert len(outputs(nb, "image/png")) == 3  # attention by block, residual norms, logit lens
    text = text_of(nb)
    gap = float(text.split("hooked vs recomputed attention: max |diff| ")[1].split()[0])
    assert gap < 1e-5  # the hooked patterns equal those recomputed from the layer parts
    (run,) = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    s = leet_summary(run)["summary"]
    blocks = s["blocks"]
    assert blocks == 2  # the tiny CLIP
    table = json.loads((run / "files" / s["residual_norms"]["path"]).read_text())
    assert [r[0] for r in table["data"]] == ["block 0 input", "block 1 input", "block 1 output"]
    for row in table["data"]:  # the top-k list holds TOP_K distinct patch indices
        assert len(set(row[4].split(", "))) == 5 and row[3] >= row[2] > 0
    assert s["lens_agreement/block_1"] == pytest.approx(1.0)  # the last block's lens is vanilla CLIP
    for key in ("attention_by_block", "norms_by_block", "logit_lens"):
        assert s[key]["_type"] == "image-file"


@checks("08_regions")
def check_regions(nb, tmp_path):
    # mask proposals, CorrCLIP's regions, LPOSS's graph, the methods side by side (docs/regions.md)
    assert len(outputs(nb, "image/png")) == 4
    assert len(outputs(nb, "application/vnd.jupyter.widget-view+json")) == 1  # the patch sliders
    text = text_of(nb)
    assert "merge recomputed from the labels equals the corrclip.regions hook: True" in text
    (run,) = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    s = leet_summary(run)["summary"]
    # 1. the smoke proposals are k-means colour clusters (k = 6): they cover every pixel
    assert 1 <= s["proposals"] <= 6 and s["coverage"] == pytest.approx(1.0)
    # 2. per window, merging only joins labels: 1 <= regions after <= labels before <= proposals + padding
    regions = json.loads((run / "files" / s["regions"]["path"]).read_text())
    assert regions["columns"] == ["window", "labels_before", "regions_after"]
    windows = [row[0] for row in regions["data"]]
    assert windows == list(range(len(windows))) and len(windows) >= 2  # the smoke image has overlapping windows
    for _, before, after in regions["data"]:
        assert 1 <= after <= before <= s["proposals"] + 1
        if before <= 2:  # CorrCLIP merges only windows with more than two labels
            assert after == before
    assert s["merge_matches_hook"] is True
    # 3. the graph: every window's 4 x 4 VFM patches; a patch's row holds its k - 1 other nearest at least
    assert s["graph_patches"] == 16 * len(windows) and 0 <= s["graph_patch"] < s["graph_patches"]
    assert s["lposs_k"] == 8 and s["lposs_k"] - 1 <= s["graph_neighbours"] <= s["graph_patches"] - 1
    assert 1 <= s["graph_windows"] <= len(windows)
    # 4. every image-level or mask-reading method of the registry, in registration order, each decoding
    # the one encode (its CLIP and VFM parts the same tensors), with its decode time and a label map
    table = json.loads((run / "files" / s["methods"]["path"]).read_text())
    assert table["columns"] == ["method", "decode_s", "one_encode", "classes_present"]
    assert [r[0] for r in table["data"]] == [m for m, meth in METHODS.items() if meth.level == "image" or meth.needs_masks]
    assert {"corrclip", "lposs", "lposs_plus", "trident", "cliper"} <= {r[0] for r in table["data"]}
    for name, secs, one_encode, present in table["data"]:
        assert secs > 0 and one_encode is True and 1 <= present <= 5, name
    for key in ("mask_proposals", "corrclip_regions", "lposs_graph", "segmentations"):
        assert s[key]["_type"] == "image-file" and (run / "files" / s[key]["path"]).stat().st_size > 1000


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NAMES])
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    """Every notebook of the folder runs top to bottom and passes its check (a new notebook needs one)."""
    assert name in CHECKS, f"notebooks/{name}.py has no check in tests/test_notebooks.py: add a @checks({name!r}) one"
    nb = execute(name, tmp_path)
    CHECKS[name](nb, tmp_path)
    assert random_marks(nb), f"{name}: a figure without the random-weights band (smoke mode runs random weights)"
    left = sorted(p.name for p in (tmp_path / "tmp").glob("proxyclip-*"))
    assert left == [], f"{name} left temporary folders behind: {left}"


def random_marks(nb) -> bool:
    """Whether the notebook's figures carry the random-weights band: read the red text back from its PNGs."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pngs = [o["data"]["image/png"] for o in outputs(nb, "image/png")]
    assert pngs
    for data in pngs:
        rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
        band = rgb[: max(8, rgb.shape[0] // 8)]
        if not (np.abs(band - (192, 0, 0)).max(-1) < 12).any():  # the banner colour (#c00000), no palette colour
            return False
    return True


def test_workbench_scratch_folders_are_deleted_at_exit(tmp_path):
    """The synthetic set, smoke-mode W&B folder and scratch folders of a kernel are gone once it exits."""
    (tmp_path / "tmp").mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _workbench as wb\n"
            "root = wb.labeled_set_root(True); wandb = [o for o in wb.wandb_overrides(True) if 'dir=' in o]\n"
            "extra = wb.scratch_dir('proxyclip-sweep-')\n"
            "assert (root / 'classes.txt').is_file() and extra.is_dir() and len(wandb) == 1\n"
            "print(root, wandb[0].split('=', 1)[1], extra)\n")
    env = {k: v for k, v in os.environ.items() if k != "PROXYCLIP_WANDB_DIR"}
    out = subprocess.run([sys.executable, "-c", code, str(NOTEBOOKS)], capture_output=True, text=True, timeout=120,
                         env={**env, "TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 0, out.stderr
    made = [Path(p) for p in out.stdout.split()]
    assert len(made) == 3 and all(p.parent == tmp_path / "tmp" for p in made)
    assert sorted(p.name.split("-")[1] for p in made) == ["shapes", "sweep", "wandb"]
    assert list((tmp_path / "tmp").iterdir()) == []  # all deleted when the process ended


def test_workbench_colour_proposals_find_flat_colour_blocks():
    """_workbench.colour_proposals (notebook 08's masks=file proposals): on an image of four flat
    colours plus noise, k = 4 gives back exactly the four blocks, and the masks partition the image."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import _workbench as wb
    finally:
        sys.path.remove(str(NOTEBOOKS))
    import numpy as np
    import torch

    truth = np.zeros((24, 32), np.int64)
    truth[:12, 16:], truth[12:, :10], truth[12:, 10:] = 1, 2, 3
    colours = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.95, 0.9, 0.2]])
    g = torch.Generator().manual_seed(1)
    image = (colours[torch.from_numpy(truth)].permute(2, 0, 1) + 0.02 * torch.randn(3, 24, 32, generator=g)).clamp(0, 1)
    masks = wb.colour_proposals(image, k=4)
    assert masks.dtype == bool and masks.shape[1:] == (24, 32)
    assert (masks.sum(0) == 1).all()  # every pixel in exactly one proposal
    assert len(masks) == 4
    for m in masks:  # each proposal is one of the blocks, exactly
        assert any(np.array_equal(m, truth == c) for c in range(4))
