"""On-disk cache of ``Segmenter.encode`` outputs, for sweeps over whole datasets.

Entry path: ``<cache_dir>/<model key>/<h[:2]>/<h>.pt`` where ``model key`` is the
Segmenter's ``key`` (CLIP model, VFM model, weights, short side, long-side cap, crop,
stride, precision) and ``h`` is the SHA-1 of the image file's bytes (the image id: the same
picture in VOC21 and VOC20 is one entry). Every entry is written to a temporary file in
the same folder and renamed into place, so an interrupted run never leaves a half-written
entry under its final name; an unreadable entry is treated as a miss and removed.

The original image is stored as uint8 (it came from an 8-bit file), the features as
float32, so a cached decode is bit-identical to an uncached one.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..files import atomic_write

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def file_digest(path: PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class FeatureCache:
    """``get`` / ``put`` Encoded objects by image file for one Segmenter configuration.

    ``estimate(n)`` after the first write prints the expected size for ``n`` more images and
    the free space; when the estimate does not fit, new entries stop being written (the
    evaluation goes on without them) instead of filling the disk.
    """

    def __init__(self, cache_dir: PathLike, model_key: str, print_fn: Callable[[str], None] = print):
        self.root = Path(cache_dir) / model_key
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_key = model_key
        self.print = print_fn
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.bytes_written = 0
        self.writing = True
        self._estimated = False

    def path_for(self, image_path: PathLike) -> Path:
        h = file_digest(image_path)
        return self.root / h[:2] / f"{h}.pt"

    def get(self, image_path: PathLike, entry: Optional[Path] = None):
        from ..pipeline import Encoded

        p = entry or self.path_for(image_path)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=False)
            if d.get("key") != self.model_key:
                raise ValueError(f"entry made by {d.get('key')}")
            d = dict(d)
            d["image"] = d["image"].float().div_(255.0)
            enc = Encoded.from_dict(d)
        except Exception as e:  # corrupt or foreign entry: recompute
            log.warning("feature cache: dropping unreadable entry %s (%s)", p, e)
            p.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return enc

    def put(self, image_path: PathLike, enc, remaining: int = 0, entry: Optional[Path] = None) -> None:
        if not self.writing:
            return
        p = entry or self.path_for(image_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        d = enc.to_dict()
        d["image"] = torch.round(d["image"].float() * 255.0).clamp_(0, 255).to(torch.uint8)
        atomic_write(p, lambda f: torch.save(d, f))
        size = p.stat().st_size
        self.writes += 1
        self.bytes_written += size
        if not self._estimated:
            self._estimated = True
            self.estimate(remaining, size)

    def estimate(self, remaining: int, entry_bytes: float) -> None:
        need = entry_bytes * remaining
        free = shutil.disk_usage(self.root).free
        self.print(
            f"feature cache {self.root}: about {_fmt_bytes(entry_bytes)} an image, {_fmt_bytes(need)} for the "
            f"{remaining} images still to encode ({_fmt_bytes(free)} free)"
        )
        if need > 0.95 * free:
            self.writing = False
            self.print(
                "feature cache: the estimate does not fit on the disk; not caching further images "
                "(free space or point cache_dir elsewhere)"
            )

    def get_or_encode(self, image_path: PathLike, encode: Callable[[], object], remaining: int = 0):
        entry = self.path_for(image_path)  # hash the file once
        enc = self.get(image_path, entry)
        if enc is None:
            enc = encode()
            self.put(image_path, enc, remaining, entry)
        return enc
