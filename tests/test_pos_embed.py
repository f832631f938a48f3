"""Position-embedding resize rules (clip.pos_resize, vfm.pos_resize): each rule's table equals
F.interpolate with that rule's arguments written out here, the encode adds exactly that table, the
scale-factor rule samples where its equation says (a float64 bicubic written from the kernel's
definition), and a rule where it means nothing is one clear error."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import tiny_config
from proxyclip import Segmenter, compose_config
from proxyclip.backbones.clip import ClipBackbone, create_clip_model
from proxyclip.backbones.pos_embed import check_vfm_rule
from proxyclip.backbones.vfm import VfmBackbone, create_vfm_model
from proxyclip.config import CONF_DIR

RULES = ("scale_plus_0.1", "size", "size_antialias")


def expected_patch_table(patch, old, new, rule):
    """(g0h*g0w, D) -> (gh*gw, D): the rule's F.interpolate call, its arguments written from the docs."""
    if tuple(new) == tuple(old):
        return patch  # no rule resizes at the pretrained grid
    d = patch.shape[-1]
    x = patch.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    if rule == "scale_plus_0.1":
        out = F.interpolate(x, scale_factor=((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1]), mode="bicubic",
                            align_corners=False, recompute_scale_factor=False)
    elif rule == "size":
        out = F.interpolate(x, size=tuple(new), mode="bicubic", align_corners=False)
    else:
        out = F.interpolate(x, size=tuple(new), mode="bicubic", align_corners=False, antialias=True)
    assert tuple(out.shape[-2:]) == tuple(new)  # PyTorch: floor(g0 * (g + 0.1) / g0) = g rows
    return out.permute(0, 2, 3, 1).reshape(-1, d)


@pytest.fixture(scope="module")
def clip_b16():
    return create_clip_model("ViT-B-16", "openai", True, "random", seed=0)


@pytest.fixture(scope="module")
def dino_b8():
    return create_vfm_model("vit_base_patch8_224.dino", "random", seed=0)


class Stop(Exception):
    pass


def ln_pre_input(clip, x):
    """What CLIP's ln_pre receives (patch tokens + positions), the forward stopped right there."""
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach().clone()
        raise Stop

    handle = clip.visual.ln_pre.register_forward_pre_hook(grab)
    try:
        with pytest.raises(Stop), torch.no_grad():
            clip.tokens_before_last_block(x)
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("grid", [(14, 14), (21, 21), (21, 28)])
@pytest.mark.parametrize("rule", RULES)
def test_clip_table_equals_the_rules_interpolate(clip_b16, grid, rule):
    clip = ClipBackbone(clip_b16, tokenizer=None, pos_resize=rule)
    assert clip.pretrained_grid == (14, 14)
    pos = clip_b16.visual.positional_embedding.detach()
    got = clip.positional_embedding(grid)
    assert got.shape == (1 + grid[0] * grid[1], pos.shape[-1])
    torch.testing.assert_close(got[:1], pos[:1], atol=0, rtol=0)  # CLS position untouched
    torch.testing.assert_close(got[1:], expected_patch_table(pos[1:], (14, 14), grid, rule), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(21, 21), (21, 28)])
def test_clip_rules_differ_off_the_pretrained_grid(clip_b16, grid):
    """The rules are three different tables (the tests above would not tell them apart otherwise)."""
    clip = ClipBackbone(clip_b16, tokenizer=None)
    tables = {r: clip.positional_embedding(grid, r) for r in RULES}
    scale = tables["size"].abs().max()
    for a, b in [("scale_plus_0.1", "size"), ("size", "size_antialias"), ("scale_plus_0.1", "size_antialias")]:
        assert (tables[a] - tables[b]).abs().max() > 1e-3 * scale, (a, b)


def test_clip_encode_adds_the_configured_rules_table(clip_b16):
    """Tokens entering ln_pre under rule A and rule B differ by exactly table A - table B."""
    x = torch.randn(1, 3, 21 * 16, 28 * 16, generator=torch.Generator().manual_seed(0))
    seen = {r: ln_pre_input(ClipBackbone(clip_b16, tokenizer=None, pos_resize=r), x) for r in RULES}
    pos = clip_b16.visual.positional_embedding.detach()
    for a, b in [("scale_plus_0.1", "size"), ("size_antialias", "size")]:
        diff = torch.cat([torch.zeros(1, pos.shape[-1]),  # CLS: the same in every rule
                          expected_patch_table(pos[1:], (14, 14), (21, 28), a)
                          - expected_patch_table(pos[1:], (14, 14), (21, 28), b)])
        torch.testing.assert_close(seen[a] - seen[b], diff[None].expand_as(seen[a]), atol=1e-6, rtol=0)


def test_clip_default_rule_and_bad_value(clip_b16):
    assert ClipBackbone(clip_b16, tokenizer=None).pos_resize == "scale_plus_0.1"
    for path in sorted((CONF_DIR / "clip").glob("*.yaml")):
        assert compose_config(overrides=[f"clip={path.stem}"]).clip.pos_resize == "scale_plus_0.1", path.name
    with pytest.raises(ValueError, match=r"^clip.pos_resize='bilinear' is not .*scale_plus_0.1, size, size_antialias"):
        Segmenter.from_config(tiny_config("clip.pos_resize=bilinear"))
    with pytest.raises(ValueError, match=r"clip.pos_resize='none'.*expected one of scale_plus_0.1, size, size_antialias \("):
        ClipBackbone(clip_b16, tokenizer=None, pos_resize="none")  # CLIP always has a table


# ---------------------------------------------------------------------------------------------- the kernel
def cubic_weights(t, a=-0.75):
    """PyTorch's bicubic (Keys, a = -0.75) weights of the 4 taps at offsets -1, 0, 1, 2 for a fraction t."""
    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_1d_matrix(n_in, n_out, step):
    """(n_out, n_in) float64: output i samples source (i + 0.5) * step - 0.5, taps clamped to the border."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * step - 0.5
        base = math.floor(src)
        for k, w in zip(range(-1, 3), cubic_weights(src - base)):
            m[i, min(max(base + k, 0), n_in - 1)] += w
    return m


@pytest.mark.parametrize("rule,step", [("scale_plus_0.1", lambda g0, g: g0 / (g + 0.1)),
                                       ("size", lambda g0, g: g0 / g)])
def test_rules_sample_where_their_equation_says(clip_b16, rule, step):
    """scale_plus_0.1 samples at (i + 0.5) * g0 / (g + 0.1) - 0.5, size at (i + 0.5) * g0 / g - 0.5."""
    gh, gw = 21, 28
    pos = clip_b16.visual.positional_embedding.detach().double()
    grid = pos[1:].reshape(14, 14, -1)
    rows, cols = bicubic_1d_matrix(14, gh, step(14, gh)), bicubic_1d_matrix(14, gw, step(14, gw))
    naive = torch.einsum("ip,jq,pqd->ijd", rows, cols, grid).reshape(gh * gw, -1)
    got = ClipBackbone(clip_b16, tokenizer=None, pos_resize=rule).positional_embedding((gh, gw))[1:]
    torch.testing.assert_close(got.double(), naive, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- DINO (timm)
@pytest.mark.parametrize("rule", RULES)
def test_dino_b8_table_equals_the_rules_interpolate(dino_b8, rule):
    vfm = VfmBackbone(dino_b8, layer=0, name="dino_vitb8", pos_resize=rule)
    pos = dino_b8.pos_embed.detach()[0]
    assert tuple(dino_b8.patch_embed.grid_size) == (28, 28) and pos.shape[0] == 1 + 28 * 28
    got = vfm._tables.table(dino_b8, (42, 42), rule)[0]
    torch.testing.assert_close(got[:1], pos[:1], atol=0, rtol=0)
    torch.testing.assert_close(got[1:], expected_patch_table(pos[1:], (28, 28), (42, 42), rule), atol=1e-6, rtol=0)


def pos_drop_input(vfm, x):
    """What the timm ViT's pos_drop receives: prefix + patch tokens with the positions added."""
    seen = {}
    handle = vfm.model.pos_drop.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
    try:
        with torch.no_grad():
            vfm.features(x)
    finally:
        handle.remove()
    return seen["x"]


def test_dino_encode_adds_the_configured_rules_table_and_restores_the_model(dino_b8):
    x = torch.randn(1, 3, 42 * 8, 42 * 8, generator=torch.Generator().manual_seed(1))
    table, grid_size = dino_b8.pos_embed, dino_b8.patch_embed.grid_size
    seen = {r: pos_drop_input(VfmBackbone(dino_b8, layer=0, pos_resize=r), x) for r in RULES}
    timm_own = pos_drop_input(VfmBackbone(dino_b8, layer=0), x)  # timm's resample_abs_pos_embed
    assert dino_b8.pos_embed is table and dino_b8.patch_embed.grid_size == grid_size  # restored
    pos = table.detach()[0]
    for a, b in [("scale_plus_0.1", "size"), ("size_antialias", "size")]:
        diff = torch.cat([torch.zeros(1, pos.shape[-1]),
                          expected_patch_table(pos[1:], (28, 28), (42, 42), a)
                          - expected_patch_table(pos[1:], (28, 28), (42, 42), b)])
        torch.testing.assert_close(seen[a] - seen[b], diff[None], atol=1e-6, rtol=0)
    assert torch.equal(seen["size_antialias"], timm_own)  # timm's own rule is size_antialias
    assert (seen["scale_plus_0.1"] - timm_own).abs().max() > 1e-4


def test_dinov2_timm_rule_is_size_antialias():
    """DINOv2 (registers, no position for the prefix): timm's own run equals vfm.pos_resize=size_antialias."""
    cfg = compose_config(overrides=["vfm=dinov2_vitb14_reg"]).vfm
    assert cfg.pos_resize == "size_antialias"
    model = create_vfm_model(cfg.timm_name, "random", timm_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2})
    assert model.no_embed_class and tuple(model.patch_embed.grid_size) == (37, 37)
    x = torch.rand(1, 3, 14 * 9, 14 * 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = VfmBackbone(model, pos_resize="size_antialias").features(x)
        other = VfmBackbone(model, pos_resize="scale_plus_0.1").features(x)
        assert torch.equal(ours, VfmBackbone(model).features(x))
    assert not torch.allclose(ours, other, atol=1e-5)


# ---------------------------------------------------------------------------------------------- presets, errors
OFFICIAL = {"dino_": "scale_plus_0.1", "dinov2_": "size_antialias", "mae_": "size", "radio_": "size_antialias",
            "dinov3_": "none", "sam_": "none", "sam2_": "none", "test_tiny_mae": "size", "test_tiny_sam": "none",
            "test_tiny": "scale_plus_0.1"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "vfm").glob("*.yaml") if p.stem != "none"))
def test_each_vfm_yaml_rule_is_the_documented_one_and_fits_its_model(name):
    cfg = compose_config(overrides=[f"vfm={name}"]).vfm
    family = max((k for k in OFFICIAL if name.startswith(k)), key=len)
    assert cfg.pos_resize == OFFICIAL[family]
    with torch.device("meta"):
        model = create_vfm_model(cfg.timm_name, "random", timm_kwargs=cfg.timm_kwargs,
                                 fixed_input_size=cfg.input_size is not None)
    assert check_vfm_rule(model, cfg.pos_resize, cfg.input_size is not None, name) == cfg.pos_resize


@pytest.mark.parametrize("name,rule,message", [
    ("dinov3_vits16", "size", r"vfm.pos_resize=size means nothing for vfm=dinov3_vits16: .*no absolute position table"),
    ("sam_vitb", "scale_plus_0.1", r"vfm.pos_resize=scale_plus_0.1 means nothing for vfm=sam_vitb: .*fixed-size input"),
    ("sam2_hiera_tiny", "size_antialias", r"means nothing for vfm=sam2_hiera_tiny: SAM 2 Hiera"),
    ("dino_vits16", "none", r"vfm.pos_resize=none, but vfm=dino_vits16 resizes .*scale_plus_0.1, size, size_antialias"),
    ("dino_vits16", "bicubic", r"vfm.pos_resize='bicubic' is not .*scale_plus_0.1, size, size_antialias, none"),
])
def test_a_rule_where_it_means_nothing_is_one_clear_error(name, rule, message):
    cfg = compose_config(overrides=[f"vfm={name}"]).vfm
    with torch.device("meta"):
        model = create_vfm_model(cfg.timm_name, "random", fixed_input_size=cfg.input_size is not None)
    with pytest.raises(ValueError, match=message):
        VfmBackbone(model, input_size=cfg.input_size, name=name, pos_resize=rule)


def test_the_rules_reach_the_backbones_and_the_keys():
    seg = Segmenter.from_config(tiny_config("clip.pos_resize=size", "vfm.pos_resize=size_antialias"))
    assert (seg.clip.pos_resize, seg.vfm.pos_resize) == ("size", "size_antialias")
    base = Segmenter.from_config(tiny_config())
    assert (base.clip.pos_resize, base.vfm.pos_resize) == ("scale_plus_0.1", "scale_plus_0.1")
    assert seg.encode_spec.clip_key != base.encode_spec.clip_key and seg.encode_spec.vfm_key != base.encode_spec.vfm_key
    other = base.with_vfm("test_tiny", pos_resize="size")  # a readout setting: the VFM model is shared
    assert other.vfm.model is base.vfm.model and other.vfm.pos_resize == "size"
    img = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(other.encode(img).vfm_features, base.encode(img).vfm_features)


def test_the_text_cache_key_ignores_the_image_towers_rule():
    a = Segmenter.from_config(tiny_config("clip.pos_resize=size")).encode_spec
    b = Segmenter.from_config(tiny_config()).encode_spec
    assert a.text_model_id() == b.text_model_id() and a.clip_key != b.clip_key
    assert a.text_model_id() != Segmenter.from_config(tiny_config("weights.seed=1")).encode_spec.text_model_id()
