"""Shared settings of the workbench notebooks: smoke mode, backbones, a small labeled set.

Smoke mode (``PROXYCLIP_SMOKE=1``, what CI runs): tiny random models (``clip=test_tiny
vfm=test_tiny``), small images, few sweep points, W&B offline into a temporary folder.
Otherwise the notebooks run for real: pretrained weights when they can be had (else random
weights, said loudly), full-size images, the paper's grids.

Temporary folders (the synthetic labeled set, smoke-mode W&B runs, sweep outputs) come from
:func:`scratch_dir` and are deleted when the kernel exits: nothing is left in the system temp folder.
Figures made with random weights carry the red band of ``viz.mark_random_weights``: :func:`marked`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent
_SCRATCH: List[tempfile.TemporaryDirectory] = []  # alive until the kernel exits, then deleted


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder (``prefix`` + random) deleted when the process exits (or by :func:`cleanup`)."""
    folder = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
    _SCRATCH.append(folder)
    return Path(folder.name)


def cleanup() -> None:
    """Delete every :func:`scratch_dir` folder now (they are deleted at exit anyway)."""
    while _SCRATCH:
        _SCRATCH.pop().cleanup()


def marked(fig, seg):
    """``fig`` with the red random-weights band when ``seg`` runs random weights (and why), as the
    explorer's and ``proxyclip-segment``'s figures have; unchanged with real weights."""
    from proxyclip import viz

    return viz.marked(fig, seg)


def smoke_mode(value: Optional[bool] = None) -> bool:
    """The notebook's SMOKE parameter if set (papermill), else the PROXYCLIP_SMOKE environment variable."""
    if value is not None:
        return bool(value)
    return os.environ.get("PROXYCLIP_SMOKE", "0").strip().lower() in ("1", "true", "yes", "on")


def core_overrides(smoke: bool, clip: Optional[str] = None, vfm: Optional[str] = None) -> List[str]:
    """Config overrides for ``compose_config``: tiny random models in smoke mode, else the paper's backbones."""
    if smoke:
        return [f"clip={clip or 'test_tiny'}", f"vfm={vfm or 'test_tiny'}", "weights=random",
                "protocol.short_side=64", "protocol.crop=64", "protocol.stride=32"]
    return [f"clip={clip or 'vit_b16'}", f"vfm={vfm or 'dino_vitb8'}", "weights=pretrained",
            "weights.fallback_to_random=true"]


def wandb_overrides(smoke: bool, mode: Optional[str] = None, group: Optional[str] = None) -> List[str]:
    """``logger=wandb`` overrides: ``mode`` (default $WANDB_MODE, else offline); runs are written under
    $PROXYCLIP_WANDB_DIR if set, else (smoke mode) a temporary folder (deleted at exit), else ./wandb."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    out = ["logger=wandb", f"logger.mode={mode}"]
    folder = os.environ.get("PROXYCLIP_WANDB_DIR") or (str(scratch_dir("proxyclip-wandb-")) if smoke else None)
    if folder:
        out.append(f"logger.dir={folder}")
    if group:
        out.append(f"logger.group={group}")
    return out


SHAPES_CLASSES = ["sky", "grass", "sun", "red car; car"]


def make_shapes_dataset(root: Path, n: int = 4, size: int = 96, seed: int = 0) -> Path:
    """A small labeled set in the ``custom`` dataset format (images/, labels/, classes.txt):
    a sky (blue gradient), grass (green, textured), a sun (yellow disc) and a red car (box).
    Random textures make every image different; labels are exact. Returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    for i in range(n):
        h, w = size, int(size * rng.uniform(1.0, 1.5))
        yy, xx = np.mgrid[0:h, 0:w]
        horizon = int(h * rng.uniform(0.45, 0.65))
        label = np.where(yy < horizon, 0, 1).astype(np.uint8)
        img = np.zeros((h, w, 3), np.float32)
        sky = np.stack([0.35 + 0.2 * yy / h, 0.55 + 0.2 * yy / h, np.full_like(yy, 0.95, dtype=float)], -1)
        grass = np.stack([0.15 + 0.1 * rng.random((h, w)), 0.55 + 0.2 * rng.random((h, w)), 0.1 + 0.05 * rng.random((h, w))], -1)
        img[:] = np.where((yy < horizon)[..., None], sky, grass)
        cy, cx, r = rng.uniform(0.1, 0.3) * h, rng.uniform(0.15, 0.85) * w, rng.uniform(0.07, 0.12) * h
        sun = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        img[sun] = (1.0, 0.9, 0.2)
        label[sun] = 2
        ch, cw = int(h * rng.uniform(0.12, 0.2)), int(w * rng.uniform(0.2, 0.3))
        y0 = min(horizon + int(h * 0.05), h - ch - 1)
        x0 = int(rng.uniform(0.05, 0.95 - cw / w) * w)
        img[y0:y0 + ch, x0:x0 + cw] = (0.85, 0.1, 0.1)
        label[y0:y0 + ch, x0:x0 + cw] = 3
        label[0, 0] = 255  # one ignored pixel, as real datasets have
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(label).save(root / "labels" / f"{i:04d}.png")
    return root


def labeled_set_root(smoke: bool, data_root: Optional[str] = None) -> Path:
    """``data_root`` (a folder in the custom format) if given, else a fresh synthetic shapes set
    (in a temporary folder deleted at exit)."""
    if data_root:
        return Path(data_root)
    n, size = (3, 64) if smoke else (12, 336)
    return make_shapes_dataset(scratch_dir("proxyclip-shapes-"), n=n, size=size)


def colour_proposals(image, k: int = 6, iterations: int = 10, seed: int = 0) -> np.ndarray:
    """Class-agnostic mask proposals of a (3, H, W) image in [0, 1] without a mask model (for smoke
    runs and machines without SAM): k-means on the pixels' colours (``k`` centres started at seeded
    random pixels, ``iterations`` rounds), one boolean mask per non-empty cluster -> (M, H, W) bool,
    the layout of a ``masks=file`` stack (docs/regions.md). They cover every pixel."""
    import torch

    pixels = torch.as_tensor(image).float().flatten(1).T  # (H*W, 3)
    g = torch.Generator().manual_seed(seed)
    centres = pixels[torch.randperm(pixels.shape[0], generator=g)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(pixels, centres).argmin(1)
        for c in range(centres.shape[0]):
            if (assign == c).any():
                centres[c] = pixels[assign == c].mean(0)
    assign = torch.cdist(pixels, centres).argmin(1).view(image.shape[1:])
    return np.stack([(assign == c).numpy() for c in range(centres.shape[0]) if (assign == c).any()])
