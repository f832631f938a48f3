"""Automatic mask generators: SAM 2's (package ``sam2``) and SAM's (package ``segment-anything``).

Weights like every model (conf/weights): ``pretrained`` (SAM 2 from the Hugging Face hub,
``masks.pretrained`` = its repo id; SAM from its download URL into torch's hub cache), ``local``
(``masks.checkpoint``), or seeded ``random`` (tests). Offline (``HF_HUB_OFFLINE=1``, or the host
unreachable) with nothing cached fails at once with a message saying what to do.

Models: SAM 2 by its config name in the package (``sam2_hiera_l`` = Hiera-L, CorrCLIP's; ``_t``, ``_s``,
``_b+``; the ``sam2.1_*`` configs too); SAM by its registry name (``vit_h``, ``vit_l``, ``vit_b``).
``test_tiny`` (SAM) and ``masks.input_size`` (SAM 2) make small models of the same classes for tests.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..backbones.weights import (WeightsUnavailable, check_checkpoint_file, hub_failure_message, hub_offline_requested,
                                 mismatch_error, offline_unless_reachable, seeded)

EXTRA = "pip install 'proxyclip[regions]'"
Generate = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> (M, H, W) bool


def _require(module: str, package: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"masks={what} needs the package {package!r}, which is not installed: {EXTRA}") from None


def generator_settings(node: Any, sam2: bool) -> dict:
    keys = ["points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "box_nms_thresh", "min_mask_region_area"] + (["multimask_output"] if sam2 else [])
    return {k: node[k] for k in keys}


def checkpoint_path(node: Any, source: str) -> Any:
    """The generator's checkpoint file (None for random weights); fails at once when unavailable."""
    name = str(node.name)
    _require("sam2" if name == "sam2" else "segment_anything", "sam2" if name == "sam2" else "segment-anything", name)
    if source == "local":
        return check_checkpoint_file(node.get("checkpoint"), "masks.checkpoint")
    if source == "pretrained":
        return (_hf_checkpoint(str(node.pretrained), str(node.model)) if name == "sam2"
                else _url_checkpoint(str(node.pretrained), str(node.model)))
    return None


def build_generator(node: Any, weights: Any, path: Any, device: torch.device) -> Generate:
    """The generator ``node`` (cfg.masks) describes, with ``weights`` (source and seed) and the
    checkpoint ``path`` (:func:`checkpoint_path`)."""
    name = str(node.name)
    if name == "sam2":
        model = _sam2_model(node, weights, path, device)
        gen_mod = _require("sam2.automatic_mask_generator", "sam2", "sam2")
        gen = gen_mod.SAM2AutomaticMaskGenerator(model, **generator_settings(node, True))
        size = int(model.image_size)
        gen.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    elif name == "sam":
        model = _sam_model(node, weights, path, device)
        gen_mod = _require("segment_anything", "segment-anything", "sam")
        gen = gen_mod.SamAutomaticMaskGenerator(model, **generator_settings(node, False))
    else:
        raise ValueError(f"masks.name: unknown generator {name!r} (none, file, sam2, sam)")

    def generate(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            found = gen.generate(image)
        h, w = image.shape[:2]
        if not found:
            return np.zeros((0, h, w), dtype=bool)
        return np.stack([np.asarray(m["segmentation"], dtype=bool) for m in found])

    return generate


def _sam2_model(node: Any, weights: Any, path: Any, device: torch.device) -> torch.nn.Module:
    sam2 = _require("sam2", "sam2", "sam2")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model_name = str(node.model)
    family = "sam2.1" if model_name.startswith("sam2.1") else "sam2"
    yaml = Path(sam2.__path__[0]) / "configs" / family / f"{model_name}.yaml"
    if not yaml.is_file():
        raise ValueError(f"masks.model: no SAM 2 config {model_name!r} in the sam2 package ({yaml.parent})")
    cfg = OmegaConf.load(yaml)  # the package's own config, without its Hydra search path (ours is active)
    if node.get("input_size"):
        cfg.model.image_size = int(node.input_size)
    OmegaConf.resolve(cfg)
    source = str(weights.source)

    def build() -> torch.nn.Module:
        return instantiate(cfg.model, _recursive_=True)

    model = seeded(int(weights.seed), f"masks:{model_name}", build) if source == "random" else build()
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state["model"] if "model" in state else state, strict=True)
        except (RuntimeError, KeyError) as e:
            raise mismatch_error(Path(path), model_name, e) from None
    return model.to(device).eval()


_SAM2_FILES = {"sam2_hiera_t": "sam2_hiera_tiny.pt", "sam2_hiera_s": "sam2_hiera_small.pt",
               "sam2_hiera_b+": "sam2_hiera_base_plus.pt", "sam2_hiera_l": "sam2_hiera_large.pt"}


def _hf_checkpoint(repo: str, model_name: str) -> str:
    """SAM 2's checkpoint from the Hugging Face hub (its cache when offline)."""
    from huggingface_hub import hf_hub_download

    filename = _SAM2_FILES.get(model_name) or _SAM2_FILES.get(model_name.replace("sam2.1", "sam2"), "")
    if model_name.startswith("sam2.1"):
        filename = filename.replace("sam2_", "sam2.1_")
    with offline_unless_reachable() as reachable:
        try:
            return hf_hub_download(repo_id=repo, filename=filename)
        except Exception:
            raise WeightsUnavailable(hub_failure_message(f"SAM 2 {model_name} ({repo}/{filename})", reachable,
                                                         "masks.checkpoint")) from None


def _sam_model(node: Any, weights: Any, path: Any, device: torch.device) -> torch.nn.Module:
    sa = _require("segment_anything", "segment-anything", "sam")
    model_name, source = str(node.model), str(weights.source)
    if model_name == "test_tiny":
        build = partial(_tiny_sam, sa)
    elif model_name in sa.sam_model_registry:
        build = partial(sa.sam_model_registry[model_name], checkpoint=None)
    else:
        raise ValueError(f"masks.model: unknown SAM model {model_name!r} ({', '.join(sa.sam_model_registry)}, test_tiny)")
    model = seeded(int(weights.seed), f"masks:{model_name}", build) if source == "random" else build()
    if path is not None:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except RuntimeError as e:
            raise mismatch_error(Path(path), model_name, e) from None
    return model.to(device).eval()


def _url_checkpoint(url: str, model_name: str, field: str = "masks.checkpoint") -> str:
    """SAM's checkpoint from torch's hub cache, downloaded when the host answers."""
    import socket
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return str(cached)
    host = urlparse(url).hostname or ""
    try:
        if hub_offline_requested():
            raise OSError("offline")
        socket.create_connection((host, 443), timeout=3.0).close()
    except OSError:
        raise WeightsUnavailable(f"pretrained weights for SAM {model_name} are not available: {host} cannot be "
                                 f"reached (or HF_HUB_OFFLINE is set) and {cached} is not cached. Download {url} "
                                 f"there, or use weights=local {field}=/path/to/checkpoint, or weights=random "
                                 f"for a smoke run.") from None
    torch.hub.download_url_to_file(url, str(cached))
    return str(cached)


def _tiny_sam(sa: Any) -> torch.nn.Module:
    """A small SAM of the package's own classes (256-px input, 2 encoder blocks, 32 channels): tests only."""
    m = sa.modeling
    d = 32
    encoder = m.ImageEncoderViT(depth=2, embed_dim=32, img_size=256, mlp_ratio=4, num_heads=2, patch_size=16,
                                qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=d,
                                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    prompt = m.PromptEncoder(embed_dim=d, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=8)
    decoder = m.MaskDecoder(num_multimask_outputs=3, transformer=m.TwoWayTransformer(depth=1, embedding_dim=d,
                                                                                      mlp_dim=64, num_heads=2),
                            transformer_dim=d, iou_head_depth=2, iou_head_hidden_dim=32)
    return m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                 pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])

