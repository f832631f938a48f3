"""Mask proposals: a per-image part of the encode (``masks=none|file|sam2|sam``, conf/masks/).

Class-agnostic proposals of the whole **original** image (never per window), kept as one integer
**label map** (H, W): 0 = pixels no proposal covers, 1..M one id per proposal. A stack of boolean
masks becomes a label map by :func:`label_map` (CorrCLIP's rule: masks painted in ascending area,
so where masks overlap the **largest wins** and a small mask inside a big one disappears).

- ``file``: read per image from ``masks.dir`` (proxyclip/masks/files.py: ``<stem>.npz`` with an
  integer label map or a boolean stack under ``masks.key``, CorrCLIP's ``instance_mask``; or a
  ``<stem>.png`` label map);
- ``sam2`` / ``sam``: SAM 2's / SAM's automatic mask generator (proxyclip/masks/generators.py), run
  once per image; the label maps are cached on disk (``masks.cache``: ``auto`` = the user's cache
  folder, a folder, or null) keyed by the generator's identity (``EncodeSpec.masks_key``: model,
  weights, every setting) and the image's content (SHA-1 of its pixels), so a second evaluation
  of the same images skips the generator.

The map passes the hook point ``masks.proposals`` and is stored in ``Encoded.masks`` (a stored
encode replays it through the hook). Image-level methods read it as ``ImageInputs.masks``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..files import atomic_write, bytes_digest
from ..hooks import declare_hook
from ..specs import MasksSpec, checkpoint_digest

log = logging.getLogger(__name__)

PROPOSALS = declare_hook("masks.proposals", "image", "(H, W) int64",
                         "mask proposals as a label map of the original image (0 = unsegmented; masks=file, sam2 or sam)",
                         "encode", replay="masks")
GENERATORS = ("none", "file", "sam2", "sam")
_SETTINGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "min_mask_region_area")


def label_map(masks: torch.Tensor) -> torch.Tensor:
    """(M, H, W) boolean masks -> (H, W) int64 label map: masks sorted by area (pixel count),
    ascending (a stable sort: equal areas keep their order), painted with ids 1, 2, ... in that
    order, so a later (larger) mask overwrites where they overlap; uncovered pixels are 0."""
    if masks.dim() != 3:
        raise ValueError(f"masks: expected an (M, H, W) stack of boolean masks, got shape {tuple(masks.shape)}")
    masks = masks.bool()
    out = torch.zeros(masks.shape[1:], dtype=torch.int64)
    order = torch.argsort(masks.flatten(1).sum(1), stable=True)
    for new_id, m in enumerate(order.tolist(), start=1):
        out[masks[m]] = new_id
    return out


def masks_spec(node: Any, local: bool) -> Optional[MasksSpec]:
    """The :class:`MasksSpec` of ``cfg.masks`` (None for ``none``); ``local``: weights=local."""
    name = "none" if node is None else str(node.get("name", "none"))
    if name not in GENERATORS:
        raise ValueError(f"masks.name: unknown {name!r}; expected one of {', '.join(GENERATORS)}")
    if name == "none":
        return None
    if name == "file":
        if not node.get("dir"):
            raise ValueError("masks=file needs masks.dir=/folder/of/<image stem>.npz|png (it is not set)")
        return MasksSpec("file", dir=os.path.abspath(os.path.expanduser(str(node.dir))), key=str(node.key))
    return MasksSpec(name, model=str(node.model),
                     pretrained=None if local else (None if node.get("pretrained") is None else str(node.pretrained)),
                     checkpoint=checkpoint_digest(node.get("checkpoint")) if local else None,
                     input_size=None if node.get("input_size") is None else int(node.input_size),
                     **{k: node[k] for k in _SETTINGS},
                     multimask_output=bool(node.multimask_output) if name == "sam2" else None)


def image_digest(image: torch.Tensor) -> str:
    """SHA-1 of an image's content: its 8-bit pixels and size."""
    u8 = torch.round(image.float().cpu() * 255.0).clamp_(0, 255).to(torch.uint8)
    return bytes_digest(str(tuple(u8.shape)).encode() + u8.numpy().tobytes())


def default_masks_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/proxyclip/masks``, else ``~/.cache/proxyclip/masks``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxyclip" / "masks"


class MaskStage:
    """The mask proposals of one Segmenter: ``proposals(image, image_id)`` -> (H, W) int64.

    Generators are built on first use (the weights are checked at once, so offline without them
    fails when the Segmenter is made)."""

    def __init__(self, node: Any, spec: MasksSpec, key: str, weights: Any, device: torch.device):
        """``weights``: the encode's WeightsSpec (source after any fallback, seed)."""
        self.node, self.spec, self.key, self.weights, self.device = node, spec, key, weights, device
        self._generate: Optional[Callable[[np.ndarray], np.ndarray]] = None
        self._checkpoint = None
        if spec.name != "file":
            from .generators import checkpoint_path

            self._checkpoint = checkpoint_path(node, str(weights.source))
        self.generator_calls = 0  # images the generator ran on (a cached image does not count)
        where = node.get("cache", "auto")
        self.cache_dir = (None if spec.name == "file" or where in (None, "", "null", "none") else
                          default_masks_cache_dir() if where == "auto" else Path(os.path.expanduser(str(where))))

    def proposals(self, image: torch.Tensor, image_id: Optional[str]) -> torch.Tensor:
        size = (int(image.shape[1]), int(image.shape[2]))
        if self.spec.name == "file":
            from .files import mask_file, read_mask_file

            if not image_id:
                raise ValueError("masks=file reads each image's proposals by its file name: pass a path to encode, "
                                 "or encode(image, image_id='<stem>')")
            return read_mask_file(mask_file(self.spec.dir, Path(image_id).stem), size, self.spec.key)
        path = None if self.cache_dir is None else self._entry(image_digest(image))
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    got = torch.from_numpy(z["labels"].astype(np.int64))
                if tuple(got.shape) == size:
                    return got
            except Exception as e:
                log.warning("masks cache: dropping unreadable entry %s (%s)", path, e)
            path.unlink(missing_ok=True)
        labels = self.generate(image)
        if path is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, labels=labels.numpy().astype(np.int32))
            atomic_write(path, buf.getvalue())
        return labels

    def generate(self, image: torch.Tensor) -> torch.Tensor:
        """Run the generator on a (3, H, W) image in [0, 1] -> (H, W) int64 label map."""
        if self._generate is None:
            from .generators import build_generator

            self._generate = build_generator(self.node, self.weights, self._checkpoint, self.device)
        self.generator_calls += 1
        rgb = torch.round(image.float().cpu() * 255.0).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return label_map(torch.from_numpy(self._generate(np.ascontiguousarray(rgb))))

    def _entry(self, digest: str) -> Path:
        return self.cache_dir / self.key / digest[:2] / f"{digest}.npz"


def mask_stage(cfg: Any, spec: Any, device: torch.device) -> Optional[MaskStage]:
    """The Segmenter's mask stage for encode spec ``spec`` (None with masks=none)."""
    if spec.masks is None:
        return None
    return MaskStage(cfg.masks, spec.masks, spec.masks_key, spec.weights, device)


def proposals_of(seg: Any, img: torch.Tensor, image: Any, image_id: Optional[str], reuse: Any) -> Optional[torch.Tensor]:
    """An encode's proposals: ``reuse``'s when made under the same key, else made (hook
    ``masks.proposals``); None without a mask stage. ``image``: what encode was given (a path names
    the image for masks=file)."""
    stage = seg.masks
    if stage is None:
        return None
    if reuse is not None and reuse.masks is not None and reuse.masks_key == stage.key:
        return reuse.masks
    if image_id is None and isinstance(image, (str, os.PathLike)):
        image_id = Path(image).stem
    return seg.hooks.point(PROPOSALS, stage.proposals(img, image_id))
