"""Published mIoU numbers that ``proxyclip-summary`` prints beside measured ones (no post-processing,
except NACLIP's own-protocol row: PAMR on, as its protocol runs).

Papers evaluate with different protocols (short side, crop, ``prob_thd``, background words), so
every row carries the paper it comes from; the summary prints that source under the table, and
for a row measured under its own paper's protocol (``own_protocol``) says that ours ran under
ProxyCLIP's. Each row names the config overrides that reproduce it; a measured row gets its
numbers only if its specs equal that configuration's in every field (:func:`find_published`;
``precision`` aside: the published code ran fp16 on GPUs).
Columns follow :data:`PAPER_DATASETS` (the order of the ProxyCLIP paper's main table); see
``docs/tables.md``.

Two collections:

- :data:`PAPER_MAIN`: the ProxyCLIP paper's main table (its own rows and the baselines it quotes);
  the ``main`` table looks here first.
- :data:`METHODS_B16`: ViT-B/16 rows of the training-free "last block" methods, each as its own
  paper (or, for CLIP and MaskCLIP, the SCLIP paper) reports it; the ``methods`` table looks here first.
- :data:`OWN_PROTOCOL_B16`: rows whose configuration is the method under its own protocol preset
  (``protocol=sclip`` / ``naclip`` / ``resclip`` / ``cass``; the last two with the per-dataset
  method knobs their presets set), from the numbers published for that very setup; the
  ``methods_own`` table (``experiment=paper_methods_own``) looks here first. ClearCLIP, SC-CLIP,
  GEM and LPOSS have none: no checked source for their numbers under their protocol. Trident's row
  (appended last) is with its SAM prompt refinement (``postprocess=sam_refine``), as its scripts run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .records import PER_DATASET, config_fields, fields_of, preset_knobs

# dataset keys in the order of the paper's columns
PAPER_DATASETS: Tuple[str, ...] = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                   "cityscapes", "ade20k")

PROXYCLIP_PAPER = "ProxyCLIP paper (Lan et al., ECCV 2024), main table"
SCLIP_PAPER = "SCLIP paper (Wang et al., ECCV 2024)"
CLEARCLIP_PAPER = "ClearCLIP paper (Lan et al., ECCV 2024)"
NACLIP_PAPER = "NACLIP paper (Hajimiri et al., WACV 2025), without PAMR"
SCLIP_README = ("SCLIP README (wangf3014/SCLIP at b56bd30), the run 'with the default setup in this repo' that "
                "protocol=sclip reproduces; not the SCLIP paper's numbers, which are another run")
NACLIP_README = "NACLIP README, v2 (sinahmr/NACLIP at 0cac3a6), main results with PAMR on (protocol=naclip)"
RESCLIP_PAPER = ("ResCLIP (Yang et al., CVPR 2025), its repository's figs/main_results_w.png and "
                 "figs/main_results_wo.png, without the final PAMR, per-dataset knobs of its configs")
CORRCLIP_README = ("CorrCLIP README (zdk258/CorrCLIP at 103bc18, CorrCLIPv1), ViT-B/16 with the pre-generated SAM 2 "
                   "masks (row SAM2_32) under its own protocol (protocol=corrclip)")
CASS_PAPER = ("CASS paper (Kim et al., CVPR 2025), Table 1 as the project page's image cass/static/images/miou.png "
              "(MICV-yonsei/MICV-yonsei.github.io) shows it; PAMR off, per-dataset knobs (docs/methods.md)")

TRIDENT_README = ("Trident README (YuHengsss/Trident at a93b346), assets/data_result.png = the paper's main table "
                  "(Shi et al., ICCV 2025), ViT-B/16; the repository's scripts run its SAM refinement (--sam_refine)")


@dataclass(frozen=True)
class PublishedRow:
    """One published row: the config overrides that reproduce its configuration, its numbers, and
    where they come from. Its specs (:func:`expected_fields`) are ``eval`` composed with the
    overrides, ``dataset=<d>`` and ``weights=pretrained``; a measured row gets its numbers only
    if its specs equal those in every field (:data:`NOT_COMPARED` aside) and it ran on all images."""

    label: str  # as the paper names the row, e.g. "ProxyCLIP B/16 + DINO B/8"
    overrides: Tuple[str, ...]  # e.g. ("method=proxyclip", "clip=vit_b16", "vfm=dino_vitb8")
    miou: Tuple[float, ...]  # one value per PAPER_DATASETS entry
    avg: float  # the paper's own average column (a test checks it against the values)
    source: str
    own_protocol: bool = False  # measured under its paper's own protocol, not ProxyCLIP's

    @property
    def by_dataset(self) -> Dict[str, float]:
        return dict(zip(PAPER_DATASETS, self.miou))

    @property
    def method(self) -> str:
        return dict(o.split("=", 1) for o in self.overrides)["method"]

    @property
    def protocol(self) -> str:
        """The protocol preset its overrides name (``protocol=...``), else the default, proxyclip."""
        return dict(o.split("=", 1) for o in self.overrides).get("protocol", "proxyclip")


B16, L14, H14 = "clip=vit_b16", "clip=vit_l14", "clip=vit_h14"
DINO_B8 = "vfm=dino_vitb8"
# rows both collections quote (the ProxyCLIP paper copies SCLIP's and NACLIP's own numbers)
SCLIP_B16 = (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1)
NACLIP_B16 = (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4)
PROXYCLIP_B16_DINO_B8 = (61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2)

PAPER_MAIN: Tuple[PublishedRow, ...] = (
    PublishedRow("CLIP ViT-B/16 (vanilla)", ("method=clip", B16),
                 (16.4, 8.4, 5.6, 41.9, 9.2, 4.4, 5.0, 2.9), 11.7, PROXYCLIP_PAPER),
    PublishedRow("SCLIP B/16", ("method=sclip", B16),
                 SCLIP_B16, 38.2, PROXYCLIP_PAPER, own_protocol=True),
    PublishedRow("NACLIP B/16", ("method=naclip", B16),
                 NACLIP_B16, 39.4, PROXYCLIP_PAPER, own_protocol=True),
    PublishedRow("ProxyCLIP B/16 + DINO B/8", ("method=proxyclip", B16, DINO_B8),
                 PROXYCLIP_B16_DINO_B8, 42.3, PROXYCLIP_PAPER),
    PublishedRow("ProxyCLIP L/14 + DINO B/8", ("method=proxyclip", L14, DINO_B8),
                 (60.6, 34.5, 39.2, 83.2, 37.7, 25.6, 40.1, 22.6), 43.0, PROXYCLIP_PAPER),
    PublishedRow("ProxyCLIP H/14 (LAION) + DINO B/8", ("method=proxyclip", H14, DINO_B8),
                 (65.0, 35.4, 38.6, 83.3, 39.6, 26.8, 42.0, 24.2), 44.4, PROXYCLIP_PAPER),
)

METHODS_B16: Tuple[PublishedRow, ...] = (
    PublishedRow("CLIP ViT-B/16", ("method=clip", B16),
                 (18.8, 9.9, 8.1, 49.4, 11.1, 5.7, 6.5, 3.1), 14.1, SCLIP_PAPER, own_protocol=True),
    PublishedRow("MaskCLIP ViT-B/16", ("method=maskclip", B16),
                 (43.4, 23.2, 20.6, 74.9, 26.4, 16.7, 24.9, 11.9), 30.3, SCLIP_PAPER, own_protocol=True),
    PublishedRow("SCLIP ViT-B/16", ("method=sclip", B16),
                 SCLIP_B16, 38.2, SCLIP_PAPER, own_protocol=True),
    PublishedRow("ClearCLIP ViT-B/16", ("method=clearclip", B16),
                 (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7), 38.1, CLEARCLIP_PAPER, own_protocol=True),
    PublishedRow("NACLIP ViT-B/16", ("method=naclip", B16),
                 NACLIP_B16, 39.4, NACLIP_PAPER, own_protocol=True),
    PublishedRow("ProxyCLIP ViT-B/16 + DINO B/8", ("method=proxyclip", B16, DINO_B8),
                 PROXYCLIP_B16_DINO_B8, 42.3, PROXYCLIP_PAPER),
    PublishedRow("NACLIP + ResCLIP ViT-B/16", ("method=resclip", B16),
                 (61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0), 41.4, RESCLIP_PAPER, own_protocol=True),
    PublishedRow("SCLIP + ResCLIP ViT-B/16", ("method=resclip", "method.base=sclip", "method.residual=true",
                                              "method.ffn=true", B16),
                 (60.7, 32.9, 34.3, 84.6, 35.8, 23.9, 34.4, 17.6), 40.5, RESCLIP_PAPER, own_protocol=True),
    PublishedRow("ClearCLIP + ResCLIP ViT-B/16", ("method=resclip", "method.base=clearclip", B16),
                 (59.0, 32.9, 34.0, 87.1, 36.4, 24.3, 34.5, 17.8), 40.7, RESCLIP_PAPER, own_protocol=True),
    PublishedRow("CASS ViT-B/16 + DINO B/8", ("method=cass", B16, DINO_B8, "vfm.feature=k"),
                 (65.8, 36.7, 37.8, 87.8, 40.2, 26.7, 39.4, 20.4), 44.4, CASS_PAPER, own_protocol=True),
)


def _quoted(label: str) -> Tuple[float, ...]:
    """The numbers of :data:`METHODS_B16`'s row ``label`` (a row quoted twice: beside runs under
    ProxyCLIP's protocol, and as the very setup of a run under the method's own preset)."""
    return next(r.miou for r in METHODS_B16 if r.label == label)


RESCLIP_NACLIP_B16 = _quoted("NACLIP + ResCLIP ViT-B/16")
RESCLIP_SCLIP_B16 = _quoted("SCLIP + ResCLIP ViT-B/16")
RESCLIP_CLEARCLIP_B16 = _quoted("ClearCLIP + ResCLIP ViT-B/16")
CASS_B16_DINO_B8 = _quoted("CASS ViT-B/16 + DINO B/8")

# each method under its own protocol preset, with the numbers published for exactly that setup
OWN_PROTOCOL_B16: Tuple[PublishedRow, ...] = (
    PublishedRow("SCLIP ViT-B/16, SCLIP's protocol", ("method=sclip", B16, "protocol=sclip"),
                 (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45), 39.06, SCLIP_README),
    PublishedRow("NACLIP ViT-B/16, NACLIP's protocol (PAMR)", ("method=naclip", B16, "protocol=naclip"),
                 (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05), 42.46, NACLIP_README),
    PublishedRow("ProxyCLIP ViT-B/16 + DINO B/8", ("method=proxyclip", B16, DINO_B8, "protocol=proxyclip"),
                 PROXYCLIP_B16_DINO_B8, 42.3, PROXYCLIP_PAPER),
    # ResCLIP and CASS under their own presets, which carry their configs' per-dataset method knobs
    # (conf/protocol/resclip.yaml, cass.yaml: method_knobs): the setup their numbers were measured in
    PublishedRow("NACLIP + ResCLIP ViT-B/16, ResCLIP's protocol", ("method=resclip", B16, "protocol=resclip"),
                 RESCLIP_NACLIP_B16, 41.4, RESCLIP_PAPER),
    PublishedRow("SCLIP + ResCLIP ViT-B/16, ResCLIP's protocol",
                 ("method=resclip", "method.base=sclip", "method.residual=true", "method.ffn=true", B16,
                  "protocol=resclip"),
                 RESCLIP_SCLIP_B16, 40.5, RESCLIP_PAPER),
    PublishedRow("ClearCLIP + ResCLIP ViT-B/16, ResCLIP's protocol",
                 ("method=resclip", "method.base=clearclip", B16, "protocol=resclip"),
                 RESCLIP_CLEARCLIP_B16, 40.7, RESCLIP_PAPER),
    PublishedRow("CASS ViT-B/16 + DINO B/8, CASS's protocol",
                 ("method=cass", B16, DINO_B8, "vfm.feature=k", "protocol=cass"),
                 CASS_B16_DINO_B8, 44.4, CASS_PAPER),
    # CorrCLIP v1: zdk258/CorrCLIP at 103bc18, README.md lines 125-128, the ViT-B/16 row with its
    # pre-generated SAM 2 masks ("SAM2_32", read from data/region_masks/<set>/<stem>.npz)
    PublishedRow("CorrCLIP ViT-B/16 (MetaCLIP) + DINO B/8, SAM 2 masks from files",
                 ("method=corrclip", "clip=metaclip_vit_b16", DINO_B8, "vfm.feature=qk", "masks=file",
                  "masks.dir=data/region_masks/${dataset.name}", "protocol=corrclip"),
                 (74.8, 44.2, 43.7, 88.8, 48.8, 31.6, 49.4, 26.9), 51.0, CORRCLIP_README, own_protocol=True),
    # Trident: the repository's evaluation scripts run its SAM prompt refinement (postprocess=sam_refine, its
    # per-dataset coarse_thresh in the preset); DINO ViT-B/16 and SAM ViT-B as the official code
    PublishedRow("Trident ViT-B/16 + DINO B/16 + SAM ViT-B, SAM refinement",
                 ("method=trident", B16, "vfm=dino_vitb16", "postprocess=sam_refine", "protocol=trident"),
                 (67.1, 38.6, 41.1, 84.5, 42.2, 28.3, 42.9, 21.9), 45.8, TRIDENT_README, own_protocol=True),
)

# the reference rows of each table kind (``proxyclip-summary --paper`` lists the unmatched ones)
REFERENCE_ROWS: Dict[str, Tuple[PublishedRow, ...]] = {"main": PAPER_MAIN, "methods": METHODS_B16,
                                                       "methods_own": OWN_PROTOCOL_B16}
# where each kind looks for a measured row's published numbers: its own rows first, then the others
COLLECTIONS: Dict[str, Tuple[PublishedRow, ...]] = {"main": PAPER_MAIN + METHODS_B16 + OWN_PROTOCOL_B16,
                                                    "methods": METHODS_B16 + PAPER_MAIN + OWN_PROTOCOL_B16,
                                                    "methods_own": OWN_PROTOCOL_B16 + METHODS_B16 + PAPER_MAIN}


# fields a published configuration is not compared on: the published code ran fp16 on GPUs, and
# no config states the sample list (``limit`` must be null: every image)
NOT_COMPARED = ("precision", "samples", "num_samples")


def row_fields(row: PublishedRow, dataset: str) -> Dict[str, Any]:
    """The flat fields of ``row``'s configuration on ``dataset``."""
    return config_fields(tuple(row.overrides) + (f"dataset={dataset}", "weights=pretrained"))


def mismatch(row: PublishedRow, fields: Mapping[str, Any], dataset: str) -> Dict[str, Tuple[Any, Any]]:
    """``{field: (measured, published config's)}`` where a record's ``fields`` on ``dataset`` differ
    from ``row``'s configuration (:data:`NOT_COMPARED` left out)."""
    want = row_fields(row, dataset)
    names = (set(want) | set(fields)) - set(NOT_COMPARED)
    return {k: (fields.get(k), want.get(k)) for k in sorted(names) if fields.get(k) != want.get(k)}


def find_published(records: Sequence[Mapping[str, Any]],
                   rows: Iterable[PublishedRow] = COLLECTIONS["main"]) -> Optional[PublishedRow]:
    """The first published row whose configuration equals, in every field, each of ``records``
    (one measured row: a record a dataset, with ``"_fields"`` as
    :func:`proxyclip.evaluation.records.fields_of` gives) on a dataset it has numbers for; None if
    there is none (or no record is on a published dataset)."""
    for row in rows:
        mine = [r for r in records if r["dataset"] in row.by_dataset]
        if mine and all(_may_match(row, fields_of(r)) for r in mine) and \
                not any(mismatch(row, fields_of(r), r["dataset"]) for r in mine):
            return row
    return None


def _may_match(row: PublishedRow, fields: Mapping[str, Any]) -> bool:
    """A quick test on the fields no dataset changes (one composition a published row): not the
    per-dataset ones, nor the method knobs the row's protocol preset sets per dataset."""
    if fields.get("method") != row.method:
        return False
    want = row_fields(row, PAPER_DATASETS[0])
    names = (set(want) | set(fields)) - set(NOT_COMPARED) - set(PER_DATASET) - set(preset_knobs(row.protocol,
                                                                                                  row.method))
    return all(fields.get(k) == want.get(k) for k in names)


def published_average(row: PublishedRow, datasets: Sequence[str]) -> Optional[float]:
    """Mean of ``row``'s values over ``datasets`` (None if it lacks one of them); over all eight
    benchmarks, the paper's own average column."""
    if sorted(datasets) == sorted(PAPER_DATASETS):
        return row.avg
    values = [row.by_dataset.get(d) for d in datasets]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)
