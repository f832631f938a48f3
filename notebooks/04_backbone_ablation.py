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
# # 4. Backbone ablation: CLIP x VFM
#
# Every (CLIP, VFM) pair is evaluated on the same labeled set (custom format; a synthetic set by
# default) with the method's default hyperparameters. Each pair is its own W&B run; all runs of
# this ablation share one W&B group, and a last run of the group holds the whole grid as a table
# and a heatmap. `vfm=none` is the no-VFM (MaskCLIP-style) baseline.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): the tiny random CLIP with the tiny VFM and with none.

# %% tags=["parameters"]
SMOKE = None
DATA_ROOT = None
CLIPS = ["vit_b16", "vit_l14"]
VFMS = ["dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "sam_vitb", "mae_vitb16", "none"]
WANDB_MODE = None
GROUP = "clip-x-vfm"
LIMIT = None  # evaluate only this many images (a reproducible subset)

# %%
# %matplotlib inline
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
from _workbench import core_overrides, labeled_set_root, smoke_mode, wandb_overrides

from proxyclip import compose_config, viz
from proxyclip.config import to_container
from proxyclip.evaluation import evaluate
from proxyclip.loggers import build_logger

SMOKE = smoke_mode(SMOKE)
if SMOKE:
    CLIPS, VFMS = ["test_tiny"], ["test_tiny", "none"]
root = labeled_set_root(SMOKE, DATA_ROOT)
out_dir = Path(tempfile.mkdtemp(prefix="proxyclip-ablation-"))
logger_overrides = wandb_overrides(SMOKE, WANDB_MODE, group=GROUP)
print(f"{len(CLIPS)} CLIP x {len(VFMS)} VFM on {root}; results in {out_dir}")

# %% [markdown]
# ## One evaluation per pair
# Each `evaluate` builds the pipeline from the config, opens its own W&B run (tagged with the
# pair, grouped under `GROUP`), logs mIoU, aAcc, mAcc, per-class IoU and a few images with
# predicted and ground-truth masks, and writes `metrics.json` in its run directory.

# %%
results = {}
for clip in CLIPS:
    for vfm in VFMS:
        overrides = core_overrides(SMOKE, clip=clip, vfm=vfm) + [
            "dataset=custom", f"dataset.root={root}", "progress=false", "log_images=1",
            f"logger.tags=[{clip},{vfm}]", *logger_overrides]
        if LIMIT:
            overrides.append(f"limit={LIMIT}")
        cfg = compose_config("eval", overrides)
        t = time.perf_counter()
        m = evaluate(cfg, run_dir=out_dir / f"{clip}+{vfm}")
        results[clip, vfm] = dict(mIoU=m["mIoU"], aAcc=m["aAcc"], mAcc=m["mAcc"], seconds=time.perf_counter() - t,
                                  random_weights=m["random_weights"])
        gc.collect()

# %% [markdown]
# ## The grid

# %%
grid = np.array([[results[c, v]["mIoU"] for v in VFMS] for c in CLIPS])
fig = viz.plot_sweep_heatmap(grid, CLIPS, VFMS, row_name="CLIP", col_name="VFM", metric="mIoU")
fig

# %%
columns = ["clip", "vfm", "mIoU", "aAcc", "mAcc", "seconds", "random_weights"]
rows = [[c, v, r["mIoU"], r["aAcc"], r["mAcc"], round(r["seconds"], 2), r["random_weights"]]
        for (c, v), r in results.items()]
for row in rows:
    print("  ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in row))

# %% [markdown]
# ## The summary run
# One more run in the same group with the whole grid as a W&B table and the heatmap.

# %%
summary_cfg = compose_config("eval", core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}", *logger_overrides])
with build_logger(summary_cfg.logger, {"clips": CLIPS, "vfms": VFMS, "dataset": to_container(summary_cfg.dataset)},
                  name=f"{GROUP}-summary", job_type="summary") as log:
    log.log_table("ablation", columns, rows)
    log.log_figure("mIoU_clip_x_vfm", fig)
    best = max(results, key=lambda k: results[k]["mIoU"])
    log.log_summary({"best_clip": best[0], "best_vfm": best[1], "best_mIoU": results[best]["mIoU"]})
print("best pair:", best, results[best])
