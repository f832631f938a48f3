"""Every conf/clip YAML names an open_clip (model, tag) that exists and a ViT that ClipBackbone accepts."""

import open_clip
import pytest
import torch

from proxyclip import compose_config
from proxyclip.backbones.clip import ClipBackbone
from proxyclip.config import CONF_DIR

CLIPS = sorted(p.stem for p in (CONF_DIR / "clip").glob("*.yaml"))


def on_meta(name, quick_gelu):
    """The full-size open_clip model on the meta device: its structure, no memory, no compute."""
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, load_weights=False, force_quick_gelu=quick_gelu,
                                      device="meta")


@pytest.mark.parametrize("choice", CLIPS)
def test_clip_config_is_a_known_open_clip_vit(choice):
    c = compose_config(overrides=[f"clip={choice}"]).clip
    assert c.name in open_clip.list_models()
    if c.pretrained != "none":  # test_tiny: random weights only
        assert c.pretrained in open_clip.list_pretrained_tags_by_model(c.name)
        # the tag's own record says whether it was trained with QuickGELU
        assert c.quick_gelu == open_clip.get_pretrained_cfg(c.name, c.pretrained).get("quick_gelu", False)
    model = on_meta(c.name, c.quick_gelu)
    clip = ClipBackbone(model, tokenizer=None)  # its checks: a ViT tower whose last block is nn.MultiheadAttention
    assert isinstance(model.visual.transformer.resblocks[-1].mlp.gelu, open_clip.transformer.QuickGELU) == c.quick_gelu
    assert clip.patch_size == open_clip.get_model_config(c.name)["vision_cfg"]["patch_size"]


def test_a_non_vit_clip_is_refused():
    with pytest.raises(TypeError, match="only ViT towers are supported"):
        ClipBackbone(on_meta("RN50", True), tokenizer=None)
