"""ProxyCLIP workbench: training-free open-vocabulary segmentation with proxy attention.

    from proxyclip import Segmenter, compose_config
    seg = Segmenter.from_config(compose_config(overrides=["weights=random"]))
    pred = seg.predict("image.jpg", classes=["sky", "person; people", "horse"])
"""

from .config import compose_config
from .hooks import hook_names
from .images import ImageError, load_image
from .pipeline import Encoded, Prediction, Segmenter
from .specs import DecodeSpec, EncodeSpec
from .text import parse_classes

HOOK_NAMES = hook_names()  # every declared hook point (proxyclip/hooks.py), once the pipeline is imported

__all__ = ["Segmenter", "Encoded", "Prediction", "compose_config", "load_image", "parse_classes", "ImageError",
           "HOOK_NAMES", "hook_names", "EncodeSpec", "DecodeSpec"]
__version__ = "0.1.0"
