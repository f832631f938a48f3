"""What the explorer offers to choose from (backbones, bundled images) and small helpers it shares."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import CONF_DIR
from ..images import load_image

ASSETS = Path(__file__).resolve().parents[1] / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]


def available_backbones(group: str) -> List[str]:
    """Option names of a config group (``clip`` or ``vfm``): the yaml files in ``conf/<group>/``
    (``vfm=none`` left out: the methods without a VFM are chosen with the method dropdown)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem != "none")


def sample_images() -> Dict[str, Path]:
    """Bundled sample images (``proxyclip/assets``), by file name."""
    return {p.name: p for p in sorted(ASSETS.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_image(image: Any) -> torch.Tensor:
    """A path, PIL image, (3, H, W) tensor or encoded image bytes -> (3, H, W) float in [0, 1]."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image

        image = Image.open(io.BytesIO(bytes(image)))
    return load_image(image)


def image_id(img: torch.Tensor) -> str:
    """The identity of an image's pixels (the encode cache's key with the pipeline's)."""
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()[:16] + f"-{tuple(img.shape)}"


def pixel_to_data(fig, px: float, py: float) -> Optional[Tuple[float, float]]:
    """A point of a rendered figure's PNG (``px`` right, ``py`` down from the top-left corner)
    -> ``(x, y)`` data coordinates of the image panel under it, or None if it hits no image panel."""
    display = (px, fig.bbox.height - py)  # matplotlib's display coordinates grow upwards
    for ax in fig.axes:
        if ax.images and ax.get_label() != "<colorbar>" and ax.bbox.contains(*display):
            x, y = ax.transData.inverted().transform(display)
            return float(x), float(y)
    return None
