"""GEM (proxyclip/zoo/gem.py, docs/methods.md): the path against the float64 reference
(tests/naive_gem.py) on random tokens, the tiny CLIP and ViT-B/16 (random weights, one 224 window),
and each pitfall: depth 7 = the last six blocks, q / k / v from the original path (not from the GEM
path), the adaptive temperature by hand, the min-max option, a depth out of range."""

import pytest
import torch

import naive
import naive_gem as ng
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.last_block import BlockInputs
from proxyclip.methods import METHODS
from proxyclip.parts import method_parts, resid_pre
from proxyclip.zoo import gem

CLASSES = ["sky", "person; people", "horse"]
DEFAULTS = naive.knobs_of("gem")


def test_defaults_and_depth_7_is_the_last_six_blocks():
    assert (DEFAULTS["depth"], DEFAULTS["iterations"], DEFAULTS["temp"], DEFAULTS["normalize"]) == (7, 1, 0.0, False)
    assert ng.path_blocks(12, 7) == [6, 7, 8, 9, 10, 11]  # resblocks[-1] .. resblocks[-6]
    # the path reads the tokens entering blocks 6..11 (11: the last block's input, always kept)
    assert method_parts(METHODS["gem"], DEFAULTS, 12) == tuple(resid_pre(i) for i in range(6, 12))
    assert gem.check_depth(7, 12) == 6 and gem.check_depth(2, 12) == 11 and gem.check_depth(13, 12) == 0


@pytest.mark.parametrize("knobs", [{}, {"iterations": 0}, {"iterations": 3}, {"temp": 2.5}])
def test_random_tokens_equal_the_reference(tiny_segmenter, knobs):
    """Tiny CLIP (2 blocks), depth 3 = both blocks; the tokens entering block 0 and block 1 random."""
    g = torch.Generator().manual_seed(4)
    first, last = torch.randn(2, 2, 13, 64, generator=g)
    x = BlockInputs(tiny_segmenter.clip, last, (3, 4), None, {}, (0, 2), lambda n, t: t,
                    layers={resid_pre(0): first})
    k = naive.tiny_knobs("gem", **knobs)
    out = gem.gem_block(x, **{n: k[n] for n in METHODS["gem"].knob_names})
    assert out.cls is True and tuple(out.grid) == (3, 4) and out.tokens.shape == (2, 13, 64)
    for i in range(2):
        ref, _, _ = ng.reference(tiny_segmenter.clip_model, {0: first[i], 1: last[i]}, (3, 4), k)
        torch.testing.assert_close(out.tokens[i].double(), ref, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vitb():
    """ViT-B/16 with random weights, one 224 window; every block's input kept; the reference's G.
    Random weights leave every ln_1 at weight 1, bias 0, where |ln_1(X)_t| = sqrt(D) for every token
    and the adaptive temperature is a constant: the ln_1 affines are randomized first."""
    seg = Segmenter.from_config(tiny_config("clip=vit_b16", "weights=random", "method=gem",
                                            "protocol.short_side=224", "protocol.crop=224", "protocol.stride=224"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for block in seg.clip_model.visual.transformer.resblocks:
            block.ln_1.weight.copy_(1 + 0.5 * torch.randn(768, generator=g))
            block.ln_1.bias.copy_(0.2 * torch.randn(768, generator=g))
    img = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(2))
    plain = seg.encode(img)
    enc = seg.encode(img, keep=[resid_pre(i) for i in range(0, 12)])
    layers = {**naive.window_layers(enc, 0), 11: enc.clip_tokens[0]}
    g, _, _ = ng.reference(seg.clip_model, layers, (14, 14), DEFAULTS)
    return seg, plain, enc, layers, g


def _path_output(seg, enc, names=("clip.last_block_output",), **knobs):
    _, cache = seg.run_with_cache(enc, CLASSES, names=list(names), **knobs)
    return cache


def test_vit_b16_equals_the_reference(vitb):
    seg, plain, enc, layers, g = vitb
    assert sorted(plain.layers) == sorted(resid_pre(i) for i in range(6, 11))
    cache = _path_output(seg, plain, names=("clip.last_block_output", "clip.dense", "gem.temperature"))
    torch.testing.assert_close(cache["clip.last_block_output"][0].double(), g, atol=1e-4, rtol=1e-5)
    assert cache["clip.dense"].shape == (1, 512, 14, 14)
    ref = naive.dense(seg.clip_model, plain.clip_tokens[0], (14, 14), None, "gem", DEFAULTS, {"layers": layers})
    torch.testing.assert_close(cache["clip.dense"][0].double(), ref, atol=2e-5, rtol=1e-5)
    # the adaptive temperature of each of the six blocks, by hand: mean_t |ln_1(X_l)_t| / sqrt(64)
    blocks = seg.clip_model.visual.transformer.resblocks
    with torch.no_grad():
        by_hand = [sum(float(r.double().norm()) for r in blocks[i].ln_1(layers[i])) / 197 / 8 for i in range(6, 12)]
    assert cache["gem.temperature"].shape == (1, 6)
    torch.testing.assert_close(cache["gem.temperature"][0].double(), torch.tensor(by_hand, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert max(by_hand) - min(by_hand) > 1e-2  # one per block, not a constant


def test_depth_7_is_six_blocks_not_seven(vitb):
    seg, plain, enc, layers, g = vitb
    seven, _, _ = ng.reference(seg.clip_model, layers, (14, 14), {**DEFAULTS, "depth": 8})
    five, _, _ = ng.reference(seg.clip_model, layers, (14, 14), {**DEFAULTS, "depth": 6})
    assert (seven - g).abs().max() > 1e-1 and (five - g).abs().max() > 1e-1
    torch.testing.assert_close(_path_output(seg, enc, depth=8)["clip.last_block_output"][0].double(), seven,
                               atol=1e-4, rtol=1e-5)


def test_qkv_come_from_the_original_path(vitb):
    seg, plain, enc, layers, g = vitb
    wrong, _, _ = ng.reference(seg.clip_model, layers, (14, 14), DEFAULTS, qkv_from_path=True)
    assert (wrong - g).abs().max() > 1e-1
    torch.testing.assert_close(_path_output(seg, enc)["clip.last_block_output"][0].double(), g, atol=1e-4, rtol=1e-5)


def test_a_fixed_temperature_replaces_the_adaptive_one(vitb):
    seg, plain, enc, layers, g = vitb
    ref, _, _ = ng.reference(seg.clip_model, layers, (14, 14), {**DEFAULTS, "temp": 3.0})
    cache = _path_output(seg, enc, names=("clip.last_block_output", "gem.temperature"), temp=3.0)
    torch.testing.assert_close(cache["clip.last_block_output"][0].double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(cache["gem.temperature"], torch.full((1, 6), 3.0)) and (ref - g).abs().max() > 1e-2


def test_min_max_normalization(vitb):
    """normalize=true: each query's window map scaled to [0, 1] (GEM's default); the image scores
    equal the reference's from the min-maxed window maps."""
    seg, plain, enc, layers, g = vitb
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[-1.0, -1.0], [0.0, 1.0]]])[None]
    torch.testing.assert_close(gem.min_max(maps)[0], torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0, 0], [0.5, 1.0]]]))
    classes = ["sky", "horse"]  # two queries: the reference's text embeddings are slow on ViT-B
    pred = seg.decode(plain, classes, normalize=True)
    assert len(plain.windows) == 1 and tuple(plain.image_size) == (224, 224)  # one window: no merge, no resize
    text = naive.text_embeddings(seg.clip_model, seg.clip.tokenizer, pred.queries)
    dense = naive.dense(seg.clip_model, plain.clip_tokens[0], (14, 14), None, "gem", DEFAULTS, {"layers": layers})
    ref = naive.window_scores(dense, text, plain.windows[0], plain.pad,
                              lambda m: ng.window_scores(m, {"normalize": True}))
    torch.testing.assert_close(pred.scores.double(), ref, atol=2e-5, rtol=1e-5)
    assert float(pred.scores.min()) >= -1e-6 and float(pred.scores.max()) <= 1 + 1e-6
    assert not torch.allclose(pred.scores, seg.decode(plain, classes).scores, atol=1e-2)
    with pytest.raises(ValueError, match="normalize=true makes min-max normalized window scores"):
        seg.dense_embeddings(plain, 0, 1, seg.decode_spec(normalize=True))


def test_a_depth_out_of_range_is_one_clear_error(vitb):
    seg, enc = vitb[0], vitb[2]
    with pytest.raises(ValueError, match=r"^depth=14: GEM runs over the last depth-1 blocks and this CLIP has 12 "
                                         r"\(blocks 0..11\): depth must be in 2..13 \(7 = the last six\)$"):
        seg.decode(enc, CLASSES, depth=14)
    with pytest.raises(ValueError, match=r"^depth=7: .* this CLIP has 2 .*depth must be in 2..3"):
        Segmenter.from_config(tiny_config("method=gem"))  # the default needs six blocks; the tiny CLIP has two
    with pytest.raises(ValueError, match=r"^depth must be an integer >= 2, got 1"):
        seg.decode(enc, CLASSES, depth=1)
