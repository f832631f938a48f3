"""Experiment loggers: Weights & Biases, or a no-op logger with the same methods.

Select with the Hydra group ``logger=`` (``conf/logger/none.yaml``, ``conf/logger/wandb.yaml``)::

    with build_logger(cfg.logger, to_container(cfg), group="gamma-beta-grid") as log:
        log.log_metrics({"mIoU": 41.2}, step=0)
        log.log_table("per_class_iou", ["class", "IoU"], [["cat", 50.0], ["dog", 32.4]])
        log.log_segmentation("val/0", image, pred_labels, gt_labels, class_names)
        log.log_figure("attention", fig)

W&B modes: ``online`` (needs an account), ``offline`` (writes ``<dir>/wandb/offline-run-*``;
upload later with ``wandb sync DIR``), ``disabled`` (writes nothing). Every call of
:func:`build_logger` makes its own run (``reinit="create_new"``), so each Hydra multirun
job and each iteration of a notebook loop is one run; give them a common ``group``
(the sweep's name) to see them together.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .config import config_get, hydra_output_dir
from .text import display_name

__all__ = ["Logger", "NoOpLogger", "WandbLogger", "build_logger", "hydra_output_dir", "hydra_run_identity",
           "image_to_uint8"]


def image_to_uint8(image: Any) -> np.ndarray:
    """An image as ``(H, W, 3) uint8``: :func:`proxyclip.viz.image_to_float_hwc` (which accepts a PIL
    image, an ``(H, W, 3)`` array, uint8 or float in [0, 1], or a ``(3, H, W)`` float tensor/array
    in [0, 1]), scaled to 0..255 and rounded."""
    from .viz import image_to_float_hwc

    return np.clip(np.rint(image_to_float_hwc(image).astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _labels_to_numpy(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


class Logger:
    """The logger interface. The base class does nothing (it is the ``none`` logger)."""

    enabled = False
    run = None

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Scalars (or anything W&B can log) under their keys, optionally at ``step``."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table, e.g. per-class IoU: ``columns=["class", "IoU"]``, one row per class."""

    def log_segmentation(
        self,
        key: str,
        image: Any,
        pred_labels: Any,
        gt_labels: Any = None,
        class_names: Sequence[str] = (),
        ignore_index: int = 255,
    ) -> None:
        """An image with the predicted (and ground-truth) label maps ``(H, W)`` as masks."""

    def log_figure(self, key: str, fig: Any, close: bool = False) -> None:
        """A matplotlib Figure, as an image (rendered at the figure's dpi)."""

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Final values of a run (shown in the runs table)."""

    def finish(self) -> None:
        """End the run (flush and close files). Safe to call twice."""

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish()


class NoOpLogger(Logger):
    """``logger=none``: every method accepts its arguments and does nothing."""


class WandbLogger(Logger):
    """A Weights & Biases run. Build it with :func:`build_logger`."""

    enabled = True

    def __init__(
        self,
        config: Optional[Mapping[str, Any]] = None,
        *,
        project: str = "proxyclip",
        entity: Optional[str] = None,
        mode: str = "offline",
        name: Optional[str] = None,
        group: Optional[str] = None,
        job_type: Optional[str] = None,
        tags: Sequence[str] = (),
        dir: Optional[str] = None,
    ) -> None:
        import wandb

        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, not {mode!r}")
        self._wandb = wandb
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            name=name,
            group=group,
            job_type=job_type,
            tags=list(tags) or None,
            dir=dir,
            config=dict(config or {}),
            reinit="create_new",
            settings=wandb.Settings(console="off"),  # system metrics on; stdout is not captured
        )
        self._finished = False

    @property
    def run_dir(self) -> Optional[str]:
        """The run's local folder (``.../wandb/offline-run-*``), holding ``run-*.wandb``."""
        directory = getattr(self.run, "dir", None)  # .../offline-run-*/files
        return os.path.dirname(directory) if directory else None

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        rows = [[_plain(v) for v in row] for row in rows]
        self.run.log({key: self._wandb.Table(columns=list(columns), data=rows)})

    def log_segmentation(
        self,
        key: str,
        image: Any,
        pred_labels: Any,
        gt_labels: Any = None,
        class_names: Sequence[str] = (),
        ignore_index: int = 255,
    ) -> None:
        pixels = image_to_uint8(image)
        pred = _labels_to_numpy(pred_labels).astype(np.int64)
        if pred.shape != pixels.shape[:2]:
            raise ValueError(f"pred_labels {pred.shape} does not match the image {pixels.shape[:2]}")
        class_labels = {i: display_name(n) for i, n in enumerate(class_names)}
        masks = {"prediction": {"mask_data": pred, "class_labels": dict(class_labels)}}
        if gt_labels is not None:
            gt = _labels_to_numpy(gt_labels).astype(np.int64)
            if gt.shape != pixels.shape[:2]:
                raise ValueError(f"gt_labels {gt.shape} does not match the image {pixels.shape[:2]}")
            gt_labels_map = dict(class_labels)
            if (gt == ignore_index).any():
                gt_labels_map[ignore_index] = "ignore"
            masks["ground_truth"] = {"mask_data": gt, "class_labels": gt_labels_map}
        self.run.log({key: self._wandb.Image(pixels, masks=masks)})

    def log_figure(self, key: str, fig: Any, close: bool = False) -> None:
        self.run.log({key: self._wandb.Image(_figure_to_uint8(fig))})
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = _plain(v)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def _plain(v: Any) -> Any:
    """numpy / torch scalars -> Python numbers (W&B tables want plain values)."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


def hydra_run_identity() -> tuple[Optional[str], Optional[str]]:
    """``(name, group)`` for the current Hydra job: in a multirun, group = the sweep folder's name
    and name = the job's values of the swept keys (``method.beta=1.0,method.gamma=3.0``); else
    ``(None, None)``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None, None
        group = os.path.basename(os.path.normpath(str(hc.sweep.dir)))
        return _swept_overrides(hc) or hc.job.override_dirname or f"job{hc.job.num}", group
    except Exception:  # no Hydra, or a partial HydraConfig (compose API): no defaults
        return None, None


def _swept_overrides(hc: Any) -> Optional[str]:
    """The job's overrides of the keys the sweep varies (read from the sweep's multirun.yaml,
    which Hydra writes before the first job), e.g. ``method.beta=1.0``; None if unknown."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = os.path.join(str(hc.sweep.dir), "multirun.yaml")
    if not os.path.exists(path):
        return None
    parser = OverridesParser.create()
    sweep_lines = list(OmegaConf.load(path).hydra.overrides.task)
    swept = {o.key_or_group for o in parser.parse_overrides(sweep_lines) if o.is_sweep_override()}
    job_lines = list(hc.overrides.task)
    mine = [line for line, o in zip(job_lines, parser.parse_overrides(job_lines)) if o.key_or_group in swept]
    return ",".join(mine) or None


def build_logger(
    logger_cfg: Any,
    config: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
    group: Optional[str] = None,
    job_type: Optional[str] = None,
) -> Logger:
    """The logger ``logger_cfg`` asks for (a ``LoggerConfig``; ``None`` = no logging).

    ``config`` is the resolved run config (``proxyclip.config.to_container(cfg)``), stored
    as the run's config. ``name``/``group`` override ``logger_cfg``'s (``group`` = the
    sweep's name, so a sweep's runs are grouped); ``job_type`` e.g. "eval" or "sweep".
    ``logger_cfg.name == "none"`` or ``mode == "disabled"`` gives a :class:`NoOpLogger`.
    Inside a Hydra multirun, missing ``name``/``group`` default to the job's swept values and
    the sweep folder's name, so every job is its own run and the sweep is one group. Inside
    any Hydra app, a missing ``logger.dir`` is the job's output folder (the run sits next to
    the job's other files: ``wandb sync multirun/<sweep>/*/wandb/offline-run-*``).
    """
    kind = config_get(logger_cfg, "name", "none")
    mode = config_get(logger_cfg, "mode", "disabled")
    if kind in (None, "none") or mode == "disabled":
        return NoOpLogger()
    if kind != "wandb":
        raise ValueError(f"unknown logger {kind!r}: use logger=none or logger=wandb")
    hydra_name, hydra_group = hydra_run_identity()
    if name is None:
        name = hydra_name
    if group is None:
        group = config_get(logger_cfg, "group") or hydra_group
    return WandbLogger(
        config,
        project=config_get(logger_cfg, "project", "proxyclip") or "proxyclip",
        entity=config_get(logger_cfg, "entity"),
        mode=mode,
        name=name,
        group=group,
        job_type=job_type,
        tags=list(config_get(logger_cfg, "tags", []) or []),
        dir=config_get(logger_cfg, "dir") or hydra_output_dir(),
    )


def _figure_to_uint8(fig: Any) -> np.ndarray:
    """A matplotlib Figure as ``(H, W, 3) uint8`` pixels (rendered by :func:`proxyclip.viz.figure_to_png`)."""
    import io

    from PIL import Image

    from .viz import figure_to_png

    return np.asarray(Image.open(io.BytesIO(figure_to_png(fig))).convert("RGB"))
