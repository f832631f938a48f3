# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Sweeps: gamma x beta on a small labeled set, logged to W&B
#
# The data: a folder in the `custom` dataset format (`images/`, `labels/` with class-index PNGs,
# 255 = ignore, and `classes.txt`, one class a line). Set `DATA_ROOT` to your own; by default a
# small synthetic set (sky, grass, sun, a red car) is generated.
#
# `proxyclip.evaluation.sweep` encodes every image once and decodes it for every grid point,
# accumulating one confusion matrix per point: a 50-point sweep costs about one encode per
# image plus 50 decodes. With `logger=wandb` the sweep is one W&B run (config, a table of all
# points, the mIoU of each point, the best point, a heatmap); `WANDB_MODE=offline` writes it to
# disk for a later `wandb sync`.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models, 3 images of 64 pixels, a 2x2 grid.

# %% tags=["parameters"]
SMOKE = None
DATA_ROOT = None  # a folder in the custom format; None = generate the synthetic set
BETAS = [1.0, 1.2, 1.4, 1.6]
GAMMAS = [2.0, 3.0, 4.0, 5.0]
WANDB_MODE = None  # online | offline | disabled; None = $WANDB_MODE, else offline
GROUP = "gamma-beta-grid"

# %%
# %matplotlib inline
import json
import tempfile
from pathlib import Path

import numpy as np
from _workbench import core_overrides, labeled_set_root, smoke_mode, wandb_overrides

from proxyclip import Segmenter, compose_config, viz
from proxyclip.data import build_dataset
from proxyclip.evaluation import sweep

SMOKE = smoke_mode(SMOKE)
if SMOKE:
    BETAS, GAMMAS = [1.0, 1.4], [2.0, 4.0]
root = labeled_set_root(SMOKE, DATA_ROOT)
print("data:", root, "| classes:", (root / "classes.txt").read_text().split("\n")[:-1])

# %% [markdown]
# ## The config
# The same Hydra config the `proxyclip-sweep` command composes (`conf/sweep.yaml`).

# %%
overrides = core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}", f"sweep.beta={BETAS}",
                                     f"sweep.gamma={GAMMAS}", "progress=false", "log_images=2"]
overrides += wandb_overrides(SMOKE, WANDB_MODE, group=GROUP)
cfg = compose_config("sweep", overrides)
print("\n".join(overrides))

# %%
seg = Segmenter.from_config(cfg)
dataset = build_dataset(cfg.dataset)
run_dir = Path(tempfile.mkdtemp(prefix="proxyclip-sweep-"))
result = sweep(cfg, run_dir=run_dir, seg=seg, dataset=dataset)
print("best:", result["best"])

# %% [markdown]
# ## mIoU over the grid

# %%
miou = np.full((len(BETAS), len(GAMMAS)), np.nan)
for p in result["points"]:
    miou[BETAS.index(p["beta"]), GAMMAS.index(p["gamma"])] = p["mIoU"]
viz.plot_sweep_heatmap(miou, BETAS, GAMMAS, row_name="beta", col_name="gamma", metric="mIoU")

# %% [markdown]
# Per-class IoU at the best point, and what the best point looks like on one image next to the
# ground truth:

# %%
best = result["best"]
best_point = next(p for p in result["points"] if all(p[k] == best[k] for k in ("beta", "gamma")))
print(json.dumps(best_point["IoU"], indent=1))
img, gt = dataset[0]
params = {k: best[k] for k in ("beta", "gamma", "logit_scale", "prob_thd")}
pred = seg.predict(img, dataset.class_names, **params)
viz.plot_segmentation(pred.image, pred.labels, dataset.class_names, gt_labels=gt,
                      title=f"beta={best['beta']:g} gamma={best['gamma']:g}")

# %% [markdown]
# ## Where the W&B run is
# Offline runs are folders under `logger.dir` (default `./wandb`); upload them later with
# `wandb sync <folder>`. The files `sweep.csv`, `sweep_per_class.csv` and `sweep.json` in the run
# directory hold the same numbers.

# %%
wandb_root = Path(cfg.logger.dir or ".") / "wandb"
runs = sorted(wandb_root.glob("offline-run-*")) if cfg.logger.mode == "offline" else []
print("run directory:", run_dir, sorted(p.name for p in run_dir.iterdir()))
for r in runs:
    print("W&B offline run:", r, "-> wandb sync", r)

# %% [markdown]
# ## The same sweep from the command line
# One run per grid point, each its own W&B run, grouped by the sweep (Hydra multirun; the basic
# sweeper runs the points one after another, each re-encoding - prefer `proxyclip-sweep` above
# for speed, or the Optuna sweeper for a search):
#
# ```bash
# proxyclip-eval -m dataset=custom dataset.root=DATA logger=wandb logger.mode=offline \
#     method.beta=1.0,1.2,1.4,1.6 method.gamma=2,3,4,5
# wandb sync multirun/eval/*/*/wandb/offline-run-*      # later, when online
# ```
#
# Online, a W&B sweep drives the same entry point: `wandb sweep conf/sweep_wandb.yaml`, then
# `wandb agent ENTITY/PROJECT/SWEEP_ID`.
