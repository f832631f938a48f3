"""COCO-Object (81 classes) from COCO-Stuff 164k label maps (docs/protocol.md, Per-dataset protocol).

COCO-Object keeps COCO's 80 thing classes as 1..80 and makes every stuff pixel and every
unlabeled pixel background 0. Two inputs are understood, per file:

- ``*_labelTrainIds.png`` (COCO-Stuff as mmsegmentation prepares it): 0..79 things,
  80..170 stuff, 255 unlabeled -> ``thing + 1``, 0, 0.
- the original ``stuffthingmaps_trainval2017`` PNGs (``<image id>.png``): value = COCO category
  id - 1, i.e. things 0..89 with 10 unused ids, stuff 91..181, 255 unlabeled.

Output: ``<image id>_instanceTrainIds.png`` (mode L), the file name the COCO-Object config
expects. The same module maps original stuffthingmaps to COCO-Stuff's 171 train ids
(``*_labelTrainIds.png``) for users who only have the original download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..files import atomic_write

__all__ = [
    "COCO_THING_IDS",
    "raw_to_stuff_trainids_lut",
    "raw_to_object_lut",
    "trainids_to_object_lut",
    "convert_coco_object",
]

# COCO category ids of the 80 thing classes (1..90 with 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused)
COCO_THING_IDS: Tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
assert len(COCO_THING_IDS) == 80
NUM_STUFF = 91  # COCO-Stuff stuff categories 92..182
UNLABELED = 255


def raw_to_stuff_trainids_lut() -> np.ndarray:
    """256-entry map from original stuffthingmaps values to COCO-Stuff's 171 train ids (255 = ignore)."""
    lut = np.full(256, UNLABELED, dtype=np.uint8)
    for train_id, cat in enumerate(COCO_THING_IDS):
        lut[cat - 1] = train_id
    for j in range(NUM_STUFF):
        lut[91 + j] = 80 + j
    return lut


def trainids_to_object_lut() -> np.ndarray:
    """256-entry map from COCO-Stuff train ids (0..170, 255) to COCO-Object labels (0..80)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:80] = np.arange(1, 81, dtype=np.uint8)
    return lut


def raw_to_object_lut() -> np.ndarray:
    """256-entry map from original stuffthingmaps values to COCO-Object labels (0..80)."""
    return trainids_to_object_lut()[raw_to_stuff_trainids_lut()]


def _save_index_png(arr: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda f: Image.fromarray(arr, mode="L").save(f, format="PNG"))


def _read_index_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{path}: mode {im.mode!r}; expected a single-channel 8-bit label map (L or P)")
        return np.array(im)


def convert_coco_object(
    src: Path,
    dst: Path,
    stuff_dst: Optional[Path] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> List[Path]:
    """Write COCO-Object labels for every COCO-Stuff label PNG in ``src`` into ``dst``.

    src: a folder of ``*_labelTrainIds.png`` or original ``<id>.png`` stuffthingmaps.
    stuff_dst: also write COCO-Stuff ``*_labelTrainIds.png`` there (from original maps only).
    Returns the written paths. Existing outputs are kept unless ``overwrite`` (so an
    interrupted conversion resumes; each file is written atomically).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(
            f"COCO-Stuff label folder {src} not found: expected e.g. coco_stuff164k/annotations/val2017 "
            f"(files *_labelTrainIds.png) or stuffthingmaps_trainval2017/val2017 (files <id>.png)"
        )
    files = sorted(p for p in src.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no label PNGs in {src}")
    t2o, r2o, r2t = trainids_to_object_lut(), raw_to_object_lut(), raw_to_stuff_trainids_lut()
    written: List[Path] = []
    it: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="COCO-Object", unit="img")
    for f in it:
        if f.name.endswith("_labelTrainIds.png"):
            stem, raw = f.name[: -len("_labelTrainIds.png")], False
        elif f.name.endswith("_instanceTrainIds.png"):
            continue
        else:
            stem, raw = f.stem, True
        out = dst / f"{stem}_instanceTrainIds.png"
        if out.exists() and not overwrite and not (raw and stuff_dst is not None):
            continue
        arr = _read_index_png(f)
        _save_index_png((r2o if raw else t2o)[arr], out)
        written.append(out)
        if raw and stuff_dst is not None:
            _save_index_png(r2t[arr], Path(stuff_dst) / f"{stem}_labelTrainIds.png")
    return written
