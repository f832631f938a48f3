"""Reading images into (3, H, W) float tensors in [0, 1]: files, http(s) URLs, PIL, arrays, tensors."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray]


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


URL_TIMEOUT = 30.0  # seconds for an http(s) image download
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _open_url(url: str) -> Image.Image:
    """Download an http(s) image with urllib; any other scheme is refused with a plain message."""
    import urllib.error
    import urllib.request

    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"{url}: {scheme}:// URLs are not supported; download the image and pass its path "
                         "(http and https URLs are loaded directly)")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "proxyclip"})
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{url}: download failed ({reason}); check the address and the network, "
                         "or download the image and pass its path") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except UnidentifiedImageError:
        raise ImageError(f"{url}: the download ({len(data)} bytes) is not an image PIL can read") from None
    except (OSError, SyntaxError) as e:
        raise ImageError(f"{url}: the downloaded image is corrupt or truncated ({e})") from None


def _pil_to_tensor(img: Image.Image, source: str) -> torch.Tensor:
    """Any PIL mode -> RGB float in [0, 1]. Grayscale, RGBA, palette and 16-bit are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1 else 1.0
        arr = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
        t = torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    else:
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            # composite over white: transparent pixels carry no colour of their own
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        t = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise ImageError(f"{source}: image has no pixels (size {img.size})")
    return t


def load_image(image: ImageLike) -> torch.Tensor:
    """Return ``image`` as a (3, H, W) float32 tensor in [0, 1].

    Accepts a path, an http(s) URL (downloaded), a PIL image, a (3, H, W) / (1, H, W) / (H, W) float tensor in [0, 1],
    or an (H, W, 3) uint8 numpy array.
    """
    if isinstance(image, str) and _URL.match(image):
        return _pil_to_tensor(_open_url(image), image)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        if not path.is_file():
            raise ImageError(f"{path}: not a file")
        try:
            with Image.open(path) as img:
                img.load()
                return _pil_to_tensor(img, str(path))
        except UnidentifiedImageError as e:
            raise ImageError(f"{path}: not a readable image file (PIL cannot identify it)") from e
        except (OSError, SyntaxError) as e:
            raise ImageError(f"{path}: image file is corrupt or truncated ({e})") from e
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
            return _pil_to_tensor(Image.fromarray(image), "numpy array")
        if image.dtype == np.uint8 and image.ndim == 2:
            return _pil_to_tensor(Image.fromarray(image), "numpy array")
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ImageError(f"image tensor must have shape (3, H, W), (1, H, W) or (H, W); got {tuple(image.shape)}")
        if not t.is_floating_point():
            raise ImageError(f"image tensor must be float in [0, 1]; got dtype {t.dtype} (divide uint8 by 255)")
        t = t.float().cpu()
        if not torch.isfinite(t).all():
            raise ImageError("image tensor contains NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ImageError(f"image tensor values must lie in [0, 1]; got range [{lo:.3g}, {hi:.3g}]")
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise ImageError(f"image tensor has no pixels: shape {tuple(image.shape)}")
        return t.expand(3, -1, -1).contiguous().clamp_(0, 1)
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or a (3, H, W) tensor")
