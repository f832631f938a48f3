"""postprocess=sam_refine (docs/regions.md, "Trident", SAM prompt refinement): equal to a float64
reference written here from the documented steps (own 8-connected flood fill, own box / point / mask
prompt, own combination), with a hand-made stub decoder and with SAM's prompt encoder / mask decoder
(tiny, seeded random weights); each pitfall by a hand-worked case; end to end on Trident with the tiny
models; identity, the protocol's per-dataset coarse_thresh, the published row, bad input."""

from __future__ import annotations

import io
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from fixtures_eval import encoded_twice_through_cache
from proxyclip import Segmenter
from proxyclip.encoded import Encoded
from proxyclip.sam_refine import decoder_modules, mask_prompt, refine_labels

CLASSES = ["sky", "person; people", "horse"]
SETTINGS = dict(coarse_thresh=0.2, minimal_area=4, sam_mask_coff=0.005, sam_iou_thresh=0.8)


# ---------------------------------------------------------------------------------------------- the reference
def flood_components(mask, minimal_area):
    """8-connected components (lists of (y, x)) of a bool (h, w) tensor, by breadth-first search."""
    h, w = mask.shape
    seen = torch.zeros(h, w, dtype=torch.bool)
    out = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            comp, todo = [], deque([(y, x)])
            seen[y, x] = True
            while todo:
                a, b = todo.popleft()
                comp.append((a, b))
                for da in (-1, 0, 1):
                    for db in (-1, 0, 1):
                        u, v = a + da, b + db
                        if 0 <= u < h and 0 <= v < w and mask[u, v] and not seen[u, v]:
                            seen[u, v] = True
                            todo.append((u, v))
            if len(comp) >= minimal_area:
                out.append(sorted(comp))
    return out


def reference(labels, probs, predict, input_hw, side, m, coarse_thresh, minimal_area, sam_mask_coff, sam_iou_thresh):
    """The documented steps in float64; ``predict(points, boxes, mask)`` as the refinement calls it."""
    probs = probs.double()
    k, hh, ww = probs.shape
    h2, w2 = hh // 2, ww // 2
    rows = [int(i * hh / h2) for i in range(h2)]  # nearest: floor(i * H / h)
    cols = [int(j * ww / w2) for j in range(w2)]
    half_l = labels[rows][:, cols].clone()
    half_p = F.interpolate(probs[None], size=(h2, w2), mode="bilinear", align_corners=False)[0]
    half_l[half_p.max(0).values < coarse_thresh] = -1
    sy, sx = input_hw[0] / h2, input_hw[1] / w2
    refined = torch.zeros(k, hh, ww, dtype=torch.float64)
    failed = torch.zeros(hh, ww, dtype=torch.bool)
    for c in range(k):
        if half_p[c].max() < coarse_thresh:
            continue
        comps = flood_components(half_l == c, minimal_area)
        if not comps:
            continue
        points, boxes = [], []
        for comp in comps:
            ys, xs = [a for a, _ in comp], [b for _, b in comp]
            boxes.append([min(xs) * sx, min(ys) * sy, max(xs) * sx, max(ys) * sy])
            best = max(comp, key=lambda t: (float(half_p[c, t[0], t[1]]), -t[0] * w2 - t[1]))  # first maximum
            points.append([best[1] * sx, best[0] * sy])
        long = max(h2, w2)
        nh, nw = int(h2 * m / long + 0.5), int(w2 * m / long + 0.5)
        r = F.interpolate(half_p[c][None, None], size=(nh, nw), mode="bilinear", align_corners=False)[0, 0]
        prompt = torch.zeros(m, m, dtype=torch.float64)
        prompt[:nh, :nw] = r * (r > coarse_thresh)
        logits, iou = predict(torch.tensor(points, dtype=torch.float64), torch.tensor(boxes, dtype=torch.float64),
                              prompt * sam_mask_coff)
        for logit, q in zip(logits.double(), iou):
            big = F.interpolate(logit[None, None], size=(side, side), mode="bilinear", align_corners=False)
            full = F.interpolate(big[:, :, :input_hw[0], :input_hw[1]], size=(hh, ww), mode="bilinear",
                                 align_corners=False)[0, 0]
            inside = full > 0
            refined[c] = torch.maximum(refined[c], torch.sigmoid(full) * probs[c] * inside)
            if q <= sam_iou_thresh:
                failed |= inside
    out = labels.clone()
    coarse = probs.max(0).values
    for y in range(hh):
        for x in range(ww):
            col = refined[:, y, x]
            best = float(col.max())
            if best <= 0:
                continue  # no refined mass: the coarse label
            if failed[y, x] and coarse[y, x] > best:
                continue  # a failed mask: the coarse decision where more probable
            out[y, x] = int(torch.nonzero(col == best)[0])
    return out


def box_stub(m, side, iou_of=lambda box: 0.9, calls=None):
    """A decoder whose mask is +3 inside its prompt's box (in the M-grid, one cell wider) and -3
    outside, IoU iou_of(box); a box from the origin (class 0's, the rest of the image) gets no mask."""
    def predict(points, boxes, mask):
        if calls is not None:
            calls.append((points.clone(), boxes.clone(), mask.clone()))
        g = torch.arange(m, dtype=torch.float64) * side / m  # mask cell -> input-frame coordinate
        out = []
        for x1, y1, x2, y2 in boxes.double().tolist():
            iny = (g >= y1 - 1e-6) & (g <= y2 + side / m)
            inx = (g >= x1 - 1e-6) & (g <= x2 + side / m)
            whole = x1 == 0 and y1 == 0
            out.append(torch.where(iny[:, None] & inx[None, :] & (not whole), 3.0, -3.0))
        return torch.stack(out), torch.tensor([iou_of(b) for b in boxes.tolist()], dtype=torch.float64)
    return predict


def run_both(labels, probs, predict, hw=(64, 96), side=96, m=24, **changes):
    s = dict(SETTINGS, **changes)
    got = refine_labels(labels, probs.float(), predict, hw, side, m, **s)
    ref = reference(labels, probs, predict, hw, side, m, **s)
    return got, ref


def blobs():
    """A 3-class 40 x 60 image: class 1 a 12 x 16 block, class 2 a 6 x 8 block (p 0.9 inside), the rest class 0."""
    probs = torch.full((3, 40, 60), 0.05, dtype=torch.float64)
    probs[0] = 0.9
    probs[:, 4:16, 6:22] = torch.tensor([0.05, 0.9, 0.05])[:, None, None]
    probs[:, 24:30, 40:48] = torch.tensor([0.05, 0.05, 0.9])[:, None, None]
    return probs.max(0).indices, probs


# ---------------------------------------------------------------------------------------------- vs the reference
def test_equals_the_reference_with_a_stub_decoder():
    labels, probs = blobs()
    probs = probs + 0.04 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = probs.max(0).indices
    iou = lambda box: 0.9 if box[0] < 40 else 0.7  # class 1's mask passes the gate, class 2's fails
    for changes in ({}, {"sam_iou_thresh": 0.65}, {"coarse_thresh": 0.5, "minimal_area": 40}):
        got, ref = run_both(labels, probs, box_stub(24, 96, iou_of=iou), **changes)
        assert torch.equal(got, ref), changes
        assert not torch.equal(got, labels)  # the boxes' masks relabel pixels around the blocks
    grown = lambda out: int((out[20:34, 36:52] == 2).sum())
    assert grown(run_both(labels, probs, box_stub(24, 96, iou_of=iou))[0]) == 48  # failed: class 2 not grown
    assert grown(run_both(labels, probs, box_stub(24, 96, iou_of=iou), sam_iou_thresh=0.65)[0]) > 48


def test_prompts_are_in_sams_input_frame():
    """Half size 20 x 30, SAM input 64 x 96: coordinates scaled by (96 / 30, 64 / 20); the point is the
    component's argmax of p; the dense prompt is p resized to long side M, thresholded, times the coefficient."""
    labels, probs = blobs()
    probs[1, 8, 14] = 0.95  # class 1's maximum: half-size pixel (4, 7) sees it through the bilinear resize
    calls = []
    refine_labels(labels, probs.float(), box_stub(24, 96, calls=calls), (64, 96), 96, 24, **SETTINGS)
    pts, boxes, mask = calls[1]  # class 1 (class 0's call first)
    half = F.interpolate(probs[None].float(), size=(20, 30), mode="bilinear", align_corners=False)[0]
    y, x = divmod(int(torch.where(half.max(0).indices == 1, half[1], -1.0).argmax()), 30)
    assert (y, x) == (4, 7)
    torch.testing.assert_close(pts, torch.tensor([[7 * 96 / 30, 4 * 64 / 20]]))
    torch.testing.assert_close(boxes, torch.tensor([[3 * 96 / 30, 2 * 64 / 20, 10 * 96 / 30, 7 * 64 / 20]]))
    assert mask.shape == (24, 24) and mask[16:].abs().max() == 0  # 20 x 30 -> 16 x 24, zero-padded below
    torch.testing.assert_close(mask, mask_prompt(half[1], 24, 0.2, 0.005))
    assert float(mask.max()) == pytest.approx(0.005 * float(F.interpolate(half[1][None, None], size=(16, 24),
                                                            mode="bilinear", align_corners=False).max()))
    assert ((mask > 0) == (mask >= 0.2 * 0.005)).all()


@pytest.fixture(scope="module")
def tiny_decoder():
    torch.manual_seed(3)
    return decoder_modules(16, 8, 128).eval()


def decoder_call(modules, emb):
    """The SAM call of the spec (point label 1, box, dense mask, one mask output) on ``emb`` (1, C, g, g);
    float32 (SAM's prompt encoder casts the coordinates to float32 itself), the results as float64."""
    pe, md = modules["prompt_encoder"], modules["mask_decoder"]

    def predict(points, boxes, mask):
        b = len(points)
        with torch.no_grad():
            sparse, dense = pe(points=(points.float()[:, None], torch.ones(b, 1)), boxes=boxes.float(),
                               masks=mask.float()[None, None].expand(b, 1, *mask.shape))
            logits, iou = md(image_embeddings=emb.float(), image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=False)
        return logits[:, 0].double(), iou[:, 0].double()
    return predict


def test_equals_the_reference_with_sams_decoder(tiny_decoder):
    from proxyclip.sam_refine import decoder_predict

    labels, probs = blobs()  # near-uniform probabilities: the random decoder's masks (alike for every
    noise = torch.rand(probs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probs = 0.2 * probs / probs.sum(0) + 0.8 * (1 / 3 + 0.02 * noise)  # prompt) then change labels
    probs = probs / probs.sum(0)
    labels = probs.max(0).indices
    emb = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    ref_predict = decoder_call(tiny_decoder, emb)
    ious = []
    recorded = lambda p, b, m: (lambda out: (ious.extend(out[1].tolist()), out)[1])(ref_predict(p, b, m))
    hw = (85, 128)
    reference(labels, probs, recorded, hw, 128, 32, **SETTINGS)
    gate = sorted(ious)[len(ious) // 2]  # half the masks fail
    got = refine_labels(labels, probs.float(), decoder_predict(tiny_decoder, emb[0].float()), hw, 128, 32,
                        **dict(SETTINGS, sam_iou_thresh=gate))
    ref = reference(labels, probs, ref_predict, hw, 128, 32, **dict(SETTINGS, sam_iou_thresh=gate))
    assert torch.equal(got, ref)
    assert not torch.equal(got, labels) and len(ious) >= 3


# ---------------------------------------------------------------------------------------------- pitfalls
def test_pixels_without_refined_mass_keep_the_coarse_label():
    labels, probs = blobs()
    labels[0, 0] = 2  # a coarse label no mask reaches (it is class 0's area, but class 0's mask is negative)
    def predict(points, boxes, mask):  # every mask covers only the top-left quarter of the input frame
        lo = torch.full((len(points), 24, 24), -4.0)
        lo[:, :6, :6] = 4.0
        return lo, torch.full((len(points),), 0.9)
    got, ref = run_both(labels, probs, predict)
    assert torch.equal(got, ref)
    up = F.interpolate(F.interpolate(predict(torch.zeros(1, 2), None, None)[0][:, None].double(), size=(96, 96),
                                     mode="bilinear", align_corners=False)[:, :, :64, :96], size=(40, 60),
                       mode="bilinear", align_corners=False)[0, 0]
    outside = up <= 0
    assert outside.any() and torch.equal(got[outside], labels[outside])
    assert got[0, 0] == 0  # inside a mask: refined (class 0's sigmoid x p is the largest there)


def test_components_under_minimal_area_are_dropped():
    """Class 2's block is 3 x 4 = 12 half-size pixels: prompted with minimal_area 12, not with 13."""
    labels, probs = blobs()
    for area, prompted in ((12, True), (13, False)):
        calls = []
        got, ref = run_both(labels, probs, box_stub(24, 96, calls=calls), minimal_area=area)
        assert torch.equal(got, ref)
        # classes 0, 1 (and 2), once for the refinement and once for the reference
        assert len(calls) == 2 * (3 if prompted else 2) and all(len(c[1]) == 1 for c in calls)
        assert (got[24:30, 40:48] == 2).all()  # no other class's mask reaches the block
        assert (int((got[20:34, 36:52] == 2).sum()) > 48) == prompted  # prompted: its mask grows it


def test_failed_masks_keep_the_coarse_label_where_it_is_more_probable():
    """Class 1's box mask also covers class-0 pixels next to its block. IoU 0.9 > 0.8: relabelled 1
    there (the only refined mass); IoU exactly 0.8 (failed, <= the gate): the coarse class 0, more
    probable (0.9 > sigmoid x 0.05), stays."""
    labels, probs = blobs()
    stub = lambda iou: box_stub(24, 96, iou_of=lambda box: iou)
    ring = torch.zeros(40, 60, dtype=torch.bool)
    ring[2:20, 4:26] = True
    ring[4:16, 6:22] = False
    good, ref = run_both(labels, probs, stub(0.9), minimal_area=13)
    assert torch.equal(good, ref)
    grown = ring & (good == 1)
    assert grown.any() and (labels[grown] == 0).all()  # the mask relabels class-0 pixels around the block
    bad, ref = run_both(labels, probs, stub(0.8), minimal_area=13)
    assert torch.equal(bad, ref)
    assert (bad[grown] == 0).all()


def test_a_class_below_coarse_thresh_is_not_prompted():
    labels, probs = blobs()
    probs[2, 24:30, 40:48] = 0.15  # class 2's best p is below 0.2: not prompted, and its pixels ignored
    probs[0, 24:30, 40:48] = 0.1
    labels = probs.max(0).indices
    calls = []
    got, ref = run_both(labels, probs, box_stub(24, 96, calls=calls))
    assert torch.equal(got, ref) and len(calls) == 2 * 2  # the refinement's and the reference's calls
    calls2 = []
    run_both(labels, probs, box_stub(24, 96, calls=calls2), coarse_thresh=0.1)
    assert len(calls2) == 2 * 3


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def seg():
    return Segmenter.from_config(tiny_config("method=trident", "postprocess=sam_refine",
                                             "postprocess.minimal_area=10", "postprocess.sam_iou_thresh=0.0"))


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def enc(seg, image):
    return seg.encode(image)


def test_trident_with_sam_refine_equals_the_reference(seg, enc, image):
    part = enc.sam
    assert part["embedding"].shape == (16, 8, 8) and tuple(part["input_hw"].tolist()) == (91, 128)
    # the embedding is timm's neck output of SAM's input
    from proxyclip.sam_attention import sam_input

    x, _ = sam_input(image, 128)
    with torch.no_grad():
        torch.testing.assert_close(part["embedding"], seg.sam.model.forward_features(x)[0])
    coarse = seg.decode(enc, CLASSES, postprocess="none")
    pred = seg.decode(enc, CLASSES)
    predict = decoder_call(seg.sam.decoder, part["embedding"][None])
    with torch.no_grad():
        ref = reference(coarse.labels, coarse.probs, predict, (91, 128), 128, 32,
                        **dict(SETTINGS, minimal_area=10, sam_iou_thresh=0.0))
    assert torch.equal(pred.labels, ref)
    assert not torch.equal(pred.labels, coarse.labels)
    torch.testing.assert_close(pred.probs, coarse.probs)  # the decision's probabilities stay


def test_decode_from_a_stored_encode_equals_the_direct_run(seg, enc, image):
    buf = io.BytesIO()
    torch.save(enc.to_dict(), buf)
    buf.seek(0)
    stored = Encoded.from_dict(torch.load(buf, weights_only=False))
    assert torch.equal(seg.decode(stored, CLASSES).labels, seg.predict(image, CLASSES).labels)


def test_feature_cache_keeps_the_embedding(seg, image, tmp_path):
    first, second, calls = encoded_twice_through_cache(seg, image, tmp_path)
    assert calls == 0
    assert torch.equal(second.sam["embedding"], first.sam["embedding"])
    assert torch.equal(seg.decode(second, CLASSES).labels, seg.decode(first, CLASSES).labels)


def test_identity_differs_between_none_and_sam_refine(seg):
    from proxyclip.resolve import decode_spec
    from proxyclip.specs import EncodeSpec

    plain = tiny_config("method=trident", f"precision={seg.cfg.precision}")  # as the Segmenter resolved it
    other = EncodeSpec.from_config(plain, random_weights=True, uses_vfm=True)
    mine = EncodeSpec.from_config(seg.cfg, random_weights=True, uses_vfm=True)
    assert mine.sam.embedding and not other.sam.embedding
    assert mine.sam_key != other.sam_key and mine.key() != other.key()
    assert (mine.clip_key, mine.vfm_key) == (other.clip_key, other.vfm_key)  # only the SAM part is made again
    assert "embedding" not in other.record()["sam"]  # the keys of parts without it stay as they were
    assert decode_spec(plain).key() != seg.decode_spec().key()
    assert seg.decode_spec().flat()["postprocess.coarse_thresh"] == 0.2


def test_the_decoder_checkpoint_is_in_the_run_identity_not_the_parts_key(tmp_path, tiny_decoder):
    from proxyclip.sam_refine import build_decoder
    from proxyclip.specs import EncodeSpec

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    state = {f"image_encoder.x": torch.zeros(1), **tiny_decoder.state_dict()}
    torch.save(state, a)
    torch.save({k: v + 1 for k, v in state.items()}, b)
    specs = [EncodeSpec.from_config(tiny_config("method=trident", "postprocess=sam_refine", "weights=local",
                                                f"trident.decoder_checkpoint={p}"), random_weights=False,
                                    uses_vfm=True) for p in (a, b)]
    assert specs[0].sam.decoder.startswith("sha256:") and specs[0].sam.decoder != specs[1].sam.decoder
    assert specs[0].key() != specs[1].key() and specs[0].sam_key == specs[1].sam_key
    node = tiny_config("trident.decoder_checkpoint=" + str(a)).trident
    built = build_decoder(node, "local", 0, 16, 128, torch.device("cpu"))
    for k, v in tiny_decoder.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    from proxyclip.backbones.weights import CheckpointMismatch

    torch.save({k: v for k, v in state.items() if "iou" not in k}, b)
    with pytest.raises(CheckpointMismatch, match="SAM prompt encoder / mask decoder"):
        build_decoder(tiny_config("trident.decoder_checkpoint=" + str(b)).trident, "local", 0, 16, 128,
                      torch.device("cpu"))


def test_pretrained_decoder_offline_fails_at_once(monkeypatch, tmp_path):
    from proxyclip.backbones.weights import WeightsUnavailable
    from proxyclip.sam_refine import build_decoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="trident.decoder_checkpoint=/path"):
        build_decoder(tiny_config().trident, "pretrained", 0, 256, 1024, torch.device("cpu"))


def test_bad_input_is_one_clear_error(image, tiny_segmenter):
    trident = Segmenter.from_config(tiny_config("method=trident"))  # no embedding kept
    with pytest.raises(ValueError, match="configured with method=trident postprocess=sam_refine"):
        trident.decode(trident.encode(image), CLASSES, postprocess="sam_refine")
    with pytest.raises(ValueError, match="configured with method=trident postprocess=sam_refine"):
        tiny_segmenter.decode(tiny_segmenter.encode(image), CLASSES, postprocess="sam_refine")
    with pytest.raises(ValueError, match="postprocess=sam_refine reads SAM's image embedding.*method=proxyclip"):
        Segmenter.from_config(tiny_config("postprocess=sam_refine"))
    halves = Segmenter.from_config(tiny_config("method=trident", "postprocess=sam_refine", "trident.halves=true"))
    with pytest.raises(ValueError, match="trident.halves=true .* not built"):
        halves.decode(halves.encode(image), CLASSES)


# ---------------------------------------------------------------------------------------------- protocol, row
@pytest.mark.parametrize("dataset,value", [("voc21", 0.2), ("context60", 0.15), ("coco_object", 0.25),
                                           ("coco_stuff", 0.05), ("cityscapes", 0.10), ("ade20k", 0.05)])
def test_the_trident_preset_sets_coarse_thresh_per_dataset(dataset, value):
    from proxyclip import compose_config
    from proxyclip.resolve import decode_spec

    cfg = compose_config("eval", ["protocol=trident", "method=trident", "postprocess=sam_refine",
                                  f"dataset={dataset}", "data_root=/x"])
    assert cfg.postprocess.coarse_thresh == value
    wins = compose_config("eval", ["protocol=trident", "method=trident", "postprocess=sam_refine",
                                   "postprocess.coarse_thresh=0.33", f"dataset={dataset}", "data_root=/x"])
    assert wins.postprocess.coarse_thresh == 0.33  # the command line wins
    other = compose_config("eval", ["protocol=trident", "method=trident", f"dataset={dataset}", "data_root=/x"])
    assert decode_spec(other, postprocess="sam_refine").postprocess_settings["coarse_thresh"] == value
    plain = compose_config("eval", ["method=trident", "postprocess=sam_refine", f"dataset={dataset}", "data_root=/x"])
    assert plain.postprocess.coarse_thresh == 0.2  # another preset: the YAML's


def test_a_bad_postprocess_table_is_one_line():
    from omegaconf import OmegaConf

    from proxyclip.protocol_resolvers import check_postprocess_knobs

    bad = OmegaConf.create({"name": "trident", "postprocess_knobs": {"voc21": {"coarse_tresh": 0.2}}})
    with pytest.raises(ValueError, match=r"conf/protocol/trident.yaml: postprocess_knobs.voc21.coarse_tresh is not "
                                         r"a setting of any post-process; their settings: .*sam_refine: coarse_thresh"):
        check_postprocess_knobs(bad)
    with pytest.raises(ValueError, match="coarse_thresh must be"):
        check_postprocess_knobs(OmegaConf.create({"name": "trident",
                                                  "postprocess_knobs": {"voc21": {"coarse_thresh": -1}}}))


def test_the_published_row_matches_only_the_same_specs(tmp_path):
    from test_summary import rec, write

    from proxyclip.evaluation.published import COLLECTIONS, OWN_PROTOCOL_B16, find_published
    from proxyclip.evaluation.records import collect

    row = OWN_PROTOCOL_B16[-1]
    assert row.label.startswith("Trident") and row.avg == round(sum(row.miou) / 8, 1)
    base = ("method=trident", "clip=vit_b16", "vfm=dino_vitb16", "protocol=trident")

    def found(*extra, name):
        records = [rec(d, 1.0, *base, *extra, protocol="trident") for d in ("voc21", "coco_stuff")]
        return find_published(collect([write(tmp_path, records, name)]), COLLECTIONS["methods_own"])

    assert found("postprocess=sam_refine", name="a") is row  # coarse_thresh 0.2 and 0.05: the preset's
    assert found(name="b") is not row  # without the refinement
    assert found("postprocess=sam_refine", "postprocess.coarse_thresh=0.3", name="c") is not row


def test_the_presets_coarse_thresh_is_a_per_dataset_field_of_one_row(tmp_path):
    from test_summary import rec, tables

    base = ("method=trident", "clip=vit_b16", "vfm=dino_vitb16", "protocol=trident", "postprocess=sam_refine")
    records = [rec(d, 40.0 + i, *base, protocol="trident", experiment="paper_methods_own")
               for i, d in enumerate(("voc21", "context60", "coco_stuff"))]
    assert len({r["decode"]["postprocess"]["coarse_thresh"] for r in records}) == 3
    changed = [rec("voc21", 1.0, *base, "postprocess.coarse_thresh=0.3", protocol="trident",
                   experiment="paper_methods_own")]
    (table,) = tables(tmp_path, records + changed, "methods_own")
    rows = {r[0][0] + (" " + r[0][3] if r[0][3] else ""): r[1] for r in table.rows}
    mine = "trident postprocess=sam_refine"  # the setting off the experiment's default post-process; one row
    assert sorted(rows) == [mine, mine + " postprocess.coarse_thresh=0.3"]
    assert [c.published for c in rows[mine][:3]] == [67.1, 38.6, 28.3]  # voc21, context60, coco_stuff
    assert all(c.published is None for c in rows[mine + " postprocess.coarse_thresh=0.3"])
