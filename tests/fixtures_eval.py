"""Shared pieces of the evaluation tests: tiny-model overrides, configs, an independent mIoU (fixtures: conftest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# tiny random models, a 64-px protocol (conf/experiment/tiny.yaml overrides the dataset's window)
TINY_EVAL = ["experiment=tiny", "progress=false", "checkpoint_seconds=0"]


def eval_cfg(name: str, data_root, *extra: str, config_name: str = "eval"):
    from proxyclip import compose_config

    return compose_config(config_name, [f"dataset={name}", f"data_root={data_root}", *TINY_EVAL, *extra])


def miou_by_hand(cm: np.ndarray) -> float:
    """mmseg's mIoU from a confusion matrix, written out independently (percent)."""
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    valid = union > 0
    return float(100 * np.mean(inter[valid] / union[valid]))


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", MPLBACKEND="Agg",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def encoded_twice_through_cache(seg, image, tmp_path):
    """``image`` (3, H, W) in [0, 1] saved as a PNG, encoded through a fresh feature cache twice:
    -> (first, second, SAM part calls made by the second). The second must be a cache hit."""
    from PIL import Image

    from proxyclip.evaluation.cache import FeatureCache

    path = tmp_path / "a.png"
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    cache = FeatureCache(tmp_path / "cache", seg, print_fn=lambda s: None)
    first = cache.get_or_encode(path, lambda reuse: seg.encode(path, reuse=reuse))
    calls = seg.sam.calls
    second = cache.get_or_encode(path, lambda reuse: seg.encode(path, reuse=reuse))
    assert cache.hits == 1
    return first, second, seg.sam.calls - calls
