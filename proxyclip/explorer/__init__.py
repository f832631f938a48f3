"""The interactive explorer: a plain controller (testable without a browser) and its ipywidgets view.

    from proxyclip.explorer import Explorer      # or: from proxyclip.widgets import Explorer
    Explorer(clip="vit_b16", vfm="dino_vitb8", weights="random").widget   # display in a notebook

The controls come from the declarations (proxyclip/knobs.py): the current method's knobs
(``get_method(m).all_knobs``: the residual/ffn switches, its own knobs, logit_scale and prob_thd)
and the chosen post-process preset's settings; a slider per number with a declared slider
range (else a bounded text box), a checkbox per switch, a dropdown per choice.

The controller keeps the expensive half (``Encoded``) cached per (backbones, image):

- a knob control, the method dropdown, the post-process dropdown or its settings, or the class
  list -> one ``decode`` on the cached ``Encoded`` (no encode);
- the patch sliders -> no computation at all: the attention rows come from the attention the
  method ran (``attention.pattern``) recorded by the last decode and CLIP's own last-block
  attention (``methods.vanilla_attention``) computed once per encode;
- the CLIP block slider -> that block's own attention from the encode's layer parts (the first
  move below the last block encodes CLIP once more keeping them; ``inside.py``), no decode;
- a new VFM -> only the VFM is encoded (CLIP's part of the image is reused); a new CLIP or a new
  image -> ``encode`` (with a progress bar), unless that (backbones, image) pair was encoded before.

Modules: ``controller`` (state, ``set_knobs``/``set_method``/``set_postprocess``, refresh),
``pipelines`` (the caches), ``figures`` (what is drawn), ``controls`` (knob -> widget),
``inputs`` (image inputs), ``view`` (the ipywidgets view: what each change does), ``panel`` (its
widgets and their layout), ``sources`` (backbones, sample images),
``inside`` (each block's attention; the registry of a method's extra attention views).
"""

from ..viz import figure_to_png
from .controller import ExplorerController
from .figures import AttentionView
from .sources import ASSETS, DEFAULT_CLASSES, available_backbones, pixel_to_data, sample_images
from .view import Explorer

__all__ = ["ExplorerController", "Explorer", "AttentionView", "available_backbones", "sample_images",
           "DEFAULT_CLASSES", "ASSETS", "figure_to_png", "pixel_to_data"]
