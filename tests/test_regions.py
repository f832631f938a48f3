"""Image-level decode (proxyclip/image_level.py): a method that sees every window at once returns
the merged maps; the pipeline skips the window merge and decides as for every method.

The test method ("maskclip" replaced for the test, as tests/test_parts.py does) scores every window
with CLIP's own last block, takes each window's mean score per query and spreads it over the window's
box in the resized image (sum / count over overlaps). The reference recomputes that in float64 from
the windows' dense embeddings, with its own loops over the boxes and its own bilinear resize.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from proxyclip import pipeline
from proxyclip.decision import decide
from proxyclip.encoded import Encoded
from proxyclip.image_level import ImageScores
from proxyclip.methods import METHODS
from proxyclip.text import parse_classes

CLASSES = ["cat", "dog; puppy", "sky"]
CALLS = []


def _window_means(x, start, stop):
    """(B, Q) mean score of each window of ``start:stop`` with CLIP's own last block (no residual/FFN)."""
    dense = x.window_method("clip", start, stop, residual=False, ffn=False)
    return torch.einsum("behw,qe->bq", dense, x.text) / (dense.shape[-1] * dense.shape[-2])


def window_means_method(x, size="resized"):
    CALLS.append(1)
    means = torch.cat([_window_means(x, a, b) for a, b, _ in x.batches()])
    h, w = x.resized_size
    total = torch.zeros(means.shape[1], h, w)
    count = torch.zeros(1, h, w)
    for (y1, y2, x1, x2), m in zip(x.windows, means):
        total[:, y1:y2, x1:x2] += m[:, None, None]
        count[:, y1:y2, x1:x2] += 1
    merged = total / count
    if size == "original":
        merged = F.interpolate(merged[None], size=x.image_size, mode="bilinear", align_corners=False)[0]
    return ImageScores(merged, size=size)


@pytest.fixture
def image_level(monkeypatch):
    CALLS.clear()
    monkeypatch.setitem(METHODS, "maskclip", replace(METHODS["maskclip"], level="image",
                                                     attention=lambda x: window_means_method(x)))
    return "maskclip"


def _reference(seg, enc, classes):
    """float64: per window mean of (dense . text), spread on the resized canvas, bilinear to the image."""
    q = seg.text_embeddings(parse_classes(classes).queries).double()
    dense = seg.dense_embeddings(enc, 0, len(enc.windows), seg.decode_spec("clip", residual=False, ffn=False)).double()
    h, w = enc.resized_size
    total = torch.zeros(q.shape[0], h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        for qi in range(q.shape[0]):
            total[qi, y1:y2, x1:x2] += float((dense[i] * q[qi][:, None, None]).sum(0).mean())
        count[y1:y2, x1:x2] += 1
    merged = total / count
    return F.interpolate(merged[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]


def test_an_image_level_method_equals_the_direct_computation(tiny_segmenter, rand_image, image_level):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    assert len(enc.windows) > 1  # windows overlap: the merge is the method's
    pred = seg.decode(enc, CLASSES, method=image_level, logit_scale=30.0)
    ref = _reference(seg, enc, CLASSES)
    assert pred.scores.shape == (4, *rand_image.shape[1:])
    torch.testing.assert_close(pred.scores.double(), ref, atol=2e-6, rtol=0)
    probs, labels = decide(ref.float(), parse_classes(CLASSES), 30.0, 0.0)
    assert torch.equal(pred.labels, labels) and len(CALLS) == 1


def test_original_size_result_and_the_hooks_fire_at_the_same_names(tiny_segmenter, rand_image, monkeypatch):
    monkeypatch.setitem(METHODS, "maskclip", replace(METHODS["maskclip"], level="image",
                                                     attention=lambda x: window_means_method(x, "original")))
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    pred, cache = seg.run_with_cache(enc, CLASSES, names=["scores.image", "scores.refined", "text.embeddings",
                                                          "clip.dense", "scores.window"], method="maskclip")
    torch.testing.assert_close(pred.scores.double(), _reference(seg, enc, CLASSES), atol=2e-6, rtol=0)
    assert torch.equal(cache["scores.image"], pred.scores) and torch.equal(cache["scores.refined"], pred.scores)
    assert cache["clip.dense"].shape[0] == len(enc.windows)  # the window method's own points fire per window
    assert "scores.window" not in cache  # no per-window scores: the method merges
    # a hook on scores.image replaces the maps the decision sees
    flipped = seg.run_with_hooks(enc, CLASSES, {"scores.image": lambda t, h: -t}, method="maskclip")
    want = decide(-pred.scores, parse_classes(CLASSES), flipped.spec.logit_scale, flipped.spec.prob_thd)[1]
    assert torch.equal(flipped.labels, want) and not torch.equal(flipped.labels, pred.labels)


def test_decode_from_a_stored_encode_equals_the_direct_run(tiny_segmenter, rand_image, image_level, tmp_path):
    seg = tiny_segmenter
    direct = seg.predict(rand_image, CLASSES, method=image_level)
    torch.save(seg.encode(rand_image).to_dict(), tmp_path / "enc.pt")
    stored = Encoded.from_dict(torch.load(tmp_path / "enc.pt", weights_only=False))
    again = seg.decode(stored, CLASSES, method=image_level)
    assert torch.equal(again.scores, direct.scores) and torch.equal(again.labels, direct.labels)


def test_points_differing_in_logit_scale_and_threshold_share_one_run(tiny_segmenter, rand_image, image_level):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    specs = [seg.decode_spec(image_level, classes=CLASSES, logit_scale=s, prob_thd=t)
             for s, t in ((10.0, 0.0), (50.0, 0.4), (50.0, 0.0))]
    CALLS.clear()
    preds = seg.decode_many(enc, CLASSES, specs)
    assert len(CALLS) == 1
    for spec, pred in zip(specs, preds):
        _, labels = decide(pred.scores, parse_classes(CLASSES), spec.logit_scale, spec.prob_thd)
        assert torch.equal(pred.labels, labels) and pred.spec == spec
        assert torch.equal(pred.labels, seg.decode(enc, CLASSES, spec=spec).labels)


def test_window_level_methods_keep_their_path(tiny_segmenter, rand_image, monkeypatch):
    """A window-level decode never enters the image-level path and equals decide() on the merged
    window maps made independently (upsample each window, cut the padding, sum / count, resize)."""
    monkeypatch.setattr(pipeline, "image_level_result", lambda *a, **k: pytest.fail("image-level path taken"))
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    pred = seg.decode(enc, CLASSES, method="clip")
    spec = seg.decode_spec("clip")
    q = seg.text_embeddings(parse_classes(CLASSES).queries).double()
    dense = seg.dense_embeddings(enc, 0, len(enc.windows), spec).double()
    low = torch.einsum("behw,qe->bqhw", dense, q)
    top, bottom, left, right = enc.pad
    h, w = enc.resized_size
    total = torch.zeros(q.shape[0], h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for i, (y1, y2, x1, x2) in enumerate(enc.windows):
        up = F.interpolate(low[i:i + 1], size=(y2 - y1 + top + bottom, x2 - x1 + left + right), mode="bilinear",
                           align_corners=False)[0]
        total[:, y1:y2, x1:x2] += up[:, top:top + y2 - y1, left:left + x2 - x1]
        count[y1:y2, x1:x2] += 1
    ref = F.interpolate((total / count)[None], size=enc.image_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred.scores.double(), ref, atol=1e-5, rtol=0)


def test_bad_results_and_per_window_calls_are_clear_errors(tiny_segmenter, rand_image, monkeypatch, image_level):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    with pytest.raises(ValueError, match="method maskclip is image-level"):
        seg.dense_embeddings(enc, 0, 1, seg.decode_spec(image_level))
    monkeypatch.setitem(METHODS, "maskclip", replace(METHODS["maskclip"], level="image",
                                                     attention=lambda x: ImageScores(torch.zeros(2, 5, 5))))
    with pytest.raises(ValueError, match=r"shape \(2, 5, 5\); expected \(4, 80, 112\)"):
        seg.decode(enc, CLASSES, method="maskclip")
    monkeypatch.setitem(METHODS, "maskclip", replace(METHODS["maskclip"], level="image",
                                                     attention=lambda x: torch.zeros(4, 80, 112)))
    with pytest.raises(TypeError, match="must return ImageScores, got Tensor"):
        seg.decode(enc, CLASSES, method="maskclip")
    from proxyclip.methods import Method, register_method

    with pytest.raises(ValueError, match="level must be 'window' or 'image'"):
        register_method(Method("x", lambda x: None, level="pixel"))
