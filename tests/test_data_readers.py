"""Dataset readers end to end on tiny fixture datasets in the real layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_datasets import BUILDERS, make_coco_stuff, make_custom, make_voc
from proxyclip.data import BadLabelError, DatasetNotFoundError, build_dataset, read_class_lines
from proxyclip import compose_config


def _cfg(name, data_root, *extra):
    return compose_config("eval", [f"dataset={name}", f"data_root={data_root}", *extra])


def _reduce(raw, ignore=255):
    """reduce_zero_label as mmseg defines it, computed independently: 0 -> ignore, k -> k-1."""
    raw = raw.astype(np.int64)
    return np.where((raw == 0) | (raw == ignore), ignore, raw - 1)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reader_reads_every_listed_sample_in_its_layout(tmp_path, name):
    expected = BUILDERS[name](tmp_path)
    cfg = _cfg(name, tmp_path)
    ds = build_dataset(cfg.dataset)
    assert sorted(s.id for s in ds.samples) == sorted(expected)
    assert ds.num_classes == cfg.dataset.num_classes == len(read_class_lines(cfg.dataset.classnames))
    for i, s in enumerate(ds.samples):
        img_path, raw = expected[s.id]
        assert s.image == img_path
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (raw.shape[1], raw.shape[0])
        assert label.dtype == torch.int64
        want = _reduce(raw) if cfg.dataset.reduce_zero_label else raw.astype(np.int64)
        np.testing.assert_array_equal(label.numpy(), want)


def test_voc20_and_ade20k_reduce_zero_label(tmp_path):
    make_voc(tmp_path)
    ds = build_dataset(_cfg("voc20", tmp_path).dataset)
    _, label = ds[0]
    raw = np.array(Image.open(ds.samples[0].label))
    assert (label[torch.from_numpy(raw == 0)] == 255).all()  # background -> ignore
    assert (label[torch.from_numpy(raw == 15)] == 14).all()  # person 15 -> 14
    assert (label[torch.from_numpy(raw == 255)] == 255).all()  # boundary stays ignore
    assert label[label != 255].max() <= 19


def test_sixteen_bit_labels_keep_values_above_255(tmp_path):
    BUILDERS["ade847"](tmp_path)
    ds = build_dataset(_cfg("ade847", tmp_path).dataset)
    values = set(torch.cat([ds[i][1].flatten() for i in range(len(ds))]).tolist())
    assert {255, 256, 846, 65535} <= values  # 255 is a class here; 65535 is the ignore index
    assert ds.ignore_index == 65535


def test_custom_dataset_folder(tmp_path):
    expected = make_custom(tmp_path / "mine")
    cfg = _cfg("custom", tmp_path, f"dataset.root={tmp_path / 'mine'}")
    ds = build_dataset(cfg.dataset)
    assert ds.class_names == ["background", "sky; cloud", "tree"]
    assert {s.id: s.image for s in ds.samples} == {k: v[0] for k, v in expected.items()}
    np.testing.assert_array_equal(ds[1][1].numpy(), expected["img1"][1])


def test_background_words_override_class_zero(tmp_path):
    make_voc(tmp_path)
    ds = build_dataset(_cfg("voc21", tmp_path, "dataset.background=[sky,wall]").dataset)
    assert ds.class_names[0] == "sky; wall" and ds.class_names[1] == "aeroplane"
    shipped = build_dataset(_cfg("voc21", tmp_path).dataset).class_names[0]
    assert shipped.startswith("sky; wall; tree") and len(shipped.split("; ")) == 26


def test_missing_root_says_which_path_and_how_to_prepare(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset(_cfg("voc21", tmp_path).dataset)
    msg = str(e.value)
    assert str(tmp_path / "VOCdevkit" / "VOC2012") in msg and "JPEGImages" in msg
    assert "VOCtrainval_11-May-2012.tar" in msg  # how to prepare it


def test_misnamed_root_gets_a_suggestion(tmp_path):
    make_voc(tmp_path)
    wrong = tmp_path / "VOCdevkit"  # one level too high
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset(_cfg("voc21", tmp_path, f"dataset.root={wrong}").dataset)
    assert f"did you mean dataset.root={wrong / 'VOC2012'}" in str(e.value)


def test_missing_listed_file_is_named(tmp_path):
    expected = make_voc(tmp_path)
    victim = sorted(expected)[1]
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{victim}.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{victim}.png"):
        build_dataset(_cfg("voc21", tmp_path).dataset)


def test_label_of_wrong_size_is_reported_with_its_file(tmp_path):
    expected = make_voc(tmp_path)
    sid = sorted(expected)[0]
    lab_path = tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{sid}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(lab_path)
    ds = build_dataset(_cfg("voc21", tmp_path).dataset)
    with pytest.raises(BadLabelError) as e:
        ds[0]
    assert str(lab_path) in str(e.value) and "12x10" in str(e.value)


def test_label_values_out_of_range_are_reported(tmp_path):
    expected = make_coco_stuff(tmp_path)
    sid = sorted(expected)[2]
    raw = expected[sid][1].copy()
    raw[0, :3] = 200  # not a class (0..170) and not 255
    lab_path = tmp_path / "coco_stuff164k/annotations/val2017" / f"{sid}_labelTrainIds.png"
    Image.fromarray(raw).save(lab_path)
    ds = build_dataset(_cfg("coco_stuff", tmp_path).dataset)
    with pytest.raises(BadLabelError) as e:
        ds.load_label(2)
    assert str(lab_path) in str(e.value) and "[200]" in str(e.value) and "3 pixels" in str(e.value)


def test_rgb_label_is_rejected(tmp_path):
    make_voc(tmp_path)
    ds = build_dataset(_cfg("voc21", tmp_path).dataset)
    Image.new("RGB", (64, 48)).save(ds.samples[0].label)
    with pytest.raises(BadLabelError, match="mode 'RGB'"):
        ds.load_label(0)


def test_num_classes_must_match_the_class_file(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(ValueError, match="has 21 lines but dataset.num_classes=20"):
        build_dataset(_cfg("voc21", tmp_path, "dataset.num_classes=20").dataset)


def test_shipped_class_files_have_the_protocol_sizes():
    sizes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
             "cityscapes": 19, "ade20k": 150, "context459": 459, "ade847": 847}
    for name, k in sizes.items():
        lines = read_class_lines(name)
        assert len(lines) == k, name
        assert len(set(lines)) == k, name  # no duplicated class line
    assert read_class_lines("context60")[0] == "background"
    assert "; " in read_class_lines("voc21")[0] and "; " in read_class_lines("coco_object")[0]


# docs/protocol.md's per-dataset protocol, typed out: classes, short side, crop, stride, prob_thd, reduce_zero_label
PROTOCOL = {
    "voc21": (21, 336, 336, 112, 0.20, False), "context60": (60, 336, 336, 112, 0.15, False),
    "coco_object": (81, 336, 336, 112, 0.25, False), "voc20": (20, 336, 336, 112, 0.0, True),
    "context59": (59, 336, 336, 112, 0.0, True), "coco_stuff": (171, 336, 336, 112, 0.0, False),
    "cityscapes": (19, 448, 224, 112, 0.0, False), "ade20k": (150, 448, 336, 112, 0.0, True),
}


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_dataset_config_carries_the_reference_protocol(name):
    cfg = compose_config("eval", [f"dataset={name}"])
    k, short, crop, stride, thd, rzl = PROTOCOL[name]
    assert (cfg.dataset.num_classes, cfg.protocol.short_side, cfg.protocol.crop, cfg.protocol.stride) == (k, short, crop, stride)
    assert cfg.protocol.prob_thd == pytest.approx(thd) and cfg.dataset.reduce_zero_label is rzl
    assert cfg.dataset.ignore_index == 255 and cfg.method.beta == 1.2 and cfg.method.logit_scale == 40.0
    # a command-line override still wins over the dataset's protocol
    assert compose_config("eval", [f"dataset={name}", "protocol.crop=224"]).protocol.crop == 224


def test_shipped_class_files_split_on_semicolon_space_only():
    """The published protocol: a line splits on "; " only; commas stay inside one name (one query)."""
    from proxyclip.data import read_class_lines
    from proxyclip.text import parse_classes

    ade = read_class_lines("ade847")
    assert len(ade) == 847 and ade[1] == "building, edifice"
    assert parse_classes(ade).queries == ade  # 847 lines, 847 queries: no synonyms
    voc = parse_classes(read_class_lines("voc21"))
    assert voc.queries[:3] == ["sky", "wall", "tree"] and voc.query_to_class.count(0) == 26
    obj = read_class_lines("coco_object")
    assert len(obj) == 81 and len(obj[0].split("; ")) == 17 and all("; " not in ln for ln in obj[1:])
    for name in ("ade20k", "cityscapes", "coco_stuff", "context459", "context59", "context60", "voc20"):
        lines = read_class_lines(name)
        assert parse_classes(lines).queries == lines, name  # one query a line


@pytest.mark.parametrize("name,first", [("voc21", "background"), ("context60", "background"),
                                        ("coco_object", "background"), ("voc20", "aeroplane"), ("ade847", "wall")])
def test_display_names_call_background_class_background(tmp_path, name, first):
    from proxyclip.text import display_names

    cfg = compose_config("eval", [f"dataset={name}"]).dataset
    lines = read_class_lines(str(cfg.classnames))
    names = display_names(lines, cfg.background_class)
    assert names[0] == first and names[1:] == [ln.split("; ")[0] for ln in lines[1:]]
