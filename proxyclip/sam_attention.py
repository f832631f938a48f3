"""The SAM part: a per-image part of the encode for Trident (``trident.sam``, a conf/vfm preset of a
timm SAM ViT; made only when the configured method has ``Method.needs_sam``).

SAM sees the **original** image (never the resized one nor a window), as Trident's SAM predictor
does: 8-bit RGB; when a side is not a multiple of 16, first resized by :func:`multiple_of_16_size`
(PIL bilinear; floored at 16 px here, not 336: only tiny images differ); then the long side to the model's input side S (1024): scale = S / max(h, w),
each side ``int(side * scale + 0.5)``, PIL bilinear; normalized with SAM's pixel mean / std
(0-255 scale); zero-padded bottom / right to S x S. The valid grid is (floor(new_h / 16),
floor(new_w / 16)).

What is kept (``Encoded.sam``) are the inputs of the **last** block's (global) attention, not
the attention itself: per head q, k, v (H, G, d) over the whole G = S/16 x S/16 grid, and the
decomposed relative-position tables Rh (gh, gh, d), Rw (gw, gw, d) of that block (timm's
``get_rel_pos``), plus the valid grid. The attention P_h = softmax(scale q k^T + bias) runs over
all G keys (padding included, as the model's own), and is cropped to the valid grid at decode
(:func:`valid_attention`): ViT-B at 1024 keeps 3 x 12 x 4096 x 64 + 2 x 64^3 floats, 38 MB an
image in float32, where the cropped P and v would be 12 x N^2 + 12 x N x 64 floats (N = 3072
for a 4:3 image: 463 MB).

When the configured post-process reads it (``postprocess=sam_refine``, proxyclip/sam_refine.py:
``SamAttnSpec.embedding``, part of ``sam_key``) the encoder runs to its end and the part also keeps
the image embedding, the neck's output (C, S/16, S/16: 256 x 64 x 64 for ViT-B, 4 MB), and
``input_hw``, the image's (new_h, new_w) in SAM's input; the stage then holds the refinement's
prompt encoder and mask decoder too (``SamStage.decoder``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .specs import SamAttnSpec, checkpoint_digest, plain

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
_MODELS: Dict[Any, nn.Module] = {}  # built SAM encoders, shared by the Segmenters of one process


def sam_attn_spec(cfg: Any, local: bool, source: str = "") -> Optional[SamAttnSpec]:
    """The SAM part's spec for ``cfg`` (None unless the configured method reads it); with the image
    embedding when the configured post-process reads it (sam_refine; ``source``: the weights' source)."""
    from .config import group_choice
    from .methods import get_method
    from .postprocess import get_postprocess

    post = cfg.get("postprocess") if hasattr(cfg, "get") else None
    embedding = post is not None and get_postprocess(str(post.name)).needs_sam
    if not getattr(get_method(str(cfg.method.name)), "needs_sam", False):
        if embedding:
            raise ValueError(f"postprocess={post.name} reads SAM's image embedding, which only a method reading the "
                             f"SAM part makes (method=trident); method={cfg.method.name} has none")
        return None
    node = cfg.get("trident") if hasattr(cfg, "get") else None
    name = "sam_vitb" if node is None or node.get("sam") is None else str(node.sam)
    try:
        preset = group_choice("vfm", name)
    except Exception:
        raise ValueError(f"trident.sam={name}: no such conf/vfm preset (expected a SAM ViT such as sam_vitb)") from None
    timm_name = str(preset.get("timm_name") or "")
    if not timm_name.startswith("samvit_") or preset.get("input_size") is None:
        raise ValueError(f"trident.sam={name} is not a SAM ViT with a fixed input size (timm samvit_*, input_size "
                         f"set), got timm_name={timm_name or None}")
    kwargs = plain(preset.get("timm_kwargs")) or {}
    return SamAttnSpec(name=name, timm_name=timm_name, input_size=int(preset.input_size),
                       timm_kwargs=json.dumps(kwargs, sort_keys=True),
                       checkpoint=checkpoint_digest(node.get("checkpoint")) if local and node is not None else None,
                       halves=bool(node.get("halves", False)) if node is not None else False, embedding=embedding,
                       decoder=decoder_identity(node, source) if embedding else None)


def decoder_identity(node: Any, source: str) -> Optional[str]:
    """What identifies sam_refine's prompt encoder / mask decoder weights besides the seed: the
    checkpoint's content digest (weights=local), the download URL (pretrained), None (random)."""
    if source == "local":
        return checkpoint_digest(node.get("decoder_checkpoint")) if node is not None else None
    if source == "pretrained":
        return str(node.get("decoder_pretrained")) if node is not None else None
    return None


def multiple_of_16_size(h: int, w: int, floor: int = 336) -> Tuple[int, int]:
    """Trident's ``preprocess_image`` size: kept when both sides are multiples of 16; else the long
    side rounded up to a multiple of 16, both sides scaled by that factor, each rounded up to a
    multiple of 16 and at least ``floor``."""
    if h % 16 == 0 and w % 16 == 0:
        return h, w
    long = max(h, w)
    scale = (-(-long // 16) * 16) / long
    return tuple(max(floor, int(-(-(s * scale) // 16)) * 16) for s in (h, w))  # type: ignore[return-value]


def sam_input_size(image: torch.Tensor, side: int) -> Tuple[int, int]:
    """(new_h, new_w) of :func:`sam_input`: the image in SAM's input before the zero padding."""
    h, w = multiple_of_16_size(int(image.shape[-2]), int(image.shape[-1]), floor=16)
    scale = side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_input(image: torch.Tensor, side: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(3, H, W) image in [0, 1] -> ((1, 3, side, side) normalized and padded input, valid grid)."""
    from PIL import Image

    u8 = torch.round(image.float().cpu() * 255.0).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(np.ascontiguousarray(u8))
    h, w = u8.shape[:2]
    h16, w16 = multiple_of_16_size(h, w, floor=16)
    if (h16, w16) != (h, w):
        pil = pil.resize((w16, h16), Image.BILINEAR)
        h, w = h16, w16
    scale = side / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    pil = pil.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1)
    x = (x - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    out = torch.zeros(1, 3, side, side)
    out[0, :, :nh, :nw] = x
    return out, (nh // 16, nw // 16)


def build_sam_encoder(spec: SamAttnSpec, source: str, seed: int, checkpoint: Optional[str], device: torch.device,
                      dtype: torch.dtype) -> nn.Module:
    """The timm SAM encoder (shared per spec, weights, device and dtype); offline without its
    pretrained weights: one line saying what to do (proxyclip.backbones.weights)."""
    from .backbones.vfm import create_vfm_model

    key = (spec, source, seed, str(device), dtype)
    if key not in _MODELS:
        model = create_vfm_model(spec.timm_name, source, seed=seed, checkpoint=checkpoint,
                                 timm_kwargs=json.loads(spec.timm_kwargs), fixed_input_size=True)
        last = model.blocks[-1]
        if int(getattr(last, "window_size", 0) or 0) > 0 or not getattr(last.attn, "use_rel_pos", False):
            raise ValueError(f"trident.sam={spec.name}: the last block of {spec.timm_name} must be a global attention "
                             "block with relative positions (SAM's); check its timm_kwargs (global_attn_indexes)")
        _MODELS[key] = model.to(device=device, dtype=dtype)
    return _MODELS[key]


class SamStage:
    """The SAM part of one Segmenter: ``part(image)`` -> the dict stored in ``Encoded.sam``."""

    def __init__(self, cfg: Any, spec: SamAttnSpec, key: str, weights: Any, device: torch.device,
                 dtype: torch.dtype):
        self.spec, self.key, self.device = spec, key, device
        source = str(weights.source)
        path = None
        if source == "local":
            from .backbones.weights import check_checkpoint_file

            path = str(check_checkpoint_file(cfg.trident.get("checkpoint"), "trident.checkpoint"))
        self.model = build_sam_encoder(spec, source, int(weights.seed or 0), path, device, dtype)
        self.calls = 0
        self.decoder = None  # sam_refine's prompt encoder and mask decoder (proxyclip/sam_refine.py)
        if spec.embedding:
            from .sam_refine import build_decoder

            self.decoder = build_decoder(cfg.trident, source, int(weights.seed or 0), int(self.model.num_features),
                                         spec.input_size, device)

    @torch.no_grad()
    def part(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The stored SAM part of a (3, H, W) image; with ``halves`` its left and right halves (split
        at W // 2 columns) each through SAM, their entries suffixed ``.0`` / ``.1`` (:func:`pieces`)."""
        self.calls += 1
        if not self.spec.halves:
            return self._part(image)
        w = int(image.shape[-1])
        if w < 2:
            raise ValueError("trident.halves=true needs an image at least 2 pixels wide")
        out: Dict[str, torch.Tensor] = {"pieces": torch.tensor(2)}
        for i, half in enumerate((image[..., :w // 2], image[..., w // 2:])):
            out.update({f"{k}.{i}": v for k, v in self._part(half).items()})
        return out

    def _part(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        x, valid = sam_input(image, self.spec.input_size)
        model = self.model
        attn = model.blocks[-1].attn
        seen = []
        handle = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        x = x.to(device=self.device, dtype=next(model.parameters()).dtype)
        try:
            if self.spec.embedding:  # the whole encoder and its neck: the image embedding (C, g, g)
                embedding = model.forward_features(x)[0].float().cpu()
            else:  # the last block's input only
                model.forward_intermediates(x, indices=[len(model.blocks) - 1], norm=False, stop_early=True,
                                            intermediates_only=True)
        finally:
            handle.remove()
        (inp,) = seen  # (1, gh, gw, C): norm1 of the tokens entering the last block
        from timm.models.vision_transformer_sam import get_rel_pos

        _, gh, gw, c = inp.shape
        heads = attn.num_heads
        qkv = attn.qkv(inp.reshape(1, gh * gw, c)).view(gh * gw, 3, heads, -1).permute(1, 2, 0, 3).float()
        rh = get_rel_pos(gh, gh, attn.rel_pos_h).float()
        rw = get_rel_pos(gw, gw, attn.rel_pos_w).float()
        out = {"qkv": qkv.cpu(), "rel_h": rh.cpu(), "rel_w": rw.cpu(),
               "grid": torch.tensor([gh, gw]), "valid": torch.tensor(valid),
               "scale": torch.tensor(float(attn.scale), dtype=torch.float64)}
        if self.spec.embedding:  # and the SAM input's size before padding, for the prompts' frame
            out.update(embedding=embedding, input_hw=torch.tensor(sam_input_size(image, self.spec.input_size)))
        return out


def sam_stage(cfg: Any, spec: Any, device: torch.device, dtype: torch.dtype) -> Optional[SamStage]:
    if spec.sam is None:
        return None
    return SamStage(cfg, spec.sam, spec.sam_key, spec.weights, device, dtype)


def sam_part_of(seg: Any, img: torch.Tensor, reuse: Any) -> Optional[Dict[str, torch.Tensor]]:
    """An encode's SAM part: ``reuse``'s when made under the same key, else made; None without a stage."""
    stage = getattr(seg, "sam", None)
    if stage is None:
        return None
    if reuse is not None and reuse.sam is not None and reuse.sam_key == stage.key:
        return reuse.sam
    return stage.part(img)


def pieces(part: Dict[str, torch.Tensor]) -> list:
    """The SAM part's pieces, left to right: [part] for the whole image, two dicts with halves."""
    if "pieces" not in part:
        return [part]
    n = int(part["pieces"])
    return [{k.rsplit(".", 1)[0]: v for k, v in part.items() if k.endswith(f".{i}")} for i in range(n)]


def valid_attention(part: Dict[str, torch.Tensor], head: int, dtype: torch.dtype = torch.float32
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P_h, v_h) of one head on the valid grid: P_h = softmax(scale q k^T + rel-pos bias) over
    every key of the whole grid, rows and columns then cropped to the valid grid (rows are not
    renormalized); v_h (N, d) cropped. N = hv * wv, row-major."""
    qkv = part["qkv"].to(dtype)
    gh, gw = (int(t) for t in part["grid"])
    hv, wv = (int(t) for t in part["valid"])
    q, k, v = qkv[0, head], qkv[1, head], qkv[2, head]  # (G, d)
    keep = (torch.arange(gh)[:, None] < hv) & (torch.arange(gw)[None, :] < wv)
    idx = keep.flatten().nonzero().flatten().to(q.device)
    qv = q[idx]  # valid queries only: a softmax row depends on its own query
    rows = idx // gw, idx % gw
    rel_h = torch.einsum("nc,nkc->nk", qv, part["rel_h"].to(dtype)[rows[0]])  # (N, gh)
    rel_w = torch.einsum("nc,nkc->nk", qv, part["rel_w"].to(dtype)[rows[1]])  # (N, gw)
    logits = float(part["scale"]) * (qv @ k.T) + (rel_h[:, :, None] + rel_w[:, None, :]).reshape(len(idx), gh * gw)
    p = torch.softmax(logits, dim=-1)[:, idx]
    return p, v[idx]
