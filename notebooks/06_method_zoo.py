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
# # 6. The method zoo: every registered method
#
# Every training-free method here is a decode of one encode of the image (CLIP's tokens entering the
# last block, the tokens entering the earlier blocks the 2025 methods read, the VFM features):
# the list is read from the registry (`proxyclip.methods.METHODS`), so a newly registered method
# appears here by itself. Window-level methods (docs/methods.md) change CLIP's last block per window;
# image-level ones (docs/regions.md: LPOSS, LPOSS+) decide from every window at once. We look at
# - their segmentations of one image, side by side;
# - the attention of one chosen patch under each method that runs one (the `attention.pattern`
#   hook; SC-CLIP and GEM run their own last block and record none, image-level methods have none);
# - a per-method mIoU table on a labeled folder (`custom` format; a synthetic set by default), with
#   and without PAMR, logged to Weights & Biases with the figures.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models (a 12-block tiny CLIP, `clip=test_tiny_deep`,
# so the methods reading earlier blocks run at their defaults), small images.

# %% tags=["parameters"]
SMOKE = None
IMAGE = None  # a path; None = the bundled sample image
CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]
METHODS = None  # names; None = every registered method (proxyclip.methods.METHODS) but those reading mask proposals
KNOBS = None  # {method: {knob: value}} over the YAML defaults; None = the defaults (smoke mode: LPOSS's k fitting the tiny images)
PIXEL = (0.45, 0.5)  # the chosen pixel, as fractions of the image's (height, width)
DATA_ROOT = None  # a labeled folder (custom format); None = a synthetic set
WANDB_MODE = None
GROUP = "method-zoo"

# %%
# %matplotlib inline
import time

import torch
from _workbench import core_overrides, labeled_set_root, marked, smoke_mode, wandb_overrides

from proxyclip import Segmenter, compose_config, load_image, viz
from proxyclip.config import to_container
from proxyclip.data import build_dataset
from proxyclip.loggers import build_logger
from proxyclip.widgets import ASSETS
from proxyclip.methods import METHODS as REGISTERED
from proxyclip.metrics import confusion_matrix, metrics_from_confusion
from proxyclip.parts import block_of

SMOKE = smoke_mode(SMOKE)
METHODS = list(REGISTERED) if METHODS is None else list(METHODS)  # every registered method, in registration order
# the methods reading mask proposals (CorrCLIP) need a mask stage on every image (masks=file|sam2|sam:
# docs/regions.md); this notebook's images have none, so they are named and left out
NEED_MASKS = [name for name in METHODS if REGISTERED[name].needs_masks]
print("left out, they read mask proposals (docs/regions.md):", ", ".join(NEED_MASKS) or "none")
METHODS = [name for name in METHODS if name not in NEED_MASKS]
if KNOBS is None:  # the tiny images have 16-32 patches: LPOSS's graph needs k <= that (its default is 400)
    KNOBS = {"lposs": {"k": 8}, "lposs_plus": {"k": 8, "r": 5}} if SMOKE else {}
for name in METHODS:  # each method's declared knobs (proxyclip/methods.py), their defaults in its YAML
    print(f"{name:10s} [{REGISTERED[name].level}]",
          "; ".join(k.describe() for k in REGISTERED[name].knobs) or "(only the switches residual, ffn)")
cfg = compose_config(overrides=core_overrides(SMOKE, clip="test_tiny_deep" if SMOKE else None))
seg = Segmenter.from_config(cfg)
# the earlier blocks' tokens any of them reads (ResCLIP's rcs_layers, SC-CLIP's, GEM's), kept by every encode
KEEP = sorted({p for name in METHODS for p in seg.parts_of(seg.decode_spec(method=name, **KNOBS.get(name, {})))},
              key=block_of)
print(f"{len(KEEP)} layer parts kept:", ", ".join(KEEP) or "none")
image = load_image(IMAGE or ASSETS / "sample.jpg")
if SMOKE:
    image = torch.nn.functional.interpolate(image[None], size=(72, 96), mode="bilinear", align_corners=False)[0]
print(f"CLIP {cfg.clip.name}, VFM {cfg.vfm.name}, random weights: {seg.random_weights}; image {tuple(image.shape[1:])}")

# %% [markdown]
# ## One encode, a decode per method
# `seg.encode` runs the backbones once (keeping the layer parts `KEEP`); `seg.decode(enc, classes,
# method=...)` runs only each method's own part (with its switches and knobs from
# `conf/method/<name>.yaml`), the scores and the decision.

# %%
t = time.perf_counter()
enc = seg.encode(image, keep=KEEP)
t_encode = time.perf_counter() - t
# CASS reads the VFM's keys, not its tokens: for it, the same models with that readout (CLIP part reused)
segs = {name: seg.for_method(name) for name in METHODS}
encs = {name: segs[name].encode(image, reuse=enc, keep=KEEP) for name in METHODS}
preds, patterns, t_decode = {}, {}, {}
for name in METHODS:
    t = time.perf_counter()
    preds[name], cache = segs[name].run_with_cache(encs[name], CLASSES, names=["attention.pattern"], method=name,
                                                   **KNOBS.get(name, {}))
    t_decode[name] = time.perf_counter() - t
    # an image-level method has no attention of its own (LPOSS's pattern here would be MaskCLIP's, which it calls)
    if REGISTERED[name].level == "window" and "attention.pattern" in cache:
        patterns[name] = cache["attention.pattern"]
print(f"encode {t_encode:.2f} s; decodes: " + ", ".join(f"{n} {s:.2f} s" for n, s in t_decode.items()))
fig_segmentations = marked(viz.plot_method_grid(image, {n: p.labels for n, p in preds.items()}, CLASSES), seg)
fig_segmentations

# %% [markdown]
# ## The attention of one patch, per method
# Each panel is the row of the attention the method runs for the token under the chosen pixel
# (red box), averaged over heads, over the patches of its window. CLIP's own attention is diffuse;
# MaskCLIP's is the patch itself; SCLIP, ClearCLIP and NACLIP correlate queries or keys; ProxyCLIP's
# comes from the VFM, on the VFM's finer grid (CASS: CLIP's patches, heads matched to the VFM's).
# Methods without a pattern of their own are listed below the figure.

# %%
y, x = PIXEL[0] * enc.image_size[0], PIXEL[1] * enc.image_size[1]
maps = []
for name in patterns:
    row, grid, patch, window = viz.pattern_row(patterns[name], encs[name], y, x,
                                               vfm_resizes_input=bool(seg.vfm and seg.vfm.resizes_input))
    maps.append((f"{name} ({grid[0]}x{grid[1]})", row, grid, patch))
pixels = viz.window_pixels(enc.image, enc.resized_size, enc.windows[window])
print("no attention pattern of their own:", ", ".join(
    f"{n} ({'image-level' if REGISTERED[n].level == 'image' else 'runs its own last block'})"
    for n in METHODS if n not in patterns) or "none")
fig_attention = marked(viz.plot_attention_grid(pixels, maps, ncols=4), seg)
fig_attention

# %% [markdown]
# ## mIoU per method on a labeled folder
# Each image is encoded once; every method (and NACLIP with PAMR, as its paper runs it) decodes it.
# The command-line equivalent on a real benchmark, with the published numbers beside the measured:
#
#     proxyclip-eval -m dataset=voc21 data_root=DATA method=clip,maskclip,sclip,clearclip,naclip,proxyclip,resclip
#     proxyclip-summary multirun/eval/<time> --table methods

# %%
root = labeled_set_root(SMOKE, DATA_ROOT)
eval_cfg = compose_config("eval", core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}"]
                          + wandb_overrides(SMOKE, WANDB_MODE, group=GROUP))
dataset = build_dataset(eval_cfg.dataset)
names = dataset.class_names
variants = {name: dict(method=name, **KNOBS.get(name, {})) for name in METHODS}
variants["naclip+pamr"] = dict(method="naclip", postprocess="pamr_naclip")
cms = {v: torch.zeros(len(names), len(names), dtype=torch.int64) for v in variants}
for i in range(len(dataset)):
    img, gt = dataset[i]
    enc_i = seg.encode(img, keep=KEEP)
    for v, kw in variants.items():
        s_v = segs[kw["method"]]
        cms[v] += confusion_matrix(s_v.decode(s_v.encode(img, reuse=enc_i, keep=KEEP), names, **kw).labels, gt, len(names),
                                   ignore_index=dataset.ignore_index)
results = {v: metrics_from_confusion(cm, names) for v, cm in cms.items()}
columns = ["method", "mIoU", "aAcc", "mAcc"]
rows = [[v, r["mIoU"], r["aAcc"], r["mAcc"]] for v, r in results.items()]
print(f"{len(dataset)} images of {root}")
for row in rows:
    print(f"{row[0]:14s} mIoU {row[1]:6.2f}  aAcc {row[2]:6.2f}  mAcc {row[3]:6.2f}")

# %% [markdown]
# ## Log to Weights & Biases
# One run: the table, the segmentations and the attention figure.

# %%
with build_logger(eval_cfg.logger, {"methods": METHODS, **to_container(eval_cfg)}, name=f"{GROUP}-table",
                  job_type="methods") as log:
    log.log_table("methods", columns, rows)
    log.log_figure("segmentations", fig_segmentations)
    log.log_figure("attention_of_one_patch", fig_attention)
    best = max(results, key=lambda v: results[v]["mIoU"])
    log.log_summary({"best_method": best, "best_mIoU": results[best]["mIoU"]})
print("best:", best, round(results[best]["mIoU"], 2))
