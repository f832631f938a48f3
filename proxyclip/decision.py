"""The class decision: merged score maps -> class probabilities -> labels.

Two paths give the same labels:

- :func:`decide` (exhaustive): takes the (Q, H, W) full-resolution scores, materializes
  softmax(logit_scale * scores) over all queries and the (K, H, W) class probabilities. Memory
  ~3 x Q x H x W floats. Used when the full maps exist anyway (a post-process such as PAMR, or a
  hook / cache on ``scores.image`` / ``scores.refined``).
- :func:`decide_chunked`: takes the windows' low-resolution scores (:class:`WindowScores`) and
  never holds more than a bounded chunk of queries at full resolution. The upsampling, the cut of
  the padding, the merge (sum / count) and the resize to the image are linear, separable and act
  on each query's map alone, so a chunk of classes (all their queries) is brought to full
  resolution as ``Y @ grid_q @ X^T`` (:meth:`WindowScores.full`, the same maps the exhaustive
  path decides on, bit for bit, whatever the chunk), folded into a running per-pixel max /
  argmax over classes and a running log-sum-exp over all queries (the softmax denominator), and
  dropped. Memory: O(pixels) state plus the chunk (``budget_bytes``); time: two small matrix
  products and ~5 elementwise passes per query and pixel. Versus the per-window path of before
  (upsample each window, cut, sum on a canvas, divide, resize) the maps differ by float rounding
  only (~1e-6 of the scores' scale).

The decision rule (both paths). A class's logit at a pixel is the max over its queries of
``logit_scale * score``; the label is the class with the largest logit, the **first** (lowest class
index) among equal logits (``torch.max`` returns the first maximal index; the chunked path keeps
an earlier chunk's class on a tie, so ties across chunk boundaries go the same way). Softmax is
monotone, so this is the argmax of the class probabilities. The winner's probability is
``exp(l_win - logsumexp_q(l_q))``; when it is below ``prob_thd`` the label is 0. Float caveat: the
exhaustive path rounds inside torch's softmax, which can map two *different* logits to one
probability (only when they differ by < 2**-22 and |logit| < 4), and its probability differs from
the chunked one by ~1e-7 relative, so a pixel within ~1e-7 of ``prob_thd`` could go either way.

SCLIP's area rule (``area_thd``, a protocol setting; None = off), between the argmax and
``prob_thd``: count the pixels the first argmax gives each foreground class 1..K-1; a foreground
class whose count is at most ``area_thd`` x the number of foreground-labelled pixels gets
probability 0 everywhere (class 0 is never removed); the argmax is taken again, so its pixels go to
the next-best remaining class (background or another foreground class), and then ``prob_thd``
applies to that class's probability (the softmax is not renormalized). The chunked path needs the
counts first: it makes one more pass over the chunks, with the removed classes left out, only when
a removed class has pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .text import ClassList
from .windows import Box, merge_windows

DEFAULT_BUDGET = 256 * 2**20  # bytes of full-resolution work per chunk


def decide(scores: torch.Tensor, classes: ClassList, logit_scale: float, prob_thd: float,
           area_thd: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, H, W) scores -> (K, H, W) class probabilities and (H, W) int64 labels.

    probs = max over each class's queries of softmax(logit_scale * scores) over all queries;
    labels = argmax over classes (the first on a tie); with ``area_thd``, the area rule (module
    docstring: the removed classes' probabilities are 0 in the returned probs, argmax again);
    best probability < prob_thd -> class 0.
    """
    q_probs = torch.softmax(logit_scale * scores, dim=0)
    k = len(classes.class_names)
    if k == len(classes.queries):  # one name per class: queries are the classes, in order
        probs = q_probs
    else:
        probs = torch.stack([q_probs[g[0]] if len(g) == 1 else q_probs[g].amax(dim=0) for g in groups(classes)])
    best, labels = probs.max(dim=0)
    if area_thd is not None:
        removed, changes = small_classes(labels, k, area_thd)
        if removed.any():
            probs[removed.to(probs.device)] = 0  # a fresh tensor (softmax's output or the stack): no caller's data
            if changes:
                best, labels = probs.max(dim=0)
    if prob_thd > 0:
        labels[best < prob_thd] = 0
    return probs, labels.long()


def small_classes(labels: torch.Tensor, k: int, area_thd: float) -> Tuple[torch.Tensor, bool]:
    """The area rule's removed classes, a (K,) bool (class 0 never): foreground classes labelled on
    at most ``area_thd`` x the foreground-labelled pixels; and whether a removed one has pixels (else
    the labels do not change)."""
    area = torch.bincount(labels.reshape(-1), minlength=k)[:k].cpu()
    fg = area[1:]
    removed = torch.cat([torch.zeros(1, dtype=torch.bool), fg.double() <= float(area_thd) * float(fg.sum())])
    return removed, bool((removed & (area > 0)).any())


def groups(classes: ClassList) -> List[List[int]]:
    """The query indices of each class, in class order."""
    out: List[List[int]] = [[] for _ in classes.class_names]
    for q, owner in enumerate(classes.query_to_class):
        out[owner].append(q)
    return out


@dataclass
class WindowScores:
    """What a decode keeps: each window's cosine scores at the dense grid's low resolution, and the
    layout that brings them to the image (upsample to the padded window, cut the padding, merge the
    windows by sum / count, resize to the original image)."""

    low: torch.Tensor  # (n_windows, Q, h, w)
    windows: List[Box]  # in the resized image
    pad: Tuple[int, int, int, int]
    resized_size: Tuple[int, int]
    image_size: Tuple[int, int]

    @property
    def num_queries(self) -> int:
        return int(self.low.shape[1])

    @property
    def window_size(self) -> Tuple[int, int]:
        b = self.windows[0]
        return b[1] - b[0], b[3] - b[2]

    def window_full(self, low: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) -> (n, C, wh, ww): upsampled to the padded window, padding cut."""
        top, bottom, left, right = self.pad
        wh, ww = self.window_size
        s = _upsample(low, (wh + top + bottom, ww + left + right))
        return s[:, :, top:top + wh, left:left + ww]

    def merge(self, window_full: torch.Tensor) -> torch.Tensor:
        """(n, C, wh, ww) window scores -> (C, H, W) at the original image size."""
        merged = merge_windows(window_full, self.windows, self.resized_size)
        if tuple(merged.shape[-2:]) != tuple(self.image_size):
            merged = _upsample(merged[None], self.image_size)[0]
        return merged

    def full(self, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(C, H, W) merged full-resolution scores of queries ``rows`` (all when None).

        The window upsampling, the cut, the merge (sum / count) and the resize are all linear and
        separable along y and x, and the windows form a grid, so this is ``Y @ M_q @ X^T`` per query:
        ``M_q`` the windows' low-resolution maps laid out as the grid, ``Y`` (H, rows*h) and ``X``
        (W, cols*w) the composed bilinear / cut / 1/count / resize weights (:meth:`operators`).
        Each query is one batch entry of the same batched products, so its values do not depend on
        which queries it is computed with (chunked and exhaustive decisions see the same bits; a
        batch of one takes another kernel, so it is run as two; tests/test_decision.py checks it)."""
        low = self.low if rows is None else self.low[:, torch.as_tensor(list(rows), dtype=torch.long,
                                                                            device=self.low.device)]
        y, x, ny, nx = self.operators()
        n, c, h, w = low.shape
        grid = low.reshape(ny, nx, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, ny * h, nx * w)
        if c == 1:  # a batch of one takes another kernel (other bits): compute it as a batch of two
            grid = grid.expand(2, *grid.shape[1:])
        b = grid.shape[0]
        half = torch.bmm(grid, x.t().expand(b, *x.t().shape))  # (b, rows*h, W): the cheaper order
        return torch.bmm(y.expand(b, *y.shape), half)[:c]

    def operators(self) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """(Y, X, rows of windows, columns of windows); cached."""
        if getattr(self, "_ops", None) is None:
            h, w = self.low.shape[-2:]
            top, bottom, left, right = self.pad
            wh, ww = self.window_size
            ys = sorted({(b[0], b[1]) for b in self.windows})
            xs = sorted({(b[2], b[3]) for b in self.windows})
            if len(ys) * len(xs) != len(self.windows) or [(b[0], b[1], b[2], b[3]) for b in self.windows] != [
                    (a, b, c, d) for (a, b) in ys for (c, d) in xs]:
                raise ValueError("the windows do not form a row-major grid (windows.slide_windows)")
            yop = _axis_operator(ys, h, wh, top, bottom, self.resized_size[0], self.image_size[0])
            xop = _axis_operator(xs, w, ww, left, right, self.resized_size[1], self.image_size[1])
            self._ops = (yop.to(self.low), xop.to(self.low), len(ys), len(xs))
        return self._ops

    def bytes_per_query(self) -> int:
        """Bytes one query of a chunk holds at once (its grid, the half-product, scores and logits)."""
        h, w = self.low.shape[-2:]
        per = len(self.windows) * h * w + self.image_size[1] * h * len(self.windows)  # grid, grid @ X^T
        return 4 * (per + 3 * self.image_size[0] * self.image_size[1])


def _linear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation (align_corners=False), torch's own."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]  # (n_in, 1, n_in): one unit map per row
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].t()


def _axis_operator(spans, n_low: int, length: int, pad_a: int, pad_b: int, resized: int, image: int) -> torch.Tensor:
    """(image, len(spans) * n_low): low-res window coordinate -> image coordinate along one axis."""
    up = _linear_matrix(n_low, length + pad_a + pad_b)[pad_a:pad_a + length]  # (length, n_low), padding cut
    place = torch.zeros((resized, len(spans) * n_low), dtype=torch.float64)
    count = torch.zeros(resized, dtype=torch.float64)
    for j, (a, b) in enumerate(spans):
        place[a:b, j * n_low:(j + 1) * n_low] = up
        count[a:b] += 1
    if (count == 0).any():
        raise ValueError("windows do not cover the whole image")
    return (_linear_matrix(resized, image) @ (place / count[:, None])).float()


def _upsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) bilinear (align_corners=False), one map at a time: torch's CPU
    kernel rounds a map differently depending on how many channels travel with it (seen for small
    maps), so every path upsamples maps as (N*C, 1, h, w), which gives each map the same bits
    whatever chunk of queries it comes in."""
    n, c, h, w = x.shape
    out = F.interpolate(x.reshape(n * c, 1, h, w), size=tuple(size), mode="bilinear", align_corners=False)
    return out.view(n, c, *out.shape[-2:])


class _Running:
    """Per-pixel state of one logit scale: best class logit and index, log-sum-exp over queries."""

    def __init__(self, logit_scale: float, need_prob: bool):
        self.logit_scale, self.need_prob = logit_scale, need_prob
        self.best = self.label = self.m = self.s = None

    def add(self, scores: torch.Tensor, local_class: Optional[torch.Tensor], n_classes: int, first_class: int,
            reuse: bool = False, exclude: Optional[torch.Tensor] = None):
        """Fold one chunk in; ``reuse``: ``scores`` may be overwritten (no later reader); ``exclude``:
        a (K,) bool of classes left out of the argmax (the area rule's second pass)."""
        # the exhaustive path's operation (decide: logit_scale * scores), per query
        logits = scores.mul_(self.logit_scale) if reuse else self.logit_scale * scores
        if local_class is None:  # one query per class
            cls = logits
        else:
            idx = local_class.view(-1, 1, 1).expand_as(logits)
            cls = torch.full((n_classes, *logits.shape[1:]), -torch.inf, dtype=logits.dtype, device=logits.device)
            cls.scatter_reduce_(0, idx, logits, reduce="amax")
        if exclude is not None:
            out = exclude[first_class:first_class + n_classes].to(cls.device)
            cls = cls.masked_fill(out.view(-1, 1, 1), -torch.inf)
        cb, ci = cls.max(dim=0)  # first maximal index within the chunk
        ci += first_class
        if self.best is None:
            self.best, self.label = cb, ci
        else:
            better = cb > self.best  # strict: a tie keeps the earlier chunk's (lower) class
            self.best = torch.where(better, cb, self.best)
            self.label = torch.where(better, ci, self.label)
        if self.need_prob:  # the chunk's max over queries is its max over classes, cb
            if self.m is None:
                self.m, self.s = cb, logits.sub_(cb).exp_().sum(dim=0)
            else:
                m = torch.maximum(self.m, cb)
                self.s = self.s * torch.exp(self.m - m) + logits.sub_(m).exp_().sum(dim=0)
                self.m = m

    def prob(self, best: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The probability of ``best`` (a logit map; default: the winner's) under this state's softmax."""
        return torch.exp((self.best if best is None else best) - self.m) / self.s if self.need_prob else None


def class_chunks(classes: ClassList, chunk_queries: int) -> List[Tuple[int, int, List[int]]]:
    """Consecutive class ranges (k0, k1, their query indices) of about ``chunk_queries`` queries each."""
    out, k0, rows = [], 0, []
    for k, g in enumerate(groups(classes)):
        rows = rows + g
        if len(rows) >= chunk_queries:
            out.append((k0, k + 1, rows))
            k0, rows = k + 1, []
    if rows or k0 < len(classes.class_names):
        out.append((k0, len(classes.class_names), rows))
    return out


def decide_chunked(ws: WindowScores, classes: ClassList, decisions: Sequence[Tuple[float, ...]],
                   budget_bytes: int = DEFAULT_BUDGET, keep_prob: bool = True
                   ) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Labels (and the winner's probability) of each (logit_scale, prob_thd[, area_thd]) in
    ``decisions``, from one pass over chunks of classes (two with the area rule when it removes a
    labelled class); the rule is the module's. Points sharing a logit scale share their state; the
    full-resolution chunk is computed once for all points of a pass.

    ``keep_prob=False``: the probability is computed only for the logit scales whose points need it
    (``prob_thd > 0``) and returned as None otherwise. Memory: a few (H, W) maps per distinct logit
    scale (and area rule) plus one chunk of ``max(1, budget_bytes // ws.bytes_per_query())`` queries.
    """
    if ws.num_queries != len(classes.queries):
        raise ValueError(f"{ws.num_queries} query score maps for {len(classes.queries)} queries")
    points = [(float(d[0]), float(d[1]), None if len(d) < 3 or d[2] is None else float(d[2])) for d in decisions]
    scales = {}
    for ls, thd, _ in points:
        st = scales.setdefault(ls, _Running(ls, keep_prob))
        st.need_prob |= thd > 0
    chunks = class_chunks(classes, max(1, int(budget_bytes) // ws.bytes_per_query()))
    _fold(ws, classes, chunks, [(st, None) for st in scales.values()])
    k = len(classes.class_names)
    again = {}  # (logit scale, area_thd) -> (second-pass state, removed classes), None if nothing changes
    for ls, _, area in points:
        if area is not None and (ls, area) not in again:
            removed, changes = small_classes(scales[ls].label, k, area)
            again[(ls, area)] = (_Running(ls, False), removed) if changes else None
    pending = [v for v in again.values() if v is not None]
    if pending:
        _fold(ws, classes, chunks, pending)
    out = []
    for ls, thd, area in points:
        st = scales[ls]
        second = again.get((ls, area)) if area is not None else None
        best, labels = (st.best, st.label) if second is None else (second[0].best, second[0].label)
        prob = st.prob(best)
        labels = labels.long()
        if thd > 0:
            labels = torch.where(prob < thd, torch.zeros_like(labels), labels)
        out.append((labels, prob))
    return out


def _fold(ws: WindowScores, classes: ClassList, chunks, states) -> None:
    """One pass over the class chunks: each chunk's full-resolution maps once, folded into every
    (state, excluded classes) of ``states``."""
    singles = len(classes.class_names) == len(classes.queries)
    for k0, k1, rows in chunks:
        scores = ws.full(rows)
        local = None
        if not singles:
            local = torch.as_tensor([classes.query_to_class[q] - k0 for q in rows], device=scores.device)
        for j, (st, exclude) in enumerate(states):
            st.add(scores, local, k1 - k0, k0, reuse=j == len(states) - 1, exclude=exclude)
        del scores
