"""Dataset readers for the standard on-disk layouts (mmsegmentation-style), driven by ``conf/dataset/*.yaml``.

Every dataset is one pattern: a ``root`` folder, an images folder ``img_dir`` and a label folder
``ann_dir`` below it, and sample ids that are paths relative to those folders without the
suffix: ``image = root/img_dir/<id><img_suffix>``, ``label = root/ann_dir/<id><seg_suffix>``. The
ids come from a split file (one id a line) or from listing one of the two folders. The layouts
(which folder, which suffix) are data in the dataset's YAML file, not code.

Label maps are single-channel PNGs (mode ``P``/``L``) or 16-bit TIFFs (mode ``I;16``) of class
indices. ``reduce_zero_label`` maps 0 to the ignore index and ``k`` to ``k - 1`` (VOC20,
Pascal Context 59, ADE20K). A label map whose size differs from its image, or that holds a
value outside ``[0, num_classes)`` other than the ignore index, is a :class:`BadLabelError`
naming the file; with ``bad_labels: skip`` the evaluation skips that image and reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import config_get
from ..text import display_names

__all__ = [
    "BadLabelError",
    "DatasetNotFoundError",
    "Sample",
    "SegmentationDataset",
    "build_dataset",
    "classnames_path",
    "read_class_lines",
]

CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root, folder, split file or sample file is not where the config says."""


class BadLabelError(ValueError):
    """A label map that cannot be evaluated (wrong size, wrong mode, values out of range)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self):  # rebuilt from its two fields when a read-ahead worker sends it
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class Sample:
    """One evaluation image: its id (relative path without suffix) and the two files."""

    id: str
    image: Path
    label: Path


def classnames_path(name: str) -> Path:
    """A class-name file: a bare name (``voc21``, or a protocol's ``sclip/voc21``) is looked up in
    ``proxyclip/data/classnames/``."""
    p = Path(name)
    if p.suffix == "" and not p.exists():
        p = CLASSNAMES_DIR / f"{name}.txt"
    if not p.is_file():
        shipped = sorted(str(q.relative_to(CLASSNAMES_DIR).with_suffix("")) for q in CLASSNAMES_DIR.glob("**/*.txt"))
        raise FileNotFoundError(
            f"class-name file {p} not found: give dataset.classnames a path to a text file with one class "
            f"a line (synonyms separated by '; '), or one of the shipped names: {', '.join(shipped)}"
        )
    return p


def read_class_lines(name: str, background: Optional[Sequence[str]] = None) -> List[str]:
    """The class lines of a class-name file (empty lines dropped, whitespace stripped).

    ``background``: words that replace class 0's line (joined with ``"; "``), for ablating the
    background word list without editing the shipped file.
    """
    path = classnames_path(name)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"class-name file {path} holds no class names")
    if background:
        lines[0] = "; ".join(str(w).strip() for w in background)
    return lines


class SegmentationDataset:
    """Samples of one dataset plus its protocol (class lines, ignore index, label reduction).

    ``ds[i]`` -> ``(image, label)``: a PIL RGB image and an ``(H, W)`` int64 label tensor,
    already reduced (``reduce_zero_label``) and checked (:meth:`load_label`). ``class_names`` are
    the class lines (the text queries); ``display_names`` one short name each (class 0 is
    ``"background"`` when ``background_class``).
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        *,
        root: Optional[Path] = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        bad_labels: str = "error",
        background_class: bool = False,
    ):
        if bad_labels not in ("error", "skip"):
            raise ValueError(f"dataset.bad_labels must be 'error' or 'skip', got {bad_labels!r}")
        self.name = name
        self.root = root
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.display_names = display_names(self.class_names, background_class)
        self.num_classes = len(self.class_names)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = int(ignore_index)
        self.bad_labels = bad_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Image.Image, torch.Tensor]:
        image = self.load_image(i)
        return image, self.load_label(i, expected_size=image.size)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, root={self.root})"

    def load_image(self, i: int) -> Image.Image:
        path = self.samples[i].image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DatasetNotFoundError(f"{path}: cannot read image ({e})") from e

    def load_label(self, i: int, expected_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The label map of sample ``i`` as ``(H, W)`` int64 after ``reduce_zero_label``.

        expected_size: the image's ``(width, height)``; a label of another size is a BadLabelError.
        """
        path = self.samples[i].label
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode not in LABEL_MODES:
                    raise BadLabelError(
                        path,
                        f"label map has mode {mode!r}; expected a single-channel map of class indices "
                        f"(PNG mode P or L, or 16-bit TIFF)",
                    )
                size = im.size
                arr = np.array(im)
        except OSError as e:
            raise DatasetNotFoundError(f"{path}: cannot read label map ({e})") from e
        if expected_size is not None and tuple(size) != tuple(expected_size):
            raise BadLabelError(
                path,
                f"label map is {size[0]}x{size[1]} but its image {self.samples[i].image.name} is "
                f"{expected_size[0]}x{expected_size[1]} (width x height)",
            )
        label = torch.from_numpy(arr.astype(np.int64))
        if self.reduce_zero_label:
            ignore = (label == 0) | (label == self.ignore_index)
            label = torch.where(ignore, torch.full_like(label, self.ignore_index), label - 1)
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bool(bad.any()):
            values = sorted(int(v) for v in torch.unique(label[bad])[:10])
            if self.reduce_zero_label:
                values = [v + 1 for v in values]
            raise BadLabelError(
                path,
                f"{int(bad.sum())} pixels hold label values {values} outside the class range "
                f"[{1 if self.reduce_zero_label else 0}, {self.num_classes - (0 if self.reduce_zero_label else 1)}]"
                f" and not the ignore index {self.ignore_index}"
                + (" (stored values, before reduce_zero_label)" if self.reduce_zero_label else ""),
            )
        return label

    def subset(self, indices: Sequence[int]) -> "SegmentationDataset":
        out = SegmentationDataset(
            self.name,
            [self.samples[i] for i in indices],
            self.class_names,
            root=self.root,
            reduce_zero_label=self.reduce_zero_label,
            ignore_index=self.ignore_index,
            bad_labels=self.bad_labels,
        )
        out.display_names = list(self.display_names)
        return out


# ----------------------------------------------------------------------------------------------
# building a dataset from its config


def _prepare_hint(cfg: Any) -> str:
    hint = (config_get(cfg, "prepare") or "").strip()
    return f"\nHow to prepare it:\n  {hint}" if hint else ""


def _suggest_root(root: Path, rel: str) -> str:
    """If ``rel`` exists one or two levels below ``root`` (or above), suggest that folder as root."""
    found: List[Path] = []
    if root.is_dir():
        for depth in ("*", "*/*"):
            for cand in sorted(root.glob(depth)):
                if cand.is_dir() and (cand / rel).is_dir():
                    found.append(cand)
            if found:
                break
    parent = root.parent
    if not found and (parent / rel).is_dir():
        found.append(parent)
    if not found:
        return ""
    return f"\n  '{rel}' exists under {found[0]}: did you mean dataset.root={found[0]} ?"


def _list_ids(folder: Path, suffix: str, recursive: bool) -> List[str]:
    pattern = "**/*" if recursive else "*"
    ids = []
    for p in folder.glob(pattern):
        name = p.name
        if suffix == "auto":
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                ids.append(str(p.relative_to(folder).with_suffix("")))
        elif name.endswith(suffix) and p.is_file():
            rel = str(p.relative_to(folder))
            ids.append(rel[: len(rel) - len(suffix)])
    return sorted(ids)


def _resolve_image(folder: Path, sid: str, suffix: str) -> Path:
    if suffix != "auto":
        return folder / f"{sid}{suffix}"
    for s in IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES):
        p = folder / f"{sid}{s}"
        if p.is_file():
            return p
    return folder / f"{sid}.jpg"


def build_dataset(cfg: Any) -> SegmentationDataset:
    """A :class:`SegmentationDataset` from a dataset config (``cfg.dataset``; fields in ``DatasetConfig``).

    Raises DatasetNotFoundError naming the expected path, and how to prepare the data, when the
    root, a folder, the split file, or any listed image/label file is missing.
    """
    name = config_get(cfg, "name")
    root_s = config_get(cfg, "root")
    if root_s in (None, ""):
        raise DatasetNotFoundError(
            f"dataset '{name}': no root given; pass dataset.root=PATH (or data_root=DIR holding the usual "
            f"mmsegmentation folders)." + _prepare_hint(cfg)
        )
    root = Path(os.path.expanduser(str(root_s)))
    img_dir_rel = str(config_get(cfg, "img_dir"))
    ann_dir_rel = str(config_get(cfg, "ann_dir"))
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset '{name}': root folder {root} does not exist (dataset.root). It should contain "
            f"'{img_dir_rel}' (images) and '{ann_dir_rel}' (label maps)." + _suggest_root(root, img_dir_rel)
            + _prepare_hint(cfg)
        )
    img_dir = root / img_dir_rel
    ann_dir = root / ann_dir_rel
    for what, d, rel in (("images", img_dir, img_dir_rel), ("label", ann_dir, ann_dir_rel)):
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"dataset '{name}': {what} folder {d} not found (dataset.root={root}, expected '{rel}' inside it)."
                + _suggest_root(root, rel) + _prepare_hint(cfg)
            )
    img_suffix = str(config_get(cfg, "img_suffix", ".jpg"))
    seg_suffix = str(config_get(cfg, "seg_suffix", ".png"))
    recursive = bool(config_get(cfg, "recursive", False))
    split_file = config_get(cfg, "split_file")
    if split_file:
        sf = root / str(split_file)
        if not sf.is_file():
            raise DatasetNotFoundError(
                f"dataset '{name}': split file {sf} not found (dataset.split_file='{split_file}' relative to "
                f"dataset.root={root}); set dataset.split_file=null to evaluate every label map in {ann_dir}."
                + _prepare_hint(cfg)
            )
        ids = [ln.strip() for ln in sf.read_text().splitlines() if ln.strip()]
    else:
        list_from = str(config_get(cfg, "list_from", "images"))
        if list_from == "images":
            ids = _list_ids(img_dir, img_suffix, recursive)
        elif list_from == "labels":
            ids = _list_ids(ann_dir, seg_suffix, recursive)
        else:
            raise ValueError(f"dataset '{name}': dataset.list_from must be 'images' or 'labels', got {list_from!r}")
    if not ids:
        raise DatasetNotFoundError(
            f"dataset '{name}': no samples found (images '*{img_suffix}' in {img_dir}, labels '*{seg_suffix}' "
            f"in {ann_dir})." + _prepare_hint(cfg)
        )
    samples = [Sample(sid, _resolve_image(img_dir, sid, img_suffix), ann_dir / f"{sid}{seg_suffix}") for sid in ids]
    missing = [p for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        raise DatasetNotFoundError(
            f"dataset '{name}': {len(missing)} listed files are missing, e.g.\n  {shown}" + _prepare_hint(cfg)
        )
    class_lines = read_class_lines(str(config_get(cfg, "classnames")), config_get(cfg, "background"))
    k = config_get(cfg, "num_classes")
    if k is not None and int(k) != len(class_lines):
        raise ValueError(
            f"dataset '{name}': class-name file {classnames_path(str(config_get(cfg, 'classnames')))} has "
            f"{len(class_lines)} lines but dataset.num_classes={k}"
        )
    return SegmentationDataset(
        str(name),
        samples,
        class_lines,
        root=root,
        reduce_zero_label=bool(config_get(cfg, "reduce_zero_label", False)),
        ignore_index=int(config_get(cfg, "ignore_index", 255)),
        bad_labels=str(config_get(cfg, "bad_labels", "error")),
        background_class=bool(config_get(cfg, "background_class", False) or config_get(cfg, "background")),
    )
