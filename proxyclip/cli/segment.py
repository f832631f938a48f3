"""``proxyclip-segment``: segment one image with a list of class names.

    proxyclip-segment image=PATH 'classes=[sky,"person; people",horse]' vfm=dinov2_vitb14_reg method.gamma=2.5

Writes into the Hydra run directory: ``labels.png`` (palette PNG, index = class),
``overlay.png`` (the image with class boundaries beside the opaque label map, a legend in the
map's exact colours, and a red band naming why when the weights are random), ``shares.json`` (per-class pixel shares)
and ``config.yaml`` (the resolved config); with ``logger=wandb`` also a W&B run (segmentation
mask, overlay, shares table, config). Hydra multirun (``-m``) works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "sample.jpg"


def overlay_figure(pred, cfg: DictConfig):
    """The overlay of ``pred`` (``viz.plot_overlay``), marked when its weights are random: the band
    says whether ``weights=random`` was chosen (``cfg.weights.source``) or was the fallback."""
    from ..viz import mark_random_weights, plot_overlay, random_weights_reason

    fig = plot_overlay(pred.image, pred.labels, pred.class_names)
    return mark_random_weights(fig, random_weights_reason(pred.random_weights, cfg.weights.source))


def write_outputs(pred, out_dir: Path, cfg: DictConfig, image_path: str, encode: Optional[dict] = None) -> dict:
    """Write labels.png, overlay.png, shares.json and config.yaml; return the shares record
    (with the run identity: ``encode``, the Segmenter's EncodeSpec record, and ``decode``)."""
    import numpy as np
    from PIL import Image

    from ..viz import label_palette

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = pred.labels.numpy()
    k = len(pred.class_names)
    if k > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got {k}")
    png = Image.fromarray(labels.astype(np.uint8), mode="P")
    png.putpalette(label_palette(256).flatten().tolist())
    png.save(out_dir / "labels.png")
    overlay_figure(pred, cfg).savefig(out_dir / "overlay.png")  # the figure's own layout: no tight bbox
    counts = np.bincount(labels.ravel(), minlength=k)
    record = dict(
        image=image_path,
        size=list(labels.shape),
        random_weights=pred.random_weights,
        encode=encode,
        decode=None if pred.spec is None else pred.spec.record(),
        shares={name: float(c) / labels.size for name, c in zip(pred.class_names, counts)},
    )
    (out_dir / "shares.json").write_text(json.dumps(record, indent=2))
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return record


def run(cfg: DictConfig, out_dir: Path) -> dict:
    from ..pipeline import Segmenter

    from ..loggers import build_logger

    image = cfg.image or str(SAMPLE_IMAGE)
    seg = Segmenter.from_config(cfg)  # resolves device/precision "auto" into cfg (saved in config.yaml)
    print(f"[proxyclip] device {cfg.device}, precision {cfg.precision}")
    pred = seg.predict(image, list(cfg.classes))
    record = write_outputs(pred, out_dir, cfg, image, encode=seg.encode_spec.record())
    identity = {"job": "segment", "image": image, "encode": record["encode"], "decode": record["decode"]}
    with build_logger(cfg.logger, identity, job_type="segment") as logger:
        logger.log_segmentation("segmentation", pred.image, pred.labels, class_names=pred.class_names)
        logger.log_figure("overlay", overlay_figure(pred, cfg))
        logger.log_table("shares", ["class", "share"], list(record["shares"].items()))
        logger.log_summary({"random_weights": pred.random_weights})
    tag = " (RANDOM weights)" if pred.random_weights else ""
    top = sorted(record["shares"].items(), key=lambda kv: -kv[1])[:5]
    print(f"[proxyclip] {image}{tag} -> {out_dir}: " + ", ".join(f"{n} {s:.1%}" for n, s in top))
    return record


def _main(cfg: DictConfig) -> None:
    from ..config import hydra_output_dir
    from .errors import input_errors
    from .hydra_app import quiet_root_info, report_job_done, report_job_error, user_overrides

    quiet_root_info()
    out = Path(hydra_output_dir())
    try:
        if cfg.image and "classes" not in user_overrides():
            # the default class list belongs to the bundled sample photo, not to the user's image
            raise ValueError(f"image={cfg.image} needs its class names: add 'classes=[sky,\"person; people\",...]' "
                             "(the default list describes the bundled sample photo only)")
        run(cfg, out)
    except input_errors() as e:
        # a problem with the input or the config: say what it is, without a stack trace
        report_job_error("proxyclip-segment", str(e), out)
        return
    report_job_done()


def main() -> None:
    from .hydra_app import run_app

    run_app("proxyclip-segment", "segment", _main, __doc__)


if __name__ == "__main__":
    main()
