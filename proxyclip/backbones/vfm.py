"""Vision foundation models through timm's feature interface; ``vfm=none`` for none.

Any timm backbone with ``forward_intermediates`` and ``feature_info`` works (docs/vfm.md): DINO,
DINOv2, DINOv3, SAM, SAM2 Hiera, MAE, RADIO, ... A VFM returns one feature map (B, C, Hv, Wv)
per window, chosen by three knobs of ``conf/vfm/*.yaml``:

    layer    which feature layer (``model.feature_info``: a block of a ViT, a stage of Hiera);
             default -1, the last; negative counts from the end
    feature  tokens  the layer's output (prefix tokens dropped), as
                     ``forward_intermediates(x, indices=[layer], norm=norm, output_fmt="NCHW")``
             q|k|v   that block's attention projections: the fused ``attn.qkv`` output split in three
                     (heads concatenated, D wide), before any q/k norm or rotary embedding
             qk      the sum q + k of that block (CorrCLIP's DINO feature), D wide
    norm     tokens: the model's final norm on (SAM: its neck, 256 channels) or off.
             q|k|v|qk: ignored (the final norm acts on block outputs). Models without a final norm
             (SAM2 Hiera) need norm=false; asking for it is an error.

Mean and std come from timm's data config of the model (CLIP's for RADIO, ImageNet's for most).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..windows import symmetric_padding
from .blocks import BlockPoints, vfm_block_hooks
from .pos_embed import TimmTables, check_vfm_rule
from .readout_memo import memo_of, weights_version
from .weights import (WeightsUnavailable, check_checkpoint_file, hub_failure_message, mismatch_error,
                      offline_unless_reachable, seeded)

FEATURES = ("tokens", "q", "k", "v", "qk")


def create_vfm_model(timm_name: str, source: str, seed: int = 0, checkpoint: Optional[str] = None,
                     timm_kwargs: Optional[Mapping[str, Any]] = None, fixed_input_size: bool = False) -> nn.Module:
    """A timm model in eval mode. ``source``: pretrained | local | random.

    Unless the model takes a fixed input size (SAM), it is built without a classifier and
    with dynamic input sizes (``num_classes=0, dynamic_img_size=True``); a model that takes
    any size natively (SAM2 Hiera) refuses ``dynamic_img_size`` and is built without it.
    """
    base = timm_name.split(".")[0]
    if not timm.is_model(base):
        near = timm.list_models(f"*{base.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model {timm_name!r} (vfm.timm_name); timm models like it: {near}")
    kwargs = dict(timm_kwargs or {})
    try:
        if fixed_input_size:
            return _create(timm_name, source, seed, checkpoint, kwargs)
        try:
            return _create(timm_name, source, seed, checkpoint, dict(kwargs, num_classes=0, dynamic_img_size=True))
        except TypeError as e:
            if "dynamic_img_size" not in str(e):
                raise
            return _create(timm_name, source, seed, checkpoint, dict(kwargs, num_classes=0))
    except TypeError as e:
        refused = [k for k in kwargs if f"'{k}'" in str(e)]
        if not refused:
            raise
        raise ValueError(f"vfm.timm_name={timm_name} does not take the timm argument {refused[0]!r} of "
                         f"vfm.timm_kwargs={kwargs}: these come with the vfm preset (e.g. experiment=tiny's "
                         "vfm=test_tiny) and were inherited; clear them with vfm.timm_kwargs={} "
                         "or give this model's own") from None


def _create(timm_name: str, source: str, seed: int, checkpoint: Optional[str], kwargs: dict) -> nn.Module:
    def build(pretrained: bool, **extra) -> nn.Module:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **extra)

    if source == "random":
        model = seeded(seed, f"vfm:{timm_name}:{sorted(kwargs.items())}", lambda: build(False))
    elif source == "local":
        path = check_checkpoint_file(checkpoint, "vfm.checkpoint")
        try:
            model = build(True, pretrained_cfg_overlay=dict(file=str(path)))
        except TypeError:  # an argument the architecture does not take: create_vfm_model retries without it
            raise
        except RuntimeError as e:
            raise mismatch_error(path, f"timm {timm_name}", e) from e
        except Exception as e:
            raise ValueError(f"vfm.checkpoint {path}: cannot be read as a timm checkpoint ({e})") from e
    elif source == "pretrained":
        with offline_unless_reachable() as reachable:
            try:
                model = build(True)
            except TypeError:  # as above: not a download failure
                raise
            except Exception as e:
                raise WeightsUnavailable(hub_failure_message(f"VFM {timm_name}", reachable, "vfm.checkpoint")) from e
    else:
        raise ValueError(f"weights.source must be pretrained, local or random; got {source!r}")
    return official_sam_eps(model).eval().requires_grad_(False)


SAM_LAYER_NORM_EPS = 1e-6  # SAM's image encoder (blocks and neck); timm builds samvit_* blocks with 1e-5


def official_sam_eps(model: nn.Module) -> nn.Module:
    """SAM ViTs (timm ``VisionTransformerSAM``) with every LayerNorm at SAM's eps 1e-6, whatever the
    weights: timm passes ``nn.LayerNorm`` (eps 1e-5) to the blocks, the official encoder 1e-6."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(model, VisionTransformerSAM):
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = SAM_LAYER_NORM_EPS
    return model


class VfmBackbone(nn.Module):
    """One feature map (B, C, Hv, Wv) of a timm model: ``layer`` x ``feature`` x ``norm`` (module docstring).

    mean, std      3-tuples the input windows are normalized with (timm's data config)
    patch_size     the multiple a window is padded to (the layer's stride)
    resizes_input  True when the model sees a fixed-size resized copy (SAM): windows need no VFM padding
    channels       C of ``features``
    pos_resize     the position-embedding rule (``vfm.pos_resize``, proxyclip/backbones/pos_embed.py),
                   checked against the model; None: the model as timm runs it (no rule of ours)
    heads          q|k|v|qk: the layer's attention heads (channels = heads x head width); tokens: None
    """

    def __init__(self, model: nn.Module, layer: int = -1, feature: str = "tokens", norm: bool = True,
                 input_size: Optional[int] = None, name: str = "vfm", pos_resize: Optional[str] = None):
        super().__init__()
        self.model = model
        self.name = name
        self.pos_resize = None if pos_resize is None else check_vfm_rule(model, pos_resize, input_size is not None, name)
        self._tables = TimmTables()
        infos = list(getattr(model, "feature_info", None) or [])
        if not infos or not hasattr(model, "forward_intermediates"):
            raise ValueError(f"vfm={name}: timm model {type(model).__name__} has no feature interface "
                             "(forward_intermediates / feature_info)")
        if not -len(infos) <= layer < len(infos):
            raise ValueError(f"vfm.layer={layer} is out of range: vfm={name} has {len(infos)} feature layers "
                             f"(blocks), so vfm.layer must be in {-len(infos)}..{len(infos) - 1}")
        if feature not in FEATURES:
            raise ValueError(f"vfm.feature must be one of {FEATURES}, got {feature!r}")
        self.layer = layer % len(infos)
        self.feature = feature
        self.norm = bool(norm)
        self.input_size = input_size
        info = infos[self.layer]
        self.patch_size = int(info["reduction"])
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        data = timm.data.resolve_model_data_config(model)
        self.mean: Tuple[float, float, float] = tuple(float(m) for m in data["mean"])
        self.std: Tuple[float, float, float] = tuple(float(s) for s in data["std"])
        block = model.get_submodule(info["module"])
        qkv = None if feature == "tokens" else self._fused_qkv(block)
        try:  # the layer's q / k / v are captured for the readout memo with tokens too, when it has them
            captured = qkv if qkv is not None else self._fused_qkv(block)
        except ValueError:
            captured = None
        self._qkv_path = None if captured is None else f"{info['module']}.attn.qkv"  # a name: no second reference
        # heads of the attention the q/k/v come from (None for tokens); C = heads x head width
        self.heads: Optional[int] = None
        if qkv is not None:
            self.channels = int(qkv.out_features) // 3
            heads = getattr(model.get_submodule(info["module"]).attn, "num_heads", None)
            self.heads = None if heads is None else int(heads)
        else:
            self.channels = int(info.get("num_chs_norm", info["num_chs"]) if self.norm else info["num_chs"])

    def _fused_qkv(self, block: nn.Module) -> nn.Linear:
        """The block's fused q/k/v projection; an error when there is none or it runs per window."""
        where = f"vfm.feature={self.feature} (vfm={self.name}, layer {self.layer}, {type(block).__name__})"
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear):
            raise ValueError(f"{where}: the block's attention has no fused qkv projection (attn.qkv), "
                             "so q/k/v cannot be read; use vfm.feature=tokens")
        window = getattr(block, "window_size", 0)
        if any(int(s) > 0 for s in (window if isinstance(window, (tuple, list)) else [window or 0])):
            raise ValueError(f"{where}: the block attends within windows of {window}, so its q/k/v are per window; "
                             "choose a global-attention layer or vfm.feature=tokens")
        return qkv

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def resizes_input(self) -> bool:
        """True when the VFM sees a fixed-size resized copy (SAM), so windows need no VFM padding."""
        return self.input_size is not None

    def features(self, x: torch.Tensor, point: Optional[BlockPoints] = None) -> torch.Tensor:
        """Images (B, 3, h, w) normalized with ``mean``/``std`` -> float32 features (B, C, Hv, Wv).

        A fixed-size model sees ``x`` resized to ``input_size``; any other is padded (symmetric)
        to a multiple of ``patch_size`` first, so Hv, Wv = ceil(h / patch_size), ceil(w / patch_size).
        ``point``: the batch's ``vfm.blocks.{i}.*`` points (timm ViT blocks, proxyclip/backbones/blocks.py).
        """
        if self.resizes_input:
            if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        else:
            top, bottom, left, right = symmetric_padding(x.shape[-2], x.shape[-1], self.patch_size)
            x = F.pad(x, (left, right, top, bottom))
        x = x.to(self.dtype)
        # a listener on vfm.blocks.* or a graph to build (gradients on): the model runs, the memo is not used
        memo = memo_of(self.model) if point is None and not torch.is_grad_enabled() else None
        key = (self.layer, self.pos_resize, x.device, x.dtype, weights_version(self.model))
        made = memo.find(key, x) if memo is not None else None
        norm = self.norm and self.feature == "tokens"
        fresh = made is None or (made["norm"] != norm if self.feature == "tokens" else made["qkv"] is None)
        if fresh:
            with self._capture_qkv() as captured, vfm_block_hooks(self.model, point):
                tokens = self._intermediate(x)
            qkv = captured[0] if len(captured) == 1 else None
            if self.feature != "tokens" and qkv is None:
                self._split_qkv(captured, tokens.shape[-2:])  # its error: the qkv module did not run once
            made = {"tokens": tokens, "norm": norm, "qkv": qkv}
            if memo is not None:
                memo.store(key, x, made)  # stores copies
        if self.feature == "tokens":
            out = made["tokens"].float()
        else:
            out = self._split_qkv([made["qkv"]], made["tokens"].shape[-2:]).float()
        # a memo read is a copy: changing it in place cannot change a later read
        return out if fresh else out.clone()

    def _intermediate(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm and self.feature == "tokens"
        try:
            with self._tables.fed(self.model, x.shape[-2:], self.pos_resize):
                (out,) = self.model.forward_intermediates(x, indices=[self.layer], norm=norm, output_fmt="NCHW",
                                                          intermediates_only=True, stop_early=True)
        except AssertionError as e:  # timm's way of refusing an option (e.g. norm on SAM2 Hiera)
            raise ValueError(f"vfm={self.name} (vfm.layer={self.layer}, vfm.norm={norm}): timm refused: {e}"
                             + ("; set vfm.norm=false" if norm and "norm" in str(e) else "")) from None
        return out

    @contextlib.contextmanager
    def _capture_qkv(self) -> Iterator[List[torch.Tensor]]:
        captured: List[torch.Tensor] = []
        if self._qkv_path is None:
            yield captured
            return
        handle = self.model.get_submodule(self._qkv_path).register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            yield captured
        finally:
            handle.remove()

    def _split_qkv(self, captured: List[torch.Tensor], grid: torch.Size) -> torch.Tensor:
        """The captured (B, N, 3D) or (B, H, W, 3D) qkv output -> q, k, v or q + k as (B, D, Hv, Wv)."""
        if len(captured) != 1:
            raise RuntimeError(f"vfm={self.name}: the attention of layer {self.layer} did not call its qkv module "
                               f"once per forward ({len(captured)} calls); q/k/v cannot be read from this model")
        qkv = captured[0]
        d = self.channels
        if self.feature == "qk":
            part = qkv[..., :d] + qkv[..., d:2 * d]
        else:
            i = ("q", "k", "v").index(self.feature)
            part = qkv[..., i * d:(i + 1) * d]
        if part.dim() == 4:  # (B, H, W, D): channels-last blocks (SAM)
            return part.permute(0, 3, 1, 2)
        part = part[:, self.num_prefix_tokens:]
        return part.transpose(1, 2).reshape(part.shape[0], d, grid[0], grid[1])


def build_vfm(vfm_cfg: Any, source: str, seed: int) -> Optional[VfmBackbone]:
    """The VFM a ``conf/vfm`` config describes (None for ``vfm=none``), weights from ``source``."""
    if not vfm_cfg.timm_name:
        return None
    kwargs = vfm_cfg.timm_kwargs
    kwargs = OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs) else dict(kwargs or {})
    model = create_vfm_model(vfm_cfg.timm_name, source, seed=seed, checkpoint=vfm_cfg.checkpoint, timm_kwargs=kwargs,
                             fixed_input_size=vfm_cfg.input_size is not None)
    backbone = VfmBackbone(model, layer=vfm_cfg.layer, feature=vfm_cfg.feature, norm=vfm_cfg.norm,
                           input_size=vfm_cfg.input_size, name=vfm_cfg.name, pos_resize=vfm_cfg.pos_resize)
    check_channels(backbone, vfm_cfg.get("channels") if hasattr(vfm_cfg, "get") else getattr(vfm_cfg, "channels", None))
    return backbone


def check_channels(backbone: VfmBackbone, channels: Optional[int]) -> None:
    """``vfm.channels`` (when set) must be the C the built model gives at these settings."""
    if channels is not None and int(channels) != backbone.channels:
        raise ValueError(f"vfm.channels={channels}, but vfm={backbone.name} as built gives {backbone.channels} channels "
                         f"(layer {backbone.layer}, feature={backbone.feature}, norm={backbone.norm}): "
                         f"set vfm.channels={backbone.channels} (or vfm.channels=null to skip the check)")
