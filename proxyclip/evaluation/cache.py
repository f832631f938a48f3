"""On-disk cache of ``Segmenter.encode`` outputs, for sweeps over whole datasets.

An Encoded has two parts, stored separately: CLIP's tokens entering the last block, and the
VFM's features (and a third, the mask proposals, with masks=file|sam2|sam: key ``masks_key``). Entry path: ``<cache_dir>/<part key>/<h[:2]>/<h>.pt`` where ``part key`` is
the encode spec's ``clip_key`` or ``vfm_key`` (a digest of that part's record: model, weights,
protocol geometry, precision; for the VFM also layer, feature and norm; written beside the
entries as ``spec.json``) and ``h`` is the SHA-1 of the
image file's bytes (the image id: the same picture in VOC21 and VOC20 is one entry). So a
sweep with another VFM (or a method without one) reuses every cached CLIP part, and only the
missing part is encoded. Every entry is written to a temporary file in the same folder and
renamed into place, so an interrupted run never leaves a half-written entry under its final
name; an unreadable entry is treated as a miss and removed.

The original image is stored as uint8 (it came from an 8-bit file), the tokens and features as
float32, so a cached decode is bit-identical to an uncached one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..files import atomic_write, file_digest
from ..parts import describe_size

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


_CLIP_FIELDS = ("clip_tokens", "clip_grid", "clip_key", "layers")  # layers: the kept layer parts only
_VFM_FIELDS = ("vfm_features", "vfm_key")
_MASKS_FIELDS = ("masks", "masks_key")  # the mask proposals (masks=file|sam2|sam)
_SAM_FIELDS = ("sam", "sam_key")  # Trident's SAM part (proxyclip/sam_attention.py)


class FeatureCache:
    """``get`` / ``put`` the parts of Encoded objects by image file, for one Segmenter's keys.

    ``estimate(n)`` after the first write prints the expected size for ``n`` more images and
    the free space; when the estimate does not fit, new entries stop being written (the
    evaluation goes on without them) instead of filling the disk.
    """

    def __init__(self, cache_dir: PathLike, seg, print_fn: Callable[[str], None] = print):
        self.root = Path(cache_dir)
        spec = seg.encode_spec
        # vfm: None when the method uses no VFM; masks: None without mask proposals
        self.parts = {"clip": spec.clip_key, "vfm": spec.vfm_key, "masks": spec.masks_key, "sam": spec.sam_key}
        records = {"clip": spec.clip_part(), "vfm": spec.vfm_part(), "masks": spec.masks_part(),
                   "sam": spec.sam_part()}
        for name, key in self.parts.items():
            if key is not None:  # each part folder says what made it (the key is a digest of this record)
                (self.root / key).mkdir(parents=True, exist_ok=True)
                if not (self.root / key / "spec.json").is_file():
                    atomic_write(self.root / key / "spec.json", json.dumps(records[name], indent=2, sort_keys=True))
        self.print = print_fn
        self.hits = 0  # images whose every part came from the cache
        self.misses = 0
        self.writes = 0  # part files written
        self.bytes_written = 0
        self.writing = True
        self._estimated = False

    def path_for(self, key: str, digest: str) -> Path:
        return self.root / key / digest[:2] / f"{digest}.pt"

    def _read(self, key: str, digest: str) -> Optional[dict]:
        p = self.path_for(key, digest)
        if not p.is_file():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=False)
            if not isinstance(d, dict) or d.get("part_key") != key:
                raise ValueError(f"entry made by {d.get('part_key') if isinstance(d, dict) else type(d).__name__}")
        except Exception as e:  # corrupt or foreign entry: recompute
            log.warning("feature cache: dropping unreadable entry %s (%s)", p, e)
            p.unlink(missing_ok=True)
            return None
        return d

    def get(self, image_path: PathLike, digest: Optional[str] = None, partial: bool = False):
        """The cached Encoded of an image: None unless every part is cached (``partial``: whatever
        parts are, the others None)."""
        from ..pipeline import Encoded

        digest = digest or file_digest(image_path)
        found = {name: self._read(key, digest) for name, key in self.parts.items() if key is not None}
        complete = all(d is not None for d in found.values())
        got = [d for d in found.values() if d is not None]
        if not (complete or (partial and got)):
            return None
        layout = got[0]
        fields = dict(format=layout["format"], image=layout["image"].float().div_(255.0),
                      resized_size=layout["resized_size"], windows=layout["windows"], pad=layout["pad"],
                      clip_tokens=None, clip_grid=(0, 0), clip_key=None, vfm_features=None, vfm_key=None)
        for d in got:
            if (d["resized_size"], d["windows"], d["pad"]) != (layout["resized_size"], layout["windows"], layout["pad"]):
                return None  # parts cut with other windows (another VFM's padding): encode again
            fields.update({k: d[k] for k in d if k in _CLIP_FIELDS + _VFM_FIELDS + _MASKS_FIELDS + _SAM_FIELDS})
        return Encoded.from_dict(fields)

    def put(self, image_path: PathLike, enc, remaining: int = 0, digest: Optional[str] = None,
            skip: Sequence[str] = ()) -> None:
        """Write the parts of ``enc`` (but those named in ``skip``: "clip", "vfm")."""
        if not self.writing:
            return
        digest = digest or file_digest(image_path)
        d = enc.to_dict()
        common = dict(format=d["format"], image=torch.round(d["image"].float() * 255.0).clamp_(0, 255).to(torch.uint8),
                      resized_size=d["resized_size"], windows=d["windows"], pad=d["pad"])
        size = 0
        for name, fields in (("clip", _CLIP_FIELDS), ("vfm", _VFM_FIELDS), ("masks", _MASKS_FIELDS),
                             ("sam", _SAM_FIELDS)):
            key = self.parts[name]
            if key is None or name in skip or d[f"{name}_key"] != key:
                continue
            p = self.path_for(key, digest)
            p.parent.mkdir(parents=True, exist_ok=True)
            entry = {**common, **{k: d[k] for k in fields}, "part_key": key}
            atomic_write(p, lambda f, entry=entry: torch.save(entry, f))
            size += p.stat().st_size
            self.writes += 1
        self.bytes_written += size
        if size and not self._estimated:
            self._estimated = True
            self.estimate(remaining, size, enc)

    def estimate(self, remaining: int, entry_bytes: float, enc=None) -> None:
        """Print the expected size of ``remaining`` more entries (and, given the Encoded just written,
        its size per window by part: proxyclip.parts.encoded_size); stop writing when it does not fit."""
        need = entry_bytes * remaining
        free = shutil.disk_usage(self.root).free
        per_window = "" if enc is None else f"; an Encoded is {describe_size(enc)}"
        self.print(
            f"feature cache {self.root}: about {_fmt_bytes(entry_bytes)} an image, {_fmt_bytes(need)} for the "
            f"{remaining} images still to encode ({_fmt_bytes(free)} free){per_window}"
        )
        if need > 0.95 * free:
            self.writing = False
            self.print(
                "feature cache: the estimate does not fit on the disk; not caching further images "
                "(free space or point cache_dir elsewhere)"
            )

    def get_or_encode(self, image_path: PathLike, encode: Callable[..., object], remaining: int = 0,
                      need: Sequence[str] = ()):
        """The cached Encoded, or ``encode(reuse=<the cached parts, or None>)`` and cache what it made.
        ``need``: layer parts the decodes read; a cached CLIP part without them is made again."""
        digest = file_digest(image_path)  # hash the file once
        cached = self.get(image_path, digest, partial=True)
        clip_ok = cached is not None and cached.clip_tokens is not None and all(p in cached.layers for p in need)
        if clip_ok and (self.parts["vfm"] is None or cached.vfm_features is not None) and (
                self.parts["masks"] is None or cached.masks is not None) and (
                self.parts["sam"] is None or cached.sam is not None):
            self.hits += 1
            return cached
        self.misses += 1
        enc = encode(reuse=cached)
        have = [] if cached is None else [n for n in ("clip", "vfm", "masks", "sam")
                                          if getattr(cached, f"{n}_key") == self.parts[n] and (n != "clip" or clip_ok)]
        self.put(image_path, enc, remaining, digest, skip=have)
        return enc
