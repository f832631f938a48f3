"""Backbones: CLIP via open_clip (clip.py), vision foundation models via timm (vfm.py), weights (weights.py)."""

from .clip import CLIP_MEAN, CLIP_STD, ClipBackbone, create_clip_model, create_tokenizer
from .vfm import VfmBackbone, build_vfm, create_vfm_model
from .weights import CheckpointMismatch, WeightsUnavailable

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipBackbone", "create_clip_model", "create_tokenizer", "VfmBackbone", "build_vfm",
           "create_vfm_model", "CheckpointMismatch", "WeightsUnavailable"]
