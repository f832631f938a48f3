"""Whole-image inference geometry: short-side resize, sliding windows, padding, merge.

The window arithmetic is mmsegmentation's ``slide_inference``: for each axis,
``n = max(L - crop + stride - 1, 0) // stride + 1`` windows; window i starts at
``i * stride``, ends at ``min(start + crop, L)`` and is shifted inward so it is a full
crop where the image allows (``start = max(end - crop, 0)``).

Whole-image mode (``protocol.crop: null``, NACLIP's VOC protocol): one window, the resized image's
own size, padded to the patch multiple as every window is; the stride is ignored. It is the same
layout as ``crop = stride >= the long side``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive


def resized_size(height: int, width: int, short_side: int, max_long_side: int) -> Tuple[int, int]:
    """Size after resizing so the short side is ``short_side``, the long side at most ``max_long_side``."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, h, w), bilinear (align_corners=False)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)


def _axis_windows(length: int, crop: int, stride: int) -> List[Tuple[int, int]]:
    n = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, length)
        start = max(end - crop, 0)
        out.append((start, end))
    return out


def slide_windows(height: int, width: int, crop: int | Tuple[int, int], stride: int | Tuple[int, int]) -> List[Box]:
    """Window boxes (y1, y2, x1, x2) covering an image of (height, width), row-major order."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    return [(y1, y2, x1, x2) for (y1, y2) in _axis_windows(height, ch, sh) for (x1, x2) in _axis_windows(width, cw, sw)]


def symmetric_padding(height: int, width: int, multiple: int) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that makes both sides a multiple of ``multiple``."""
    ph = (-height) % multiple
    pw = (-width) % multiple
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def padding_multiple(*patch_sizes: int) -> int:
    """Least common multiple of the patch sizes a window must be divisible by."""
    m = 1
    for p in patch_sizes:
        m = m * p // math.gcd(m, p)
    return m


def merge_windows(window_scores: Sequence[torch.Tensor] | torch.Tensor, boxes: Sequence[Box],
                  size: Tuple[int, int]) -> torch.Tensor:
    """Sum each window's (Q, h, w) scores into a (Q, H, W) canvas and divide by the per-pixel count."""
    if len(window_scores) != len(boxes):
        raise ValueError(f"{len(window_scores)} window score maps for {len(boxes)} boxes")
    q = window_scores[0].shape[0]
    canvas = torch.zeros((q, *size), dtype=window_scores[0].dtype, device=window_scores[0].device)
    count = torch.zeros(size, dtype=window_scores[0].dtype, device=window_scores[0].device)
    for s, (y1, y2, x1, x2) in zip(window_scores, boxes):
        canvas[:, y1:y2, x1:x2] += s
        count[y1:y2, x1:x2] += 1
    if (count == 0).any():
        raise ValueError("windows do not cover the whole image")
    return canvas / count


def size_with_pad(box: Box, pad: Tuple[int, int, int, int]) -> Tuple[int, int]:
    """(height, width) of a window after its symmetric padding."""
    return box[1] - box[0] + pad[0] + pad[1], box[3] - box[2] + pad[2] + pad[3]


def check_geometry(p) -> None:
    """The protocol's geometry (``short_side``, ``max_long_side``, ``crop``, ``stride``) is usable
    (``crop`` None: whole-image mode, the stride is not read)."""
    whole = p["crop"] is None
    for name in ("short_side", "max_long_side") + (() if whole else ("crop", "stride")):
        if p[name] is None or int(p[name]) <= 0:
            raise ValueError(f"protocol.{name} must be a positive integer"
                             f"{' (or crop null: the whole image)' if name == 'crop' else ''}, got {p[name]}")
    if not whole and p["stride"] > p["crop"]:
        raise ValueError(f"protocol.stride ({p['stride']}) must not exceed protocol.crop ({p['crop']}): "
                         "windows would leave gaps")


def window_layout(height: int, width: int, geometry, pad_multiple: int
                  ) -> Tuple[Tuple[int, int], List[Box], Tuple[int, int, int, int]]:
    """(resized size, windows, padding of every window) of an image under ``geometry`` (``crop``
    None: one window, the resized image)."""
    size = resized_size(height, width, geometry.short_side, geometry.max_long_side)
    if geometry.crop is None:
        boxes = [(0, size[0], 0, size[1])]
    else:
        boxes = slide_windows(size[0], size[1], geometry.crop, geometry.stride)
    y1, y2, x1, x2 = boxes[0]
    return size, boxes, symmetric_padding(y2 - y1, x2 - x1, pad_multiple)
