"""VFM features through timm's feature interface: every shipped YAML, layers, q/k/v, norm, bad input."""

import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import tiny_config
from proxyclip import Segmenter, compose_config
from proxyclip.backbones.clip import CLIP_MEAN, CLIP_STD
from proxyclip.backbones.vfm import VfmBackbone, build_vfm, create_vfm_model
from proxyclip.config import CONF_DIR

VFMS = sorted(p.stem for p in (CONF_DIR / "vfm").glob("*.yaml") if p.stem != "none")
SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SMALL = "{embed_dim: 64, depth: 2, num_heads: 2}"  # the same, as a Hydra override value
TINY_SAM_INPUT = 64
# A tiny random instance of each architecture class: same timm name (patch size, prefix tokens, norm), small.
TINY_KWARGS = {
    "VisionTransformer": SMALL_VIT,
    "Eva": SMALL_VIT,
    "VisionTransformerSAM": dict(SMALL_VIT, global_attn_indexes=[1], window_size=4, img_size=TINY_SAM_INPUT),
    "HieraDet": {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1), "global_att_blocks": ()},
}
IMAGENET = (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)


def vfm_cfg(name, *overrides):
    return compose_config(overrides=[f"vfm={name}", *overrides]).vfm


def full_size_on_meta(cfg):
    """The full-size model built on the meta device: its structure and configs, no memory, no compute."""
    with torch.device("meta"):
        return create_vfm_model(cfg.timm_name, "random", timm_kwargs=cfg.timm_kwargs,
                                fixed_input_size=cfg.input_size is not None)


def tiny_backbone(cfg, **knobs):
    cls = type(full_size_on_meta(cfg)).__name__
    kwargs = dict(TINY_KWARGS[cls], **cfg.timm_kwargs)
    model = create_vfm_model(cfg.timm_name, "random", timm_kwargs=kwargs, fixed_input_size=cfg.input_size is not None)
    settings = dict(layer=cfg.layer, feature=cfg.feature, norm=cfg.norm, name=cfg.name,
                    input_size=None if cfg.input_size is None else TINY_SAM_INPUT)
    return VfmBackbone(model, **dict(settings, **knobs))


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VFMS)
def test_full_size_declarations_match_timm(name):
    cfg = vfm_cfg(name)
    model = full_size_on_meta(cfg)
    vfm = VfmBackbone(model, layer=cfg.layer, feature=cfg.feature, norm=cfg.norm, input_size=cfg.input_size)
    info = model.feature_info[cfg.layer]
    assert (vfm.channels, vfm.patch_size) == (cfg.channels, cfg.stride)
    assert vfm.channels == (info.get("num_chs_norm", info["num_chs"]) if cfg.norm else info["num_chs"])
    assert vfm.patch_size == info["reduction"]
    expected = (CLIP_MEAN, CLIP_STD) if name.startswith("radio") else IMAGENET
    torch.testing.assert_close(torch.tensor([vfm.mean, vfm.std]), torch.tensor(expected, dtype=torch.float32))
    if cfg.input_size is not None:  # a fixed-size model (SAM): the YAML's size is timm's, or the one it builds with
        built = (cfg.get("timm_kwargs") or {}).get("img_size")  # a tiny test model's (test_tiny_sam)
        want = (3, built, built) if built else timm.data.resolve_model_data_config(model)["input_size"]
        assert want == (3, cfg.input_size, cfg.input_size)


@pytest.mark.parametrize("name", VFMS)
def test_tiny_instance_contract(name):
    cfg = vfm_cfg(name)
    vfm = tiny_backbone(cfg)
    assert vfm.patch_size == cfg.stride  # the tiny instance keeps the architecture's stride
    h, w = 2 * cfg.stride + 5, 3 * cfg.stride - 7  # not multiples of the stride
    with torch.no_grad():
        out = vfm.features(rand(2, 3, h, w))
    side = None if cfg.input_size is None else TINY_SAM_INPUT
    grid = (math.ceil((side or h) / cfg.stride), math.ceil((side or w) / cfg.stride))
    info = vfm.model.feature_info[cfg.layer]
    channels = info.get("num_chs_norm", info["num_chs"]) if cfg.norm else info["num_chs"]
    assert out.shape == (2, channels, *grid) and vfm.channels == channels
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- numbers unchanged
def old_features(model, x, prefix, patch, sam_size=None):
    """The features before timm's feature interface: forward_features, prefix dropped, reshaped (SAM: the neck)."""
    if sam_size is not None:
        return model.forward_features(F.interpolate(x, size=(sam_size, sam_size), mode="bilinear", align_corners=False))
    tokens = model.forward_features(x)[:, prefix:]
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-2] // patch, x.shape[-1] // patch)


@pytest.mark.parametrize("name,prefix", [("dino_vits8", 1), ("dino_vitb16", 1), ("dinov2_vitb14_reg", 5),
                                         ("mae_vitb16", 1), ("sam_vitb", 0)])
def test_default_features_are_unchanged(name, prefix):
    cfg = vfm_cfg(name, "vfm.layer=-1", "vfm.feature=tokens")
    vfm = tiny_backbone(cfg)
    assert vfm.num_prefix_tokens == prefix
    x = rand(2, 3, 3 * cfg.stride, 4 * cfg.stride)  # window already padded, as the pipeline hands it over
    with torch.no_grad():
        expected = old_features(vfm.model, x, prefix, cfg.stride, vfm.input_size)
        assert torch.equal(vfm.features(x), expected)


def test_pipeline_normalizes_with_the_backbones_mean_std():
    seg = Segmenter.from_config(tiny_config("vfm=radio_vitb16", f"++vfm.timm_kwargs={SMALL}", "vfm.channels=null"))
    assert (seg.vfm.mean, seg.vfm.std) == (CLIP_MEAN, CLIP_STD)
    img = rand(3, 64, 64)
    features = seg.run_with_cache(img, ["sky"], names=["vfm.features"])[1]["vfm.features"]
    t, b, l, r = seg.encode(img).pad
    x = (img[None] - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = old_features(seg.vfm_model, F.pad(x, (l, r, t, b)), seg.vfm.num_prefix_tokens, 16)
    torch.testing.assert_close(features, expected)


PIPELINE_VFMS = {
    # name: (extra overrides, VFM grid for one 64x64 window after the pipeline's padding, window padding)
    "dino_vits8": ([f"++vfm.timm_kwargs={SMALL}"], (8, 8), (0, 0, 0, 0)),
    "dinov2_vitb14_reg": ([f"++vfm.timm_kwargs={SMALL}"], (8, 8), (24, 24, 24, 24)),  # lcm(16, 14) = 112
    "mae_vitb16": ([f"++vfm.timm_kwargs={SMALL}"], (4, 4), (0, 0, 0, 0)),
    "sam_vitb": ([f"vfm.input_size={TINY_SAM_INPUT}", "++vfm.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2, "
                  f"global_attn_indexes: [1], window_size: 4, img_size: {TINY_SAM_INPUT}}}"], (4, 4), (0, 0, 0, 0)),
    "sam2_hiera_tiny": (["++vfm.timm_kwargs={embed_dim: 16, num_heads: 1, stages: [1, 1, 1, 1], "
                         "global_att_blocks: []}"], (2, 2), (0, 0, 0, 0)),  # stride 32
}
@pytest.mark.parametrize("name", sorted(PIPELINE_VFMS))
def test_pipeline_pads_windows_for_the_vfm(name):
    overrides, grid, pad = PIPELINE_VFMS[name]
    seg = Segmenter.from_config(tiny_config(f"vfm={name}", *overrides, "vfm.channels=null"))  # a shrunk model
    enc = seg.encode(rand(3, 64, 64))
    assert tuple(enc.vfm_features.shape[-2:]) == grid and enc.pad == pad  # SAM: a resized copy, no VFM padding
    assert enc.vfm_features.shape[1] == seg.vfm.channels
    assert torch.isfinite(seg.decode(enc, ["sky", "grass"]).scores).all()


def test_sam_features_equal_an_encoder_built_with_sams_layer_norm_eps(tmp_path):
    """SAM's official image encoder uses LayerNorm eps 1e-6 (blocks and neck); timm's samvit_* blocks
    get nn.LayerNorm (1e-5). Ours equal timm's SAM built with an explicit eps of 1e-6 and the same
    weights (random, and read back from a local checkpoint), and differ from timm's default build."""
    kwargs = dict(TINY_KWARGS["VisionTransformerSAM"])
    official = timm.create_model("samvit_base_patch16", pretrained=False, **kwargs,
                                 norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    timm_default = timm.create_model("samvit_base_patch16", pretrained=False, **kwargs).eval()
    vfm = tiny_backbone(vfm_cfg("sam_vitb"))
    torch.save(vfm.model.state_dict(), tmp_path / "sam.pth")
    local = create_vfm_model("samvit_base_patch16.sa1b", "local", checkpoint=str(tmp_path / "sam.pth"),
                             timm_kwargs=kwargs, fixed_input_size=True)
    for model in (vfm.model, local):
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    official.load_state_dict(vfm.model.state_dict())
    timm_default.load_state_dict(vfm.model.state_dict())
    x = rand(2, 3, 48, 80)
    resized = F.interpolate(x, size=(TINY_SAM_INPUT, TINY_SAM_INPUT), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ours, expected = vfm.features(x), official.forward_features(resized)
        from_local = VfmBackbone(local, input_size=TINY_SAM_INPUT, pos_resize="none").features(x)
        assert (ours - timm_default.forward_features(resized)).abs().max() > 1e-5  # the eps matters here
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_local, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- layers, q/k/v, norm
def run_capturing_block(vfm, block):
    """Run ``vfm.features`` on a window, capturing the block's input and output with hooks."""
    seen = {}
    pre = block.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    post = block.register_forward_hook(lambda m, args, out: seen.__setitem__("output", out))
    try:
        with torch.no_grad():
            out = vfm.features(rand(2, 3, 48, 64))
    finally:
        pre.remove()
        post.remove()
    return out, seen


def as_map(tokens, prefix, grid):
    """(B, prefix + H*W, C) or channels-last (B, H, W, C) -> (B, C, H, W)."""
    if tokens.dim() == 4:
        return tokens.permute(0, 3, 1, 2)
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)


@pytest.mark.parametrize("name,layer", [("dino_vits16", 0), ("dino_vits16", -1), ("dinov3_vits16", 0),
                                        ("radio_vitb16", 1), ("sam_vitb", -1)])
@pytest.mark.parametrize("feature", ["q", "k", "v"])
def test_qkv_equal_a_manual_projection_of_the_block_input(name, layer, feature):
    vfm = tiny_backbone(vfm_cfg(name), layer=layer, feature=feature)
    block = vfm.model.blocks[layer]
    out, seen = run_capturing_block(vfm, block)
    qkv = F.linear(block.norm1(seen["input"]), block.attn.qkv.weight, block.attn.qkv.bias)
    d = qkv.shape[-1] // 3
    i = "qkv".index(feature)
    expected = as_map(qkv[..., i * d:(i + 1) * d], vfm.num_prefix_tokens, out.shape[-2:])
    assert out.shape[1] == vfm.channels == d
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name,layer", [("dino_vits16", -1), ("dino_vits16", 0), ("sam_vitb", -1)])
def test_qk_is_the_sum_of_a_manual_query_and_key_projection(name, layer):
    vfm = tiny_backbone(vfm_cfg(name), layer=layer, feature="qk")
    block = vfm.model.blocks[layer]
    out, seen = run_capturing_block(vfm, block)
    x = block.norm1(seen["input"]).double()
    w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
    d = w.shape[0] // 3
    q = x @ w[:d].T + b[:d]
    k = x @ w[d:2 * d].T + b[d:2 * d]
    expected = as_map(q + k, vfm.num_prefix_tokens, out.shape[-2:]).float()
    assert out.shape[1] == vfm.channels == d
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vitb14_reg", "dinov3_vits16"])
@pytest.mark.parametrize("layer", [0, 1, -2])
@pytest.mark.parametrize("norm", [True, False])
def test_layer_tokens_equal_that_blocks_output(name, layer, norm):
    vfm = tiny_backbone(vfm_cfg(name), layer=layer, norm=norm)
    out, seen = run_capturing_block(vfm, vfm.model.blocks[layer])
    tokens = vfm.model.norm(seen["output"]) if norm else seen["output"]
    torch.testing.assert_close(out, as_map(tokens, vfm.num_prefix_tokens, out.shape[-2:]))
    if norm:  # the final norm really acts
        assert not torch.allclose(out, as_map(seen["output"], vfm.num_prefix_tokens, out.shape[-2:]))


def test_sam_tokens_without_norm_are_the_blocks_output_not_the_neck():
    vfm = tiny_backbone(vfm_cfg("sam_vitb"), norm=False)
    out, seen = run_capturing_block(vfm, vfm.model.blocks[-1])
    assert vfm.channels == SMALL_VIT["embed_dim"]
    torch.testing.assert_close(out, seen["output"].permute(0, 3, 1, 2))


def test_knobs_reach_the_backbone_from_the_config():
    seg = Segmenter.from_config(tiny_config("vfm.layer=0", "vfm.feature=k", "vfm.norm=false"))
    assert (seg.vfm.layer, seg.vfm.feature, seg.vfm.norm) == (0, "k", False)
    assert build_vfm(vfm_cfg("none"), "random", 0) is None


# ---------------------------------------------------------------- bad input
def test_layer_out_of_range_says_how_many_blocks():
    with pytest.raises(ValueError, match=r"vfm.layer=7 .* 2 feature layers \(blocks\).* -2\.\.1"):
        Segmenter.from_config(tiny_config("vfm.layer=7"))
    with pytest.raises(ValueError, match=r"vfm.layer=-3"):
        tiny_backbone(vfm_cfg("dino_vits16"), layer=-3)


def test_qkv_of_a_model_without_fused_qkv_is_a_clear_error():
    cfg = vfm_cfg("dinov3_vits16", "++vfm.timm_kwargs={qkv_fused: false}")
    with pytest.raises(ValueError, match="no fused qkv projection"):
        tiny_backbone(cfg, feature="q")
    assert tiny_backbone(cfg).feature == "tokens"  # its tokens still work


def test_qkv_of_a_windowed_block_is_a_clear_error():
    with pytest.raises(ValueError, match="within windows"):
        tiny_backbone(vfm_cfg("sam_vitb"), layer=0, feature="v")


def test_unknown_feature_and_unknown_timm_name():
    with pytest.raises(ValueError, match="vfm.feature must be one of"):
        tiny_backbone(vfm_cfg("dino_vits16"), feature="keys")
    with pytest.raises(ValueError, match=r"unknown timm model 'vit_nope_patch3' \(vfm.timm_name\)"):
        Segmenter.from_config(tiny_config("vfm.timm_name=vit_nope_patch3"))


def test_norm_on_hiera_is_a_clear_error():
    vfm = tiny_backbone(vfm_cfg("sam2_hiera_tiny"), norm=True)
    with pytest.raises(ValueError, match=r"vfm.norm=True.*set vfm.norm=false"):
        vfm.features(rand(1, 3, 64, 64))
