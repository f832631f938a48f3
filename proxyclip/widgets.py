"""The interactive explorer: a plain controller (testable without a browser) and its ipywidgets view.

    from proxyclip.widgets import Explorer
    Explorer(clip="vit_b16", vfm="dino_vitb8", weights="random").widget   # display in a notebook

The controller keeps the expensive half (``Encoded``) cached per (backbones, image):

- a slider (gamma, beta, logit temperature, prob_thd), the method dropdown, the PAMR toggle or
  the class list -> one ``decode`` on the cached ``Encoded`` (no encode);
- the patch sliders -> no computation at all: the attention rows come from the attention the
  method ran (``attention.pattern``) recorded by the last decode and CLIP's own last-block
  attention computed once per encode;
- a new VFM -> only the VFM is encoded (CLIP's part of the image is reused); a new CLIP or a new
  image -> ``encode`` (with a progress bar), unless that (backbones, image) pair was encoded before.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import CONF_DIR, compose_config
from .images import load_image
from .methods import METHODS
from .pipeline import Encoded, Prediction, Segmenter
from .text import parse_classes
from .viz import figure_to_png

__all__ = ["ExplorerController", "Explorer", "available_backbones", "sample_images", "DEFAULT_CLASSES",
           "figure_to_png", "pixel_to_data"]

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_CLASSES = ["person; woman; lady", "flag", "wall", "uniform; jacket", "tie"]
STAGE_NAMES = ("proxy.affinity", "proxy.affinity_normalized", "proxy.mask")  # recorded only when shown


def available_backbones(group: str) -> List[str]:
    """Option names of a config group (``clip`` or ``vfm``): the yaml files in ``conf/<group>/``
    (``vfm=none`` left out: the methods without a VFM are chosen with the method dropdown)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem != "none")


def sample_images() -> Dict[str, Path]:
    """Bundled sample images (``proxyclip/assets``), by file name."""
    return {p.name: p for p in sorted(ASSETS.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def pixel_to_data(fig, px: float, py: float) -> Optional[Tuple[float, float]]:
    """A point of a rendered figure's PNG (``px`` right, ``py`` down from the top-left corner)
    -> ``(x, y)`` data coordinates of the image panel under it, or None if it hits no image panel."""
    display = (px, fig.bbox.height - py)  # matplotlib's display coordinates grow upwards
    for ax in fig.axes:
        if ax.images and ax.get_label() != "<colorbar>" and ax.bbox.contains(*display):
            x, y = ax.transData.inverted().transform(display)
            return float(x), float(y)
    return None


def _image_id(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()[:16] + f"-{tuple(img.shape)}"


@dataclass
class AttentionView:
    """What the attention panel shows for the chosen pixel."""

    window: int  # window index
    window_image: torch.Tensor  # (3, h, w) pixels of that window (resized image)
    proxy_row: Optional[torch.Tensor]  # (N,) the method's attention of the chosen token (heads averaged)
    proxy_grid: Optional[Tuple[int, int]]  # its grid (the VFM's for proxyclip, else CLIP's)
    proxy_patch: Optional[Tuple[int, int]]  # (row, col) on that grid
    clip_row: Optional[torch.Tensor]  # (T,) CLIP's own last-block attention of the chosen CLIP token
    clip_grid: Tuple[int, int]
    clip_patch: Tuple[int, int]
    affinity_row: Optional[torch.Tensor] = None
    normalized_row: Optional[torch.Tensor] = None
    mask_row: Optional[torch.Tensor] = None


class ExplorerController:
    """State and computation of the explorer; no widgets. Tests drive it directly or through :class:`Explorer`.

    Counters ``n_encodes``, ``n_decodes``, ``n_builds`` say what was computed.
    ``segmenter_factory(clip, vfm) -> Segmenter`` builds a pipeline (default: compose
    ``conf/`` with ``clip=..., vfm=..., weights=...`` plus ``overrides``).
    ``progress(message, fraction)`` is told about slow steps (model build, encode).
    """

    def __init__(self, clip: str = "vit_b16", vfm: str = "dino_vitb8", weights: str = "random",
                 overrides: Sequence[str] = (), image: Any = None, classes: Sequence[str] = DEFAULT_CLASSES,
                 segmenter_factory: Optional[Callable[[str, str], Segmenter]] = None,
                 progress: Optional[Callable[[str, float], None]] = None, max_segmenters: int = 2,
                 max_encoded: int = 8, compute: bool = True, segmenter: Optional[Segmenter] = None):
        self.weights = weights
        self.overrides = list(overrides)
        self._factory = segmenter_factory or self._default_factory
        self.progress = progress or (lambda message, fraction: None)
        self.max_segmenters, self.max_encoded = max_segmenters, max_encoded
        self._segmenters: "OrderedDict[Tuple[str, str], Segmenter]" = OrderedDict()
        self._encoded: "OrderedDict[Tuple[str, str], Tuple[Encoded, Optional[torch.Tensor]]]" = OrderedDict()
        self.n_encodes = self.n_decodes = self.n_builds = 0
        self.clip_name, self.vfm_name = clip, vfm
        if segmenter is not None:  # an already built pipeline for (clip, vfm): not built twice
            self._segmenters[(clip, vfm)] = segmenter
        self.classes: List[str] = list(classes)
        self.image: torch.Tensor = load_image(image if image is not None else ASSETS / "sample.jpg")
        self.image_name = str(image) if isinstance(image, (str, Path)) else ("sample.jpg" if image is None else "image")
        self.params: Dict[str, float] = {}
        self.method: Optional[str] = None  # None until a segmenter is there: then its configured method
        self.pamr = False  # refine the scores with PAMR (conf/postprocess/pamr.yaml) before the decision
        self.point: Tuple[float, float] = (self.image.shape[1] / 2, self.image.shape[2] / 2)  # (y, x) original pixels
        self.encoded: Optional[Encoded] = None
        self.clip_attention: Optional[torch.Tensor] = None  # (n_win, T, T)
        self.prediction: Optional[Prediction] = None
        self.cache: Dict[str, torch.Tensor] = {}
        self.last_decode_seconds = self.last_encode_seconds = float("nan")
        self.record_stages = False  # also keep S, S' and the mask (3 more N x N tensors a window)
        self._stale_encode = self._stale_decode = True
        if compute:
            self.refresh()

    # ------------------------------------------------------------------ building blocks
    def _default_factory(self, clip: str, vfm: str) -> Segmenter:
        for (c, _), seg in reversed(self._segmenters.items()):  # same CLIP: build only the VFM, share the rest
            if c == clip and seg.vfm is not None:
                return seg.with_vfm(vfm)
        cfg = compose_config(overrides=[f"clip={clip}", f"vfm={vfm}", f"weights={self.weights}", *self.overrides])
        return Segmenter.from_config(cfg)

    @property
    def segmenter(self) -> Segmenter:
        key = (self.clip_name, self.vfm_name)
        if key not in self._segmenters:
            self.progress(f"building {self.clip_name} + {self.vfm_name} ({self.weights} weights)", 0.0)
            self._segmenters[key] = self._factory(*key)
            self.n_builds += 1
            while len(self._segmenters) > self.max_segmenters:
                self._segmenters.popitem(last=False)
        self._segmenters.move_to_end(key)
        seg = self._segmenters[key]
        if self.method is None:
            self.method = seg.method
        if not self.params:
            p = seg.resolve_params("proxyclip") if seg.vfm is not None else seg.resolve_params()
            self.params = {k: float(p[k]) for k in ("beta", "gamma", "logit_scale", "prob_thd") if k in p}
        return seg

    def decode_params(self) -> Dict[str, Any]:
        """The keyword arguments of the next decode: the method, PAMR, and the sliders it has."""
        seg = self.segmenter
        knobs = seg.resolve_params(self.method)
        params = {k: v for k, v in self.params.items() if k in knobs}
        return dict(method=self.method, postprocess="pamr" if self.pamr else "none", **params)

    @property
    def logit_temperature(self) -> float:
        """1 / logit_scale (the explorer's slider)."""
        return 1.0 / self.params["logit_scale"]

    # ------------------------------------------------------------------ inputs
    def set_image(self, image: Any, name: Optional[str] = None) -> None:
        """A path, PIL image, (3, H, W) tensor or encoded image bytes. Re-encodes on refresh."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            from PIL import Image

            image = Image.open(io.BytesIO(bytes(image)))
        self.image = load_image(image)
        self.image_name = name or (str(image) if isinstance(image, (str, Path)) else "image")
        self.point = (self.image.shape[1] / 2, self.image.shape[2] / 2)
        self._stale_encode = True

    def set_backbones(self, clip: Optional[str] = None, vfm: Optional[str] = None) -> None:
        if clip is not None:
            self.clip_name = clip
        if vfm is not None:
            self.vfm_name = vfm
        self._stale_encode = True

    def set_classes(self, classes: Sequence[str] | str) -> None:
        """A list of class lines, or text with one class per line (or comma-separated)."""
        if isinstance(classes, str):
            sep = "\n" if "\n" in classes else ","
            classes = [c.strip() for c in classes.split(sep) if c.strip()]
        parse_classes(list(classes))  # a bad list raises here and leaves the state as it was
        self.classes = list(classes)
        self._stale_decode = True

    def set_params(self, beta: Optional[float] = None, gamma: Optional[float] = None,
                   logit_scale: Optional[float] = None, logit_temperature: Optional[float] = None,
                   prob_thd: Optional[float] = None) -> None:
        if logit_temperature is not None:
            logit_scale = 1.0 / float(logit_temperature)
        new = dict(beta=beta, gamma=gamma, logit_scale=logit_scale, prob_thd=prob_thd)
        for k, v in new.items():
            if v is not None and float(v) != self.params.get(k):
                self.params[k] = float(v)
                self._stale_decode = True

    def set_method(self, name: str) -> None:
        """Another last-block method (``proxyclip.methods``): a decode on the same Encoded."""
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        seg = self.segmenter
        if METHODS[name].needs_vfm and seg.vfm is None:
            raise ValueError(f"method {name} needs a VFM; this pipeline has none")
        if name != self.method:
            self.method = name
            self._stale_decode = True

    def set_pamr(self, on: bool) -> None:
        """PAMR on the merged scores (a decode; no encode)."""
        if bool(on) != self.pamr:
            self.pamr = bool(on)
            self._stale_decode = True

    def set_record_stages(self, on: bool) -> None:
        """Keep the affinity stages (S, S', mask) of the next decodes; turning it on decodes once more
        if they are missing. Off by default: for SAM (64x64 tokens) each is 67 MB a window."""
        self.record_stages = bool(on)
        if on and self.encoded is not None and self.encoded.vfm_features is not None \
                and "proxy.affinity" not in self.cache:
            self._stale_decode = True

    def set_point(self, y: float, x: float) -> None:
        """The chosen pixel (original image coordinates) whose attention is shown. No computation."""
        h, w = self.image.shape[1:]
        self.point = (min(max(float(y), 0.0), h - 1.0), min(max(float(x), 0.0), w - 1.0))

    # ------------------------------------------------------------------ computation
    def refresh(self) -> bool:
        """Run what the changes since the last refresh need. Returns True if anything ran."""
        ran = False
        if self._stale_encode or self.encoded is None:
            self._encode()
            ran = True
        if self._stale_decode:
            self._decode()
            ran = True
        return ran

    def _encode(self) -> None:
        seg = self.segmenter
        image_id = _image_id(self.image)
        key = (seg.key, image_id)
        if key in self._encoded:
            self.encoded, self.clip_attention = self._encoded[key]
            self._encoded.move_to_end(key)
        else:
            from .viz import clip_last_block_attention

            # an earlier encode of this image with the same CLIP: only the VFM runs
            reuse, reused_attn = next(((e, a) for (_, i), (e, a) in reversed(self._encoded.items())
                                       if i == image_id and e.clip_key == seg.clip_key), (None, None))
            n_win = len(_window_boxes(seg, self.image))
            what = f"{self.vfm_name} (CLIP reused)" if reuse is not None else f"{self.clip_name} + {self.vfm_name}"
            self.progress(f"encoding {n_win} window(s) with {what}", 0.1)
            t0 = time.perf_counter()
            enc = seg.encode(self.image, reuse=reuse)
            self.last_encode_seconds = time.perf_counter() - t0
            self.n_encodes += 1
            if reuse is not None and enc.clip_tokens is reuse.clip_tokens:
                clip_attn = reused_attn  # CLIP's part is the same: so is its own attention
            else:
                self.progress("CLIP's own attention", 0.9)
                with torch.no_grad():
                    clip_attn = clip_last_block_attention(seg.clip.last_block, enc.clip_tokens).float().cpu()
            self.encoded, self.clip_attention = enc, clip_attn
            self._encoded[key] = (enc, self.clip_attention)
            while len(self._encoded) > self.max_encoded:
                self._encoded.popitem(last=False)
        self._stale_encode = False
        self._stale_decode = True
        self.progress("encoded", 1.0)

    def _decode(self) -> None:
        seg = self.segmenter
        stages = STAGE_NAMES if self.record_stages and self.method == "proxyclip" else ()
        t0 = time.perf_counter()
        pred, cache = seg.run_with_cache(self.encoded, self.classes, names=("attention.pattern",) + stages,
                                         **self.decode_params())
        self.last_decode_seconds = time.perf_counter() - t0
        self.prediction, self.cache = pred, cache
        self.n_decodes += 1
        self._stale_decode = False

    # ------------------------------------------------------------------ what is shown
    def attention_view(self) -> AttentionView:
        """The attention rows of the chosen pixel (from caches: no computation)."""
        from .viz import locate_patch, pattern_row, window_pixels

        enc = self.encoded
        y, x = self.point
        seg = self.segmenter
        clip_grid = enc.clip_grid
        win, crow, ccol = locate_patch(y, x, enc.image_size, enc.resized_size, enc.windows, clip_grid, pad=enc.pad)
        view = AttentionView(window=win, window_image=window_pixels(enc.image, enc.resized_size, enc.windows[win]),
                             proxy_row=None, proxy_grid=None, proxy_patch=None,
                             clip_row=None, clip_grid=clip_grid, clip_patch=(crow, ccol))
        if self.clip_attention is not None:
            view.clip_row = self.clip_attention[win, crow * clip_grid[1] + ccol]
        if "attention.pattern" in self.cache:
            resizes = seg.vfm is not None and seg.vfm.resizes_input
            row, grid, patch, _ = pattern_row(self.cache["attention.pattern"], enc, y, x, vfm_resizes_input=resizes)
            view.proxy_row, view.proxy_grid, view.proxy_patch = row, grid, patch
            if "proxy.affinity" in self.cache:
                k = patch[0] * grid[1] + patch[1]
                view.affinity_row = self.cache["proxy.affinity"][win, k]
                view.normalized_row = self.cache["proxy.affinity_normalized"][win, k]
                view.mask_row = self.cache["proxy.mask"][win, k]
        return view

    def segmentation_figure(self):
        from .viz import plot_segmentation

        pred = self.prediction
        p = pred.params
        knobs = f"beta={p['beta']:.2f} gamma={p['gamma']:.2f} " if "beta" in p else ""
        backbones = f"{self.clip_name} + {self.vfm_name}" if "beta" in p else self.clip_name
        title = (f"{p['method']}{' + PAMR' if self.pamr else ''}: {backbones}   {knobs}"
                 f"T={1 / p['logit_scale']:.3f} thd={p['prob_thd']:.2f}")
        fig = plot_segmentation(pred.image, pred.labels, pred.class_names, title=title, panel_size=3.2)
        y, x = self.point
        for ax in fig.axes[:2]:
            ax.plot([x], [y], marker="+", color="red", markersize=12, markeredgewidth=2)
        return fig

    def attention_figure(self, show_affinity: bool = False):
        from .viz import plot_affinity_stages, plot_attention_grid

        v = self.attention_view()
        if show_affinity and v.affinity_row is not None:
            return plot_affinity_stages(v.window_image, v.affinity_row, v.normalized_row, v.mask_row, v.proxy_grid,
                                        v.proxy_patch, attention_row=v.proxy_row, panel_size=2.6)
        maps = []
        if v.proxy_row is not None:
            name = f"proxy attention ({self.vfm_name})" if self.method == "proxyclip" else f"{self.method} attention"
            maps.append((name, v.proxy_row, v.proxy_grid, v.proxy_patch))
        if v.clip_row is not None:
            maps.append((f"CLIP's own attention ({self.clip_name})", v.clip_row, v.clip_grid, v.clip_patch))
        return plot_attention_grid(v.window_image, maps, ncols=2, panel_size=3.0)


def _window_boxes(seg: Segmenter, image: torch.Tensor):
    from .windows import resized_size, slide_windows

    m = seg.cfg.method
    size = resized_size(image.shape[1], image.shape[2], m.short_side, m.max_long_side)
    return slide_windows(size[0], size[1], m.crop, m.stride)


class Explorer:
    """The ipywidgets view of an :class:`ExplorerController`. ``Explorer(...).widget`` is the box to display.

    Keyword arguments go to the controller (``clip``, ``vfm``, ``weights``, ``overrides``,
    ``image``, ``classes``, ``segmenter`` (reuse a built pipeline), ``segmenter_factory``). ``clip_options`` / ``vfm_options``
    restrict the dropdowns (default: every file in ``conf/clip`` and ``conf/vfm``).
    """

    def __init__(self, clip_options: Optional[Sequence[str]] = None, vfm_options: Optional[Sequence[str]] = None,
                 dpi: float = 72, **controller_kwargs):
        self.dpi = dpi
        self._busy = False
        self.n_renders = 0
        self.last_update_seconds = float("nan")
        self._seg_figure = None
        self._build_status()
        controller_kwargs.setdefault("progress", self._on_progress)
        self.controller = ExplorerController(compute=False, **controller_kwargs)
        self._build_controls(clip_options, vfm_options)
        self._enable_click_events()
        self.widget = self._layout()
        self._full_update()  # first encode + decode (shows progress)
        self._wire_callbacks()

    # ------------------------------------------------------------------ construction
    def _build_status(self) -> None:
        import ipywidgets as W

        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="idle",
                                        layout=W.Layout(width="420px"), style={"description_width": "initial"})
        self.status = W.HTML(value="")

    def _build_controls(self, clip_options: Optional[Sequence[str]], vfm_options: Optional[Sequence[str]]) -> None:
        """Every input widget (image, backbones, classes, sliders) and the two figure images."""
        import ipywidgets as W

        c = self.controller
        clip_options = list(clip_options or available_backbones("clip"))
        vfm_options = list(vfm_options or available_backbones("vfm"))
        for opts, cur in ((clip_options, c.clip_name), (vfm_options, c.vfm_name)):
            if cur not in opts:
                opts.insert(0, cur)
        label = {"description_width": "110px"}
        wide = dict(style=label, layout=W.Layout(width="420px"))
        slider = dict(continuous_update=False, readout_format=".2f", **wide)
        self.samples = sample_images()
        self.image_picker = W.Dropdown(options=list(self.samples), description="sample image", style=label)
        self.path = W.Text(placeholder="/path/to/image.jpg", description="or a path", style=label)
        self.load_path = W.Button(description="load", layout=W.Layout(width="70px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.classes = W.Textarea(value="\n".join(c.classes), description="classes (one a line; synonyms with ';')",
                                  layout=W.Layout(width="420px", height="110px"), continuous_update=False,
                                  style={"description_width": "initial"})
        self.clip = W.Dropdown(options=clip_options, value=c.clip_name, description="CLIP", style=label)
        self.vfm = W.Dropdown(options=vfm_options, value=c.vfm_name, description="VFM", style=label)
        self.method = W.Dropdown(options=list(METHODS), value=None, description="method", style=label)
        self.pamr = W.Checkbox(value=False, description="PAMR (refine the scores)")
        self.gamma = W.FloatSlider(min=0.5, max=10.0, step=0.1, description="gamma (scale)", **slider)
        self.beta = W.FloatSlider(min=0.0, max=2.5, step=0.05, description="beta (shift)", **slider)
        self.temperature = W.FloatSlider(min=0.005, max=0.2, step=0.005, description="logit temp. 1/s",
                                         **{**slider, "readout_format": ".3f"})
        self.prob_thd = W.FloatSlider(min=0.0, max=1.0, step=0.01, description="prob_thd", **slider)
        self.patch_x = W.IntSlider(min=0, max=1, description="patch x", continuous_update=False, **wide)
        self.patch_y = W.IntSlider(min=0, max=1, description="patch y", continuous_update=False, **wide)
        self.show_affinity = W.Checkbox(value=False, description="affinity stages (S, S', mask)")
        self.hint = W.HTML("<small>the patch sliders choose the pixel whose attention is shown</small>")
        self.seg_image = W.Image(format="png")
        self.attn_image = W.Image(format="png")

    def _enable_click_events(self) -> None:
        """Optional: click on the segmentation to choose the patch (pip install ipyevents)."""
        self.click_events = None
        try:
            from ipyevents import Event
        except ImportError:
            return
        self.click_events = Event(source=self.seg_image, watched_events=["click"])
        self.click_events.on_dom_event(self._on_click)
        self.hint.value = "<small>click the segmentation (or use the patch sliders) to choose the patch</small>"

    def _layout(self):
        """Controls on the left, the segmentation and attention figures on the right."""
        import ipywidgets as W

        controls = W.VBox([
            W.HTML("<b>ProxyCLIP explorer</b>"),
            self.image_picker, W.HBox([self.path, self.load_path]), self.upload,
            self.clip, self.vfm, W.HBox([self.method, self.pamr]), self.classes,
            self.gamma, self.beta, self.temperature, self.prob_thd,
            self.patch_x, self.patch_y, self.hint, self.show_affinity, self.progress, self.status,
        ], layout=W.Layout(min_width="440px"))
        widget = W.HBox([controls, W.VBox([self.seg_image, self.attn_image])])
        widget.add_class("proxyclip-explorer")
        return widget

    def _wire_callbacks(self) -> None:
        for w in (self.gamma, self.beta, self.temperature, self.prob_thd):
            w.observe(self._on_params, names="value")
        for w in (self.patch_x, self.patch_y):
            w.observe(self._on_patch, names="value")
        self.show_affinity.observe(self._on_view, names="value")
        self.method.observe(self._on_method, names="value")
        self.pamr.observe(self._on_method, names="value")
        self.classes.observe(self._on_classes, names="value")
        self.clip.observe(self._on_backbone, names="value")
        self.vfm.observe(self._on_backbone, names="value")
        self.image_picker.observe(self._on_sample, names="value")
        self.load_path.on_click(self._on_path)
        self.upload.observe(self._on_upload, names="value")

    def _ipython_display_(self):  # display(explorer) shows the widget
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------------ sync
    def _on_progress(self, message: str, fraction: float) -> None:
        self.progress.description = message
        self.progress.value = fraction
        self.progress.bar_style = "success" if fraction >= 1.0 else "info"

    def _sync_from_controller(self) -> None:
        """Slider values and ranges from the controller (after a new segmenter or image)."""
        c = self.controller
        self._busy = True
        try:
            self.method.value = c.method
            self.pamr.value = c.pamr
            if "gamma" in c.params:
                self.gamma.value = c.params["gamma"]
                self.beta.value = c.params["beta"]
            self.temperature.value = min(max(c.logit_temperature, self.temperature.min), self.temperature.max)
            self.prob_thd.value = c.params["prob_thd"]
            h, w = c.image.shape[1:]
            self.patch_y.max, self.patch_x.max = h - 1, w - 1
            self.patch_y.value, self.patch_x.value = int(c.point[0]), int(c.point[1])
        finally:
            self._busy = False

    def _set_enabled(self, enabled: bool) -> None:
        for w in (self.clip, self.vfm, self.method, self.pamr, self.image_picker, self.load_path, self.upload,
                  self.classes, self.temperature, self.prob_thd):
            w.disabled = not enabled
        proxy = self.controller.method == "proxyclip"  # beta, gamma and the affinity stages are ProxyCLIP's
        for w in (self.gamma, self.beta, self.show_affinity):
            w.disabled = not (enabled and proxy)

    def _full_update(self) -> None:
        self._set_enabled(False)
        try:
            self.controller.refresh()
            self._sync_from_controller()
            self._render()
        except Exception as e:  # shown in the explorer, not lost in a log
            self.status.value = f"<span style='color:#b00'>error: {type(e).__name__}: {e}</span>"
            raise
        finally:
            self._set_enabled(True)

    def _render(self, segmentation: bool = True, attention: bool = True) -> None:
        t0 = time.perf_counter()
        c = self.controller
        if segmentation:
            self._seg_figure = c.segmentation_figure()
            self.seg_image.value = figure_to_png(self._seg_figure, dpi=self.dpi)
        if attention:
            self.attn_image.value = figure_to_png(c.attention_figure(self.show_affinity.value), dpi=self.dpi)
        self.n_renders += 1
        dec = c.last_decode_seconds * 1000
        self.status.value = (f"{c.image_name} {tuple(c.image.shape[1:])} | {len(c.encoded.windows)} window(s) | "
                             f"encode {c.last_encode_seconds:.2f} s, decode {dec:.0f} ms | "
                             f"encodes {c.n_encodes}, decodes {c.n_decodes}")
        self.last_update_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ events
    def _on_params(self, change=None) -> None:
        if self._busy:
            return
        t0 = time.perf_counter()
        c = self.controller
        before = (c.params.get("beta"), c.params.get("gamma"))
        c.set_params(gamma=self.gamma.value, beta=self.beta.value, logit_temperature=self.temperature.value,
                     prob_thd=self.prob_thd.value)
        try:
            c.refresh()
        except ValueError as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return
        # the attention maps depend on beta and gamma only: the temperature and threshold redraw the labels
        self._render(attention=(c.params.get("beta"), c.params.get("gamma")) != before)
        self.last_update_seconds = time.perf_counter() - t0

    def _on_method(self, change=None) -> None:
        """The method dropdown or the PAMR toggle: one decode on the cached Encoded."""
        if self._busy:
            return
        c = self.controller
        try:
            c.set_method(self.method.value)
            c.set_pamr(self.pamr.value)
            c.refresh()
        except ValueError as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return
        self._set_enabled(True)
        self._render()

    def _on_patch(self, change=None) -> None:
        if self._busy:
            return
        t0 = time.perf_counter()
        self.controller.set_point(self.patch_y.value, self.patch_x.value)
        self._render()
        self.last_update_seconds = time.perf_counter() - t0

    def _on_view(self, change=None) -> None:
        """The affinity-stages checkbox: record the stages (one decode if missing), redraw the attention panel."""
        if self._busy:
            return
        self.controller.set_record_stages(self.show_affinity.value)
        self.controller.refresh()
        self._render(segmentation=False)

    def _on_click(self, event: Dict[str, Any]) -> None:
        """A click on the segmentation figure (ipyevents): choose that pixel (either panel)."""
        if self._busy or self._seg_figure is None or event.get("type") != "click":
            return
        if "dataX" in event:  # ipyevents: position in the image's own pixels
            px, py = event["dataX"], event["dataY"]
        else:
            scale = self._seg_figure.bbox.width / max(event["boundingRectWidth"], 1)
            px, py = event["relativeX"] * scale, event["relativeY"] * scale
        hit = pixel_to_data(self._seg_figure, px, py)
        if hit is None:
            return
        x, y = hit
        self._busy = True
        try:
            self.patch_x.value = int(min(max(round(x), 0), self.patch_x.max))
            self.patch_y.value = int(min(max(round(y), 0), self.patch_y.max))
        finally:
            self._busy = False
        self._on_patch()

    def _on_classes(self, change=None) -> None:
        if self._busy:
            return
        try:
            self.controller.set_classes(self.classes.value)
            self.controller.refresh()
        except (ValueError, TypeError) as e:
            self.status.value = f"<span style='color:#b00'>classes: {e}</span>"
            return
        self._render()

    def _on_backbone(self, change=None) -> None:
        if self._busy:
            return
        c = self.controller
        previous = (c.clip_name, c.vfm_name)
        c.set_backbones(clip=self.clip.value, vfm=self.vfm.value)
        try:
            self._full_update()
        except Exception as e:  # e.g. weights that cannot be loaded: say so, go back to what worked
            c.set_backbones(*previous)
            self._busy = True
            try:
                self.clip.value, self.vfm.value = previous
            finally:
                self._busy = False
            c.refresh()  # the previous pipeline and encode are cached: a decode at most
            self._render()
            wanted = change.new if change is not None else "the new backbones"
            self.status.value = f"<span style='color:#b00'>could not switch to {wanted}: {type(e).__name__}: {e}</span>"
            self.progress.description, self.progress.bar_style = "failed", "danger"

    def _on_sample(self, change=None) -> None:
        if self._busy or self.image_picker.value is None:
            return
        self.controller.set_image(self.samples[self.image_picker.value], name=self.image_picker.value)
        self._full_update()

    def _on_path(self, button=None) -> None:
        try:
            self.controller.set_image(self.path.value.strip())
        except (OSError, ValueError) as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return
        self._full_update()

    def _on_upload(self, change=None) -> None:
        files = self.upload.value
        if not files:
            return
        f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        try:
            self.controller.set_image(f["content"], name=f.get("name", "upload"))
        except (OSError, ValueError) as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return
        self._full_update()
