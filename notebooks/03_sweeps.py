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
# # 3. Sweeps: any knob on a small labeled set, logged to W&B
#
# The data: a folder in the `custom` dataset format (`images/`, `labels/` with class-index PNGs,
# 255 = ignore, and `classes.txt`, one class a line). Set `DATA_ROOT` to your own; by default a
# small synthetic set (sky, grass, sun, a red car) is generated.
#
# `proxyclip.evaluation.sweep` encodes every image once and decodes it for every grid point,
# accumulating one confusion matrix per point: a 50-point sweep costs about one encode per
# image plus 50 decodes. Any declared knob of the method can be an axis (`sweep.<knob>=[...]`:
# its own knobs, the `residual`/`ffn` switches, `logit_scale`, `prob_thd`, and the post-process's
# settings as `sweep.postprocess.<setting>`). With `logger=wandb` the sweep is one W&B run
# (config, a table of all points, the mIoU of each point, the best point, a heatmap over two
# axes or a line over one); `WANDB_MODE=offline` writes it to disk for a later `wandb sync`.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models, 3 images of 64 pixels, a 2x2 grid.

# %% tags=["parameters"]
SMOKE = None
DATA_ROOT = None  # a folder in the custom format; None = generate the synthetic set
METHOD = "proxyclip"
SWEEP = {"beta": [1.0, 1.2, 1.4, 1.6], "gamma": [2.0, 3.0, 4.0, 5.0]}  # {knob: values}, any knob of METHOD
LINE_METHOD = "naclip"  # a second, one-axis sweep of another method's knob (not logged)
LINE_SWEEP = {"gaussian_std": [1.0, 3.0, 5.0, 7.0]}
WANDB_MODE = None  # online | offline | disabled; None = $WANDB_MODE, else offline
GROUP = "gamma-beta-grid"

# %%
# %matplotlib inline
import json
from pathlib import Path

import numpy as np
from _workbench import core_overrides, labeled_set_root, marked, scratch_dir, smoke_mode, wandb_overrides

from proxyclip import Segmenter, compose_config, viz
from proxyclip.data import build_dataset
from proxyclip.evaluation import sweep
from proxyclip.methods import get_method

SMOKE = smoke_mode(SMOKE)
if SMOKE:
    SWEEP = {k: v[::2][:2] for k, v in SWEEP.items()}
    LINE_SWEEP = {k: v[:2] for k, v in LINE_SWEEP.items()}
root = labeled_set_root(SMOKE, DATA_ROOT)
print("data:", root, "| classes:", (root / "classes.txt").read_text().split("\n")[:-1])
print(f"knobs of {METHOD} a sweep may take:", ", ".join(k.name for k in get_method(METHOD).all_knobs))

# %% [markdown]
# ## The config
# The same Hydra config the `proxyclip-sweep` command composes (`conf/sweep.yaml`).

# %%
def sweep_overrides(grid):
    """``sweep.<knob>=[...]`` for each axis (booleans as Hydra's true/false)."""
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
    return [f"sweep.{k}=[{','.join(text(v) for v in values)}]" for k, values in grid.items()]


overrides = core_overrides(SMOKE) + [f"method={METHOD}", "dataset=custom", f"dataset.root={root}", "progress=false",
                                     "log_images=2"] + sweep_overrides(SWEEP)
overrides += wandb_overrides(SMOKE, WANDB_MODE, group=GROUP)
cfg = compose_config("sweep", overrides)
print("\n".join(overrides))

# %%
seg = Segmenter.from_config(cfg)
dataset = build_dataset(cfg.dataset)
run_dir = scratch_dir("proxyclip-sweep-")  # deleted when the kernel exits
result = sweep(cfg, run_dir=run_dir, seg=seg, dataset=dataset)
print("axes:", result["axes"], "| best:", result["best"]["values"], f"mIoU {result['best']['mIoU']:.2f}")


# %% [markdown]
# ## mIoU over the grid
# Read from the result (`sweep.json`): every point's swept `values`, its full decode spec and its
# metrics. Two axes: a heatmap (the best over any further axes); one axis: a line.

# %%
def sweep_plot(result, metric="mIoU"):
    axes, points = result["axes"], result["points"]
    values = [sorted({json.dumps(p["values"][a]) for p in points}, key=lambda t: json.loads(t)) for a in axes]
    values = [[json.loads(t) for t in vs] for vs in values]
    if len(axes) == 1:
        by_value = {json.dumps(p["values"][axes[0]]): p[metric] for p in points}
        return marked(viz.plot_sweep_line([by_value[json.dumps(v)] for v in values[0]], values[0], axes[0], metric),
                      seg)
    grid = np.full((len(values[0]), len(values[1])), np.nan)
    for p in points:
        i, j = (values[n].index(p["values"][axes[n]]) for n in (0, 1))
        grid[i, j] = np.fmax(grid[i, j], p[metric])
    return marked(viz.plot_sweep_heatmap(grid, values[0], values[1], row_name=axes[0], col_name=axes[1],
                                         metric=metric), seg)


sweep_plot(result)

# %% [markdown]
# Per-class IoU at the best point, and what the best point looks like on one image next to the
# ground truth (a decode with the best point's values):

# %%
best = result["best"]
best_point = next(p for p in result["points"] if p["values"] == best["values"])
print(json.dumps(best_point["IoU"], indent=1))


def decode_args(values):
    """A point's values as decode arguments: knobs by name, post-process settings as a mapping."""
    knobs = {k: v for k, v in values.items() if not k.startswith("postprocess.")}
    post = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("postprocess.")}
    return dict(knobs, postprocess=post or None)


img, gt = dataset[0]
pred = seg.predict(img, dataset.class_names, **decode_args(best["values"]))
marked(viz.plot_segmentation(pred.image, pred.labels, dataset.class_names, gt_labels=gt,
                             title=" ".join(f"{k}={v}" for k, v in best["values"].items())), seg)

# %% [markdown]
# ## Another method, another knob
# The same function sweeps NACLIP's neighbourhood width (or any declared knob of any method: a
# switch with `[True, False]`, `logit_scale`, a PAMR setting with `postprocess=pamr` and
# `sweep.postprocess.steps`). Not logged to W&B.

# %%
line_cfg = compose_config("sweep", core_overrides(SMOKE) + [f"method={LINE_METHOD}", "dataset=custom",
                                                            f"dataset.root={root}", "progress=false"]
                          + sweep_overrides(LINE_SWEEP))
line_result = sweep(line_cfg, run_dir=scratch_dir("proxyclip-sweep-"), seg=seg, dataset=dataset)
sweep_plot(line_result)

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
# In one process, one encode per image:
#
# ```bash
# proxyclip-sweep dataset=custom dataset.root=DATA 'sweep.beta=[1.0,1.2,1.4,1.6]' 'sweep.gamma=[2,3,4,5]'
# proxyclip-sweep method=naclip dataset=custom dataset.root=DATA 'sweep.gaussian_std=[3,5,7]' 'sweep.residual=[true,false]'
# ```
#
# Or one run per grid point, each its own W&B run, grouped by the sweep (Hydra multirun; the basic
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
