"""Protocol presets (conf/protocol/): for every (protocol, dataset) pair, the composed and resolved
settings equal the published facts shipped in tests/data/protocols/protocols.json (read from each
official repository's configs and evaluation code; docs/protocol.md), and the class-name file the
preset picks gives the official file's query lists (the official files' copies, with their own
synonym separator, are in tests/data/protocols/<method>/; a file identical to ours is checked by
its digest). A command-line value wins over a preset's, and any method runs under any protocol."""

import hashlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from proxyclip import compose_config
from proxyclip.data import classnames_path, read_class_lines
from proxyclip.resolve import decode_spec
from proxyclip.text import parse_classes

DATA = Path(__file__).parent / "data" / "protocols"
FACTS = json.loads((DATA / "protocols.json").read_text())
PAPER_DATASETS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
PROTOCOLS = {"sclip": "sclip", "naclip": "naclip", "clearclip": "clearclip", "proxyclip": "project_proxyclip"}
PAIRS = [(p, d) for p in PROTOCOLS for d in PAPER_DATASETS]


def composed(*overrides):
    return compose_config("eval", ["data_root=/nonexistent", *overrides])


def official_queries(protocol: str, dataset: str):
    """The official class file's queries per class, split with that repository's own separator;
    the file is the shipped copy, or ours when protocols.json says they are identical (its digest
    is checked against the facts either way)."""
    fact = FACTS[protocol][dataset]
    if fact["class_file_copy"]:
        raw = (DATA / fact["class_file_copy"]).read_bytes()
    else:
        assert fact["class_file_vs_project"] == "identical"
        ours = (Path(classnames_path(dataset))).read_bytes()
        raw = ours[:-1] if ours.endswith(b"\n") else ours  # the official files have no final newline
    assert hashlib.sha256(raw).hexdigest() == fact["official_class_file_sha256"]
    sep = FACTS["_meta"]["synonym_separator"][protocol]
    return [[q.strip() for q in line.split(sep)] for line in raw.decode().replace("\r\n", "\n").split("\n")
            if line.strip()]


def project_queries(classnames: str):
    cl = parse_classes(read_class_lines(classnames))
    out = [[] for _ in cl.class_names]
    for q, k in zip(cl.queries, cl.query_to_class):
        out[k].append(q)
    return out


@pytest.mark.parametrize("protocol,dataset", PAIRS, ids=[f"{p}-{d}" for p, d in PAIRS])
def test_resolved_settings_equal_the_published_facts(protocol, dataset):
    fact = FACTS[PROTOCOLS[protocol]][dataset]
    cfg = composed(f"protocol={protocol}", f"method={protocol}", f"dataset={dataset}")
    p = OmegaConf.to_container(cfg.protocol, resolve=True)
    for key in ("short_side", "max_long_side", "crop", "stride", "prob_thd"):
        assert p[key] == fact[key], key
    if "whole_image" in fact:
        assert (p["crop"] is None) == fact["whole_image"]
    spec = decode_spec(cfg, classes=read_class_lines(str(cfg.dataset.classnames)))
    assert spec.logit_scale == fact["logit_scale"] and spec.prob_thd == fact["prob_thd"]
    assert spec.area_thd == fact.get("area_thd")
    post = spec.postprocess_settings
    if fact.get("pamr") is None:
        assert post == {"name": "none"}
    else:
        assert post == {"name": "pamr", "steps": fact["pamr"]["steps"], "dilations": fact["pamr"]["dilations"]}
    if protocol == "proxyclip":  # the project's own files (the facts give no class-file entry for it)
        assert str(cfg.dataset.classnames) == dataset and p["classnames"] is None
        return
    assert project_queries(str(cfg.dataset.classnames)) == official_queries(protocol, dataset)
    assert bool(cfg.dataset.reduce_zero_label) == fact["reduce_zero_label"]
    assert int(cfg.dataset.ignore_index) == fact["ignore_index"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_the_logit_scale_is_the_protocols_for_any_method(protocol):
    """Any method under any protocol: SCLIP's 65 on VOC21 for NACLIP too; ProxyCLIP's protocol leaves
    each method its own (ClearCLIP 50, the others 40)."""
    for method in ("naclip", "clearclip", "clip"):
        cfg = composed(f"protocol={protocol}", f"method={method}", "dataset=voc21")
        want = FACTS[PROTOCOLS[protocol]]["voc21"]["logit_scale"]
        if protocol == "proxyclip":
            want = float(cfg.method.logit_scale)
        assert cfg.method.name == method and decode_spec(cfg).logit_scale == want


def test_method_naclip_under_protocol_sclip():
    cfg = composed("method=naclip", "protocol=sclip", "dataset=voc21")
    spec = decode_spec(cfg, classes=read_class_lines(str(cfg.dataset.classnames)))
    assert (spec.method, spec.logit_scale, spec.prob_thd, spec.area_thd) == ("naclip", 65.0, 0.1, 0.1)
    assert str(cfg.dataset.classnames) == "sclip/voc21" and cfg.protocol.crop == 224 and cfg.postprocess.name == "none"


@pytest.mark.parametrize("override,key,value", [
    ("protocol.crop=336", "crop", 336), ("protocol.stride=56", "stride", 56),
    ("protocol.short_side=448", "short_side", 448),
    ("protocol.prob_thd=0.3", "prob_thd", 0.3), ("protocol.area_thd=null", "area_thd", None),
    ("protocol.logit_scale=30", "logit_scale", 30.0), ("protocol.classnames=voc21", "classnames", "voc21"),
    ("protocol.datasets.voc21.short_side=400", "short_side", 400),
])
def test_a_command_line_value_wins_over_the_presets(override, key, value):
    cfg = composed("protocol=sclip", "dataset=voc21", override)
    assert OmegaConf.to_container(cfg.protocol, resolve=True)[key] == value
    other = OmegaConf.to_container(composed("protocol=sclip", "dataset=voc20", override).protocol, resolve=True)
    if override.startswith("protocol.datasets"):
        assert other[key] == 336  # a table entry changes that dataset only


def test_command_line_wins_over_the_protocols_postprocess_class_file_and_logit_scale():
    cfg = composed("protocol=naclip", "dataset=voc21", "postprocess=none")
    assert cfg.postprocess.name == "none" and decode_spec(cfg).postprocess_settings == {"name": "none"}
    assert composed("protocol=naclip", "dataset=voc21").postprocess.name == "pamr"
    cfg = composed("protocol=sclip", "dataset=voc21", "dataset.classnames=voc21")
    assert str(cfg.dataset.classnames) == "voc21"
    cfg = composed("protocol=sclip", "dataset=voc21", "method=clearclip", "protocol.logit_scale=null")
    assert decode_spec(cfg).logit_scale == 50.0  # null: the method's own
    assert decode_spec(cfg, logit_scale=12.0).logit_scale == 12.0  # a decode's own value wins over both


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("dataset", ["ade847", "context459", "custom"])
def test_a_dataset_the_preset_does_not_list_gets_its_base_values(protocol, dataset):
    """docs/protocol.md: ade847 / context459 / custom get the preset's ``base`` (its segmentor's
    defaults); ProxyCLIP's preset lists ade847 and context459 with ADE20K's settings."""
    cfg = composed(f"protocol={protocol}", f"dataset={dataset}", "dataset.root=/nonexistent")
    p = OmegaConf.to_container(cfg.protocol, resolve=True)
    row = dict(p["base"], **p["datasets"].get(dataset, {}))
    assert {k: p[k] for k in row} == row
    if protocol != "proxyclip" or dataset == "custom":
        assert {k: p[k] for k in p["base"]} == p["base"]
    assert p["classnames"] is None and str(cfg.dataset.classnames) != "None"


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_segment_and_config_compose_without_a_dataset(protocol):
    for name in ("segment", "config"):
        cfg = compose_config(name, [f"protocol={protocol}"])
        p = OmegaConf.to_container(cfg.protocol, resolve=True, throw_on_missing=True)
        assert {k: p[k] for k in p["base"]} == p["base"]


def test_the_protocols_are_documented_and_the_class_files_credited():
    docs = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    for repo, commit in (("wangf3014/SCLIP", "b56bd30"), ("sinahmr/NACLIP", "0cac3a6"),
                         ("mc-lan/ClearCLIP", "ad68a40")):
        assert repo in docs and commit in docs
    shipped = sorted(str(p.relative_to(classnames_path("voc21").parent)) for p in
                     classnames_path("voc21").parent.glob("*/*.txt"))
    assert shipped and all(f"classnames/{s}" in docs for s in shipped), shipped
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"data/classnames/*/*.txt"' in pyproject  # they ship in the wheel
    assert "protocol=sclip" in docs and "method=naclip protocol=sclip" in docs


@pytest.mark.parametrize("override,match", [
    ("protocol.area_thd=1.5", r"protocol.area_thd must be null \(off\) or a fraction in \[0, 1\), got 1.5"),
    ("protocol.logit_scale=-1", r"protocol.logit_scale must be"),
    ("protocol.prob_thd=2", r"protocol.prob_thd must be"),
])
def test_a_bad_protocol_value_is_named(override, match):
    with pytest.raises(ValueError, match=match):
        decode_spec(composed("protocol=sclip", "dataset=voc21", override))


def test_a_preset_without_a_value_names_the_field():
    with pytest.raises(Exception, match=r"protocol sclip: no short_side for dataset custom .*protocol.base"):
        cfg = composed("protocol=sclip", "dataset=custom", "dataset.root=/x", "~protocol.base.short_side")
        OmegaConf.to_container(cfg.protocol, resolve=True)


# SC-CLIP's protocol as docs/methods.md tables it (its segmentor and configs; no shipped facts file):
# (short_side, crop, stride, prob_thd, logit_scale, area_thd) per dataset
SCCLIP = {"voc21": (336, 224, 112, 0.15, 50.0, 0.1), "context60": (336, 224, 112, 0.15, 40.0, None),
          "coco_object": (336, 224, 112, 0.35, 55.0, None), "voc20": (336, 224, 112, 0.0, 40.0, None),
          "context59": (336, 224, 112, 0.0, 40.0, None), "coco_stuff": (336, 224, 112, 0.0, 40.0, None),
          "cityscapes": (560, 224, 112, 0.0, 40.0, None), "ade20k": (336, 224, 112, 0.0, 40.0, None)}


@pytest.mark.parametrize("dataset", sorted(SCCLIP))
def test_scclip_preset_composes_to_its_table(dataset):
    p = OmegaConf.to_container(composed("protocol=scclip", "method=scclip", f"dataset={dataset}").protocol,
                               resolve=True)
    got = tuple(p[k] for k in ("short_side", "crop", "stride", "prob_thd", "logit_scale", "area_thd"))
    assert got == SCCLIP[dataset] and p["classnames"] is None
