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
# # 4. Backbone ablation: CLIP x VFM, and which VFM layer and feature
#
# Every (CLIP, VFM) pair is evaluated on the same labeled set (custom format; a synthetic set by
# default) with the method's default hyperparameters. Each pair is its own W&B run; all runs of
# this ablation share one W&B group, and a last run of the group holds the whole grid as a table
# and a heatmap. `none` is the baseline without a VFM (MaskCLIP, v-only: `method=maskclip
# method.residual=false method.ffn=false`; docs/methods.md).
#
# Then, for the first CLIP, which layer of each VFM and which feature (its tokens, or the q, k or
# v of that block's attention) the proxy attention should come from: a VFM x layer heatmap per
# feature, and sliders to look at one setting. CLIP is encoded once per image for all of it.
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
LAYERS = [-1, -2, -4, -6]  # VFM feature layers (blocks) for the layer ablation, negative = from the end
FEATURES = ["tokens", "k"]  # tokens | q | k | v

# %%
# %matplotlib inline
import gc
import time

import numpy as np
from _workbench import core_overrides, labeled_set_root, marked, scratch_dir, smoke_mode, wandb_overrides

from proxyclip import compose_config, viz
from proxyclip.config import to_container
from proxyclip.evaluation import evaluate
from proxyclip.loggers import build_logger

SMOKE = smoke_mode(SMOKE)
if SMOKE:
    CLIPS, VFMS, LAYERS = ["test_tiny"], ["test_tiny", "none"], [-1, -2]
root = labeled_set_root(SMOKE, DATA_ROOT)
out_dir = scratch_dir("proxyclip-ablation-")  # deleted when the kernel exits
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
        baseline = ["method=maskclip", "method.residual=false", "method.ffn=false"] if vfm == "none" else []
        overrides = core_overrides(SMOKE, clip=clip, vfm=vfm) + baseline + [
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
random_runs = any(r["random_weights"] for r in results.values())
fig = viz.mark_random_weights(fig, viz.random_weights_reason(random_runs, cfg.weights.source))
fig

# %%
columns = ["clip", "vfm", "mIoU", "aAcc", "mAcc", "seconds", "random_weights"]
rows = [[c, v, r["mIoU"], r["aAcc"], r["mAcc"], round(r["seconds"], 2), r["random_weights"]]
        for (c, v), r in results.items()]
for row in rows:
    print("  ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in row))

# %% [markdown]
# ## Which layer, which feature
# For the first CLIP and each VFM: the proxy attention built from VFM layer `layer` (a block,
# counted from the end when negative) and feature `tokens`, `q`, `k` or `v` (`vfm.layer`,
# `vfm.feature`; docs/vfm.md). `Segmenter.with_vfm` shares the CLIP model (and the VFM model when
# only the layer or feature changes), and `encode(image, reuse=enc)` takes CLIP's part of each
# image from its first encode: only the VFM runs again, up to the chosen layer. A setting a VFM
# cannot give (a layer it does not have; q/k/v of windowed attention blocks, as in SAM) is left
# blank, with the reason printed.

# %%
import torch

from proxyclip import Segmenter, compose_config
from proxyclip.data import build_dataset
from proxyclip.metrics import confusion_matrix, metrics_from_confusion

layer_vfms = [v for v in VFMS if v != "none"]
base = Segmenter.from_config(compose_config(overrides=core_overrides(SMOKE, clip=CLIPS[0], vfm=layer_vfms[0])))
dataset = build_dataset(compose_config("eval", core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}"]).dataset)
names, k = dataset.class_names, dataset.num_classes
samples = [dataset[i] for i in range(min(len(dataset), LIMIT or len(dataset)))]
first_encodes = [base.encode(img) for img, _ in samples]  # CLIP's part of every image, once
layer_miou = {}
for vfm in layer_vfms:
    for feature in FEATURES:
        for layer in LAYERS:
            try:
                seg = base.with_vfm(vfm, layer=layer, feature=feature)
            except ValueError as e:
                print(f"{vfm} {feature} layer {layer}: {e}")
                layer_miou[vfm, feature, layer] = float("nan")
                continue
            cm = torch.zeros(k, k, dtype=torch.int64)
            for (img, gt), enc0 in zip(samples, first_encodes):
                pred = seg.decode(seg.encode(img, reuse=enc0), names)
                cm += confusion_matrix(pred.labels, gt, k, ignore_index=dataset.ignore_index)
            layer_miou[vfm, feature, layer] = metrics_from_confusion(cm, names)["mIoU"]
            del seg
        gc.collect()
rows_layer = [f"{v} ({f})" for v in layer_vfms for f in FEATURES]
grid_layer = np.array([[layer_miou[v, f, l] for l in LAYERS] for v in layer_vfms for f in FEATURES])
fig_layers = marked(viz.plot_sweep_heatmap(grid_layer, rows_layer, LAYERS, row_name="VFM (feature)", col_name="layer",
                                           metric="mIoU"), base)
fig_layers

# %% [markdown]
# ## One setting at a time
# Choose the VFM, its layer and feature: the view shows the segmentation of the first image and
# the proxy attention of its centre patch. Each change encodes only the VFM (CLIP's part is
# reused).

# %%
import ipywidgets as W
from IPython.display import display

image0, enc0 = samples[0][0], first_encodes[0]
vfm_choice = W.Dropdown(options=layer_vfms, description="VFM")
layer_choice = W.IntSlider(value=-1, min=-len(base.vfm.model.feature_info), max=-1, description="layer")
feature_choice = W.ToggleButtons(options=["tokens", "q", "k", "v"], description="feature")
view = W.Output()


def show(change=None):
    try:
        seg = base.with_vfm(vfm_choice.value, layer=layer_choice.value, feature=feature_choice.value)
    except ValueError as e:
        with view:
            view.clear_output(wait=True)
            print(e)
        return
    layer_choice.min = -len(seg.vfm.model.feature_info)
    enc = seg.encode(image0, reuse=enc0)
    pred, cache = seg.run_with_cache(enc, names, names=["attention.pattern"])
    h, w = enc.image_size
    row, grid, patch, window = viz.pattern_row(cache["attention.pattern"], enc, h / 2, w / 2,
                                               vfm_resizes_input=seg.vfm.resizes_input)
    with view:
        view.clear_output(wait=True)
        display(marked(viz.plot_segmentation(image0, pred.labels, names, gt_labels=samples[0][1], title=(
            f"{vfm_choice.value}, layer {layer_choice.value}, {feature_choice.value}")), seg))
        display(marked(viz.plot_attention_map(viz.window_pixels(enc.image, enc.resized_size, enc.windows[window]),
                                              row, grid, patch), seg))


for control in (vfm_choice, layer_choice, feature_choice):
    control.observe(show, names="value")
show()
W.VBox([W.HBox([vfm_choice, layer_choice]), feature_choice, view])

# %% [markdown]
# ## The summary run
# One more run in the same group with the whole grid as a W&B table and the heatmap.

# %%
summary_cfg = compose_config("eval", core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}", *logger_overrides])
with build_logger(summary_cfg.logger, {"clips": CLIPS, "vfms": VFMS, "dataset": to_container(summary_cfg.dataset)},
                  name=f"{GROUP}-summary", job_type="summary") as log:
    log.log_table("ablation", columns, rows)
    log.log_figure("mIoU_clip_x_vfm", fig)
    log.log_table("layers", ["vfm", "feature", "layer", "mIoU"],
                  [[v, f, l, m] for (v, f, l), m in layer_miou.items()])
    log.log_figure("mIoU_vfm_x_layer", fig_layers)
    best = max(results, key=lambda k: results[k]["mIoU"])
    log.log_summary({"best_clip": best[0], "best_vfm": best[1], "best_mIoU": results[best]["mIoU"]})
print("best pair:", best, results[best])
