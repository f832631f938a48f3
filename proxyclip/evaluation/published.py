"""Published mIoU numbers (no post-processing) that ``proxyclip-summary`` prints beside measured ones.

Papers evaluate with different protocols (short side, crop, ``prob_thd``, background words), so
every row carries the paper it comes from; the summary prints that source under the table.
Columns follow :data:`PAPER_DATASETS` (the order of the ProxyCLIP paper's main table); see
``docs/tables.md``.

Two collections:

- :data:`PAPER_MAIN`: the ProxyCLIP paper's main table (its own rows and the baselines it quotes);
  the ``main`` table looks here first.
- :data:`METHODS_B16`: ViT-B/16 rows of the training-free "last block" methods, each as its own
  paper (or, for CLIP and MaskCLIP, the SCLIP paper) reports it; the ``methods`` table looks here first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

# dataset keys in the order of the paper's columns
PAPER_DATASETS: Tuple[str, ...] = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                   "cityscapes", "ade20k")

PROXYCLIP_PAPER = "ProxyCLIP paper (Lan et al., ECCV 2024), main table"
SCLIP_PAPER = "SCLIP paper (Wang et al., ECCV 2024)"
CLEARCLIP_PAPER = "ClearCLIP paper (Lan et al., ECCV 2024)"
NACLIP_PAPER = "NACLIP paper (Hajimiri et al., WACV 2025), without PAMR"


@dataclass(frozen=True)
class PublishedRow:
    """One published row: which configuration it is, its numbers, and where they come from.

    ``vfm=None`` means the method uses no VFM, so a measured row matches whatever VFM it records.
    """

    label: str  # as the paper names the row, e.g. "ProxyCLIP B/16 + DINO B/8"
    method: str  # our method key: clip | maskclip | sclip | clearclip | naclip | proxyclip
    clip: str  # our CLIP id "<open_clip name>/<tag>", as metrics.json records it
    vfm: Optional[str]  # our VFM key, or None for methods without a VFM
    miou: Tuple[float, ...]  # one value per PAPER_DATASETS entry
    avg: float  # the paper's own average column (a test checks it against the values)
    source: str

    @property
    def by_dataset(self) -> Dict[str, float]:
        return dict(zip(PAPER_DATASETS, self.miou))


B16, L14, H14 = "ViT-B-16/openai", "ViT-L-14/openai", "ViT-H-14/laion2b_s32b_b79k"
# rows both collections quote (the ProxyCLIP paper copies SCLIP's and NACLIP's own numbers)
SCLIP_B16 = (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1)
NACLIP_B16 = (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4)
PROXYCLIP_B16_DINO_B8 = (61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2)

PAPER_MAIN: Tuple[PublishedRow, ...] = (
    PublishedRow("CLIP ViT-B/16 (vanilla)", "clip", B16, None,
                 (16.4, 8.4, 5.6, 41.9, 9.2, 4.4, 5.0, 2.9), 11.7, PROXYCLIP_PAPER),
    PublishedRow("SCLIP B/16", "sclip", B16, None,
                 SCLIP_B16, 38.2, PROXYCLIP_PAPER),
    PublishedRow("NACLIP B/16", "naclip", B16, None,
                 NACLIP_B16, 39.4, PROXYCLIP_PAPER),
    PublishedRow("ProxyCLIP B/16 + DINO B/8", "proxyclip", B16, "dino_vitb8",
                 PROXYCLIP_B16_DINO_B8, 42.3, PROXYCLIP_PAPER),
    PublishedRow("ProxyCLIP L/14 + DINO B/8", "proxyclip", L14, "dino_vitb8",
                 (60.6, 34.5, 39.2, 83.2, 37.7, 25.6, 40.1, 22.6), 43.0, PROXYCLIP_PAPER),
    PublishedRow("ProxyCLIP H/14 (LAION) + DINO B/8", "proxyclip", H14, "dino_vitb8",
                 (65.0, 35.4, 38.6, 83.3, 39.6, 26.8, 42.0, 24.2), 44.4, PROXYCLIP_PAPER),
)

METHODS_B16: Tuple[PublishedRow, ...] = (
    PublishedRow("CLIP ViT-B/16", "clip", B16, None,
                 (18.8, 9.9, 8.1, 49.4, 11.1, 5.7, 6.5, 3.1), 14.1, SCLIP_PAPER),
    PublishedRow("MaskCLIP ViT-B/16", "maskclip", B16, None,
                 (43.4, 23.2, 20.6, 74.9, 26.4, 16.7, 24.9, 11.9), 30.3, SCLIP_PAPER),
    PublishedRow("SCLIP ViT-B/16", "sclip", B16, None,
                 SCLIP_B16, 38.2, SCLIP_PAPER),
    PublishedRow("ClearCLIP ViT-B/16", "clearclip", B16, None,
                 (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7), 38.1, CLEARCLIP_PAPER),
    PublishedRow("NACLIP ViT-B/16", "naclip", B16, None,
                 NACLIP_B16, 39.4, NACLIP_PAPER),
    PublishedRow("ProxyCLIP ViT-B/16 + DINO B/8", "proxyclip", B16, "dino_vitb8",
                 PROXYCLIP_B16_DINO_B8, 42.3, PROXYCLIP_PAPER),
)

# the reference rows of each table kind (``proxyclip-summary --paper`` lists the unmatched ones)
REFERENCE_ROWS: Dict[str, Tuple[PublishedRow, ...]] = {"main": PAPER_MAIN, "methods": METHODS_B16}
# where each kind looks for a measured row's published numbers: its own rows first, then the others
COLLECTIONS: Dict[str, Tuple[PublishedRow, ...]] = {"main": PAPER_MAIN + METHODS_B16, "methods": METHODS_B16 + PAPER_MAIN}


def find_published(method: str, clip: str, vfm: str,
                   rows: Iterable[PublishedRow] = COLLECTIONS["main"]) -> Optional[PublishedRow]:
    """The first published row for this (method, CLIP, VFM), or None.

    A row without a VFM (``vfm=None``) matches any recorded VFM (the method does not use one).
    """
    for row in rows:
        if row.method == method and row.clip == clip and row.vfm in (None, vfm):
            return row
    return None


def published_average(row: PublishedRow, datasets: Sequence[str]) -> Optional[float]:
    """Mean of ``row``'s values over ``datasets`` (None if it lacks one of them); over all eight
    benchmarks, the paper's own average column."""
    if sorted(datasets) == sorted(PAPER_DATASETS):
        return row.avg
    values = [row.by_dataset.get(d) for d in datasets]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)
