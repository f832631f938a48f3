"""Every VFM family's feature map: prefix tokens dropped, the documented grid, SAM's fixed input."""

import pytest
import torch

from conftest import tiny_config
from proxyclip import Segmenter

SMALL = "{embed_dim: 64, depth: 2, num_heads: 2}"
FAMILIES = {
    # name: (overrides, expected VFM grid for one 64x64 window (after padding), prefix tokens)
    "dino": (["vfm=dino_vits8", f"++vfm.timm_kwargs={SMALL}"], (8, 8), 1),
    "dinov2": (["vfm=dinov2_vitb14_reg", f"++vfm.timm_kwargs={SMALL}"], (8, 8), 5),  # padded to 112: 8x8 of 14
    "mae": (["vfm=mae_vitb16", f"++vfm.timm_kwargs={SMALL}"], (4, 4), 1),
    "sam": (["vfm=sam_vitb", "vfm.input_size=64",
             "++vfm.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2, global_attn_indexes: [1], window_size: 4, "
             "img_size: 64}"], (4, 4), 0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_feature_grid(family):
    overrides, grid, prefix = FAMILIES[family]
    seg = Segmenter.from_config(tiny_config(*overrides))
    assert seg.vfm.family == family and seg.vfm.num_prefix_tokens == prefix
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    enc = seg.encode(img)
    assert tuple(enc.vfm_features.shape[-2:]) == grid
    if family == "sam":
        assert enc.vfm_features.shape[1] == 256  # the neck's channels
        assert enc.pad == (0, 0, 0, 0)  # SAM sees a resized copy: only CLIP's patch size matters
    else:
        # the tokens we keep are exactly timm's patch tokens (prefix tokens dropped, row-major grid)
        x = (img[None] - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        t, b, l, r = enc.pad
        x = torch.nn.functional.pad(x, (l, r, t, b))
        with torch.no_grad():
            tokens = seg.vfm_model.forward_features(x)[:, prefix:]
        torch.testing.assert_close(enc.vfm_features.flatten(2).transpose(1, 2), tokens)
    if family == "dinov2":
        assert seg.pad_multiple == 112 and enc.pad == (24, 24, 24, 24)
    pred = seg.decode(enc, ["sky", "grass"])
    assert torch.isfinite(pred.scores).all()
