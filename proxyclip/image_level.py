"""Image-level methods: one function sees every window of an image at once.

A window-level method (``Method.level == "window"``, every method of proxyclip/methods.py) decides
each batch of windows on its own; the pipeline then merges the windows' scores (sum / count) and
resizes them to the image. Some methods cannot be cut that way: LPOSS propagates labels over a
graph of the patches of *all* windows, CorrCLIP reads class-agnostic mask proposals of the whole
image. Such a method is registered with ``level="image"``; its function is

    fn(x: ImageInputs, **knobs) -> ImageScores

``x`` gives every window's inputs (``x.block_inputs(start, stop)``: the same
:class:`~proxyclip.last_block.BlockInputs` a window-level method gets, ``x.batches()``), the windows'
boxes in the resized image and their padding, the resized and the original image, the decode's
text embeddings, its switches (``x.switches``: residual, ffn), the per-image parts of the encode (``x.masks``: the mask proposals' label map, see
proxyclip/masks) and ``x.window_method(name, start, stop, **knobs)``: a window-level method's dense
embeddings (or scores) of some windows, e.g. MaskCLIP's, with their hook points firing as usual.
It returns the merged (Q, H, W) score maps at the original size, or at the resized size
(``ImageScores(scores, size="resized")``: the pipeline resizes them bilinearly, as it does for
window-level methods). From there the decode is the same for both levels: hook ``scores.image``, the
post-process, hook ``scores.refined``, the class decision of every point (logit_scale, prob_thd).

A method may also return a label-level step, ``ImageScores(..., relabel=fn)``: ``fn(labels) -> labels``
on the (H, W) labels of each decision, after ``prob_thd`` (CorrCLIP's map correction: each mask
proposal takes its majority class). It is a step of its own, not folded into the scores, because the
points of a sweep that differ only in ``logit_scale`` / ``prob_thd`` share one run of the method,
and the step must see each point's labels. ``Prediction.probs`` / ``best_prob`` stay the decision's
(before the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .last_block import BlockInputs, Scores
from .windows import Box

LEVELS = ("window", "image")
SIZES = ("original", "resized")


@dataclass
class ImageScores:
    """An image-level method's result: (Q, H, W) merged cosine-scale scores, one map per query,
    at the original image size (``size="original"``) or at the resized image's (``"resized"``)."""

    scores: torch.Tensor
    size: str = "original"
    # a label-level step after each decision: (H, W) int64 labels -> (H, W) int64 labels; None = none
    relabel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class ImageInputs:
    """What an image-level method reads, for one image (built by the pipeline for each decode)."""

    def __init__(self, *, windows: List[Box], pad: Tuple[int, int, int, int], resized_size: Tuple[int, int],
                 image: torch.Tensor, text: torch.Tensor, masks: Optional[torch.Tensor], batch_size: int,
                 block_inputs: Callable[[int, int], BlockInputs], resized: Callable[[], torch.Tensor],
                 window_method: Callable[..., Any], vfm_features: Optional[torch.Tensor],
                 point: Callable[[str, torch.Tensor], torch.Tensor], memo: Dict[Any, Any],
                 switches: Optional[Dict[str, bool]] = None, query_to_class: Optional[List[int]] = None,
                 embed: Optional[Callable[[List[str]], torch.Tensor]] = None,
                 vfm_image: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 vfm_patch_size: Optional[int] = None, sam: Optional[Dict[str, torch.Tensor]] = None):
        self.windows = list(windows)  # (y1, y2, x1, x2) in the resized image, row-major
        self.pad = pad  # (top, bottom, left, right) of every window
        self.resized_size = resized_size  # (h, w) of the resized image (the network's input)
        self.image = image  # (3, H, W) the original image in [0, 1]
        self.text = text  # (Q, E) L2-normalized query embeddings
        self.masks = masks  # (H, W) int64 label map of the mask proposals (0 = unsegmented), or None
        self.batch_size = int(batch_size)
        self.vfm_features = vfm_features  # (n_windows, C, Hv, Wv) of every window, or None
        self.point = point  # image-level hook point: point(name, tensor) -> tensor
        self.switches = dict(switches or {})  # the decode's residual / ffn (for the window methods it calls)
        self.sam = sam  # the encode's SAM part (Trident; proxyclip/sam_attention.py), or None
        self._block_inputs, self._resized, self._window_method, self._memo = block_inputs, resized, window_method, memo
        self.query_to_class = None if query_to_class is None else list(query_to_class)  # class index of each query
        self.embed = embed  # embed(names) -> (n, E) normalized text embeddings of other names (e.g. a background word)
        # vfm_image(image (3, h, w) in [0, 1]) -> (C, Hv, Wv) the VFM's features of any image (None without a VFM)
        self.vfm_image = vfm_image
        self.vfm_patch_size = vfm_patch_size

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def block_inputs(self, start: int, stop: int) -> BlockInputs:
        """The window-level inputs of windows ``start:stop`` (CLIP tokens, layer parts, VFM features)."""
        return self._block_inputs(start, stop)

    def batches(self) -> Iterator[Tuple[int, int, BlockInputs]]:
        """(start, stop, inputs) for every batch of ``batch_size`` windows, in window order."""
        for start in range(0, self.num_windows, self.batch_size):
            stop = min(start + self.batch_size, self.num_windows)
            yield start, stop, self._block_inputs(start, stop)

    def resized_image(self) -> torch.Tensor:
        """(3, h, w) the resized image in [0, 1] (what the windows are cut from)."""
        return self._resized()

    def window_method(self, name: str, start: int, stop: int, **knobs: Any) -> torch.Tensor:
        """A window-level method's (B, E, h, w) dense embeddings of windows ``start:stop`` (or its
        (B, Q, h, w) scores when it makes its own), with ``knobs`` (residual, ffn and its own; the
        unset ones take that method's YAML defaults)."""
        return self._window_method(name, start, stop, knobs)

    def memoized(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per Encoded (for what does not depend on the knobs)."""
        key = ("image", name)
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def check_result(name: str, out: Any, num_queries: int, image_size: Tuple[int, int],
                 resized_size: Tuple[int, int]) -> ImageScores:
    """An image-level method's result, checked (type, query count, size)."""
    if not isinstance(out, ImageScores):
        raise TypeError(f"image-level method {name} must return ImageScores, got {type(out).__name__}")
    if out.size not in SIZES:
        raise ValueError(f"image-level method {name}: ImageScores.size must be one of {SIZES}, got {out.size!r}")
    want = image_size if out.size == "original" else resized_size
    s = out.scores
    if s.dim() != 3 or s.shape[0] != num_queries or tuple(s.shape[1:]) != tuple(want):
        raise ValueError(f"image-level method {name} returned scores of shape {tuple(s.shape)}; expected "
                         f"({num_queries}, {want[0]}, {want[1]}) (Q queries at the {out.size} size)")
    return out


def _vfm_image(seg: Any, image: torch.Tensor) -> torch.Tensor:
    """(C, Hv, Wv) the Segmenter's VFM features of one (3, h, w) image in [0, 1] (its mean / std)."""
    mean, std = seg._vfm_norm
    return seg.vfm.features((image.to(seg.device)[None] - mean) / std)[0]


def window_scores_of(out: Any, text: torch.Tensor) -> torch.Tensor:
    """(B, Q, h, w) scores from a window-level method's output (dense embeddings or Scores)."""
    if isinstance(out, Scores):
        return out.scores
    return torch.einsum("behw,qe->bqhw", out, text.to(out.dtype))


def image_level_result(seg: Any, enc: Any, spec: Any, text: torch.Tensor, method_output: Callable[..., Any],
                       window_pixels: Callable[..., torch.Tensor], query_to_class: Optional[List[int]] = None
                       ) -> Tuple[torch.Tensor, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """(Q, H, W) merged scores of ``spec``'s image-level method at the original size (on the CPU), and the
    method's label-level step (``ImageScores.relabel``, or None). ``method_output`` / ``window_pixels``: the
    pipeline's per-window method run and window pixels."""
    from .decision import _upsample
    from .methods import get_method
    from .windows import resize_image

    meth, knobs = get_method(spec.method), spec.knob_values

    def block_inputs(start: int, stop: int) -> BlockInputs:
        feats = None if enc.vfm_features is None else enc.vfm_features[start:stop].to(seg.device)
        return BlockInputs(seg.clip, enc.clip_tokens[start:stop].to(seg.device), enc.clip_grid, feats, enc.memo,
                           (start, stop), lambda name, t: seg.hooks.point(name, t, start),
                           layers={k: v[start:stop].to(seg.device) for k, v in enc.layers.items()}, text=text,
                           pixels=lambda: window_pixels(seg, enc, start, stop),
                           switches={k: knobs[k] for k in ("residual", "ffn") if k in knobs},
                           vfm_heads=None if seg.vfm is None else seg.vfm.heads)

    def window_method(name: str, start: int, stop: int, params: Dict[str, Any]) -> torch.Tensor:
        return method_output(seg, enc, start, stop, seg.decode_spec(name, "none", **params), text)

    x = ImageInputs(windows=enc.windows, pad=enc.pad, resized_size=enc.resized_size, image=enc.image, text=text,
                    masks=enc.masks, batch_size=int(seg.cfg.batch_size), block_inputs=block_inputs,
                    resized=lambda: resize_image(enc.image.to(seg.device), enc.resized_size),
                    window_method=window_method,
                    vfm_features=None if enc.vfm_features is None else enc.vfm_features.to(seg.device),
                    point=seg.hooks.point, memo=enc.memo,
                    switches={k: knobs[k] for k in ("residual", "ffn") if k in knobs}, query_to_class=query_to_class,
                    embed=lambda names: seg.text_embeddings(list(names)).to(seg.device),
                    vfm_image=None if seg.vfm is None else lambda im: _vfm_image(seg, im),
                    vfm_patch_size=None if seg.vfm is None else int(seg.vfm.patch_size), sam=enc.sam)
    out = check_result(spec.method, meth.attention(x, **{k: knobs[k] for k in meth.knob_names}),
                       int(text.shape[0]), enc.image_size, enc.resized_size)
    scores = out.scores.float()
    if out.size == "resized" and tuple(scores.shape[1:]) != tuple(enc.image_size):
        scores = _upsample(scores[None], enc.image_size)[0]
    if out.relabel is not None and not callable(out.relabel):
        raise TypeError(f"image-level method {spec.method}: ImageScores.relabel must be callable or None")
    return scores.cpu(), out.relabel
