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
# # 8. Whole-image stages: mask proposals, CorrCLIP's regions, LPOSS's graph
#
# Some methods do not decide each sliding window on its own (docs/regions.md): they read every
# window at once (`level="image"`: LPOSS, LPOSS+, CLIPer, Trident, CorrCLIP) or per-image inputs made
# on the whole original image, the class-agnostic **mask proposals** (`masks=file|sam2|sam`: CorrCLIP)
# and Trident's SAM part. We look at
# - the mask proposals of one image (the `masks.proposals` hook point, at encode);
# - CorrCLIP's regions of each window before and after merging (the `corrclip.regions` hook point);
# - LPOSS's patch graph: the neighbours of a chosen patch over all windows (`lposs.graph_of`), with
#   sliders to choose it;
# - the whole-image methods side by side, decoded from one encode, with each one's decode time;
# - all of it logged to Weights & Biases.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models (a 12-block tiny CLIP, `clip=test_tiny_deep`,
# so CorrCLIP's spatial branch and CLIPer's levels run at their defaults; Trident's tiny SAM ViT,
# `trident.sam=test_tiny_sam`), a small image, and proposals the notebook writes itself
# (`masks=file`: k-means clusters of the image's colours, no SAM needed).

# %% tags=["parameters"]
SMOKE = None
IMAGE = None  # a path; None = the bundled sample image
CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]
MASKS = None  # file | sam2 | sam; None = file in smoke mode (proposals written by this notebook), else sam2
MASK_DIR = None  # masks=file: a folder of <image stem>.npz|png; None = colour proposals written by this notebook
METHODS = None  # names; None = the registry's image-level methods and those reading mask proposals
KNOBS = None  # {method: {knob: value}} over the YAML defaults; None = the defaults (smoke mode: LPOSS's k fitting)
PIXEL = (0.45, 0.5)  # the patch of the graph figure: under this pixel, as fractions of (height, width)
WINDOWS_SHOWN = 3  # CorrCLIP's regions: this many windows, those with the most proposals
WANDB_MODE = None
GROUP = "regions"

# %%
# %matplotlib inline
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from _workbench import colour_proposals, core_overrides, marked, scratch_dir, smoke_mode, wandb_overrides
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from proxyclip import Segmenter, compose_config, load_image, viz
from proxyclip.backbones.weights import WeightsUnavailable
from proxyclip.config import to_container
from proxyclip.hooks import finish_cache
from proxyclip.loggers import build_logger
from proxyclip.masks.regions import merge_regions, nearest_labels
from proxyclip.methods import METHODS as REGISTERED
from proxyclip.parts import block_of
from proxyclip.widgets import ASSETS
from proxyclip.zoo.corrclip import window_labels
from proxyclip.zoo.lposs import graph_of, patch_locations

SMOKE = smoke_mode(SMOKE)
MASKS = MASKS or ("file" if SMOKE else "sam2")
# the whole-image methods, read from the registry (a new image-level or mask-reading method appears by itself)
METHODS = [n for n, m in REGISTERED.items() if m.level == "image" or m.needs_masks] if METHODS is None else list(METHODS)
if KNOBS is None:  # the tiny image has few patches: LPOSS's graph needs k <= that (its default is 400)
    KNOBS = {"lposs": {"k": 8}, "lposs_plus": {"k": 8, "r": 5}} if SMOKE else {}
print("whole-image methods:", ", ".join(f"{n} [{REGISTERED[n].level}"
                                         f"{', masks' if REGISTERED[n].needs_masks else ''}"
                                         f"{', SAM' if REGISTERED[n].needs_sam else ''}]" for n in METHODS))

image = load_image(IMAGE or ASSETS / "sample.jpg")
IMAGE_ID = Path(IMAGE).stem if IMAGE else "sample"
if SMOKE:
    image = F.interpolate(image[None], size=(72, 96), mode="bilinear", align_corners=False)[0]


def regions_config(masks, mask_dir):
    """One config for CorrCLIP (its VFM readout: DINO's q + k) with the mask stage ``masks``; the other
    methods decode its encode (seg.for_method gives Trident a Segmenter sharing these models that also
    makes its SAM part)."""
    over = [f"masks={masks}"] + ([f"masks.dir={mask_dir}"] if masks == "file" else [])
    if masks in ("sam2", "sam") and SMOKE:  # the tests' small generators (docs/regions.md)
        over += (["masks.model=sam2_hiera_t", "masks.input_size=128"] if masks == "sam2"
                 else ["masks.model=test_tiny"]) + ["masks.points_per_side=4", "masks.cache=null"]
    return compose_config(overrides=core_overrides(SMOKE, clip="test_tiny_deep" if SMOKE else None)
                          + ["method=corrclip", "vfm.feature=qk"] + over + (["trident.sam=test_tiny_sam"] if SMOKE else []))


def write_colour_proposals():
    """Proposals without a mask model, in masks=file's layout: k-means clusters of the image's colours."""
    folder = scratch_dir("proxyclip-masks-")
    np.savez(folder / f"{IMAGE_ID}.npz", instance_mask=colour_proposals(image, k=6))
    return folder


if MASKS == "file" and MASK_DIR is None:
    MASK_DIR = write_colour_proposals()
try:
    cfg = regions_config(MASKS, MASK_DIR)
    seg = Segmenter.from_config(cfg)
except (WeightsUnavailable, ImportError) as e:  # no SAM 2 / SAM weights or package here: said, not hidden
    print(f"[08_regions] masks={MASKS} unavailable ({e}); using colour proposals (masks=file) instead")
    MASKS, MASK_DIR = "file", write_colour_proposals()
    cfg = regions_config(MASKS, MASK_DIR)
    seg = Segmenter.from_config(cfg)
segs = {name: seg.for_method(name) for name in METHODS}
KEEP = sorted({p for name in METHODS for p in segs[name].parts_of(seg.decode_spec(method=name, **KNOBS.get(name, {})))},
              key=block_of)
print(f"CLIP {cfg.clip.name}, VFM {cfg.vfm.name} ({cfg.vfm.feature}), masks={MASKS}, random weights: "
      f"{seg.random_weights}; image {tuple(image.shape[1:])}; {len(KEEP)} layer parts kept")

# %% [markdown]
# ## 1. Mask proposals
# The `masks` stage runs once per image, on the original image (never per window): a generator's
# boolean masks (or a file's) become one **label map**, painted in ascending area so the largest mask
# wins where masks overlap; 0 = no proposal. The encode passes it through the hook point
# `masks.proposals` and keeps it in `Encoded.masks`; we record it while encoding, keeping every layer
# part the methods below read, so they all decode this one encode.

# %%
raw = {}
t = time.perf_counter()
with seg.hooks.active(cache=raw, cache_names=["masks.proposals"]):
    enc = seg.encode(image, keep=KEEP, image_id=IMAGE_ID)
t_encode = time.perf_counter() - t
proposals = finish_cache(raw)["masks.proposals"]
assert torch.equal(proposals, enc.masks)
n_proposals = int(proposals.unique().ne(0).sum())
coverage = float((proposals > 0).float().mean())
print(f"encode {t_encode:.2f} s: {n_proposals} proposals covering {coverage:.0%} of the pixels, "
      f"label map {tuple(proposals.shape)}, ids 0..{int(proposals.max())}")


def label_colours(labels, n):
    """(H, W) ids 0..n-1 -> colours (0 black: no proposal)."""
    out = viz.colorize_labels(labels, n, ignore_index=-1)
    out[np.asarray(labels) == 0] = 0
    return out


fig_masks = Figure(figsize=(10, 3.4), layout="constrained")
axes = fig_masks.subplots(1, 3)
img_hwc = viz.image_to_float_hwc(image)
axes[0].imshow(img_hwc)
axes[0].set_title("image")
axes[1].imshow(label_colours(proposals, int(proposals.max()) + 1))
axes[1].set_title(f"label map: {n_proposals} proposals")
axes[2].imshow(img_hwc)
edges = viz.class_boundaries(proposals)
axes[2].imshow(np.dstack([np.ones_like(edges, float), np.ones_like(edges, float), np.zeros_like(edges, float),
                          edges.astype(float)]))
axes[2].set_title(f"their boundaries ({coverage:.0%} covered)")
for ax in axes:
    ax.set_axis_off()
fig_masks = marked(fig_masks, seg)
fig_masks

# %% [markdown]
# ## 2. CorrCLIP's regions, before and after merging
# Per window, CorrCLIP cuts the label map (nearest-resized to the network input; the window's padding
# is a label of its own) and takes it to the VFM grid (nearest): the regions **before** merging.
# With more than two labels, the regions whose mean VFM features are close (`max(C) - cos <= eps`,
# chains included) become one: the regions **after** merging, ids 0..R-1, that the hook point
# `corrclip.regions` records and the scope attention and the mask class tokens then use. Below, the
# merge recomputed from the labels and the encode's VFM features equals what the hook recorded.

# %%
corr_knobs = seg.decode_spec(method="corrclip", **KNOBS.get("corrclip", {})).knob_values
pred_corr, cache = seg.run_with_cache(enc, CLASSES, names=["corrclip.regions"], method="corrclip",
                                      **KNOBS.get("corrclip", {}))
after = cache["corrclip.regions"]  # (windows, Hv, Wv)
vgrid = tuple(enc.vfm_features.shape[-2:])
# the labels CorrCLIP cuts per window (its own function; memoized per Encoded in a decode, here once)
cut = window_labels(SimpleNamespace(masks=enc.masks, resized_size=enc.resized_size, pad=enc.pad, windows=enc.windows,
                                    memoized=lambda name, fn: fn()))
before = torch.stack([nearest_labels(lab, vgrid) for lab in cut])  # proposal ids (the top one = padding)
feats = F.normalize(enc.vfm_features.flatten(2).transpose(1, 2).float(), dim=-1)
remerged = torch.stack([merge_regions(b.flatten(), f, float(corr_knobs["eps"])).view(vgrid) for b, f in zip(before, feats)])
merge_matches = bool(torch.equal(remerged, after))
print("merge recomputed from the labels equals the corrclip.regions hook:", merge_matches)
region_rows = [[i, int(before[i].unique().numel()), int(after[i].unique().numel())] for i in range(len(enc.windows))]
for i, n_before, n_after in region_rows:
    print(f"window {i} {enc.windows[i]}: {n_before} labels -> {n_after} regions (eps {corr_knobs['eps']})")

shown = sorted(range(len(enc.windows)), key=lambda i: (-region_rows[i][1], i))[:WINDOWS_SHOWN]
top, bottom, left, right = enc.pad
fig_regions = Figure(figsize=(9, 3.0 * len(shown)), layout="constrained")
axes = np.atleast_2d(fig_regions.subplots(len(shown), 3))
n_ids = int(before.max()) + 1
for row, i in zip(axes, shown):
    pixels = F.pad(viz.window_pixels(enc.image, enc.resized_size, enc.windows[i]), (left, right, top, bottom))
    row[0].imshow(viz.image_to_float_hwc(pixels))
    row[0].set_title(f"window {i} (padded)")
    # a region after merging in the colour of its smallest label: an unmerged one keeps its colour
    mins = torch.zeros(int(after[i].max()) + 1, dtype=torch.long).scatter_reduce(
        0, after[i].flatten(), before[i].flatten(), "amin", include_self=False)
    smallest = mins[after[i]]
    for ax, labels, what in ((row[1], before[i], "labels"), (row[2], smallest, "regions")):
        ax.imshow(viz.image_to_float_hwc(pixels))
        ax.imshow(viz.colorize_labels(labels, n_ids, ignore_index=-1), alpha=0.7,
                  extent=(-0.5, pixels.shape[2] - 0.5, pixels.shape[1] - 0.5, -0.5), interpolation="nearest")
        ax.set_title(f"{'before' if what == 'labels' else 'after'}: {int(region_rows[i][1 if what == 'labels' else 2])} {what}")
    for ax in row:
        ax.set_axis_off()
fig_regions = marked(fig_regions, seg)
fig_regions

# %% [markdown]
# ## 3. LPOSS's graph: the neighbours of one patch
# LPOSS propagates the initial scores over a kNN graph of **every** window's VFM patches at once
# (docs/regions.md, step 2): each patch joined to its `k` most similar patches, weight
# `max(s, 0)^gamma * exp(-sigma * distance^pix_dist_pow)`, `W = A + A^T`, normalized.
# `proxyclip.zoo.lposs.graph_of(enc, ...)` returns that graph; the neighbours of a patch are the
# nonzero entries of its row. Drawn over the resized image: the windows (white), the chosen patch
# (red), its neighbours at their centres (colour and size: the weight). Neighbours come from every
# window, near and far: that is what an image-level method adds (a dot inside the red box is the same
# place seen by an overlapping window).

# %%
lp_knobs = seg.decode_spec(method="lposs", **KNOBS.get("lposs", {})).knob_values
graph, grid = graph_of(enc, **{k: lp_knobs[k] for k in ("k", "gamma", "sigma", "pix_dist_pow")})
centres = patch_locations(enc, grid).float()  # (N, 2) in pixels of the resized image
resized = F.interpolate(enc.image[None], size=enc.resized_size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
cell = ((enc.windows[0][1] - enc.windows[0][0] + top + bottom) / grid[0],
        (enc.windows[0][3] - enc.windows[0][2] + left + right) / grid[1])


def patch_under(fy, fx):
    """The patch whose centre is nearest the pixel at fractions (fy, fx) of the image (first window on a tie)."""
    y, x = fy * enc.resized_size[0], fx * enc.resized_size[1]
    return int(((centres - torch.tensor([y, x])) ** 2).sum(1).argmin())


def neighbours_of(n):
    """(indices, weights) of patch n's graph neighbours."""
    idx = graph[n].nonzero().flatten()
    return idx, graph[n, idx]


def plot_graph(n):
    idx, w = neighbours_of(n)
    per_cell = grid[0] * grid[1]
    fig = Figure(figsize=(6.5, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(viz.image_to_float_hwc(resized))
    for (y1, y2, x1, x2) in enc.windows:
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="white", lw=0.8, alpha=0.7))
    cy, cx = centres[n].tolist()
    ax.add_patch(Rectangle((cx - cell[1] / 2, cy - cell[0] / 2), cell[1], cell[0], fill=False, edgecolor="red", lw=2))
    wn = (w / w.max()).numpy() if len(w) else w.numpy()
    big = 120 if len(idx) < 50 else 24  # smaller dots when there are many (k is 400 with real models)
    dots = ax.scatter(centres[idx, 1], centres[idx, 0], c=w.numpy(), s=big / 6 + big * wn, cmap="viridis",
                      edgecolors="black", linewidths=0.5)
    fig.colorbar(dots, ax=ax, shrink=0.8, label="graph weight W_n")
    windows = sorted({int(j) // per_cell for j in idx})
    ax.set_title(f"patch {n} (window {n // per_cell}, cell {divmod(n % per_cell, grid[1])}):\n{len(idx)} neighbours "
                 f"in {len(windows)} of {len(enc.windows)} windows (k={lp_knobs['k']})")
    ax.set_axis_off()
    return fig


PATCH = patch_under(*PIXEL)
graph_idx, graph_w = neighbours_of(PATCH)
graph_windows = sorted({int(j) // (grid[0] * grid[1]) for j in graph_idx})
print(f"graph of {graph.shape[0]} patches ({len(enc.windows)} windows of {grid[0]}x{grid[1]}); patch {PATCH}: "
      f"{len(graph_idx)} neighbours in windows {graph_windows}")
fig_graph = marked(plot_graph(PATCH), seg)
fig_graph

# %% [markdown]
# Choose the patch: the sliders pick the pixel (fractions of the image's height and width); the
# figure shows the graph neighbours of the patch under it.

# %%
import ipywidgets as W
from IPython.display import display

fy_choice = W.FloatSlider(value=PIXEL[0], min=0.0, max=1.0, step=0.01, description="y")
fx_choice = W.FloatSlider(value=PIXEL[1], min=0.0, max=1.0, step=0.01, description="x")
graph_view = W.Output()


def show_graph(change=None):
    with graph_view:
        graph_view.clear_output(wait=True)
        display(marked(plot_graph(patch_under(fy_choice.value, fx_choice.value)), seg))


for control in (fy_choice, fx_choice):
    control.observe(show_graph, names="value")
show_graph()
W.VBox([W.HBox([fy_choice, fx_choice]), graph_view])

# %% [markdown]
# ## 4. The whole-image methods side by side
# Each decodes the one encode above (`seg.decode(enc, classes, method=...)`): CLIP's tokens and the
# layer parts, the VFM features, the proposals. A method that reads a part this encode lacks gets a
# Segmenter sharing the models (`seg.for_method`: Trident's makes its SAM part of the image) whose
# `encode(image, reuse=enc)` takes the rest from `enc`. The time is each decode's alone.
# With real weights: each method's official VFM readout differs (LPOSS: DINO B/16 values, Trident:
# its final-norm tokens, CorrCLIP: B/8's q + k); here they all read this one encode's q + k.

# %%
encs = {name: segs[name].encode(image, reuse=enc, keep=KEEP, image_id=IMAGE_ID) for name in METHODS}
preds, t_decode = {}, {}
for name in METHODS:
    t = time.perf_counter()
    preds[name] = segs[name].decode(encs[name], CLASSES, method=name, **KNOBS.get(name, {}))
    t_decode[name] = time.perf_counter() - t
shared = {name: encs[name].clip_tokens is enc.clip_tokens and encs[name].vfm_features is enc.vfm_features
          for name in METHODS}
method_rows = [[name, round(t_decode[name], 4), shared[name], len(preds[name].labels.unique())] for name in METHODS]
for name, secs, same, n_classes in method_rows:
    print(f"{name:11s} decode {secs:6.2f} s  CLIP and VFM parts of the one encode: {same}  classes in the map: {n_classes}")
fig_methods = marked(viz.plot_method_grid(image, {f"{n} ({t_decode[n]:.2f} s)": p.labels for n, p in preds.items()},
                                          CLASSES, ncols=3), seg)
fig_methods

# %% [markdown]
# ## Log to Weights & Biases
# One run: the four figures, the regions per window, the methods' decode times, and the numbers
# above (proposals, the chosen patch's neighbours).

# %%
log_cfg = compose_config("segment", core_overrides(SMOKE) + wandb_overrides(SMOKE, WANDB_MODE, group=GROUP))
with build_logger(log_cfg.logger, {"methods": METHODS, "masks": MASKS, **to_container(cfg)}, name=f"{GROUP}-{IMAGE_ID}",
                  job_type="regions") as log:
    log.log_figure("mask_proposals", fig_masks)
    log.log_figure("corrclip_regions", fig_regions)
    log.log_figure("lposs_graph", fig_graph)
    log.log_figure("segmentations", fig_methods)
    log.log_table("regions", ["window", "labels_before", "regions_after"], region_rows)
    log.log_table("methods", ["method", "decode_s", "one_encode", "classes_present"], method_rows)
    log.log_summary({"proposals": n_proposals, "coverage": coverage, "encode_s": t_encode,
                     "merge_matches_hook": merge_matches, "graph_patches": int(graph.shape[0]),
                     "graph_patch": PATCH, "graph_neighbours": int(len(graph_idx)),
                     "graph_windows": len(graph_windows), "lposs_k": int(lp_knobs["k"])})
print("logged", len(METHODS), "methods,", len(region_rows), "windows")
