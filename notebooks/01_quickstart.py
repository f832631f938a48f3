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
# # 1. Quickstart: segment an image with ProxyCLIP
#
# ProxyCLIP is training-free: a CLIP model says *what* is in the image, a vision foundation
# model (DINO by default) says *which patches belong together*. Give it an image and a list of
# class names; it returns a label map.
#
# **Smoke mode** (`PROXYCLIP_SMOKE=1`, what CI runs): tiny random models and a small image, so
# the notebook runs in seconds and the pictures are meaningless. Without it the notebook uses
# CLIP ViT-B/16 + DINO ViT-B/8 with pretrained weights (random weights, with a loud note, when
# they cannot be downloaded).

# %% tags=["parameters"]
SMOKE = None  # None: from the PROXYCLIP_SMOKE environment variable
IMAGE = None  # a path; None = the bundled sample image
CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]

# %%
# %matplotlib inline
from _workbench import core_overrides, marked, smoke_mode

from proxyclip import Segmenter, compose_config, load_image, viz
from proxyclip.widgets import ASSETS, Explorer

SMOKE = smoke_mode(SMOKE)
overrides = core_overrides(SMOKE)
print("smoke mode" if SMOKE else "full mode", overrides)

# %% [markdown]
# ## Load the models
# `compose_config` reads the Hydra configs in `conf/` (the same ones the command line uses);
# every override is a `group=option` or `key=value` string.

# %%
cfg = compose_config(overrides=overrides)
seg = Segmenter.from_config(cfg)
print(f"CLIP {cfg.clip.name}, VFM {cfg.vfm.name}, random weights: {seg.random_weights}")
print("method:", dict(cfg.method))

# %% [markdown]
# ## Segment
# A class line may hold synonyms separated by `; ` - each name is scored, the class takes the best.

# %%
image = load_image(IMAGE or ASSETS / "sample.jpg")
if SMOKE:  # a small image keeps smoke mode fast
    import torch.nn.functional as F

    image = F.interpolate(image[None], size=(96, 80), mode="bilinear", align_corners=False)[0].clamp(0, 1)
pred = seg.predict(image, CLASSES)
print("labels", tuple(pred.labels.shape), "classes", pred.class_names, "queries", pred.queries)

# %%
marked(viz.plot_segmentation(pred.image, pred.labels, pred.class_names, title="ProxyCLIP"), seg)

# %% [markdown]
# Each query's score map (cosine similarity of the dense CLIP embeddings with the query's text
# embedding), on one colour scale:

# %%
marked(viz.plot_class_scores(pred.image, pred.scores, pred.queries, ncols=4), seg)

# %% [markdown]
# ## The two halves: encode once, decode many times
# `encode` runs the backbones (expensive); `decode` runs the proxy attention and the class
# decision (cheap). Changing any knob of the method (for ProxyCLIP gamma, beta, shift, mask; every
# method's residual/ffn switches), the logit scale, the threshold, the post-process or the class
# list only needs a new decode. `seg.decode_spec(...)` shows what a decode will run with.

# %%
import time

t = time.perf_counter()
enc = seg.encode(image)
t_enc = time.perf_counter() - t
t = time.perf_counter()
pred_sharp = seg.decode(enc, CLASSES, gamma=6.0)
t_dec = time.perf_counter() - t
print(f"encode {t_enc * 1000:.0f} ms, decode {t_dec * 1000:.0f} ms; {len(enc.windows)} window(s)")
print("decode spec:", pred_sharp.spec.flat())
marked(viz.plot_segmentation(pred_sharp.image, pred_sharp.labels, pred_sharp.class_names, title="gamma = 6"), seg)

# %% [markdown]
# ## The explorer
# Its controls come from the declared knobs of the chosen method (a slider per number, a checkbox
# per switch: for ProxyCLIP gamma, beta, shift, mask, residual, ffn, the logit scale and the
# probability threshold; NACLIP gets its `gaussian_std`) and of the chosen post-process (PAMR's
# steps and dilations). Each re-runs only the decode; the patch sliders choose the pixel whose
# attention under the method (and CLIP's own last-block attention, for contrast) is shown.
# Changing a backbone re-encodes, with a progress bar.

# %%
# `segmenter=seg` reuses the pipeline built above for the initial backbones; other choices in the
# dropdowns are built on demand with the same weights setting and overrides.
if SMOKE:
    explorer = Explorer(clip="test_tiny", vfm="test_tiny", weights="random", overrides=overrides[3:], image=image,
                        classes=CLASSES, segmenter=seg, clip_options=["test_tiny"], vfm_options=["test_tiny", "test_tiny_mae"])
else:
    explorer = Explorer(clip="vit_b16", vfm="dino_vitb8", weights="pretrained", segmenter=seg,
                        overrides=["weights.fallback_to_random=true"], image=image, classes=CLASSES)
explorer
