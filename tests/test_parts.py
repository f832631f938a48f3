"""Layer parts (proxyclip/parts.py): the encode keeps the tokens entering the blocks a method
declares, equal to what open_clip's own forward feeds those blocks; a decode lacking one says so."""

from dataclasses import replace

import pytest
import torch

from proxyclip import Segmenter
from proxyclip.evaluation.cache import FeatureCache
from proxyclip.last_block import BlockOutput
from proxyclip.methods import METHODS
from proxyclip.parts import check_parts, encoded_size, resid_pre

from conftest import tiny_config

CLASSES = ["cat", "dog", "sky"]


def _open_clip_block_inputs(seg, x):
    """Tokens entering every block, read by forward pre-hooks on open_clip's own full forward."""
    got = {}
    blocks = seg.clip.visual.transformer.resblocks
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a[0].detach().clone()))
               for i, b in enumerate(blocks)]
    try:
        seg.clip.visual(x)
    finally:
        for h in handles:
            h.remove()
    return got


def test_kept_parts_equal_open_clips_own_block_inputs(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image, keep=[resid_pre(0)])
    assert sorted(enc.layers) == [resid_pre(0)] and seg.encode(rand_image).layers == {}
    x = torch.rand(1, 3, *seg.clip.visual.image_size)  # open_clip runs its pretrained size only
    last, kept = seg.clip.encode_tokens(x, keep=[0])
    ref = _open_clip_block_inputs(seg, x)
    torch.testing.assert_close(kept[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(last, ref[seg.clip.num_blocks - 1], atol=1e-5, rtol=0)


def test_part_names_are_checked():
    assert check_parts([resid_pre(3), resid_pre(1), resid_pre(3), resid_pre(11)], 12) == (resid_pre(1), resid_pre(3))
    with pytest.raises(ValueError, match="block 12 is out of range.*0..11"):
        check_parts([resid_pre(12)], 12)
    with pytest.raises(ValueError, match="unknown encode part 'clip.blocks.x'"):
        check_parts(["clip.blocks.x"], 12)


@pytest.fixture
def reads_block_0(monkeypatch):
    """maskclip, for this test, returns the tokens entering block 0 as its block output."""
    monkeypatch.setitem(METHODS, "maskclip", replace(METHODS["maskclip"], parts=lambda: (resid_pre(0),),
                                                     attention=lambda x: BlockOutput(x.layer(0), x.grid, cls=True)))
    return "maskclip"


def test_a_decode_lacking_a_part_names_it_and_how_to_encode(tiny_segmenter, rand_image, reads_block_0):
    seg = tiny_segmenter
    with pytest.raises(ValueError, match=r"reads the encode part clip.blocks.0.resid_pre.*keep=\['clip.blocks.0"):
        seg.decode(seg.encode(rand_image), CLASSES, method=reads_block_0)
    pred = seg.decode(seg.encode(rand_image, keep=[resid_pre(0)]), CLASSES, method=reads_block_0)
    assert pred.labels.shape == rand_image.shape[1:]


def test_the_configured_methods_parts_are_kept_and_reused(rand_image, reads_block_0, tmp_path):
    seg = Segmenter.from_config(tiny_config(f"method={reads_block_0}"))
    assert seg.encode_spec.parts == (resid_pre(0),)
    enc = seg.encode(rand_image)
    assert sorted(enc.layers) == [resid_pre(0)]
    calls = []
    real = seg.clip.encode_tokens
    seg.clip.encode_tokens = lambda x, keep=(): calls.append(1) or real(x, keep)
    try:
        again = seg.encode(rand_image, reuse=enc)
    finally:
        del seg.clip.encode_tokens
    assert calls == [] and again.layers[resid_pre(0)] is enc.layers[resid_pre(0)]
    back = type(enc).from_dict(enc.to_dict())
    assert torch.equal(back.layers[resid_pre(0)], enc.layers[resid_pre(0)])
    size = encoded_size(enc)
    n = len(enc.windows)
    assert size[resid_pre(0)] == pytest.approx(enc.layers[resid_pre(0)].numel() * 4 / n / 1e6)


def test_the_feature_cache_keeps_the_parts_it_is_asked_for(tiny_segmenter, tmp_path):
    from PIL import Image

    seg = tiny_segmenter
    p = tmp_path / "im.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(p)
    cache = FeatureCache(tmp_path / "c", seg, print_fn=lambda s: None)
    plain = cache.get_or_encode(p, lambda reuse: seg.encode(str(p), reuse=reuse))
    assert plain.layers == {} and cache.misses == 1
    need = [resid_pre(0)]
    enc = cache.get_or_encode(p, lambda reuse: seg.encode(str(p), reuse=reuse, keep=need), need=need)
    assert cache.misses == 2 and resid_pre(0) in enc.layers  # the cached CLIP part lacked the layer
    hit = cache.get_or_encode(p, lambda reuse: pytest.fail("encoded again"), need=need)
    assert cache.hits == 1 and torch.equal(hit.layers[resid_pre(0)], enc.layers[resid_pre(0)])


def test_the_cache_prints_the_size_of_an_encoded_per_window(tiny_segmenter, tmp_path):
    from PIL import Image

    seg = tiny_segmenter
    p = tmp_path / "im.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(p)
    said = []
    cache = FeatureCache(tmp_path / "c", seg, print_fn=said.append)
    enc = cache.get_or_encode(p, lambda reuse: seg.encode(str(p), reuse=reuse, keep=[resid_pre(0)]),
                              remaining=3, need=[resid_pre(0)])
    n, t, d = enc.clip_tokens.shape  # by hand: float32 tokens, per window, in MB
    clip_mb = t * d * 4 / 1e6
    vfm_mb = enc.vfm_features[0].numel() * 4 / 1e6
    total = 2 * clip_mb + vfm_mb  # the last block's input, one layer part of the same shape, the VFM's features
    assert len(said) == 1 and said[0].endswith(
        f"an Encoded is {total:.2f} MB a window (clip.last_block_input {clip_mb:.2f}, 1 layer part {clip_mb:.2f}, "
        f"vfm.features {vfm_mb:.2f})")
