"""proxyclip.viz: figures checked headlessly (Agg) for content, against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from matplotlib.patches import Rectangle

from proxyclip import proxy, viz


def image_axes(fig: Figure):
    """Axes that show an image (colour bars excluded)."""
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def render(fig: Figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def two_region_features(h=6, w=8, c=16, seed=0):
    """(1, C, h, w) features: columns < w//2 share vector a, the rest vector b, a ⟂ b."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(c, 2, generator=g))
    feats = torch.empty(1, c, h, w)
    feats[0, :, :, : w // 2] = basis[:, 0, None, None]
    feats[0, :, :, w // 2:] = basis[:, 1, None, None]
    return feats


# ---------------------------------------------------------------- attention maps

def test_attention_heatmap_argmax_lands_on_chosen_patch():
    h, w, H, W = 6, 8, 48, 64  # 8x8-pixel patches
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 32, h, w, generator=g)  # generic features: a token is most similar to itself
    s = proxy.normalize_affinity(proxy.cosine_affinity(feats), beta=1.2, gamma=3.0)
    attn = proxy.masked_softmax(s, proxy.affinity_mask(s))[0]
    image = torch.rand(3, H, W, generator=g)
    for patch in [(0, 0), (2, 5), (5, 7)]:
        k = patch[0] * w + patch[1]
        fig = viz.plot_attention_map(image, attn[k], (h, w), patch=patch)
        (ax,) = image_axes(fig)
        heat = np.asarray(ax.images[1].get_array())
        assert heat.shape == (H, W)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        y1, y2, x1, x2 = viz.patch_box(patch, (h, w), (H, W))
        assert (y1, y2, x1, x2) == (patch[0] * 8, patch[0] * 8 + 8, patch[1] * 8, patch[1] * 8 + 8)
        assert y1 <= y < y2 and x1 <= x < x2
        # the outline drawn is that patch's box
        (rect,) = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert rect.get_xy() == (x1 - 0.5, y1 - 0.5) and (rect.get_width(), rect.get_height()) == (8, 8)
        render(fig)


def test_attention_of_a_two_region_image_stays_in_its_region():
    h, w, H, W = 6, 8, 60, 80
    feats = two_region_features(h, w)
    s = proxy.normalize_affinity(proxy.cosine_affinity(feats), beta=1.2, gamma=3.0)
    attn = proxy.masked_softmax(s, proxy.affinity_mask(s))[0]
    k = 3 * w + 1  # a patch in the left region
    fig = viz.plot_attention_map(torch.zeros(3, H, W), attn[k], (h, w), patch=(3, 1))
    heat = np.asarray(image_axes(fig)[0].images[1].get_array())
    left, right = heat[:, : W // 2], heat[:, W // 2:]
    # the other region is masked (cosine 0 < beta * mean): exactly zero; own region uniform 1/24
    assert (right == 0).all()
    np.testing.assert_allclose(left, 1.0 / (h * w // 2), rtol=1e-5)


def test_patch_heatmap_is_nearest_block_upsampling():
    row = np.arange(12, dtype=np.float32)
    heat = viz.patch_heatmap(row, (3, 4), (9, 8))
    np.testing.assert_array_equal(heat, np.kron(row.reshape(3, 4), np.ones((3, 2))))
    # non-divisible size: every pixel shows the token whose box holds it
    heat = viz.patch_heatmap(torch.tensor(row), (3, 4), (10, 7))
    for y in range(10):
        for x in range(7):
            r, c = int(y * 3 / 10), int(x * 4 / 7)
            assert heat[y, x] == row[r * 4 + c]


def test_attention_grid_panels_and_titles():
    rows = [torch.softmax(torch.randn(24), 0) for _ in range(3)]
    maps = [(f"map {i}", r, (4, 6), (1, 2)) for i, r in enumerate(rows)]
    fig = viz.plot_attention_grid(torch.rand(3, 40, 60), maps, ncols=2)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["map 0", "map 1", "map 2"]
    for ax, r in zip(axes, rows):
        heat = np.asarray(ax.images[1].get_array())
        np.testing.assert_allclose(heat[::10, ::10].ravel(), r.numpy(), rtol=1e-6)


def test_clip_attention_row_of_a_clip_decode_is_the_blocks_multihead_attention(tiny_segmenter, rand_image):
    """CLIP's own attention, read with pattern_row from the ``attention.pattern`` hook of a ``method="clip"``
    decode, equals torch's own attention weights of the block (CLS column dropped, renormalized)."""
    enc = tiny_segmenter.encode(rand_image)
    _, cache = tiny_segmenter.run_with_cache(enc, ["a", "b"], names=["attention.pattern"], method="clip")
    block = tiny_segmenter.clip_model.visual.transformer.resblocks[-1]
    assert isinstance(block.attn, torch.nn.MultiheadAttention)
    with torch.no_grad():
        x = block.ln_1(enc.clip_tokens)
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # (n_win, T, T)
    gh, gw = enc.clip_grid
    H, W = enc.image_size
    for y, x_ in ((0, 0), (H // 2, W - 1), (H - 1, W // 3)):
        row, grid, (r, c), win = viz.pattern_row(cache["attention.pattern"], enc, y, x_)
        assert grid == (gh, gw) and (win, r, c) == viz.locate_patch(y, x_, enc.image_size, enc.resized_size,
                                                                    enc.windows, (gh, gw), pad=enc.pad)
        expected = weights[win, 1 + r * gw + c, 1:]
        torch.testing.assert_close(row, expected / expected.sum(), rtol=1e-4, atol=1e-6)
    fig = viz.plot_attention_map(rand_image, row, grid, patch=(r, c), title="CLIP")
    assert image_axes(fig)[0].get_title() == "CLIP"


def test_affinity_stages_show_the_normalization_and_mask(tiny_segmenter, rand_image):
    beta, gamma = 1.1, 2.5
    _, cache = tiny_segmenter.run_with_cache(rand_image, ["a", "b"], names=["vfm.features", "proxy.affinity",
                                             "proxy.affinity_normalized", "proxy.mask", "proxy.attention"],
                                             beta=beta, gamma=gamma)
    feats = cache["vfm.features"][0].double()  # (C, Hv, Wv) of window 0
    grid = tuple(feats.shape[-2:])
    # independent computation in float64 numpy
    f = feats.flatten(1).T.numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    S = f @ f.T
    S_norm = (S - beta * S.mean()) * gamma
    k = 5
    fig = viz.plot_affinity_stages(rand_image, cache["proxy.affinity"][0, k], cache["proxy.affinity_normalized"][0, k],
                                   cache["proxy.mask"][0, k], grid, patch=divmod(k, grid[1]),
                                   attention_row=cache["proxy.attention"][0, k])
    axes = image_axes(fig)
    assert [ax.get_title().split(":")[0] for ax in axes] == ["cosine affinity S", "normalized S'", "kept (S' >= 0)",
                                                            "attention softmax(S')"]
    H, W = rand_image.shape[1:]
    ys = (np.arange(grid[0]) * H + H // 2) // grid[0]  # one pixel inside each token's block
    xs = (np.arange(grid[1]) * W + W // 2) // grid[1]
    shown = [np.asarray(ax.images[1].get_array())[np.ix_(ys, xs)].ravel() for ax in axes]
    np.testing.assert_allclose(shown[0], S[k], atol=1e-5)
    np.testing.assert_allclose(shown[1], S_norm[k], atol=1e-4)
    kept = S_norm[k] >= 0
    if not kept.any():
        kept[k] = True
    np.testing.assert_array_equal(shown[2].astype(bool), kept)
    assert axes[2].get_title().endswith(f"{kept.sum()}/{kept.size}")
    expected_attn = np.where(kept, np.exp(S_norm[k] - S_norm[k][kept].max()), 0)
    np.testing.assert_allclose(shown[3], expected_attn / expected_attn.sum(), rtol=1e-4, atol=1e-7)
    # the normalized panel's colours are centred on 0 (the masking threshold)
    lo, hi = axes[1].images[1].get_clim()
    assert lo == pytest.approx(-hi)


# ---------------------------------------------------------------- label maps and scores

def test_colorize_labels_palette_and_ignore():
    labels = np.array([[0, 1, 2], [255, 7, 1]])
    out = viz.colorize_labels(labels, n_classes=3)
    pal = viz.label_palette(3)
    np.testing.assert_array_equal(out[0], pal[[0, 1, 2]])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])  # ignore
    np.testing.assert_array_equal(out[1, 1], [0, 0, 0])  # out of range
    np.testing.assert_array_equal(out[1, 2], pal[1])


def test_palette_colours_are_distinct_and_far_from_black_and_white():
    pal = viz.label_palette(256).astype(np.float64) / 255
    assert len(np.unique(pal, axis=0)) == 256  # every class its own colour
    assert (pal.max(1) >= 0.5).all()  # none near black (ignored pixels are black)
    assert (pal.min(1) <= 0.75).all()  # none near white
    assert (pal.max(1) - pal.min(1) >= 0.14).all()  # none grey
    dist = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(256) * 9
    assert dist[:64, :64].min() > 0.08  # the first 64 (any benchmark's present classes) well apart
    assert np.diag(dist, 1).min() > 0.25  # neighbouring indices clearly different
    np.testing.assert_array_equal(viz.label_palette(5), viz.label_palette(256)[:5])  # one palette, any n
    from matplotlib.colors import to_rgb

    banner = np.array(to_rgb(viz.marks.COLOR))
    assert np.abs(pal - banner).max(1).min() > 12 / 255  # the red band's colour is no class's


def opaque_pixels(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def test_segmentation_panels_are_opaque_label_maps_in_the_legends_colours():
    H, W = 20, 30
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    pred = torch.zeros(H, W, dtype=torch.long)
    pred[:, 10:] = 2
    gt = pred.clone()
    gt[:5] = 3
    gt[0, 0] = 255
    names = ["background", "cat; kitty", "dog", "sky; heaven"]
    fig = viz.plot_segmentation(image, pred, names, gt_labels=gt)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["image", "ground truth", "prediction"]
    pal = viz.label_palette(4)
    np.testing.assert_array_equal(opaque_pixels(axes[2]), pal[pred.numpy()])  # class 0 too: a colour, not black
    shown_gt = opaque_pixels(axes[1])
    np.testing.assert_array_equal(shown_gt[0, 0], [0, 0, 0])  # ignored: black, which no class is
    np.testing.assert_array_equal(shown_gt[1:], pal[gt.numpy()[1:]])
    assert axes[0].collections  # the prediction's class boundaries drawn on the image
    # legend: classes present in prediction or ground truth, first synonym, in class order, the panels' colours
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["background", "dog", "sky"]
    for handle, k in zip(legend.legend_handles, [0, 2, 3]):
        np.testing.assert_allclose(handle.get_facecolor()[:3], pal[k] / 255)
    assert len(image_axes(viz.plot_segmentation(image, pred, names))) == 2  # no ground truth: 2 panels
    render(fig)


def test_baseline_comparison_panels():
    image = torch.rand(3, 16, 16)
    base = torch.zeros(16, 16, dtype=torch.long)
    prox = torch.ones(16, 16, dtype=torch.long)
    fig = viz.plot_baseline_comparison(image, base, prox, ["a", "b"])
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["image", "CLIP, no VFM (baseline)", "ProxyCLIP"]
    pal = viz.label_palette(2)
    assert (opaque_pixels(axes[1]) == pal[0]).all() and (opaque_pixels(axes[2]) == pal[1]).all()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]


def test_class_boundaries_hand_worked():
    lab = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    expected = np.array([[False, True, False], [True, True, True], [False, False, False]])
    np.testing.assert_array_equal(viz.class_boundaries(lab), expected)


# ---------------------------------------------------------------- the overlay (proxyclip-segment) and the mark

def fake_prediction(h, w, names, random_weights=False, seed=0):
    """A Prediction's fields the overlay reads: blocks of classes 0..K-1 across the width, class 0 the widest."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(h, w, dtype=torch.long)
    edges = np.linspace(0.4 * w, w, len(names)).astype(int)
    for k in range(1, len(names)):
        labels[:, edges[k - 1]:] = k
    return SimpleNamespace(image=torch.rand(3, h, w, generator=g), labels=labels, class_names=list(names),
                           random_weights=random_weights, spec=None)


def weights_cfg(source):
    return OmegaConf.create({"weights": {"source": source}})


def drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_overlay_png_legend_swatches_are_the_colours_of_their_classes_pixels(tmp_path):
    """Read the SAVED overlay.png back: at each legend swatch and at a pixel of its class in the label
    map, the same colour (the palette's); class 0 is not black; nothing was cropped."""
    from PIL import Image

    from proxyclip.cli.segment import overlay_figure, write_outputs

    names = ["person", "sky", "horse", "grass"]
    pred = fake_prediction(60, 90, names, random_weights=True)
    cfg = weights_cfg("random")
    write_outputs(pred, tmp_path, cfg, "x.png")
    png = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    fig = overlay_figure(pred, cfg)  # the same figure, to find where things are
    renderer = drawn(fig)
    assert png.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))  # saved whole: positions hold
    height = png.shape[0]
    (label_ax,) = [ax for ax in fig.axes if ax.get_title() == "label map"]
    legend = [ax for ax in fig.axes if ax.get_label() == "legend"][0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names
    pal = viz.label_palette(len(names))
    lab = pred.labels.numpy()
    for k, handle in enumerate(legend.legend_handles):
        box = handle.get_window_extent(renderer)
        swatch = png[height - int(box.y0 + box.y1) // 2, int(box.x0 + box.x1) // 2]
        ys, xs = np.nonzero(lab == k)
        y, x = ys[len(ys) // 2], int(np.median(xs))  # a pixel inside class k's block
        px, py = label_ax.transData.transform((x, y))
        pixel = png[height - int(py), int(px)]
        np.testing.assert_allclose(swatch, pal[k], atol=2)
        np.testing.assert_allclose(pixel, swatch, atol=2)
    assert png[height - int(py), int(px)].max() > 100 and pal[0].max() > 127  # class 0 is a colour, not black
    band = png[: int(0.3 * fig.dpi)]  # the red random-weights band on top
    assert (np.abs(band - (192, 0, 0)).max(-1) < 12).any()  # the banner colour, #c00000


def banner(fig):
    (text,) = [t for t in fig.texts if t.get_label() == viz.marks.MARK_LABEL]
    return text


def test_banner_says_why_the_weights_are_random():
    pred = fake_prediction(40, 60, ["a", "b"], random_weights=True)
    from proxyclip.cli.segment import overlay_figure

    chosen = banner(overlay_figure(pred, weights_cfg("random"))).get_text()
    fallback = banner(overlay_figure(pred, weights_cfg("pretrained"))).get_text()
    assert "weights=random was chosen" in chosen and "unavailable" not in chosen
    assert "pretrained weights were unavailable" in fallback and "chosen" not in fallback
    real = fake_prediction(40, 60, ["a", "b"], random_weights=False)
    assert not [t for t in overlay_figure(real, weights_cfg("pretrained")).texts
                if t.get_label() == viz.marks.MARK_LABEL]
    # the reason of a Segmenter: its random_weights and cfg.weights.source
    assert viz.segmenter_reason(SimpleNamespace(random_weights=True, cfg=weights_cfg("local"))) == "fallback"
    assert viz.segmenter_reason(SimpleNamespace(random_weights=False, cfg=weights_cfg("random"))) is None
    with pytest.raises(ValueError, match="reason must be one of chosen, fallback"):
        viz.mark_random_weights(Figure(), "because")


@pytest.mark.parametrize("size", [(40, 2000), (2000, 40), (80, 112)])
def test_banner_fits_any_aspect_and_covers_nothing(size):
    from proxyclip.cli.segment import overlay_figure

    pred = fake_prediction(*size, ["person", "sky", "horse"], random_weights=True)
    fig = overlay_figure(pred, weights_cfg("pretrained"))
    renderer = drawn(fig)
    text = banner(fig)
    box = text.get_window_extent(renderer)
    assert viz.marks.FONT_MIN <= text.get_fontsize() <= viz.marks.FONT_MAX
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # wholly visible
    for ax in fig.axes:
        assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title() or ax.get_label()
    (label_ax,) = [ax for ax in fig.axes if ax.get_title() == "label map"]
    h, w = size
    panel = label_ax.get_window_extent(renderer)
    assert panel.width / panel.height == pytest.approx(w / h, rel=0.05)  # the image's aspect, undistorted


def test_mark_on_a_laid_out_figure_keeps_its_panels_and_title():
    """A constrained-layout figure with a suptitle (the explorer's): the band goes above, nothing moves into it."""
    image, pred = torch.rand(3, 30, 40), torch.zeros(30, 40, dtype=torch.long)
    plain = viz.plot_segmentation(image, pred, ["a"], title="the title")
    drawn(plain)
    sizes = [ax.get_window_extent().size for ax in image_axes(plain)]
    fig = viz.mark_random_weights(viz.plot_segmentation(image, pred, ["a"], title="the title"), "chosen")
    renderer = drawn(fig)
    box = banner(fig).get_window_extent(renderer)
    assert fig.get_size_inches()[1] == pytest.approx(plain.get_size_inches()[1] + viz.marks.BAND_INCHES)
    for ax, size in zip(image_axes(fig), sizes):
        np.testing.assert_allclose(ax.get_window_extent().size, size, atol=1)  # panels keep their size
        assert not box.overlaps(ax.get_tightbbox(renderer))
    assert not box.overlaps(fig._suptitle.get_window_extent(renderer))
    assert fig._suptitle.get_text() == "the title"


def test_class_scores_one_panel_per_query_on_one_scale():
    scores = torch.randn(3, 12, 18)
    fig = viz.plot_class_scores(torch.rand(3, 12, 18), scores, ["sky", "person", "people"], ncols=2)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["image", "sky", "person", "people"]
    for q, ax in enumerate(axes[1:]):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), scores[q].numpy())
        assert ax.images[0].get_clim() == pytest.approx((float(scores.min()), float(scores.max())))
    with pytest.raises(ValueError, match="Q = len"):
        viz.plot_class_scores(torch.rand(3, 12, 18), scores, ["sky"])


def test_sweep_heatmap_marks_the_best_cell():
    values = np.array([[10.0, 12.0, 11.0], [9.0, 15.5, 14.0]])
    fig = viz.plot_sweep_heatmap(values, [1.0, 1.2], [2.0, 3.0, 4.0])
    (ax,) = image_axes(fig)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), values)
    (rect,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert rect.get_xy() == (0.5, 0.5)  # column 1 (gamma 3.0), row 1 (beta 1.2)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.1f}" for v in values.ravel())
    assert "beta=1.2, gamma=3" in ax.get_title()
    with pytest.raises(ValueError, match="do not match"):
        viz.plot_sweep_heatmap(values, [1.0], [2.0, 3.0, 4.0])


# ---------------------------------------------------------------- geometry

def test_locate_patch_hand_worked():
    # original 100x200, resized 50x100, two 50x50 windows, a 5x5 grid (10-pixel tokens)
    windows = [(0, 50, 0, 50), (0, 50, 50, 100)]
    # pixel (30, 150) -> resized (14.75, 74.75): window 1, row 1 (10..20), column 2 (70..80 -> 20..30 in window)
    assert viz.locate_patch(30, 150, (100, 200), (50, 100), windows, (5, 5)) == (1, 1, 2)
    assert viz.locate_patch(0, 0, (100, 200), (50, 100), windows, (5, 5)) == (0, 0, 0)
    assert viz.locate_patch(99, 199, (100, 200), (50, 100), windows, (5, 5)) == (1, 4, 4)
    # overlapping windows: the one whose centre is nearer wins
    overlapping = [(0, 40, 0, 40), (0, 40, 20, 60)]
    assert viz.locate_patch(10, 25, (40, 60), (40, 60), overlapping, (4, 4))[0] == 0
    assert viz.locate_patch(10, 35, (40, 60), (40, 60), overlapping, (4, 4)) == (1, 1, 1)
    # padding: a 10-pixel window padded by 1 each side is a 12-pixel grid of 3 tokens (4 pixels each)
    box = [(0, 10, 0, 10)]
    assert viz.locate_patch(0, 0, (10, 10), (10, 10), box, (3, 3), pad=(1, 1, 1, 1)) == (0, 0, 0)
    assert viz.locate_patch(3, 2, (10, 10), (10, 10), box, (3, 3), pad=(1, 1, 1, 1)) == (0, 1, 0)
    assert viz.locate_patch(9, 7, (10, 10), (10, 10), box, (3, 3), pad=(1, 1, 1, 1)) == (0, 2, 2)


def test_window_pixels_is_the_resized_crop():
    image = torch.rand(3, 40, 60)
    crop = viz.window_pixels(image, (20, 30), (5, 15, 10, 30))
    expected = F.interpolate(image[None], size=(20, 30), mode="bilinear", align_corners=False)[0, :, 5:15, 10:30]
    torch.testing.assert_close(crop, expected)
    torch.testing.assert_close(viz.window_pixels(image, (40, 60), (0, 40, 0, 60)), image)


def test_image_to_float_hwc_layouts():
    chw = torch.zeros(3, 4, 5)
    chw[1] = 1.0
    out = viz.image_to_float_hwc(chw)
    assert out.shape == (4, 5, 3) and (out[..., 1] == 1).all() and (out[..., [0, 2]] == 0).all()
    u8 = (out * 255).astype(np.uint8)
    np.testing.assert_allclose(viz.image_to_float_hwc(u8), out)


def test_sweep_heatmap_with_named_axes_and_missing_cells():
    values = np.array([[30.0, np.nan], [25.0, 41.0]])
    fig = viz.plot_sweep_heatmap(values, ["vit_b16", "vit_l14"], ["dino_vitb8", "none"], row_name="CLIP",
                                 col_name="VFM")
    (ax,) = image_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dino_vitb8", "none"]
    assert sorted(t.get_text() for t in ax.texts) == ["25.0", "30.0", "41.0"]  # NaN left blank
    (rect,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert rect.get_xy() == (0.5, 0.5)
    assert ax.get_title() == "mIoU: best 41.0 at CLIP=vit_l14, VFM=none"


def test_sweep_line_marks_the_best_point():
    fig = viz.plot_sweep_line([10.0, 14.5, np.nan, 12.0], [0.5, 1.0, 2.0, 4.0], "gaussian_std")
    (ax,) = fig.axes
    (line, best) = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), [0.5, 1.0, 4.0])  # the NaN point left out
    np.testing.assert_array_equal(line.get_ydata(), [10.0, 14.5, 12.0])
    assert (best.get_xdata()[0], best.get_ydata()[0]) == (1.0, 14.5)
    assert sorted(t.get_text() for t in ax.texts) == ["10.0", "12.0", "14.5"]
    assert ax.get_xlabel() == "gaussian_std" and ax.get_title() == "mIoU: best 14.5 at gaussian_std=1"
    render(fig)
    switches = viz.plot_sweep_line([3.0, 5.0], [True, False], "residual", metric="aAcc")
    ax = switches.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["True", "False"]  # categories, in the given order
    assert ax.get_title() == "aAcc: best 5.0 at residual=False" and ax.get_ylabel() == "aAcc"
    with pytest.raises(ValueError, match="do not match the 3 values of beta"):
        viz.plot_sweep_line([1.0, 2.0], [1, 2, 3], "beta")
