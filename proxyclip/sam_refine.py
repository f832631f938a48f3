"""``postprocess=sam_refine``: Trident's SAM prompt refinement of the labels (docs/regions.md,
"Trident", "SAM prompt refinement"). Written from the method's description, not copied.

A label-level post-process: it runs after each decision, on the (H, W) labels (after ``prob_thd``)
and the (K, H, W) class probabilities p at the original size, with the SAM image embedding of the
encode's SAM part (``trident.sam``, kept when the configured post-process is this one) and SAM's
prompt encoder and mask decoder (package ``segment-anything``):

1. Labels (nearest) and p (bilinear) at half size (H // 2, W // 2); a pixel whose best p is below
   ``coarse_thresh`` belongs to no class there.
2. Each class whose half-size p reaches ``coarse_thresh`` somewhere: the 8-connected components of
   its pixels, those under ``minimal_area`` half-size pixels dropped; per component its box and
   one point, the argmax of p inside it (the first in raster order).
3. Per class, one batched call of the decoder: per component its point (label 1) and box, both
   scaled to SAM's input frame, and one dense mask prompt, the class's half-size p resized so its
   long side is the mask input's side M = 4 x the embedding grid (256 for SAM at 1024; bilinear,
   ``int(side * M / long + 0.5)``), zero-padded to M x M, zero where <= ``coarse_thresh``, times
   ``sam_mask_coff``; one mask per prompt (no multimask). A mask whose predicted IoU is
   <= ``sam_iou_thresh`` has *failed*.
4. The mask logits bilinear to SAM's input side S, cropped to the image's part of it, bilinear to
   (H, W); a mask's support = logit > 0. Per class: refined r_c = max over its masks of
   sigmoid(logit) * p_c inside the mask's support, 0 elsewhere; label = argmax_c r_c (the first on
   a tie). Where no class has refined mass (max r = 0) the coarse label stays; inside the union of
   the failed masks' supports the coarse label stays where its probability (max_c p_c) is larger
   than the refined one.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .knobs import Knob
from .postprocess import Postprocess, register_postprocess

EXTRA = "pip install 'proxyclip[regions]'"
_DECODERS: Dict[Any, torch.nn.Module] = {}
# predict(points (B, 2), boxes (B, 4) in SAM's input frame, mask prompt (M, M)) -> (logits (B, M, M), iou (B,))
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"postprocess=sam_refine needs the package {package!r}, which is not installed: "
                          f"{EXTRA}") from None


def decoder_modules(channels: int, grid: int, input_size: int) -> torch.nn.ModuleDict:
    """SAM's prompt encoder and mask decoder for an embedding of ``channels`` x grid x grid from an
    input of side ``input_size`` (SAM's own: 256, 64, 1024; the same shape rule for a tiny test SAM):
    keys ``prompt_encoder.*`` / ``mask_decoder.*`` as in an official SAM checkpoint."""
    m = _require("segment_anything.modeling", "segment-anything")
    if channels % 8:
        raise ValueError(f"postprocess=sam_refine: SAM's embedding has {channels} channels, not a multiple of 8")
    prompt = m.PromptEncoder(embed_dim=channels, image_embedding_size=(grid, grid),
                             input_image_size=(input_size, input_size), mask_in_chans=16)
    decoder = m.MaskDecoder(num_multimask_outputs=3, transformer_dim=channels, iou_head_depth=3,
                            iou_head_hidden_dim=channels,
                            transformer=m.TwoWayTransformer(depth=2, embedding_dim=channels, mlp_dim=8 * channels,
                                                            num_heads=8))
    return torch.nn.ModuleDict({"prompt_encoder": prompt, "mask_decoder": decoder})


def decoder_checkpoint(node: Any, source: str) -> Optional[str]:
    """The SAM checkpoint file the decoder's weights come from (None: random); fails at once
    (one line) when it cannot be had."""
    from .backbones.weights import check_checkpoint_file

    if source == "local":
        return str(check_checkpoint_file(node.get("decoder_checkpoint"), "trident.decoder_checkpoint"))
    if source == "pretrained":
        from .masks.generators import _url_checkpoint

        return _url_checkpoint(str(node.get("decoder_pretrained")), "prompt encoder / mask decoder (sam_refine)",
                               "trident.decoder_checkpoint")
    return None


def build_decoder(node: Any, source: str, seed: int, channels: int, input_size: int,
                  device: torch.device) -> torch.nn.ModuleDict:
    """The prompt encoder and mask decoder (float32, shared per weights and shape): the
    ``prompt_encoder.*`` / ``mask_decoder.*`` entries of a SAM checkpoint, or seeded random."""
    from pathlib import Path

    from .backbones.weights import mismatch_error, seeded

    path = decoder_checkpoint(node, source)
    key = (source, seed, path, channels, input_size, str(device))
    if key not in _DECODERS:
        grid = input_size // 16
        if source == "random":
            model = seeded(seed, "sam_refine.decoder", lambda: decoder_modules(channels, grid, input_size))
        else:
            model = decoder_modules(channels, grid, input_size)
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise mismatch_error(Path(path), "SAM prompt encoder / mask decoder", e) from None
        _DECODERS[key] = model.to(device).eval()
    return _DECODERS[key]


def decoder_predict(decoder: torch.nn.ModuleDict, embedding: torch.Tensor) -> Predict:
    """:data:`Predict` of the SAM modules on one image embedding (C, g, g)."""
    pe, md = decoder["prompt_encoder"], decoder["mask_decoder"]
    device = next(decoder.parameters()).device
    emb = embedding.to(device=device, dtype=torch.float32)[None]

    @torch.no_grad()
    def predict(points: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = points.shape[0]
        pts = (points.float().to(device)[:, None, :], torch.ones(b, 1, device=device))
        masks = mask.float().to(device)[None, None].expand(b, 1, *mask.shape)
        sparse, dense = pe(points=pts, boxes=boxes.float().to(device), masks=masks)
        logits, iou = md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                         dense_prompt_embeddings=dense, multimask_output=False)
        return logits[:, 0].float().cpu(), iou[:, 0].float().cpu()

    return predict


def components(mask: np.ndarray, minimal_area: int) -> List[np.ndarray]:
    """The 8-connected components of a bool (h, w) map with at least ``minimal_area`` pixels."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    return [lab == i for i in range(1, n + 1) if areas[i] >= minimal_area]


def mask_prompt(p: torch.Tensor, side: int, coarse_thresh: float, coff: float) -> torch.Tensor:
    """(side, side) dense prompt of one class's (h, w) map (module docstring, step 3)."""
    h, w = p.shape
    s = side / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    r = F.interpolate(p[None, None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(side, side)
    out[:nh, :nw] = torch.where(r > coarse_thresh, r, torch.zeros_like(r))
    return out * coff


def refine_labels(labels: torch.Tensor, probs: torch.Tensor, predict: Predict, input_hw: Tuple[int, int],
                  input_size: int, mask_side: int, coarse_thresh: float, minimal_area: int, sam_mask_coff: float,
                  sam_iou_thresh: float) -> torch.Tensor:
    """The refined (H, W) labels (module docstring); ``input_hw``: the image's (h, w) in SAM's input
    of side ``input_size``; ``mask_side``: the decoder's mask side M."""
    from torchvision.ops import masks_to_boxes

    labels, probs = labels.cpu(), probs.float().cpu()
    k, hh, ww = probs.shape
    size = (max(1, hh // 2), max(1, ww // 2))
    half_l = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    half_p = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    half_l[half_p.max(0).values < coarse_thresh] = -1  # "ignored": no class's component
    sy, sx = input_hw[0] / size[0], input_hw[1] / size[1]
    refined = torch.zeros(k, hh, ww)
    failed = torch.zeros(hh, ww, dtype=torch.bool)
    for c in range(k):
        if float(half_p[c].max()) < coarse_thresh:
            continue
        comps = components((half_l == c).numpy(), int(minimal_area))
        if not comps:
            continue
        regions = torch.from_numpy(np.stack(comps))
        boxes = masks_to_boxes(regions).float() * torch.tensor([sx, sy, sx, sy])
        flat = torch.where(regions, half_p[c], torch.full_like(half_p[c], -1.0)).flatten(1).argmax(1)
        points = torch.stack([(flat % size[1]).float() * sx, (flat // size[1]).float() * sy], dim=1)
        logits, iou = predict(points, boxes, mask_prompt(half_p[c], mask_side, coarse_thresh, sam_mask_coff))
        up = F.interpolate(logits[:, None].float(), size=(input_size, input_size), mode="bilinear",
                           align_corners=False)[:, :, :input_hw[0], :input_hw[1]]
        up = F.interpolate(up, size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]
        for logit, q in zip(up, iou):
            inside = logit > 0
            refined[c] = torch.maximum(refined[c], torch.where(inside, torch.sigmoid(logit) * probs[c], 0.0))
            if float(q) <= sam_iou_thresh:
                failed |= inside
    best, out = refined.max(0)
    coarse_p = probs.max(0).values
    keep = (best <= 0) | (failed & (coarse_p > best))
    return torch.where(keep, labels, out)


def sam_refine(labels: torch.Tensor, probs: torch.Tensor, seg: Any, enc: Any, coarse_thresh: float,
               minimal_area: int, sam_mask_coff: float, sam_iou_thresh: float) -> torch.Tensor:
    """The label-level post-process (``Postprocess.stage == "labels"``) on one decision."""
    from .sam_attention import pieces

    stage = getattr(seg, "sam", None)
    part = getattr(enc, "sam", None)
    if stage is None or stage.decoder is None or part is None or "embedding" not in pieces(part)[0]:
        raise ValueError("postprocess=sam_refine reads SAM's image embedding, which this encode has not: encode with "
                         "a Segmenter configured with method=trident postprocess=sam_refine")
    if len(pieces(part)) != 1:
        raise ValueError("postprocess=sam_refine with trident.halves=true (two SAM passes) is not built")
    emb = part["embedding"]
    return refine_labels(labels, probs, decoder_predict(stage.decoder, emb), tuple(int(t) for t in part["input_hw"]),
                         int(stage.spec.input_size), 4 * int(emb.shape[-1]), coarse_thresh, minimal_area,
                         sam_mask_coff, sam_iou_thresh)


register_postprocess(Postprocess("sam_refine", sam_refine, stage="labels", needs_sam=True,
                                 doc="Trident's SAM prompt refinement of the labels", knobs=(
    Knob("coarse_thresh", "float", "SAM refinement: classes / pixels with p below this are not prompted",
         low=0, slider=(0.0, 1.0, 0.01)),
    Knob("minimal_area", "int", "SAM refinement: components under this many half-size pixels are dropped",
         low=0, slider=(0, 2000, 25)),
    Knob("sam_mask_coff", "float", "SAM refinement: scale of the dense mask prompt (p where > coarse_thresh)",
         low=0, slider=(0.0, 0.1, 0.001)),
    Knob("sam_iou_thresh", "float", "SAM refinement: masks with predicted IoU <= this have failed (coarse kept)",
         low=0, slider=(0.0, 1.0, 0.01)),
)))
