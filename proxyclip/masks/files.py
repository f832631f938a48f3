"""Mask proposals read from files: one per image, ``<dir>/<image stem>.npz`` or ``.png``.

- ``.npz`` (CorrCLIP's distributed layout: ``data/region_masks/<set>/<stem>.npz``, array
  ``instance_mask``): under the array name ``masks.key``, either an integer **label map** (H, W)
  (0 = unsegmented, one id per proposal) or a **stack of boolean masks** (M, H, W) (bool, or integers
  that are all 0 / 1), turned into a label map by :func:`proxyclip.masks.label_map`.
- ``.png``: a single-channel label map (8- or 16-bit, or a palette image's indices).

Every problem (no file for the image, unreadable file, missing array, wrong size or dtype) is one
``ValueError`` line naming the file and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

SUFFIXES = (".npz", ".png")


def mask_file(folder: str, stem: str) -> Path:
    """The proposals file of image ``stem`` in ``folder`` (.npz first, then .png)."""
    base = Path(os.path.expanduser(folder))
    if not base.is_dir():
        raise ValueError(f"masks.dir: folder not found: {base}")
    for suffix in SUFFIXES:
        p = base / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise ValueError(f"masks=file: no proposals for image {stem!r}: expected {base / stem}.npz or "
                     f"{base / stem}.png (files are named by the image's stem)")


def read_mask_file(path: Path, size: Tuple[int, int], key: Optional[str] = "instance_mask") -> torch.Tensor:
    """(H, W) int64 label map of the proposals in ``path`` for an image of ``size`` (H, W)."""
    from . import label_map

    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key not in names:
                    raise KeyError(key)
                arr = np.asarray(z[key])
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise TypeError(f"a single-channel label map, got a {im.mode} image")
                arr = np.array(im)
        else:
            raise TypeError(f"a .npz or .png file, got {path.suffix or 'no suffix'}")
    except KeyError:
        raise ValueError(f"masks file {path}: no array {key!r} (it has {', '.join(names) or 'none'}; "
                         "set masks.key)") from None
    except TypeError as e:
        raise ValueError(f"masks file {path}: expected {e}") from None
    except Exception as e:  # truncated / not an archive / not an image
        raise ValueError(f"masks file {path}: cannot be read ({type(e).__name__}: {e})") from None
    h, w = size
    if arr.ndim == 2 and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if arr.shape != (h, w):
            raise ValueError(f"masks file {path}: label map of size {arr.shape[0]}x{arr.shape[1]}, "
                             f"the image is {h}x{w}")
        return torch.from_numpy(arr.astype(np.int64))
    if arr.ndim == 3 and (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)
                          and set(np.unique(arr).tolist()) <= {0, 1}):
        if arr.shape[1:] != (h, w):
            raise ValueError(f"masks file {path}: {arr.shape[0]} masks of size {arr.shape[1]}x{arr.shape[2]}, "
                             f"the image is {h}x{w}")
        return label_map(torch.from_numpy(arr.astype(bool)))
    raise ValueError(f"masks file {path}: expected an integer (H, W) label map or an (M, H, W) stack of boolean "
                     f"masks, got an array of shape {tuple(arr.shape)} and dtype {arr.dtype}")
