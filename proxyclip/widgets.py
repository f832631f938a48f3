"""The interactive explorer, under its first name: see :mod:`proxyclip.explorer`.

    from proxyclip.widgets import Explorer, ExplorerController
"""

from .explorer import (ASSETS, DEFAULT_CLASSES, AttentionView, Explorer, ExplorerController, available_backbones,
                       figure_to_png, pixel_to_data, sample_images)

__all__ = ["ExplorerController", "Explorer", "AttentionView", "available_backbones", "sample_images",
           "DEFAULT_CLASSES", "ASSETS", "figure_to_png", "pixel_to_data"]
