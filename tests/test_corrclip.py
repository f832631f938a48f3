"""CorrCLIP v1 (method=corrclip, proxyclip/zoo/corrclip.py): equal to the float64 reference of
tests/naive_corrclip.py on tiny models with a label map of several overlapping and nested masks,
each pitfall of the spec tested on its own (docs/regions.md, "CorrCLIP")."""

import json
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import naive
import naive_corrclip
from conftest import tiny_config
from proxyclip import Segmenter
from proxyclip.encoded import Encoded
from proxyclip.masks import label_map
from proxyclip.masks.regions import connected_components, majority_vote, merge_regions, nearest_labels
from proxyclip.methods import get_method
from proxyclip.zoo.corrclip import block_kv, mct_block, spatial_count

CLASSES = ["sky", "person; people", "horse"]
QUERIES = ["sky", "person", "people", "horse"]
H, W = 48, 64

# a 5-block tiny CLIP: the spatial branch (outputs of blocks L-2-n_s..L-3) needs more than two blocks
_DEEP = Path(tempfile.mkdtemp(prefix="corrclip-clip-")) / "ViT-T-16-test-corrclip5.json"
_DEEP.write_text(json.dumps({"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 5, "width": 64,
                                                             "head_width": 32, "patch_size": 16},
                             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                          "layers": 2}}))
open_clip.add_model_config(_DEEP)
# DINO-shaped tiny VFM with 8-px patches: its grid is twice CLIP's (labels and values change grids)
DEEP = ["clip.name=ViT-T-16-test-corrclip5", "++vfm.timm_kwargs.patch_size=8", "vfm.stride=8", "vfm.feature=qk",
        "method=corrclip"]


def stack() -> np.ndarray:
    """Boolean masks of the 48 x 64 image: a big one, a small one nested in it (painted over: the
    largest wins), two overlapping ones, a thin one; the rest is unsegmented."""
    m = np.zeros((5, H, W), bool)
    m[0, 0:30, 0:40] = True
    m[1, 5:15, 5:15] = True
    m[2, 20:48, 30:64] = True
    m[3, 35:48, 0:20] = True
    m[4, 0:10, 45:64] = True
    return m


def image(seed=3):
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))


def segmenter(tmp_path, *overrides, masks=None):
    np.savez(tmp_path / "img.npz", instance_mask=stack() if masks is None else masks)
    return Segmenter.from_config(tiny_config(*DEEP, "masks=file", f"masks.dir={tmp_path}", *overrides))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The deep tiny Segmenter (short side 40: the label map is resized; windows 32 / 16) and its encode."""
    seg = segmenter(tmp_path_factory.mktemp("masks"), "protocol.short_side=40", "protocol.crop=32",
                    "protocol.stride=16")
    return seg, seg.encode(image(), image_id="img")


def reference(seg, enc, **changes):
    knobs = naive.knobs_of("corrclip", **changes)
    ref = naive_corrclip.corrclip(seg, enc, QUERIES, knobs)
    return F.interpolate(ref[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]


def decode_args(**changes):
    k = naive.knobs_of("corrclip", **changes)
    return {n: k[n] for n in ("residual", "ffn", *get_method("corrclip").knob_names)}


# ---------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("changes", [{}, {"eps": 0.95, "spatial_blocks": 2},
                                     {"residual": True, "ffn": True, "alpha": 0.3, "beta": 2.0, "tau": 9.0},
                                     {"spatial_blocks": 0, "eps": 0.0}])
def test_scores_equal_the_float64_reference(deep, changes):
    seg, enc = deep
    assert enc.resized_size == (40, 53) and len(enc.windows) == 6
    assert tuple(enc.vfm_features.shape[-2:]) == (4, 4) and enc.clip_grid == (2, 2)
    pred = seg.decode(enc, CLASSES, **decode_args(**changes))
    torch.testing.assert_close(pred.scores.double(), reference(seg, enc, **changes), atol=2e-5, rtol=1e-4)


def test_padded_windows_equal_the_reference_and_the_padding_is_a_region(tmp_path):
    """A 40-px crop is padded to 48 (4 px a side); the padding's label is a region of its own."""
    seg = segmenter(tmp_path, "protocol.short_side=48", "protocol.crop=40", "protocol.stride=16")
    enc = seg.encode(image(), image_id="img")
    assert enc.pad == (4, 4, 4, 4)
    pred, cache = seg.run_with_cache(enc, CLASSES, names=["corrclip.regions"], **decode_args())
    torch.testing.assert_close(pred.scores.double(), reference(seg, enc), atol=2e-5, rtol=1e-4)
    # (n, 6, 6): nearest from the padded 48 px reads pixels 0, 8, ..., 40: row / column 0 are padding
    regions = cache["corrclip.regions"]
    for r in regions:
        border = torch.cat([r[0], r[:, 0]])
        assert (border == r.max()).all() and (r[1:, 1:] != r.max()).all()  # the largest label: padding


def test_merging_runs_per_window_after_cutting_and_without_label_0(tmp_path):
    """Masks 4 | 6 | 9 cover the top windows (no label 0 there), eps huge. Window (0:32, 16:48) holds
    4, 6 and 9: the smallest (4) is left out and is r0, 6 and 9 merge. Window (0:32, 0:32) holds 4
    and 6 only: two labels, nothing merges. Merging on the whole image first (label 0 left out)
    would have joined 4, 6 and 9 into one region everywhere."""
    lab = np.zeros((H, W), np.int64)
    lab[:, :40] = 4
    lab[:16, 24:40] = 6
    lab[:, 40:] = 9
    lab[40:, 56:] = 0  # label 0 only at the bottom-right corner
    seg = segmenter(tmp_path, "protocol.short_side=48", "protocol.crop=32", "protocol.stride=16", masks=lab)
    enc = seg.encode(image(), image_id="img")
    assert enc.resized_size == (H, W) and enc.windows[:2] == [(0, 32, 0, 32), (0, 32, 16, 48)]
    _, cache = seg.run_with_cache(enc, CLASSES, names=["corrclip.regions"], **decode_args(eps=10.0))
    regions = cache["corrclip.regions"]
    for w, want in ((0, {4: 0, 6: 1}), (1, {4: 0, 6: 1, 9: 1})):
        y1, y2, x1, x2 = enc.windows[w]
        cells = nearest_labels(torch.from_numpy(lab)[y1:y2, x1:x2], (4, 4))
        assert set(cells.unique().tolist()) == set(want)
        assert regions[w].tolist() == [[want[c] for c in row] for row in cells.tolist()]


def test_merge_regions_cases():
    f = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    two = torch.tensor([0, 0, 5, 5, 5, 0])
    assert merge_regions(two, f, 10.0).tolist() == [0, 0, 1, 1, 1, 0]  # two labels: never merged
    three = torch.tensor([0, 3, 5, 5, 3, 0])
    assert merge_regions(three, f, 10.0).tolist() == [0, 1, 1, 1, 1, 0]  # 0 left out, 3 and 5 joined
    assert merge_regions(three, f, -1.0).tolist() == [0, 1, 2, 2, 1, 0]  # eps < 0: nothing joins
    no_zero = torch.tensor([2, 3, 5, 5, 3, 2])
    assert merge_regions(no_zero, f, 10.0).tolist() == [0, 1, 1, 1, 1, 0]  # the smallest real mask is r0


def test_merge_regions_equals_the_reference_and_dbscan():
    g = torch.Generator().manual_seed(1)
    for trial in range(6):
        cells = torch.randint(0, 7, (40,), generator=g)
        f = F.normalize(torch.randn(40, 3, generator=g) + torch.tensor([1.0, 0.5, 0.0]), dim=-1)
        eps = [0.05, 0.1, 0.2, 0.4, 0.8, 1.5][trial]
        got = merge_regions(cells, f, eps)
        ref = naive_corrclip.merge(cells.tolist(), f.double(), eps)
        # the same partition in the same order (ids ascending in the merged labels)
        assert got.tolist() == torch.unique(torch.tensor(ref), return_inverse=True)[1].tolist()
    sklearn = pytest.importorskip("sklearn.cluster")
    x = F.normalize(torch.randn(12, 4, generator=g), dim=-1)
    c = x @ x.T
    d = (c.max() - c).clamp_min(0).numpy().astype(np.float64)
    for eps in (0.3, 0.7, 1.0):
        want = sklearn.DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit(d).labels_
        got = connected_components(torch.from_numpy(d <= eps))
        assert len(set(want)) == got.unique().numel()
        assert all((want[i] == want[j]) == (got[i] == got[j]) for i in range(12) for j in range(12))


def test_majority_vote_equals_a_loop_and_keeps_the_smallest_label():
    g = torch.Generator().manual_seed(2)
    for trial in range(5):
        masks = torch.randint(0 if trial % 2 else 1, 5, (9, 11), generator=g)  # odd trials: no label 0
        labels = torch.randint(0, 3, (9, 11), generator=g)
        assert torch.equal(majority_vote(labels, masks), naive_corrclip.vote(labels, masks))
    masks = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1]])
    labels = torch.tensor([[3, 1, 2, 1], [2, 1, 1, 2]])  # mask 1: two 1s, two 2s -> 1; mask 2: a tie -> 1
    assert majority_vote(labels, masks).tolist() == [[3, 1, 1, 1], [1, 1, 1, 1]]


def test_labels_are_the_vote_of_the_decision_after_prob_thd(deep):
    """Map correction after prob_thd: background wins some proposals; without it, the plain decision."""
    seg, enc = deep
    plain = seg.decode(enc, CLASSES, **decode_args(map_correction=False))
    thd = float(plain.best_prob.median())
    for correction in (True, False):
        pred = seg.decode(enc, CLASSES, prob_thd=thd, **decode_args(map_correction=correction))
        decided = naive_corrclip.decide(pred.scores, pred.query_to_class, 40.0, thd)
        want = naive_corrclip.vote(decided, enc.masks) if correction else decided
        assert torch.equal(pred.labels, want)
    # background (set by prob_thd) wins a proposal that had other classes before the vote
    corrected = seg.decode(enc, CLASSES, prob_thd=thd, **decode_args())
    assert any((corrected.labels[enc.masks == u] == 0).all() and not (pred.labels[enc.masks == u] == 0).all()
               for u in enc.masks.unique().tolist()[1:])
    assert (corrected.labels[enc.masks == 0] == pred.labels[enc.masks == 0]).all()  # label 0 is not voted


def test_overlapping_masks_the_largest_wins(deep):
    seg, enc = deep
    want = label_map(torch.from_numpy(stack()))
    assert torch.equal(enc.masks, want)
    assert not (enc.masks[5:15, 5:15] != enc.masks[0, 0]).any()  # the nested mask disappeared in the big one


def test_mask_class_tokens_at_decode_equal_the_masked_sequence_through_open_clip(deep):
    """[MCT_1..R, CLS, patches] through open_clip's own blocks with CorrCLIP's boolean attention
    mask: the CLS / patch stream is vanilla CLIP's (so the encode does not depend on the masks) and
    the tokens run at decode from the stored block inputs equal the MCT outputs."""
    seg, enc = deep
    clip = seg.clip
    x0 = enc.layers["clip.blocks.0.resid_pre"][:1]  # window 0, after ln_pre
    region = torch.tensor([0, 1, 1, 2])  # 3 regions on the 2x2 grid
    r, t = 3, x0.shape[1]
    mask = torch.ones(r + t, r + t, dtype=torch.bool)  # True = blocked
    mask[r:, r:] = False  # CLS and patches see CLS and patches only
    for j in range(r):
        mask[j, r] = False  # an MCT sees CLS
        mask[j, r + 1 + torch.nonzero(region == j).flatten()] = False  # and its region's patches
    # open_clip's block casts a mask to the tokens' dtype (an additive one): -inf where blocked
    bias = torch.zeros(r + t, r + t).masked_fill(mask, float("-inf"))
    seq = torch.cat([x0[:, :1].expand(1, r, -1), x0], dim=1)
    plain = x0
    with torch.no_grad():
        for block in clip.visual.transformer.resblocks:
            seq = block(seq, attn_mask=bias)
            plain = block(plain)
    torch.testing.assert_close(seq[:, r:], plain, atol=1e-5, rtol=1e-5)
    allowed = ~mask[:r, r:]
    m = x0[0, :1].expand(r, -1)
    with torch.no_grad():
        for i in range(clip.num_blocks):
            tokens = enc.layers[f"clip.blocks.{i}.resid_pre"][:1] if i < clip.num_blocks - 1 else enc.clip_tokens[:1]
            k, v = block_kv(clip.block(i), tokens)
            m = mct_block(clip.block(i), m, k[0], v[0], allowed)
    torch.testing.assert_close(m, seq[0, :r], atol=1e-5, rtol=1e-5)
    # the CLS / patch stream the encode stored is vanilla CLIP's
    torch.testing.assert_close(enc.clip_tokens[:1], _vanilla_until_last(clip, x0), atol=1e-5, rtol=1e-5)


def _vanilla_until_last(clip, x):
    with torch.no_grad():
        for block in clip.visual.transformer.resblocks[:-1]:
            x = block(x)
    return x


def test_parts_are_every_blocks_input_and_the_spatial_rule():
    meth = get_method("corrclip")
    assert meth.level == "image" and meth.needs_masks and meth.needs_vfm and meth.vfm_feature == "qk"
    from proxyclip.parts import method_parts

    assert method_parts(meth, naive.knobs_of("corrclip"), 12) == tuple(f"clip.blocks.{i}.resid_pre" for i in range(12))
    assert [spatial_count(-1, n) for n in (12, 24, 32, 5, 16)] == [5, 12, 28, 1, 12]
    assert spatial_count(3, 12) == 3


def test_a_stored_encode_decodes_as_a_direct_predict(deep, tmp_path):
    seg, enc = deep
    torch.save(enc.to_dict(), tmp_path / "enc.pt")
    back = Encoded.from_dict(torch.load(tmp_path / "enc.pt"))
    direct = seg.decode(seg.encode(image(), image_id="img"), CLASSES)
    again = seg.decode(back, CLASSES)
    assert torch.equal(again.labels, direct.labels)
    torch.testing.assert_close(again.scores, direct.scores)


# ---------------------------------------------------------------------------------------------- errors
def test_masks_none_is_a_clear_error(deep):
    with pytest.raises(ValueError, match="method corrclip reads mask proposals: set masks=file"):
        Segmenter.from_config(tiny_config(*DEEP))
    seg, enc = deep
    plain = Segmenter.from_config(tiny_config(*DEEP[:-1]))
    with pytest.raises(ValueError, match="corrclip reads mask proposals, but this Encoded has none"):
        plain.decode(plain.encode(image()), CLASSES, method="corrclip")
    with pytest.raises(ValueError, match="vfm.feature=qk"):
        Segmenter.from_config(tiny_config(*DEEP[:-2], "vfm.feature=k", "method=corrclip", "masks=file",
                                          "masks.dir=/tmp"))


@pytest.mark.parametrize("knob,value,match", [
    ("tau", 0.0, r"tau must be a number > 0"), ("eps", -0.1, r"eps must be a number >= 0"),
    ("alpha", -1.0, r"alpha must be a number >= 0"), ("spatial_blocks", -2, r"spatial_blocks must be an integer >= -1"),
    ("spatial_blocks", 4, r"spatial_blocks=4 gives n_s=4, but this CLIP has 5 blocks: n_s must be in 0\.\.3"),
    ("map_correction", "yes", r"map_correction must be true or false")])
def test_bad_knob_values_are_one_clear_error(deep, knob, value, match):
    seg, enc = deep
    with pytest.raises(ValueError, match=match):
        seg.decode(enc, CLASSES, **{knob: value})


def test_the_derived_rule_that_does_not_fit_the_clip_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"spatial_blocks=-1 \(-1: CorrCLIP's rule for this depth\) gives n_s=-2"):
        Segmenter.from_config(tiny_config("vfm.feature=qk", "method=corrclip", "masks=file", f"masks.dir={tmp_path}"))
