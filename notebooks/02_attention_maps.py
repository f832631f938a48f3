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
# # 2. Attention maps: what the proxy attention looks like
#
# ProxyCLIP replaces the attention of CLIP's last block by an attention built from a vision
# foundation model's (VFM) patch features:
# `A = softmax(mask((S - beta * mean(S)) * gamma))`, with `S` the cosine affinity of the VFM
# tokens and the mask dropping entries below 0. This notebook draws one row of `A` (where the
# chosen patch looks) for several VFMs, gammas and betas, next to CLIP's own last-block
# attention.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models, one VFM, small image.

# %% tags=["parameters"]
SMOKE = None
IMAGE = None  # None = the bundled sample image
POINT = (0.35, 0.5)  # the chosen pixel, as fractions (y, x) of the image size
CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]
VFMS = ["dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "sam_vitb", "mae_vitb16"]
GAMMAS = [1.0, 3.0, 6.0]
BETAS = [0.8, 1.2, 1.6]
WANDB_MODE = None  # online | offline | disabled; None = $WANDB_MODE, else offline

# %%
# %matplotlib inline
import gc

import torch
from _workbench import core_overrides, marked, smoke_mode, wandb_overrides

from proxyclip import Segmenter, compose_config, load_image, viz
from proxyclip.widgets import ASSETS

SMOKE = smoke_mode(SMOKE)
if SMOKE:
    VFMS = ["test_tiny"]
image = load_image(IMAGE or ASSETS / "sample.jpg")
if SMOKE:
    image = torch.nn.functional.interpolate(image[None], size=(96, 80), mode="bilinear")[0].clamp(0, 1)
H, W = image.shape[1:]
y, x = POINT[0] * (H - 1), POINT[1] * (W - 1)
print(f"image {H}x{W}, chosen pixel (y={y:.0f}, x={x:.0f}); VFMs {VFMS}")


# %% [markdown]
# A helper: for one pipeline, its `Encoded` and one pixel, the row of the proxy attention (read
# at the `proxy.attention` hook of a decode) and of CLIP's own last-block attention (the
# `attention.pattern` hook of a `method="clip"` decode of the same `Encoded`: CLIP's unmodified
# last block), plus the pixels of the window they live in.

# %%
def attention_rows(seg, enc, attention, y, x):
    """-> (window pixels, [(title, row, grid, patch), ...]) for the pixel (y, x) of the original image."""
    _, clip_cache = seg.run_with_cache(enc, CLASSES, names=["attention.pattern"], method="clip")
    clip_row, clip_grid, clip_patch, win = viz.pattern_row(clip_cache["attention.pattern"], enc, y, x)
    pixels = viz.window_pixels(enc.image, enc.resized_size, enc.windows[win])
    maps = []
    if attention is not None:
        grid = tuple(enc.vfm_features.shape[-2:])
        pad = (0, 0, 0, 0) if seg.vfm.resizes_input else enc.pad  # SAM resizes the unpadded window
        _, vr, vc = viz.locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, grid, pad=pad)
        maps.append((f"proxy: {seg.cfg.vfm.name} {grid[0]}x{grid[1]}", attention[win, vr * grid[1] + vc], grid,
                     (vr, vc)))
    maps.append((f"CLIP's own ({seg.cfg.clip.name})", clip_row, clip_grid, clip_patch))
    return pixels, maps


# %% [markdown]
# ## Different VFMs, same CLIP
# Each VFM has its own token grid (DINO B/8: 42x42 at 336 pixels, B/16 and MAE: 21x21, DINOv2
# B/14: 24x24, SAM: 64x64 on a 1024 input). The last panel is CLIP's own attention, which
# ProxyCLIP throws away: it is spatially diffuse.

# %%
maps = []
for name in VFMS:
    seg = Segmenter.from_config(compose_config(overrides=core_overrides(SMOKE, vfm=name)))
    enc = seg.encode(image)
    _, cache = seg.run_with_cache(enc, CLASSES, names=["proxy.attention"])
    pixels, rows = attention_rows(seg, enc, cache["proxy.attention"], y, x)
    maps.extend(rows[:-1])
    clip_map = rows[-1]
    if name == VFMS[0]:
        seg_main, enc_main = seg, enc  # the first VFM (the default, DINO ViT-B/8) is explored below
    del seg, enc, cache
    gc.collect()
fig_vfms = marked(viz.plot_attention_grid(pixels, maps + [clip_map], ncols=3), seg_main)
fig_vfms

# %% [markdown]
# ## Gamma and beta
# Gamma scales the normalized affinity (an inverse temperature: larger = sharper attention);
# beta shifts it (larger = more entries fall below 0 and are masked out). One decode per
# setting on the first VFM's `Encoded`.

# %%
seg, enc = seg_main, enc_main
grid_maps = []
for gamma in GAMMAS:
    for beta in BETAS:
        _, c = seg.run_with_cache(enc, CLASSES, names=["proxy.attention"], gamma=gamma, beta=beta)
        pixels, rows = attention_rows(seg, enc, c["proxy.attention"], y, x)
        title, row, grid, patch = rows[0]
        grid_maps.append((f"gamma={gamma:g} beta={beta:g}", row, grid, patch))
fig_gamma_beta = marked(viz.plot_attention_grid(pixels, grid_maps, ncols=len(BETAS)), seg)
fig_gamma_beta

# %% [markdown]
# ## The stages for one patch
# The raw cosine affinity `S`, the normalized `S'` (white = 0, the masking threshold), the mask
# (what is kept) and the resulting attention.

# %%
_, c = seg.run_with_cache(enc, CLASSES, names=["proxy.affinity", "proxy.affinity_normalized", "proxy.mask",
                                               "proxy.attention"])
grid = tuple(enc.vfm_features.shape[-2:])
pad = (0, 0, 0, 0) if seg.vfm.resizes_input else enc.pad
win, r, col = viz.locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, grid, pad=pad)
k = r * grid[1] + col
fig_stages = viz.plot_affinity_stages(
    viz.window_pixels(image, enc.resized_size, enc.windows[win]), c["proxy.affinity"][win, k],
    c["proxy.affinity_normalized"][win, k], c["proxy.mask"][win, k], grid, (r, col),
    attention_row=c["proxy.attention"][win, k])
fig_stages = marked(fig_stages, seg)
fig_stages

# %% [markdown]
# ## Without a VFM vs with one
# The baseline without a VFM: CLIP's last-block values without any attention (MaskCLIP, v-only:
# no residual, no FFN), decoded from the same `Encoded` (docs/methods.md; notebook 06 has the
# whole family).

# %%
pred_none = seg.decode(enc, CLASSES, method="maskclip", residual=False, ffn=False)
pred_proxy = seg.decode(enc, CLASSES)
marked(viz.plot_baseline_comparison(image, pred_none.labels, pred_proxy.labels, CLASSES,
                                    names=("CLIP, no VFM", f"ProxyCLIP + {seg.cfg.vfm.name}")), seg)

# %% [markdown]
# ## Keep the figures in W&B
# One run holding the attention figures (offline by default: `wandb sync` it later).

# %%
from proxyclip.config import to_container
from proxyclip.loggers import build_logger

log_cfg = compose_config("segment", core_overrides(SMOKE) + wandb_overrides(SMOKE, WANDB_MODE, group="attention-maps"))
with build_logger(log_cfg.logger, to_container(log_cfg), job_type="figures") as log:
    log.log_figure("attention/vfms", fig_vfms)
    log.log_figure("attention/gamma_beta", fig_gamma_beta)
    log.log_figure("attention/stages", fig_stages)
    log.log_segmentation("segmentation/proxyclip", image, pred_proxy.labels, class_names=pred_proxy.class_names)
    print("W&B run:", getattr(log, "run_dir", None))
