"""CLIP through open_clip: build the model, run blocks 1..L-1, the value-only last block, the head.

open_clip is used as a library: its modules' weights are read (``conv1``, ``positional_embedding``,
``ln_pre``, the blocks, the last block's ``attn.in_proj_weight`` / ``out_proj``, ``ln_post``,
``proj``); its source is neither copied nor patched.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BlockPoints, run_blocks
from .pos_embed import check_rule, resize_table
from .weights import (WeightsUnavailable, check_checkpoint_file, hub_failure_message, mismatch_error,
                      offline_unless_reachable, quiet_library_logs, seeded)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")  # extra open_clip configs (tiny test model)

open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_clip_model(name: str, pretrained: str, quick_gelu: bool, source: str, seed: int = 0,
                      checkpoint: str | None = None) -> nn.Module:
    """An open_clip model in eval mode. ``source``: pretrained | local | random."""
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (clip.name); known: {', '.join(open_clip.list_models()[:12])}, ...")
    check_tokenizer_package(name)
    with quiet_library_logs():
        return _create(name, pretrained, quick_gelu, source, seed, checkpoint).eval().requires_grad_(False)


@contextlib.contextmanager
def _dropping_root_records(prefix: str) -> Iterator[None]:
    """Drop the root logger's records that start with ``prefix`` (open_clip logs on the root logger)."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def check_tokenizer_package(name: str) -> None:
    """open_clip models with a Hugging Face tokenizer (SigLIP, ...) need the ``transformers``
    package: say so in one line before anything is built."""
    import importlib.util

    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") and importlib.util.find_spec("transformers") is None:
        raise ValueError(f"clip.name={name} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, "
                         "which needs the Python package 'transformers': pip install transformers")


def create_tokenizer(name: str):
    """``open_clip.get_tokenizer(name)``, its INFO chatter silenced (warnings still show)."""
    check_tokenizer_package(name)
    with quiet_library_logs():
        return open_clip.get_tokenizer(name)


def _create(name: str, pretrained: str, quick_gelu: bool, source: str, seed: int, checkpoint: str | None) -> nn.Module:
    kwargs = dict(force_quick_gelu=quick_gelu)
    if source == "random":  # random on purpose: open_clip's "no pretrained weights loaded" warning is no news
        with _dropping_root_records("No pretrained weights loaded"):
            model = seeded(seed, f"clip:{name}",
                           lambda: open_clip.create_model(name, pretrained=None, load_weights=False, **kwargs))
    elif source == "local":
        path = check_checkpoint_file(checkpoint, "clip.checkpoint")
        try:
            model = open_clip.create_model(name, pretrained=str(path), require_pretrained=True, **kwargs)
        except RuntimeError as e:
            raise mismatch_error(path, f"open_clip {name}", e) from e
        except Exception as e:  # unreadable / not a checkpoint
            raise ValueError(f"clip.checkpoint {path}: cannot be read as an open_clip checkpoint ({e})") from e
    elif source == "pretrained":
        if pretrained not in open_clip.list_pretrained_tags_by_model(name):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {name} (clip.pretrained); known: {tags}")
        with offline_unless_reachable() as reachable:
            try:
                model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, **kwargs)
            except Exception as e:
                raise WeightsUnavailable(hub_failure_message(f"CLIP {name} ({pretrained})", reachable,
                                                             "clip.checkpoint")) from e
    else:
        raise ValueError(f"weights.source must be pretrained, local or random; got {source!r}")
    return model


class ClipBackbone(nn.Module):
    """Dense CLIP features: everything but the last block's attention mixing.

    ``tokens_before_last_block`` -> (B, 1+gh*gw, D) (the encode); the pieces of the last block
    a method recombines (``query_key``, ``last_block_values``, ``cls_value``, ``out_proj``,
    ``residual_and_ffn``; see proxyclip/last_block.py); ``head`` maps (B, N, D) through
    ln_post -> proj to (B, N, E).
    """

    def __init__(self, model: nn.Module, tokenizer, pos_resize: str = "scale_plus_0.1"):
        super().__init__()
        self.pos_resize = check_rule(pos_resize, "clip.pos_resize")
        self.model = model
        self.tokenizer = tokenizer
        visual = model.visual
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise TypeError(f"open_clip model's visual tower has no {attr!r}: only ViT towers are supported")
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("open_clip ViT towers with attentional pooling are not supported")
        last = visual.transformer.resblocks[-1]
        if not isinstance(last.attn, nn.MultiheadAttention):
            raise TypeError("the last CLIP block must use nn.MultiheadAttention (in_proj_weight, out_proj)")
        self.visual = visual
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.pretrained_grid = tuple(visual.grid_size)
        self.width = int(visual.conv1.out_channels)
        self._pos_cache: Dict[Tuple[str, Tuple[int, int]], torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def positional_embedding(self, grid: Tuple[int, int], rule: Optional[str] = None) -> torch.Tensor:
        """(1 + gh*gw, D): the CLS position plus the patch grid resized by ``rule`` (default
        ``self.pos_resize``, ``clip.pos_resize``; proxyclip/backbones/pos_embed.py)."""
        rule = self.pos_resize if rule is None else check_rule(rule, "clip.pos_resize")
        key = (rule, tuple(grid))
        if key not in self._pos_cache:
            pos = self.visual.positional_embedding
            self._pos_cache[key] = resize_table(pos, 1, self.pretrained_grid, grid, rule)
        return self._pos_cache[key]

    def tokens_before_last_block(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized images (B, 3, h, w) -> tokens (B, 1+gh*gw, D) entering the last block."""
        return self.encode_tokens(x)[0]

    def encode_tokens(self, x: torch.Tensor, keep: Sequence[int] = (),
                      point: Optional[BlockPoints] = None) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """CLIP-normalized images -> (tokens entering the last block, {i: tokens entering block i}
        for each i in ``keep``), all (B, 1+gh*gw, D), batch first.

        ``point``: the per-block hook points of this batch (proxyclip/backbones/blocks.py); the
        blocks someone listens to run step by step through ``clip.blocks.{i}.*``. Without it (or
        with no listener) every block is open_clip's fused module."""
        v = self.visual
        x = v.conv1(x.to(self.dtype))
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        if point is not None and point.any(self.num_blocks - 1):
            return run_blocks(v.transformer.resblocks[:-1], x, keep, point, batch_first)
        if not batch_first:
            x = x.transpose(0, 1)
        kept: Dict[int, torch.Tensor] = {}
        wanted = set(int(i) for i in keep)
        for i, block in enumerate(v.transformer.resblocks[:-1]):
            if i in wanted:
                kept[i] = x if batch_first else x.transpose(0, 1)
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        return x, kept

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def block(self, i: int) -> nn.Module:
        """Block ``i`` (0-indexed) of the vision tower."""
        return self.visual.transformer.resblocks[i]

    def block_qkv(self, i: int, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``i`` from the tokens entering it: ``in_proj(ln_1(tokens))`` per head,
        three (B, H, T, D/H) float32 tensors (the block's own attention is softmax(tau q k^T))."""
        block, d = self.block(i), self.width
        u = block.ln_1(tokens.to(self.dtype))
        qkv = F.linear(u, block.attn.in_proj_weight, block.attn.in_proj_bias).float()
        b, t = tokens.shape[:2]
        h = int(block.attn.num_heads)
        return tuple(qkv[..., j * d:(j + 1) * d].view(b, t, h, d // h).transpose(1, 2) for j in range(3))

    @property
    def last_block(self) -> nn.Module:
        return self.visual.transformer.resblocks[-1]

    @property
    def heads(self) -> int:
        return int(self.last_block.attn.num_heads)

    def _in_proj(self, tokens: torch.Tensor, part: int) -> torch.Tensor:
        """One third (0 = q, 1 = k, 2 = v) of the last block's in-projection of ``ln_1(tokens)``."""
        block, d = self.last_block, self.width
        w = block.attn.in_proj_weight[part * d:(part + 1) * d]
        b = block.attn.in_proj_bias[part * d:(part + 1) * d] if block.attn.in_proj_bias is not None else None
        return F.linear(block.ln_1(tokens.to(self.dtype)), w, b)

    def query_key(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of the last block, per head: two (B, H, T, D/H) float32 tensors."""
        b, t, d = tokens.shape
        q, k = (self._in_proj(tokens, part).float().view(b, t, self.heads, d // self.heads).transpose(1, 2)
                for part in (0, 1))
        return q, k

    def last_block_values(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``v = ln_1(x) @ W_v^T + b_v`` of the last block, CLS dropped -> (B, D, gh, gw)."""
        v = self._in_proj(tokens[:, 1:], 2)
        return v.transpose(1, 2).reshape(v.shape[0], self.width, grid[0], grid[1])

    def cls_value(self, tokens: torch.Tensor) -> torch.Tensor:
        """The CLS token's value in the last block -> (B, 1, D)."""
        return self._in_proj(tokens[:, :1], 2)

    def out_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's out_proj on (B, T, D) tokens."""
        return self.last_block.attn.out_proj(x.to(self.dtype))

    def out_proj_map(self, values: torch.Tensor) -> torch.Tensor:
        """The last block's out_proj applied to a (B, D, gh, gw) value map."""
        x = self.out_proj(values.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(values.shape)

    def residual_and_ffn(self, out: torch.Tensor, tokens: Optional[torch.Tensor], ffn: bool) -> torch.Tensor:
        """``Y = tokens + ls_1(out)`` (``Y = out`` when ``tokens`` is None), then ``Y + ls_2(mlp(ln_2(Y)))`` if ``ffn``."""
        block = self.last_block
        y = out if tokens is None else tokens.to(out.dtype) + _layer_scale(block, "ls_1")(out)
        if ffn:
            y = y + _layer_scale(block, "ls_2")(block.mlp(block.ln_2(y.to(self.dtype))).to(y.dtype))
        return y

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, E): ln_post, then proj."""
        return self.visual.ln_post(x) @ self.visual.proj

    def grid_of(self, height: int, width: int) -> Tuple[int, int]:
        return height // self.patch_size, width // self.patch_size


def _layer_scale(block: nn.Module, name: str) -> nn.Module:
    return getattr(block, name, None) or nn.Identity()
