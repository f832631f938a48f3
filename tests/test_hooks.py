"""Hook points declared where they fire (proxyclip/hooks.py): the README's table, the names, the
per-window set and the replay of stored encodes all come from the declarations, and every
declared point fires in a run that uses it (methods and post-processes from the registries)."""

import dataclasses
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

import naive

from proxyclip import HOOK_NAMES, Segmenter, hooks
from proxyclip.config import CONF_DIR
from proxyclip.hooks import HookSet, declarations, declare_hook, family_of, hook_names, replayed_hooks, window_hooks
from proxyclip.methods import METHODS
from proxyclip.postprocess import POSTPROCESSES

CLASSES = ["sky", "person; people", "horse"]
HEADER = "| name | level | shape | what |"


def readme_hook_table() -> str:
    """The README's block from the hook table's header to the next blank line."""
    text = (CONF_DIR.parent / "README.md").read_text()
    assert HEADER in text, f"README.md has no hook table with the header {HEADER!r}"
    block = text[text.index(HEADER):].split("\n\n", 1)[0]
    return block.rstrip("\n") + "\n"


def test_readme_hook_table_equals_the_declarations():
    expected = [HEADER, "|---|---|---|---|"] + [f"| `{d.name}` | {d.level} | {d.shape} | {d.doc} |"
                                                for d in declarations()]
    assert hooks.markdown_table() == "\n".join(expected) + "\n"
    assert readme_hook_table() == hooks.markdown_table()


def test_names_and_sets_come_from_the_declarations(tiny_segmenter):
    decls = declarations()
    assert len({d.name for d in decls}) == len(decls) > 0
    assert hook_names() == tuple(d.name for d in decls) == HOOK_NAMES == tuple(tiny_segmenter.hook_names)
    assert window_hooks() == {d.name for d in decls if d.level == "window"}
    assert [d.name for d in replayed_hooks()] == [d.name for d in decls if d.replay]
    stages = [hooks.STAGES.index(d.stage) for d in decls]
    assert stages == sorted(stages)  # pipeline order
    for d in decls:  # a window-level tensor's first axis is the windows
        assert d.shape.startswith("(n,") == (d.level == "window"), d


def test_every_declared_hook_fires_in_a_run_that_uses_it(tiny_segmenter, rand_image, tmp_path):
    """One run per (registered method, registered post-process), every hook recorded (knob values
    that fit the tiny CLIP, naive.TINY_KNOBS (image-level: LPOSS's k <= its patches); the layer parts
    every method reads kept; a method reading another VFM readout (CASS: keys) from a Segmenter sharing
    the models, seg.for_method)."""
    enc = tiny_segmenter.encode(rand_image, keep=naive.tiny_parts(tiny_segmenter.clip.num_blocks))
    segs = {m: tiny_segmenter.for_method(m) for m in METHODS}
    # a method reading the per-image SAM part (Trident) gets a Segmenter configured for it (its encode makes the part)
    segs.update({m: Segmenter.from_config(tiny_config(f"method={m}")) for m in METHODS if METHODS[m].needs_sam})
    encs = {m: enc if segs[m] is tiny_segmenter else segs[m].encode(rand_image, reuse=None if METHODS[m].needs_sam
                                                                       else enc, keep=sorted(enc.layers))
            for m in METHODS}
    # a method reading mask proposals (CorrCLIP) decodes its encode with a label map added
    masks = torch.arange(rand_image.shape[1] * rand_image.shape[2]).reshape(rand_image.shape[1:]) // 1500
    encs.update({m: dataclasses.replace(encs[m], masks=masks) for m in METHODS if METHODS[m].needs_masks})
    # a post-process reading SAM's image embedding (sam_refine) runs with the methods making the SAM part, on a
    # Segmenter configured with it (its encode keeps the embedding)
    pairs = [(m, p) for m in METHODS for p in POSTPROCESSES if METHODS[m].needs_sam or not POSTPROCESSES[p].needs_sam]
    with_post = {(m, p): Segmenter.from_config(tiny_config(f"method={m}", f"postprocess={p}"))
                 for m, p in pairs if POSTPROCESSES[p].needs_sam}
    runs = {(m, p): (with_post[m, p], with_post[m, p].encode(rand_image)) if (m, p) in with_post else (segs[m], encs[m])
            for m, p in pairs}
    caches = {(method, post): runs[method, post][0].run_with_cache(runs[method, post][1], CLASSES, method=method,
                                                                   postprocess={"name": post},
                                                                   **naive.tiny_values(method))[1]
              for method, post in pairs}
    _, fresh_cache = tiny_segmenter.run_with_cache(rand_image, CLASSES)  # the encode-time points fire in an encode too
    # (the mask proposals' with a mask stage: masks=file)
    np.savez(tmp_path / "img.npz", instance_mask=np.ones(tuple(rand_image.shape[1:]), np.int32))
    Image.fromarray((rand_image * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "img.png")
    with_masks = Segmenter.from_config(tiny_config("masks=file", f"masks.dir={tmp_path}"))
    _, masks_cache = with_masks.run_with_cache(str(tmp_path / "img.png"), CLASSES)
    # its declared names with the method runs; its family members (a fresh encode) with the fresh ones
    caches["masks=file", "none"] = {k: v for k, v in masks_cache.items() if family_of(k) == k}
    # clip.blocks.0.resid_pre -> its family clip.blocks.{i}.resid_pre
    fresh = {family_of(n) for n in fresh_cache} | {family_of(n) for n in masks_cache}
    for name, t in [*fresh_cache.items(), *masks_cache.items()]:  # a family member is window-level as its family is
        assert family_of(name) not in window_hooks() or t.shape[0] == len(enc.windows), name
    assert {d.name for d in declarations() if d.stage == "encode"} <= fresh
    fired = {name for cache in caches.values() for name in cache} | fresh
    assert fired == set(hook_names())  # each declared point fires in some method / post-process run
    n = len(enc.windows)
    for (method, post), cache in caches.items():
        assert set(cache) <= set(hook_names())
        for name, t in cache.items():
            if name in window_hooks():  # window-level: concatenated over the windows, in order
                assert t.shape[0] == n, (method, post, name, tuple(t.shape))
    # the points every run passes through fire in every run
    window_level = [c for (m, _), c in caches.items() if m in METHODS and METHODS[m].level == "window"]
    always = set.intersection(*(set(c) for c in window_level))
    image_level = [c for (m, _), c in caches.items() if m in METHODS and METHODS[m].level == "image"]
    assert image_level and all({"scores.image", "scores.refined", "text.embeddings"} <= set(c) for c in image_level)
    assert {"clip.last_block_input", "clip.last_block_output", "clip.dense", "scores.window", "scores.image",
            "scores.refined", "text.embeddings"} <= always
    # and the attention pattern in every run of a method that returns one (not those running their own block)
    assert "attention.pattern" in set.intersection(*(set(c) for (m, _), c in caches.items()
                                                     if m not in METHODS  # the default method's run with masks=file
                                                     or (METHODS[m].level == "window" and not naive.own_block(m))))


def test_a_callable_filter_records_exactly_its_names(tiny_segmenter, rand_image):
    wanted = [n for n in hook_names() if n.startswith("proxy.")]
    assert wanted
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names=lambda n: n.startswith("proxy."))
    assert sorted(cache) == sorted(wanted)
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names=lambda n: False)
    assert cache == {}
    _, cache = tiny_segmenter.run_with_cache(rand_image, CLASSES, names="clip.dense")  # one name
    assert list(cache) == ["clip.dense"]


def test_undeclared_names_are_errors(tiny_segmenter, rand_image):
    hs = HookSet()
    with pytest.raises(KeyError, match="'no.such' fires but was never declared"):
        hs.point("no.such", torch.zeros(1))
    with pytest.raises(KeyError, match=r"unknown hook name\(s\) \['no.such'\]; the hook points are: clip.blocks.{i}.resid_pre, "):
        tiny_segmenter.run_with_cache(rand_image, CLASSES, names=["no.such"])
    with pytest.raises(KeyError, match="no.such"):
        with hs.active(hooks={"no.such": lambda t, h: None}):
            pass
    with pytest.raises(TypeError, match="hook for 'clip.dense' must be callable"):
        with hs.active(hooks={"clip.dense": 3}):
            pass


def test_declaring_twice_differently_raises():
    name = "test.only_point"
    try:
        assert declare_hook(name, "image", "(Q,)", "a test point", "scores") == name
        assert declare_hook(name, "image", "(Q,)", "a test point", "scores") == name  # the same again: fine
        with pytest.raises(ValueError, match=f"hook {name} declared twice, differently"):
            declare_hook(name, "window", "(n, Q)", "a test point", "scores")
        assert hooks.HOOKS[name].level == "image"
    finally:
        hooks.undeclare(name)
    with pytest.raises(ValueError, match="level must be 'window' or 'image'"):
        declare_hook(name, "pixel", "()", "bad level", "scores")
    with pytest.raises(ValueError, match="stage must be one of"):
        declare_hook(name, "image", "()", "bad stage", "nowhere")
    assert name not in hooks.HOOKS


def test_replay_of_a_stored_encoded_goes_through_every_replay_point(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    assert all(hasattr(enc, d.replay) for d in replayed_hooks())
    replayed = [d for d in replayed_hooks() if d.level == "window"]  # image-level (proposals): tests/test_masks.py
    assert replayed
    seen = {}

    def spy(t, hook):
        seen.setdefault(hook.name, []).append(hook.window_start)

    with seg.hooks.active(hooks={d.name: spy for d in replayed}):
        pred, cache = seg.run_with_cache(enc, CLASSES, names=[d.name for d in replayed])
    starts = list(range(0, len(enc.windows), int(seg.cfg.batch_size)))
    for d in replayed:  # each stored tensor passes its point again, batch by batch, unchanged
        assert seen[d.name] == starts
        assert torch.equal(cache[d.name], getattr(enc, d.replay))
    # replacing a replayed tensor through its point changes the decode; the Encoded is untouched
    for d in replayed:
        stored = getattr(enc, d.replay).clone()
        changed = seg.run_with_hooks(enc, CLASSES, hooks={d.name: lambda t, hook: t.flip(-1)})
        assert not torch.allclose(changed.scores, pred.scores), d.name
        assert torch.equal(getattr(enc, d.replay), stored)


def test_window_start_tells_the_batch(tiny_segmenter, rand_image):
    starts = []
    tiny_segmenter.run_with_hooks(rand_image, CLASSES, hooks={"clip.dense": lambda t, h: starts.append(
        (h.name, h.window_start, t.shape[0])) or None})
    bs = int(tiny_segmenter.cfg.batch_size)
    n = len(tiny_segmenter.encode(rand_image).windows)
    assert starts == [("clip.dense", s, min(bs, n - s)) for s in range(0, n, bs)]
