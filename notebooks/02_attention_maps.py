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
from _workbench import core_overrides, smoke_mode, wandb_overrides

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
# A helper: for one pipeline and one pixel, the row of the proxy attention (from the
# `proxy.attention` hook) and of CLIP's own last-block attention (computed from the tokens at
# the `clip.last_block_input` hook with the block's own weights), plus the window they live in.

# %%
def attention_rows(seg, cache, enc_like, y, x):
    """-> (window pixels, [(title, row, grid, patch), ...]) for the pixel (y, x) of the original image."""
    values = cache["clip.values"]
    clip_grid = tuple(values.shape[-2:])
    win, r, c = viz.locate_patch(y, x, enc_like["image_size"], enc_like["resized_size"], enc_like["windows"],
                                 clip_grid, pad=enc_like["pad"])
    pixels = viz.window_pixels(image, enc_like["resized_size"], enc_like["windows"][win])
    maps = []
    if "proxy.attention" in cache:
        grid = tuple(cache["vfm.features"].shape[-2:])
        pad = (0, 0, 0, 0) if seg.vfm.resizes_input else enc_like["pad"]
        _, vr, vc = viz.locate_patch(y, x, enc_like["image_size"], enc_like["resized_size"], enc_like["windows"],
                                     grid, pad=pad)
        maps.append((f"proxy: {seg.cfg.vfm.name} {grid[0]}x{grid[1]}", cache["proxy.attention"][win, vr * grid[1] + vc],
                     grid, (vr, vc)))
    block = seg.clip_model.visual.transformer.resblocks[-1]
    clip_attn = viz.clip_last_block_attention(block, cache["clip.last_block_input"][win:win + 1])[0]
    maps.append((f"CLIP's own ({seg.cfg.clip.name})", clip_attn[r * clip_grid[1] + c], clip_grid, (r, c)))
    return pixels, maps


def geometry(seg, image):
    enc = seg.encode(image)
    return enc, dict(image_size=enc.image_size, resized_size=enc.resized_size, windows=enc.windows, pad=enc.pad)


# %% [markdown]
# ## Different VFMs, same CLIP
# Each VFM has its own token grid (DINO B/8: 42x42 at 336 pixels, B/16 and MAE: 21x21, DINOv2
# B/14: 24x24, SAM: 64x64 on a 1024 input). The last panel is CLIP's own attention, which
# ProxyCLIP throws away: it is spatially diffuse.

# %%
maps, pixels = [], None
for name in VFMS:
    seg = Segmenter.from_config(compose_config(overrides=core_overrides(SMOKE, vfm=name)))
    enc, geo = geometry(seg, image)
    _, cache = seg.run_with_cache(image, CLASSES, names=["vfm.features", "clip.values", "clip.last_block_input",
                                                          "proxy.attention"])
    pixels, rows = attention_rows(seg, cache, geo, y, x)
    maps.extend(rows[:-1])
    clip_map = rows[-1]
    if name != VFMS[-1]:
        del seg, cache
        gc.collect()
fig_vfms = viz.plot_attention_grid(pixels, maps + [clip_map], ncols=3)
fig_vfms

# %% [markdown]
# ## Gamma and beta
# Gamma scales the normalized affinity (an inverse temperature: larger = sharper attention);
# beta shifts it (larger = more entries fall below 0 and are masked out). One encode, one
# decode per setting.

# %%
# With an Encoded as input, encode-time hooks (clip.last_block_input) do not fire: take those
# tokens from the last full run above (same image, same CLIP).
_, cache_full = seg.run_with_cache(image, CLASSES, names=["clip.last_block_input"])
grid_maps = []
for gamma in GAMMAS:
    for beta in BETAS:
        _, c = seg.run_with_cache(enc, CLASSES, names=["proxy.attention"], gamma=gamma, beta=beta)
        c = {**c, "vfm.features": enc.vfm_features, "clip.values": enc.clip_values,
             "clip.last_block_input": cache_full["clip.last_block_input"]}
        pixels, rows = attention_rows(seg, c, geo, y, x)
        title, row, grid, patch = rows[0]
        grid_maps.append((f"gamma={gamma:g} beta={beta:g}", row, grid, patch))
fig_gamma_beta = viz.plot_attention_grid(pixels, grid_maps, ncols=len(BETAS))
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
fig_stages

# %% [markdown]
# ## Without a VFM vs with one
# `vfm=none` is the MaskCLIP-style baseline: CLIP's last-block values without any attention.

# %%
seg_none = Segmenter.from_config(compose_config(overrides=core_overrides(SMOKE, vfm="none")))
pred_none = seg_none.predict(image, CLASSES)
pred_proxy = seg.decode(enc, CLASSES)
viz.plot_baseline_comparison(image, pred_none.labels, pred_proxy.labels, CLASSES,
                             names=("CLIP, no VFM", f"ProxyCLIP + {seg.cfg.vfm.name}"))

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
