"""COCO-Object conversion from COCO-Stuff: hand-worked label mappings and the command."""

import numpy as np
from PIL import Image

from fixtures_datasets import make_coco_stuff
from proxyclip.cli.convert_coco_object import main as convert_main
from proxyclip.data import build_dataset
from proxyclip.data.coco import COCO_THING_IDS, raw_to_object_lut, raw_to_stuff_trainids_lut
from proxyclip import compose_config


def test_thing_ids_are_cocos_80_categories():
    assert len(COCO_THING_IDS) == 80 and COCO_THING_IDS[0] == 1 and COCO_THING_IDS[-1] == 90
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(COCO_THING_IDS)


def test_original_stuffthingmap_values_hand_worked():
    obj, stuff = raw_to_object_lut(), raw_to_stuff_trainids_lut()
    # value = COCO category id - 1
    assert obj[0] == 1 and stuff[0] == 0  # person (id 1)
    assert obj[12] == 12 and stuff[12] == 11  # stop sign (id 13; id 12 unused)
    assert obj[89] == 80 and stuff[89] == 79  # toothbrush (id 90)
    assert obj[91] == 0 and stuff[91] == 80  # banner (id 92), first stuff class
    assert obj[181] == 0 and stuff[181] == 170  # wood (id 182), last stuff class
    assert obj[255] == 0 and stuff[255] == 255  # unlabeled: background for COCO-Object, ignore for Stuff


def test_converter_on_train_id_maps_and_reader(tmp_path, capsys):
    expected = make_coco_stuff(tmp_path)
    ann = tmp_path / "coco_stuff164k/annotations/val2017"
    assert convert_main([str(ann), str(ann), "--no-progress"]) == 0
    assert "wrote 3" in capsys.readouterr().out
    ds = build_dataset(compose_config("eval", ["dataset=coco_object", f"data_root={tmp_path}"]).dataset)
    assert len(ds) == 3 and ds.num_classes == 81
    for i, s in enumerate(ds.samples):
        raw = expected[s.id][1].astype(np.int64)
        want = np.where(raw < 80, raw + 1, 0)  # things 0..79 -> 1..80; stuff 80..170 and 255 -> 0
        np.testing.assert_array_equal(ds[i][1].numpy(), want)
    # a rerun keeps finished files (resumable conversion)
    assert convert_main([str(ann), str(ann), "--no-progress"]) == 0
    assert "wrote 0" in capsys.readouterr().out


def test_converter_from_original_maps_also_writes_stuff_train_ids(tmp_path):
    src = tmp_path / "stuffthingmaps_trainval2017" / "val2017"
    src.mkdir(parents=True)
    raw = np.array([[0, 12, 89, 91], [181, 255, 5, 100]], np.uint8)
    Image.fromarray(raw).save(src / "000000000139.png")
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--stuff-out", str(out), "--no-progress"]) == 0
    obj = np.array(Image.open(out / "000000000139_instanceTrainIds.png"))
    stuff = np.array(Image.open(out / "000000000139_labelTrainIds.png"))
    assert obj.tolist() == [[1, 12, 80, 0], [0, 0, 6, 0]]
    assert stuff.tolist() == [[0, 11, 79, 80], [170, 255, 5, 89]]


def test_converter_missing_source_is_a_clear_error(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "COCO-Stuff label folder" in capsys.readouterr().err
