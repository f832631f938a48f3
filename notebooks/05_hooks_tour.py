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
# # 5. Hooks tour: read any stage, intervene at one
#
# Every stage's tensor passes through a named hook point. `run_with_cache` records them;
# `run_with_hooks` lets a function read or replace them (`fn(tensor, hook) -> replacement or
# None`). This notebook lists the hook points, reads a few, then runs two interventions:
#
# 1. **The ceiling of the method**: replace the VFM affinity by one built from the ground-truth
#    mask (tokens of the same class are similar, others not). This is what a perfect VFM would
#    give; the gap to it says how much better grouping could still help.
# 2. **Swap VFMs**: build the affinity from a second VFM's features while the first pipeline
#    supplies everything else.
#
# Smoke mode (`PROXYCLIP_SMOKE=1`): tiny random models and the small synthetic labeled set.

# %% tags=["parameters"]
SMOKE = None
DATA_ROOT = None  # a folder in the custom format; None = the synthetic set
OTHER_VFM = "dinov2_vitb14_reg"  # for the swap
MAX_IMAGES = 8

# %%
# %matplotlib inline
import torch
import torch.nn.functional as F
from _workbench import core_overrides, labeled_set_root, marked, smoke_mode

from proxyclip import Segmenter, compose_config, viz
from proxyclip.data import build_dataset
from proxyclip.metrics import confusion_matrix, metrics_from_confusion

SMOKE = smoke_mode(SMOKE)
root = labeled_set_root(SMOKE, DATA_ROOT)
cfg = compose_config("eval", core_overrides(SMOKE) + ["dataset=custom", f"dataset.root={root}"])
dataset = build_dataset(cfg.dataset)
classes = dataset.class_names
seg = Segmenter.from_config(compose_config(overrides=core_overrides(SMOKE)))
image, gt = dataset[0]
print(f"{len(dataset)} images, classes {classes}")

# %% [markdown]
# ## Every hook point, with its shape
# A family such as `clip.blocks.{i}.attn.pattern` is one point per block (`clip.blocks.0.attn.pattern`,
# ...): shown here by its first member and how many blocks fired it (notebook 7 looks inside).

# %%
from proxyclip.hooks import family_of

pred, cache = seg.run_with_cache(image, classes)
for name in seg.hook_names:
    members = [n for n in cache if family_of(n) == name]
    t = cache[members[0]] if members else None
    blocks = f" x {len(members)} blocks" if "{i}" in name and members else ""
    print(f"{name:32s}", "did not fire" if t is None else f"{tuple(t.shape)} {t.dtype}{blocks}")

# %% [markdown]
# ## Reading: the VFM features as colours
# The first three principal components of the `vfm.features` tokens of window 0, as RGB:
# patches the VFM groups together get similar colours.

# %%
feats = cache["vfm.features"][0]  # (C, Hv, Wv)
c, h, w = feats.shape
x = feats.flatten(1).T
x = x - x.mean(0)
_, _, v = torch.pca_lowrank(x, q=3, center=False)
pcs = x @ v[:, :3]
pcs = (pcs - pcs.min(0).values) / (pcs.max(0).values - pcs.min(0).values + 1e-8)
from matplotlib.figure import Figure

fig = Figure(figsize=(6, 3), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.imshow(viz.image_to_float_hwc(image))
ax1.set_title("image")
ax2.imshow(pcs.reshape(h, w, 3).numpy(), interpolation="nearest")
ax2.set_title(f"vfm.features PCA ({h}x{w} tokens, window 0)")
for a in (ax1, ax2):
    a.set_axis_off()
marked(fig, seg)


# %% [markdown]
# ## Intervention 1: the affinity of a perfect VFM
# For each window, the ground truth is resized to the window's token grid (nearest); the
# replacement affinity is 1 between tokens of the same class and 0 otherwise (ignored pixels
# match nothing but themselves). The rest of the pipeline - normalization with beta and gamma,
# masking, softmax, aggregation of CLIP's values - runs unchanged.

# %%
def token_labels(gt, enc, grid):
    """(n_win, Hv*Wv) ground-truth class of each token of each window."""
    g = F.interpolate(gt[None, None].float(), size=enc.resized_size, mode="nearest")[0, 0]
    top, bottom, left, right = enc.pad
    out = []
    for (y1, y2, x1, x2) in enc.windows:
        win = F.pad(g[y1:y2, x1:x2], (left, right, top, bottom), value=255)
        out.append(F.interpolate(win[None, None], size=grid, mode="nearest")[0, 0].flatten().long())
    return torch.stack(out)


def oracle_affinity_hook(gt, enc):
    grid = tuple(enc.vfm_features.shape[-2:])
    labels = token_labels(gt, enc, grid)  # (n_win, N)

    def hook(affinity, point):  # affinity: (B, N, N) for windows point.window_start ...
        lab = labels[point.window_start:point.window_start + affinity.shape[0]]
        same = (lab[:, :, None] == lab[:, None, :]) & (lab[:, :, None] != 255)
        eye = torch.eye(lab.shape[1], dtype=torch.bool)[None]
        return (same | eye).to(affinity.dtype)

    return hook


n_images = min(MAX_IMAGES, len(dataset))
samples = [dataset[i] for i in range(n_images)]
encoded = [seg.encode(img) for img, _ in samples]  # encode once; both runs below only decode


def miou(predict):
    """mIoU over the samples; predict(i) -> (H, W) labels of sample i."""
    cm = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    for i, (_, gt) in enumerate(samples):
        cm += confusion_matrix(predict(i), gt, len(classes), ignore_index=dataset.ignore_index)
    return metrics_from_confusion(cm, classes)["mIoU"]


miou_none = miou(lambda i: seg.decode(encoded[i], classes, method="maskclip", residual=False, ffn=False).labels)
miou_proxy = miou(lambda i: seg.decode(encoded[i], classes).labels)
miou_oracle = miou(lambda i: seg.run_with_hooks(
    encoded[i], classes, hooks={"proxy.affinity": oracle_affinity_hook(samples[i][1], encoded[i])}).labels)
print(f"mIoU  no VFM {miou_none:.1f}   ProxyCLIP {miou_proxy:.1f}   ground-truth affinity (ceiling) {miou_oracle:.1f}")

# %%
enc = encoded[0]
pred_oracle = seg.run_with_hooks(enc, classes, hooks={"proxy.affinity": oracle_affinity_hook(gt, enc)})
marked(viz.plot_baseline_comparison(image, seg.decode(enc, classes).labels, pred_oracle.labels, classes,
                                    gt_labels=gt, names=("ProxyCLIP", "ground-truth affinity")), seg)

# %% [markdown]
# ## Intervention 2: the affinity from another VFM
# The second pipeline's `vfm.features` (recorded at encode time) are resized to the first
# pipeline's token grid; the hook replaces `proxy.affinity` by their cosine affinity. CLIP,
# the values and everything after stay the first pipeline's. (In smoke mode the "other VFM"
# is the tiny one with a different random seed.)

# %%
other_overrides = (core_overrides(SMOKE) + ["weights.seed=1"]) if SMOKE else core_overrides(SMOKE, vfm=OTHER_VFM)
seg_other = Segmenter.from_config(compose_config(overrides=other_overrides))
enc_other = seg_other.encode(image)
assert enc_other.windows == enc.windows, "both pipelines must cut the same windows"
grid = tuple(enc.vfm_features.shape[-2:])
other = F.interpolate(enc_other.vfm_features, size=grid, mode="bilinear", align_corners=False)
f = F.normalize(other.flatten(2).transpose(1, 2), dim=-1)
other_affinity = f @ f.transpose(1, 2)  # (n_win, N, N)


def swap_hook(affinity, point):
    return other_affinity[point.window_start:point.window_start + affinity.shape[0]]


pred_swapped = seg.run_with_hooks(enc, classes, hooks={"proxy.affinity": swap_hook})
print(f"affinity from {seg_other.cfg.vfm.name} ({tuple(enc_other.vfm_features.shape[-2:])} tokens, resized to {grid})")
marked(viz.plot_baseline_comparison(image, seg.decode(enc, classes).labels, pred_swapped.labels, classes,
                                    gt_labels=gt, names=(f"affinity from {seg.cfg.vfm.name}",
                                                         f"affinity from {seg_other.cfg.vfm.name}")), seg)
