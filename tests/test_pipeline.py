"""The Segmenter end to end on tiny random models: hooks, encode/decode, the method's steps."""

import math

import pytest
import torch
import torch.nn.functional as F

import naive
from conftest import tiny_config
from proxyclip import HOOK_NAMES, Encoded, Segmenter
from proxyclip.hooks import family_of
from proxyclip.methods import METHODS
from proxyclip.text import TEMPLATES

CLASSES = ["sky", "person; people", "horse"]
# methods of proxyclip/zoo, whose hook points are named after them
ZOO = {name for name, m in METHODS.items() if m.attention.__module__.startswith("proxyclip.zoo.")}


def test_hook_names_and_shapes(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    pred, cache = seg.run_with_cache(rand_image, CLASSES)
    # the 2025 methods' own points fire only in their decodes (tests/test_hooks.py: every point fires in some
    # run); proposals need a mask stage (tests/test_masks.py)
    others = {n for n in HOOK_NAMES if n.split(".")[0] in ZOO}
    assert ZOO >= {"resclip", "scclip", "gem", "cass", "lposs", "lposs_plus"}
    assert others and {family_of(n) for n in cache} == set(HOOK_NAMES) - {"masks.proposals"} - others
    assert set(HOOK_NAMES) == set(seg.hook_names)
    # 80x112 -> short side 64: 64x90 -> windows of 64, stride 32: 1 row x ((90-64+31)//32+1 = 2) columns
    enc = seg.encode(rand_image)
    assert enc.resized_size == (64, 90) and enc.windows == [(0, 64, 0, 64), (0, 64, 26, 90)]
    d, e, c = 64, 64, 64  # tiny CLIP width, embed dim; tiny VFM width
    shapes = {
        "vfm.features": (2, c, 4, 4),
        "clip.last_block_input": (2, 1 + 16, d),
        "clip.values": (2, d, 4, 4),
        "proxy.affinity": (2, 16, 16),
        "proxy.affinity_normalized": (2, 16, 16),
        "proxy.mask": (2, 16, 16),
        "proxy.attention": (2, 16, 16),
        "attention.pattern": (2, 1, 16, 16),
        "clip.last_block_output": (2, 16, d),
        "clip.dense": (2, e, 4, 4),
        "text.embeddings": (4, e),
        "scores.window": (2, 4, 64, 64),
        "scores.image": (4, 80, 112),
        "scores.refined": (4, 80, 112),
    }
    # the hand-worked shapes of the points this run fires (a newly declared point: tests/test_hooks.py)
    assert set(shapes) <= set(cache) and {k: tuple(cache[k].shape) for k in shapes} == shapes
    assert cache["proxy.mask"].dtype == torch.bool
    torch.testing.assert_close(cache["proxy.attention"].sum(-1), torch.ones(2, 16))
    torch.testing.assert_close(cache["scores.image"], pred.scores)
    assert torch.equal(cache["attention.pattern"][:, 0], cache["proxy.attention"])
    assert pred.scores.shape == (4, 80, 112) and pred.probs.shape == (3, 80, 112) and pred.labels.shape == (80, 112)
    assert pred.labels.dtype == torch.int64


def test_cache_subset_and_unknown_name(tiny_segmenter, rand_image):
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names=["proxy.attention"])
    assert list(cache) == ["proxy.attention"]
    with pytest.raises(KeyError, match="proxy.atention"):
        tiny_segmenter.run_with_cache(rand_image, CLASSES, names=["proxy.atention"])


def test_identity_attention_gives_projected_values(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    identity = lambda attn, hook: torch.eye(attn.shape[-1]).expand_as(attn)  # noqa: E731
    with seg.hooks.active(hooks={"proxy.attention": identity}):
        _, cache = seg.run_with_cache(rand_image, CLASSES, names=["clip.values", "clip.dense", "vfm.features"])
    values = cache["clip.values"]  # (n, D, gh, gw)
    grid = tuple(cache["vfm.features"].shape[-2:])
    resized = F.interpolate(values, size=grid, mode="bilinear", align_corners=False)
    tokens = resized.flatten(2).transpose(1, 2)  # (n, N, D)
    visual = seg.clip_model.visual
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        direct = visual.ln_post(block.attn.out_proj(tokens)) @ visual.proj
    direct = F.normalize(direct, dim=-1).transpose(1, 2).reshape(cache["clip.dense"].shape)
    torch.testing.assert_close(cache["clip.dense"], direct, atol=1e-5, rtol=1e-5)


def test_values_and_tokens_match_open_clip(tiny_segmenter):
    """Our blocks 1..L-1 and value projection agree with open_clip's own forward and torch's attention."""
    seg = tiny_segmenter
    visual = seg.clip_model.visual
    x = torch.rand(2, 3, 224, 224)  # the pretrained grid: no position-embedding resize
    captured = {}
    handle = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            visual(x)
    finally:
        handle.remove()
    with torch.no_grad():
        tokens = seg.clip.tokens_before_last_block(x)
        values = seg.clip.last_block_values(tokens, (14, 14))
    torch.testing.assert_close(tokens, captured["x"])
    # torch's MultiheadAttention with each token attending only to itself returns out_proj(v)
    block = visual.transformer.resblocks[-1]
    n = tokens.shape[1]
    only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0)
    with torch.no_grad():
        h = block.ln_1(tokens)
        mha = block.attn(h, h, h, need_weights=False, attn_mask=only_self)[0][:, 1:]
        ours = block.attn.out_proj(values.flatten(2).transpose(1, 2))
    torch.testing.assert_close(ours, mha, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def clip224():
    """method=clip at open_clip's native 224 grid: one window is exactly open_clip's own forward."""
    return Segmenter.from_config(tiny_config("method=clip", "protocol.short_side=224", "protocol.crop=224",
                                             "protocol.stride=224"))


@pytest.mark.parametrize("method", ["clip", "maskclip"])
def test_encode_then_decode_equals_predict(clip224, method):
    """predict = decode(encode) = open_clip's own forward on each window, cosines with the template
    ensembles, upsampled, merged by hand (sum / count), then the class decision by hand."""
    seg = clip224
    img = torch.rand(3, 224, 300, generator=torch.Generator().manual_seed(5))
    a = seg.predict(img, CLASSES, method=method)
    enc = seg.encode(img)
    b = seg.decode(enc, CLASSES, method=method)
    # short side already 224: no resize; (300 - 224 + 223) // 224 + 1 = 2 windows, the last shifted inward
    assert enc.resized_size == (224, 300) and enc.windows == [(0, 224, 0, 224), (0, 224, 76, 300)]
    text = naive.text_embeddings(seg.clip_model, seg.clip.tokenizer, ["sky", "person", "people", "horse"])
    per = []
    for (y1, y2, x1, x2) in enc.windows:
        cos = torch.einsum("ehw,qe->qhw", naive.open_clip_dense(seg, img[:, y1:y2, x1:x2], method), text)
        per.append(F.interpolate(cos[None], size=(224, 224), mode="bilinear", align_corners=False)[0])
    expected = torch.zeros(4, 224, 300, dtype=torch.float64)
    expected[:, :, :76] = per[0][:, :, :76]
    expected[:, :, 76:224] = (per[0][:, :, 76:] + per[1][:, :, :148]) / 2
    expected[:, :, 224:] = per[1][:, :, 148:]
    for pred in (a, b):
        torch.testing.assert_close(pred.scores.double(), expected, atol=1e-5, rtol=1e-5)
    q = torch.softmax(40.0 * expected, dim=0)  # clip's logit scale; queries sky, person, people, horse
    probs = torch.stack([q[0], torch.maximum(q[1], q[2]), q[3]])
    torch.testing.assert_close(a.probs.double(), probs, atol=1e-4, rtol=1e-4)
    sure = probs.topk(2, dim=0).values.diff(dim=0).abs()[0] > 1e-4  # pixels without a near tie
    assert torch.equal(a.labels[sure], probs.argmax(0)[sure]) and torch.equal(a.labels, b.labels)


def test_decode_params_change_only_decode(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    tokens, feats = enc.clip_tokens.clone(), enc.vfm_features.clone()
    queries = ["sky", "person", "people", "horse"]
    for beta, gamma in ((1.0, 2.0), (1.4, 5.0)):
        pred = seg.decode(enc, CLASSES, beta=beta, gamma=gamma)
        assert (pred.params["beta"], pred.params["gamma"]) == (beta, gamma)
        expected = naive.scores(seg, enc, queries, "proxyclip", naive.knobs_of("proxyclip", beta=beta, gamma=gamma))
        torch.testing.assert_close(pred.scores.double(), expected, atol=1e-5, rtol=1e-5)
    # the Encoded is what encode made, untouched by the decodes
    assert torch.equal(enc.clip_tokens, tokens) and torch.equal(enc.vfm_features, feats)
    assert seg.decode(enc, CLASSES).params["beta"] == seg.cfg.method.beta  # defaults from conf/


def test_encoded_roundtrip(tiny_segmenter, rand_image, tmp_path):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    torch.save(enc.to_dict(), tmp_path / "enc.pt")
    back = Encoded.from_dict(torch.load(tmp_path / "enc.pt"))
    torch.testing.assert_close(seg.decode(back, CLASSES).scores, seg.decode(enc, CLASSES).scores)


def test_probabilities_and_labels_follow_the_spec(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    pred = seg.predict(rand_image, CLASSES, logit_scale=40.0)
    q = torch.softmax(40.0 * pred.scores, dim=0)  # queries: sky, person, people, horse
    expected = torch.stack([q[0], torch.maximum(q[1], q[2]), q[3]])
    torch.testing.assert_close(pred.probs, expected)
    assert torch.equal(pred.labels, expected.argmax(0))
    # threshold: pixels whose best probability is below prob_thd become class 0
    thd = float(expected.max(0).values.median())
    low = seg.predict(rand_image, CLASSES, logit_scale=40.0, prob_thd=thd)
    below = expected.max(0).values < thd
    assert below.any() and (low.labels[below] == 0).all()
    assert torch.equal(low.labels[~below], pred.labels[~below])


def test_text_embeddings_are_the_normalized_template_mean(tiny_segmenter):
    seg = tiny_segmenter
    model, tok = seg.clip_model, seg.clip.tokenizer
    with torch.no_grad():
        per_prompt = F.normalize(model.encode_text(tok([t("horse") for t in TEMPLATES])), dim=-1)
    expected = F.normalize(per_prompt.mean(0), dim=-1)
    assert len(TEMPLATES) == 80
    torch.testing.assert_close(seg.text_embeddings(["horse"])[0], expected, atol=1e-5, rtol=1e-5)
    # a second call encodes only the names it has not seen: "horse" comes from the cache
    encoded = []
    encode = seg.text._encode_prompts
    seg.text._encode_prompts = lambda prompts: encoded.append(list(prompts)) or encode(prompts)
    try:
        again = seg.text_embeddings(["horse", "a zebra never seen before"])
    finally:
        del seg.text._encode_prompts
    assert encoded == [[t("a zebra never seen before") for t in TEMPLATES]]
    assert torch.equal(again[0], seg.text_embeddings(["horse"])[0])


def test_window_scores_are_cosines_of_dense_and_text(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    _, cache = seg.run_with_cache(rand_image, CLASSES, names=["clip.dense", "text.embeddings", "scores.window"])
    raw = torch.einsum("nehw,qe->nqhw", cache["clip.dense"], cache["text.embeddings"])
    up = F.interpolate(raw, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cache["scores.window"], up, atol=1e-5, rtol=1e-5)
    assert cache["clip.dense"].norm(dim=1).sub(1).abs().max() < 1e-5


def test_replacing_affinity_changes_attention(tiny_segmenter, rand_image):
    """A researcher's substitute affinity flows through normalize -> mask -> softmax."""
    seg = tiny_segmenter
    block = lambda s, hook: torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).expand_as(s)  # noqa: E731
    with seg.hooks.active(hooks={"proxy.affinity": block}):
        _, cache = seg.run_with_cache(rand_image, CLASSES, names=["proxy.attention"], beta=1.0, gamma=3.0)
    attn = cache["proxy.attention"]
    # mean = 0.5, S' = (S - 0.5) * 3: kept exactly inside the blocks, uniform there
    expected = torch.block_diag(torch.full((8, 8), 1 / 8), torch.full((8, 8), 1 / 8))
    torch.testing.assert_close(attn, expected.expand_as(attn))


def test_hook_returning_wrong_shape_is_an_error(tiny_segmenter, rand_image):
    with pytest.raises(ValueError, match="proxy.attention.*shape"):
        tiny_segmenter.run_with_hooks(rand_image, CLASSES, hooks={"proxy.attention": lambda t, h: t[:, :2]})


def test_no_vfm_baseline_uses_clip_grid(tiny_segmenter_novfm, rand_image):
    # method=maskclip with residual and FFN off: each patch keeps its own value (the v-only baseline)
    assert tiny_segmenter_novfm.vfm is None
    pred, cache = tiny_segmenter_novfm.run_with_cache(rand_image, CLASSES)
    assert not any(k.startswith("proxy.") or k == "vfm.features" for k in cache)
    assert tuple(cache["clip.dense"].shape[-2:]) == (4, 4)
    visual = tiny_segmenter_novfm.clip_model.visual
    tokens = cache["clip.values"].flatten(2).transpose(1, 2)
    with torch.no_grad():
        direct = F.normalize(visual.ln_post(visual.transformer.resblocks[-1].attn.out_proj(tokens)) @ visual.proj, dim=-1)
    torch.testing.assert_close(cache["clip.dense"], direct.transpose(1, 2).reshape(cache["clip.dense"].shape),
                               atol=1e-5, rtol=1e-5)
    assert not torch.isnan(pred.scores).any()


def test_random_weights_are_deterministic(rand_image):
    a = Segmenter.from_config(tiny_config()).predict(rand_image, CLASSES)
    b = Segmenter.from_config(tiny_config()).predict(rand_image, CLASSES)
    c = Segmenter.from_config(tiny_config("weights.seed=1")).predict(rand_image, CLASSES)
    assert torch.equal(a.scores, b.scores)
    assert not torch.allclose(a.scores, c.scores)
    assert a.random_weights


@pytest.mark.parametrize("size", [(80, 112), (112, 80), (20, 30), (37, 101)])
def test_any_image_size_works(tiny_segmenter, size):
    img = torch.rand(3, *size, generator=torch.Generator().manual_seed(4))
    enc = tiny_segmenter.encode(img)
    pred = tiny_segmenter.decode(enc, CLASSES)
    assert pred.scores.shape == (4, *size) and torch.isfinite(pred.scores).all()
    expected = naive.scores(tiny_segmenter, enc, ["sky", "person", "people", "horse"], "proxyclip",
                            naive.knobs_of("proxyclip"))
    torch.testing.assert_close(pred.scores.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("short,size,pad", [(70, (70, 98), (5, 5, 7, 7)), (69, (69, 97), (5, 6, 7, 8))])
def test_odd_windows_are_padded_and_cut(rand_image, short, size, pad):
    # a crop larger than the image: one window of the resized image, padded to 80x112 (multiple of 16);
    # at short side 69 one pixel more at the bottom and the right than at the top and the left
    seg = Segmenter.from_config(tiny_config(f"protocol.short_side={short}", "protocol.crop=128",
                                            "protocol.stride=64"))
    enc = seg.encode(rand_image)
    assert enc.windows == [(0, size[0], 0, size[1])] and enc.pad == pad
    assert enc.clip_grid == (5, 7) and enc.clip_tokens.shape[1] == 1 + 5 * 7
    pred, cache = seg.run_with_cache(enc, CLASSES, names=["scores.window", "clip.dense", "text.embeddings"])
    assert cache["scores.window"].shape == (1, 4, *size)
    # by hand: the padded window's cosines upsampled to 80x112, the padding's rows and columns cut off
    cos = torch.einsum("nehw,qe->nqhw", cache["clip.dense"], cache["text.embeddings"])
    assert cos.shape[-2:] == (5, 7)  # the VFM grid of the padded 80x112 window
    padded = F.interpolate(cos, size=(80, 112), mode="bilinear", align_corners=False)
    cut = padded[:, :, pad[0]:80 - pad[1], pad[2]:112 - pad[3]]
    torch.testing.assert_close(cache["scores.window"], cut, atol=1e-6, rtol=1e-6)
    # one window: the merge is that window; then back from the resized size to the image's 80x112
    back = F.interpolate(cut, size=(80, 112), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred.scores, back, atol=1e-6, rtol=1e-6)
    # and the whole decode against the float64 reference (which pads and cuts the same way)
    expected = naive.scores(seg, enc, ["sky", "person", "people", "horse"], "proxyclip", naive.knobs_of("proxyclip"))
    torch.testing.assert_close(pred.scores.double(), expected, atol=1e-5, rtol=1e-5)
    # the padding is the mean colour: the resized image framed by CLIP's mean colour, then normalized
    resized = F.interpolate(rand_image[None], size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    framed = torch.tensor(naive.CLIP_MEAN)[None, :, None, None].expand(1, 3, 80, 112).clone()
    framed[:, :, pad[0]:80 - pad[1], pad[2]:112 - pad[3]] = resized
    x = (framed - torch.tensor(naive.CLIP_MEAN)[:, None, None]) / torch.tensor(naive.CLIP_STD)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(enc.clip_tokens, seg.clip.tokens_before_last_block(x), atol=1e-5, rtol=1e-5)


def test_constant_image_has_no_nan(tiny_segmenter):
    enc = tiny_segmenter.encode(torch.full((3, 64, 64), 0.5))
    pred, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["proxy.attention"])
    assert torch.isfinite(pred.scores).all() and torch.isfinite(cache["proxy.attention"]).all()
    ref = torch.stack([naive.proxy_attention(f, 1.2, 3.0) for f in enc.vfm_features])
    torch.testing.assert_close(cache["proxy.attention"].double(), ref, atol=1e-6, rtol=1e-5)
    expected = naive.scores(tiny_segmenter, enc, ["sky", "person", "people", "horse"], "proxyclip",
                            naive.knobs_of("proxyclip"))
    torch.testing.assert_close(pred.scores.double(), expected, atol=1e-5, rtol=1e-5)


def test_decode_rejects_foreign_encoded(tiny_segmenter, tiny_segmenter_novfm, rand_image):
    enc = tiny_segmenter_novfm.encode(rand_image)  # CLIP only: its method needs no VFM
    with pytest.raises(ValueError, match="needs VFM features"):
        tiny_segmenter.decode(enc, CLASSES)
    tiny_segmenter.decode(enc, CLASSES, method="sclip")  # the CLIP part is the same: fine for CLIP-only methods
    other = Segmenter.from_config(tiny_config("weights.seed=3"))
    with pytest.raises(ValueError, match="another CLIP configuration"):
        other.decode(tiny_segmenter.encode(rand_image), CLASSES)


@pytest.mark.parametrize("kwargs,field", [(dict(gamma=float("nan")), "gamma"), (dict(beta=float("inf")), "beta"),
                                          (dict(logit_scale=-1.0), "logit_scale")])
def test_bad_hyperparameters_in_decode(tiny_segmenter, rand_image, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_segmenter.predict(rand_image, CLASSES, **kwargs)


def test_batch_size_does_not_change_results(rand_image):
    a = Segmenter.from_config(tiny_config("batch_size=1")).predict(rand_image, CLASSES)
    b = Segmenter.from_config(tiny_config("batch_size=3")).predict(rand_image, CLASSES)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_position_embeddings_resized_bicubic(tiny_segmenter):
    """The ``size`` rule (every rule, the default scale_plus_0.1 included: tests/test_pos_embed.py)."""
    clip = tiny_segmenter.clip
    pos = clip.visual.positional_embedding
    same = clip.positional_embedding((14, 14))
    assert torch.equal(same, pos)
    small = clip.positional_embedding((4, 6), "size")
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(small[1:], expected.permute(0, 2, 3, 1).reshape(24, -1))
    torch.testing.assert_close(small[0], pos[0])
    assert math.isclose(float(small.shape[0]), 25.0)


def test_encode_time_hooks_replay_on_a_stored_encoded(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    names = ["vfm.features", "clip.values", "clip.last_block_input"]
    fresh, fresh_cache = seg.run_with_cache(rand_image, CLASSES, names=names)
    again, cache = seg.run_with_cache(enc, CLASSES, names=names)
    for name in names:
        torch.testing.assert_close(cache[name], fresh_cache[name])
    # replacing the stored VFM features through the hook = decoding an Encoded built with them
    swapped = torch.roll(enc.vfm_features, 1, dims=-1)
    via_hook = seg.run_with_hooks(enc, CLASSES, hooks={
        "vfm.features": lambda f, hook: swapped[hook.window_start:hook.window_start + f.shape[0]]})
    direct = seg.decode(Encoded.from_dict({**enc.to_dict(), "vfm_features": swapped}), CLASSES)
    torch.testing.assert_close(via_hook.scores, direct.scores)
    assert not torch.allclose(via_hook.scores, again.scores)
    torch.testing.assert_close(seg.decode(enc, CLASSES).scores, again.scores)  # the stored Encoded is untouched


def test_same_architecture_under_other_names_gets_other_random_weights():
    from proxyclip.backbones.vfm import create_vfm_model

    kw = dict(embed_dim=64, depth=1, num_heads=2)
    a = create_vfm_model("vit_base_patch16_224.dino", "random", timm_kwargs=kw)
    b = create_vfm_model("vit_base_patch16_224.mae", "random", timm_kwargs=kw)
    a2 = create_vfm_model("vit_base_patch16_224.dino", "random", timm_kwargs=kw)
    assert torch.equal(a.patch_embed.proj.weight, a2.patch_embed.proj.weight)
    assert not torch.equal(a.patch_embed.proj.weight, b.patch_embed.proj.weight)


def test_another_vfm_on_the_same_clip_encodes_clip_once(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    other = seg.with_vfm("test_tiny", layer=0, feature="k")
    assert other.clip is seg.clip and other.text is seg.text and other.vfm.model is seg.vfm.model  # only layer/feature differ
    assert other.clip_key == seg.clip_key and other.vfm_key != seg.vfm_key
    calls = []
    clip_fn = seg.clip.encode_tokens
    seg.clip.encode_tokens = lambda x, keep=(): calls.append(x.shape) or clip_fn(x, keep)
    try:
        both = other.encode(rand_image, reuse=enc)
        elsewhere = other.encode(torch.rand(3, 80, 112), reuse=enc)  # another image: nothing reused
    finally:
        del seg.clip.encode_tokens
    assert both.clip_tokens is enc.clip_tokens and len(calls) == 1 and elsewhere.clip_tokens is not enc.clip_tokens
    fresh = Segmenter.from_config(tiny_config("vfm.layer=0", "vfm.feature=k"))
    assert torch.equal(other.decode(both, CLASSES).scores, fresh.predict(rand_image, CLASSES).scores)
    with pytest.raises(ValueError, match="another configuration"):
        seg.decode(both, CLASSES)  # its VFM part is not this Segmenter's
    with pytest.raises(ValueError, match="no field 'layr'"):
        seg.with_vfm("test_tiny", layr=1)
