"""Position-embedding resize rules: how a ViT's pretrained table (gh0 x gw0 positions) is brought to
a window's patch grid (gh x gw). ``clip.pos_resize`` and ``vfm.pos_resize`` name one (docs/vfm.md):

    scale_plus_0.1  bicubic (align_corners=False, no antialias) by the scale factor
                    ((gh + 0.1) / gh0, (gw + 0.1) / gw0), recompute_scale_factor=False: the output is
                    floor(gh0 * (gh + 0.1) / gh0) = gh rows (the 0.1 guards the floor against rounding),
                    and the kernel samples at source row (i + 0.5) * gh0 / (gh + 0.1) - 0.5 (not
                    gh0 / gh): the official rule of ProxyCLIP, SCLIP, NACLIP, ClearCLIP (CLIP) and of
                    DINO's ``interpolate_pos_encoding``
    size            bicubic by size (align_corners=False, no antialias): MAE's official code
    size_antialias  bicubic by size with antialias=True: timm's ``resample_abs_pos_embed``
                    (DINOv2 with registers: the official ``interpolate_antialias=True``, offset 0)
    none            VFMs only: the model has no table resized per grid (RoPE: DINOv3; fixed input
                    size: SAM; SAM 2 Hiera's built-in interpolation), so no rule applies

Every rule leaves the table untouched at the pretrained grid, and leaves the prefix positions
(CLS, registers) as they are. The resize runs in float32 and is cast back to the table's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

RULES = ("scale_plus_0.1", "size", "size_antialias")
NONE = "none"
Grid = Tuple[int, int]


def check_rule(rule: Any, field: str, allow_none: bool = False) -> str:
    """``rule`` if it is a known rule (``none`` too when ``allow_none``), else one clear ValueError."""
    allowed = RULES + ((NONE,) if allow_none else ())
    if rule not in allowed:
        raise ValueError(f"{field}={rule!r} is not a position-embedding resize rule: expected one of "
                         f"{', '.join(allowed)} (docs/vfm.md, 'Position embeddings')")
    return str(rule)


def interpolate_kwargs(rule: str, old: Sequence[int], new: Sequence[int]) -> Dict[str, Any]:
    """The ``F.interpolate`` arguments of ``rule`` for a grid ``old`` -> ``new`` (different grids)."""
    if rule == "scale_plus_0.1":
        scale = tuple((int(n) + 0.1) / int(o) for n, o in zip(new, old))
        return dict(scale_factor=scale, mode="bicubic", align_corners=False, antialias=False,
                    recompute_scale_factor=False)
    if rule in ("size", "size_antialias"):
        return dict(size=tuple(int(n) for n in new), mode="bicubic", align_corners=False,
                    antialias=rule == "size_antialias")
    raise ValueError(f"no interpolation for position-embedding rule {rule!r}; expected one of {', '.join(RULES)}")


def resize_grid(patch_pos: torch.Tensor, old: Sequence[int], new: Sequence[int], rule: str) -> torch.Tensor:
    """(gh0*gw0, D) patch positions, row-major -> (gh*gw, D) by ``rule`` (the same tensor at ``old``)."""
    old, new = tuple(int(g) for g in old), tuple(int(g) for g in new)
    if new == old:
        return patch_pos
    d = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    out = F.interpolate(grid, **interpolate_kwargs(rule, old, new))
    if tuple(out.shape[-2:]) != new:  # cannot happen for the rules above; a guard for new ones
        raise RuntimeError(f"position-embedding rule {rule}: {old} -> {tuple(out.shape[-2:])}, expected {new}")
    return out.permute(0, 2, 3, 1).reshape(new[0] * new[1], d).to(patch_pos.dtype)


def resize_table(table: torch.Tensor, prefix: int, old: Sequence[int], new: Sequence[int], rule: str) -> torch.Tensor:
    """(prefix + gh0*gw0, D) -> (prefix + gh*gw, D): the ``prefix`` positions kept, the grid resized."""
    return torch.cat([table[:prefix], resize_grid(table[prefix:], old, new, rule)], dim=0)


# ---------------------------------------------------------------------------------------------- timm
def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def no_table_reason(model: nn.Module, fixed_input: bool) -> Optional[str]:
    """Why no rule applies to this timm model (``vfm.pos_resize`` must be ``none``), or None when it
    resamples an absolute table per grid (a timm ViT with ``dynamic_img_size``: a rule applies)."""
    name = type(model).__name__
    if fixed_input:
        return f"it sees a fixed-size input (vfm.input_size), so its table ({name}) is used at its own grid"
    if getattr(model, "pos_embed", None) is None:
        return f"{name} has no absolute position table (RoPE or none)"
    if isinstance(model, _timm_vit()) and getattr(model, "dynamic_img_size", False):
        return None
    if name == "HieraDet":
        return "SAM 2 Hiera interpolates its background table to every grid by construction (as the official code)"
    raise ValueError(f"timm model {name} has a position table that timm resizes in a way the "
                     "vfm.pos_resize rules do not cover (only timm VisionTransformer models)")


def check_vfm_rule(model: nn.Module, rule: str, fixed_input: bool, name: str) -> str:
    """``vfm.pos_resize`` checked against the built model: a rule for a table resized per grid,
    ``none`` for a model without one; anything else is one clear ValueError."""
    rule = check_rule(rule, "vfm.pos_resize", allow_none=True)
    reason = no_table_reason(model, fixed_input)
    if reason is not None and rule != NONE:
        raise ValueError(f"vfm.pos_resize={rule} means nothing for vfm={name}: {reason}; set vfm.pos_resize=none")
    if reason is None and rule == NONE:
        raise ValueError(f"vfm.pos_resize=none, but vfm={name} resizes its position table to each grid: "
                         f"choose one of {', '.join(RULES)} (docs/vfm.md)")
    return rule


class TimmTables:
    """The resized tables of one timm ViT per (rule, grid), fed to the model for one forward."""

    def __init__(self) -> None:
        self._cache: Dict[tuple, nn.Parameter] = {}

    def table(self, model: nn.Module, grid: Grid, rule: str) -> torch.Tensor:
        """(1, prefix + gh*gw, D): the model's table resized to ``grid`` by ``rule``."""
        pos = model.pos_embed
        key = (rule, tuple(grid), pos.device, pos.dtype, pos.data_ptr())
        if key not in self._cache:
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            table = resize_table(pos[0].detach(), prefix, model.patch_embed.grid_size, grid, rule)
            self._cache[key] = nn.Parameter(table[None], requires_grad=False)
        return self._cache[key]

    @contextlib.contextmanager
    def fed(self, model: nn.Module, image_size: Sequence[int], rule: Optional[str]) -> Iterator[None]:
        """During the block: ``model`` adds the table ``rule`` gives for an input of ``image_size``
        (its ``pos_embed`` and grid swapped, so timm's own resample sees nothing to do); restored after.
        ``rule`` None or ``none``: the model runs as timm has it."""
        if rule in (None, NONE):
            yield
            return
        embed = model.patch_embed
        grid = tuple(int(g) for g in embed.dynamic_feat_size(tuple(image_size)))
        if grid == tuple(embed.grid_size):
            yield
            return
        saved = model.pos_embed, embed.grid_size
        model.pos_embed, embed.grid_size = self.table(model, grid, rule), grid
        try:
            yield
        finally:
            model.pos_embed, embed.grid_size = saved
