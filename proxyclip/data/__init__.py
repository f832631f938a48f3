"""Evaluation datasets: readers for the standard layouts, shipped class-name files, COCO-Object conversion."""

from .datasets import (
    BadLabelError,
    DatasetNotFoundError,
    Sample,
    SegmentationDataset,
    build_dataset,
    classnames_path,
    read_class_lines,
)

__all__ = [
    "BadLabelError",
    "DatasetNotFoundError",
    "Sample",
    "SegmentationDataset",
    "build_dataset",
    "classnames_path",
    "read_class_lines",
]
