"""proxyclip.widgets: the explorer driven by setting widget values, checked against the pipeline itself."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip import viz
from proxyclip.widgets import Explorer, ExplorerController

# as tests/conftest.py's TINY, without the backbone choices (the explorer's dropdowns set those)
SMALL = ["method.short_side=64", "method.crop=64", "method.stride=32", "batch_size=2"]
CLASSES = ["sky", "person; people", "horse"]


@pytest.fixture
def factory(tiny_segmenter):
    """Reuse the session's tiny segmenter (the config the explorer would compose); another VFM shares its CLIP."""
    built = []
    other = tiny_segmenter.with_vfm("test_tiny_mae")

    def make(clip, vfm):
        built.append((clip, vfm))
        return {"test_tiny": tiny_segmenter, "test_tiny_mae": other}[vfm]

    make.built = built
    return make


@pytest.fixture
def explorer(factory, rand_image):
    return Explorer(clip="test_tiny", vfm="test_tiny", weights="random", overrides=SMALL, image=rand_image,
                    classes=CLASSES, segmenter_factory=factory, clip_options=["test_tiny"],
                    vfm_options=["test_tiny", "test_tiny_mae"])


def png_size(data: bytes):
    return Image.open(io.BytesIO(data)).size


def proxy_attention_numpy(features: torch.Tensor, beta: float, gamma: float) -> np.ndarray:
    """Independent float64 proxy attention of one window's (C, H, W) features."""
    f = features.double().flatten(1).T.numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = f @ f.T
    s = (s - beta * s.mean()) * gamma
    keep = s >= 0
    empty = ~keep.any(1)
    keep[empty, empty] = True  # an empty row keeps its diagonal
    e = np.where(keep, np.exp(s - np.where(keep, s, -np.inf).max(1, keepdims=True)), 0.0)
    return e / e.sum(1, keepdims=True)


def test_first_view_encodes_once_and_renders(explorer, factory, tiny_segmenter, rand_image):
    c = explorer.controller
    assert (c.n_encodes, c.n_decodes) == (1, 1)
    assert factory.built == [("test_tiny", "test_tiny")]
    # the defaults shown are the config's (conf/method/proxyclip.yaml)
    m = tiny_segmenter.cfg.method
    assert (explorer.gamma.value, explorer.beta.value, explorer.prob_thd.value) == (m.gamma, m.beta, m.prob_thd)
    assert explorer.temperature.value == pytest.approx(1 / m.logit_scale)
    assert (explorer.patch_y.max, explorer.patch_x.max) == (rand_image.shape[1] - 1, rand_image.shape[2] - 1)
    # each PNG is its figure at the explorer's dpi, pixel for pixel
    for png, fig in ((explorer.seg_image.value, explorer._seg_figure), (explorer.attn_image.value, c.attention_figure())):
        w, h = fig.get_size_inches() * explorer.dpi
        assert np.abs(np.subtract(png_size(png), (w, h))).max() < 1 and w > 100  # Agg truncates to whole pixels
    expected = tiny_segmenter.predict(rand_image, CLASSES)
    torch.testing.assert_close(c.prediction.labels, expected.labels)
    assert explorer.progress.value == 1.0 and "encodes 1, decodes 1" in explorer.status.value


def test_sliders_rerun_only_decode_with_the_slider_values(explorer, tiny_segmenter, rand_image):
    c = explorer.controller
    enc_before = c.encoded
    seg_png = explorer.seg_image.value

    explorer.gamma.value = 5.0
    assert (c.n_encodes, c.n_decodes) == (1, 2)
    assert c.encoded is enc_before
    expected = tiny_segmenter.predict(rand_image, CLASSES, gamma=5.0)
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert not torch.equal(c.prediction.scores, tiny_segmenter.predict(rand_image, CLASSES).scores)

    explorer.beta.value = 0.8
    explorer.temperature.value = 0.05  # logit_scale 20
    assert (c.n_encodes, c.n_decodes) == (1, 4)
    pred = c.prediction
    assert {k: pred.params[k] for k in ("method", "beta", "gamma", "logit_scale", "prob_thd")} == {
        "method": "proxyclip", "beta": 0.8, "gamma": 5.0, "logit_scale": pytest.approx(20.0), "prob_thd": 0.0}
    q = torch.softmax(20.0 * pred.scores, dim=0)  # queries: sky, person, people, horse
    torch.testing.assert_close(pred.probs[1], torch.maximum(q[1], q[2]))
    torch.testing.assert_close(pred.probs[0], q[0])

    explorer.prob_thd.value = 0.6
    assert (c.n_encodes, c.n_decodes) == (1, 5)
    pred = c.prediction
    best, arg = pred.probs.max(0)
    torch.testing.assert_close(pred.labels, torch.where(best < 0.6, 0, arg))
    assert explorer.seg_image.value != seg_png


def test_patch_sliders_show_the_chosen_tokens_attention_without_computing(explorer, rand_image):
    c = explorer.controller
    png = explorer.attn_image.value
    # rand_image is 80x112 -> resized 64x90 -> windows x 0..64 and 26..90; test_tiny VFM grid 4x4 (16 px)
    explorer.patch_y.value, explorer.patch_x.value = 10, 100
    assert (c.n_encodes, c.n_decodes) == (1, 1)
    assert explorer.attn_image.value != png
    v = c.attention_view()
    # by hand: (10, 100) -> resized (7.9, 80.3): window 1 (x 26..90), token row 0, column (80.3-26)//16 = 3
    assert v.window == 1 and v.proxy_patch == (0, 3) and v.proxy_grid == (4, 4)
    expected = proxy_attention_numpy(c.encoded.vfm_features[1], beta=c.params["beta"], gamma=c.params["gamma"])
    np.testing.assert_allclose(v.proxy_row.numpy(), expected[3], rtol=1e-4, atol=1e-6)
    # the figure shows that row over window 1's pixels
    fig = c.attention_figure()
    heat = np.asarray(fig.axes[0].images[1].get_array())
    assert heat.shape == tuple(v.window_image.shape[1:]) == (64, 64)
    np.testing.assert_allclose(heat[8::16, 8::16].ravel(), expected[3], rtol=1e-4, atol=1e-6)
    assert fig.axes[0].get_title().startswith("proxy attention")
    # CLIP's own attention of the same point: a distribution over CLIP's grid
    assert v.clip_row.shape == (v.clip_grid[0] * v.clip_grid[1],)
    assert float(v.clip_row.sum()) == pytest.approx(1.0, abs=1e-5)
    assert v.affinity_row is None and "proxy.affinity" not in c.cache  # stages are kept only when shown
    # affinity stages view: S, S', mask, attention of that token (one decode records them)
    explorer.show_affinity.value = True
    assert (c.n_encodes, c.n_decodes) == (1, 2)
    v = c.attention_view()
    f = c.encoded.vfm_features[1].double().flatten(1).T.numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = f @ f.T
    s_norm = (s - c.params["beta"] * s.mean()) * c.params["gamma"]
    np.testing.assert_allclose(v.affinity_row.numpy(), s[3], atol=1e-5)
    np.testing.assert_allclose(v.normalized_row.numpy(), s_norm[3], atol=1e-4)
    np.testing.assert_array_equal(v.mask_row.numpy(), s_norm[3] >= 0)
    titles = [ax.get_title() for ax in c.attention_figure(show_affinity=True).axes if ax.images]
    assert titles[0] == "cosine affinity S" and titles[-1] == "attention softmax(S')"
    explorer.gamma.value = 4.0  # while shown, every decode keeps them
    assert "proxy.affinity" in c.cache and c.n_decodes == 3


def test_backbone_change_reencodes_with_progress_and_caches(explorer, factory):
    c = explorer.controller
    messages, disabled = [], []
    explorer.progress.observe(lambda ch: messages.append(ch.new), names="description")
    explorer.gamma.observe(lambda ch: disabled.append(ch.new), names="disabled")

    first = c.encoded
    explorer.vfm.value = "test_tiny_mae"
    assert (c.n_encodes, c.n_decodes) == (2, 2)
    assert factory.built[-1] == ("test_tiny", "test_tiny_mae")
    assert any(m.startswith("encoding 2 window(s) with test_tiny_mae (CLIP reused)") for m in messages)
    assert messages[-1] == "encoded" and explorer.progress.value == 1.0
    assert disabled == [True, False]  # controls locked during the encode, then released
    assert c.encoded.clip_tokens is first.clip_tokens  # only the VFM ran
    assert not torch.equal(c.encoded.vfm_features, first.vfm_features)
    expected = factory("test_tiny", "test_tiny_mae").predict(c.image, CLASSES)
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert [ax.get_title() for ax in c.attention_figure().axes if ax.images] == [
        "proxy attention (test_tiny_mae)", "CLIP's own attention (test_tiny)"]

    explorer.vfm.value = "test_tiny"  # encoded before: taken from the cache, decoded again
    assert (c.n_encodes, c.n_decodes) == (2, 3)
    assert c.encoded is first


def test_method_dropdown_and_pamr_decode_only(explorer, tiny_segmenter, rand_image):
    c = explorer.controller
    enc = c.encoded
    assert explorer.method.value == "proxyclip" and not explorer.gamma.disabled
    explorer.method.value = "sclip"
    assert (c.n_encodes, c.n_decodes) == (1, 2) and c.encoded is enc
    torch.testing.assert_close(c.prediction.scores, tiny_segmenter.decode(enc, CLASSES, method="sclip").scores)
    assert explorer.gamma.disabled and explorer.beta.disabled  # ProxyCLIP's knobs
    v = c.attention_view()  # SCLIP's attention of the chosen token, heads averaged, on CLIP's grid
    _, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["attention.pattern"], method="sclip")
    t = 1 + v.proxy_grid[0] * v.proxy_grid[1]
    row = cache["attention.pattern"][v.window].mean(0)[1 + v.proxy_patch[0] * v.proxy_grid[1] + v.proxy_patch[1]]
    torch.testing.assert_close(v.proxy_row, row[1:] / row[1:].sum())
    assert cache["attention.pattern"].shape[-1] == t and v.proxy_grid == enc.clip_grid
    assert [ax.get_title() for ax in c.attention_figure().axes if ax.images][0] == "sclip attention"
    explorer.pamr.value = True
    assert (c.n_encodes, c.n_decodes) == (1, 3)
    expected = tiny_segmenter.decode(enc, CLASSES, method="sclip", postprocess="pamr")
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert c.segmentation_figure()._suptitle.get_text().startswith("sclip + PAMR: test_tiny")
    explorer.method.value = "proxyclip"
    assert not explorer.gamma.disabled and c.prediction.params["postprocess"]["name"] == "pamr"


def test_classes_text_decodes_only_and_bad_input_is_reported(explorer):
    c = explorer.controller
    explorer.classes.value = "cat\ndog; puppy"
    assert (c.n_encodes, c.n_decodes) == (1, 2)
    assert c.prediction.class_names == ["cat", "dog; puppy"]
    assert c.prediction.queries == ["cat", "dog", "puppy"]
    explorer.classes.value = "cat\ncat"
    assert c.n_decodes == 2 and "duplicate" in explorer.status.value
    assert c.prediction.class_names == ["cat", "dog; puppy"]


def test_new_image_by_upload_and_by_path(explorer, tmp_path):
    c = explorer.controller
    pixels = (np.random.default_rng(0).random((48, 72, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    explorer.upload.value = ({"name": "up.png", "type": "image/png", "size": len(buf.getvalue()),
                              "content": memoryview(buf.getvalue()),
                              "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    assert c.n_encodes == 2
    torch.testing.assert_close(c.image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert (explorer.patch_y.max, explorer.patch_x.max) == (47, 71)
    assert c.prediction.labels.shape == (48, 72)

    path = tmp_path / "p.png"
    Image.fromarray(pixels[:, ::-1].copy()).save(path)
    explorer.path.value = str(path)
    explorer.load_path.click()
    assert c.n_encodes == 3 and c.image_name == str(path)
    explorer.path.value = str(tmp_path / "missing.png")
    explorer.load_path.click()
    assert c.n_encodes == 3 and "not found" in explorer.status.value


def test_controller_without_widgets(factory, rand_image):
    c = ExplorerController(clip="test_tiny", vfm="test_tiny", image=rand_image, classes=["a", "b"],
                           segmenter_factory=factory)
    assert (c.n_encodes, c.n_decodes) == (1, 1)
    c.set_params(gamma=c.params["gamma"])  # unchanged value: nothing to do
    assert c.refresh() is False
    c.set_params(logit_temperature=0.1)
    assert c.refresh() is True and c.prediction.params["logit_scale"] == pytest.approx(10.0)
    c.set_point(-5, 10_000)  # clamped into the image
    assert c.point == (0.0, rand_image.shape[2] - 1.0)
    v = c.attention_view()
    win, row, col = viz.locate_patch(*c.point, c.encoded.image_size, c.encoded.resized_size, c.encoded.windows,
                                     v.proxy_grid)
    assert (v.window, v.proxy_patch) == (win, (row, col)) == (1, (0, 3))
    assert c.n_encodes == 1


def test_only_what_changed_is_redrawn(explorer):
    """Temperature and threshold change the labels, not the attention: only the segmentation is redrawn."""
    seg_png, attn_png = explorer.seg_image.value, explorer.attn_image.value
    explorer.temperature.value = 0.1
    assert explorer.seg_image.value != seg_png and explorer.attn_image.value == attn_png
    explorer.beta.value = 0.5  # the attention changes with beta
    assert explorer.attn_image.value != attn_png
    seg_png, attn_png = explorer.seg_image.value, explorer.attn_image.value
    explorer.show_affinity.value = True  # a view switch: the attention panel only (one decode records the stages)
    assert explorer.attn_image.value != attn_png and explorer.seg_image.value == seg_png
    assert explorer.controller.n_decodes == 4


def test_a_given_segmenter_is_reused(tiny_segmenter, rand_image):
    built = []
    c = ExplorerController(clip="test_tiny", vfm="test_tiny", image=rand_image, classes=["a"],
                           segmenter=tiny_segmenter, segmenter_factory=lambda *k: built.append(k))
    assert c.segmenter is tiny_segmenter and built == [] and c.n_builds == 0
    assert c.encoded.key == tiny_segmenter.key


def test_pixel_to_data_hand_worked():
    """A 4x2-inch figure at 50 dpi (200x100 px) whose only axes fill it and show a 20x10 image."""
    from matplotlib.figure import Figure

    from proxyclip.widgets import figure_to_png, pixel_to_data

    fig = Figure(figsize=(4, 2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.zeros((10, 20)), aspect="auto")
    png = figure_to_png(fig, dpi=50)
    assert png_size(png) == (200, 100)
    # PNG pixel (px, py) -> data: pixel centres of the image are at integers, 10 PNG px per data unit
    x, y = pixel_to_data(fig, 5.0, 5.0)
    assert (x, y) == pytest.approx((0.0, 0.0))
    x, y = pixel_to_data(fig, 195.0, 95.0)
    assert (x, y) == pytest.approx((19.0, 9.0))
    x, y = pixel_to_data(fig, 100.0, 30.0)
    assert (x, y) == pytest.approx((9.5, 2.5))
    cb_fig = Figure(figsize=(4, 2))
    cb_ax = cb_fig.add_axes((0.5, 0, 0.5, 1))
    cb_ax.imshow(np.zeros((10, 10)), aspect="auto")
    figure_to_png(cb_fig, dpi=50)
    assert pixel_to_data(cb_fig, 20.0, 50.0) is None  # left half: no image panel there


def test_clicking_the_segmentation_chooses_the_patch(explorer, rand_image):
    c = explorer.controller
    fig = explorer._seg_figure
    H_px = fig.bbox.height
    # where the pixel (y=20, x=30) of the image is drawn in the prediction panel, in PNG pixels
    pred_ax = [ax for ax in fig.axes if ax.images][1]
    dx, dy = pred_ax.transData.transform((30, 20))
    decodes = c.n_decodes
    explorer._on_click({"type": "click", "dataX": dx, "dataY": H_px - dy})
    assert (explorer.patch_x.value, explorer.patch_y.value) == (30, 20)
    assert c.point == (20.0, 30.0) and c.n_decodes == decodes
    explorer._on_click({"type": "click", "dataX": 1.0, "dataY": 1.0})  # the corner: no panel, nothing changes
    assert c.point == (20.0, 30.0)
    assert explorer.click_events is not None  # ipyevents wired to the segmentation image


def test_a_backbone_that_fails_to_load_is_reported_and_undone(tiny_segmenter, rand_image):
    def factory(clip, vfm):
        if vfm == "test_tiny_mae":
            raise RuntimeError("weights unavailable (simulated)")
        return tiny_segmenter

    ex = Explorer(clip="test_tiny", vfm="test_tiny", image=rand_image, classes=CLASSES, segmenter_factory=factory,
                  clip_options=["test_tiny"], vfm_options=["test_tiny", "test_tiny_mae"])
    c = ex.controller
    labels = c.prediction.labels.clone()
    ex.vfm.value = "test_tiny_mae"
    assert "could not switch to test_tiny_mae" in ex.status.value and "simulated" in ex.status.value
    assert ex.vfm.value == "test_tiny" and (c.clip_name, c.vfm_name) == ("test_tiny", "test_tiny")
    assert c.n_encodes == 1 and torch.equal(c.prediction.labels, labels)
    assert not ex.gamma.disabled  # controls released
    ex.gamma.value = 4.0  # and the explorer still works
    assert c.n_decodes == 3 and c.prediction.params["gamma"] == 4.0
