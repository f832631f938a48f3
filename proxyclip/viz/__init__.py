"""Figures (matplotlib). Every ``plot_*`` function returns a Figure.

Figures are made with ``matplotlib.figure.Figure`` (no pyplot state), so they work in
notebooks (displayed as the cell's value), scripts (``fig.savefig``), W&B
(``logger.log_figure``) and the widget explorer, headless with any backend.

    label maps (segmentation.py): plot_overlay (image with class boundaries | opaque label map: the
                      legend's colours are the pixels'), plot_segmentation (image | ground truth | prediction),
                      plot_baseline_comparison (no-VFM baseline vs ProxyCLIP), plot_method_grid
    scores:           plot_class_scores (one map per query)
    attention (attention.py): plot_attention_map, plot_attention_grid (the attention of a chosen
                      patch under any method, e.g. CLIP's own from a ``method="clip"`` decode),
                      plot_affinity_stages (S, S' = (S - beta*mean)*gamma, mask, attention)
    sweeps (sweeps.py): plot_sweep_heatmap (a metric over any two swept settings),
                      plot_sweep_line (over one)
    tensors:          pattern_row (a row of an ``attention.pattern`` hook tensor), locate_patch,
                      window_pixels, patch_heatmap
    shared (common.py): label_palette, colorize_labels, image_to_float_hwc, figure_to_png
    marks (marks.py): mark_random_weights(fig, reason) (the red "RANDOM WEIGHTS" band and why),
                      segmenter_reason(seg), marked(fig, seg)
"""

from .attention import (locate_patch, patch_box, patch_heatmap, pattern_row, plot_affinity_stages,
                        plot_attention_grid, plot_attention_map, window_pixels)
from .common import colorize_labels, figure_to_png, image_to_float_hwc, label_palette, present_classes
from .marks import mark_random_weights, marked, random_weights_reason, segmenter_reason
from .segmentation import (class_boundaries, plot_baseline_comparison, plot_class_scores, plot_method_grid, plot_overlay,
                           plot_segmentation)
from .sweeps import plot_sweep_heatmap, plot_sweep_line

__all__ = ["class_boundaries", "mark_random_weights", "marked", "random_weights_reason", "segmenter_reason",
           "colorize_labels", "figure_to_png", "image_to_float_hwc", "label_palette", "locate_patch", "patch_box",
           "patch_heatmap", "pattern_row", "plot_affinity_stages", "plot_attention_grid", "plot_attention_map",
           "plot_baseline_comparison", "plot_class_scores", "plot_method_grid", "plot_overlay", "plot_segmentation",
           "plot_sweep_heatmap", "plot_sweep_line", "present_classes", "window_pixels"]
