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
# # 7. Inside CLIP: every block's attention, the residual stream, a logit lens
#
# The methods of notebook 6 change only CLIP's last block; the 2025 methods (ResCLIP, SC-CLIP, GEM)
# read the blocks before it. Here we look inside, block by block (0-indexed like open_clip's
# `visual.transformer.resblocks[i]`; a paper's "block 6" is block 5 here):
# - one patch's attention in every block, recorded through the hook points
#   `clip.blocks.{i}.attn.pattern` (CLIP's blocks run step by step only because someone listens);
# - the norms of the residual stream's tokens per block, the largest highlighted: the "outlier"
#   tokens SC-CLIP repairs (here simply the top-k norms);
# - a logit lens: each block's output read by CLIP's head (ln_post, proj) as if it were the last,
#   scored against the classes: a segmentation per block.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models (two blocks), a small image.

# %% tags=["parameters"]
SMOKE = None
IMAGE = None  # a path; None = the bundled sample image
CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]
PIXEL = (0.45, 0.5)  # the chosen pixel, as fractions of the image's (height, width)
TOP_K = 5  # the tokens with the largest norms highlighted per block
WANDB_MODE = None
GROUP = "inside-clip"

# %%
# %matplotlib inline
import time

import numpy as np
import torch
from _workbench import core_overrides, marked, smoke_mode, wandb_overrides
from matplotlib.figure import Figure

from proxyclip import Segmenter, compose_config, lens, load_image, viz
from proxyclip.backbones.blocks import block_pattern
from proxyclip.config import to_container
from proxyclip.loggers import build_logger
from proxyclip.parts import describe_size
from proxyclip.widgets import ASSETS

SMOKE = smoke_mode(SMOKE)
cfg = compose_config(overrides=core_overrides(SMOKE) + ["method=clip"])  # CLIP only: no VFM is built
seg = Segmenter.from_config(cfg)
L = seg.clip.num_blocks
image = load_image(IMAGE or ASSETS / "sample.jpg")
if SMOKE:
    image = torch.nn.functional.interpolate(image[None], size=(72, 96), mode="bilinear", align_corners=False)[0]
print(f"CLIP {cfg.clip.name} ({L} blocks), random weights: {seg.random_weights}; image {tuple(image.shape[1:])}")

# %% [markdown]
# ## Every block's attention, through the hook points
# `run_with_cache` with the image (not an `Encoded`: the per-block points fire only while the blocks
# run) records `clip.blocks.{i}.attn.pattern` for every block the encode runs (0..L-2); the last
# block's is CLIP's own attention there (`method="clip"`'s `attention.pattern`). The same patterns
# can be recomputed from the encode's layer parts (`seg.encode(image, keep=lens.every_part(seg))`):
# the check below compares them.

# %%
t = time.perf_counter()
_, cache = seg.run_with_cache(image, CLASSES, names=["clip.blocks.{i}.attn.pattern", "attention.pattern"],
                              method="clip")
t_hooked = time.perf_counter() - t
t = time.perf_counter()
enc = seg.encode(image, keep=lens.every_part(seg))  # the fused blocks, every block's input kept
t_encode = time.perf_counter() - t
patterns = [cache[f"clip.blocks.{i}.attn.pattern"] for i in range(L - 1)] + [cache["attention.pattern"]]
states = lens.residual_stream(seg, enc)

gap = max(float((block_pattern(seg.clip.block(i), states[i][1]) - patterns[i]).abs().max()) for i in range(L - 1))
print(f"encode with every block hooked {t_hooked:.2f} s, fused encode keeping every part {t_encode:.2f} s; "
      f"hooked vs recomputed attention: max |diff| {gap:.1e}")
print("an Encoded with every layer part:", describe_size(enc))

y, x = PIXEL[0] * enc.image_size[0], PIXEL[1] * enc.image_size[1]
maps = []
for i, p in enumerate(patterns):
    row, grid, patch, window = viz.pattern_row(p, enc, y, x)
    maps.append((f"block {i}", row, grid, patch))
pixels = viz.window_pixels(enc.image, enc.resized_size, enc.windows[window])
fig_blocks = marked(viz.plot_attention_grid(pixels, maps, ncols=min(4, L)), seg)
fig_blocks

# %% [markdown]
# ## The residual stream's norms, block by block
# Each panel: the norm of every patch token of the chosen window entering block i (and, last, the
# last block's output), with the `TOP_K` largest circled. In pretrained CLIP a few tokens grow
# very large norms in the middle blocks and keep them: the outliers that SC-CLIP detects and repairs.

# %%
gh, gw = enc.clip_grid
norms = [(name, lens.token_norms(t)[window]) for name, t in states]
ncols = min(4, len(norms))
nrows = -(-len(norms) // ncols)
fig_norms = Figure(figsize=(3.0 * ncols, 2.8 * nrows + 0.4), layout="constrained")
axes = np.atleast_1d(fig_norms.subplots(nrows, ncols)).ravel()
rows = []
for ax, (name, n) in zip(axes, norms):
    patch_norms = n[1:]
    top = lens.top_tokens(patch_norms, TOP_K)
    im = ax.imshow(patch_norms.reshape(gh, gw).numpy(), cmap="magma")
    ax.scatter((top % gw).numpy(), (top // gw).numpy(), s=60, facecolors="none", edgecolors="cyan", linewidths=1.5)
    ax.set_title(f"{name}\nmax {float(patch_norms.max()):.1f}, median {float(patch_norms.median()):.1f}", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig_norms.colorbar(im, ax=ax, shrink=0.8)
    rows.append([name, float(n[0]), float(patch_norms.median()), float(patch_norms.max()),
                 ", ".join(str(int(k)) for k in top)])
for ax in axes[len(norms):]:
    ax.axis("off")
fig_norms = marked(fig_norms, seg)
columns = ["state", "CLS norm", "median patch norm", "max patch norm", f"top-{TOP_K} patches"]
for r in rows:
    print(f"{r[0]:16s} CLS {r[1]:7.2f}  median {r[2]:7.2f}  max {r[3]:7.2f}  top {r[4]}")
fig_norms

# %% [markdown]
# ## A logit lens: a segmentation per block
# Each block's output goes through CLIP's head (ln_post, proj, L2 norm) and is scored against the
# classes as a decode scores the last block's: windows merged, argmax per pixel. The last panel is
# vanilla CLIP's own segmentation.

# %%
lens_labels = lens.logit_lens(seg, enc, CLASSES)
clip_labels = seg.decode(enc, CLASSES, method="clip", logit_scale=40.0, prob_thd=0.0).labels
agreement = {i: float((lab == clip_labels).float().mean()) for i, lab in lens_labels.items()}
print("pixels agreeing with vanilla CLIP's segmentation:", ", ".join(f"block {i} {a:.2f}" for i, a in agreement.items()))
fig_lens = marked(viz.plot_method_grid(image, {f"block {i}": lab for i, lab in lens_labels.items()}, CLASSES), seg)
fig_lens

# %% [markdown]
# ## Log to Weights & Biases
# One run: the three figures, the norms table, and how much of each block's lens agrees with the last.

# %%
log_cfg = compose_config("segment", core_overrides(SMOKE) + wandb_overrides(SMOKE, WANDB_MODE, group=GROUP))
with build_logger(log_cfg.logger, {"blocks": L, **to_container(cfg)}, name=f"{GROUP}-{cfg.clip.name}",
                  job_type="inside") as log:
    log.log_figure("attention_by_block", fig_blocks)
    log.log_figure("norms_by_block", fig_norms)
    log.log_figure("logit_lens", fig_lens)
    log.log_table("residual_norms", columns, rows)
    log.log_summary({"blocks": L, **{f"lens_agreement/block_{i}": a for i, a in agreement.items()}})
print("logged", len(rows), "states,", L, "lens segmentations")
