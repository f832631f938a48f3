"""CLIP block by block (proxyclip/backbones/blocks.py): the project's own run of each block equals
open_clip's forward, every step fires its hook point ``clip.blocks.{i}.*``, a replaced attention
pattern reaches every later block, and with nobody listening the encode is open_clip's fused path."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from proxyclip import Segmenter, hooks
from proxyclip.backbones import blocks
from proxyclip.backbones.blocks import CLIP_POINTS, VFM_POINTS, BlockPoints, run_blocks
from proxyclip.hooks import HookSet, decl_of, family_of, finish_cache, member
from proxyclip.parts import resid_pre
from proxyclip.stages import window_pixels as _window_pixels

CLASSES = ["cat", "dog", "sky"]


@pytest.fixture(scope="module")
def b16():
    """ViT-B/16 with random weights (12 blocks), the tiny VFM, 64 px windows."""
    return Segmenter.from_config(tiny_config("clip=vit_b16", "weights=random"))


def _stem(clip, x):
    """Tokens entering block 0: conv1, CLS, positions, ln_pre (as the encode makes them)."""
    v = clip.visual
    t = v.conv1(x)
    grid = t.shape[2:]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], 1) + clip.positional_embedding(tuple(grid))
    return v.ln_pre(t)


def _open_clip_outputs(clip, x):
    """Every block's output in open_clip's own forward of ``visual`` (forward hooks)."""
    got = {}
    handles = [b.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out.detach().clone()))
               for i, b in enumerate(clip.visual.transformer.resblocks)]
    try:
        clip.visual(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _ln64(ln, x):
    """LayerNorm in float64 from its weights."""
    x = x.double()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def _pattern64(block, x):
    """softmax(tau q k^T) in float64 from the block's ln_1 and in_proj_weight / in_proj_bias."""
    u = _ln64(block.ln_1, x)
    d, h = x.shape[-1], int(block.attn.num_heads)
    w, b = block.attn.in_proj_weight.double(), block.attn.in_proj_bias.double()
    q, k = u @ w[:d].T + b[:d], u @ w[d:2 * d].T + b[d:2 * d]
    q, k = (t.view(*t.shape[:2], h, d // h).transpose(1, 2) for t in (q, k))
    return torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)


def _manual_all(clip, x):
    """Every block (the last one too) step by step, every point cached."""
    hs, raw = HookSet(), {}
    with hs.active(cache=raw):
        out, _ = run_blocks(clip.visual.transformer.resblocks, _stem(clip, x), (), BlockPoints(hs))
    return out, finish_cache(raw)


@pytest.mark.parametrize("which", ["tiny", "b16"])
def test_block_by_block_equals_open_clips_forward(which, tiny_segmenter, b16):
    clip = (tiny_segmenter if which == "tiny" else b16).clip
    x = torch.rand(1, 3, *clip.visual.image_size, generator=torch.Generator().manual_seed(1))
    ref = _open_clip_outputs(clip, x)
    out, cache = _manual_all(clip, x)
    for i in range(clip.num_blocks):
        torch.testing.assert_close(cache[f"clip.blocks.{i}.resid_post"], ref[i], atol=1e-5, rtol=0)
        if i:
            assert torch.equal(cache[f"clip.blocks.{i}.resid_pre"], cache[f"clip.blocks.{i - 1}.resid_post"])
        block = clip.block(i)
        pattern = cache[f"clip.blocks.{i}.attn.pattern"]
        assert pattern.shape == (1, block.attn.num_heads, x.shape[-1] // clip.patch_size * (x.shape[-2] // clip.patch_size) + 1,
                                 pattern.shape[-1])
        torch.testing.assert_close(pattern.double(), _pattern64(block, cache[f"clip.blocks.{i}.resid_pre"]),
                                   atol=1e-5, rtol=0)
        # the steps add up as documented: resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp_out
        c = {s: cache[member(n, i)] for s, n in CLIP_POINTS.items()}
        torch.testing.assert_close(c["resid_mid"], c["resid_pre"] + c["attn.out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(c["resid_post"], c["resid_mid"] + c["mlp_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref[clip.num_blocks - 1], atol=1e-5, rtol=0)


def test_the_encode_records_every_block_and_matches_the_fused_encode(b16, rand_image):
    seg = b16
    L = seg.clip.num_blocks
    enc = seg.encode(rand_image, keep=[resid_pre(i) for i in range(L - 1)])
    _, cache = seg.run_with_cache(rand_image, CLASSES, names=lambda n: n.startswith("clip.blocks."))
    fired = {family_of(n) for n in cache}
    assert fired == {t for t in CLIP_POINTS.values()}
    assert {n for n in cache if n.endswith("resid_pre")} == {resid_pre(i) for i in range(L - 1)}  # blocks 0..L-2
    for i in range(L - 1):
        torch.testing.assert_close(cache[resid_pre(i)], enc.layers[resid_pre(i)], atol=1e-5, rtol=0)
        nxt = enc.layers[resid_pre(i + 1)] if i + 1 < L - 1 else enc.clip_tokens
        torch.testing.assert_close(cache[f"clip.blocks.{i}.resid_post"], nxt, atol=1e-5, rtol=0)
        assert cache[f"clip.blocks.{i}.attn.pattern"].shape[0] == len(enc.windows)


def test_a_replaced_pattern_reaches_every_later_block(b16, rand_image):
    seg = b16
    j, L = 3, seg.clip.num_blocks
    enc = seg.encode(rand_image, keep=[resid_pre(j)])
    eye = lambda p, hook: torch.eye(p.shape[-1]).expand_as(p)  # noqa: E731  each token attends to itself
    raw = {}
    with seg.hooks.active(hooks={f"clip.blocks.{j}.attn.pattern": eye}, cache=raw,
                          cache_names=[f"clip.blocks.{j}.attn.pattern", "clip.last_block_input"]):
        hooked = seg.encode(rand_image)
    cache = finish_cache(raw)
    assert torch.equal(cache[f"clip.blocks.{j}.attn.pattern"], torch.eye(enc.clip_tokens.shape[1]).expand(
        len(enc.windows), seg.clip.block(j).attn.num_heads, -1, -1))
    # by hand: block j with A = I is x + out_proj(v); then the fused blocks j+1..L-2
    x = enc.layers[resid_pre(j)]
    block = seg.clip.block(j)
    d = x.shape[-1]
    v = F.linear(block.ln_1(x), block.attn.in_proj_weight[2 * d:], block.attn.in_proj_bias[2 * d:])
    y = x + block.attn.out_proj(v)
    y = y + block.mlp(block.ln_2(y))
    for i in range(j + 1, L - 1):
        y = seg.clip.block(i)(y)
    torch.testing.assert_close(hooked.clip_tokens, y, atol=1e-5, rtol=0)
    assert (hooked.clip_tokens - enc.clip_tokens).abs().max() > 1e-2  # it did change what later blocks see
    torch.testing.assert_close(cache["clip.last_block_input"], hooked.clip_tokens)
    # and the decode sees it: scores differ from the plain encode's
    assert not torch.equal(seg.decode(hooked, CLASSES, method="clip").scores, seg.decode(enc, CLASSES, method="clip").scores)


def test_no_listener_takes_the_fused_modules_bit_for_bit(b16, rand_image, monkeypatch):
    seg = b16
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
               for i, b in enumerate(seg.clip.visual.transformer.resblocks)]

    def refuse(*a, **k):
        raise AssertionError("run_block ran with nobody listening")

    try:
        with monkeypatch.context() as m:
            m.setattr(blocks, "run_block", refuse)
            enc = seg.encode(rand_image)
            with seg.hooks.active(cache={}, cache_names=["clip.dense"]):  # a listener elsewhere: still fused
                seg.encode(rand_image)
        assert calls == list(range(seg.clip.num_blocks - 1)) * 2
        # one block listened to: only that block runs step by step
        calls.clear()
        with seg.hooks.active(cache={}, cache_names=["clip.blocks.5.attn.q"]):
            seg.encode(rand_image)
        assert calls == [i for i in range(seg.clip.num_blocks - 1) if i != 5]
    finally:
        for h in handles:
            h.remove()
    # bit for bit the loop of open_clip's modules, batch by batch as the pipeline batches windows
    pix = _window_pixels(seg, enc, 0, len(enc.windows))
    bs = int(seg.cfg.batch_size)
    ref = []
    for a in range(0, len(enc.windows), bs):
        t = _stem(seg.clip, pix[a:a + bs])
        for block in seg.clip.visual.transformer.resblocks[:-1]:
            t = block(t)
        ref.append(t)
    assert torch.equal(enc.clip_tokens, torch.cat(ref))


def test_an_encoded_cannot_record_per_block_points(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    with pytest.raises(ValueError, match=r"hook point clip\.blocks\.0\.attn\.pattern fires while the encode runs.*"
                                         r"pass the image"):
        seg.run_with_cache(enc, CLASSES, names=["clip.blocks.0.attn.pattern"])
    with pytest.raises(ValueError, match=r"clip\.blocks\.\{i\}\.resid_post fires while"):
        seg.run_with_hooks(enc, CLASSES, hooks={"clip.blocks.{i}.resid_post": lambda t, h: None})
    _, cache = seg.run_with_cache(enc, CLASSES)  # all names: what a stored encode can replay, no error
    assert not any(n.startswith(("clip.blocks.", "vfm.blocks.")) for n in cache)
    _, cache = seg.run_with_cache(rand_image, CLASSES, names=["clip.blocks.{i}.attn.pattern"])  # the image: fine
    assert list(cache) == ["clip.blocks.0.attn.pattern"]  # the tiny CLIP's encode runs block 0 only


def test_family_names():
    t = "clip.blocks.{i}.attn.pattern"
    assert member(t, 7) == "clip.blocks.7.attn.pattern" and family_of("clip.blocks.7.attn.pattern") == t
    assert decl_of("clip.blocks.11.resid_post").name == "clip.blocks.{i}.resid_post"
    assert decl_of("clip.blocks.x.resid_post") is None and decl_of("clip.blocks.3.nothing") is None
    assert t in hooks.hook_names() and "clip.blocks.7.attn.pattern" not in hooks.hook_names()
    hs = HookSet()
    seen = []
    with hs.active(hooks={t: lambda a, h: seen.append(h.name)}):  # the template: every block
        assert hs.listening("clip.blocks.2.attn.pattern") and not hs.listening("clip.blocks.2.attn.q")
        hs.point("clip.blocks.2.attn.pattern", torch.zeros(1), 0)
    assert seen == ["clip.blocks.2.attn.pattern"]
    with pytest.raises(KeyError, match="clip.blocks.2.attn.patern"):
        with hs.active(hooks={"clip.blocks.2.attn.patern": lambda a, h: None}):
            pass


def test_vfm_block_points(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    model = seg.vfm.model
    names = lambda n: n.startswith("vfm.")  # noqa: E731
    _, cache = seg.run_with_cache(rand_image, CLASSES, names=names)
    last = seg.vfm.layer
    assert {family_of(n) for n in cache} == set(VFM_POINTS.values()) | {"vfm.features"}
    assert all(a.fused_attn for a in (b.attn for b in model.blocks))  # put back after the encode
    for i in range(last + 1):
        blk = model.blocks[i]
        x = cache[f"vfm.blocks.{i}.resid_pre"]
        u = _ln64(blk.norm1, x)
        w, b = blk.attn.qkv.weight.double(), blk.attn.qkv.bias.double()
        h = blk.attn.num_heads
        c = x.shape[-1]
        q, k = ((u @ w[j * c:(j + 1) * c].T + b[j * c:(j + 1) * c]).view(*x.shape[:2], h, c // h).transpose(1, 2)
                for j in (0, 1))
        ref = torch.softmax(q @ k.transpose(-2, -1) / (c // h) ** 0.5, -1)
        torch.testing.assert_close(cache[f"vfm.blocks.{i}.attn.pattern"].double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"vfm.blocks.{i}.resid_post"], blk(x), atol=1e-5, rtol=0)
    # vfm.features = the last block's output through the final norm, prefix tokens dropped
    out = model.norm(cache[f"vfm.blocks.{last}.resid_post"])[:, seg.vfm.num_prefix_tokens:]
    feats = cache["vfm.features"]
    torch.testing.assert_close(out.transpose(1, 2).reshape(feats.shape), feats, atol=1e-5, rtol=0)
    # a replaced VFM pattern changes the features
    enc = seg.encode(rand_image)
    eye = lambda p, hook: torch.eye(p.shape[-1]).expand_as(p)  # noqa: E731
    with seg.hooks.active(hooks={"vfm.blocks.0.attn.pattern": eye}):
        hooked = seg.encode(rand_image)
    assert (hooked.vfm_features - enc.vfm_features).abs().max() > 1e-3
    assert torch.equal(hooked.clip_tokens, enc.clip_tokens)


def test_residual_stream_and_logit_lens(tiny_segmenter, rand_image):
    from proxyclip import lens

    seg = tiny_segmenter
    with pytest.raises(ValueError, match=r"lacks clip\.blocks\.0\.resid_pre: encode with seg\.encode\(image, keep="):
        lens.residual_stream(seg, seg.encode(rand_image))
    enc = seg.encode(rand_image, keep=lens.every_part(seg))
    states = lens.residual_stream(seg, enc)
    L = seg.clip.num_blocks
    assert [n for n, _ in states] == [f"block {i} input" for i in range(L)] + [f"block {L - 1} output"]
    # the stream is open_clip's own: each block's output is the next block's input
    for i in range(L):
        torch.testing.assert_close(seg.clip.block(i)(states[i][1]), states[i + 1][1], atol=1e-5, rtol=0)
    norms = lens.token_norms(states[0][1])
    assert norms.shape == states[0][1].shape[:2]
    top = lens.top_tokens(norms[0], 3)
    assert sorted(norms[0].tolist(), reverse=True)[:3] == norms[0][top].tolist()
    # the lens of the last block is vanilla CLIP's segmentation (method=clip: residual and FFN on)
    labels = lens.logit_lens(seg, enc, CLASSES, logit_scale=40.0, prob_thd=0.0)
    assert sorted(labels) == list(range(L))
    clip_pred = seg.decode(enc, CLASSES, method="clip", logit_scale=40.0, prob_thd=0.0)
    assert torch.equal(labels[L - 1], clip_pred.labels)
    # block 0's lens scores by hand: ln_post, proj, L2 norm, cosine with the text embeddings (float64)
    text = seg.text_embeddings(["sky", "person", "people", "horse"]).double()
    z = states[1][1][:, 1:].double()
    v = seg.clip.visual
    u = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + v.ln_post.eps)
    e = (u * v.ln_post.weight.double() + v.ln_post.bias.double()) @ v.proj.double()
    e = e / e.norm(dim=-1, keepdim=True)
    ref = torch.einsum("nte,qe->nqt", e, text).reshape(len(enc.windows), 4, *enc.clip_grid)
    torch.testing.assert_close(lens.lens_scores(seg, enc, states[1][1], seg.text_embeddings(
        ["sky", "person", "people", "horse"])).double(), ref, atol=1e-5, rtol=0)


def test_a_hook_on_a_block_the_encode_does_not_run_is_an_error(tiny_segmenter, rand_image):
    seg = tiny_segmenter  # two blocks: the encode runs block 0, block 1 is the method's
    with pytest.raises(ValueError, match=r"hook point clip\.blocks\.1\.attn\.pattern: the encode runs CLIP blocks 0\.\.0; "
                                         r"block 1 is the last block, which the method replaces"):
        seg.run_with_hooks(rand_image, CLASSES, hooks={"clip.blocks.1.attn.pattern": lambda t, h: None})
    with pytest.raises(ValueError, match=r"block 7 does not exist"):
        seg.run_with_cache(rand_image, CLASSES, names=["clip.blocks.7.resid_pre"])
