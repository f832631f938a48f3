"""Vision foundation models through timm: DINO, DINOv2 (registers), SAM, MAE; ``none`` for the baseline.

Every VFM returns patch features as a map (B, C, Hv, Wv):
    dino / dinov2 / mae  final-norm patch tokens (``forward_features``), prefix tokens dropped
    sam                  image-encoder neck output (256 channels), input resized to ``input_size``
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import (WeightsUnavailable, check_checkpoint_file, hub_failure_message, mismatch_error,
                      offline_unless_reachable, seeded)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILIES = ("dino", "dinov2", "sam", "mae", "none")


def create_vfm_model(timm_name: str, source: str, seed: int = 0, checkpoint: Optional[str] = None,
                     timm_kwargs: Optional[Mapping[str, Any]] = None, is_sam: bool = False) -> nn.Module:
    """A timm model in eval mode, with dynamic input sizes. ``source``: pretrained | local | random."""
    base = timm_name.split(".")[0]
    if not timm.is_model(base):
        raise ValueError(f"unknown timm model {timm_name!r} (vfm.timm_name)")
    kwargs = dict(timm_kwargs or {})
    if not is_sam:
        kwargs.update(num_classes=0, dynamic_img_size=True)

    def build(pretrained: bool, **extra) -> nn.Module:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **extra)

    if source == "random":
        model = seeded(seed, f"vfm:{timm_name}:{sorted(kwargs.items())}", lambda: build(False))
    elif source == "local":
        path = check_checkpoint_file(checkpoint, "vfm.checkpoint")
        try:
            model = build(True, pretrained_cfg_overlay=dict(file=str(path)))
        except RuntimeError as e:
            raise mismatch_error(path, f"timm {timm_name}", e) from e
        except Exception as e:
            raise ValueError(f"vfm.checkpoint {path}: cannot be read as a timm checkpoint ({e})") from e
    elif source == "pretrained":
        with offline_unless_reachable() as reachable:
            try:
                model = build(True)
            except Exception as e:
                raise WeightsUnavailable(hub_failure_message(f"VFM {timm_name}", reachable, "vfm.checkpoint")) from e
    else:
        raise ValueError(f"weights.source must be pretrained, local or random; got {source!r}")
    return model.eval().requires_grad_(False)


class VfmBackbone(nn.Module):
    """Patch features of a timm VFM as (B, C, Hv, Wv) maps."""

    def __init__(self, model: nn.Module, family: str, input_size: Optional[int] = None):
        super().__init__()
        if family not in FAMILIES or family == "none":
            raise ValueError(f"vfm.family must be one of {FAMILIES[:-1]} for a VFM model, got {family!r}")
        self.model = model
        self.family = family
        self.input_size = input_size
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    @property
    def resizes_input(self) -> bool:
        """True when the VFM sees a fixed-size resized copy (SAM), so windows need no VFM padding."""
        return self.input_size is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized images (B, 3, h, w) -> features (B, C, Hv, Wv)."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x.to(self.dtype)
        if self.family == "sam":
            return self.model.forward_features(x)
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens:]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
