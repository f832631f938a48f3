"""proxyclip.widgets / proxyclip.explorer: the explorer driven by setting widget values, checked against
the pipeline itself and against the knob declarations (proxyclip/knobs.py) its controls are built from."""

from __future__ import annotations

import datetime
import io

import ipywidgets as W
import numpy as np
import naive
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyclip import Segmenter, viz
from proxyclip.config import CONF_DIR
from proxyclip.explorer.controls import KnobPanel, control_value, knob_control
from proxyclip.explorer.pipelines import clip_own_attention
from proxyclip.knobs import Knob
from proxyclip.methods import METHODS, get_method
from proxyclip.parts import block_of, method_parts
from proxyclip.postprocess import get_postprocess
from proxyclip.resolve import postprocess_presets
from proxyclip.widgets import Explorer, ExplorerController

from conftest import tiny_config

CLASSES = ["sky", "person; people", "horse"]
WIDGET_OF_KIND = {"bool": W.Checkbox, "choice": W.Dropdown, "ints": W.Text}


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
    return Explorer(clip="test_tiny", vfm="test_tiny", weights="random", image=rand_image,
                    classes=CLASSES, segmenter_factory=factory, clip_options=["test_tiny"],
                    vfm_options=["test_tiny", "test_tiny_mae"])


def png_size(data: bytes):
    return Image.open(io.BytesIO(data)).size


def yaml_values(cfg, method: str):
    """Every knob's default read straight from the YAML files: conf/method/<m>.yaml, prob_thd from the protocol."""
    node = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    return {k.name: cfg.protocol.prob_thd if k.name == "prob_thd" else node[k.name] for k in get_method(method).all_knobs}


def expected_widget(knob: Knob):
    if knob.kind in WIDGET_OF_KIND:
        return WIDGET_OF_KIND[knob.kind]
    if knob.slider is not None:
        return W.IntSlider if knob.kind == "int" else W.FloatSlider
    return W.BoundedIntText if knob.kind == "int" else W.BoundedFloatText


def move(control, knob: Knob, value) -> None:
    control.value = ", ".join(map(str, value)) if knob.kind == "ints" else value


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


def test_first_view_encodes_once_and_shows_the_declared_knobs(explorer, factory, tiny_segmenter, rand_image):
    c = explorer.controller
    assert (c.n_encodes, c.n_decodes) == (1, 1)
    assert factory.built == [("test_tiny", "test_tiny")]
    cfg = tiny_segmenter.cfg
    meth = get_method(cfg.method.name)
    # one control per declared knob of the configured method, in order, showing its YAML value
    assert explorer.method.value == meth.name
    assert list(explorer.knob_panel.controls) == [k.name for k in meth.all_knobs]
    assert {n: explorer.knob_panel.value(n) for n in explorer.knob_panel.controls} == yaml_values(cfg, meth.name)
    for knob in meth.all_knobs:
        w = explorer.knob_panel.controls[knob.name]
        assert type(w) is expected_widget(knob) and w.description == knob.name and w.tooltip == knob.doc
    # the post-process: the preset whose settings are the configured ones, with its declared settings
    post = get_postprocess(cfg.postprocess.name)
    assert explorer.postprocess.value in postprocess_presets()
    assert OmegaConf.load(CONF_DIR / "postprocess" / f"{explorer.postprocess.value}.yaml").name == post.name
    assert list(explorer.post_panel.controls) == list(post.settings)
    assert (explorer.patch_y.max, explorer.patch_x.max) == (rand_image.shape[1] - 1, rand_image.shape[2] - 1)
    # each PNG is its figure at the explorer's dpi, pixel for pixel
    for png, fig in ((explorer.seg_image.value, explorer._seg_figure), (explorer.attn_image.value, c.attention_figure())):
        w, h = fig.get_size_inches() * explorer.dpi
        assert np.abs(np.subtract(png_size(png), (w, h))).max() < 1 and w > 100  # Agg truncates to whole pixels
    expected = tiny_segmenter.predict(rand_image, CLASSES)
    torch.testing.assert_close(c.prediction.labels, expected.labels)
    assert explorer.progress.value == 1.0 and "encodes 1, decodes 1" in explorer.status.value


PROPOSALS = np.zeros((80, 112), np.int64)  # rand_image's mask proposals (masks=file: image.npz), 0 = unsegmented
PROPOSALS[:40, :56], PROPOSALS[40:, :] , PROPOSALS[:40, 80:] = 1, 2, 3


@pytest.fixture(scope="module")
def deep_segmenter(tmp_path_factory):
    """A 12-block tiny CLIP (clip=test_tiny_deep: every method's YAML defaults fit, e.g. ResCLIP's
    rcs_layers [5, 6, 7, 8]) with mask proposals read from a file (masks=file; a tensor image is named
    "image" in the explorer)."""
    folder = tmp_path_factory.mktemp("proposals")
    np.savez_compressed(folder / "image.npz", instance_mask=PROPOSALS)
    return Segmenter.from_config(tiny_config("clip=test_tiny_deep", "masks=file", f"masks.dir={folder}"))


@pytest.fixture
def deep_explorer(deep_segmenter, rand_image):
    return Explorer(clip="test_tiny_deep", vfm="test_tiny", image=rand_image, classes=CLASSES,
                    segmenter=deep_segmenter, clip_options=["test_tiny_deep"], vfm_options=["test_tiny"])


def earlier_parts(seg, meth, values):
    """The layer parts a method reads from blocks before the last (the last block's input is clip_tokens)."""
    return [p for p in method_parts(meth, values, seg.clip.num_blocks) if block_of(p) < seg.clip.num_blocks - 1]


def move_to_tiny_values(explorer, method: str) -> None:
    """Move the controls of the knobs whose YAML defaults do not fit the tiny image (tests/naive.py
    TINY_KNOBS of an image-level method: LPOSS's k <= its 32 patches) to their tiny values."""
    panel = explorer.knob_panel
    for name, value in naive.tiny_values(method).items():
        knob = next(k for k in panel.knobs if k.name == name)
        move(panel.controls[name], knob, value)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_methods_controls_are_its_knobs_and_each_decodes_once(deep_explorer, deep_segmenter, method):
    """Every registered method (window- or image-level) in the explorer on the 12-block tiny CLIP: its
    controls are its declared knobs at its YAML values, each control one decode, and the attention
    panel shows the method's own per-pixel attention, or says why there is none."""
    explorer, seg = deep_explorer, deep_segmenter
    c = explorer.controller
    meth = METHODS[method]
    image_level = meth.level == "image"
    values = yaml_values(seg.cfg, method)
    if method != c.method:
        explorer.method.value = method
        # a method reading earlier blocks' tokens: CLIP encoded once more keeping them (the VFM part reused)
        assert (c.n_encodes, c.n_decodes) == (1 + bool(earlier_parts(seg, meth, values)),
                                              1 + (c.prediction.spec.method == method))
    assert all(p in c.encoded.layers for p in earlier_parts(seg, meth, values))
    panel = explorer.knob_panel
    assert list(panel.controls) == [k.name for k in meth.all_knobs]
    assert panel.knobs == meth.all_knobs
    assert {n: panel.value(n) for n in panel.controls} == values  # that method's YAML defaults
    if c.prediction.spec.method != method:  # a default that does not fit the tiny image: said, then fixed
        assert image_level and naive.tiny_values(method), method
        assert any(f"{k}=" in explorer.status.value for k in naive.tiny_values(method)), explorer.status.value
        move_to_tiny_values(explorer, method)
        values.update(naive.tiny_values(method))
        assert c.prediction.spec.method == method
    for knob in meth.all_knobs:
        assert type(panel.controls[knob.name]) is expected_widget(knob)
    encodes = c.n_encodes
    render = explorer._render
    explorer._render = lambda *a, **k: None  # the knob loop checks the decodes; the figures are drawn below
    for knob in meth.all_knobs:  # move each control: one decode, its value in the prediction's spec
        decodes = c.n_decodes
        if knob.name in naive.REFUSED_SWITCHES.get(method, ()):  # moved at the end (its error stays in the status)
            continue
        values[knob.name] = new = naive.other_value(knob, values[knob.name])
        move(panel.controls[knob.name], knob, new)
        assert (c.n_encodes, c.n_decodes) == (encodes, decodes + 1), (knob.name, explorer.status.value)
        got = c.prediction.spec.params()[knob.name]
        assert got == new and type(got) is type(new), knob.name
        if (method, knob.name) in naive.NARROWS:  # moved back, so the knobs after it keep their whole range
            values[knob.name] = naive.other_value(knob, new)
            move(panel.controls[knob.name], knob, values[knob.name])
            assert (c.n_encodes, c.n_decodes) == (encodes, decodes + 2), (knob.name, explorer.status.value)
    explorer._render = render
    # everything moved at once equals a decode of the pipeline itself with those values
    enc = c.encoded
    own = seg.for_method(method)  # a method reading another VFM readout (CASS: keys): CLIP part reused
    expected = own.decode(own.encode(enc.image, reuse=enc, keep=tuple(enc.layers)), CLASSES, method=method, **values)
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    torch.testing.assert_close(c.prediction.labels, expected.labels)
    assert c.prediction.spec == expected.spec
    # the attention panel: the method's own attention of the chosen pixel, or why there is none
    v = c.attention_view()
    titles = [ax.get_title() for ax in c.attention_figure().axes if ax.images]
    suptitle = c.attention_figure()._suptitle
    assert f"CLIP's own attention (test_tiny_deep)" in titles
    if image_level:  # no per-pixel attention: a message, and not the pattern of a method it calls (MaskCLIP's)
        assert v.proxy_row is None and "attention.pattern" not in c.cache
        assert v.message.startswith(f"{method} is an image-level method") and "no per-pixel attention" in v.message
        assert suptitle.get_text() == v.message and v.message in explorer.status.value
        assert not any(t.startswith(method) for t in titles)
        assert explorer.show_affinity.disabled  # the per-pixel stages view is off for it
    elif "attention.pattern" in c.cache:
        assert v.message is None and suptitle is None and not explorer.show_affinity.disabled
        assert float(v.proxy_row.sum()) == pytest.approx(1.0, abs=1e-4) and (v.proxy_row >= 0).all()
        assert any(t.startswith(f"{method} attention") for t in titles)
    else:  # runs its own last block without firing attention.pattern
        assert v.proxy_row is None and "records no attention.pattern" in v.message
    for name in naive.REFUSED_SWITCHES.get(method, ()):  # a switch the method refuses: said, no decode, control back
        decodes, knob = c.n_decodes, next(k for k in meth.all_knobs if k.name == name)
        move(panel.controls[name], knob, naive.other_value(knob, values[name]))
        assert c.n_decodes == decodes and f"method.{name}=false" in explorer.status.value, explorer.status.value
        assert panel.value(name) == values[name] == c.prediction.spec.params()[name]
    for other in ("clip", "proxyclip"):  # back to a window-level method: its attention is drawn again
        if other != method:
            explorer.method.value = other
            assert c.attention_view().message is None and not explorer.show_affinity.disabled
            break


def _rcs_reference(seg, enc, layers, win, token):
    """ResCLIP's RCS row by hand: the float64 mean over ``layers`` of each block's softmax(tau q k^T)
    from the encode's layer parts, heads averaged, the chosen token's row, CLS dropped, renormalized."""
    total = sum(_block_pattern64(seg.clip.block(i), enc.layers[f"clip.blocks.{i}.resid_pre"][win:win + 1])[0]
                for i in layers) / len(layers)
    row = total.mean(0)[token, 1:]
    return row / row.sum()


def test_resclips_views_are_its_rcs_attention_and_sfr_matrix(deep_segmenter, rand_image):
    """method=resclip adds its registered views (proxyclip/attention_views.py): the RCS attention, SFR's
    same-label row and SFR's matrix A_sfr of the chosen pixel, from the hook points its decode fires."""
    seg = deep_segmenter
    c = ExplorerController(clip="test_tiny_deep", vfm="test_tiny", image=rand_image, classes=CLASSES, segmenter=seg)
    c.set_method("resclip")
    c.refresh()
    c.set_point(10, 100)
    v = c.attention_view()
    # by hand: (10, 100) -> window 1, CLIP grid 4x4 (16 px): token row 0, column 3 -> token 1 + 3 (CLS first)
    assert (v.window, v.clip_patch) == (1, (0, 3))
    titles = [t for t, *_ in v.extra]
    assert titles == ["ResCLIP RCS attention (rcs_layers' mean)", "ResCLIP SFR: same provisional label",
                      "ResCLIP SFR matrix A_sfr (row)"]
    rows = {t: (row, grid, patch) for t, row, grid, patch in v.extra}
    rcs, grid, patch = rows[titles[0]]
    assert (grid, patch) == ((4, 4), (0, 3))
    ref = _rcs_reference(seg, c.encoded, c.knobs["rcs_layers"], 1, 1 + 3)
    np.testing.assert_allclose(rcs.numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)
    # SFR: what a decode of the pipeline itself records at the same settings
    _, cache = seg.run_with_cache(c.encoded, CLASSES, names=["resclip.patch_labels", "resclip.sfr"],
                                  method="resclip", **c.knobs)
    labels = cache["resclip.patch_labels"][1]
    same, grid, patch = rows[titles[1]]
    assert (grid, patch) == ((4, 4), (0, 3))
    np.testing.assert_array_equal(same.numpy(), (labels.flatten() == labels[0, 3]).float().numpy())
    assert same[3] == 1.0  # the chosen patch has its own label
    sfr_row = cache["resclip.sfr"][1, 1 + 3, 1:]
    sfr, _, _ = rows[titles[2]]
    np.testing.assert_allclose(sfr.numpy(), (sfr_row / sfr_row.sum()).numpy(), rtol=1e-5, atol=1e-7)
    fig_titles = [ax.get_title() for ax in c.attention_figure().axes if ax.images]
    assert fig_titles[-3:] == titles and fig_titles[0] == "resclip attention"
    # a view whose hook does not fire is not drawn: SFR off -> the RCS view only; RCS off -> the SFR views only
    for knobs, shown in (({"sfr": False}, titles[:1]), ({"sfr": True, "rcs": False}, titles[1:])):
        c.set_knobs(**knobs)
        c.refresh()
        assert [t for t, *_ in c.attention_view().extra] == shown, knobs
    c.set_method("naclip")
    c.refresh()
    assert c.attention_view().extra == [] and c.n_decodes == 5


def test_mask_proposals_toggle_draws_the_encodes_proposals(deep_explorer, explorer):
    """The mask-proposals checkbox draws Encoded.masks (masks=file: the image's .npz) over the image
    panel, computing nothing; without proposals (masks=none) it says so."""
    from proxyclip.explorer import figures

    c = deep_explorer.controller
    assert torch.equal(c.encoded.masks, torch.from_numpy(PROPOSALS))
    counts, png = (c.n_encodes, c.n_decodes), deep_explorer.seg_image.value
    attn_png = deep_explorer.attn_image.value
    assert not [im for im in deep_explorer._seg_figure.axes[0].images if im.get_label() == figures.MASKS_LABEL]
    deep_explorer.show_masks.value = True
    assert (c.n_encodes, c.n_decodes) == counts and c.show_masks
    assert deep_explorer.seg_image.value != png and deep_explorer.attn_image.value == attn_png
    ax = deep_explorer._seg_figure.axes[0]
    assert ax.get_title() == "image + 3 mask proposals"
    (overlay,) = [im for im in ax.images if im.get_label() == figures.MASKS_LABEL]
    rgba = np.asarray(overlay.get_array())
    assert rgba.shape == (80, 112, 4)
    np.testing.assert_array_equal(rgba[..., 3] > 0, PROPOSALS > 0)  # unsegmented pixels stay transparent
    colours = {k: rgba[PROPOSALS == k][:, :3] for k in (1, 2, 3)}
    for k, col in colours.items():  # one colour per proposal, different proposals different colours
        assert (col == col[0]).all()
    assert len({tuple(col[0]) for col in colours.values()}) == 3
    deep_explorer.show_masks.value = False
    assert deep_explorer.seg_image.value == png and (c.n_encodes, c.n_decodes) == counts
    # masks=none: the toggle says there is nothing to draw
    explorer.show_masks.value = True
    assert explorer.controller.encoded.masks is None
    assert explorer._seg_figure.axes[0].get_title() == "image (no mask proposals)"
    assert "no mask proposals in this encode" in explorer.status.value


def test_proposal_colours_hand_worked():
    from proxyclip.explorer.figures import PROPOSAL_COLOURS, proposal_colors
    from proxyclip.viz.common import label_palette

    labels = torch.tensor([[0, 1, 1], [2, 0, 1 + PROPOSAL_COLOURS]])
    rgba = proposal_colors(labels, alpha=0.5)
    palette = label_palette(PROPOSAL_COLOURS) / 255.0
    np.testing.assert_array_equal(rgba[..., 3], [[0, 0.5, 0.5], [0.5, 0, 0.5]])
    np.testing.assert_allclose(rgba[0, 1, :3], palette[0]) and np.testing.assert_allclose(rgba[1, 0, :3], palette[1])
    np.testing.assert_allclose(rgba[1, 2, :3], palette[0])  # the palette cycles after PROPOSAL_COLOURS ids


@pytest.mark.parametrize("preset", postprocess_presets())
def test_every_postprocess_preset_and_its_settings_decode_once(explorer, tiny_segmenter, rand_image, preset):
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "postprocess" / f"{preset}.yaml"))
    post = get_postprocess(node["name"])
    if post.needs_sam:  # sam_refine: refused by ProxyCLIP's explorer (one line); Trident's configured with it
        decodes = explorer.controller.n_decodes
        explorer.postprocess.value = preset
        assert explorer.controller.n_decodes == decodes and "postprocess=sam_refine" in explorer.status.value
        tiny_segmenter = Segmenter.from_config(tiny_config("method=trident", f"postprocess={preset}"))
        explorer = Explorer(clip="test_tiny", vfm="test_tiny", image=rand_image, classes=CLASSES,
                            segmenter=tiny_segmenter, clip_options=["test_tiny"], vfm_options=["test_tiny"])
    c = explorer.controller
    enc = c.encoded
    if explorer.postprocess.value != preset:
        explorer.postprocess.value = preset
        assert (c.n_encodes, c.n_decodes) == (1, 2)
    assert explorer.post_panel.knobs == post.knobs
    settings = {k.name: node[k.name] for k in post.knobs}
    assert {n: explorer.post_panel.value(n) for n in explorer.post_panel.controls} == settings
    for knob in post.knobs:
        decodes = c.n_decodes
        settings[knob.name] = new = naive.other_value(knob, settings[knob.name])
        move(explorer.post_panel.controls[knob.name], knob, new)
        assert (c.n_encodes, c.n_decodes) == (1, decodes + 1), knob.name
        assert c.prediction.spec.postprocess_settings == {"name": post.name, **settings}
    expected = tiny_segmenter.decode(enc, CLASSES, postprocess={"name": post.name, **settings})
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert torch.equal(c.prediction.labels, expected.labels)  # a label-level post-process (sam_refine) too


def test_sliders_rerun_only_decode_with_the_slider_values(explorer, tiny_segmenter, rand_image):
    c = explorer.controller
    enc_before = c.encoded
    seg_png = explorer.seg_image.value
    controls = explorer.knob_panel.controls

    controls["gamma"].value = 5.0
    assert (c.n_encodes, c.n_decodes) == (1, 2)
    assert c.encoded is enc_before
    expected = tiny_segmenter.predict(rand_image, CLASSES, gamma=5.0)
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert not torch.equal(c.prediction.scores, tiny_segmenter.predict(rand_image, CLASSES).scores)

    controls["beta"].value = 0.8
    controls["logit_scale"].value = 20.0
    assert (c.n_encodes, c.n_decodes) == (1, 4)
    pred = c.prediction
    assert {k: pred.params[k] for k in ("method", "beta", "gamma", "logit_scale", "prob_thd")} == {
        "method": "proxyclip", "beta": 0.8, "gamma": 5.0, "logit_scale": 20.0, "prob_thd": 0.0}
    q = torch.softmax(20.0 * pred.scores, dim=0)  # queries: sky, person, people, horse
    torch.testing.assert_close(pred.probs[1], torch.maximum(q[1], q[2]))
    torch.testing.assert_close(pred.probs[0], q[0])

    controls["prob_thd"].value = 0.6
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
    expected = proxy_attention_numpy(c.encoded.vfm_features[1], beta=c.knobs["beta"], gamma=c.knobs["gamma"])
    np.testing.assert_allclose(v.proxy_row.numpy(), expected[3], rtol=1e-4, atol=1e-6)
    # the figure shows that row over window 1's pixels
    fig = c.attention_figure()
    heat = np.asarray(fig.axes[0].images[1].get_array())
    assert heat.shape == tuple(v.window_image.shape[1:]) == (64, 64)
    np.testing.assert_allclose(heat[8::16, 8::16].ravel(), expected[3], rtol=1e-4, atol=1e-6)
    assert fig.axes[0].get_title() == "proxyclip attention (test_tiny)"
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
    s_norm = (s - c.knobs["beta"] * s.mean()) * c.knobs["gamma"]
    np.testing.assert_allclose(v.affinity_row.numpy(), s[3], atol=1e-5)
    np.testing.assert_allclose(v.normalized_row.numpy(), s_norm[3], atol=1e-4)
    np.testing.assert_array_equal(v.mask_row.numpy(), s_norm[3] >= 0)
    titles = [ax.get_title() for ax in c.attention_figure(show_affinity=True).axes if ax.images]
    assert titles[0] == "cosine affinity S" and titles[-1] == "attention softmax(S')"
    explorer.knob_panel.controls["gamma"].value = 4.0  # while shown, every decode keeps them
    assert "proxy.affinity" in c.cache and c.n_decodes == 3


def test_clip_own_attention_is_the_blocks_multihead_attention(tiny_segmenter, rand_image):
    """The explorer's CLIP attention (vanilla_attention on the backbone's q/k) = torch's own attention weights."""
    enc = tiny_segmenter.encode(rand_image)
    ours = clip_own_attention(tiny_segmenter, enc)  # (n_win, 1, T, T)
    block = tiny_segmenter.clip_model.visual.transformer.resblocks[-1]
    assert isinstance(block.attn, torch.nn.MultiheadAttention)
    with torch.no_grad():
        x = block.ln_1(enc.clip_tokens)
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # (n_win, T, T)
    torch.testing.assert_close(ours[:, 0], weights, rtol=1e-4, atol=1e-6)


def test_backbone_change_reencodes_with_progress_and_caches(explorer, factory):
    c = explorer.controller
    messages, disabled = [], []
    explorer.progress.observe(lambda ch: messages.append(ch.new), names="description")
    first_knob = next(iter(explorer.knob_panel.controls.values()))
    first_knob.observe(lambda ch: disabled.append(ch.new), names="disabled")

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
        "proxyclip attention (test_tiny_mae)", "CLIP's own attention (test_tiny)"]

    explorer.vfm.value = "test_tiny"  # encoded before: taken from the cache, decoded again
    assert (c.n_encodes, c.n_decodes) == (2, 3)
    assert c.encoded is first


def test_method_and_postprocess_dropdowns_decode_only(explorer, tiny_segmenter):
    c = explorer.controller
    enc = c.encoded
    explorer.method.value = "sclip"
    assert (c.n_encodes, c.n_decodes) == (1, 2) and c.encoded is enc
    torch.testing.assert_close(c.prediction.scores, tiny_segmenter.decode(enc, CLASSES, method="sclip").scores)
    v = c.attention_view()  # SCLIP's attention of the chosen token, heads averaged, on CLIP's grid
    _, cache = tiny_segmenter.run_with_cache(enc, CLASSES, names=["attention.pattern"], method="sclip")
    t = 1 + v.proxy_grid[0] * v.proxy_grid[1]
    row = cache["attention.pattern"][v.window].mean(0)[1 + v.proxy_patch[0] * v.proxy_grid[1] + v.proxy_patch[1]]
    torch.testing.assert_close(v.proxy_row, row[1:] / row[1:].sum())
    assert cache["attention.pattern"].shape[-1] == t and v.proxy_grid == enc.clip_grid
    assert [ax.get_title() for ax in c.attention_figure().axes if ax.images][0] == "sclip attention"
    explorer.postprocess.value = "pamr"
    assert (c.n_encodes, c.n_decodes) == (1, 3)
    expected = tiny_segmenter.decode(enc, CLASSES, method="sclip", postprocess="pamr")
    torch.testing.assert_close(c.prediction.scores, expected.scores)
    assert c.segmentation_figure()._suptitle.get_text().startswith("sclip + pamr: test_tiny")
    explorer.method.value = "proxyclip"  # the post-process stays
    assert c.prediction.params["postprocess"]["name"] == "pamr" and c.n_decodes == 4


def test_classes_text_decodes_only_and_bad_input_is_reported(explorer):
    c = explorer.controller
    explorer.classes.value = "cat\ndog; puppy"
    assert (c.n_encodes, c.n_decodes) == (1, 2)
    assert c.prediction.class_names == ["cat", "dog; puppy"]
    assert c.prediction.queries == ["cat", "dog", "puppy"]
    explorer.classes.value = "cat\ncat"
    assert c.n_decodes == 2 and "duplicate" in explorer.status.value
    assert c.prediction.class_names == ["cat", "dog; puppy"]


def test_a_bad_setting_is_reported_and_the_control_reset(explorer):
    c = explorer.controller
    knob = next(k for k in c.postprocess_knobs() if k.kind == "ints") if c.postprocess_knobs() else None
    if knob is None:
        explorer.postprocess.value = next(p for p in postprocess_presets()
                                          if any(k.kind == "ints" for k in get_postprocess(
                                              OmegaConf.load(CONF_DIR / "postprocess" / f"{p}.yaml").name).knobs))
        knob = next(k for k in c.postprocess_knobs() if k.kind == "ints")
    decodes, before = c.n_decodes, list(c.postprocess[knob.name])
    explorer.post_panel.controls[knob.name].value = "8, x"
    assert c.n_decodes == decodes and "separated by commas" in explorer.status.value
    assert explorer.post_panel.value(knob.name) == before == c.postprocess[knob.name]
    explorer.post_panel.controls[knob.name].value = "0"  # below the declared range
    assert c.n_decodes == decodes and f"{knob.name} must be" in explorer.status.value


def test_new_image_by_upload_and_by_path(explorer, tmp_path):
    c = explorer.controller
    pixels = (np.random.default_rng(0).random((48, 72, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    explorer.inputs.upload.value = ({"name": "up.png", "type": "image/png", "size": len(buf.getvalue()),
                                     "content": memoryview(buf.getvalue()),
                                     "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    assert c.n_encodes == 2
    torch.testing.assert_close(c.image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert (explorer.patch_y.max, explorer.patch_x.max) == (47, 71)
    assert c.prediction.labels.shape == (48, 72)

    path = tmp_path / "p.png"
    Image.fromarray(pixels[:, ::-1].copy()).save(path)
    explorer.inputs.path.value = str(path)
    explorer.inputs.load.click()
    assert c.n_encodes == 3 and c.image_name == str(path)
    explorer.inputs.path.value = str(tmp_path / "missing.png")
    explorer.inputs.load.click()
    assert c.n_encodes == 3 and "not found" in explorer.status.value


def test_controller_without_widgets(factory, rand_image, tiny_segmenter):
    c = ExplorerController(clip="test_tiny", vfm="test_tiny", image=rand_image, classes=["a", "b"],
                           segmenter_factory=factory)
    assert (c.n_encodes, c.n_decodes) == (1, 1)
    assert [k.name for k in c.knob_declarations()] == [k.name for k in get_method(c.method).all_knobs]
    name = c.knob_declarations()[-1].name
    c.set_knobs(**{name: c.knobs[name]})  # unchanged value: nothing to do
    assert c.refresh() is False
    with pytest.raises(ValueError, match=f"method {c.method} has no knob"):
        c.set_knobs(no_such_knob=1.0)
    first = c.knob_declarations()[0]  # a switch: a number is refused, nothing changes
    with pytest.raises(ValueError, match=f"{first.name} must be true or false"):
        c.set_knobs(**{first.name: 1.5})
    assert c.refresh() is False
    c.set_method("naclip")
    assert c.knobs == {k: v for k, v in tiny_segmenter.decode_spec(method="naclip").params().items()
                       if k in get_method("naclip").knob_names + ("residual", "ffn", "logit_scale", "prob_thd")}
    c.set_knobs(gaussian_std=2.0, logit_scale=10.0)
    assert c.refresh() is True and c.n_decodes == 2
    assert c.prediction.params["gaussian_std"] == 2.0 and c.prediction.params["logit_scale"] == 10.0
    c.set_postprocess({"name": "pamr", "steps": 2})  # another function: the rest from its YAML
    c.refresh()
    assert c.prediction.spec.postprocess_settings == tiny_segmenter.decode_spec(
        postprocess={"name": "pamr", "steps": 2}).postprocess_settings
    c.set_point(-5, 10_000)  # clamped into the image
    assert c.point == (0.0, rand_image.shape[2] - 1.0)
    v = c.attention_view()
    win, row, col = viz.locate_patch(*c.point, c.encoded.image_size, c.encoded.resized_size, c.encoded.windows,
                                     v.proxy_grid)
    assert (v.window, v.proxy_patch) == (win, (row, col))
    assert c.n_encodes == 1


def test_only_what_changed_is_redrawn(explorer):
    """Only the method's own knobs change its attention: the switches, the decision and the post-process
    redraw the segmentation only (derived from the declarations)."""
    c = explorer.controller
    drawn = []
    real = c.attention_figure
    c.attention_figure = lambda *a, **k: drawn.append(1) or real(*a, **k)
    for knob in c.knob_declarations():
        seg_png, n_drawn = explorer.seg_image.value, len(drawn)
        move(explorer.knob_panel.controls[knob.name], knob, naive.other_value(knob, c.knobs[knob.name]))
        assert explorer.seg_image.value != seg_png, knob.name  # redrawn (its title shows the values)
        assert len(drawn) - n_drawn == (knob.name in get_method(c.method).knob_names), knob.name
    n_drawn = len(drawn)
    explorer.postprocess.value = next(p for p in postprocess_presets() if p != explorer.postprocess.value)
    assert len(drawn) == n_drawn
    seg_png, attn_png, decodes = explorer.seg_image.value, explorer.attn_image.value, c.n_decodes
    explorer.show_affinity.value = True  # a view switch: the attention panel only (one decode records the stages)
    assert explorer.attn_image.value != attn_png and explorer.seg_image.value == seg_png
    assert c.n_decodes == decodes + 1


def test_knob_controls_of_every_kind():
    """Each kind of declaration -> its widget, with the value, range and readback it declares."""
    knobs = [Knob("f", "float", "a float", low=0, high=5), Knob("i", "int", "an int", low=1),
             Knob("s", "float", "slid", low=0, slider=(0.0, 2.0, 0.25)), Knob("n", "int", "n", slider=(0, 9, 3)),
             Knob("b", "bool", "a switch"), Knob("c", "choice", "a choice", choices=("x", "y")),
             Knob("d", "ints", "a list", low=1)]
    values = dict(f=1.5, i=3, s=4.0, n=6, b=True, c="y", d=[8, 16])
    for knob in knobs:
        w = knob_control(knob, values[knob.name])
        assert type(w) is expected_widget(knob) and control_value(knob, w) == values[knob.name]
    f, i, s = (knob_control(k, values[k.name]) for k in knobs[:3])
    assert (f.min, f.max) == (0, 5) and i.min == 1 and i.max > 10 ** 9  # the declared bounds, else open
    assert (s.min, s.max, s.step, s.readout_format) == (0.0, 4.0, 0.25, ".2f")  # widened to hold 4.0
    calls = []
    panel = KnobPanel(calls.append)
    panel.show(knobs, values)
    panel.show(knobs, {**values, "s": 1.0, "d": [2]})  # from code: no callback
    assert calls == [] and panel.value("s") == 1.0 and panel.value("d") == [2]
    panel.controls["d"].value = "4 5,6"
    assert calls == ["d"] and panel.value("d") == [4, 5, 6]
    panel.controls["d"].value = "4, five"
    with pytest.raises(ValueError, match="d must be a list of integers >= 1, separated by commas"):
        panel.value("d")


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
    explorer.patch.on_click({"type": "click", "dataX": dx, "dataY": H_px - dy})
    assert (explorer.patch_x.value, explorer.patch_y.value) == (30, 20)
    assert c.point == (20.0, 30.0) and c.n_decodes == decodes
    explorer.patch.on_click({"type": "click", "dataX": 1.0, "dataY": 1.0})  # the corner: no panel, nothing changes
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
    control = ex.knob_panel.controls[c.knob_declarations()[-1].name]
    assert not control.disabled  # controls released
    control.value = 0.5  # and the explorer still works
    assert c.n_decodes == 3 and c.prediction.spec.params()[c.knob_declarations()[-1].name] == 0.5


def _block_pattern64(block, x):
    """softmax(tau q k^T) of an open_clip block, float64, from ln_1 and in_proj_weight / in_proj_bias."""
    x = x.double()
    ln = block.ln_1
    u = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    u = u * ln.weight.double() + ln.bias.double()
    d, h = x.shape[-1], int(block.attn.num_heads)
    w, b = block.attn.in_proj_weight.double(), block.attn.in_proj_bias.double()
    q, k = ((u @ w[j * d:(j + 1) * d].T + b[j * d:(j + 1) * d]).view(*x.shape[:2], h, d // h).transpose(1, 2)
            for j in (0, 1))
    return torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)


def test_block_slider_shows_each_blocks_own_attention(explorer, tiny_segmenter, rand_image):
    c, seg = explorer.controller, tiny_segmenter
    last = seg.clip.num_blocks - 1
    assert (explorer.block.min, explorer.block.max, explorer.block.value) == (0, last, last)
    assert c.attention_view().block_row is None  # the last block: the method's attention beside CLIP's own
    explorer.patch_y.value, explorer.patch_x.value = 10, 100
    explorer.block.value = 0
    assert (c.n_encodes, c.n_decodes) == (2, 1)  # CLIP encoded once more, keeping every block's tokens; no decode
    assert "clip.blocks.0.resid_pre" in c.encoded.layers
    v = c.attention_view()
    # by hand: (10, 100) -> window 1, CLIP grid 4x4 (16 px): token row 0, column 3 -> token 1 + 3 (CLS first)
    assert v.block == 0 and v.window == 1 and v.clip_patch == (0, 3)
    ref = _block_pattern64(seg.clip.block(0), c.encoded.layers["clip.blocks.0.resid_pre"][1:2])[0].mean(0)[1 + 3, 1:]
    np.testing.assert_allclose(v.block_row.numpy(), (ref / ref.sum()).numpy(), rtol=1e-4, atol=1e-6)
    # the same as the hook point clip.blocks.0.attn.pattern records in an encode of the image
    _, cache = seg.run_with_cache(rand_image, CLASSES, names=["clip.blocks.0.attn.pattern"])
    hooked = cache["clip.blocks.0.attn.pattern"][1].mean(0)[1 + 3, 1:]
    np.testing.assert_allclose(v.block_row.numpy(), (hooked / hooked.sum()).numpy(), rtol=1e-4, atol=1e-6)
    fig = c.attention_figure()
    assert fig.axes[0].get_title() == "CLIP block 0 (every method's)"
    explorer.method.value = "sclip"  # another method's decode: the same block attention, no encode
    assert c.n_encodes == 2 and torch.equal(c.attention_view().block_row, v.block_row)
    explorer.block.value = last
    assert c.attention_view().block_row is None and c.n_encodes == 2
    with pytest.raises(ValueError, match=rf"block must be an integer in 0..{last}"):
        c.set_block(last + 1)


def test_a_method_can_add_attention_views(explorer, monkeypatch):
    from proxyclip import attention_views
    from proxyclip.explorer import inside

    monkeypatch.setattr(attention_views, "EXTRA_VIEWS", {})  # the registry a method's module adds to
    inside.register_view(inside.pattern_view("sclip", "sclip's pattern again", "attention.pattern"))
    c = explorer.controller
    explorer.method.value = "sclip"
    v = c.attention_view()
    assert [t for t, *_ in v.extra] == ["sclip's pattern again"]
    torch.testing.assert_close(v.extra[0][1], v.proxy_row)
    titles = [ax.get_title() for ax in c.attention_figure().axes if ax.images]
    assert titles[-1] == "sclip's pattern again"
    explorer.method.value = "clip"
    assert c.attention_view().extra == []


def marks(fig):
    return [t.get_text() for t in fig.texts if t.get_label() == viz.marks.MARK_LABEL]


def test_explorer_figures_carry_the_random_weights_mark(explorer, tiny_segmenter, monkeypatch):
    """The tiny segmenter runs random weights by choice (experiment=tiny: weights=random): every figure
    the explorer draws says so; with real weights, none does."""
    c = explorer.controller
    assert tiny_segmenter.random_weights and tiny_segmenter.cfg.weights.source == "random"
    c.set_record_stages(True)
    c.refresh()
    figs = [c.segmentation_figure(), c.attention_figure(), c.attention_figure(show_affinity=True)]
    for fig in figs:
        (text,) = marks(fig)
        assert "RANDOM WEIGHTS" in text and "weights=random was chosen" in text
    assert figs[0]._suptitle.get_text().startswith(c.prediction.spec.method)  # the title stays
    monkeypatch.setattr(tiny_segmenter.cfg.weights, "source", "pretrained")  # random although pretrained was asked
    assert "pretrained weights were unavailable" in marks(c.segmentation_figure())[0]
    monkeypatch.setattr(tiny_segmenter, "random_weights", False)
    assert marks(c.segmentation_figure()) == [] and marks(c.attention_figure()) == []


def readme_block(marker: str) -> str:
    """The fenced python block after ``<!-- tested: marker -->`` in the README."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text.split(f"<!-- tested: {marker} -->", 1)[1]
    assert after.lstrip().startswith("```python"), marker
    return after.split("```python", 1)[1].split("```", 1)[0]


def test_readme_explorer_snippet_runs(tmp_path, monkeypatch):
    """The README's ExplorerController example, run as written (its own tiny models, built from conf/)."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("explorer-from-python"), "README.md", "exec"), scope)
    c = scope["c"]
    assert (c.n_encodes, c.n_decodes) == (1, 2)  # one encode, then a decode per refresh
    assert c.classes == ["sky", "person; people", "horse"] and c.method == "proxyclip"
    assert (c.prediction.params["beta"], c.prediction.params["gamma"]) == (1.1, 4.0)
    labels = scope["labels"]
    assert labels.shape == c.image.shape[1:] and c.point == (120.0, 200.0)
    for name in ("segmentation.png", "attention.png"):
        assert Image.open(tmp_path / name).size[0] > 100

